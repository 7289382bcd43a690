"""The ``mpvg`` command line: one entry point that Snakemake, DVC and people call.

Each area of the package owns a ``commands`` module that adds its sub-commands
(``register(subparsers)``; handlers set with ``set_defaults(func=...)`` return an exit code).
``COMMANDS`` below names every top-level sub-command with its module and one-line help, so
``mpvg --help`` imports no area at all and ``mpvg <command>`` imports only the module of that
command (``mpvg.models.commands`` imports the ``mpvg.models`` package, i.e. torch and timm;
``mpvg cells`` must not pay for that). tests/test_cli.py checks the table against the modules:
a command added to a module needs its row here.

A closed stdout (``mpvg cells | head -2``) ends the command quietly with status 141
(128 + SIGPIPE), as coreutils do.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# (name, module that registers it, its help): the order of `mpvg --help`.
COMMANDS: tuple[tuple[str, str, str], ...] = (
    ("params", "mpvg.models.commands", "#Params of every cell of Tables 1 and 2, counted from the built models"),
    ("models", "mpvg.models.commands", "list the registered mpvg models (timm names) and their paper names"),
    ("data", "mpvg.data.commands", "generate the tiny datasets, check dataset roots"),
    ("train", "mpvg.training.commands", "train one classification cell for one seed (resumable; `mpvg launch` for several GPUs)"),
    ("eval", "mpvg.training.commands", "top-1/top-5/loss of a checkpoint on a cell's validation set"),
    ("launch", "mpvg.training.commands",
     "run a training command in N processes on this node (preemption-safe torchrun)"),
    ("tracking", "mpvg.training.commands",
     "MLflow store: create it before parallel jobs, complete runs that lost their server"),
    ("detect", "mpvg.downstream.commands",
     "COCO instance segmentation with Mask R-CNN on a ViT-Adapter-Ti of each PE method (Table 3)"),
    ("segment", "mpvg.downstream.commands",
     "ADE20K semantic segmentation with UperNet on a ViT-Adapter-Ti of each PE method (Table 4)"),
    ("analyze", "mpvg.analysis.commands", "draw Figures 2, 4, 6, 7, 8 from checkpoints (PNG + PDF) and analysis.json"),
    ("report", "mpvg.reporting.commands", "write the paper's tables (Markdown + LaTeX) from runs/**/result.json"),
    ("cells", "mpvg.workflow.commands", "list the cells of the grid (id, stage, tables, start point, resources)"),
    ("status", "mpvg.workflow.commands",
     "where the DAG stands: finished, running (epoch k of n), stale, pending runs per table"),
    ("workflow", "mpvg.workflow.commands", "the job plan behind the Snakefile and dvc.yaml"),
)
DESCRIPTION = ("Rebuild the results of MPVG (AAAI 2025): models, training, downstream tasks, analysis "
               "figures and report tables. Every sub-command has its own --help.")
BROKEN_PIPE_EXIT = 128 + 13  # what a shell reports for a process ended by SIGPIPE


def command_word(argv: list[str]) -> str | None:
    """The sub-command named on the command line (the first word that is not an option)."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``mpvg`` parser with the full arguments of ``command``'s module and a bare entry (name
    and help) for every other command. ``"*"``, or a word the table does not name (a typo, or a
    command a module added without its row here), loads every module: slow, never wrong."""
    parser = argparse.ArgumentParser(prog="mpvg", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    known = command is None or any(n == command for n, _, _ in COMMANDS)
    modules = {m for _, m, _ in COMMANDS} if not known or command == "*" else {m for n, m, _ in COMMANDS if n == command}
    for module in dict.fromkeys(m for _, m, _ in COMMANDS if m in modules):
        importlib.import_module(module).register(sub)
    for name, _, help_ in COMMANDS:
        if name not in sub.choices:
            sub.add_parser(name, help=help_, description=help_)
    return parser


def _run(argv: list[str]) -> int:
    parser = build_parser(command_word(argv))
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if os.environ.get("DVC_STAGE") and hasattr(args, "params"):
        problem = _stale_under_dvc(args)
        if problem:
            print(f"mpvg {args.command}: {problem}", file=sys.stderr)
            return 2
    return int(args.func(args) or 0)


def _stale_under_dvc(args: argparse.Namespace) -> str | None:
    """Under DVC (a stage's command), whether dvc.yaml still matches params.yaml: a stage run from
    a stale dvc.yaml stops with what to run instead (mpvg.workflow.dvcyaml). Here, at the command
    line, because mpvg.config imports nothing above it."""
    from mpvg.config import ConfigError, params_from_args
    from mpvg.workflow.dvcyaml import stale_under_dvc

    try:
        params = params_from_args(args)
    except ConfigError:
        return None  # the command itself reports it
    return stale_under_dvc(args.params, list(args.overrides or []), params)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        try:
            code = _run(argv)
        finally:  # output still buffered (also after --help's SystemExit) goes out here
            sys.stdout.flush()
    except BrokenPipeError:
        # the reader went away (`| head`): no traceback, and no second error when Python
        # flushes stdout at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return BROKEN_PIPE_EXIT
    return code


if __name__ == "__main__":
    sys.exit(main())
