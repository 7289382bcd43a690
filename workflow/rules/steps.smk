# The jobs that are not per cell: the generated tiny data (tiny scale only; real datasets are
# DVC-tracked inputs that a real run checks before it starts), the figures from checkpoints
# (mpvg analyze) and the tables from result.json files (mpvg report).

for _job in [job for job in JOBS.values() if not job.key]:

    rule:
        name:
            _job.rule
        input:
            ancient(_job.deps),  # see cells.smk
        output:
            [directory(out) for out in _job.outs] if _job.directory_outs else _job.outs,
        params:
            cmd=wf.Opaque(_job.shell()),
        threads: _job.resources["threads"]
        resources:
            **snakemake_resources(_job),
        shell:
            "{params.cmd}"
