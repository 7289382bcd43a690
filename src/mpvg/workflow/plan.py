"""The job graph of the paper, computed from params.yaml: one description for Snakemake and DVC.

``build_plan(params)`` lists every job (tiny data, one training/fine-tuning/detection/
segmentation job per cell and seed, analysis, report) with its command, inputs, outputs,
tracked params and resources. The Snakefile (``workflow/rules/*.smk``) calls the functions
here from its input/params/resources functions, and ``mpvg workflow dvc-yaml`` writes
``dvc.yaml`` from the same jobs, so the two DAG descriptions cannot drift apart
(``tests/test_workflow.py`` checks them against each other).

Plain Python: never imports snakemake, dvc or torch (Snakemake imports this while it plans).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from mpvg.config import Cell, ConfigError, cell_seeds, dataset_classes, expand_cells, run_dir

# Jobs that train a cell, by Cell.stage; the rule name and the `mpvg` sub-command.
CELL_STAGES = ("train", "finetune", "detect", "segment")
SUBCOMMAND = {"train": ["train"], "finetune": ["train"], "detect": ["detect", "train"],
              "segment": ["segment", "train"]}
INIT_FLAG = {"finetune": "--init-from", "detect": "--pretrained", "segment": "--pretrained"}
from mpvg.run.layout import CHECKPOINT, HISTORY, JOB_LOG, RESULT, SCORES  # noqa: E402  (the run folder's names, defined once)
SETTINGS_DIR = ".signatures"  # under paths.runs: each run's settings, DVC's dependency (mpvg workflow signatures)
# The report's files under paths.reports (mpvg.reporting writes them; docs/contracts.md).
REPORT_FILES = ("tables.md", "README.md", "claims.md", *(f"table{k}.md" for k in range(1, 7)), "figure1.md",
                "figure5.md")
# Targets a researcher asks for by name (`snakemake table2`, `dvc repro table2`): the runs of those
# tables (and the runs they start from), then those tables re-rendered (`mpvg report --only ...`).
TABLE_TARGETS = {"table1": ("T1",), "table2": ("T2",), "table3": ("T3",), "table4": ("T4",),
                 "table5": ("T5",), "table6": ("T6",), "figure1": ("F1",), "figure5": ("F5",),
                 "downstream": ("T3", "T4")}

# --------------------------------------------------------------------------- sizing
# Paper-scale sizing: GPUs per job and the training throughput they are planned with.
# Throughput: training images per second per GPU (A100, AMP where the recipe uses it). These are
# estimates, anchored on the DeiT paper (DeiT-B, 300 epochs: 53 h on one node of 8 V100s, i.e.
# ~250 img/s per V100, about twice that on an A100) and scaled by the models' FLOPs with a
# discount for small models; they size `runtime` and the cost table only, never a result.
# Adjust them here if your GPUs differ.
GPUS = {"in1k": 4, "c100": 1, "coco": 4, "ade20k": 4}
GPUS_BY_MODEL = {("in1k", "DeiT-B"): 8}
# The budget scale runs every job on one GPU (docs/claims.md), at the same throughput per GPU.
BUDGET_GPUS = 1
IMAGES_PER_S_PER_GPU = {
    "DeiT-Ti": 2500, "DeiT-S": 1200, "DeiT-B": 450, "Swin-Ti": 650, "CeiT-Ti": 1500,
    "T2T-ViT-7": 1800, "ViT-Lite": 6000,
    # downstream (ViT-Adapter-Ti): Mask R-CNN at ~1024 px, UperNet at 512 px crops
    "coco": 7, "ade20k": 14,
}
# Training-set sizes (images) of the real datasets.
TRAIN_IMAGES = {"imagenet": 1_281_167, "cifar100": 50_000, "coco": 118_287, "ade20k": 20_210}
# A class subset of ImageNet (ImageNet-100) is planned at the most images an ImageNet-1K training
# class holds (1300; classes hold 732-1300), so its cost is an upper bound.
IMAGENET_MAX_PER_CLASS = 1300
# CPUs per GPU follow from the measured input pipeline, not a guess: the workers of the DeiT recipe's
# training loader (JPEG decode, RandomResizedCrop, flip, RandAugment at 224, uint8 batches, on 500x375
# JPEGs of ~110 KB; normalisation and random erasing run on the GPU) do LOADER_IMAGES_PER_S_PER_CORE
# images/s per core: the median over three runs of `ours_workers` in
#   benchmarks/bench_data.py --vs-timm --images 192 --rounds 9
# (AMD EPYC, one core per process, a loaded machine; docs/performance.md). A GPU training at the planned
# speed above needs ceil(speed / per core) loader workers plus one core for the training process;
# CPUS_PER_GPU is that for the fastest planned ImageNet model (DeiT-Ti: 2500 / 209 -> 12 workers + 1 =
# 13), so the loader caps none of the throughputs above. With measured speeds (paths.measured_speeds)
# cpus_per_gpu() applies the same rule to them. On another CPU, put gpu_check's `loader`
# images_per_s_per_worker here.
LOADER_IMAGES_PER_S_PER_CORE = 209
MAIN_PROCESS_CPUS = 1


def loader_cpus_per_gpu(images_per_s: float, per_core: float = LOADER_IMAGES_PER_S_PER_CORE) -> int:
    """CPUs that keep one GPU training at ``images_per_s`` fed: loader workers + the trainer."""
    if per_core <= 0:
        raise ValueError(f"loader images/s per core must be > 0, got {per_core}")
    return math.ceil(images_per_s / per_core) + MAIN_PROCESS_CPUS


IMAGENET_MODELS = ("DeiT-Ti", "DeiT-S", "DeiT-B", "Swin-Ti", "CeiT-Ti", "T2T-ViT-7")
CPUS_PER_GPU = max(loader_cpus_per_gpu(IMAGES_PER_S_PER_GPU[m]) for m in IMAGENET_MODELS)
MEM_MB_PER_GPU = 48_000
RUNTIME_SAFETY = 1.3        # evaluation, data loading stalls, restarts
MIN_RUNTIME_MIN = 30
# Longer jobs are cut into pieces: the time limit stops them, the run resumes from
# checkpoint.pt when Snakemake resubmits it (`retries` in the slurm profile).
MAX_RUNTIME_MIN = 48 * 60
TINY = {"gpu": 0, "nodes": 1, "threads": 1, "cpus_per_task": 1, "mem_mb": 3000, "runtime": 30}
# A tiny-scale process of a multi-process job (config job_gpus): one CPU, this much memory.
TINY_MEM_MB_PER_PROCESS = 1000


def train_images(params: Mapping, dataset: str) -> int:
    """Training images of ``dataset`` as configured: the real set, or ``classes`` x 1300 for an
    ImageNet class subset (:data:`IMAGENET_MAX_PER_CLASS`)."""
    classes = dataset_classes(params["datasets"][dataset])
    if classes is not None:
        return len(classes) * IMAGENET_MAX_PER_CLASS
    return TRAIN_IMAGES[dataset]


def epochs_images(params: Mapping, cell: Cell) -> int:
    """Images a job pushes through the network: epochs x training set (iterations x batch)."""
    recipe = params["recipes"][cell.recipe]
    if "iters" in recipe:
        return int(recipe["iters"]) * int(recipe["batch_size"])
    epochs = int(recipe["epochs"]) + int(recipe.get("cooldown_epochs", 0))
    return epochs * train_images(params, cell.dataset)


def gpus_for(cell: Cell, scale: str = "paper") -> int:
    """GPUs of a cell's job: :data:`GPUS` at the paper scale, :data:`BUDGET_GPUS` at the budget scale."""
    if scale == "budget":
        return BUDGET_GPUS
    return GPUS_BY_MODEL.get((cell.task, cell.model), GPUS[cell.task])


