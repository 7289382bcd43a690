"""`mpvg data tiny` (write the tiny datasets) and `mpvg data check` (are the grid's datasets there?).

argparse only at import time; the handlers import what they need.
"""
from __future__ import annotations

import argparse

from mpvg.config import add_params_arguments


def register(subparsers) -> None:
    p = subparsers.add_parser("data", help="generate the tiny datasets, check dataset roots",
                              description="Dataset utilities. Nothing is ever downloaded.")
    sub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)

    t = sub.add_parser("tiny", help="write the tiny datasets (from scikit-learn's digits) in the real layouts",
                       description="Write data/tiny/{imagenet,cifar-100-python,coco,ADEChallengeData2016} "
                       "in the same on-disk layouts as the real datasets; a complete dataset is left alone.")
    t.add_argument("--out", default="data/tiny", help="output folder (default: data/tiny)")
    t.add_argument("--what", default="all", choices=["all", "imagenet", "cifar100", "coco", "ade20k"])
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=_tiny)

    c = sub.add_parser("check", help="check every dataset the current scale's grid needs (--deep: decode every file)",
                       description="Check the roots in params.yaml (at its scale) of every dataset the "
                       "grid uses: one line per dataset, with what is wrong and how to get or point to it. "
                       "Cheap by default (folder listings, class names of train and val, COCO annotation "
                       "file ends). --deep also reads every image (and COCO's annotations in full) in "
                       "parallel and lists each bad file. Exit code 1 if anything is missing or bad.")
    add_params_arguments(c)
    c.add_argument("--deep", action="store_true",
                   help="also decode every image and label, and check COCO's annotations and image sizes")
    c.add_argument("--workers", type=int, default=None, metavar="N",
                   help="processes for --deep (default: the available cores)")
    c.add_argument("--no-progress", action="store_true", help="no progress bar for --deep")
    c.set_defaults(func=_check)


def _tiny(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mpvg.data.tiny import TINY_NAMES, make_tiny

    status = make_tiny(args.out, args.what, args.seed)
    notes = {"written": "written", "exists": "already complete"}
    for name, state in status.items():
        print(f"{name}: {Path(args.out) / TINY_NAMES[name]}: {notes[state]}")
    return 0


def _advice(name: str, root: str, scale: str) -> str:
    """How to get dataset ``name`` to ``root``: the tiny generator for a tiny root, else the
    source of the real data and the params key to point at it."""
    from pathlib import Path

    from mpvg.data import SOURCES
    from mpvg.data.tiny import TINY_NAMES

    path = Path(root)
    if scale == "tiny" and path.name == TINY_NAMES[name]:  # where `mpvg data tiny --out <parent>` writes it
        cmd = "mpvg data tiny" + ("" if path.parent == Path("data/tiny") else f" --out {path.parent}")
        return f"run `{cmd}`" + (f" (after removing {root})" if path.exists() else "")
    return (f"get {SOURCES[name]}; put it at {root}, or set datasets.{name}.root in params.yaml "
            f"(or --set datasets.{name}.root=PATH)")


def _check(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mpvg.config import ConfigError, dataset_classes, expand_cells, params_from_args
    from mpvg.data import LAYOUTS, SPLITS, DatasetError, check_dataset

    try:
        params = params_from_args(args)
    except ConfigError as err:
        print(f"error: {err}")
        return 2
    if args.workers is not None and args.workers < 1:
        print(f"error: --workers {args.workers}: expected at least 1")
        return 2
    scale = params["scale"]
    cells = expand_cells(params).values()
    needed = sorted({c.dataset for c in cells})
    broken = bad_files = 0
    for name in needed:
        ds = params["datasets"][name]
        root = str(ds["root"])
        problems, num_classes = [], None
        if not Path(root).is_dir():
            problems.append(f"{root} does not exist; expected {LAYOUTS[name].format(root=root)}")
        for split in SPLITS if not problems else ():
            try:
                num_classes = check_dataset(name, root, split, ds["num_classes"], dataset_classes(ds))["num_classes"]
            except DatasetError as err:
                if str(err) not in problems:
                    problems.append(str(err))
        if problems:
            broken += 1
            users = sum(c.dataset == name for c in cells)
            state = "BAD     " if Path(root).is_dir() else "MISSING "
            print(f"{state} {name} (used by {users} cells): {' | '.join(problems)}; {_advice(name, root, scale)}")
            continue
        print(f"ok       {name}: {root} ({', '.join(SPLITS)}{f', {num_classes} classes' if num_classes else ''})")
        if args.deep:
            malformed, bad = _deep(name, root, args)
            broken += malformed
            bad_files += bad
    if broken or bad_files:
        print(f"{broken} of {len(needed)} datasets missing or malformed, {bad_files} bad files"
              f"{'' if args.deep else ' (files not decoded; --deep does)'} at scale {scale!r}")
        return 1
    print(f"all {len(needed)} datasets present at scale {scale!r}"
          f"{', every file decodes' if args.deep else ''}")
    return 0


def _deep(name: str, root: str, args: argparse.Namespace) -> tuple[bool, int]:
    """Check the annotations (COCO) or arrays (CIFAR-100) of both splits in full and decode
    every file; print each problem and bad file; return (malformed, number of bad files)."""
    from mpvg.data import SPLITS, DatasetError
    from mpvg.data.integrity import available_cores, file_jobs, verify_files

    workers = args.workers or available_cores()
    malformed, bad = False, 0
    for split in SPLITS:
        try:
            jobs = file_jobs(name, root, split)
        except DatasetError as err:
            print(f"BAD      {name} {split}: {err}")
            malformed = True
            continue
        if not jobs:  # CIFAR-100: arrays in pickles, read and checked by file_jobs
            print(f"deep     {name} {split}: arrays and labels read, nothing to decode")
            continue
        found = verify_files(jobs, workers, progress=not args.no_progress, desc=f"{name} {split}")
        for path, problem in found:
            print(f"BAD      {path}: {problem}")
        bad += len(found)
        what = "image/label pairs" if name == "ade20k" else "images"
        print(f"deep     {name} {split}: {len(jobs)} {what} decoded with {workers} processes, {len(found)} bad")
    return malformed, bad
