# Configuration, the job plan, start-of-run checks. Rules stay thin calls into `mpvg`.
import shlex
import sys

from snakemake.exceptions import WorkflowError

from mpvg.config import ConfigError, load_params
from mpvg.workflow import plan as wf
from mpvg.workflow import preflight


validate(config, schema="../schemas/config.schema.yaml")

PARAMS_FILE = config["params"]
OVERRIDES = list(config["set"]) + ([f"scale={config['scale']}"] if config["scale"] else [])
try:
    P = load_params(PARAMS_FILE, OVERRIDES)
except ConfigError as err:
    raise WorkflowError(f"invalid parameters: {err}") from None

JOBS = {(job.rule, job.key): job for job in wf.build_plan(P, PARAMS_FILE, OVERRIDES)}
RUNS = P["paths"]["runs"]
REPORTS = P["paths"]["reports"]
COMMON = " ".join(shlex.quote(a) for a in wf.common_args(PARAMS_FILE, OVERRIDES))

wildcard_constraints:
    cell=r"[a-z0-9_]+(-[a-z0-9_]+)+",
    seed=r"\d+",


# Per-job resources (threads also go through the `threads:` directive for local runs; the SLURM
# plugin reads cpus_per_task): sized in mpvg.workflow.plan.cell_resources.
RESOURCES = ("gpu", "cpus_per_task", "mem_mb", "runtime")


def snakemake_resources(job):
    return {name: job.resources[name] for name in RESOURCES}


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
    """The job's shell command, launched on ``resources.gpu`` GPUs (torchrun when > 1)."""

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


onstart:
    # Real runs only (not -n): stop before anything is submitted when an input dataset or the
    # SLURM partition is missing, then create the MLflow store once for all jobs.
    slurm = executor_name() == "slurm"
    problems = preflight.problems(P, slurm_rules_without_partition=jobs_without_partition() if slurm else [])
    if problems:
        raise WorkflowError("cannot start:\n  - " + "\n  - ".join(problems))
    shell(f"mpvg tracking {COMMON} init")
