"""A cheap fingerprint of a dataset on disk, for run signatures (docs/contracts.md).

What it reads: directory listings and file sizes only, never an image, so it costs about a
second even for ImageNet's 1.28 M files on a local disk. What it catches: another dataset
under the same root (other class names, another number of images per split, annotation files
of another size), which would silently change every number trained on it.

It is ``None`` when the root does not exist (a dry run on a login node before the data is in
place): a signature comparison then leaves the dataset's contents out (mpvg.signature).
Torch-free, so Snakemake can call it while it plans.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from mpvg.data import IMAGE_EXTENSIONS

_CACHE: dict[tuple[str, str], dict | None] = {}


def _entries(path: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(path) as it:
            return sorted(it, key=lambda e: e.name)
    except (FileNotFoundError, NotADirectoryError):
        return []


def _count_images(path: Path) -> int:
    return sum(1 for e in _entries(path) if e.name.lower().endswith(IMAGE_EXTENSIONS))


def _names_digest(names: list[str]) -> str:
    return hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def _class_folders(split: Path) -> dict[str, Any]:
    classes = [e for e in _entries(split) if e.is_dir()]
    return {"classes": len(classes), "class_names": _names_digest([e.name for e in classes]),
            "images": sum(_count_images(Path(e.path)) for e in classes)}


def _imagenet(root: Path) -> dict:
    return {split: _class_folders(root / split) for split in ("train", "val")}


def _cifar100(root: Path) -> dict:
    return {name: _size(root / name) for name in ("train", "test", "meta")}


def _coco(root: Path) -> dict:
    return {split: {"annotations_bytes": _size(root / "annotations" / f"instances_{split}2017.json"),
                    "images": _count_images(root / f"{split}2017")} for split in ("train", "val")}


def _ade20k(root: Path) -> dict:
    return {split: {"images": _count_images(root / "images" / split),
                    "annotations": sum(1 for e in _entries(root / "annotations" / split) if e.name.endswith(".png"))}
            for split in ("training", "validation")}


READERS = {"imagenet": _imagenet, "cifar100": _cifar100, "coco": _coco, "ade20k": _ade20k}


def fingerprint(name: str, root: str | os.PathLike, cache: bool = True) -> dict | None:
    """Class names (digest), image counts per split and annotation sizes of dataset ``name`` at
    ``root``; ``None`` if ``root`` does not exist. Cached per process (``cache=False`` re-reads)."""
    if name not in READERS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(READERS)}")
    key = (name, str(Path(root).resolve()))
    if cache and key in _CACHE:
        return _CACHE[key]
    value = READERS[name](Path(root)) if Path(root).is_dir() else None
    _CACHE[key] = value
    return value
