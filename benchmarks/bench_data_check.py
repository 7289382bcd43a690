"""Seconds of the start-up data checks on an ImageNet-shaped folder (no image is opened).

Writes ``--classes`` class folders with ``--per-class`` tiny files each in train and val (the
files are a few bytes: the checks only list folders), then times, each on a cold Python-level
start (the OS page cache stays warm after the first repetition):

- ``check_dataset`` of train and val (what `mpvg train` and `mpvg data check` run first:
  class folders of both splits compared, the first class folder listed);
- ``imagefolder_samples`` of train (the file list `ImageFolderDataset` builds, every class
  folder listed, empty classes found).

    .venv/bin/python benchmarks/bench_data_check.py --classes 1000 --per-class 50
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def write_folder(root: Path, classes: int, per_class: int) -> None:
    for split in ("train", "val"):
        for c in range(classes):
            d = root / split / f"n{c:08d}"
            d.mkdir(parents=True, exist_ok=True)
            for k in range(per_class):
                (d / f"{split}_{c:04d}_{k:05d}.JPEG").write_bytes(b"\xff\xd8\xff")


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--per-class", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--root", default=None, help="reuse/keep the folder here (default: a temp folder)")
    args = ap.parse_args(argv)

    from mpvg.data import check_dataset, imagefolder_samples

    tmp = None if args.root else tempfile.TemporaryDirectory()
    root = Path(args.root or tmp.name)
    t0 = time.perf_counter()
    if not (root / "train").is_dir():
        write_folder(root, args.classes, args.per_class)
    written = time.perf_counter() - t0
    check = best_of(args.repeats, lambda: [check_dataset("imagenet", root, s, args.classes) for s in ("train", "val")])
    listing = best_of(args.repeats, lambda: imagefolder_samples(root / "train"))
    n = len(imagefolder_samples(root / "train")[1])
    print(json.dumps({"classes": args.classes, "files_per_split": n, "write_s": round(written, 1),
                      "check_dataset_train_and_val_s": round(check, 4), "imagefolder_samples_train_s": round(listing, 4),
                      "listing_files_per_s": round(n / listing)}))
    if tmp:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
