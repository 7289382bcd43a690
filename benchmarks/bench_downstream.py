#!/usr/bin/env python
"""Training-step speed (iterations/s) of the downstream models at the paper's architecture.

One Mask R-CNN step (ViT-Adapter-Ti + FPN, windowed attention as the 3x config, full
MMDetection heads) and one UperNet step (ViT-Adapter-Ti, 512-channel UPerHead + FCN
auxiliary head): forward, losses, backward and AdamW, on synthetic images with a few boxes /
random labels.  Paper crops: 1024 (COCO, Table 8) and 512 (ADE20K, Table 9); on CPU the
default crop is 256 so a step takes seconds, not minutes.  Per-GPU batch 2 (the ViT-Adapter
configs' ``samples_per_gpu``).  Every PE method builds the same network up to its LN' chain,
so one method (MPVG) is timed unless ``--methods`` asks for more.

Examples::

    python benchmarks/bench_downstream.py --device cpu --threads 2
    python benchmarks/bench_downstream.py --device cuda --amp --out bench_out/downstream_gpu.json
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mpvg.downstream.adapter import DETECTION_WINDOW_ATTN, build_vit_adapter  # noqa: E402
from mpvg.downstream.detection import build_mask_rcnn  # noqa: E402
from mpvg.downstream.segmentation import build_upernet  # noqa: E402

PAPER_CROP = {"detect": 1024, "segment": 512}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tasks", nargs="+", choices=("detect", "segment"), default=["detect", "segment"])
    p.add_argument("--methods", nargs="+", default=["mpvg"], help="PE methods (default, lape, pvg, mpvg)")
    p.add_argument("--crop", type=int, default=None,
                   help="square crop (default: 1024 detect / 512 segment on CUDA, 256 on CPU)")
    p.add_argument("--batch-size", type=int, default=2, help="images per step (default 2)")
    p.add_argument("--iters", type=int, default=5, help="timed steps (the median counts)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--num-classes", type=int, default=None, help="default 80 (COCO) / 150 (ADE20K)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(task: str, method: str):
    if task == "detect":
        adapter = build_vit_adapter(method, window_attn=DETECTION_WINDOW_ATTN, window_size=14, vit_feature="last")
        return build_mask_rcnn(adapter, 80)
    adapter = build_vit_adapter(method, vit_feature="per_stage")
    return build_upernet(adapter, 150)


def synthetic_batch(task: str, batch: int, crop: int, num_classes: int, device, gen):
    if task == "segment":
        images = torch.randn(batch, 3, crop, crop, generator=gen).to(device)
        labels = torch.randint(0, num_classes, (batch, crop, crop), generator=gen)
        labels[:, :, : crop // 8] = 255  # some ignored pixels
        return images, labels.to(device)
    images, targets = [], []
    for _ in range(batch):
        images.append(torch.rand(3, crop, crop, generator=gen).to(device))
        n = 8
        xy = torch.rand(n, 2, generator=gen) * crop * 0.7
        wh = (torch.rand(n, 2, generator=gen) * 0.25 + 0.05) * crop
        boxes = torch.cat([xy, (xy + wh).clamp(max=crop)], 1)
        masks = torch.zeros(n, crop, crop, dtype=torch.uint8)
        for i, (x1, y1, x2, y2) in enumerate(boxes.round().long().tolist()):
            masks[i, y1:y2, x1:x2] = 1
        targets.append({"boxes": boxes.to(device), "labels": torch.randint(1, num_classes + 1, (n,), generator=gen)
                        .to(device), "masks": masks.to(device)})
    return images, targets


def median_step_s(step, warmup: int, iters: int, device) -> float:
    """Median seconds of ``step()`` over ``iters`` timed calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        _sync(device)
        t = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def time_task(task: str, method: str, args, device) -> dict:
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    crop = args.crop or (PAPER_CROP[task] if device.type == "cuda" else 256)
    num_classes = args.num_classes or (80 if task == "detect" else 150)
    model = build(task, method).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    batch = synthetic_batch(task, args.batch_size, crop, num_classes, device, gen)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            losses = model(*batch)
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    median = median_step_s(step, args.warmup, args.iters, device)
    row = {"task": task, "model": "Mask R-CNN" if task == "detect" else "UperNet", "method": method,
           "device": str(device), "crop": crop, "batch_size": args.batch_size, "amp": args.amp,
           "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
           "step_s_median": round(median, 4), "iters_per_s": round(1 / median, 4),
           "images_per_s": round(args.batch_size / median, 3)}
    if device.type == "cuda":
        row["max_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return row


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    env = {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
           "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()}
    rows = []
    for task in args.tasks:
        for method in args.methods:
            row = time_task(task, method, args, device)
            rows.append(row)
            print(f"{row['model']:<10} {method:<7} {row['device']:<6} crop {row['crop']:>4} batch {row['batch_size']} "
                  f"params {row['params_m']:.2f}M  {row['step_s_median']:.3f} s/step  {row['iters_per_s']:.3f} it/s",
                  flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"env": env, "results": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
