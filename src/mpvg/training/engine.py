"""The image-classification training loop behind ``mpvg train`` and ``mpvg eval``.

One linear loop in the style of DeiT's ``main.py``/``engine.py`` and nanoGPT's ``train.py``:
build data, model, optimizer, schedule, loss (all from timm's own factories with the
recipe of params.yaml), maybe resume, then ``for epoch: train; evaluate; checkpoint``, and
finally write ``result.json``.

Reproducibility and resume
    Data order is a function of ``(seed, epoch)`` only (:class:`EpochSampler`), and every
    sample's augmentation is seeded by ``(seed, epoch, position in the epoch)``
    (:class:`SeededSamples`), whatever the number of workers or processes. The main
    process's generators (dropout, drop-path, mixup) are reseeded from ``(seed, epoch,
    rank)`` at each epoch start. A run resumed from any epoch's checkpoint therefore ends
    bit-identical to an uninterrupted one on CPU; a run stopped mid-epoch by a signal
    resumes at the next step with the saved generator states (bit-identical in one process).

Signals
    SIGTERM or SIGUSR1 (SLURM preemption, ``--signal=B:USR1@120``): the current step
    finishes, a checkpoint is written and the process exits with :data:`REQUEUE_EXIT_CODE`.

Distributed
    Under ``torchrun`` (or ``srun``) each process takes ``batch_size / world_size`` of the
    recipe's global batch; gradients are averaged by DDP, so N processes follow the same
    trajectory as one process with the whole batch. Rank 0 alone writes files and logs.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from mpvg import runinfo
from mpvg.training import REQUEUE_EXIT_CODE, distributed  # noqa: F401  (re-exported)
from mpvg.training.checkpoint import load_checkpoint, rng_state, set_rng_state
from mpvg.training.runfolder import (NonFiniteLossError, Preempted, RunFolder, ending_run,  # noqa: F401
                                     load_start_point, open_run)

log = logging.getLogger("mpvg.training")


@dataclasses.dataclass
class TrainOptions:
    """The command-line knobs of one job (the recipe itself comes from the RunSpec)."""

    out_dir: Path
    seed: int = 0
    device: str = "auto"            # auto | cpu | cuda
    amp: str = "auto"               # auto (bf16 on CUDA when the recipe says amp) | bf16 | fp16 | none
    compile: bool = False
    init_from: Path | None = None
    init_expected: dict | None = None  # signature inputs the init checkpoint must have (its cell's now)
    resume: bool = True
    on_change: str = "set-aside"    # the run folder holds other settings: set-aside | fail
    quiet: bool = False
    eval_every: int = 1             # evaluate every N epochs (0: only at the end)
    num_workers: int | None = None  # None: the recipe's
    log_interval: int = 20          # steps between loss checks and progress updates
    log_checkpoint: bool = False    # upload checkpoint.pt to MLflow (default: its path only)
    tracking_uri: str | None = None  # None: no MLflow, only <out>/metrics.jsonl
    experiment: str = "mpvg"


# ------------------------------------------------------------------------------ seeding
def derive_seed(*parts: int) -> int:
    """A 32-bit seed that is a fixed function of integers (``seed, epoch, rank, ...``)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def seed_everything(seed: int, cuda: bool = True) -> None:
    """Seed python, numpy and torch (CPU, and every CUDA device unless ``cuda=False``)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    if cuda:
        torch.manual_seed(seed)
    else:
        torch.default_generator.manual_seed(seed)


class EpochSampler(Sampler):
    """Training order as a function of ``(seed, epoch)``.

    The epoch's order is a permutation of the dataset (each index repeated ``repeats`` times
    in a row for DeiT's repeated augmentation, cut back to the dataset length), truncated to
    whole global batches. Rank ``r`` of ``w`` takes positions ``r, r + w, ...``, so the ranks'
    ``k``-th local batches together are exactly the ``k``-th global batch. Yields
    ``(index, sample_seed)`` pairs for :class:`SeededSamples`; ``start_step`` skips the
    global batches already trained in a resumed epoch.
    """

    def __init__(self, length: int, global_batch: int, seed: int, rank: int = 0, world_size: int = 1,
                 repeats: int = 1):
        if global_batch % world_size:
            raise ValueError(f"batch_size {global_batch} (global) is not divisible by the world size {world_size}")
        if length < global_batch:
            raise ValueError(f"the training set has {length} samples, fewer than one batch of {global_batch}")
        self.length, self.global_batch, self.seed = length, global_batch, seed
        self.rank, self.world_size, self.repeats = rank, world_size, repeats
        self.steps_per_epoch = length // global_batch
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def __iter__(self):
        gen = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
        order = torch.randperm(self.length, generator=gen)
        if self.repeats > 1:
            order = order.repeat_interleave(self.repeats)[: self.length]
        order = order.tolist()
        base = derive_seed(self.seed, self.epoch, 1)
        end = self.steps_per_epoch * self.global_batch
        for pos in range(self.start_step * self.global_batch + self.rank, end, self.world_size):
            yield order[pos], (base + pos) % 2**32

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.global_batch // self.world_size


class SeededSamples(Dataset):
    """Wraps a dataset so item ``(index, sample_seed)`` is transformed with the python, numpy
    and torch generators seeded by ``sample_seed`` (restored afterwards in the main process)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item):
        index, seed = item
        in_main = torch.utils.data.get_worker_info() is None
        saved = (random.getstate(), np.random.get_state(), torch.get_rng_state()) if in_main else None
        seed_everything(seed, cuda=False)  # never touch the CUDA streams of dropout / drop-path
        try:
            return self.dataset[index]
        finally:
            if saved:
                random.setstate(saved[0])
                np.random.set_state(saved[1])
                torch.set_rng_state(saved[2])


