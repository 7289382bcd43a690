# Configuration, the job plan, the rerun rule, start-of-run checks. Rules stay thin calls into `mpvg`.
import os
import shlex
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake_interface_executor_plugins.settings import ExecMode

from mpvg.config import ConfigError, load_params
from mpvg.workflow import plan as wf
from mpvg.workflow import preflight
from mpvg.workflow import state as wf_state


validate(config, schema="../schemas/config.schema.yaml")

PARAMS_FILE = config["params"]
OVERRIDES = list(config["set"]) + ([f"scale={config['scale']}"] if config["scale"] else [])
try:
    P = load_params(PARAMS_FILE, OVERRIDES)
except ConfigError as err:
    raise WorkflowError(f"invalid parameters: {err}") from None

try:  # the cluster's node shape (the slurm profile's configfile) places the GPU jobs on nodes
    NODE = wf.node_shape(config)
    JOBS = {(job.rule, job.key): job for job in wf.build_plan(P, PARAMS_FILE, OVERRIDES, node=NODE,
                                                              job_gpus=config.get("job_gpus", 0))}
except ValueError as err:
    raise WorkflowError(f"cannot place the jobs: {err}") from None
RUNS = P["paths"]["runs"]
REPORTS = P["paths"]["reports"]
COMMON = " ".join(shlex.quote(a) for a in wf.common_args(PARAMS_FILE, OVERRIDES))
# The main Snakemake plans; the per-job Snakemake that SLURM starts (remote mode) only runs its job.
PLANNING = workflow.exec_mode == ExecMode.DEFAULT

# Jobs run `mpvg` from the environment Snakemake runs in (also when it was started as
# .venv/bin/snakemake without activating the venv).
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
# A job whose parent (Snakemake, or the SLURM job step) dies saves a checkpoint and stops
# (mpvg.run.folder.StopSignal): no run goes on unsupervised.
os.environ["MPVG_STOP_WITH_PARENT"] = "1"

if config.get("cluster") == "slurm" and P["scale"] == "tiny":
    raise WorkflowError(
        "the slurm profile would submit tiny-scale jobs (generated data, CPU) to the cluster: scale is "
        f"'tiny'. Keep the profile's scale (do not pass --config scale=tiny), choose "
        "--config scale=paper|budget, or run the tiny scale locally: snakemake --cores 2 (on a test "
        "cluster, --config cluster=test allows it)")

wildcard_constraints:
    cell=r"[a-z0-9_]+(-[a-z0-9_]+)+",
    seed=r"\d+",


# ------------------------------------------------------------------------------ the rerun rule
# mpvg.workflow.state decides which jobs must run (output missing, run signature changed, or a job
# it depends on reruns; file times never matter). Snakemake holds the whole DAG (every job has its
# real inputs) and is told the rule in its own terms (docs/workflow.md, "The rerun rule in
# Snakemake's terms"): each job's `params: sig` is the digest of what decides its output (the params
# rerun trigger, `--list-changes params`); where Snakemake keeps no record (a fresh clone, outputs
# restored by `dvc checkout`), the run signature in result.json is the witness: a job that must run
# while its output is there gets one more input, a stale marker that the local rule `stale` makes
# (Snakemake then runs the job and deletes its old output first; a dry run lists the marker job
# and changes nothing), and current outputs are stamped no older than their inputs (as
# `snakemake --touch` does: Snakemake compares file times whatever its rerun triggers say).
PRODUCER = {out: job for job in JOBS.values() for out in job.outs}
SIG = wf_state.settings_digests(P, list(JOBS.values()))
STALE_DIR = f"{RUNS}/.stale"
STATES, STALE = {}, {}
if PLANNING:
    STATES = wf_state.job_states(P, list(JOBS.values()))
    wf_state.stamp_current(list(JOBS.values()), STATES)
    STALE = wf_state.stale_markers(list(JOBS.values()), STATES, STALE_DIR)
    must = sum(st.needs_run for st in STATES.values())
    if must:
        print(f"mpvg: {must} of {len(STATES)} jobs must run (the others are current; `mpvg status` lists them):",
              file=sys.stderr)
        for line in wf_state.summary(STATES):
            print(f"  {line}", file=sys.stderr)
MARKER = {(rule, key): path for path, (rule, key, _) in STALE.items()}


def upstream_markers(paths):
    """The stale markers of the jobs that make ``paths`` and of every job before them. A target
    (`all`, `table2`, ...) reads them: Snakemake remakes a missing file only when a job that must run
    reads it, so the target (which always runs) is what makes the marker jobs run, and from them the
    stale jobs and everything downstream (a stale job's own marker input is what ties it to them)."""
    return sorted(MARKER[(j.rule, j.key)] for j in wf.upstream(list(JOBS.values()), paths)
                  if (j.rule, j.key) in MARKER)


