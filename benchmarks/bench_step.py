"""One optimizer step of the mpvg training loop against timm's own train.py step, interleaved in one process.

Same model (the cell's, built by ``engine.build_model``: DeiT-Ti and Swin-Ti by default, the
paper recipe's drop-path), same recipe (AdamW with lr/wd/eps, the cosine schedule updated per
step, mixup/cutmix with label smoothing into ``SoftTargetCrossEntropy``, the recipe's clip_grad),
same batch of already-normalised images, same precision:

* ours: the body of ``mpvg.training.engine._train``'s step loop: ``timm.data.Mixup``,
  ``scheduler.step_update``, :func:`mpvg.training.engine.train_step` (autocast, backward, clip,
  update), the loss kept on the device;
* timm: ``train_one_epoch`` of timm's own ``train.py`` (imported from ``.fetched/timm_train.py``,
  never committed: ``curl -o .fetched/timm_train.py
  https://raw.githubusercontent.com/huggingface/pytorch-image-models/main/train.py``), over the
  same batches, with its ``ClassificationTask``, ``create_optimizer_v2``/``create_scheduler_v2``
  with the same values, ``Mixup`` and bf16 autocast as train.py sets them up (no prefetcher:
  batches are already on the device).

Each round runs ``--steps`` steps of each side, alternating the order; the medians of the per-step
times (CPU time of this process on CPU, where other jobs share the cores; wall time with CUDA
synchronisation on GPU) give

    ratio (ours/timm, images/s): X.XX      (goal >= 1.0)

    .venv/bin/python benchmarks/bench_step.py --families DeiT-Ti Swin-Ti --batch-size 8 --steps 2 --rounds 5
    .venv/bin/python benchmarks/bench_step.py --device cuda --precision bf16 --batch-size 256   # on a GPU
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import statistics
import sys
import time
from contextlib import suppress
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
TIMM_TRAIN = REPO / ".fetched" / "timm_train.py"


def load_timm_train(path: Path = TIMM_TRAIN):
    """timm's train.py as a module (its ``train_one_epoch``); a clear error when it is absent."""
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: the step benchmark runs timm's own train.py. Fetch it once with\n"
            f"  curl -o {path} https://raw.githubusercontent.com/huggingface/pytorch-image-models/main/train.py\n"
            "(it is never committed)")
    spec = importlib.util.spec_from_file_location("timm_train", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cell_spec(model: str, method: str = "MPVG", scale: str = "paper"):
    """The RunSpec of ``model``'s ImageNet cell for ``method`` at ``scale``."""
    from mpvg.config import expand_cells, load_params, resolve_run

    params = load_params(REPO / "params.yaml", [f"scale={scale}"])
    cell = next(c for c in expand_cells(params).values()
                if c.task == "in1k" and c.stage == "train" and c.model == model and c.method == method)
    return resolve_run(params, cell.id)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _clock(device: torch.device) -> float:
    return time.perf_counter() if device.type == "cuda" else time.process_time()


def build_sides(spec, device: torch.device, amp_dtype, timm_train) -> dict:
    """``{"ours": run(batches), "timm": run(batches)}``: each runs one optimizer step per batch."""
    import timm.data
    import timm.loss
    import timm.optim
    import timm.scheduler
    import timm.task

    from mpvg.data.classification import mixup_kwargs
    from mpvg.training.engine import build_model, param_groups, train_step

    recipe = spec.recipe
    torch.manual_seed(0)
    base = build_model(spec).to(device)
    sched_kw = dict(sched=recipe["sched"], num_epochs=recipe["epochs"], warmup_epochs=recipe["warmup_epochs"],
                    cooldown_epochs=recipe["cooldown_epochs"], min_lr=recipe["min_lr"], warmup_lr=recipe["warmup_lr"],
                    step_on_epochs=False, updates_per_epoch=1000)
    mix = mixup_kwargs(recipe, spec.num_classes)
    sides = {}

    # ours: the engine's step loop body
    model = copy.deepcopy(base).train()
    opt = timm.optim.create_optimizer_v2(param_groups(model, recipe), opt="adamw", lr=recipe["lr"],
                                         weight_decay=recipe["weight_decay"], eps=recipe["opt_eps"])
    sched, _ = timm.scheduler.create_scheduler_v2(opt, **sched_kw)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    mixup = timm.data.Mixup(**mix) if mix else None
    criterion = timm.loss.SoftTargetCrossEntropy() if mix else torch.nn.CrossEntropyLoss()
    state = {"updates": 0}

    def ours(batches):
        pending = []
        for images, targets in batches:
            if mixup is not None:
                images, targets = mixup(images, targets)
            sched.step_update(state["updates"])
            pending.append(train_step(model, images, targets, criterion, opt, scaler, amp_dtype,
                                      recipe["clip_grad"]).detach())
            state["updates"] += 1
        return torch.stack(pending).float().sum().item()  # the engine's one sync per log interval

    sides["ours"] = ours

    # timm: train.py's train_one_epoch with its own task, optimizer, scheduler, mixup and autocast
    t_model = copy.deepcopy(base).train()
    t_opt = timm.optim.create_optimizer_v2(t_model, opt="adamw", lr=recipe["lr"], weight_decay=recipe["weight_decay"],
                                           eps=recipe["opt_eps"])
    t_sched, _ = timm.scheduler.create_scheduler_v2(t_opt, **sched_kw)
    t_mixup = timm.data.Mixup(**mix) if mix else None
    t_loss = timm.loss.SoftTargetCrossEntropy() if mix else torch.nn.CrossEntropyLoss()
    task = timm.task.ClassificationTask(t_model, criterion=t_loss, device=device, verbose=False)
    amp_autocast = partial(torch.autocast, device_type=device.type, dtype=amp_dtype) if amp_dtype else suppress
    args = SimpleNamespace(mixup_off_epoch=0, prefetcher=False, distributed=False, grad_accum_steps=1,
                           channels_last=False, clip_grad=recipe["clip_grad"], clip_mode="norm", synchronize_step=False,
                           log_interval=10**9, save_images=False, recovery_interval=0, world_size=1, rank=0,
                           local_rank=0, naflex_loss_scale=None, variable_batch_loss_scale=None)
    epoch = {"n": 0}

    def timm_side(batches):
        out = timm_train.train_one_epoch(epoch["n"], t_model, batches, t_opt, args, task=task, device=device,
                                         lr_scheduler=t_sched, amp_autocast=amp_autocast, mixup_fn=t_mixup)
        epoch["n"] += 1
        return out["loss"]

    sides["timm"] = timm_side
    return sides


def compare(model: str, device: torch.device, precision: str, batch: int, steps: int, rounds: int, warmup: int = 1,
            timm_train=None, scale: str = "paper") -> dict:
    """Median seconds per step of each side over interleaved rounds, and ours/timm images/s."""
    timm_train = timm_train or load_timm_train()
    spec = cell_spec(model, scale=scale)
    size = spec.recipe["img_size"]
    amp_dtype = {"bf16": torch.bfloat16, "fp32": None}[precision]
    sides = build_sides(spec, device, amp_dtype, timm_train)
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(batch, 3, size, size, generator=gen).to(device),
                torch.randint(0, spec.num_classes, (batch,), generator=gen).to(device)) for _ in range(steps)]
    for run in sides.values():
        run(batches[:warmup])
    per_step: dict[str, list[float]] = {k: [] for k in sides}
    for r in range(rounds):
        for name in (list(sides) if r % 2 == 0 else list(reversed(sides))):
            _sync(device)
            t0 = _clock(device)
            sides[name](batches)
            _sync(device)
            per_step[name].append((_clock(device) - t0) / steps)
    med = {k: statistics.median(v) for k, v in per_step.items()}
    return {"model": model, "device": device.type, "precision": precision, "batch": batch, "steps": steps,
            "rounds": rounds, "ours_images_per_s": round(batch / med["ours"], 2),
            "timm_images_per_s": round(batch / med["timm"], 2), "ratio_ours_over_timm": round(med["timm"] / med["ours"], 3),
            "spread_ours_s": [round(min(per_step["ours"]), 4), round(max(per_step["ours"]), 4)],
            "spread_timm_s": [round(min(per_step["timm"]), 4), round(max(per_step["timm"]), 4)],
            "timer": "wall (cuda synchronised)" if device.type == "cuda" else "process CPU time"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", nargs="+", default=["DeiT-Ti", "Swin-Ti"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=2, help="optimizer steps per side per round")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds; medians count")
    ap.add_argument("--threads", type=int, default=1, help="torch threads on CPU (per core: 1)")
    ap.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    try:
        timm_train = load_timm_train()
    except FileNotFoundError as err:
        print(f"bench_step: {err}", file=sys.stderr)
        return 2
    rows = []
    for model in args.families:
        row = compare(model, device, args.precision, args.batch_size, args.steps, args.rounds, timm_train=timm_train)
        rows.append(row)
        print(json.dumps(row))
        print(f"{model}: ratio (ours/timm, images/s): {row['ratio_ours_over_timm']:.2f}", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