# --------------------------------------------------------------------------- measured speeds
# `make gpu-check` writes the images/s it measured per model and method, with the GPU's name
# (bench_out/gpu_check/speeds.json); `paths.measured_speeds` (params.yaml or
# `--set paths.measured_speeds=FILE`) makes the plan, the SLURM runtimes and `mpvg workflow cost`
# use them instead of IMAGES_PER_S_PER_GPU. A model or method the file lacks keeps its estimate.
SPEEDS_FORMAT = "mpvg-speeds-v1"


def _speeds_error(path, what: str) -> ConfigError:
    return ConfigError(f"measured speeds file {path} (paths.measured_speeds): {what}; expected "
                      f'{{"format": "{SPEEDS_FORMAT}", "gpu": NAME, "images_per_s_per_gpu": '
                      '{MODEL: {METHOD: images/s}}} as `make gpu-check` writes it')


def load_speeds(path: str | Path) -> dict:
    """The measured-speeds file at ``path``, checked; a malformed one is an error naming the file."""
    path = Path(path)
    try:
        return _load_speeds(str(path), path.stat().st_mtime_ns)
    except FileNotFoundError:
        raise _speeds_error(path, "no such file") from None


@functools.lru_cache(maxsize=4)
def _load_speeds(path: str, _mtime_ns: int) -> dict:
    import json

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise _speeds_error(path, f"not readable JSON ({err})") from None
    if not isinstance(data, dict) or data.get("format") != SPEEDS_FORMAT:
        raise _speeds_error(path, f"'format' is not {SPEEDS_FORMAT!r}")
    if data.get("smoke"):
        raise _speeds_error(path, "it comes from `gpu_check.py --smoke` (tiny models on CPU), not a GPU")
    if not isinstance(data.get("gpu"), str) or not data["gpu"]:
        raise _speeds_error(path, "'gpu' (the GPU's name) is missing")
    table = data.get("images_per_s_per_gpu")
    if not isinstance(table, dict) or not table:
        raise _speeds_error(path, "'images_per_s_per_gpu' is missing or empty")
    for model, methods in table.items():
        if model not in IMAGES_PER_S_PER_GPU:
            raise _speeds_error(path, f"unknown model {model!r} (known: {sorted(IMAGES_PER_S_PER_GPU)})")
        if not isinstance(methods, dict) or not methods:
            raise _speeds_error(path, f"{model}: expected a map of method -> images/s")
        for method, value in methods.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise _speeds_error(path, f"{model}/{method}: {value!r} is not a positive images/s")
    return data


