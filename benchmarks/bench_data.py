"""Images/s per CPU core of the ImageNet training input pipeline, and the cores a GPU needs.

Writes a folder of photographic-like JPEGs in the ImageNet layout (default 500x375, the most
common ImageNet-1K size, quality 90: multi-octave luma/chroma noise, a gradient, a few hard-edged
shapes and grain, ~110 KB a file like ImageNet's training JPEGs), then times the loader that trains
(``mpvg.training.engine._train``'s: ``ImageFolderDataset`` + ``build_transform`` of the DeiT recipe at
224x224 (RandomResizedCrop, flip, RandAugment rand-m9-mstd0.5-inc1, uint8 out) in ``SeededSamples``
with the ``EpochSampler``, ``build_train_loader``, then ``DeviceTransform``: normalisation and random
erasing of the uint8 batch, here on the CPU) in this one process with one thread and no workers, so
the number is per core.

``--vs-timm`` times timm's own ``ImageDataset`` + ``create_loader`` (its ``create_transform``,
``fast_collate`` and ``PrefetchLoader``, which normalises and erases the batch on the loader's
device, here the CPU) with the identical recipe in the same run: the two loaders alternate in
interleaved rounds, each round's CPU time is this process's (``time.process_time``: other jobs
on a shared machine do not inflate it), and the medians are compared:

    ratio (ours/timm, per core): X.XX

``ours_workers`` (always timed, interleaved too) is our loader without the batch-wise device part:
what the worker cores of a GPU node do. From its images/s per core the script prints the cores per
GPU that each ImageNet model of the paper plan needs at its planned GPU speed
(``mpvg.workflow.plan.IMAGES_PER_S_PER_GPU``): loader workers = ceil(GPU images/s / per-core
images/s), plus the training process itself (``plan.LOADER_IMAGES_PER_S_PER_CORE`` holds it).

    .venv/bin/python benchmarks/bench_data.py --vs-timm --images 192 --rounds 5
    .venv/bin/python benchmarks/bench_data.py --workers 8 --images 2048     # wall images/s, 8 workers
    .venv/bin/python benchmarks/bench_data.py --stage-report                # CPU ms of each transform stage
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


# --------------------------------------------------------------------------- data
def photo_like(rng: np.random.Generator, size: tuple[int, int]):
    """A PIL image with the statistics that make JPEG decoding cost what it costs on photos:
    detail at every scale (mostly in luma, as 4:2:0 chroma subsampling drops chroma), smooth
    gradients, hard edges, sensor-like grain."""
    from PIL import Image, ImageDraw, ImageFilter

    w, h = size
    acc = np.zeros((h, w, 3), np.float32)
    for octave, amp in ((4, 60), (16, 30), (64, 18), (160, 30), (500, 44)):
        gw, gh = min(octave, w), min(max(2, octave * h // w), h)
        small = (rng.normal(0, 1, (gh, gw, 1)) + 0.4 * rng.normal(0, 1, (gh, gw, 3))).astype(np.float32)
        acc += amp * np.stack([np.asarray(Image.fromarray(small[..., c]).resize((w, h), Image.BICUBIC))
                               for c in range(3)], -1)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    acc += 40 * (np.cos(angle) * xx / w + np.sin(angle) * yy / h)[..., None] * rng.uniform(-1, 1, 3)
    acc += rng.uniform(60, 190, 3)
    img = Image.fromarray(np.clip(acc, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        box = (x0, y0, x0 + int(rng.integers(20, max(21, w // 2))), y0 + int(rng.integers(20, max(21, h // 2))))
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    arr = np.asarray(img.filter(ImageFilter.GaussianBlur(0.5)), np.float32) + rng.normal(0, 7, (h, w, 1))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def write_jpegs(root: Path, n: int, size: tuple[int, int], classes: int = 8, seed: int = 0,
                splits: tuple[str, ...] = ("train",), quality: int = 90) -> float:
    """``root/<split>/n%08d/img%06d.JPEG`` for each split; returns the mean file size in KB."""
    rng = np.random.default_rng(seed)
    total, count = 0, 0
    for split in splits:
        for i in range(n):
            d = root / split / f"n{i % classes:08d}"
            d.mkdir(parents=True, exist_ok=True)
            path = d / f"img{i:06d}.JPEG"
            photo_like(rng, size).save(path, quality=quality)
            total, count = total + path.stat().st_size, count + 1
    return total / max(count, 1) / 1024


# --------------------------------------------------------------------------- loaders
def deit_recipe() -> dict:
    """The paper-scale DeiT recipe of params.yaml (img_size 224)."""
    from mpvg.config import load_params

    return dict(load_params(REPO / "params.yaml", ["scale=paper"])["recipes"]["deit"])


class OursLoader:
    """The loader that trains (``mpvg.training.engine._train``): ``ImageFolderDataset`` +
    ``build_transform`` (uint8 out) in ``SeededSamples``, ``EpochSampler``, ``build_train_loader``,
    then each batch through ``DeviceTransform`` (normalise + random erasing) on ``device``, as the
    training loop does. One pass = one epoch (the order changes each pass, as timm's)."""

    def __init__(self, root: Path, recipe: dict, batch: int, workers: int = 0, seed: int = 0, repeat: int = 1,
                 device: str | None = "cpu"):
        from mpvg.data.classification import ImageFolderDataset, build_train_loader, build_transform
        from mpvg.data.device_transform import DeviceTransform
        from mpvg.run.seeding import EpochSampler, SeededSamples

        ds = ImageFolderDataset(root, "train", build_transform(recipe, is_train=True))
        ds.samples, ds.targets = ds.samples * repeat, ds.targets * repeat
        self.sampler = EpochSampler(len(ds), batch, seed)
        self.loader = build_train_loader(SeededSamples(ds), self.sampler, batch, workers, pin_memory=False)
        # device None: the workers' part only (uint8 batches), what the CPUs of a GPU node do
        self.transform = None if device is None else DeviceTransform.from_recipe(recipe, device)
        self.seed, self.epoch = seed, -1

    def __iter__(self):
        self.epoch += 1
        self.sampler.set_epoch(self.epoch)
        for step, (images, targets) in enumerate(self.loader):
            if self.transform is not None:
                images = self.transform(images, seed=self.seed, epoch=self.epoch, step=step)
            yield images, targets


def ours_loader(root: Path, recipe: dict, batch: int, workers: int = 0, seed: int = 0, repeat: int = 1,
                device: str | None = "cpu"):
    """The project's training loader (:class:`OursLoader`; ``repeat``: every file ``repeat`` times;
    ``device`` None: without the batch-wise device part)."""
    return OursLoader(root, recipe, batch, workers, seed, repeat, device)


def timm_loader(root: Path, recipe: dict, batch: int, workers: int = 0, device: str = "cpu",
                prefetcher: bool = True):
    """timm's own loader with the same recipe (timm train.py's path: prefetcher on)."""
    import torch
    from timm.data import ImageDataset, create_loader

    from mpvg.data.classification import _patch_timm_posterize

    _patch_timm_posterize()  # Pillow 13 posterize(0 bits) raises in timm's op; ours patches it too
    ds = ImageDataset(str(root / "train"))
    return create_loader(
        ds, input_size=(3, recipe["img_size"], recipe["img_size"]), batch_size=batch, is_training=True,
        scale=tuple(recipe["scale"]), hflip=recipe["hflip"], color_jitter=recipe["color_jitter"],
        auto_augment=recipe["randaugment"], interpolation=recipe["train_interpolation"],
        mean=tuple(recipe["mean"]), std=tuple(recipe["std"]), re_prob=recipe["reprob"], re_mode=recipe["remode"],
        re_count=recipe["recount"], num_workers=workers, device=torch.device(device), use_prefetcher=prefetcher,
        persistent_workers=False)


def time_pass(loader, max_batches: int | None = None) -> dict:
    """One pass over ``loader``: images, wall seconds, this process's CPU seconds."""
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    shape = None
    for b, (x, _) in enumerate(loader):
        n += x.shape[0]
        shape = tuple(x.shape[1:])
        if max_batches and b + 1 >= max_batches:
            break
    return {"images": n, "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0, "shape": shape}


def interleaved(loaders: dict, rounds: int) -> dict[str, dict]:
    """Median per-core (CPU-time) and wall images/s of each loader over interleaved rounds
    (the order alternates each round so that drifting load hits all alike)."""
    per: dict[str, list[dict]] = {k: [] for k in loaders}
    for k in loaders:  # warm-up: page cache, timm's lazy imports, first-touch allocations
        time_pass(loaders[k], max_batches=1)
    for r in range(rounds):
        for k in (list(loaders) if r % 2 == 0 else list(reversed(loaders))):
            per[k].append(time_pass(loaders[k]))
    out = {}
    for k, runs in per.items():
        out[k] = {"images_per_s_per_core": statistics.median(p["images"] / p["cpu_s"] for p in runs),
                  "images_per_s_wall": statistics.median(p["images"] / p["wall_s"] for p in runs),
                  "rounds": len(runs), "images_per_round": runs[0]["images"], "out_shape": list(runs[0]["shape"])}
    return out


# --------------------------------------------------------------------------- cores per GPU
def cores_per_gpu(per_core: float) -> list[dict]:
    """Cores each ImageNet model of the plan needs at its planned GPU images/s (plan.py)."""
    from mpvg.workflow import plan

    rows = []
    for model in ("DeiT-Ti", "DeiT-S", "DeiT-B", "Swin-Ti", "CeiT-Ti", "T2T-ViT-7"):
        gpu = plan.IMAGES_PER_S_PER_GPU[model]
        rows.append({"model": model, "planned_gpu_images_per_s": gpu,
                     "loader_cores": math.ceil(gpu / per_core),
                     "cpus_per_gpu": plan.loader_cpus_per_gpu(gpu, per_core)})
    return rows


def draft_report(root: Path, recipe: dict, seeds: int = 4) -> dict:
    """Reduced-size JPEG decoding against timm's full decode, same crop draws: the share of crops
    decoded reduced, the mean |pixel difference| (0-255) of the 224 crops, and ms per crop both ways."""
    import random

    from timm.data.transforms import RandomResizedCropAndInterpolation

    from mpvg.data.classification import DraftRandomResizedCrop, decode_image

    rrc = RandomResizedCropAndInterpolation(recipe["img_size"], scale=tuple(recipe["scale"]),
                                            interpolation=recipe["train_interpolation"])
    draft = DraftRandomResizedCrop(rrc)
    files = train_jpegs(root)
    diffs, reduced, t_full, t_draft = [], 0, 0.0, 0.0
    for seed in range(seeds):
        for i, path in enumerate(files):
            random.seed(seed * 100003 + i)
            c0 = time.process_time()
            ref = np.asarray(rrc(decode_image(path)), np.float32)
            t_full += time.process_time() - c0
            random.seed(seed * 100003 + i)
            c0 = time.process_time()
            img = decode_image(path, lazy=True)
            out = np.asarray(draft(img), np.float32)
            t_draft += time.process_time() - c0
            reduced += img.size != image_size(path)
            diffs.append(float(np.abs(out - ref).mean()))
    n = len(diffs)
    return {"crops": n, "reduced_share": round(reduced / n, 3), "mean_abs_diff": round(float(np.mean(diffs)), 3),
            "max_mean_abs_diff": round(float(np.max(diffs)), 3), "ms_full_decode": round(t_full / n * 1e3, 3),
            "ms_draft_decode": round(t_draft / n * 1e3, 3)}


def stage_report(root: Path, recipe: dict, seed: int = 0) -> dict:
    """CPU ms per image of each stage of the train transform, timm's ops on the same images:
    the JPEG decode, RandomResizedCrop's crop + resize, the flip, every RandAugment op applied
    (probability forced to 1) to the 224 crops, and the uint8 array; ``randaugment_expected_ms``
    is what RandAugment costs per image on average (``num_layers`` uniform draws, each applied
    with its probability). Where the time of a loader goes, so what a faster one must avoid."""
    import copy
    import random

    from timm.data.auto_augment import RandAugment

    from mpvg.data.classification import build_transform, decode_image

    random.seed(seed)
    np.random.seed(seed)
    transform = build_transform(recipe, is_train=True)
    rrc, flip = transform.transforms[0].rrc, transform.transforms[1]
    ra = next(t for t in transform.transforms if isinstance(t, RandAugment))
    to_uint8 = transform.transforms[-1]
    files = train_jpegs(root)
    ms: dict[str, list[float]] = {}

    def timed(name, fn, *a):
        c0 = time.process_time()
        out = fn(*a)
        ms.setdefault(name, []).append((time.process_time() - c0) * 1e3)
        return out

    crops = []
    for path in files:
        img = timed("decode", decode_image, path)
        img = timed("random_resized_crop", rrc, img)
        crops.append(timed("flip", flip, img))
        timed("uint8_array", to_uint8, crops[-1])
    for op in ra.ops:
        always = copy.copy(op)
        always.prob = 1.0
        for img in crops:
            timed(f"op:{op.name}", always, img)
    mean = {k: statistics.mean(v) for k, v in ms.items()}
    per = {k: round(v, 3) for k, v in mean.items()}
    per["randaugment_expected_ms"] = round(
        ra.num_layers * statistics.mean(op.prob * mean[f"op:{op.name}"] for op in ra.ops), 3)
    per["images"] = len(files)
    return per


def train_jpegs(root: Path) -> list[str]:
    """The generated training JPEGs under ``root`` (:func:`write_jpegs`), sorted."""
    return sorted(str(f) for f in (root / "train").rglob("*.JPEG"))


def image_size(path: str) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as img:
        return img.size


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=192, help="JPEGs in the folder (one round = one pass)")
    ap.add_argument("--src-size", default="500x375", help="WxH of the source JPEGs, or one number")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5, help="timed passes per loader (interleaved); medians count")
    ap.add_argument("--workers", type=int, default=0,
                    help="0: per-core mode (this process); N > 0: wall images/s of our loader with N workers")
    ap.add_argument("--vs-timm", action="store_true", help="also time timm's create_loader, interleaved")
    ap.add_argument("--no-timm-prefetcher", action="store_true",
                    help="timm with use_prefetcher=False (normalise/erase per sample, like DeiT's main.py)")
    ap.add_argument("--draft-report", action="store_true",
                    help="only compare reduced-size JPEG decoding with timm's full decode (same crops)")
    ap.add_argument("--stage-report", action="store_true",
                    help="only time each stage of the train transform (decode, crop+resize, each RandAugment op)")
    ap.add_argument("--root", default=None, help="reuse/keep the JPEG folder here (default: a temp folder)")
    ap.add_argument("--out", type=Path, default=None, help="also write the numbers as JSON here")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    w, _, h = args.src_size.partition("x")
    size = (int(w), int(h or w))
    tmp = None if args.root else tempfile.TemporaryDirectory()
    root = Path(args.root or tmp.name)
    if not (root / "train").is_dir():
        write_jpegs(root, args.images, size)
    files = train_jpegs(root)
    kb = sum(Path(f).stat().st_size for f in files) / max(len(files), 1) / 1024
    recipe = deit_recipe()
    try:
        if args.draft_report:
            print(json.dumps({"src_size": f"{size[0]}x{size[1]}", "jpeg_kb": round(kb, 1),
                              **draft_report(root, recipe)}))
            return 0
        if args.stage_report:
            print(json.dumps({"src_size": f"{size[0]}x{size[1]}", "jpeg_kb": round(kb, 1),
                              **stage_report(root, recipe)}, indent=1))
            return 0
        if args.workers > 0:
            res = {"ours": time_pass(ours_loader(root, recipe, args.batch_size, args.workers))}
            r = res["ours"]
            print(json.dumps({"workers": args.workers, "images": r["images"], "jpeg_kb": round(kb, 1),
                              "images_per_s_wall": round(r["images"] / r["wall_s"], 1)}))
            return 0
        loaders = {"ours": ours_loader(root, recipe, args.batch_size)}
        if args.vs_timm:
            loaders["timm"] = timm_loader(root, recipe, args.batch_size, prefetcher=not args.no_timm_prefetcher)
        loaders["ours_workers"] = ours_loader(root, recipe, args.batch_size, device=None)
        res = interleaved(loaders, args.rounds)
    finally:
        if tmp:
            tmp.cleanup()
    setup = {"images": args.images, "src_size": f"{size[0]}x{size[1]}", "jpeg_kb": round(kb, 1),
             "batch_size": args.batch_size, "rounds": args.rounds, "threads": torch.get_num_threads(),
             "timm_prefetcher": not args.no_timm_prefetcher}
    print(json.dumps(setup))
    for k, r in res.items():
        print(f"{k:12s} {r['images_per_s_per_core']:8.1f} images/s per core (CPU time)  "
              f"{r['images_per_s_wall']:8.1f} images/s wall  out {r['out_shape']}")
    report = {"setup": setup, "loaders": res}
    # cores per GPU: on a GPU node the workers stop at uint8 batches; normalisation and erasing run on the GPU
    per_core = res["ours_workers"]["images_per_s_per_core"]
    if "timm" in res:
        ratio = res["ours"]["images_per_s_per_core"] / res["timm"]["images_per_s_per_core"]
        report["ratio_ours_over_timm_per_core"] = round(ratio, 3)
        print(f"ratio (ours/timm, per core): {ratio:.2f}")
    rows = cores_per_gpu(per_core)
    report["cores_per_gpu"] = rows
    print(f"cores per GPU at {per_core:.0f} images/s per core of the workers' part (uint8 batches; "
          "loader workers + 1 training process):")
    for row in rows:
        print(f"  {row['model']:10s} {row['planned_gpu_images_per_s']:6d} images/s/GPU -> "
              f"{row['loader_cores']:3d} loader cores, {row['cpus_per_gpu']:3d} CPUs per GPU")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
