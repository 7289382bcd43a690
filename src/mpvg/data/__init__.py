"""Datasets: on-disk layout checks (here, torch-free, so Snakemake and `mpvg data check` stay
fast), classification loaders (:mod:`.classification`), tiny generated data (:mod:`.tiny`),
COCO / ADE20K (:mod:`.coco`, :mod:`.ade20k`).

Nothing is ever downloaded: every dataset is read from a local root named in params.yaml, and
a missing or malformed one fails at start with the path, what was found and what was expected.
"""
from __future__ import annotations

import os
from pathlib import Path

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp")
SPLITS = ("train", "val")
# How each dataset lies on disk, for error messages.
LAYOUTS = {
    "imagenet": "{root}/{{train,val}}/<class>/<image>.JPEG",
    "cifar100": "{root}/{{train,test,meta}} (the python pickles of cifar-100-python.tar.gz)",
    "coco": "{root}/annotations/instances_{{train,val}}2017.json and {root}/{{train,val}}2017/<image>.jpg",
    "ade20k": "{root}/{{images,annotations}}/{{training,validation}}/<name>.{{jpg,png}}",
}


class DatasetError(RuntimeError):
    """A dataset root is missing or not in the expected layout (message names the path)."""


def _fail(name: str, root: Path, problem: str) -> DatasetError:
    return DatasetError(f"{root}: {problem}; expected {LAYOUTS[name].format(root=root)}")


def _listdir(path: Path) -> list[os.DirEntry]:
    with os.scandir(path) as it:
        return sorted(it, key=lambda e: e.name)


def _found(path: Path) -> str:
    names = [e.name for e in _listdir(path)] if path.is_dir() else []
    return f"found {names[:8]}{' ...' if len(names) > 8 else ''}" if names else "found nothing"


def imagefolder_classes(split_dir: Path) -> list[str]:
    """Class folder names of an ImageNet-style split, sorted (their index is the label)."""
    return [e.name for e in _listdir(split_dir) if e.is_dir() and not e.name.startswith(".")]


def check_dataset(name: str, root: str | Path, split: str = "train", num_classes: int | None = None) -> dict:
    """Fail early and clearly if ``root`` does not hold ``split`` of dataset ``name``.

    Cheap (no full scan): looks at the folders/files that the loaders open first.  Returns a
    summary (``{"root", "split", "num_classes"}`` where known).
    """
    root = Path(root)
    if name not in LAYOUTS:
        raise DatasetError(f"unknown dataset {name!r}; expected one of {sorted(LAYOUTS)}")
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r} for {name}; expected one of {list(SPLITS)}")
    if not root.is_dir():
        raise _fail(name, root, "folder does not exist (nothing is downloaded: put the data there, "
                    "or run `mpvg data tiny` for the tiny scale)")
    info = {"root": str(root), "split": split, "num_classes": None}
    if name == "imagenet":
        split_dir = root / split
        if not split_dir.is_dir():
            raise _fail(name, root, f"no {split!r} folder ({_found(root)})")
        classes = imagefolder_classes(split_dir)
        if not classes:
            raise _fail(name, root, f"{split_dir} has no class folders ({_found(split_dir)})")
        first = split_dir / classes[0]
        if not any(e.name.lower().endswith(IMAGE_EXTENSIONS) for e in _listdir(first)):
            raise _fail(name, root, f"{first} holds no images ({_found(first)})")
        info["num_classes"] = len(classes)
    elif name == "cifar100":
        for fname in ("train" if split == "train" else "test", "meta"):
            if not (root / fname).is_file():
                raise _fail(name, root, f"no {fname!r} file ({_found(root)})")
        info["num_classes"] = len(cifar100_class_names(root))
    elif name == "coco":
        ann = root / "annotations" / f"instances_{split}2017.json"
        if not ann.is_file():
            raise _fail(name, root, f"no {ann.relative_to(root)} ({_found(root / 'annotations')})")
        if not (root / f"{split}2017").is_dir():
            raise _fail(name, root, f"no '{split}2017' folder ({_found(root)})")
    else:  # ade20k
        sub = "training" if split == "train" else "validation"
        for kind in ("images", "annotations"):
            if not (root / kind / sub).is_dir():
                raise _fail(name, root, f"no '{kind}/{sub}' folder ({_found(root / kind)})")
    if num_classes is not None and info["num_classes"] not in (None, num_classes):
        raise DatasetError(f"{root}: {info['num_classes']} classes in {split!r} but params.yaml says "
                           f"num_classes: {num_classes} for {name}")
    return info


def cifar100_class_names(root: str | Path) -> list[str]:
    """Fine label names from the ``meta`` pickle (their order is the label index)."""
    import pickle

    path = Path(root) / "meta"
    try:
        with open(path, "rb") as f:
            meta = pickle.load(f, encoding="latin1")
        return list(meta["fine_label_names"])
    except (OSError, pickle.UnpicklingError, KeyError, TypeError, EOFError) as exc:
        raise _fail("cifar100", Path(root), f"cannot read fine_label_names from {path} ({exc!r})") from None
