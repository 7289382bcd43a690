#!/usr/bin/env python
"""Throughput (images/s) of the PE methods: training step and inference.

For each model (DeiT-Ti and T2T-ViT-7 by default) it measures a training step
(forward + cross-entropy + backward + AdamW step) of Default, PVG and MPVG, and inference
(forward under ``torch.inference_mode``) of Default, PVG, MPVG and MPVG with the Last-LN PE
folded into the head bias (:func:`mpvg.models.fold.fold_last_ln_pe`).  Variants are timed in
interleaved rounds (the median and the best round are reported) so that drifting machine load hits all alike;
the ratios MPVG/Default (training) and MPVG-folded/Default (inference) are printed at the end.

Examples::

    python benchmarks/bench_models.py --device cpu --batch-size 8 --out bench_out/cpu.csv
    python benchmarks/bench_models.py --device cpu --threads 1 --timer cpu --out bench_out/cpu.csv  # busy host
    python benchmarks/bench_models.py --device cuda --batch-size 256 --amp --out bench_out/gpu.json
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import mpvg.models  # noqa: E402,F401  (registers the models)
from mpvg.models.fold import fold_last_ln_pe  # noqa: E402
from mpvg.models.params import count_params  # noqa: E402
from mpvg.models.registry import PAPER_MODELS, method_key, paper_name  # noqa: E402

TRAIN_VARIANTS = ("Default", "PVG", "MPVG")
INFER_VARIANTS = ("Default", "PVG", "MPVG", "MPVG-folded")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--models", nargs="+", default=["DeiT-Ti", "T2T-ViT-7"],
                   help=f"paper or timm names (default: DeiT-Ti T2T-ViT-7; any of {list(PAPER_MODELS)})")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--train-batch-size", type=int, default=None, help="default: --batch-size")
    p.add_argument("--img-size", type=int, default=None, help="default: each model's own")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--iters", type=int, default=5, help="timed iterations per round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median counts")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations per variant first")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast (CUDA)")
    p.add_argument("--compile", action="store_true", help="torch.compile every variant")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--timer", choices=("wall", "cpu"), default="wall",
                   help="wall: wall-clock time; cpu: this process's CPU time (with --threads 1 on a "
                   "CPU shared with other jobs, it is not inflated by time-sharing)")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-infer", action="store_true")
    p.add_argument("--out", type=Path, default=None, help="write results to .csv or .json")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(model: str, method: str, args, device: torch.device):
    import timm

    kw = dict(num_classes=args.num_classes, pe_method=method_key(method))
    if args.img_size:
        kw["img_size"] = args.img_size
    return timm.create_model(PAPER_MODELS[model], **kw).to(device)


def make_train_step(model, args, device):
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    fn = torch.compile(model) if args.compile else model
    loss_fn = torch.nn.CrossEntropyLoss()

    def step(x, y):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            loss = loss_fn(fn(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def make_infer_step(model, args, device):
    model.eval()
    fn = torch.compile(model) if args.compile else model

    def step(x, y=None):
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            fn(x)

    return step


def time_variants(steps: dict, x, y, args, device) -> dict[str, tuple[float, float]]:
    """(median, best) images/s of each step function over interleaved rounds."""
    for step in steps.values():
        for _ in range(args.warmup):
            step(x, y)
    _sync(device)
    clock = time.process_time if args.timer == "cpu" else time.perf_counter
    if args.timer == "cpu" and device.type != "cpu":
        raise SystemExit("--timer cpu is for --device cpu")
    per_round = {k: [] for k in steps}
    for r in range(args.rounds):
        order = list(steps) if r % 2 == 0 else list(reversed(steps))  # alternate the order
        for name in order:
            _sync(device)
            t0 = clock()
            for _ in range(args.iters):
                steps[name](x, y)
            _sync(device)
            per_round[name].append(x.shape[0] * args.iters / (clock() - t0))
    return {k: (statistics.median(v), max(v)) for k, v in per_round.items()}


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rows = []
    env = dict(device=str(device), device_name=(torch.cuda.get_device_name(device) if device.type == "cuda"
                                                else platform.processor() or platform.machine()),
               threads=torch.get_num_threads(), torch=torch.__version__, amp=args.amp, compile=args.compile,
               timer=args.timer)
    for model_arg in args.models:
        model = paper_name(model_arg)
        models = {m: build(model, m, args, device) for m in ("Default", "PVG", "MPVG")}
        s = args.img_size or models["Default"].pretrained_cfg["input_size"][-1]
        params = {m: count_params(v) for m, v in models.items()}
        if not args.skip_train:
            bs = args.train_batch_size or args.batch_size
            x = torch.randn(bs, 3, s, s, device=device)
            y = torch.randint(0, args.num_classes, (bs,), device=device)
            steps = {m: make_train_step(models[m], args, device) for m in TRAIN_VARIANTS}
            res = time_variants(steps, x, y, args, device)
            for m in TRAIN_VARIANTS:
                rows.append(dict(model=model, mode="train", variant=m, batch_size=bs, img_size=s,
                                 images_per_s=round(res[m][0], 3), images_per_s_best=round(res[m][1], 3),
                                 params=params[m], **env))
            del steps
        if not args.skip_infer:
            x = torch.randn(args.batch_size, 3, s, s, device=device)
            infer_models = dict(models)
            infer_models["MPVG-folded"] = fold_last_ln_pe(models["MPVG"].eval())
            params["MPVG-folded"] = count_params(infer_models["MPVG-folded"])
            steps = {m: make_infer_step(infer_models[m], args, device) for m in INFER_VARIANTS}
            res = time_variants(steps, x, None, args, device)
            for m in INFER_VARIANTS:
                rows.append(dict(model=model, mode="infer", variant=m, batch_size=args.batch_size, img_size=s,
                                 images_per_s=round(res[m][0], 3), images_per_s_best=round(res[m][1], 3),
                                 params=params[m], **env))
        del models

    # ratios to Default
    base = {(r["model"], r["mode"]): r for r in rows if r["variant"] == "Default"}
    for r in rows:
        b = base[(r["model"], r["mode"])]
        r["ratio_to_default"] = round(r["images_per_s"] / b["images_per_s"], 4)
        r["ratio_to_default_best"] = round(r["images_per_s_best"] / b["images_per_s_best"], 4)

    print(f"{'model':<10} {'mode':<6} {'variant':<12} {'img/s med':>10} {'/Default':>9} {'img/s best':>11} "
          f"{'/Default':>9}")
    for r in rows:
        print(f"{r['model']:<10} {r['mode']:<6} {r['variant']:<12} {r['images_per_s']:>10.2f} "
              f"{r['ratio_to_default']:>9.3f} {r['images_per_s_best']:>11.2f} {r['ratio_to_default_best']:>9.3f}")
    print(f"# device={env['device']} ({env['device_name']}), threads={env['threads']}, timer={args.timer}, amp={args.amp}, "
          f"compile={args.compile}, {args.iters} iters x {args.rounds} interleaved rounds (median and best round)")

    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        if args.out.suffix == ".json":
            args.out.write_text(json.dumps(rows, indent=1) + "\n")
        else:
            with args.out.open("w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)
        print(f"# wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
