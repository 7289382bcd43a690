"""Images/s per CPU core of the ImageNet training input pipeline (decode + timm train transform).

Writes a folder of synthetic JPEGs in the ImageNet layout (default 500x375, the most common
ImageNet-1K size; ``--src-size 224`` for 224x224 sources), then times the real loader
(``ImageFolderDataset`` + ``build_transform`` of the DeiT recipe at 224x224: RandomResizedCrop,
flip, RandAugment rand-m9-mstd0.5-inc1, random erasing) in one process with one thread, so the
number is per core.  A GPU job needs roughly (GPU images/s) / (this number) loader workers.

    .venv/bin/python benchmarks/bench_data.py --images 256 --src-size 500x375
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def write_jpegs(root: Path, n: int, size: tuple[int, int], classes: int = 8, seed: int = 0) -> float:
    """Smooth random images (JPEG sizes like natural photos); returns the mean file size in KB."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    total = 0
    for i in range(n):
        d = root / "train" / f"n{i % classes:08d}"
        d.mkdir(parents=True, exist_ok=True)
        low = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
        arr = np.clip(np.asarray(low, np.float32) + rng.normal(0, 12, (size[1], size[0], 3)), 0, 255)
        path = d / f"img{i:06d}.JPEG"
        Image.fromarray(arr.astype(np.uint8)).save(path, quality=90)
        total += path.stat().st_size
    return total / n / 1024


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--src-size", default="500x375", help="WxH of the source JPEGs, or one number")
    ap.add_argument("--epochs", type=int, default=2, help="timed passes (the first warms the page cache)")
    ap.add_argument("--root", default=None, help="reuse/keep the JPEG folder here (default: a temp folder)")
    args = ap.parse_args(argv)

    import torch

    from mpvg.config import load_params
    from mpvg.data.classification import ImageFolderDataset, build_transform

    torch.set_num_threads(1)
    w, _, h = args.src_size.partition("x")
    size = (int(w), int(h or w))
    tmp = None if args.root else tempfile.TemporaryDirectory()
    root = Path(args.root or tmp.name)
    kb = write_jpegs(root, args.images, size) if not (root / "train").is_dir() else float("nan")
    recipe = load_params("params.yaml", ["scale=paper"])["recipes"]["deit"]
    ds = ImageFolderDataset(root, "train", build_transform(recipe, is_train=True))
    rates = []
    for _ in range(args.epochs):
        t0 = time.perf_counter()
        for i in range(len(ds)):
            x, _ = ds[i]
        rates.append(len(ds) / (time.perf_counter() - t0))
    decode = ImageFolderDataset(root, "train")
    t0 = time.perf_counter()
    for i in range(len(decode)):
        decode[i]
    decode_rate = len(decode) / (time.perf_counter() - t0)
    result = {"images": len(ds), "src_size": f"{size[0]}x{size[1]}", "jpeg_kb": round(kb, 1),
              "out_shape": list(x.shape), "train_images_per_s_per_core": round(max(rates), 1),
              "decode_only_images_per_s_per_core": round(decode_rate, 1)}
    print(json.dumps(result))
    if tmp:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
