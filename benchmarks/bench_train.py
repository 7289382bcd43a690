"""Training throughput of the mpvg engine, side by side with timm's own ``benchmark.py``.

Three measurements, same batch and precision:

1. synthetic train step (random tensors): :func:`mpvg.training.engine.train_step` (autocast,
   backward, AdamW update: the engine's inner loop) for timm's ``deit_tiny_patch16_224`` and
   for mpvg's DeiT-Ti with the Default and the MPVG position embedding;
2. timm's ``benchmark.py --bench train`` on ``deit_tiny_patch16_224`` (AdamW too), if a copy is
   at ``.fetched/benchmark.py`` (see docs/training.md for how to fetch it; never committed);
3. end to end: the real ``train()`` (paper DeiT recipe: RandAugment, random erasing,
   mixup/cutmix, repeated augmentation) for one epoch on a folder of generated 224x224 JPEGs.

    .venv/bin/python benchmarks/bench_train.py --batch-size 32 --steps 5 [--precision bf16]
        [--device cuda] [--images 256] [--out bench_out/train.json]

Prints images/s and the ratios; a throughput tool, not a test.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def synthetic(model_name: str, kwargs: dict, batch: int, steps: int, warmup: int, device: torch.device,
              amp_dtype, rounds: int) -> float:
    """images/s of the engine's train step on random tensors (best of ``rounds``)."""
    import timm
    import timm.optim

    import mpvg.models  # noqa: F401
    from mpvg.training.engine import train_step

    torch.manual_seed(0)
    model = timm.create_model(model_name, num_classes=1000, **kwargs).to(device).train()
    optimizer = timm.optim.create_optimizer_v2(model, opt="adamw", lr=1e-4, weight_decay=0.05)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    criterion = torch.nn.CrossEntropyLoss()
    images = torch.randn(batch, 3, 224, 224, device=device)
    targets = torch.randint(0, 1000, (batch,), device=device)

    def run(n: int) -> None:
        for _ in range(n):
            train_step(model, images, targets, criterion, optimizer, scaler, amp_dtype)
        if device.type == "cuda":
            torch.cuda.synchronize()

    run(warmup)
    best = 0.0
    for _ in range(rounds):
        start = time.perf_counter()
        run(steps)
        best = max(best, batch * steps / (time.perf_counter() - start))
    return best


def timm_benchmark(batch: int, steps: int, warmup: int, device: str, precision: str) -> float | None:
    """images/s of timm's benchmark.py --bench train (None when .fetched/benchmark.py is absent)."""
    script = REPO / ".fetched" / "benchmark.py"
    if not script.is_file():
        print(f"(no {script}: skipping timm's benchmark.py)", file=sys.stderr)
        return None
    amp = ["--amp", "--amp-dtype", "bfloat16"] if precision == "bf16" else []
    cmd = [sys.executable, str(script), "--bench", "train", "--model", "deit_tiny_patch16_224", "-b", str(batch),
           "--device", device, "--num-warm-iter", str(warmup), "--num-bench-iter", str(steps), "--opt", "adamw",
           "--no-retry", *amp]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
    return float(json.loads(out.split("--result", 1)[1])["train_samples_per_sec"])


