# The jobs that are not per cell: the generated tiny data (tiny scale only; real datasets are
# DVC-tracked inputs that a real run checks before it starts), the figures from checkpoints
# (mpvg analyze), the tables from result.json files (mpvg report), and the targets a researcher
# asks for by name (table1 ... table6, figure1, figure5, downstream: those runs, then those tables).

for _job in [job for job in JOBS.values() if not job.key and not job.target]:

    rule:
        name:
            _job.rule
        input:
            job_inputs(_job),
        output:
            report_outputs(_job),
        log:
            _job.log,
        params:
            cmd=wf.Opaque(_job.shell()),
            sig=SIG.get((_job.rule, _job.key), ""),
        threads: _job.resources["threads"]
        resources:
            **snakemake_resources(_job),
        shell:
            "exec {params.cmd} >> {log} 2>&1"


for _job in [job for job in JOBS.values() if job.target]:

    rule:
        name:
            _job.rule
        input:
            job_inputs(_job),
        log:
            f"{RUNS}/logs/{_job.rule}.log",
        params:
            cmd=wf.Opaque(_job.shell()),
        threads: 1
        localrule: True
        shell:
            "{params.cmd} 2>&1 | tee {log}"


rule figures:
    input:
        f"{REPORTS}/figures",
        upstream_markers([f"{REPORTS}/figures"]),
    localrule: True


# A job that must run while its output is there (mpvg.workflow.state.stale_markers: its settings
# changed where Snakemake kept no record, e.g. after `dvc checkout`) reads one of these markers:
# Snakemake runs this local job first, then that job (deleting its old output), then deletes the
# marker. A dry run lists it with the reason.
rule stale:
    output:
        temp(f"{STALE_DIR}/{{name}}"),
    log:
        f"{RUNS}/logs/stale/{{name}}.log",
    params:
        why=lambda wildcards: STALE.get(f"{STALE_DIR}/{wildcards.name}", ("", "", "?"))[2],
        # markers of the same job left by a Snakemake killed before that job ran
        leftovers=lambda wildcards: wf.Opaque(" ".join(
            shlex.quote(str(p)) for p in sorted(Path(STALE_DIR).glob(f"{wildcards.name.rsplit('.', 1)[0]}.*"))
            if str(p) != f"{STALE_DIR}/{wildcards.name}")),
    wildcard_constraints:
        name=r"[^/]+",
    localrule: True
    shell:
        "rm -f {params.leftovers}; printf 'mpvg: runs again: %s\\n' {params.why:q} | tee {output} {log} >&2"
