"""Tiny datasets for the embedded default scale, from data that ships with a dependency.

scikit-learn's 8x8 handwritten digits (10 classes) are rendered to 32x32 RGB (random colours, small
shifts) and written in the SAME on-disk layouts as the real
datasets, so the tiny runs exercise the real loaders: ImageNet-style JPEG class folders and the
cifar-100-python pickles.  Each dataset is written to a temporary folder and renamed into place,
so a crash never leaves a half-written dataset, and a finished one is not rewritten.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

TINY_NAMES = {"imagenet": "imagenet", "cifar100": "cifar-100-python", "coco": "coco",
              "ade20k": "ADEChallengeData2016"}
MARKER = ".mpvg-tiny.json"
N_TRAIN_PER_CLASS = 100
N_VAL_PER_CLASS = 20
SIZE = 32


def digit_images(seed: int = 0, n_train: int = N_TRAIN_PER_CLASS, n_val: int = N_VAL_PER_CLASS):
    """``(train_x, train_y, val_x, val_y, class_names)``; images uint8 (N, 32, 32, 3).

    Classes are balanced; each digit is resized to 26-28 px, placed within 1 px of the centre,
    drawn in a random bright colour on a random dark background with mild noise (harder
    variants, e.g. free placement, leave a seconds-long ViT run near chance).
    """
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    xs = {"train": [], "val": []}
    ys = {"train": [], "val": []}
    for label in range(10):
        idx = rng.permutation(np.flatnonzero(digits.target == label))
        if len(idx) < n_train + n_val:
            raise ValueError(f"digit {label} has {len(idx)} images; asked for {n_train + n_val}")
        for split, chosen in (("train", idx[:n_train]), ("val", idx[n_train:n_train + n_val])):
            for i in chosen:
                xs[split].append(_render(digits.images[i], rng, Image))
                ys[split].append(label)
    names = [f"digit_{d}" for d in range(10)]
    return (np.stack(xs["train"]), np.array(ys["train"], dtype=np.int64),
            np.stack(xs["val"]), np.array(ys["val"], dtype=np.int64), names)


def _render(img8: np.ndarray, rng: np.random.Generator, Image) -> np.ndarray:
    side = int(rng.integers(26, 29))
    glyph = Image.fromarray((img8 / 16.0 * 255).astype(np.uint8)).resize((side, side), Image.BICUBIC)
    alpha = np.zeros((SIZE, SIZE), dtype=np.float32)
    centre = (SIZE - side) // 2
    top, left = np.clip(centre + rng.integers(-1, 2, size=2), 0, SIZE - side)
    alpha[top:top + side, left:left + side] = np.asarray(glyph, dtype=np.float32) / 255.0
    fg = rng.uniform(170, 255, size=3)
    bg = rng.uniform(0, 70, size=3)
    out = alpha[..., None] * fg + (1 - alpha[..., None]) * bg + rng.normal(0, 6, size=(SIZE, SIZE, 3))
    return np.clip(out, 0, 255).astype(np.uint8)


def write_imagenet_layout(root: Path, seed: int = 0) -> None:
    """``root/{train,val}/<class>/<n>.JPEG`` like the unpacked ImageNet-1K."""
    from PIL import Image

    tx, ty, vx, vy, names = digit_images(seed)
    for split, xs, ys in (("train", tx, ty), ("val", vx, vy)):
        for i, (x, y) in enumerate(zip(xs, ys)):
            d = root / split / names[y]
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(x).save(d / f"{split}_{i:05d}.JPEG", quality=95)


def write_cifar_layout(root: Path, seed: int = 0) -> None:
    """``root/{train,test,meta}`` pickles with the keys torchvision's CIFAR100 reads."""
    tx, ty, vx, vy, names = digit_images(seed + 1)  # other renders than the ImageNet layout
    root.mkdir(parents=True, exist_ok=True)
    for fname, xs, ys in (("train", tx, ty), ("test", vx, vy)):
        entry = {"filenames": [f"{fname}_{i:05d}.png" for i in range(len(ys))],
                 "batch_label": f"tiny {fname} batch",
                 "fine_labels": ys.tolist(), "coarse_labels": [0] * len(ys),
                 "data": xs.transpose(0, 3, 1, 2).reshape(len(xs), -1)}  # CHW rows, as CIFAR
        with open(root / fname, "wb") as f:
            pickle.dump(entry, f, protocol=2)
    with open(root / "meta", "wb") as f:
        pickle.dump({"fine_label_names": names, "coarse_label_names": ["digits"]}, f, protocol=2)


def _writer(what: str) -> Callable[[Path, int], None]:
    """The function that writes dataset ``what`` (COCO and ADE20K: their own modules')."""
    if what == "imagenet":
        return write_imagenet_layout
    if what == "cifar100":
        return write_cifar_layout
    import importlib

    return importlib.import_module(f"mpvg.data.{what}").make_tiny


def is_complete(path: Path) -> bool:
    return (path / MARKER).is_file()


def make_tiny(out: str | Path, what: str = "all", seed: int = 0) -> dict[str, str]:
    """Write the tiny datasets under ``out``; returns ``{name: "written" | "exists"}``.

    Each goes to ``out/.tmp-<name>-XXXX`` first and is renamed to ``out/<layout name>`` once
    complete (with a marker file); an existing complete one is left alone.
    """
    out = Path(out)
    names = list(TINY_NAMES) if what == "all" else [what]
    status = {}
    for name in names:
        if name not in TINY_NAMES:
            raise ValueError(f"unknown tiny dataset {name!r}; expected all or one of {list(TINY_NAMES)}")
        final = out / TINY_NAMES[name]
        if is_complete(final):
            status[name] = "exists"
            continue
        if final.exists():
            raise FileExistsError(f"{final} exists but was not completed by `mpvg data tiny` "
                                  f"(no {MARKER}); remove it and re-run")
        writer = _writer(name)
        out.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=out))
        try:
            writer(tmp, seed)
            (tmp / MARKER).write_text(json.dumps({"dataset": name, "seed": seed, "source": "sklearn digits"}))
            tmp.chmod(0o755)  # mkdtemp makes it private
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        status[name] = "written"
    return status