# ------------------------------------------------------------------------------ building
def build_datasets(spec) -> tuple[Dataset, Dataset]:
    """Train and val datasets of a classification RunSpec, checked at start (errors name the path)."""
    from mpvg.data import check_dataset
    from mpvg.data.classification import build_dataset, build_transform

    for split in ("train", "val"):
        check_dataset(spec.dataset, spec.dataset_root, split, spec.num_classes, spec.classes)
    train = build_dataset(spec.dataset, spec.dataset_root, "train", build_transform(spec.recipe, True), spec.num_classes,
                          spec.classes)
    val = build_dataset(spec.dataset, spec.dataset_root, "val", build_transform(spec.recipe, False), spec.num_classes,
                        spec.classes)
    return train, val


def eval_loader(dataset: Dataset, batch_size: int, dist: distributed.DistInfo, workers: int) -> DataLoader:
    """Sequential shards (rank ``r`` takes ``r, r + w, ...``): every sample counted once."""
    from mpvg.data.classification import ShardSampler

    return DataLoader(dataset, batch_size=batch_size, sampler=ShardSampler(len(dataset), dist.world_size, dist.rank),
                      num_workers=workers, pin_memory=dist.device.type == "cuda", generator=torch.Generator())


def build_model(spec) -> torch.nn.Module:
    """``timm.create_model(spec.model_name, **spec.model_kwargs)`` after registering mpvg's models."""
    import timm

    import mpvg.models  # noqa: F401  (registers mpvg_* with timm)

    return timm.create_model(spec.model_name, **spec.model_kwargs)


