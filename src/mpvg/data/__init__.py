"""Datasets: on-disk layout checks (here, torch-free, so Snakemake and `mpvg data check` stay
fast), classification loaders (:mod:`.classification`), tiny generated data (:mod:`.tiny`),
COCO / ADE20K (:mod:`.coco`, :mod:`.ade20k`), decoding every file (:mod:`.integrity`).

Nothing is ever downloaded: every dataset is read from a local root named in params.yaml, and
a missing or malformed one fails at start with the path, what was found and what was expected.
The checks here only list folders and read a few bytes (cheap for ImageNet's 1.28 M files);
`mpvg data check --deep` decodes every file.
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
# Where the real datasets come from (for `mpvg data check`; nothing here downloads them).
SOURCES = {
    "imagenet": "ImageNet-1K (ILSVRC 2012) train and val images from https://image-net.org/download.php, "
                "val sorted into the train's class folders",
    "cifar100": "cifar-100-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html, unpacked",
    "coco": "train2017.zip, val2017.zip and annotations_trainval2017.zip from https://cocodataset.org/#download, "
            "unpacked side by side",
    "ade20k": "ADEChallengeData2016.zip (SceneParsing) from http://sceneparsing.csail.mit.edu/, unpacked",
}
ADE20K_DIRS = {"train": "training", "val": "validation"}
COCO_DIRS = {"train": "train2017", "val": "val2017"}


CLASS_LISTS_FILE = Path(__file__).with_name("class_lists.yaml")


class DatasetError(RuntimeError):
    """A dataset root is missing or not in the expected layout, or a file in it is bad (the
    message names the path).

    Raised in a DataLoader worker, torch re-raises it in the main process as
    ``DatasetError("Caught DatasetError in DataLoader worker process k.\\nOriginal Traceback
    ...")``; the constructor keeps only the original one-line message, so `mpvg train` prints
    the same line with workers as without.
    """

    def __init__(self, message: object = "", *args):
        super().__init__(_unwrap_worker_message(type(self), message), *args)


def _unwrap_worker_message(cls: type, message: object) -> object:
    """The original message inside torch's ``ExceptionWrapper.reraise`` text, else ``message``."""
    if not (isinstance(message, str) and message.startswith(f"Caught {cls.__name__} ")
            and "\nOriginal Traceback" in message):
        return message
    where = message.split("\n", 1)[0][len(f"Caught {cls.__name__} "):].rstrip(".")
    marker = f"\n{cls.__module__}.{cls.__qualname__}: "
    start = message.rfind(marker)
    if start < 0:
        return message
    return f"{message[start + len(marker):].strip()} ({where})"


def class_lists() -> dict:
    """The packaged ImageNet class subsets (class_lists.yaml): ``{name: {file, classes, sha256, source}}``."""
    import yaml

    return yaml.safe_load(CLASS_LISTS_FILE.read_text(encoding="utf-8"))


def class_list(name: str) -> list[str]:
    """The folder names (WordNet ids) of the packaged class subset ``name``, in file order,
    checked against the sha256 and class count in class_lists.yaml (:func:`mpvg.config.read_class_list`)."""
    from mpvg.config import read_class_list

    try:
        return read_class_list(name, CLASS_LISTS_FILE)
    except ValueError as err:
        raise DatasetError(str(err)) from None


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


def examples_of(names, k: int = 3) -> str:
    names = list(names)
    return ", ".join(repr(n) for n in names[:k]) + (f" (+{len(names) - k} more)" if len(names) > k else "")


def imagefolder_classes(split_dir: Path) -> list[str]:
    """Class folder names of an ImageNet-style split, sorted (their index is the label)."""
    return [e.name for e in _listdir(split_dir) if e.is_dir() and not e.name.startswith(".")]


def imagefolder_samples(split_dir: str | Path, subset=None) -> tuple[list[str], list[tuple[str, int]]]:
    """``(classes, [(path, label), ...])`` of an ImageNet-style split, in sorted order; ``subset``
    keeps only those class folders (:func:`select_classes`).

    A plain ``os.scandir`` per class (no per-file ``stat``: seconds for ImageNet's 1.28 M
    files).  A class folder without images is an error: its label would never be seen.
    """
    split_dir = Path(split_dir)
    classes = select_classes(split_dir, subset)
    samples: list[tuple[str, int]] = []
    empty = []
    for idx, cls in enumerate(classes):
        with os.scandir(split_dir / cls) as it:
            names = sorted(e.name for e in it if e.name.lower().endswith(IMAGE_EXTENSIONS))
        if not names:
            empty.append(cls)
        samples.extend((os.path.join(split_dir, cls, n), idx) for n in names)
    if empty:
        raise DatasetError(f"{split_dir}: {len(empty)} of {len(classes)} class folders hold no images "
                           f"({examples_of(empty)}); expected <class>/<image> with one of {list(IMAGE_EXTENSIONS)}")
    return classes, samples


def check_same_classes(train_dir: Path, val_dir: Path) -> list[str]:
    """The class folders of ``train_dir``; fails unless ``val_dir`` has the very same names.

    The label of an image is the index of its class folder's name in the sorted list, so a
    val folder with other names (even with the same count) would score the model against
    the wrong labels.
    """
    train, val = imagefolder_classes(train_dir), imagefolder_classes(val_dir)
    if train != val:
        only_train = sorted(set(train) - set(val))
        only_val = sorted(set(val) - set(train))
        parts = [f"{len(names)} only in {where}, e.g. {examples_of(names, 2)}"
                 for names, where in ((only_train, train_dir), (only_val, val_dir)) if names]
        raise DatasetError(f"the class folders of {train_dir} ({len(train)}) and {val_dir} ({len(val)}) differ: "
                           f"{'; '.join(parts)}; a label is the index of its sorted class name, so both splits "
                           "need the same class folders")
    return train


def json_looks_complete(path: Path) -> None:
    """Fail naming ``path`` unless it starts with ``{`` and ends with ``}`` (a cut-off download
    or copy ends elsewhere).  Reads 64 bytes at each end, not the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(64).removeprefix(b"\xef\xbb\xbf").lstrip()  # a UTF-8 BOM is valid JSON for json.load
        f.seek(max(0, size - 64))
        tail = f.read().rstrip()
    if not head.startswith(b"{") or not tail.endswith(b"}"):
        raise DatasetError(f"{path}: not a complete JSON object ({size} bytes, starts {head[:16]!r}, ends "
                           f"{tail[-16:]!r}); truncated? expected a COCO instances file")


def ade20k_pairs(root: str | Path, split: str) -> tuple[list[str], list[Path], list[Path]]:
    """``(stems, images, labels)`` of an ADE20K split: each ``images/<sub>/<name>.jpg`` with its
    ``annotations/<sub>/<name>.png``; an image without its label is an error."""
    root = Path(root)
    sub = ADE20K_DIRS[split]
    img_dir, ann_dir = root / "images" / sub, root / "annotations" / sub
    imgs = {e.name[:-4]: Path(e.path) for e in _listdir(img_dir) if e.name.lower().endswith(".jpg")}
    anns = {e.name[:-4]: Path(e.path) for e in _listdir(ann_dir) if e.name.lower().endswith(".png")}
    if not imgs:
        raise DatasetError(f"{img_dir}: no .jpg images ({_found(img_dir)}); expected {img_dir}/ADE_*.jpg")
    missing = sorted(set(imgs) - set(anns))
    if missing:
        raise DatasetError(f"{ann_dir}: no annotation for {len(missing)} of {len(imgs)} images, e.g. "
                           f"{examples_of(missing)}; expected <name>.png next to each {img_dir}/<name>.jpg")
    stems = sorted(imgs)
    return stems, [imgs[s] for s in stems], [anns[s] for s in stems]


def check_dataset(name: str, root: str | Path, split: str = "train", num_classes: int | None = None,
                  classes=None) -> dict:
    """Fail early and clearly if ``root`` does not hold ``split`` of dataset ``name``.

    Cheap (folder listings and a few bytes, never an image): ImageNet's class folders (and
    that train and val name the same classes), CIFAR's pickles, COCO's annotation file (present
    and not cut off) and image folder, ADE20K's image/label pairs.  Returns a summary
    (``{"root", "split", "num_classes"}`` where known).  ``classes`` (ImageNet folders only) is
    a class subset: every listed class must be there, and it is what is counted.
    """
    root = Path(root)
    if name not in LAYOUTS:
        raise DatasetError(f"unknown dataset {name!r}; expected one of {sorted(LAYOUTS)}")
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r} for {name}; expected one of {list(SPLITS)}")
    if not root.is_dir():
        raise _fail(name, root, "folder does not exist (nothing is downloaded: `mpvg data check` says "
                    "how to get it)")
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
        if (root / "train").is_dir() and (root / "val").is_dir():
            check_same_classes(root / "train", root / "val")
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
        if not (root / COCO_DIRS[split]).is_dir():
            raise _fail(name, root, f"no '{COCO_DIRS[split]}' folder ({_found(root)})")
        json_looks_complete(ann)
    else:  # ade20k
        sub = ADE20K_DIRS[split]
        for kind in ("images", "annotations"):
            if not (root / kind / sub).is_dir():
                raise _fail(name, root, f"no '{kind}/{sub}' folder ({_found(root / kind)})")
        ade20k_pairs(root, split)
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


def load_cifar100(root: str | Path, split: str):
    """``(images, labels, class_names)`` of a CIFAR-100 split from its pickles: images uint8
    ``(N, 32, 32, 3)`` (HWC, for PIL), fine labels, names from ``meta``; fails naming the file."""
    import pickle

    import numpy as np

    root = Path(root)
    path = root / ("train" if split == "train" else "test")
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
        data = np.asarray(entry["data"], dtype=np.uint8)
        labels = [int(t) for t in entry["fine_labels"]]
    except (OSError, pickle.UnpicklingError, KeyError, TypeError, ValueError, EOFError) as exc:
        raise DatasetError(f"{path}: not a CIFAR-100 pickle with 'data' and 'fine_labels' ({exc!r}); "
                           f"expected {LAYOUTS['cifar100'].format(root=root)}") from None
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise DatasetError(f"{path}: 'data' has shape {data.shape} for {len(labels)} labels; "
                           "expected (N, 3072) uint8 rows in CHW order")
    classes = cifar100_class_names(root)
    if labels and not 0 <= min(labels) <= max(labels) < len(classes):
        raise DatasetError(f"{path}: labels {min(labels)}..{max(labels)} but meta names {len(classes)} classes")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels, classes