def measured_speeds(params: Mapping | None) -> dict | None:
    """The measured-speeds file of ``params`` (``paths.measured_speeds``), or None for the estimates."""
    path = ((params or {}).get("paths") or {}).get("measured_speeds")
    return load_speeds(path) if path else None


def measured_throughput(cell: Cell, params: Mapping | None) -> float | None:
    """The measured images/s per GPU of ``cell``'s model (or downstream task) and method in the
    file ``paths.measured_speeds`` of ``params``; None without the file or an entry for it."""
    speeds = measured_speeds(params)
    key = cell.task if cell.stage in ("detect", "segment") else cell.model
    value = (speeds or {}).get("images_per_s_per_gpu", {}).get(key, {}).get(cell.method)
    return float(value) if value else None


def throughput(cell: Cell, params: Mapping | None = None) -> float:
    """Training images/s per GPU of ``cell``: measured (:func:`measured_throughput`) when the file
    has the cell's model and method, else the estimate :data:`IMAGES_PER_S_PER_GPU`."""
    measured = measured_throughput(cell, params)
    return measured or IMAGES_PER_S_PER_GPU[cell.task if cell.stage in ("detect", "segment") else cell.model]


def throughput_source(params: Mapping | None) -> str:
    """Where :func:`throughput` takes its numbers from, for table headers: ``estimated``, or
    ``measured on <GPU>, * estimated`` (rows the file has no entry for are starred)."""
    speeds = measured_speeds(params)
    return "estimated" if speeds is None else f"measured on {speeds['gpu']}, * estimated"