def param_groups(model: torch.nn.Module, recipe: Mapping[str, Any]) -> list[dict]:
    """Parameter groups for ``timm.optim.create_optimizer_v2``.

    No weight decay on biases, norms, 1-D parameters and ``model.no_weight_decay()`` (timm's
    and DeiT's rule; the T2T transfer script's SGD decays everything). With
    ``backbone_lr_ratio != 1`` (T2T transfer) every parameter except the classifier head
    trains at ``ratio * lr``, through timm's ``lr_scale``, which its schedulers honour.
    """
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    decay_all = recipe["optimizer"] == "sgd"
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    head_ids = {id(p) for p in head.parameters()} if isinstance(head, torch.nn.Module) else set()
    ratio = float(recipe.get("backbone_lr_ratio", 1.0))
    groups: dict[tuple[bool, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = decay_all or not (p.ndim <= 1 or name.endswith(".bias") or name in skip)
        scale = 1.0 if id(p) in head_ids else ratio
        groups.setdefault((decay, scale), []).append(p)
    return [{"params": ps, "weight_decay": recipe["weight_decay"] if decay else 0.0, "lr_scale": scale}
            for (decay, scale), ps in groups.items()]


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


# ------------------------------------------------------------------------------ one step
def train_step(model, images, targets, criterion, optimizer, scaler, amp_dtype=None, clip_grad=None) -> torch.Tensor:
    """Forward under autocast, backward (scaled for fp16), optional grad-norm clip, update.
    Returns the loss (not synchronised). Shared with benchmarks/bench_train.py."""
    with torch.autocast(images.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        loss = criterion(model(images), targets)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if clip_grad:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    scaler.step(optimizer)
    scaler.update()
    return loss


# ------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader, device: torch.device,
             amp_dtype: torch.dtype | None = None) -> dict[str, float]:
    """Top-1 / top-5 accuracy (percent) and mean cross-entropy over the whole (sharded) set."""
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, n
    for images, targets in loader:
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(images)
        logits = logits.float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hit = top.eq(targets[:, None])
        sums += torch.stack([F.cross_entropy(logits, targets, reduction="sum").double(),
                             hit[:, :1].any(1).sum().double(), hit.any(1).sum().double(),
                             torch.tensor(float(len(targets)), dtype=torch.float64, device=device)])
    distributed.all_reduce(sums)
    loss, top1, top5, n = sums.tolist()
    n = max(n, 1.0)
    return {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n, "loss": loss / n}


# ------------------------------------------------------------------------------ plumbing
def progress_bar(total: int, initial: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, leave=False,
                disable=not (enabled and sys.stderr.isatty()))


def _agreed(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on any rank."""
    t = torch.tensor([float(flag)], device=device)
    return bool(distributed.all_reduce(t, op="max").item())


def _count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def pe_dict(model: torch.nn.Module) -> dict | None:
    cfg = getattr(model, "pe_cfg", None)
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else None


# ------------------------------------------------------------------------------ training
def train(spec, opts: TrainOptions) -> dict[str, Any]:
    """Train one classification cell for one seed; return the result written to result.json.

    The run folder's life cycle (lock, signature, resume or set aside, publish) is
    :func:`mpvg.training.runfolder.open_run`. Raises :class:`Preempted` after checkpointing on a stop
    request and :class:`NonFiniteLossError` when the loss is NaN/inf (nothing saved for that epoch).
    """
    from mpvg.signature import cell_inputs

    cell = spec.cell
    if spec.kind != "classification":
        raise ValueError(f"cell {cell.id} is a {spec.kind} cell; `mpvg train` runs classification cells "
                         "(use `mpvg detect` / `mpvg segment`)")
    if cell.init_from and opts.init_from is None:
        raise ValueError(f"cell {cell.id} is fine-tuned from cell {cell.init_from}: pass --init-from "
                         f"{spec.init_checkpoint(opts.seed)} (or another checkpoint)")
    init_state, init_signature = load_start_point(opts.init_from, opts.init_expected)
    inputs = cell_inputs(spec, opts.seed, init_signature)
    with open_run(opts.out_dir, inputs, opts.device, opts.resume, opts.on_change, init_state) as run:
        if run.finished is not None:
            return run.finished
        return _train(spec, opts, run)


def _train(spec, opts: TrainOptions, run: RunFolder) -> dict[str, Any]:
    import timm.data
    import timm.loss
    import timm.optim
    import timm.scheduler
    import timm.utils

    from mpvg.tracking import RunTracker, model_card

    recipe, dist, seed, cell = spec.recipe, run.dist, opts.seed, spec.cell
    device, out, ckpt_path, stop, job_start = dist.device, run.out, run.checkpoint_path, run.stop, run.job_start
    log.info("cell %s seed %d: %s on %d x %s (%s), output %s, signature %s", cell.id, seed, spec.model_name,
             dist.world_size, device.type, dist.backend or "single process", out, run.signature)

    # data: order and augmentation are functions of (seed, epoch, position)
    train_set, val_set = build_datasets(spec)
    global_batch = recipe["batch_size"]
    local_batch = global_batch // dist.world_size
    workers = recipe["workers"] if opts.num_workers is None else opts.num_workers
    sampler = EpochSampler(len(train_set), global_batch, seed, dist.rank, dist.world_size,
                           repeats=3 if recipe["repeated_aug"] else 1)
    # >>> uint8 input pipeline (issue 21): workers collate uint8; normalise + erase on the device
    from mpvg.data.classification import build_train_loader
    from mpvg.data.device_transform import DeviceTransform

    train_loader = build_train_loader(SeededSamples(train_set), sampler, local_batch, workers, device.type == "cuda")
    device_transform = DeviceTransform.from_recipe(recipe, device)
    log.info("input pipeline: uint8 batches, %r", device_transform)
    # <<< uint8 input pipeline
    val_loader = eval_loader(val_set, local_batch, dist, workers)
    steps_per_epoch = sampler.steps_per_epoch

    # model, initialised identically on every rank
    seed_everything(seed)
    model = build_model(spec)
    if run.init_state is not None:
        from mpvg.models.checkpoint import load_checkpoint_into

        report = load_checkpoint_into(model, run.init_state)
        run.init_state = None  # free it
        log.info("initialised from %s: %s", opts.init_from, report)
    model.to(device)
    n_params = _count_params(model)

    # optimizer, schedule, loss: timm's factories, as DeiT / timm train.py
    opt_name = {"adamw": "adamw", "sgd": "momentum"}[recipe["optimizer"]]  # timm's "sgd" is Nesterov
    opt_kwargs = {"eps": recipe["opt_eps"]} if opt_name == "adamw" else {}
    # >>> fast path (issue 21): fused AdamW on CUDA, compile with an eager fallback, one log line
    from mpvg.training import gpu_defaults

    fast = gpu_defaults.choose(device, resolve_amp(opts.amp, recipe, device), recipe["optimizer"], workers,
                               compile="on" if opts.compile else "auto")
    log.info(fast.describe())
    if fast.fused_adamw:
        opt_kwargs["fused"] = True
    # <<< fast path
    optimizer = timm.optim.create_optimizer_v2(param_groups(model, recipe), opt=opt_name, lr=recipe["lr"],
                                               weight_decay=recipe["weight_decay"], momentum=recipe["momentum"],
                                               **opt_kwargs)
    per_step = bool(recipe["sched_per_step"])
    scheduler, _ = timm.scheduler.create_scheduler_v2(
        optimizer, sched=recipe["sched"], num_epochs=recipe["epochs"], warmup_epochs=recipe["warmup_epochs"],
        cooldown_epochs=recipe["cooldown_epochs"], min_lr=recipe["min_lr"], warmup_lr=recipe["warmup_lr"],
        step_on_epochs=not per_step, updates_per_epoch=steps_per_epoch)
    total_epochs = recipe["epochs"] + recipe["cooldown_epochs"]
    from mpvg.data.classification import mixup_kwargs

    mix = mixup_kwargs(recipe, spec.num_classes)
    mixup_fn = timm.data.Mixup(**mix) if mix else None
    if mixup_fn is not None and local_batch % 2:
        raise ValueError(f"mixup/cutmix need an even per-process batch; got {local_batch} "
                         f"(batch_size {global_batch} over {dist.world_size} processes)")
    if mixup_fn is not None:
        criterion = timm.loss.SoftTargetCrossEntropy()  # smoothing is folded into the mixed targets
    elif recipe["label_smoothing"] > 0:
        criterion = timm.loss.LabelSmoothingCrossEntropy(smoothing=recipe["label_smoothing"])
    else:
        criterion = torch.nn.CrossEntropyLoss()
    ema = timm.utils.ModelEmaV3(model, decay=recipe.get("model_ema_decay", 0.99996)) if recipe.get("model_ema") else None
    amp_dtype = resolve_amp(opts.amp, recipe, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    # resume from <out>/checkpoint.pt: open_run checked that it holds a run of these very settings
    start_epoch, start_step, num_updates, elapsed_before = 0, 0, 0, 0.0
    history: list[dict] = []
    run_id, rng_states, progress = None, None, {}
    if run.resume is not None:
        ckpt, run.resume = run.resume, None
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        if ema is not None:
            ema.module.load_state_dict(ckpt["model_ema"])
        start_epoch, start_step, num_updates = ckpt["epoch"], ckpt["step"], ckpt["num_updates"]
        elapsed_before, history, run_id = ckpt["elapsed_s"], ckpt["history"], ckpt.get("mlflow_run_id")
        if start_step and len(ckpt["rng"]) == dist.world_size:
            rng_states = ckpt["rng"][dist.rank]
        if start_step:  # the interrupted epoch's running sums, so its history row is the uninterrupted one
            progress = dict(ckpt.get("epoch_progress") or {})
        log.info("resumed from %s: epoch %d, step %d of %d", ckpt_path, start_epoch, start_step, steps_per_epoch)
        del ckpt

    train_model = model
    if dist.distributed:
        train_model = torch.nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)

    # >>> fast path: one optimizer step, compiled (eager again if compiling fails) or eager
    def one_step(m, images, targets):
        return train_step(m, images, targets, criterion, optimizer, scaler, amp_dtype, recipe["clip_grad"])

    run_step = (gpu_defaults.compile_with_fallback(train_model, one_step, device, f"{cell.id} ({spec.model_name})")
                if fast.compile else lambda images, targets: one_step(train_model, images, targets))
    # <<< fast path

    # tracking (rank 0): MLflow when a URI is set, always <out>/metrics.jsonl
    tracker = RunTracker(out, opts.tracking_uri or "", opts.experiment, enabled=dist.is_main,
                         use_mlflow=bool(opts.tracking_uri))
    tags = {"model": cell.model, "method": cell.method, "dataset": spec.dataset, "seed": seed, "stage": cell.stage,
            "cell": cell.id, "scale": spec.scale, "task": cell.task, "git_commit": runinfo.git_commit(),
            "slurm_job_id": runinfo.slurm_job_id(), "device": device.type, "world_size": dist.world_size}
    tracked = {"recipe": dict(recipe), "model": {"name": spec.model_name, **spec.model_kwargs},
               "run": {"seed": seed, "world_size": dist.world_size, "local_batch": local_batch, "amp": str(amp_dtype),
                       "compile": opts.compile, "init_from": opts.init_from, "params": n_params}}
    run_id = tracker.start(f"{cell.id}-seed{seed}", tags, tracked, run_id=run_id)
    run_id = distributed.broadcast_object(run_id)

    def checkpoint(epoch: int, step: int, epoch_progress: dict | None = None) -> None:
        """Everything needed to continue exactly (rank 0 writes; all ranks give their RNG)."""
        states = [rng_state()]
        if dist.distributed:
            states = [None] * dist.world_size
            torch.distributed.all_gather_object(states, rng_state())
        run.save({
            "model": unwrap(model).state_dict(), "model_ema": ema.module.state_dict() if ema else None,
            "model_name": spec.model_name, "model_kwargs": spec.model_kwargs,
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "epoch": epoch, "step": step, "num_updates": num_updates,
            "epoch_progress": epoch_progress, "total_epochs": total_epochs,
            "rng": states, "data": {"seed": seed, "global_batch": global_batch, "repeats": sampler.repeats},
            "elapsed_s": elapsed_before + time.time() - job_start, "history": history,
            "mlflow_run_id": run_id, "cell": cell.id, "seed": seed})

    log.info("training %s (%s, %.2fM params) for %d epochs x %d steps, batch %d (%d per process), lr %.3g",
             cell.id, spec.model_name, n_params / 1e6, total_epochs, steps_per_epoch, global_batch, local_batch,
             recipe["lr"])
    val: dict[str, float] | None = None
    with ending_run(tracker):
        for epoch in range(start_epoch, total_epochs):
            # ---- one epoch of training ----
            train_model.train()
            sampler.set_epoch(epoch, start_step)
            if rng_states is not None:  # resumed inside this epoch: continue the saved streams
                set_rng_state(rng_states)
                rng_states = None
            else:
                seed_everything(derive_seed(seed, epoch, dist.rank, start_step))
            if not per_step:
                scheduler.step(epoch)
            pbar = progress_bar(steps_per_epoch, start_step, f"epoch {epoch + 1}/{total_epochs}", not opts.quiet and dist.is_main)
            # running sums of the epoch (carried over from the checkpoint when it was interrupted)
            loss_sum, loss_n = float(progress.get("loss_sum", 0.0)), int(progress.get("loss_n", 0))
            time_before, progress = float(progress.get("time_s", 0.0)), {}
            t0, pending, last_sync = time.time(), [], start_step
            stopped_at = None
            for step, (images, targets) in enumerate(train_loader, start=start_step):
                # >>> uint8 input pipeline: every draw seeded by (seed, epoch, step, rank)
                images = device_transform(images, seed=seed, epoch=epoch, step=step, rank=dist.rank)
                targets = targets.to(device, non_blocking=True)
                # <<< uint8 input pipeline
                if mixup_fn is not None:
                    images, targets = mixup_fn(images, targets)
                if per_step:
                    scheduler.step_update(num_updates)
                loss = run_step(images, targets)  # fast path: compiled or eager
                num_updates += 1
                if ema is not None:
                    ema.update(model, step=num_updates)
                pending.append(loss.detach())
                # check the losses (and stop requests) every log_interval steps: one sync, not one per step
                last = step + 1 == steps_per_epoch
                local_stop = not dist.distributed and stop.requested
                if (step + 1) % opts.log_interval and not last and not local_stop:
                    continue
                losses = torch.stack(pending).float()
                finite = torch.isfinite(losses)
                # one all-reduce (sum over ranks) of: non-finite losses, stop requests, sum of losses
                stats = torch.stack([(~finite).sum().float(), torch.tensor(float(stop.requested), device=device),
                                     torch.where(finite, losses, 0.0).sum()])
                nonfinite, stops, total = distributed.all_reduce(stats).tolist()
                if nonfinite:
                    finite = finite.cpu()
                    bad = step if finite.all() else step + 1 - len(losses) + int((~finite).nonzero()[0])
                    raise NonFiniteLossError(
                        f"cell {cell.id} seed {seed}: non-finite loss at epoch {epoch + 1}/{total_epochs}, "
                        f"step {bad + 1}/{steps_per_epoch}; stopping. The last good checkpoint ({ckpt_path}) is "
                        "unchanged; lower the lr, enable clip_grad or check the data")
                loss_sum, loss_n, pending = loss_sum + total / dist.world_size, loss_n + len(losses), []
                pbar.update(step + 1 - last_sync)
                last_sync = step + 1
                rate = (step + 1 - start_step) * global_batch / max(time.time() - t0, 1e-9)  # since this start
                pbar.set_postfix(loss=f"{total / dist.world_size / len(losses):.4f}",
                                 lr=f"{optimizer.param_groups[0]['lr']:.2e}", img_s=f"{rate:.0f}")
                if stops:  # every rank agrees: stop after this step
                    stopped_at = step + 1
                    break
            pbar.close()
            if stopped_at is not None and stopped_at < steps_per_epoch:
                checkpoint(epoch, stopped_at, {"loss_sum": loss_sum, "loss_n": loss_n,
                                               "time_s": time_before + time.time() - t0})
                raise Preempted(f"stopped by {stop.name}: checkpoint at epoch {epoch + 1}, step {stopped_at} of "
                                f"{steps_per_epoch} saved to {ckpt_path}")
            epoch_time = time_before + time.time() - t0
            start_step = 0

            # ---- evaluate, checkpoint, log ----
            last_epoch = epoch + 1 == total_epochs
            val = None
            if last_epoch or (opts.eval_every and (epoch + 1) % opts.eval_every == 0):
                val = evaluate(model, val_loader, device, amp_dtype)  # unwrapped: no DDP collectives
            row = {"epoch": epoch + 1, "train_loss": loss_sum / max(loss_n, 1), "lr": optimizer.param_groups[0]["lr"],
                   "epoch_time_s": epoch_time, "images_per_s": loss_n * global_batch / max(epoch_time, 1e-9),
                   **({f"val_{k}": v for k, v in val.items()} if val else {})}
            history.append(row)
            checkpoint(epoch + 1, 0)
            tracker.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch + 1)
            log.info("epoch %d/%d  train_loss %.4f  %s  lr %.3g  %.0f img/s  %.1f s", epoch + 1, total_epochs,
                     row["train_loss"], "  ".join(f"val_{k} {v:.3f}" for k, v in (val or {}).items()) or "(no eval)",
                     row["lr"], row["images_per_s"], epoch_time)
            if _agreed(stop.requested, device) and not last_epoch:
                raise Preempted(f"stopped by {stop.name}: checkpoint at the end of epoch {epoch + 1} saved to {ckpt_path}")

        # ---- final metrics and result.json (written last) ----
        if val is None:  # resumed after the last epoch, or the loop ran no epoch
            val = evaluate(model, val_loader, device, amp_dtype)
        metrics_ema = evaluate(ema.module, val_loader, device, amp_dtype) if ema is not None else None
        wall = elapsed_before + time.time() - job_start
        result = runinfo.result_record(
            spec, seed, pe=pe_dict(model), params=n_params,
            measured={"metrics": val, **({"metrics_ema": metrics_ema} if metrics_ema else {}),
                      "epochs": total_epochs},
            wall_time_s=wall, device_type=device.type, world_size=dist.world_size, checkpoint=ckpt_path,
            mlflow_run_id=run_id, init_from=opts.init_from, history=history)
        if dist.is_main:
            card = out / "model_card.md"
            card.write_text(model_card(result, recipe, spec.model_name, spec.model_kwargs))
            tracker.log_artifact(card)
            if opts.log_checkpoint:
                tracker.log_artifact(ckpt_path, "checkpoint")
            result = run.publish(tracker, result, val, total_epochs)
            log.info("done: %s seed %d  top1 %.2f  top5 %.2f  loss %.4f  (%.1f s) -> %s", cell.id, seed,
                     val["top1"], val["top5"], val["loss"], wall, out / "result.json")
        return result


def evaluate_checkpoint(spec, checkpoint: str | os.PathLike, device: str = "auto", amp: str = "auto",
                        use_ema: bool = False, num_workers: int | None = None,
                        official: bool = False) -> dict[str, Any]:
    """Top-1 / top-5 / loss of a checkpoint on the cell's validation set (``mpvg eval``).

    ``official``: ``checkpoint`` is an official checkpoint of a Default model in its original
    code base's layout (``mpvg eval --weights``, mpvg.models.checkpoint.load_official_weights);
    the result then says which file (sha256), layout and conversions it took.
    """
    from mpvg.models.checkpoint import unwrap_state_dict

    dist = distributed.setup(device)
    try:
        if official and spec.cell.task != "in1k":
            raise ValueError(f"cell {spec.cell.id}: official checkpoints are ImageNet-1K models; expected an "
                             "in1k-<model>-default cell")
        _, val_set = build_datasets(spec)
        ckpt = load_checkpoint(checkpoint)
        ema_keys = ("model_ema", "state_dict_ema") if official else ("model_ema",)
        ema = next((ckpt[k] for k in ema_keys if isinstance(ckpt, Mapping) and ckpt.get(k)), None)
        if use_ema and ema is None:
            raise ValueError(f"{checkpoint} holds no EMA weights (none of {list(ema_keys)})")
        model = build_model(spec)
        weights = None
        if official:
            from mpvg.models.checkpoint import load_official_weights

            report = load_official_weights(model, ema if use_ema else ckpt)
            weights = {"path": str(checkpoint), "sha256": _sha256(checkpoint), **report._asdict()}
        else:
            model.load_state_dict(unwrap_state_dict(ema if use_ema else ckpt))
        model.to(dist.device)
        workers = spec.recipe["workers"] if num_workers is None else num_workers
        loader = eval_loader(val_set, spec.recipe["batch_size"] // dist.world_size, dist, workers)
        metrics = evaluate(model, loader, dist.device, resolve_amp(amp, spec.recipe, dist.device))
        result = {"cell": spec.cell.id, "checkpoint": str(checkpoint), "ema": use_ema, "metrics": metrics,
                  "device": dist.device.type, "world_size": dist.world_size, "num_samples": len(val_set)}
        if weights is not None:
            result.update(stage="calibration", model=spec.cell.model, method=spec.cell.method, scale=spec.scale,
                          dataset=spec.dataset, weights=weights)
        return result
    finally:
        distributed.cleanup()


def _sha256(path: str | os.PathLike) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
