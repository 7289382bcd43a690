"""Bad files: the one place where a failure to read an image becomes a :class:`DatasetError`
naming it, the COCO annotation checks, and `mpvg data check --deep` (decode every file of a
dataset in parallel and list the bad ones).

torch-free (PIL, json): the deep check's worker processes stay light.

Policy (docs/reliability.md, "Bad data"): an image that cannot be decoded during training is
an error naming its path (`mpvg train` exits 2 with that one line), never skipped: a skipped
image would change the data a number comes from without anyone choosing it.  The deep check
lists every bad file at once, so they can be fixed or removed in one go.
"""
from __future__ import annotations

import json
import os
import struct
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from PIL import Image, UnidentifiedImageError

from mpvg.data import (COCO_DIRS, LAYOUTS, DatasetError, ade20k_pairs, check_dataset, examples_of,
                       imagefolder_samples, load_cifar100)

# What PIL (and the OS) raise for a missing, unreadable, truncated or malformed image file.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)
COCO_KEYS = ("images", "annotations", "categories")
COCO_IMAGE_KEYS = ("id", "file_name", "width", "height")
COCO_ANN_KEYS = ("id", "image_id", "category_id", "bbox", "area", "iscrowd", "segmentation")


def one_line(exc: BaseException) -> str:
    """``"Type: message"`` on one line (PIL's "cannot identify image file <_io...>" without the
    file object: the caller names the path)."""
    text = "cannot identify image file" if isinstance(exc, UnidentifiedImageError) else " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def bad_image(path: str | os.PathLike, problem: str) -> DatasetError:
    return DatasetError(f"{path}: {problem}; `mpvg data check --deep` lists every bad file of the dataset")


@contextmanager
def decode_errors(path: str | os.PathLike) -> Iterator[None]:
    """``with decode_errors(path), open(path, "rb") as f: ...``: any failure to open or decode
    the image in the block is re-raised as one :class:`DatasetError` line naming ``path``."""
    try:
        yield
    except DECODE_ERRORS as exc:
        raise bad_image(path, f"cannot read this image ({one_line(exc)})") from None


# ------------------------------------------------------------------------------ COCO
def read_coco_annotations(ann_file: str | Path, img_dir: str | Path) -> dict:
    """The parsed instances file, after checking everything Mask R-CNN training and COCO
    evaluation rely on; each problem is a :class:`DatasetError` naming the file.

    Checked: valid JSON; ``images``, ``annotations``, ``categories`` lists; the keys of each
    entry; unique image and category ids; every annotation's ``image_id`` and ``category_id``
    known (an unknown category would otherwise be dropped silently); every image file present
    in ``img_dir`` (one folder listing, no file opened).
    """
    ann_file, img_dir = Path(ann_file), Path(img_dir)
    try:
        with open(ann_file, "rb") as f:
            doc = json.load(f)
    except json.JSONDecodeError as err:
        raise DatasetError(f"{ann_file}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno}, "
                           f"byte {err.pos} of {ann_file.stat().st_size}; truncated?)") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DatasetError(f"{ann_file}: cannot read ({one_line(err)})") from None
    where = f"{ann_file}:"
    if not isinstance(doc, dict):
        raise DatasetError(f"{where} a JSON {type(doc).__name__}; expected a COCO instances object with "
                           f"{list(COCO_KEYS)}")
    for key in COCO_KEYS:
        if not isinstance(doc.get(key), list):
            found = "missing" if key not in doc else f"a {type(doc[key]).__name__}"
            raise DatasetError(f"{where} {key!r} is {found}; expected a COCO instances file with the lists "
                               f"{list(COCO_KEYS)} (found keys {sorted(doc)})")
    if not doc["categories"]:
        raise DatasetError(f"{where} 'categories' is empty; expected the dataset's classes ({{'id', 'name'}} each)")
    cat_ids = _unique_ids(doc["categories"], "categories", ("id", "name"), where)
    img_ids = _unique_ids(doc["images"], "images", COCO_IMAGE_KEYS, where)
    _require_keys(doc["annotations"], "annotations", COCO_ANN_KEYS, where)
    unknown_cat = [a for a in doc["annotations"] if a["category_id"] not in cat_ids]
    if unknown_cat:
        a = unknown_cat[0]
        raise DatasetError(f"{where} {len(unknown_cat)} annotations have a category_id not in 'categories', e.g. "
                           f"annotation {a['id']} with category_id {a['category_id']!r} (known: "
                           f"{sorted(cat_ids)[:10]}{' ...' if len(cat_ids) > 10 else ''})")
    unknown_img = [a for a in doc["annotations"] if a["image_id"] not in img_ids]
    if unknown_img:
        a = unknown_img[0]
        raise DatasetError(f"{where} {len(unknown_img)} annotations have an image_id not in 'images', e.g. "
                           f"annotation {a['id']} with image_id {a['image_id']!r}")
    on_disk = {e.name for e in os.scandir(img_dir)} if img_dir.is_dir() else set()
    missing = [im["file_name"] for im in doc["images"]
               if im["file_name"] not in on_disk and not (img_dir / im["file_name"]).is_file()]
    if missing:
        raise DatasetError(f"{img_dir}: {len(missing)} of {len(doc['images'])} images named in {ann_file} are "
                           f"missing, e.g. {examples_of(missing)}")
    return doc