def job_inputs(job):
    """The job's real inputs: the results of the runs it reads (plain: a rerun upstream reruns it)
    and the datasets and folders it reads (ancient(): data_tiny remakes the same data, whose
    contents enter each run's signature through the fingerprint); and the stale markers: its own
    when it must run while its output is there, every marker before it for a target."""
    plain = set(wf_state.plain_inputs(job, PRODUCER))
    if job.target:
        marker = upstream_markers(job.deps)
    else:
        marker = [MARKER[(job.rule, job.key)]] if (job.rule, job.key) in MARKER else []
    return [d if d in plain else ancient(d) for d in job.deps] + marker


def job_sig(rule):
    """``params: sig``: the digest of what decides the job's output (mpvg.workflow.state.settings_digests)."""

    def get(wildcards):
        return SIG[(rule, job_of(rule, wildcards).key)]

    return get


# ------------------------------------------------------------------------------ snakemake --report
# Every table, figure and the claims page is a report() output with its caption
# (workflow/report/*.rst), one category per table of the paper.
CAPTIONS = Path(workflow.basedir) / "workflow" / "report"


def report_outputs(job):
    """The job's outputs; those of `report` and `analyze` marked for `snakemake --report`."""
    if job.rule == "analyze":
        return [report(directory(out), patterns=["{name}.png"], caption=str(CAPTIONS / "figures.rst"),
                       category="Figures") for out in job.outs]
    if job.rule != "report":
        return [directory(out) for out in job.outs] if job.directory_outs else job.outs
    out = []
    for path in job.outs:
        stem = Path(path).stem
        if stem.startswith(("table", "figure")) and stem != "tables":
            category = f"{'Table' if stem.startswith('table') else 'Figure'} {stem.lstrip('tablefigure')}"
            out.append(report(path, caption=str(CAPTIONS / f"{stem}.rst"), category=category))
        else:
            caption = {"tables": "tables.rst", "claims": "claims.rst", "README": "readme.rst"}[stem]
            out.append(report(path, caption=str(CAPTIONS / caption),
                              category={"claims": "Claims"}.get(stem, "All tables")))
    return out


# ------------------------------------------------------------------------------ one Snakemake at a time
# Snakemake's own directory lock stays behind when Snakemake is killed and then refuses every run
# until `--unlock`; the workflow profile turns it off (`nolock`) and the main Snakemake of a real
# run holds this kernel lock instead (onstart): a second one stops naming the first, and a
# killed one holds nothing.
# our own file in Snakemake's working folder (nothing of Snakemake's is read): the checks before it write nothing
WORKFLOW_LOCK = Path(".snakemake") / "mpvg-run.lock"
_workflow_lock = None


def take_workflow_lock():
    import fcntl
    import socket
    import time

    global _workflow_lock
    WORKFLOW_LOCK.parent.mkdir(parents=True, exist_ok=True)
    handle = open(WORKFLOW_LOCK, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise WorkflowError(
            f"another Snakemake runs this workflow in {os.getcwd()} ({holder}; lock {WORKFLOW_LOCK}). Wait for "
            "it to finish, or stop it (Ctrl-C, or kill that pid), then run the same command again: finished "
            "runs are kept and interrupted ones resume. Dry runs (-n) need no lock.") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}, started "
                 f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}\n")
    handle.flush()
    _workflow_lock = handle  # held until this process exits, however it exits


# Per-job resources (threads also go through the `threads:` directive for local runs; the SLURM
# plugin reads cpus_per_task): sized in mpvg.workflow.plan.cell_resources. A job over several
# nodes has nodes/tasks_per_node/gres/mpi too (mpvg.workflow.plan.placement); a resource function
# returning None leaves that resource out of the job (Snakemake drops None values), so the
# plugin's MPI mode is on for those jobs only.
RESOURCES = ("gpu", "nodes", "cpus_per_task", "mem_mb", "runtime", "tasks_per_node", "gres", "mpi")


def snakemake_resources(job):
    return {name: job.resources[name] for name in RESOURCES if name in job.resources}


def job_of(rule, wildcards=None):
    """The planned job of ``rule`` for these wildcards (a clear error for an unplanned one)."""
    key = f"{wildcards.cell}-seed{wildcards.seed}" if wildcards is not None and "cell" in wildcards.keys() else ""
    try:
        return JOBS[(rule, key)]
    except KeyError:
        raise WorkflowError(
            f"rule {rule}: no such job {key!r} in the grid of {PARAMS_FILE} "
            f"(`mpvg cells --params {PARAMS_FILE}` lists the cells, seeds are {P['seeds']})"
        ) from None


def planned(rule, what):
    """An input/params/resources function returning ``what(job)`` for the job of ``rule``."""

    def get(wildcards, **_):
        return what(job_of(rule, wildcards))

    return get


# ------------------------------------------------------------------------------ force verbs retrain
# `--forceall`, `-R/--forcerun` and `-f/--forcetargets` ask for jobs to run again: Snakemake deletes
# their result.json, and a run of unchanged settings would put it back from its kept copy (the cheap
# answer to a result.json deleted by hand). A run Snakemake is forced to run, and every run
# downstream of it, gets `--retrain` instead (the folder's state goes to previous/<time>/, the run
# trains from scratch). The forced jobs come from Snakemake's public DAG settings (known when jobs
# are built, after parsing); the per-job Snakemake of a cluster job always runs with --force, so the
# main Snakemake hands it the list (MPVG_RETRAIN, set in onstart; SLURM jobs get the environment of
# the submitting process).
RETRAIN_ENV = "MPVG_RETRAIN"
_forced = None


