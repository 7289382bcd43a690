"""The `mpvg` dispatcher: its static table of sub-commands agrees with the modules, every
sub-command has a description, light commands import no heavy library, a closed stdout ends
quietly. (How fast the light commands are is measured by benchmarks/bench_cli.py.)"""
from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mpvg.cli import BROKEN_PIPE_EXIT, COMMANDS, build_parser, command_word

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "timm", "torchvision", "mlflow", "matplotlib", "sklearn", "pycocotools", "mpvg.models")
# What people and the workflow run often; each must stay instant (no heavy import).
LIGHT = (["--help"], ["cells"], ["workflow", "cost"], ["workflow", "plan"], ["data", "check"],
         ["workflow", "check"], ["cells", "--help"], ["train", "--help"], ["report", "--help"])


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    return dict(action.choices) if action else {}


def walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = ("mpvg",)):
    yield path, parser
    for name, sub in subparsers(parser).items():
        yield from walk(sub, (*path, name))


def test_the_table_names_every_command_of_every_module_with_its_help():
    for module in dict.fromkeys(m for _, m, _ in COMMANDS):
        parser = argparse.ArgumentParser()
        action = parser.add_subparsers()
        importlib.import_module(module).register(action)
        registered = [(a.dest, a.help) for a in action._choices_actions]
        assert registered == [(n, h) for n, m, h in COMMANDS if m == module], module


def test_every_sub_command_has_a_description():
    parsers = dict(walk(build_parser("*")))
    nested = {("mpvg", "tracking", "sync"), ("mpvg", "workflow", "cost"), ("mpvg", "segment", "eval"),
              ("mpvg", "data", "check")}
    assert nested <= set(parsers)  # the walk reaches the nested commands
    assert [" ".join(p) for p, parser in parsers.items() if not (parser.description or "").strip()] == []


def test_help_lists_every_command_without_importing_any_area():
    parser = build_parser()
    listed = [(a.dest, a.help) for a in next(a for a in parser._actions
                                              if isinstance(a, argparse._SubParsersAction))._choices_actions]
    assert listed == [(n, h) for n, _, h in COMMANDS]
    assert command_word(["--params", "x"]) == "x" and command_word(["-h"]) is None
    assert command_word(["workflow", "cost", "--set", "scale=paper"]) == "workflow"


def test_a_command_missing_from_the_table_still_works(monkeypatch, capsys):
    """Every module is loaded for a word the table does not know, so a command whose row was
    forgotten is slow, not gone (the test above names the missing row)."""
    import mpvg.cli

    monkeypatch.setattr(mpvg.cli, "COMMANDS", tuple(c for c in COMMANDS if c[0] != "cells"))
    args = mpvg.cli.build_parser("cells").parse_args(["cells"])
    assert args.func.__module__ == "mpvg.workflow.commands"
    with pytest.raises(SystemExit, match="^2$"):
        mpvg.cli.build_parser("celss").parse_args(["celss"])
    assert "argument COMMAND: invalid choice: 'celss'" in capsys.readouterr().err


@pytest.mark.parametrize("argv", LIGHT, ids=" ".join)
def test_light_commands_import_no_heavy_library(argv):
    code = (f"import sys\nfrom mpvg.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
            f"print('HEAVY', sorted(m for m in {HEAVY!r} if m in sys.modules))")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert res.stdout.splitlines()[-1] == "HEAVY []", res.stdout[-2000:] + res.stderr[-2000:]


@pytest.mark.parametrize("argv", [["cells"], ["workflow", "plan"], ["--help"]], ids=" ".join)
def test_a_closed_stdout_ends_quietly(argv):
    """`mpvg cells | head -2`: the reader is gone before the output is written."""
    read, write = os.pipe()
    os.close(read)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    try:
        res = subprocess.run([sys.executable, "-m", "mpvg", *argv], cwd=REPO, env=env, stdout=write,
                             stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write)
    assert res.stderr == ""
    # argparse drops --help's text quietly itself (exit 0); our handlers end like coreutils (141)
    assert res.returncode == (0 if argv == ["--help"] else BROKEN_PIPE_EXIT)


def test_a_bare_mpvg_prints_the_help_and_fails(capsys):
    from mpvg.cli import main

    assert main([]) == 2
    assert "cells" in capsys.readouterr().out
