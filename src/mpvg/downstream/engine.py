"""Training and evaluation loops of the downstream cells (``mpvg detect`` / ``mpvg segment``).

One iteration-based loop serves both tasks (the COCO 3x schedule is 36 epochs of
``len(train) // batch`` iterations, ADE20K's is 160k iterations); what differs is in a
:class:`Task` (datasets, model, loss, evaluation).  The plumbing is the run layer's
(:mod:`mpvg.run`), as for classification: the data order is a function of ``(seed, epoch)``
and each sample's augmentation of ``(seed, epoch, position)`` (:mod:`mpvg.run.seeding`),
checkpoints are atomic (:mod:`mpvg.run.checkpoint`), SIGTERM / SIGUSR1 save a checkpoint and
exit with ``REQUEUE_EXIT_CODE``, tracking is :mod:`mpvg.tracking`, ``result.json`` is written
last (:mod:`mpvg.run.folder`).  The learning
rate is a pure function of the iteration (MMCV's warmup + step / poly policies), so a resumed
run continues the same schedule.

Recipe keys (params.yaml ``recipes.coco_maskrcnn`` / ``recipes.ade20k_upernet``) that this
module reads beyond the typed ones, with their defaults (the ViT-Adapter configs), are in
:data:`DETECTION_DEFAULTS` and :data:`SEGMENTATION_DEFAULTS`; docs/downstream.md lists them.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch.utils.data import DataLoader

from mpvg import runinfo
from mpvg.run import distributed
from mpvg.run.checkpoint import load_checkpoint
from mpvg.run.folder import NonFiniteLossError, Preempted, RunFolder, ending_run, load_start_point, open_run
from mpvg.run.layout import RESULT
from mpvg.run.loop import (RunOptions, all_rng_states, count_params, optimizer_step, pe_dict, progress_bar, resolve_amp,
                           start_tracking, unwrap, wrap)
from mpvg.run.seeding import seed_epoch, seed_everything, train_loader

log = logging.getLogger("mpvg.downstream")

# Recipe keys with their ViT-Adapter / MMDetection / MMSegmentation values when absent.
DETECTION_DEFAULTS: dict[str, Any] = {
    "betas": [0.9, 0.999],
    "crop_branch_sides": None,     # None: (400, 500, 600) x max(train_short_sides) / 800
    "crop_branch_range": None,     # None: (384, 600) x the same factor
    "window_attn": [i % 3 != 2 for i in range(12)],  # windowed attention but in blocks 2, 5, 8, 11
    "window_size": 14,
    "layer_scale": True,
    "fpn_channels": 256, "box_fc_dim": 1024, "mask_head_dim": 256,
    "eval_interval_epochs": 1,     # MMDetection evaluates every epoch
    "checkpoint_interval": 0,      # iterations between checkpoints; 0: every epoch
}
SEGMENTATION_DEFAULTS: dict[str, Any] = {
    "betas": [0.9, 0.999],
    "window_attn": None, "window_size": 14,
    "layer_scale": True,
    "channels": 512, "aux_channels": 256, "aux_weight": 0.4,
    "photometric": True,
    "test_crop": None,             # None: crop_size (slide inference window)
    "test_stride": None,           # None: crop_size * 2 / 3 (341 for 512)
    "eval_interval": 16000,        # iterations
    "checkpoint_interval": 1000,   # iterations
}


def recipe_value(recipe: Mapping, key: str, defaults: Mapping) -> Any:
    return recipe[key] if key in recipe else defaults[key]


# ------------------------------------------------------------------------------ model
def pretrain_img_size(state_dict: Mapping[str, torch.Tensor]) -> int:
    """The classification resolution a DeiT checkpoint was trained at: PE grid x patch size."""
    pos, proj = state_dict.get("pos_embed"), state_dict.get("patch_embed.proj.weight")
    if pos is None or proj is None:
        raise ValueError("pretrained checkpoint has no pos_embed / patch_embed.proj.weight; expected a DeiT "
                         "checkpoint of `mpvg train`")
    n = pos.shape[1]
    for prefix in ((1, 0) if "cls_token" in state_dict else (0, 1)):
        side = math.isqrt(n - prefix)
        if side * side == n - prefix:
            return side * int(proj.shape[-1])
    raise ValueError(f"pretrained pos_embed has {n} positions; cannot tell its square grid")


def backbone_kwargs(spec, task: str) -> dict:
    """``build_vit_adapter`` keyword arguments of a downstream RunSpec (without weights)."""
    recipe = spec.recipe
    defaults = DETECTION_DEFAULTS if task == "detect" else SEGMENTATION_DEFAULTS
    mk = dict(spec.model_kwargs)
    method, pe_overrides = mk.pop("pe_method"), mk.pop("pe_overrides", {})
    mk.pop("drop_path_rate", None)
    depth = int(mk.get("depth", 12))
    window_attn = recipe_value(recipe, "window_attn", defaults)
    if window_attn is not None and len(window_attn) != depth:
        raise ValueError(f"recipe window_attn has {len(window_attn)} entries; the backbone has {depth} blocks")
    return dict(method=method, pe_overrides=pe_overrides, model_name=spec.model_name, arch_overrides=mk,
                vit_drop_path=recipe.get("drop_path", 0.1), window_attn=window_attn,
                window_size=recipe_value(recipe, "window_size", defaults),
                layer_scale=recipe_value(recipe, "layer_scale", defaults),
                vit_feature="last" if task == "detect" else "per_stage", **dict(recipe.get("adapter", {})))


def build_task_model(spec, task: str, num_classes: int, pretrained: Mapping | None,
                     pretrain_size: int | None = None) -> torch.nn.Module:
    """Mask R-CNN or UperNet on a ViT-Adapter whose DeiT carries the cell's PE method.

    ``pretrained``: the ImageNet state dict (loaded and verified); without it the DeiT is
    built at ``pretrain_size`` so that a downstream checkpoint's PE fits.
    """
    from mpvg.downstream.adapter import build_vit_adapter

    kw = backbone_kwargs(spec, task)
    kw["pretrain_img_size"] = pretrain_img_size(pretrained) if pretrained is not None else int(pretrain_size or 224)
    adapter = build_vit_adapter(pretrained=pretrained, **kw)
    recipe = spec.recipe
    if task == "detect":
        from mpvg.downstream.detection import build_mask_rcnn

        d = DETECTION_DEFAULTS
        return build_mask_rcnn(adapter, num_classes, min_size=recipe["test_short_side"], max_size=recipe["max_size"],
                               fpn_channels=recipe_value(recipe, "fpn_channels", d),
                               box_fc_dim=recipe_value(recipe, "box_fc_dim", d),
                               mask_head_dim=recipe_value(recipe, "mask_head_dim", d))
    from mpvg.downstream.segmentation import build_upernet

    d = SEGMENTATION_DEFAULTS
    return build_upernet(adapter, num_classes, channels=recipe_value(recipe, "channels", d),
                         aux_channels=recipe_value(recipe, "aux_channels", d),
                         aux_weight=recipe_value(recipe, "aux_weight", d))


# ------------------------------------------------------------------------------ optimizer
def _vit_layer_id(name: str, num_layers: int) -> int:
    """BEiT/ViT-Adapter layer id for layer-wise lr decay: PE and patch embedding 0, block
    ``i`` (and the LN' that feeds it, ``pe.norms.i``) ``i + 1``, everything else (adapter,
    heads) ``num_layers + 1``."""
    m = re.search(r"(?:^|\.)vit\.(.*)$", name)
    if m is None:
        return num_layers + 1
    rest = m.group(1)
    if rest.startswith(("pos_embed", "patch_embed", "cls_token")):
        return 0
    m = re.match(r"(?:blocks|pe\.norms)\.(\d+)\.", rest)
    return int(m.group(1)) + 1 if m else num_layers + 1


def param_groups(model: torch.nn.Module, recipe: Mapping[str, Any], num_layers: int) -> list[dict]:
    """AdamW groups as the ViT-Adapter configs build them.

    * ``layer_decay`` set (ADE20K, ``LayerDecayOptimizerConstructor``): lr x
      ``decay ** (num_layers + 1 - layer_id)``; no weight decay on 1-D tensors and biases
      (``pos_embed`` and ``level_embed`` are decayed, as that constructor does);
    * otherwise (COCO, MMCV ``custom_keys`` with ``decay_mult=0``): no weight decay on any
      parameter whose name contains one of ``no_decay_keys``.
    """
    decay_rate = recipe.get("layer_decay")
    keys = list(recipe.get("no_decay_keys") or [])
    groups: dict[tuple[float, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if decay_rate:
            no_decay = p.ndim == 1 or name.endswith(".bias")
            scale = float(decay_rate) ** (num_layers + 1 - _vit_layer_id(name, num_layers))
        else:
            no_decay = any(k in name for k in keys)
            scale = 1.0
        wd = 0.0 if no_decay else float(recipe["weight_decay"])
        groups.setdefault((wd, scale), []).append(p)
    return [{"params": ps, "weight_decay": wd, "lr_scale": scale} for (wd, scale), ps in groups.items()]


def lr_factor(it: int, recipe: Mapping[str, Any], total_iters: int, iters_per_epoch: int) -> float:
    """The lr multiplier at iteration ``it`` (MMCV: linear warmup on top of step or poly)."""
    if "lr_steps" in recipe:  # step policy by epoch (3x: x0.1 at 27 and 33)
        epoch = it // max(iters_per_epoch, 1)
        regular = float(recipe.get("lr_gamma", 0.1)) ** sum(epoch >= s for s in recipe["lr_steps"])
    else:  # poly by iteration
        base, min_lr = float(recipe["lr"]), float(recipe.get("min_lr", 0.0))
        frac = (1 - it / total_iters) ** float(recipe.get("poly_power", 1.0))
        regular = ((base - min_lr) * frac + min_lr) / base if base > 0 else 0.0
    warmup = int(recipe.get("warmup_iters", 0))
    if it < warmup:
        k = (1 - it / warmup) * (1 - float(recipe.get("warmup_ratio", 0.001)))
        return regular * (1 - k)
    return regular


# ------------------------------------------------------------------------------ tasks
@dataclasses.dataclass
class Task:
    """What differs between detection and segmentation."""

    name: str                       # "detect" | "segment"
    train_set: Any
    val_set: Any
    num_classes: int
    collate: Callable
    loss: Callable                  # (model, batch, device) -> dict of losses
    evaluate: Callable              # (model, dataset, device, amp_dtype, dist, recipe, quiet) -> metrics
    metric_keys: tuple[str, ...]


def _check_stage(spec, task: str) -> None:
    stage = {"detect": "detect", "segment": "segment"}[task]
    if spec.cell.stage != stage:
        raise ValueError(f"cell {spec.cell.id} is a {spec.cell.stage} cell; `mpvg {task}` runs {stage} cells "
                         f"(e.g. {'coco' if task == 'detect' else 'ade20k'}-deit_ti-mpvg)")


def detection_task(spec, train: bool = True) -> Task:
    from mpvg.data.coco import CocoInstances, DetectionTrainTransform, collate_detection

    r = spec.recipe
    factor = max(r["train_short_sides"]) / 800.0
    sides = recipe_value(r, "crop_branch_sides", DETECTION_DEFAULTS) or [round(s * factor) for s in (400, 500, 600)]
    crange = recipe_value(r, "crop_branch_range", DETECTION_DEFAULTS) or [round(s * factor) for s in (384, 600)]
    transform = DetectionTrainTransform(r["train_short_sides"], r["max_size"], r["crop_size"], sides, crange)
    train_set = CocoInstances(spec.dataset_root, "train", transform) if train else None
    val_set = CocoInstances(spec.dataset_root, "val", train=False)

    def loss(model, batch, device):
        images, targets = batch
        images = [im.to(device, non_blocking=True) for im in images]
        targets = [{k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()}
                   for t in targets]
        return model(images, targets)

    return Task("detect", train_set, val_set, val_set.num_classes, collate_detection, loss, evaluate_detection,
                ("bbox_ap", "segm_ap"))


def segmentation_task(spec, train: bool = True) -> Task:
    from mpvg.data.ade20k import ADE20KDataset, SegTestTransform, SegTrainTransform, collate_segmentation

    r = spec.recipe
    transform = SegTrainTransform(r["img_scale"], r["ratio_range"], r["crop_size"], r["cat_max_ratio"],
                                  photometric=recipe_value(r, "photometric", SEGMENTATION_DEFAULTS))
    train_set = ADE20KDataset(spec.dataset_root, "train", transform) if train else None
    val_set = ADE20KDataset(spec.dataset_root, "val", SegTestTransform(r["img_scale"]))

    def loss(model, batch, device):
        images, labels, _ = batch
        return model(images.to(device, non_blocking=True), labels.to(device, non_blocking=True))

    return Task("segment", train_set, val_set, spec.num_classes, collate_segmentation, loss, evaluate_segmentation,
                ("miou",))


def build_task(spec, task: str, train: bool = True) -> Task:
    _check_stage(spec, task)
    from mpvg.data import check_dataset

    for split in ("train", "val") if train else ("val",):
        check_dataset(spec.dataset, spec.dataset_root, split)
    return detection_task(spec, train) if task == "detect" else segmentation_task(spec, train)


# ------------------------------------------------------------------------------ evaluation
def _shard_loader(dataset, dist, workers: int, collate) -> DataLoader:
    from mpvg.data.classification import ShardSampler

    return DataLoader(dataset, batch_size=1, sampler=ShardSampler(len(dataset), dist.world_size, dist.rank),
                      num_workers=workers, collate_fn=collate, generator=torch.Generator())


@torch.no_grad()
def evaluate_detection(model, dataset, device, amp_dtype, dist, recipe, quiet=True, workers=0) -> dict[str, float]:
    """COCO box and mask AP (0-100) on ``dataset`` (rank-sharded, evaluated on rank 0)."""
    from mpvg.data.coco import collate_detection
    from mpvg.downstream.detection import coco_evaluate, to_coco_results

    model.eval()
    results = []
    loader = _shard_loader(dataset, dist, workers, collate_detection)
    for images, targets in _iter_progress(loader, "eval", quiet or not dist.is_main):
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            outputs = model([im.to(device) for im in images])
        for t, o in zip(targets, outputs):
            results.extend(to_coco_results(t["image_id"], o, dataset.label_to_cat))
    if dist.distributed:
        gathered = [None] * dist.world_size
        torch.distributed.all_gather_object(gathered, results)
        results = [r for part in gathered for r in part]
    metrics = coco_evaluate(dataset.coco, results, dataset.ids) if dist.is_main else None
    return distributed.broadcast_object(metrics)


@torch.no_grad()
def evaluate_segmentation(model, dataset, device, amp_dtype, dist, recipe, quiet=True, workers=0) -> dict[str, float]:
    """mIoU (and mAcc, aAcc; 0-100) on ``dataset`` with sliding-window inference."""
    from mpvg.downstream.segmentation import IoUAccumulator, predict_label

    model.eval()
    crop = recipe_value(recipe, "test_crop", SEGMENTATION_DEFAULTS) or recipe["crop_size"]
    stride = recipe_value(recipe, "test_stride", SEGMENTATION_DEFAULTS) or int(crop * 2 / 3)
    acc = IoUAccumulator(unwrap(model).num_classes)
    loader = _shard_loader(dataset, dist, workers, _single)
    for image, label, _ in _iter_progress(loader, "eval", quiet or not dist.is_main):
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            pred = predict_label(model, image[None].to(device), label.shape, crop, stride)
        acc.update(pred[0].cpu(), label)
    acc.all_reduce()
    return acc.compute()


def _single(batch):
    return batch[0]  # evaluation images differ in size: one at a time


def _iter_progress(loader, desc: str, quiet: bool):
    bar = progress_bar(len(loader), 0, desc, not quiet)
    for item in loader:
        yield item
        bar.update(1)
    bar.close()


# ------------------------------------------------------------------------------ training
def train(spec, task_name: str, opts: RunOptions) -> dict[str, Any]:
    """Fine-tune one detection / segmentation cell for one seed; returns what result.json holds.

    The run folder's life cycle is :func:`mpvg.run.folder.open_run`, as for classification. Starts
    from ``opts.init_from``, else the cell's planned ImageNet checkpoint (same seed).
    Raises :class:`Preempted` after checkpointing on a stop request and :class:`NonFiniteLossError`
    when the loss is NaN/inf.
    """
    from mpvg.signature import cell_inputs

    _check_stage(spec, task_name)
    path = opts.init_from or spec.init_checkpoint(opts.seed)
    if path is None:
        raise ValueError(f"cell {spec.cell.id} has no init_from; pass --pretrained CKPT")
    if not Path(path).is_file():
        raise FileNotFoundError(f"pretrained checkpoint {path} does not exist; train cell {spec.cell.init_from} "
                                f"seed {opts.seed} first (`mpvg train --cell {spec.cell.init_from} --seed {opts.seed}`) "
                                "or pass --pretrained")
    state, init_signature = load_start_point(path, opts.init_expected)
    inputs = cell_inputs(spec, opts.seed, init_signature)
    with open_run(opts.out_dir, inputs, opts.device, opts.resume, opts.on_change, state,
                  retrain=opts.retrain) as run:
        if run.finished is not None:
            return run.finished
        return _train(spec, task_name, opts, run, Path(path))


def eval_every_iters(recipe: Mapping[str, Any], task_name: str, ipe: int, opts: RunOptions) -> int:
    """Iterations between evaluations: ``opts.eval_every`` when given, else the recipe's (detection
    counts it in epochs, MMDetection's ``interval``); 0: only at the end."""
    if opts.eval_every is not None:
        return opts.eval_every
    if task_name == "detect":
        return int(recipe_value(recipe, "eval_interval_epochs", DETECTION_DEFAULTS)) * ipe
    return int(recipe_value(recipe, "eval_interval", SEGMENTATION_DEFAULTS))


