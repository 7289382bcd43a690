"""The pieces both training loops share (classification :mod:`mpvg.training.engine`, detection and
segmentation :mod:`mpvg.downstream.engine`): the options of one job, autocast, wrappers, one
optimizer step, the tracked run, the checkpoint's generator states."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any, Mapping

import torch

from mpvg import runinfo
from mpvg.run import distributed
from mpvg.run.checkpoint import rng_state


@dataclasses.dataclass
class RunOptions:
    """The command-line knobs of one training job, for both loops (the recipe comes from the RunSpec)."""

    out_dir: Path
    seed: int = 0
    device: str = "auto"            # auto | cpu | cuda
    amp: str = "auto"               # auto (bf16 on CUDA when the recipe says amp) | bf16 | fp16 | none
    compile: str = "auto"           # torch.compile the step (classification): auto | on | off (gpu_defaults)
    fused: str = "auto"             # fused AdamW: auto (CUDA) | on | off
    compile_verdict: bool | None = None  # gpu_check's verdict for the model (paths.measured_speeds), for auto
    init_from: Path | None = None   # the checkpoint the run starts from (downstream: None -> the cell's planned one)
    init_expected: dict | None = None  # signature inputs that checkpoint must have (its cell's now)
    resume: bool = True
    on_change: str = "set-aside"    # the run folder holds other settings: set-aside | fail
    retrain: bool = False           # set aside what the run folder holds, also a finished run of these settings
    quiet: bool = False
    # evaluate every N epochs (classification; default 1) or iterations (downstream; None: the
    # recipe's); 0: only at the end
    eval_every: int | None = None
    num_workers: int | None = None  # None: the recipe's
    log_interval: int = 20          # steps between loss checks and progress updates
    log_checkpoint: bool = False    # upload checkpoint.pt to MLflow (default: its path only)
    tracking_uri: str | None = None  # None: no MLflow, only <out>/metrics.jsonl
    experiment: str = "mpvg"


def resolve_amp(amp: str, recipe: Mapping[str, Any], device: torch.device) -> torch.dtype | None:
    """The autocast dtype: ``auto`` means bf16 on CUDA when the recipe says ``amp``, else none."""
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" and recipe.get("amp", False) else "none"
    table = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}
    if amp not in table:
        raise ValueError(f"unknown --amp {amp!r}; expected auto, bf16, fp16 or none")
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("--amp fp16 needs CUDA; use bf16 or none on CPU")
    return table[amp]


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model under DDP and torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def wrap(model: torch.nn.Module, dist, compile: bool = False, **ddp_kwargs) -> torch.nn.Module:
    """The module the loop trains: ``torch.compile`` and DDP around ``model`` when asked for."""
    if compile:
        model = torch.compile(model)
    if dist.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None, **ddp_kwargs)
        if dist.backend == "gloo":
            model.register_comm_hook(None, allreduce_per_parameter)
    return model


def allreduce_per_parameter(group, bucket):
    """DDP's gradient average with one all-reduce per parameter, for gloo (CPU): a communication
    hook (``Future[Tensor]``; no return annotation, which DDP would read as a string here).

    DDP packs gradients into buckets and all-reduces each bucket's flat buffer; with 3 or more
    processes the order in which an element's terms are summed depends on where it sits in that
    buffer. DDP lays the buckets out in reverse parameter order for a process's first step and
    then rebuilds them in the order the gradients became ready, so a process that resumed from a
    checkpoint sums its first step in another order than the uninterrupted run did (4 processes:
    weights 4.5e-4 apart at the end). Per parameter, the sum depends only on the tensor, so a
    resumed run is bit-identical. NCCL keeps DDP's buckets: GPU kernels are not bit-reproducible
    anyway, and one collective per parameter would cost GPU time."""
    world = torch.distributed.get_world_size(group)
    buffer = bucket.buffer().div_(world)  # what DDP's default hook does, element by element
    futures = [torch.distributed.all_reduce(grad, group=group, async_op=True).get_future()
               for grad in bucket.gradients()]  # views of ``buffer``
    return torch.futures.collect_all(futures).then(lambda _: buffer)


def optimizer_step(loss: torch.Tensor, model: torch.nn.Module, optimizer, scaler, clip_grad=None) -> None:
    """Backward (scaled for fp16), optional grad-norm clip, update."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if clip_grad:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    scaler.step(optimizer)
    scaler.update()


def all_rng_states(dist) -> list:
    """Every rank's generator states (rank order), for a checkpoint that continues exactly."""
    states = [rng_state()]
    if dist.distributed:
        states = [None] * dist.world_size
        torch.distributed.all_gather_object(states, rng_state())
    return states


def agreed(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on any rank."""
    t = torch.tensor([float(flag)], device=device)
    return bool(distributed.all_reduce(t, op="max").item())


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def pe_dict(model: torch.nn.Module) -> dict | None:
    cfg = getattr(model, "pe_cfg", None)
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else None


def progress_bar(total: int, initial: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, leave=False,
                disable=not (enabled and sys.stderr.isatty()))


def start_tracking(run, spec, opts: RunOptions, run_params: Mapping[str, Any], run_id: str | None):
    """The job's tracker (MLflow when a URI is set, always ``<out>/metrics.jsonl``; rank 0 only) and
    its run id on every rank (the checkpoint's, when resuming)."""
    from mpvg.tracking import RunTracker

    dist, cell = run.dist, spec.cell
    tracker = RunTracker(run.out, opts.tracking_uri or "", opts.experiment, enabled=dist.is_main,
                         use_mlflow=bool(opts.tracking_uri))
    tags = {"model": cell.model, "method": cell.method, "dataset": spec.dataset, "seed": opts.seed,
            "stage": cell.stage, "cell": cell.id, "scale": spec.scale, "task": cell.task,
            "git_commit": runinfo.git_commit(), "slurm_job_id": runinfo.slurm_job_id(),
            "device": dist.device.type, "world_size": dist.world_size}
    tracked = {"recipe": dict(spec.recipe), "model": {"name": spec.model_name, **spec.model_kwargs},
               "run": dict(run_params)}
    run_id = tracker.start(f"{cell.id}-seed{opts.seed}", tags, tracked, run_id=run_id)
    return tracker, distributed.broadcast_object(run_id)