def _require_keys(entries: list, what: str, keys: Sequence[str], where: str) -> None:
    for i, entry in enumerate(entries):
        lacking = [k for k in keys if not isinstance(entry, dict) or k not in entry]
        if lacking:
            raise DatasetError(f"{where} {what}[{i}] has no {lacking}; expected every entry to have {list(keys)}")


def _unique_ids(entries: list, what: str, keys: Sequence[str], where: str) -> set:
    _require_keys(entries, what, keys, where)
    ids = [e["id"] for e in entries]
    seen: set = set()
    for i in ids:
        if i in seen:
            raise DatasetError(f"{where} {what} id {i!r} occurs more than once; expected unique ids")
        seen.add(i)
    return seen


# ------------------------------------------------------------------------------ decoding every file
def _decode_rgb(path: str) -> tuple[int, int]:
    with open(path, "rb") as f, Image.open(f) as im:
        return im.convert("RGB").size


def verify_file(job: tuple) -> tuple[str, str] | None:
    """``None`` if the job's file(s) decode (and agree), else ``(path, problem)``.

    Jobs: ``("rgb", path)``; ``("coco", path, width, height)`` (size as the annotation says);
    ``("ade20k", image, label)`` (the label a single-channel image of the image's size).
    """
    kind, path = job[0], job[1]
    try:
        size = _decode_rgb(path)
        if kind == "coco" and size != (job[2], job[3]):
            return path, f"decodes to {size[0]}x{size[1]} but the annotations say {job[2]}x{job[3]}"
        if kind == "ade20k":
            path = job[2]
            with open(path, "rb") as f, Image.open(f) as lab:
                lab.load()
                if len(lab.getbands()) != 1:
                    return path, f"a {lab.mode} image; expected a single-channel label PNG"
                if lab.size != size:
                    return path, f"label is {lab.size[0]}x{lab.size[1]} but its image {job[1]} is {size[0]}x{size[1]}"
    except DECODE_ERRORS as exc:
        return path, f"cannot read this image ({one_line(exc)})"
    return None


def file_jobs(name: str, root: str | Path, split: str) -> list[tuple]:
    """The files of one split of dataset ``name`` as :func:`verify_file` jobs, after the
    structural checks (COCO annotations, CIFAR pickles: a :class:`DatasetError` if bad)."""
    check_dataset(name, root, split)
    root = Path(root)
    if name == "imagenet":
        return [("rgb", path) for path, _ in imagefolder_samples(root / split)[1]]
    if name == "cifar100":
        load_cifar100(root, split)  # arrays, nothing to decode: their shapes and labels are the check
        return []
    if name == "coco":
        img_dir = root / COCO_DIRS[split]
        doc = read_coco_annotations(root / "annotations" / f"instances_{split}2017.json", img_dir)
        return [("coco", str(img_dir / im["file_name"]), im["width"], im["height"]) for im in doc["images"]]
    if name == "ade20k":
        _, images, labels = ade20k_pairs(root, split)
        return [("ade20k", str(i), str(lab)) for i, lab in zip(images, labels)]
    raise DatasetError(f"unknown dataset {name!r}; expected one of {sorted(LAYOUTS)}")


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def verify_files(jobs: Sequence[tuple], workers: int | None = None, progress: bool = True,
                 desc: str = "decode") -> list[tuple[str, str]]:
    """Decode every job's files in ``workers`` processes (default: the available cores), with a
    progress bar on stderr; returns the bad ones as ``(path, problem)``, sorted by path."""
    from tqdm import tqdm

    workers = available_cores() if workers is None else workers
    if workers < 1:
        raise ValueError(f"--workers {workers}: expected at least 1")
    pool = None
    if workers > 1 and len(jobs) > 1:  # started before the bar's monitor thread: no fork with threads
        import multiprocessing

        pool = multiprocessing.Pool(min(workers, len(jobs)))
    bad = []
    try:
        results: Iterator = (map(verify_file, jobs) if pool is None else
                             pool.imap_unordered(verify_file, jobs, chunksize=max(1, min(64, len(jobs) // (4 * workers)))))
        with tqdm(total=len(jobs), desc=desc, unit="file", disable=not progress, file=sys.stderr,
                  mininterval=0.5, dynamic_ncols=True) as bar:
            for res in results:
                bar.update()
                if res is not None:
                    bad.append(res)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    return sorted(bad)