def build_optimizer(model: torch.nn.Module, recipe: Mapping[str, Any], defaults: Mapping[str, Any]):
    """AdamW over :func:`param_groups`; each group's ``base_lr`` is what :func:`lr_factor` scales."""
    groups = param_groups(model, recipe, _adapter_of(model).depth)
    optimizer = torch.optim.AdamW(groups, lr=float(recipe["lr"]), betas=tuple(recipe_value(recipe, "betas", defaults)),
                                  weight_decay=float(recipe["weight_decay"]))
    for g in optimizer.param_groups:
        g["base_lr"] = float(recipe["lr"]) * g["lr_scale"]
    return optimizer


def _train(spec, task_name: str, opts: RunOptions, run: RunFolder, init_path: Path) -> dict[str, Any]:
    from mpvg.models.checkpoint import unwrap_state_dict

    dist, out, stop, job_start = run.dist, run.out, run.stop, run.job_start
    recipe, device, seed, cell = spec.recipe, dist.device, opts.seed, spec.cell
    ckpt_path = run.checkpoint_path
    task = build_task(spec, task_name, train=True)
    global_batch = int(recipe["batch_size"])
    local_batch = global_batch // dist.world_size
    workers = recipe.get("workers", 0) if opts.num_workers is None else opts.num_workers
    sampler, loader = train_loader(task.train_set, global_batch, seed, dist, workers, collate=task.collate)
    ipe = sampler.steps_per_epoch
    total_iters = int(recipe["epochs"]) * ipe if task_name == "detect" else int(recipe["iters"])
    defaults = DETECTION_DEFAULTS if task_name == "detect" else SEGMENTATION_DEFAULTS
    ckpt_every = int(recipe_value(recipe, "checkpoint_interval", defaults)) or ipe
    eval_every = eval_every_iters(recipe, task_name, ipe, opts)

    sd = unwrap_state_dict(run.init_state)
    run.init_state = None
    seed_everything(seed)
    pretrain_size = pretrain_img_size(sd)
    model = build_task_model(spec, task_name, task.num_classes, sd)
    del sd
    if dist.distributed and device.type == "cuda":  # BN statistics over the global batch (SyncBN is CUDA-only)
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    n_params = count_params(model)
    optimizer = build_optimizer(model, recipe, defaults)
    amp_dtype = resolve_amp(opts.amp, recipe, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    start_it, elapsed_before, history, run_id, rng_states = 0, 0.0, [], None, None
    if run.resume is not None:  # open_run checked that it holds a run of these very settings
        ckpt, run.resume = run.resume, None
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        start_it, elapsed_before = int(ckpt["iter"]), float(ckpt["elapsed_s"])
        history, run_id = list(ckpt["history"]), ckpt.get("mlflow_run_id")
        if start_it % ipe and len(ckpt["rng"]) == dist.world_size:
            rng_states = ckpt["rng"][dist.rank]
        log.info("resumed from %s at iteration %d of %d", ckpt_path, start_it, total_iters)
        del ckpt

    train_model = wrap(model, dist)
    tracker, run_id = start_tracking(run, spec, opts, {
        "seed": seed, "world_size": dist.world_size, "local_batch": local_batch, "amp": str(amp_dtype),
        "pretrained": str(init_path), "params": n_params, "total_iters": total_iters}, run_id)

    def checkpoint(it: int) -> None:
        run.save({
            "model": unwrap(model).state_dict(), "model_name": spec.model_name,
            "model_kwargs": spec.model_kwargs, "task": task_name, "num_classes": task.num_classes,
            "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "iter": it,
            "epoch": it // ipe, "step": it % ipe, "rng": all_rng_states(dist),
            "data": {"seed": seed, "global_batch": global_batch},
            "elapsed_s": elapsed_before + time.time() - job_start, "history": history,
            "mlflow_run_id": run_id, "cell": cell.id, "seed": seed, "pretrained": str(init_path),
            "pretrain_img_size": pretrain_size})

    def run_eval(it: int) -> dict[str, float]:
        metrics = task.evaluate(unwrap(model), task.val_set, device, amp_dtype, dist, recipe, opts.quiet, workers)
        history.append({"iter": it, **metrics})
        tracker.log_metrics({f"val_{k}": v for k, v in metrics.items()}, step=it)
        log.info("iteration %d/%d  %s", it, total_iters, "  ".join(f"{k} {v:.2f}" for k, v in metrics.items()))
        return metrics

    log.info("%s %s seed %d: %.2fM params, %d iterations (%d per epoch), batch %d (%d per process), lr %.3g, "
             "pretrained %s", task_name, cell.id, seed, n_params / 1e6, total_iters, ipe, global_batch,
             local_batch, recipe["lr"], init_path)
    with ending_run(tracker):
        it = start_it
        pbar = progress_bar(total_iters, start_it, f"{task_name} {cell.id}", not opts.quiet and dist.is_main)
        t0, pending, last_sync = time.time(), [], start_it
        while it < total_iters:
            epoch, step = divmod(it, ipe)
            sampler.set_epoch(epoch, step)
            seed_epoch(seed, epoch, dist.rank, step, rng_states)
            rng_states = None
            train_model.train()
            for batch in loader:
                for g in optimizer.param_groups:
                    g["lr"] = g["base_lr"] * lr_factor(it, recipe, total_iters, ipe)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    losses = task.loss(train_model, batch, device)
                loss = sum(losses.values())
                optimizer_step(loss, model, optimizer, scaler, recipe.get("clip_grad"))
                it += 1
                pending.append(torch.stack([loss.detach().float()] + [v.detach().float() for v in losses.values()]))
                boundary = it % ipe == 0 or it == total_iters
                sync = it % opts.log_interval == 0 or boundary or it % ckpt_every == 0 or \
                    (eval_every and it % eval_every == 0) or (not dist.distributed and stop.requested)
                if not sync:
                    continue
                values = torch.stack(pending).cpu()
                flags = torch.tensor([float(not torch.isfinite(values).all()), float(stop.requested)],
                                     device=device)
                distributed.all_reduce(flags, op="max")
                if flags[0]:
                    kept = (f"the last checkpoint ({ckpt_path}) is unchanged" if ckpt_path.exists()
                            else "no checkpoint was written yet")
                    raise NonFiniteLossError(f"cell {cell.id} seed {seed}: non-finite loss before iteration {it}; "
                                             f"{kept}; lower the lr or set clip_grad")
                mean = values.mean(0)
                row = {"train_loss": float(mean[0]), **{k: float(v) for k, v in zip(losses, mean[1:])},
                       "lr": optimizer.param_groups[0]["lr"] / optimizer.param_groups[0]["lr_scale"]}
                tracker.log_metrics(row, step=it)
                log.info("iteration %d/%d  loss %.4f  lr %.3g", it, total_iters, row["train_loss"], row["lr"])
                pending = []
                pbar.update(it - last_sync)
                last_sync = it
                pbar.set_postfix(loss=f"{row['train_loss']:.3f}", lr=f"{row['lr']:.2e}",
                                 it_s=f"{(it - start_it) / max(time.time() - t0, 1e-9):.2f}")
                if eval_every and it % eval_every == 0 and it < total_iters:
                    run_eval(it)
                    train_model.train()
                if it % ckpt_every == 0 or it == total_iters or flags[1]:
                    checkpoint(it)
                if flags[1] and it < total_iters:
                    raise Preempted(f"stopped by {stop.name}: checkpoint at iteration {it} of {total_iters} "
                                    f"saved to {ckpt_path}")
                if it >= total_iters or boundary:
                    break
        pbar.close()
        if history and history[-1]["iter"] == total_iters:  # resumed after the final evaluation
            metrics = {k: v for k, v in history[-1].items() if k != "iter"}
        else:
            metrics = run_eval(total_iters)
            checkpoint(total_iters)  # the final evaluation goes into the checkpoint's history
        wall = elapsed_before + time.time() - job_start
        result = runinfo.result_record(
            spec, seed, pe=pe_dict(_adapter_of(model).vit), params=n_params,
            measured={"metrics": {k: metrics[k] for k in task.metric_keys},
                      "metrics_extra": {k: v for k, v in metrics.items() if k not in task.metric_keys},
                      "epochs": math.ceil(total_iters / ipe), "iters": total_iters},
            wall_time_s=wall, device_type=device.type, world_size=dist.world_size, checkpoint=ckpt_path,
            mlflow_run_id=run_id, init_from=init_path, history=history)
        if dist.is_main:
            result = run.publish(tracker, result, metrics, total_iters)
            log.info("done: %s seed %d  %s  (%.1f s) -> %s", cell.id, seed,
                     "  ".join(f"{k} {metrics[k]:.2f}" for k in task.metric_keys), wall, out / RESULT)
        return result

def _adapter_of(model: torch.nn.Module):
    from mpvg.downstream.adapter import ViTAdapter

    return next(m for m in unwrap(model).modules() if isinstance(m, ViTAdapter))


def evaluate_checkpoint(spec, task_name: str, checkpoint: str | os.PathLike, device: str = "auto",
                        amp: str = "auto", num_workers: int | None = None, quiet: bool = True) -> dict[str, Any]:
    """Metrics of a ``mpvg detect|segment train`` checkpoint on the cell's validation set."""
    dist = distributed.setup(device)
    try:
        task = build_task(spec, task_name, train=False)
        ckpt = load_checkpoint(checkpoint)
        from mpvg.models.checkpoint import unwrap_state_dict

        sd = unwrap_state_dict(ckpt)
        if ckpt.get("task") not in (None, task_name):
            raise ValueError(f"{checkpoint} is a {ckpt['task']} checkpoint, not {task_name}")
        seed_everything(0)
        model = build_task_model(spec, task_name, task.num_classes, None, ckpt.get("pretrain_img_size"))
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise ValueError(f"{checkpoint} does not fit cell {spec.cell.id}: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        model.to(dist.device)
        workers = spec.recipe.get("workers", 0) if num_workers is None else num_workers
        metrics = task.evaluate(model, task.val_set, dist.device, resolve_amp(amp, spec.recipe, dist.device), dist,
                                spec.recipe, quiet, workers)
        return {"cell": spec.cell.id, "checkpoint": str(checkpoint), "metrics": metrics,
                "device": dist.device.type, "world_size": dist.world_size, "num_images": len(task.val_set)}
    finally:
        distributed.cleanup()