def cpus_per_gpu(params: Mapping | None = None) -> int:
    """CPUs per GPU: loader workers for the fastest ImageNet model at the speeds in effect, plus the
    trainer (:data:`CPUS_PER_GPU` with the estimates)."""
    speeds = measured_speeds(params)
    if speeds is None:
        return CPUS_PER_GPU
    fastest = max([IMAGES_PER_S_PER_GPU[m] for m in IMAGENET_MODELS]
                  + [v for m in IMAGENET_MODELS for v in speeds["images_per_s_per_gpu"].get(m, {}).values()])
    return loader_cpus_per_gpu(fastest)


def paper_gpu_hours(params: Mapping, cell: Cell) -> float:
    """GPU-hours of one seed of ``cell`` with the recipes of ``params`` (the paper or the budget
    scale; no safety margin), at the measured or estimated speed (:func:`throughput`)."""
    return epochs_images(params, cell) / throughput(cell, params) / 3600.0


@dataclass(frozen=True)
class NodeShape:
    """What one node of the cluster has: GPUs, CPUs and memory (MB). The one place it is set is the
    SLURM profile's configfile (``node_gpus``, ``node_cpus``, ``node_mem_mb`` in
    profiles/slurm/workflow-config.yaml; docs/workflow.md, "SLURM")."""

    gpus: int
    cpus: int
    mem_mb: int

    def __post_init__(self):
        for name in ("gpus", "cpus", "mem_mb"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"node_{name} must be a whole number >= 1, got {value!r}")


def node_shape(config: Mapping) -> NodeShape | None:
    """The node shape of a Snakemake config (``node_gpus``/``node_cpus``/``node_mem_mb``; all three
    or none: None means one node as large as any job, e.g. a workstation)."""
    values = {k: config.get(f"node_{k}") or 0 for k in ("gpus", "cpus", "mem_mb")}
    if not any(values.values()):
        return None
    missing = [f"node_{k}" for k, v in values.items() if not v]
    if missing:
        raise ValueError(f"the node shape needs node_gpus, node_cpus and node_mem_mb; {', '.join(missing)} "
                         "is not set")
    return NodeShape(**values)