def write_jpegs(root: Path, n_images: int, n_classes: int = 4) -> None:
    """``root/{train,val}/<class>/<i>.JPEG``: smooth random 224x224 images (realistic JPEG sizes)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", n_images), ("val", max(n_classes, n_images // 8))):
        for i in range(n):
            folder = root / split / f"class{i % n_classes}"
            folder.mkdir(parents=True, exist_ok=True)
            small = rng.integers(0, 256, (14, 14, 3), dtype=np.uint8)
            noise = rng.integers(0, 40, (224, 224, 3), dtype=np.uint8)
            img = np.asarray(Image.fromarray(small).resize((224, 224), Image.BICUBIC)) // 2 + noise
            Image.fromarray(img.astype(np.uint8)).save(folder / f"{i}.JPEG", quality=90)


def end_to_end(cell: str, data: Path, batch: int, workers: int, device: str, amp: str, out: Path) -> float:
    """images/s of one epoch of the real training loop (paper recipe, tiny folder of JPEGs)."""
    from mpvg.config import load_params, resolve_run
    from mpvg.training.engine import RunOptions, train

    params = load_params(REPO / "params.yaml", {
        "scale": "paper", "datasets.imagenet.root": str(data), "datasets.imagenet.num_classes": 4,
        "recipes.deit.batch_size": batch, "recipes.deit.epochs": 1, "recipes.deit.warmup_epochs": 0,
        "recipes.deit.workers": workers})
    result = train(resolve_run(params, cell), RunOptions(out_dir=out, device=device, amp=amp, quiet=True,
                                                           eval_every=0, log_interval=1000))
    return float(result["history"][0]["images_per_s"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5, help="timed steps after --warmup (at least 5: timm's "
                    "benchmark.py logs every steps // 5)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="synthetic: best of this many timed rounds")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--images", type=int, default=256, help="JPEGs in the end-to-end training folder")
    ap.add_argument("--workers", type=int, default=1, help="data loader workers, end to end")
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--out", type=Path, default=None, help="also write the numbers as JSON here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    amp_dtype = torch.bfloat16 if args.precision == "bf16" else None
    b, n, w = args.batch_size, max(5, args.steps), args.warmup

    res: dict[str, float | None] = {
        "engine_step_timm_deit_tiny": synthetic("deit_tiny_patch16_224", {}, b, n, w, device, amp_dtype, args.rounds),
        "engine_step_mpvg_deit_ti_default": synthetic("mpvg_deit_tiny_patch16_224", {"pe_method": "default"},
                                                      b, n, w, device, amp_dtype, args.rounds),
        "engine_step_mpvg_deit_ti_mpvg": synthetic("mpvg_deit_tiny_patch16_224", {"pe_method": "mpvg"},
                                                   b, n, w, device, amp_dtype, args.rounds),
        "timm_benchmark_py_deit_tiny": timm_benchmark(b, n, w, args.device, args.precision),
    }
    if not args.skip_e2e:
        with tempfile.TemporaryDirectory() as tmp:
            write_jpegs(Path(tmp) / "jpegs", args.images)
            amp = "bf16" if amp_dtype else "none"
            for method in ("default", "mpvg"):
                res[f"end_to_end_deit_ti_{method}"] = end_to_end(
                    f"in1k-deit_ti-{method}", Path(tmp) / "jpegs", b, args.workers, args.device, amp,
                    Path(tmp) / f"run-{method}")

    def ratio(a: str, c: str) -> float | None:
        return round(res[a] / res[c], 3) if res.get(a) and res.get(c) else None

    ratios = {
        "mpvg_over_default (step)": ratio("engine_step_mpvg_deit_ti_mpvg", "engine_step_mpvg_deit_ti_default"),
        "mpvg_default_over_timm_deit (step)": ratio("engine_step_mpvg_deit_ti_default", "engine_step_timm_deit_tiny"),
        "engine_over_timm_benchmark_py (deit_tiny)": ratio("engine_step_timm_deit_tiny", "timm_benchmark_py_deit_tiny"),
        "end_to_end_over_step (default)": ratio("end_to_end_deit_ti_default", "engine_step_mpvg_deit_ti_default"),
        "end_to_end_over_step (mpvg)": ratio("end_to_end_deit_ti_mpvg", "engine_step_mpvg_deit_ti_mpvg"),
        "mpvg_over_default (end to end)": ratio("end_to_end_deit_ti_mpvg", "end_to_end_deit_ti_default"),
    }
    setup = {"device": args.device, "precision": args.precision, "batch_size": b, "steps": n, "warmup": w,
             "rounds": args.rounds,
             "threads": torch.get_num_threads(), "torch": torch.__version__}
    print(json.dumps(setup))
    for key, value in res.items():
        print(f"{key:40s} {value:10.1f} images/s" if value else f"{key:40s} {'-':>10s}")
    for key, value in ratios.items():
        print(f"{key:40s} {value if value is not None else '-':>10}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"setup": setup, "images_per_s": res, "ratios": ratios}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
