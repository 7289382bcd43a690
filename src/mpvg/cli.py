"""The ``mpvg`` command line: one entry point that Snakemake, DVC and people call.

Each area of the package owns a light ``commands`` module (argparse only at import time;
heavy imports inside the handlers) that adds its sub-commands here, so ``mpvg --help`` is
fast and lists everything.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# Modules that define ``register(subparsers)``; each handler is set with ``set_defaults(func=...)``
# and returns an exit code.
COMMAND_MODULES = (
    "mpvg.models.commands",      # mpvg params, mpvg models
    "mpvg.data.commands",        # mpvg data ...
    "mpvg.training.commands",    # mpvg train, mpvg eval
    "mpvg.downstream.commands",  # mpvg detect ..., mpvg segment ...
    "mpvg.analysis.commands",    # mpvg analyze ...
    "mpvg.reporting.commands",   # mpvg report
    "mpvg.workflow.commands",    # mpvg cells, mpvg check-inputs, ...
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mpvg",
        description="Rebuild the results of MPVG (AAAI 2025): models, training, downstream "
        "tasks, analysis figures and report tables. Every sub-command has its own --help.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name and name.startswith(err.name):  # area not present in this checkout
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
