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


CLASS_LISTS_FILE = Path(__file__).with_name("class_lists.yaml")


class DatasetError(RuntimeError):
    """A dataset root is missing or not in the expected layout (message names the path)."""


def class_lists() -> dict:
    """The packaged ImageNet class subsets (class_lists.yaml): ``{name: {file, classes, sha256, source}}``."""
    import yaml

    return yaml.safe_load(CLASS_LISTS_FILE.read_text(encoding="utf-8"))


def class_list(name: str) -> list[str]:
    """The folder names (WordNet ids) of the packaged class subset ``name``, in file order.

    The file is checked against the sha256 and the class count recorded in class_lists.yaml,
    so an edited list can never pass for the published one.
    """
    import hashlib

    lists = class_lists()
    if name not in lists:
        raise DatasetError(f"unknown class list {name!r}; expected one of {sorted(lists)} ({CLASS_LISTS_FILE})")
    entry = lists[name]
    path = CLASS_LISTS_FILE.with_name(entry["file"])
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise DatasetError(f"{path}: sha256 differs from the one in {CLASS_LISTS_FILE.name}; "
                           f"it is not the published list ({entry['source']})")
    names = data.decode("ascii").split()
    if len(names) != entry["classes"] or len(set(names)) != len(names):
        raise DatasetError(f"{path}: {len(names)} names ({len(set(names))} distinct), expected "
                           f"{entry['classes']} distinct class folders")
    return names


def select_classes(split_dir: Path, classes) -> list[str]:
    """The class folders of ``split_dir`` to use: all of them (``classes`` None), or the
    listed ones, sorted like the folders are (so a label means the same class whether the
    subset is read from the full ImageNet or from a copy holding only those folders).

    Every listed class must be a folder of ``split_dir``; the message names the missing ones.
    """
    present = imagefolder_classes(split_dir)
    if classes is None:
        return present
    wanted = sorted(set(classes))
    if len(wanted) != len(list(classes)):
        raise DatasetError(f"class subset for {split_dir} lists a class twice")
    missing = sorted(set(wanted) - set(present))
    if missing:
        raise DatasetError(f"{split_dir}: {len(missing)} of the {len(wanted)} classes of the subset are not "
                           f"class folders there: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    return wanted


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


def check_dataset(name: str, root: str | Path, split: str = "train", num_classes: int | None = None,
                  classes=None) -> dict:
    """Fail early and clearly if ``root`` does not hold ``split`` of dataset ``name``.

    Cheap (no full scan): looks at the folders/files that the loaders open first.  Returns a
    summary (``{"root", "split", "num_classes"}`` where known).  ``classes`` (ImageNet folders
    only) is a class subset: every listed class must be there, and it is what is counted.
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
        found = select_classes(split_dir, classes)
        if not found:
            raise _fail(name, root, f"{split_dir} has no class folders ({_found(split_dir)})")
        first = split_dir / found[0]
        if not any(e.name.lower().endswith(IMAGE_EXTENSIONS) for e in _listdir(first)):
            raise _fail(name, root, f"{first} holds no images ({_found(first)})")
        info["num_classes"] = len(found)
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
    if classes is not None and name != "imagenet":
        raise DatasetError(f"{root}: a class subset applies to ImageNet class folders only, not to {name}")
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
