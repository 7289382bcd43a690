"""The image-classification training loop behind ``mpvg train`` and ``mpvg eval``.

DeiT's ``main.py`` + ``engine.py`` in one file: :func:`_train` builds data, model, optimizer,
schedule and loss (all from timm's own factories with the recipe of params.yaml), maybe resumes,
then ``for epoch: train_one_epoch; evaluate; checkpoint``, and finally publishes ``result.json``.
The run folder, seeding and sampling, process groups and the pieces shared with the downstream
loop are the run layer's (:mod:`mpvg.run`).

Reproducibility and resume
    Data order is a function of ``(seed, epoch)`` only, every sample's augmentation of ``(seed,
    epoch, position in the epoch)``, and the main process's generators (dropout, drop-path,
    mixup) are reseeded from ``(seed, epoch, rank, step)`` at each epoch start
    (:mod:`mpvg.run.seeding`). A run resumed from any epoch's checkpoint therefore ends
    bit-identical to an uninterrupted one on CPU; a run stopped mid-epoch by a signal resumes at
    the next step with the saved generator states (bit-identical in one process).

Signals
    SIGTERM or SIGUSR1 (SLURM preemption, ``--signal=B:USR1@120``): the current step finishes, a
    checkpoint is written and the process exits with :data:`mpvg.run.REQUEUE_EXIT_CODE`.

Distributed
    Under ``mpvg launch``, ``torchrun`` or ``srun`` each process takes ``batch_size / world_size``
    of the recipe's global batch; gradients are averaged by DDP, so N processes follow the same
    trajectory as one process with the whole batch. Rank 0 alone writes files and logs.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from mpvg import runinfo
from mpvg.data.device_transform import DeviceTransform
from mpvg.run import distributed
from mpvg.run.checkpoint import load_checkpoint
from mpvg.run.folder import NonFiniteLossError, Preempted, RunFolder, ending_run, load_start_point, open_run
from mpvg.run.layout import MODEL_CARD, RESULT
from mpvg.run.loop import (RunOptions, agreed, all_rng_states, count_params, optimizer_step, pe_dict, progress_bar,
                           resolve_amp, start_tracking, unwrap, wrap)
from mpvg.run.seeding import seed_epoch, seed_everything, train_loader
from mpvg.training import gpu_defaults

log = logging.getLogger("mpvg.training")


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


def build_optimizer(model: torch.nn.Module, recipe: Mapping[str, Any], steps_per_epoch: int, fused: bool = False):
    """timm's optimizer and scheduler for the recipe, as DeiT / timm's train.py build them
    (``fused``: AdamW's one-kernel update, CUDA only: :mod:`mpvg.training.gpu_defaults`)."""
    import timm.optim
    import timm.scheduler

    opt_name = {"adamw": "adamw", "sgd": "momentum"}[recipe["optimizer"]]  # timm's "sgd" is Nesterov
    opt_kwargs = {"eps": recipe["opt_eps"]} if opt_name == "adamw" else {}
    if fused:
        opt_kwargs["fused"] = True
    optimizer = timm.optim.create_optimizer_v2(param_groups(model, recipe), opt=opt_name, lr=recipe["lr"],
                                               weight_decay=recipe["weight_decay"], momentum=recipe["momentum"],
                                               **opt_kwargs)
    scheduler, _ = timm.scheduler.create_scheduler_v2(
        optimizer, sched=recipe["sched"], num_epochs=recipe["epochs"], warmup_epochs=recipe["warmup_epochs"],
        cooldown_epochs=recipe["cooldown_epochs"], min_lr=recipe["min_lr"], warmup_lr=recipe["warmup_lr"],
        step_on_epochs=not recipe["sched_per_step"], updates_per_epoch=steps_per_epoch)
    return optimizer, scheduler


def build_criterion(recipe: Mapping[str, Any], num_classes: int, local_batch: int, world_size: int):
    """``(mixup_fn or None, loss)``: timm's Mixup and the loss that fits it (smoothing is folded into
    mixed targets)."""
    import timm.data
    import timm.loss

    from mpvg.data.classification import mixup_kwargs

    mix = mixup_kwargs(recipe, num_classes)
    mixup_fn = timm.data.Mixup(**mix) if mix else None
    if mixup_fn is not None and local_batch % 2:
        raise ValueError(f"mixup/cutmix need an even per-process batch; got {local_batch} "
                         f"(batch_size {recipe['batch_size']} over {world_size} processes)")
    if mixup_fn is not None:
        return mixup_fn, timm.loss.SoftTargetCrossEntropy()
    if recipe["label_smoothing"] > 0:
        return None, timm.loss.LabelSmoothingCrossEntropy(smoothing=recipe["label_smoothing"])
    return None, torch.nn.CrossEntropyLoss()


def batch_preparer(device: torch.device, device_transform: Callable, mixup_fn: Callable | None, seed: int,
                   rank: int) -> Callable:
    """The one function the loop calls on each training batch: move the uint8 batch to the device and
    finish it there: normalisation and random erasing (:class:`mpvg.data.device_transform.DeviceTransform`,
    every draw seeded by ``(seed, epoch, step, rank)``), then mixup / cutmix."""
    def prepare(images: torch.Tensor, targets: torch.Tensor, epoch: int, step: int):
        images = device_transform(images, seed=seed, epoch=epoch, step=step, rank=rank)
        targets = targets.to(device, non_blocking=True)
        if mixup_fn is not None:
            images, targets = mixup_fn(images, targets)
        return images, targets

    return prepare


# ------------------------------------------------------------------------------ one step
def train_step(model, images, targets, criterion, optimizer, scaler, amp_dtype=None, clip_grad=None) -> torch.Tensor:
    """Forward under autocast, backward (scaled for fp16), optional grad-norm clip, update.
    Returns the loss (not synchronised). Shared with benchmarks/bench_train.py."""
    with torch.autocast(images.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        loss = criterion(model(images), targets)
    optimizer_step(loss, model, optimizer, scaler, clip_grad)
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


# ------------------------------------------------------------------------------ training
@dataclasses.dataclass
class Trainer:
    """What one optimisation step needs, built once by :func:`_train`."""

    model: torch.nn.Module          # the plain model (EMA, checkpoints, evaluation)
    train_model: torch.nn.Module    # the model under DDP
    optimizer: Any
    scheduler: Any
    scaler: Any
    criterion: Any
    ema: Any
    amp_dtype: torch.dtype | None
    per_step: bool                  # the schedule steps per update (else per epoch)
    clip_grad: float | None
    step: Callable | None = None    # (images, targets) -> loss: one update, compiled or eager
    num_updates: int = 0


def train_one_epoch(t: Trainer, loader, sampler, prepare: Callable, epoch: int, start_step: int, total_epochs: int,
                    run: RunFolder, opts: RunOptions, progress: dict, who: str) -> dict:
    """One epoch (or the rest of one) in DeiT's shape: ``for batch: prepare; step``. Checks the
    losses and stop requests every ``log_interval`` steps (one all-reduce, not one per step).
    Returns the epoch's running sums and ``stopped_at`` (the step after which a stop request was
    agreed on, else None); raises :class:`NonFiniteLossError` on a NaN/inf loss."""
    dist, stop, device = run.dist, run.stop, run.dist.device
    steps = sampler.steps_per_epoch
    t.train_model.train()
    sampler.set_epoch(epoch, start_step)
    seed_epoch(opts.seed, epoch, dist.rank, start_step, progress.get("rng"))
    if not t.per_step:
        t.scheduler.step(epoch)
    pbar = progress_bar(steps, start_step, f"epoch {epoch + 1}/{total_epochs}", not opts.quiet and dist.is_main)
    # running sums of the epoch (carried over from the checkpoint when it was interrupted)
    loss_sum, loss_n, time_before = float(progress.get("loss_sum", 0.0)), int(progress.get("loss_n", 0)), \
        float(progress.get("time_s", 0.0))
    t0, pending, last_sync, stopped_at = time.time(), [], start_step, None
    for step, (images, targets) in enumerate(loader, start=start_step):
        images, targets = prepare(images, targets, epoch, step)
        if t.per_step:
            t.scheduler.step_update(t.num_updates)
        loss = t.step(images, targets)
        t.num_updates += 1
        if t.ema is not None:
            t.ema.update(t.model, step=t.num_updates)
        pending.append(loss.detach())
        last = step + 1 == steps
        if (step + 1) % opts.log_interval and not last and not (not dist.distributed and stop.requested):
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
                f"{who}: non-finite loss at epoch {epoch + 1}/{total_epochs}, "
                f"step {bad + 1}/{steps}; stopping. The last good checkpoint ({run.checkpoint_path}) is "
                "unchanged; lower the lr, enable clip_grad or check the data")
        loss_sum, loss_n, pending = loss_sum + total / dist.world_size, loss_n + len(losses), []
        pbar.update(step + 1 - last_sync)
        last_sync = step + 1
        rate = (step + 1 - start_step) * sampler.global_batch / max(time.time() - t0, 1e-9)  # since this start
        loss_now, lr = total / dist.world_size / len(losses), t.optimizer.param_groups[0]["lr"]
        pbar.set_postfix(loss=f"{loss_now:.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.0f}")
        log.info("epoch %d/%d step %d/%d  loss %.4f  lr %.3g  %.0f img/s", epoch + 1, total_epochs, step + 1, steps,
                 loss_now, lr, rate)
        if stops:  # every rank agrees: stop after this step
            stopped_at = step + 1
            break
    pbar.close()
    return {"loss_sum": loss_sum, "loss_n": loss_n, "time_s": time_before + time.time() - t0,
            "stopped_at": stopped_at}


def train(spec, opts: RunOptions) -> dict[str, Any]:
    """Train one classification cell for one seed; return the result written to result.json.

    The run folder's life cycle (lock, signature, resume or set aside, publish) is
    :func:`mpvg.run.folder.open_run`. Raises :class:`Preempted` after checkpointing on a stop
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
    with open_run(opts.out_dir, inputs, opts.device, opts.resume, opts.on_change, init_state,
                  retrain=opts.retrain) as run:
        if run.finished is not None:
            return run.finished
        return _train(spec, opts, run)


def _train(spec, opts: RunOptions, run: RunFolder) -> dict[str, Any]:
    import timm.utils

    from mpvg.tracking import model_card

    recipe, dist, seed, cell = spec.recipe, run.dist, opts.seed, spec.cell
    device, out, ckpt_path, stop, job_start = dist.device, run.out, run.checkpoint_path, run.stop, run.job_start
    log.info("cell %s seed %d: %s on %d x %s (%s), output %s, signature %s", cell.id, seed, spec.model_name,
             dist.world_size, device.type, dist.backend or "single process", out, run.signature)

    # data: order and augmentation are functions of (seed, epoch, position)
    train_set, val_set = build_datasets(spec)
    global_batch = recipe["batch_size"]
    local_batch = global_batch // dist.world_size
    workers = recipe["workers"] if opts.num_workers is None else opts.num_workers
    sampler, loader = train_loader(train_set, global_batch, seed, dist, workers, 3 if recipe["repeated_aug"] else 1)
    device_transform = DeviceTransform.from_recipe(recipe, device)  # workers collate uint8; the rest is here
    log.info("input pipeline: uint8 batches, %r", device_transform)
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
    n_params = count_params(model)

    # optimizer, schedule, loss: timm's factories, as DeiT / timm train.py
    amp_dtype = resolve_amp(opts.amp, recipe, device)
    fast = gpu_defaults.choose(device, amp_dtype, recipe["optimizer"], workers, compile=opts.compile, fused=opts.fused,
                               compile_verdict=opts.compile_verdict)
    log.info(fast.describe())
    optimizer, scheduler = build_optimizer(model, recipe, steps_per_epoch, fused=fast.fused_adamw)
    total_epochs = recipe["epochs"] + recipe["cooldown_epochs"]
    mixup_fn, criterion = build_criterion(recipe, spec.num_classes, local_batch, dist.world_size)
    ema = timm.utils.ModelEmaV3(model, decay=recipe.get("model_ema_decay", 0.99996)) if recipe.get("model_ema") else None
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    t = Trainer(model, model, optimizer, scheduler, scaler, criterion, ema, amp_dtype, bool(recipe["sched_per_step"]),
                recipe["clip_grad"])

    # resume from <out>/checkpoint.pt: open_run checked that it holds a run of these very settings
    start_epoch, start_step, elapsed_before, history, run_id, progress = 0, 0, 0.0, [], None, {}
    if run.resume is not None:
        ckpt, run.resume = run.resume, None
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        if ema is not None:
            ema.module.load_state_dict(ckpt["model_ema"])
        start_epoch, start_step, t.num_updates = ckpt["epoch"], ckpt["step"], ckpt["num_updates"]
        elapsed_before, history, run_id = ckpt["elapsed_s"], ckpt["history"], ckpt.get("mlflow_run_id")
        if start_step:  # the interrupted epoch's running sums, so its history row is the uninterrupted one
            progress = dict(ckpt.get("epoch_progress") or {})
            if len(ckpt["rng"]) == dist.world_size:
                progress["rng"] = ckpt["rng"][dist.rank]
        log.info("resumed from %s: epoch %d, step %d of %d", ckpt_path, start_epoch, start_step, steps_per_epoch)
        del ckpt

    # buffers (CeiT's BatchNorm statistics) are synced from rank 0 before each evaluation and checkpoint
    # (distributed.sync_buffers), not at every forward
    t.train_model = wrap(model, dist, forward_sync_buffers=False)

    def one_step(m, images, targets):
        return train_step(m, images, targets, criterion, optimizer, scaler, amp_dtype, recipe["clip_grad"])

    # compiled (eager again, with a message, if compiling fails) or eager
    t.step = (gpu_defaults.compile_with_fallback(t.train_model, one_step, device, f"{cell.id} ({spec.model_name})")
              if fast.compile else lambda images, targets: one_step(t.train_model, images, targets))
    tracker, run_id = start_tracking(run, spec, opts, {
        "seed": seed, "world_size": dist.world_size, "local_batch": local_batch, "amp": str(amp_dtype),
        "compile": fast.compile, "init_from": opts.init_from, "params": n_params}, run_id)
    prepare = batch_preparer(device, device_transform, mixup_fn, seed, dist.rank)

    def checkpoint(epoch: int, step: int, epoch_progress: dict | None = None) -> None:
        """Everything needed to continue exactly (rank 0 writes; all ranks give their RNG)."""
        states = all_rng_states(dist)
        run.save({
            "model": unwrap(model).state_dict(), "model_ema": ema.module.state_dict() if ema else None,
            "model_name": spec.model_name, "model_kwargs": spec.model_kwargs,
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "epoch": epoch, "step": step, "num_updates": t.num_updates,
            "epoch_progress": epoch_progress, "total_epochs": total_epochs,
            "rng": states, "data": {"seed": seed, "global_batch": global_batch, "repeats": sampler.repeats},
            "elapsed_s": elapsed_before + time.time() - job_start, "history": history,
            "mlflow_run_id": run_id, "cell": cell.id, "seed": seed})

    log.info("training %s (%s, %.2fM params) for %d epochs x %d steps, batch %d (%d per process), lr %.3g",
             cell.id, spec.model_name, n_params / 1e6, total_epochs, steps_per_epoch, global_batch, local_batch,
             recipe["lr"])
    eval_every = 1 if opts.eval_every is None else opts.eval_every
    val: dict[str, float] | None = None
    with ending_run(tracker):
        for epoch in range(start_epoch, total_epochs):
            sums = train_one_epoch(t, loader, sampler, prepare, epoch, start_step, total_epochs, run, opts, progress,
                                   f"cell {cell.id} seed {seed}")
            progress, stopped_at = {}, sums.pop("stopped_at")
            # rank 0's buffers everywhere before anything is evaluated (sharded) or saved (rank 0's state)
            distributed.sync_buffers(model)
            if stopped_at is not None and stopped_at < steps_per_epoch:
                checkpoint(epoch, stopped_at, sums)
                raise Preempted(f"stopped by {stop.name}: checkpoint at epoch {epoch + 1}, step {stopped_at} of "
                                f"{steps_per_epoch} saved to {ckpt_path}")
            start_step = 0
            last_epoch = epoch + 1 == total_epochs
            val = None
            if last_epoch or (eval_every and (epoch + 1) % eval_every == 0):
                val = evaluate(model, val_loader, device, amp_dtype)  # unwrapped: no DDP collectives
            row = {"epoch": epoch + 1, "train_loss": sums["loss_sum"] / max(sums["loss_n"], 1),
                   "lr": optimizer.param_groups[0]["lr"], "epoch_time_s": sums["time_s"],
                   "images_per_s": sums["loss_n"] * global_batch / max(sums["time_s"], 1e-9),
                   **({f"val_{k}": v for k, v in val.items()} if val else {})}
            history.append(row)
            checkpoint(epoch + 1, 0)
            tracker.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch + 1)
            log.info("epoch %d/%d  train_loss %.4f  %s  lr %.3g  %.0f img/s  %.1f s", epoch + 1, total_epochs,
                     row["train_loss"], "  ".join(f"val_{k} {v:.3f}" for k, v in (val or {}).items()) or "(no eval)",
                     row["lr"], row["images_per_s"], sums["time_s"])
            if agreed(stop.requested, device) and not last_epoch:
                raise Preempted(f"stopped by {stop.name}: checkpoint at the end of epoch {epoch + 1} saved to {ckpt_path}")

        # ---- final metrics and result.json (written last) ----
        if val is None:  # resumed after the last epoch, or the loop ran no epoch
            val = evaluate(model, val_loader, device, amp_dtype)
        metrics_ema = evaluate(ema.module, val_loader, device, amp_dtype) if ema is not None else None
        wall = elapsed_before + time.time() - job_start
        result = runinfo.result_record(
            spec, seed, pe=pe_dict(model), params=n_params,
            measured={"metrics": val, **({"metrics_ema": metrics_ema} if metrics_ema else {}), "epochs": total_epochs},
            wall_time_s=wall, device_type=device.type, world_size=dist.world_size, checkpoint=ckpt_path,
            mlflow_run_id=run_id, init_from=opts.init_from, history=history)
        if dist.is_main:
            tracker.log_artifact(run.write_file(MODEL_CARD, model_card(result, recipe, spec.model_name,
                                                                       spec.model_kwargs)))
            if opts.log_checkpoint:
                tracker.log_artifact(ckpt_path, "checkpoint")
            result = run.publish(tracker, result, val, total_epochs)
            log.info("done: %s seed %d  top1 %.2f  top5 %.2f  loss %.4f  (%.1f s) -> %s", cell.id, seed,
                     val["top1"], val["top5"], val["loss"], wall, out / RESULT)
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
