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
DRY_RUN = any(a in ("-n", "--dry-run", "--dryrun", "--dry_run") or
              (a.startswith("-") and not a.startswith("--") and a[1:].isalpha() and "n" in a[1:])
              for a in sys.argv[1:])

# Jobs run `mpvg` from the environment Snakemake runs in (also when it was started as
# .venv/bin/snakemake without activating the venv).
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
# A job whose parent (Snakemake, or the SLURM job step) dies saves a checkpoint and stops
# (mpvg.training.runfolder.StopSignal): no run goes on unsupervised.
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
# it depends on reruns; file times never matter). Snakemake is told through its own semantics:
# every input is ancient(), a job that must run gets one more input, a trigger file written now
# (newer than its output), and a job that is current gets no inputs at all, so nothing can make
# Snakemake rerun it. docs/workflow.md, "The rerun rule".
STATES = wf_state.job_states(P, list(JOBS.values())) if PLANNING else {}
TRIGGERS = {}
if PLANNING:
    for key, st in STATES.items():
        job = JOBS[key]
        if st.needs_run and not job.target:
            TRIGGERS[key] = wf.trigger_path(P, job)
            Path(TRIGGERS[key]).parent.mkdir(parents=True, exist_ok=True)
            Path(TRIGGERS[key]).write_text(f"{st.status}: " + "; ".join(st.reasons) + "\n")
    must = sum(st.needs_run for st in STATES.values())
    if must:
        print(f"mpvg: {must} of {len(STATES)} jobs must run (the others are current; `mpvg status` lists them):",
              file=sys.stderr)
        for line in wf_state.summary(STATES):
            print(f"  {line}", file=sys.stderr)


PRODUCER = {out: key for key, job in JOBS.items() for out in job.outs}


def clear_incomplete_markers():
    """Snakemake marks a job's outputs incomplete when it starts the job and unmarks them when it
    sees the job end; an interrupted Snakemake leaves the marks. mpvg's outputs need none: a
    result.json is written last and atomically, so one that exists is complete (the rerun rule
    above says whether it is current), and a job whose output is not current runs anyway. Left
    in place, the marks make Snakemake stop (IncompleteFilesException) or, with
    --rerun-incomplete, run only those jobs and skip the rest of the DAG as if it were done.
    (Snakemake 9's file persistence: .snakemake/incomplete/<urlsafe base64 of the path>.)"""
    import base64

    folder = Path(".snakemake/incomplete")
    if not folder.is_dir():
        return
    for job in JOBS.values():
        for out in job.outs:
            marker = folder / base64.urlsafe_b64encode(out.encode()).decode()
            if Path(out).exists() and marker.is_file():
                marker.unlink()


if PLANNING:
    clear_incomplete_markers()


def job_inputs(job):
    """What Snakemake sees as the job's inputs (see "the rerun rule" above): nothing for a current
    job; for a job that must run, its trigger, the outputs of jobs that must run too (plain, so
    Snakemake orders and propagates), and ancient() outputs of current jobs."""
    if not PLANNING or job.target:
        return [ancient(d) if PRODUCER.get(d) not in TRIGGERS else d for d in job.deps]
    if (job.rule, job.key) not in TRIGGERS:
        return []
    return [d if PRODUCER.get(d) in TRIGGERS else ancient(d) for d in job.deps] + [TRIGGERS[(job.rule, job.key)]]


# ------------------------------------------------------------------------------ start-up checks
def stale_snakemake_lock():
    """The exact command that removes a lock a killed Snakemake left (None when there is none, or
    when another Snakemake really runs in this folder)."""
    locks = Path(".snakemake/locks")
    if not locks.is_dir() or not any(locks.iterdir()):
        return None
    here, me = os.getcwd(), {os.getpid(), os.getppid()}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) in me:
            continue
        try:
            if os.readlink(proc / "cwd") == here and b"snakemake" in (proc / "cmdline").read_bytes():
                return None  # a live Snakemake: its lock is real
        except OSError:
            continue
    args = [a for a in sys.argv[1:]]
    return "snakemake --unlock " + " ".join(shlex.quote(a) for a in args)


if PLANNING and "--unlock" not in sys.argv:
    _unlock = stale_snakemake_lock()
    if _unlock and not DRY_RUN:
        raise WorkflowError(
            "a Snakemake that was killed left its lock in .snakemake/locks (no other Snakemake runs here). "
            f"Remove it with\n    {_unlock}\nthen run the same command again: finished runs are kept, "
            "interrupted ones resume.")
    if _unlock:
        print(f"mpvg: a killed Snakemake left a lock; a real run needs `{_unlock}` first", file=sys.stderr)


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


def command(rule):
    """The job's shell command, launched on ``resources.gpu`` GPUs (`mpvg launch` when > 1)."""

    def get(wildcards, resources):
        return wf.Opaque(job_of(rule, wildcards).shell(gpus=resources.get("gpu", 0)))

    return get


def executor_name():
    plugin = workflow.executor_plugin
    return getattr(plugin, "name", None) if plugin is not None else None


def jobs_without_partition():
    """Rules of the jobs about to run that have no ``slurm_partition`` resource."""
    return sorted({job.rule.name for job in workflow.dag.needrun_jobs()
                   if job.rule.name not in workflow._localrules and not job.resources.get("slurm_partition")})


def runs_still_going():
    """Jobs about to run whose run folder another process still writes (e.g. a SLURM job left by a
    Snakemake that was killed): starting them would fail on the folder's lock."""
    from mpvg.training.runfolder import holder_text, lock_holder

    out = []
    for job in workflow.dag.needrun_jobs():
        for f in job.output:
            holder = lock_holder(Path(str(f)).parent)
            if holder:
                out.append(f"{Path(str(f)).parent}: {holder_text(holder)}")
    return sorted(set(out))


onstart:
    # Real runs only (not -n): stop before anything is submitted when an input dataset or the
    # SLURM partition is missing, when a tiny plan would go to SLURM, or when a run folder is still
    # written by an earlier job; then create the MLflow store once for all jobs.
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
    shell(f"mpvg tracking {COMMON} init")


onsuccess:
    # Snakemake and DVC share what ran: record every finished run (and the stages before and after
    # it) in dvc.lock, so `dvc status` agrees with Snakemake afterwards. At the paper scale this
    # hashes the datasets and checkpoints (DVC's cache); the slurm profile turns it off with
    # `dvc_commit: false` in its configfile: run `mpvg workflow dvc-commit` when you want it.
    if PLANNING and config.get("dvc_commit", True) and Path(".dvc").is_dir():
        shell(f"mpvg workflow dvc-commit {COMMON}")