def placement(gpus: int, cpus_per_gpu: int, mem_mb_per_gpu: int, node: NodeShape | None = None,
              what: str = "the job") -> dict:
    """Resources of a job on ``gpus`` GPUs for nodes of shape ``node``.

    A job that fits one node is one SLURM task (``mpvg launch`` starts one process per GPU in it):
    ``nodes=1``, ``cpus_per_task`` = its GPUs x ``cpus_per_gpu``, ``mem_mb`` for the node. A job
    with more GPUs than a node has is spread evenly over k nodes and run as one task per GPU by
    SLURM itself (``srun``, see :func:`launcher`), which the SLURM plugin submits in its MPI mode:
    ``mpi``, ``nodes=k``, ``tasks_per_node`` and ``gres=gpu:G`` (G GPUs on every node),
    ``cpus_per_task`` per GPU, ``mem_mb`` per node. CPUs and memory are capped at what a node has."""
    gpus = int(gpus)
    nodes = 1 if node is None or gpus <= node.gpus else math.ceil(gpus / node.gpus)
    if gpus % nodes:
        raise ValueError(f"{what}: {gpus} GPUs cannot be spread evenly over {nodes} nodes of {node.gpus} GPUs; "
                         f"plan a multiple of {nodes} GPUs or set the node shape (node_gpus)")
    per_node = gpus // nodes
    cpus = int(cpus_per_gpu)
    if node is not None and per_node:
        cpus = min(cpus, node.cpus // per_node)
        if cpus < 1:
            raise ValueError(f"{what}: {per_node} GPU processes per node need at least {per_node} CPUs; "
                             f"node_cpus is {node.cpus}")
    mem = max(1, per_node) * int(mem_mb_per_gpu)
    if node is not None:
        mem = min(mem, node.mem_mb)
    if nodes == 1:
        task_cpus = max(1, per_node) * cpus
        return {"gpu": gpus, "nodes": 1, "threads": task_cpus, "cpus_per_task": task_cpus, "mem_mb": mem}
    if per_node < 2:
        raise ValueError(f"{what}: {gpus} GPUs over {nodes} nodes is one process per node, which the SLURM "
                         "plugin's MPI mode refuses (tasks_per_node must be > 1); use nodes with more GPUs")
    return {"gpu": gpus, "nodes": nodes, "tasks_per_node": per_node, "gres": f"gpu:{per_node}", "mpi": "srun",
            "threads": cpus, "cpus_per_task": cpus, "mem_mb": mem}


def cell_resources(params: Mapping, cell: Cell, node: NodeShape | None = None, job_gpus: int = 0) -> dict:
    """Snakemake resources of one job: ``gpu`` (in all), ``nodes``, ``threads`` (= ``cpus_per_task``,
    which the SLURM plugin reads: per task), ``mem_mb`` (per node), ``runtime`` (minutes), and for a
    job over several nodes ``tasks_per_node``, ``gres`` and ``mpi`` (:func:`placement`).

    Tiny scale: CPU only, small. Paper scale: :data:`GPUS` GPUs; budget scale: one GPU; runtime
    from :func:`paper_gpu_hours` divided over the GPUs with :data:`RUNTIME_SAFETY`. ``job_gpus``
    (Snakemake config ``job_gpus``) runs every cell job on that many GPUs instead, with the
    scale's CPUs and memory per GPU (at the tiny scale: small jobs with the paper's geometry).
    """
    what = f"{cell.stage}@{cell.id}"
    if params["scale"] not in ("paper", "budget"):
        if not job_gpus:
            return dict(TINY)
        return {**placement(job_gpus, TINY["threads"], TINY_MEM_MB_PER_PROCESS, node, what), "runtime": TINY["runtime"]}
    gpus = int(job_gpus) or gpus_for(cell, params["scale"])
    hours = paper_gpu_hours(params, cell) / gpus * RUNTIME_SAFETY
    return {**placement(gpus, cpus_per_gpu(params), MEM_MB_PER_GPU, node, what),
            "runtime": min(MAX_RUNTIME_MIN, max(MIN_RUNTIME_MIN, int(math.ceil(hours * 6)) * 10))}


def launcher(gpus: int, nodes: int = 1, cpus_per_task: int = 1) -> list[str]:
    """How a job's processes start: ``mpvg`` for a CPU job; ``mpvg launch --nproc-per-node G`` on
    one node (one process per GPU, each given its own device: :mod:`mpvg.run.launch`); over
    several nodes SLURM's own launch, one task per GPU bound to it (``--gpus-per-task=1``), the
    ranks from ``SLURM_PROCID``/``SLURM_LOCALID`` and the rendezvous on the first node
    (:mod:`mpvg.run.distributed`). ``--wait=60``: when one task ends, the others get 60 s
    before srun stops them (a rank that failed leaves no peer blocked in a collective)."""
    gpus, nodes = int(gpus), int(nodes or 1)
    if nodes > 1:
        return ["srun", f"--nodes={nodes}", f"--ntasks-per-node={gpus // nodes}", "--gpus-per-task=1",
                f"--cpus-per-task={int(cpus_per_task)}", "--wait=60", "mpvg"]
    if gpus >= 1:
        return ["mpvg", "launch", "--nproc-per-node", str(gpus)]
    return ["mpvg"]


def geometry(resources: Mapping) -> str:
    """``2 nodes x 4 GPUs``, ``1 node x 4 GPUs``, ``CPU``: how a job is placed."""
    gpus, nodes = int(resources.get("gpu", 0)), int(resources.get("nodes") or 1)
    if not gpus:
        return "CPU"
    return f"{nodes} node{'s' if nodes > 1 else ''} x {gpus // nodes} GPU{'s' if gpus // nodes > 1 else ''}"


# --------------------------------------------------------------------------- jobs

@dataclass
class Job:
    """One node of the DAG, in the terms both Snakemake and DVC use."""

    rule: str                        # Snakemake rule / DVC stage group
    key: str                         # DVC foreach key ("in1k-deit_ti-mpvg-seed0"); "" for singletons
    args: list[str]                  # the `mpvg` sub-command and its arguments
    deps: list[str]                  # input paths (Snakemake input, DVC deps)
    outs: list[str]                  # output paths Snakemake declares and DVC caches
    persist: list[str] = field(default_factory=list)   # DVC `persist: true` outs (resume state)
    external: list[str] = field(default_factory=list)  # datasets no job makes: DVC deps only
    params: list[str] = field(default_factory=list)    # params.yaml keys the job reads
    directory_outs: bool = False     # outs are folders
    resources: dict = field(default_factory=dict)
    cell: str | None = None
    seed: int | None = None
    log: str | None = None           # Snakemake log: file
    metrics: list[str] = field(default_factory=list)   # DVC metrics files (cache: false)
    plots: list[str] = field(default_factory=list)     # DVC plots files (cache: false)
    target: bool = False             # a target a researcher asks for (table1, ...): no outputs, always runs
    settings: str | None = None      # DVC only: the run's settings file (its dependency on params.yaml)

    @property
    def stage_name(self) -> str:
        """``dvc repro`` name: ``train@<key>`` for a foreach stage, the rule name otherwise."""
        return f"{self.rule}@{self.key}" if self.key else self.rule

    def argv(self, gpus: int | None = None) -> list[str]:
        """The full command: :func:`launcher` for ``gpus`` (default: the planned GPUs; another
        count, e.g. from ``--set-resources``, runs on one node) + args."""
        res = self.resources
        if gpus is None or int(gpus) == int(res.get("gpu", 0)):
            return launcher(res.get("gpu", 0), res.get("nodes", 1), res.get("cpus_per_task", 1)) + self.args
        return launcher(gpus) + self.args

    def shell(self, gpus: int | None = None) -> str:
        return " ".join(_quote(a) for a in self.argv(gpus))


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(str(arg))


def common_args(params_file: str = "params.yaml", overrides: tuple | list = ()) -> list[str]:
    """``--params FILE [--set K=V ...]``: what every job passes on to ``mpvg``."""
    out = ["--params", str(params_file)]
    for item in overrides:
        out += ["--set", str(item)]
    return out


def tiny_data_root(params: Mapping) -> str:
    return str(Path(params["paths"]["data"]) / "tiny")


def produced_datasets(params: Mapping) -> dict[str, str]:
    """Dataset roots the workflow makes itself (the generated tiny data), by dataset name."""
    if params["scale"] != "tiny":
        return {}
    tiny = Path(tiny_data_root(params))
    return {name: ds["root"] for name, ds in params["datasets"].items()
            if Path(ds["root"]).parent == tiny}


def external_datasets(params: Mapping, cells: Mapping[str, Cell] | None = None) -> dict[str, str]:
    """Dataset roots the grid reads but no job makes: they must exist before a real run."""
    cells = cells if cells is not None else expand_cells(params)
    made = produced_datasets(params)
    used = {c.dataset for c in cells.values()}
    return {name: params["datasets"][name]["root"] for name in sorted(used) if name not in made}


def missing_inputs(params: Mapping) -> list[str]:
    """External dataset roots that are not on disk (the start-of-run check)."""
    return [f"{name}: {root}" for name, root in external_datasets(params).items() if not Path(root).exists()]


def cell_params_keys(cell: Cell, tiny_keys: set | frozenset = frozenset(), block: str = "tiny") -> list[str]:
    """The params.yaml keys a cell's job depends on (DVC ``params:``); ``tiny_keys`` are the
    ``section.name`` entries the raw file's scale block ``block`` (``tiny`` or ``budget``) has
    (see :func:`tiny_keys_of`)."""
    own = [f"models.{cell.model}", f"recipes.{cell.recipe}", f"datasets.{cell.dataset}"]
    return ["scale", *own, *(f"{block}.{key}" for key in own if key in tiny_keys)]


def tiny_keys_of(params_file: str | Path, block: str = "tiny") -> frozenset:
    """``{"recipes.deit", "models.DeiT-Ti", ...}``: what the raw params file's ``block`` sets."""
    import yaml

    raw = yaml.safe_load(Path(params_file).read_text()) or {}
    return frozenset(f"{section}.{name}" for section, entries in (raw.get(block) or {}).items()
                     if isinstance(entries, dict) for name in entries)


def cell_dir(params: Mapping, stage: str, cell: str, seed: int) -> str:
    return str(run_dir(params["paths"]["runs"], stage, cell, seed))


def cell_job(params: Mapping, cell: Cell, seed: int, params_file: str = "params.yaml",
             overrides: tuple | list = (), cells: Mapping[str, Cell] | None = None, tiny_keys: frozenset = frozenset(),
             block: str = "tiny", node: NodeShape | None = None, job_gpus: int = 0) -> Job:
    """The job that trains ``cell`` with ``seed`` (placed on nodes of shape ``node``)."""
    cells = cells if cells is not None else expand_cells(params)
    res = cell_resources(params, cell, node, job_gpus)
    out = cell_dir(params, cell.stage, cell.id, seed)
    made = produced_datasets(params).get(cell.dataset)
    deps = [made] if made else []
    external = [] if made else [params["datasets"][cell.dataset]["root"]]
    cmd = SUBCOMMAND[cell.stage] + common_args(params_file, overrides) + [
        "--cell", cell.id, "--seed", str(seed), "--out", out]
    if cell.init_from:
        init = cells[cell.init_from]
        init_dir = cell_dir(params, init.stage, init.id, seed)
        deps.append(f"{init_dir}/{RESULT}")
        cmd += [INIT_FLAG[cell.stage], f"{init_dir}/{CHECKPOINT}"]
    return Job(rule=cell.stage, key=f"{cell.id}-seed{seed}", args=cmd, deps=deps,
               outs=[f"{out}/{RESULT}"], persist=[f"{out}/{CHECKPOINT}"], external=external,
               params=cell_params_keys(cell, tiny_keys, block), resources=res, cell=cell.id, seed=seed,
               log=f"{out}/{JOB_LOG}", metrics=[f"{out}/{SCORES}"], plots=[f"{out}/{HISTORY}"],
               settings=f"{params['paths']['runs']}/{SETTINGS_DIR}/{cell.stage}@{cell.id}-seed{seed}.json")


def analysis_cells(cells: Mapping[str, Cell]) -> list[Cell]:
    """The ImageNet classification cells whose checkpoints the figures read."""
    return [c for c in cells.values() if c.stage == "train" and c.task == "in1k"]


def build_plan(params: Mapping, params_file: str = "params.yaml", overrides: tuple | list = (),
               node: NodeShape | None = None, job_gpus: int = 0) -> list[Job]:
    """Every job of the paper for ``params`` (already resolved by ``load_params``), in order; GPU
    jobs placed on nodes of shape ``node`` (None: one node as large as any job), every cell job on
    ``job_gpus`` GPUs when that is set (:func:`cell_resources`)."""
    cells = expand_cells(params)
    block = "budget" if params["scale"] == "budget" else "tiny"   # the scale block the cells read
    tiny_keys = tiny_keys_of(params_file, block) if Path(params_file).is_file() else frozenset()
    seeds = cell_seeds(params, cells)   # seeds_per_cell, else the global seeds
    seed_keys = ["scale", "seeds"] + (["seeds_per_cell"] if "seeds_per_cell" in params else [])  # DVC params
    common = common_args(params_file, overrides)
    jobs: list[Job] = []
    made = produced_datasets(params)
    runs, reports = params["paths"]["runs"], params["paths"]["reports"]
    logs = f"{runs}/logs"
    if made:
        jobs.append(Job(rule="data_tiny", key="", args=["data", "tiny", "--out",
                                                       tiny_data_root(params)],
                        deps=[], outs=sorted(made.values()), directory_outs=True,
                        params=["tiny.datasets"], resources=dict(TINY), log=f"{logs}/data_tiny.log"))
    for stage in CELL_STAGES:
        for cell in cells.values():
            if cell.stage == stage:
                jobs += [cell_job(params, cell, seed, params_file, overrides, cells=cells, tiny_keys=tiny_keys,
                                  block=block, node=node, job_gpus=job_gpus) for seed in seeds[cell.id]]
    figures = f"{reports}/figures"
    analysis_deps = [f"{cell_dir(params, c.stage, c.id, s)}/{RESULT}"
                     for c in analysis_cells(cells) for s in seeds[c.id]]
    jobs.append(Job(rule="analyze", key="", args=["analyze", *common, "--runs", runs, "--out", figures],
                    deps=analysis_deps, outs=[figures], directory_outs=True,
                    params=["scale"], resources=dict(TINY), log=f"{logs}/analyze.log"))
    all_results = [j.outs[0] for j in jobs if j.cell]
    jobs.append(Job(rule="report", key="", args=["report", *common, "--runs", runs, "--out", reports],
                    deps=all_results + [f"{figures}"], outs=[f"{reports}/{name}" for name in REPORT_FILES],
                    params=seed_keys, resources=dict(TINY), log=f"{logs}/report.log",
                    metrics=[f"{reports}/metrics/{name}.json" for name in TABLE_TARGETS if name != "downstream"]))
    result_of = {j.cell: [] for j in jobs if j.cell}
    for j in jobs:
        if j.cell:
            result_of[j.cell].append(j.outs[0])
    for name, tables in TABLE_TARGETS.items():
        deps = [out for c in cells.values() if set(c.tables) & set(tables) for out in result_of[c.id]]
        if deps:
            jobs.append(Job(rule=name, key="", args=["report", *common, "--runs", runs, "--out", reports,
                                                     *[a for t in tables for a in ("--only", t)]],
                            deps=deps, outs=[], params=seed_keys, resources=dict(TINY), target=True))
    return jobs


def upstream(jobs: list[Job], paths) -> list[Job]:
    """The jobs that make ``paths`` and every job before them, each once, in the order met."""
    producer = {out: job for job in jobs for out in job.outs}
    seen, todo, out = set(), list(paths), []
    while todo:
        job = producer.get(todo.pop())
        if job is None or job.stage_name in seen:
            continue
        seen.add(job.stage_name)
        out.append(job)
        todo.extend(job.deps)
    return out


def downstream(jobs: list[Job], seeds) -> list[Job]:
    """``seeds`` (jobs) and every job that reads what one of them makes, transitively, each once."""
    readers: dict[str, list[Job]] = {}
    for job in jobs:
        for dep in job.deps:
            readers.setdefault(dep, []).append(job)
    seen, todo, out = set(), list(seeds), []
    while todo:
        job = todo.pop()
        if job.stage_name in seen:
            continue
        seen.add(job.stage_name)
        out.append(job)
        todo.extend(r for o in job.outs for r in readers.get(o, ()))
    return out


def targets(params: Mapping) -> list[str]:
    """What `snakemake` builds by default: the report (and so everything before it)."""
    return [f"{params['paths']['reports']}/{name}" for name in REPORT_FILES]


class Opaque:
    """A value for a Snakemake ``params`` entry that its params rerun trigger leaves out.

    Snakemake records only builtin values (str, dict, ...) of ``params`` for the trigger; the
    shell command holds the launcher (how many GPUs), which must not make a finished run stale.
    What a run computes is tracked by its run signature instead (mpvg.workflow.state)."""

    def __init__(self, text: str):
        self.text = text

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return f"Opaque({self.text!r})"
