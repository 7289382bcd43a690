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

    c = sub.add_parser("check", help="check every dataset the current scale's grid needs",
                       description="Check the roots in params.yaml (at its scale) of every dataset the "
                       "grid uses; print what is missing. Exit code 1 if anything is.")
    add_params_arguments(c)
    c.set_defaults(func=_check)


def _tiny(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mpvg.data.tiny import TINY_NAMES, make_tiny

    status = make_tiny(args.out, args.what, args.seed)
    notes = {"written": "written", "exists": "already complete",
             "skipped": "skipped (its module mpvg.data.{} is not in this checkout)"}
    for name, state in status.items():
        print(f"{name}: {Path(args.out) / TINY_NAMES[name]}: {notes[state].format(name)}")
    return 0


def _check(args: argparse.Namespace) -> int:
    from mpvg.config import ConfigError, dataset_classes, expand_cells, params_from_args
    from mpvg.data import DatasetError, check_dataset

    try:
        params = params_from_args(args)
    except ConfigError as err:
        print(f"error: {err}")
        return 2
    cells = expand_cells(params).values()
    needed = sorted({c.dataset for c in cells})
    missing = 0
    for name in needed:
        ds = params["datasets"][name]
        users = sum(c.dataset == name for c in cells)
        for split in ("train", "val"):
            try:
                info = check_dataset(name, ds["root"], split, ds["num_classes"], dataset_classes(ds))
                extra = f", {info['num_classes']} classes" if info["num_classes"] else ""
                print(f"ok       {name} {split}: {ds['root']}{extra}")
            except DatasetError as err:
                missing += 1
                print(f"MISSING  {name} {split} (used by {users} cells): {err}")
    if missing:
        hint = "run `mpvg data tiny`" if params["scale"] == "tiny" else "see docs/config.md (datasets)"
        print(f"{missing} dataset split(s) missing at scale {params['scale']!r}; {hint}")
        return 1
    print(f"all {len(needed)} datasets present at scale {params['scale']!r}")
    return 0