def forced_runs():
    """``{stage name}`` of the plan's runs that Snakemake's force verbs rerun, and their descendants."""
    global _forced
    if _forced is not None:
        return _forced
    settings = getattr(workflow, "dag_settings", None)
    if not PLANNING:
        _forced = set(os.environ.get(RETRAIN_ENV, "").split())
        return _forced
    if settings is None:
        return set()
    names = {os.path.normpath(str(x)) for x in settings.forcerun}
    if settings.forcetargets:
        names |= {os.path.normpath(str(x)) for x in settings.targets}
    seeds = [j for j in JOBS.values() if settings.forceall or j.rule in names
             or any(os.path.normpath(o) in names for o in j.outs)]
    _forced = {job.stage_name for job in wf.downstream(list(JOBS.values()), seeds) if job.cell}
    return _forced


def command(rule):
    """The job's shell command, launched on ``resources.gpu`` GPUs (`mpvg launch` when > 1), with
    `--retrain` when a force verb reruns it (above)."""

    def get(wildcards, resources):
        job = job_of(rule, wildcards)
        retrain = " --retrain" if job.stage_name in forced_runs() else ""
        return wf.Opaque(f"{job.shell(gpus=resources.get('gpu', 0))}{retrain}")

    return get


def executor_name():
    plugin = workflow.executor_plugin
    return getattr(plugin, "name", None) if plugin is not None else None


# Rules that run in the main Snakemake, never on the cluster (the targets, `all`, `figures`).
LOCAL_RULES = {"all", "figures", *(job.rule for job in JOBS.values() if job.target)}


def jobs_without_partition():
    """Rules of the plan's cluster jobs (every rule that is not local) without a ``slurm_partition``
    resource: in the resources the user set (Snakemake's public ``ResourceSettings``: the profile's
    default-resources, --default-resources, --set-resources), as the SLURM plugin reads them."""
    settings = workflow.resource_settings
    default = settings.default_resources or {}
    return sorted({job.rule for job in JOBS.values() if job.rule not in LOCAL_RULES
                   and "slurm_partition" not in default
                   and "slurm_partition" not in settings.overwrite_resources.get(job.rule, {})})


def runs_still_going():
    """The plan's run folders that another process still writes (e.g. a SLURM job left by a
    Snakemake that was killed): a job there would fail on the folder's lock (one cheap lock test
    per folder)."""
    from mpvg.run.folder import holder_text, lock_holder

    out = []
    for job in JOBS.values():
        if job.cell:
            folder = Path(job.outs[0]).parent
            holder = lock_holder(folder)
            if holder:
                out.append(f"{folder}: {holder_text(holder)}")
    return sorted(out)


onstart:
    # Real runs only (not -n): one Snakemake at a time (above); stop before anything is submitted when an input dataset or the
    # SLURM partition is missing, when a tiny plan would go to SLURM, or when a run folder is still
    # written by an earlier job; then create the MLflow store once for all jobs.
    take_workflow_lock()
    slurm = executor_name() == "slurm"
    problems = preflight.problems(P, slurm_rules_without_partition=jobs_without_partition() if slurm else [])
    if slurm and P["scale"] == "tiny" and config.get("cluster") != "test":
        problems.append("scale is 'tiny' (generated data, CPU jobs) and the executor is slurm: use the slurm "
                        "profile (scale paper) or --config scale=paper|budget, or run the tiny scale locally "
                        "(on a test cluster, --config cluster=test allows it)")
    going = runs_still_going()
    if going:
        problems.append("these run folders are still being written by earlier jobs (wait for them, or stop them "
                        "with kill / scancel), then run the same command again:\n      " + "\n      ".join(going))
    if problems:
        raise WorkflowError("cannot start:\n  - " + "\n  - ".join(problems))
    if forced_runs():  # the per-job Snakemakes of cluster jobs learn from here which runs retrain
        os.environ[RETRAIN_ENV] = " ".join(sorted(forced_runs()))
        print("mpvg: the runs that --forceall / -R / --forcerun / --forcetargets rerun, and those downstream, train "
              "again from scratch (--retrain; their previous state goes to previous/<time>/)", file=sys.stderr)
    shell(f"mpvg tracking {COMMON} init")


onsuccess:
    # Snakemake and DVC share what ran: record every finished run (and the stages before and after
    # it) in dvc.lock, so `dvc status` agrees with Snakemake afterwards. At the paper scale this
    # hashes the datasets and checkpoints (DVC's cache); the slurm profile turns it off with
    # `dvc_commit: false` in its configfile: run `mpvg workflow dvc-commit` when you want it.
    if PLANNING and config.get("dvc_commit", True) and Path(".dvc").is_dir():
        shell(f"mpvg workflow dvc-commit {COMMON}")
