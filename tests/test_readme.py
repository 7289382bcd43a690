"""The README's commands run as written in a fresh shell after `make demo` (the venv activated
once, as the README says): every command of its shell blocks exists and takes the options
given, checked by a dry run where the tool has one and by its --help otherwise; nothing long
runs. Its MLflow links point at the experiments `mpvg tracking init` creates."""
from __future__ import annotations

import re
import shlex
import subprocess

import pytest

from conftest import ROOT, run

README = ROOT / "README.md"
ACTIVATE = "source .venv/bin/activate"
VENV_TOOLS = ("mpvg", "snakemake", "dvc", "mlflow", "pytest")


def shell_blocks(text: str) -> list[str]:
    return re.findall(r"^```(?:bash|sh|shell)\n(.*?)^```", text, flags=re.S | re.M)


def commands(block: str) -> list[list[str]]:
    """The simple commands of a shell block: comments, redirections and `&&`/`;`/`|` split off."""
    out = []
    for line in block.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        current: list[str] = []
        for w in [*words, ";"]:
            if w in ("&&", "||", ";", "|"):
                if current:
                    out.append(current)
                current = []
            elif current and current[-1] in (">", ">>", "<"):
                current.pop()  # a redirection and its file
            else:
                current.append(w)
    return out


ALL = [cmd for block in shell_blocks(README.read_text()) for cmd in commands(block)]


def by_program(*names: str) -> list[list[str]]:
    return [c for c in ALL if c[0] in names]


def test_every_readme_command_is_checked_and_the_venv_is_activated_before_use():
    known = {"make", "source", *VENV_TOOLS}
    assert [c for c in ALL if c[0] not in known] == []  # a new program needs its check below
    blocks = shell_blocks(README.read_text())
    first_tool = next(i for i, b in enumerate(blocks) if any(c[0] in VENV_TOOLS for c in commands(b)))
    activation = next(i for i, b in enumerate(blocks) if ACTIVATE in b)
    assert activation <= first_tool, "the activation line must come before the first venv command"
    assert [c for c in ALL if c[0] == "source"] == [ACTIVATE.split()]
    assert (ROOT / "Makefile").read_text().count("-m venv $(VENV)") == 1  # what makes .venv/bin/activate


@pytest.mark.parametrize("cmd", by_program("make"), ids=" ".join)
def test_make_targets_exist(cmd):
    res = subprocess.run(["make", "-n", *cmd[1:]], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr


def _mpvg_spans() -> list[list[str]]:
    """Inline `mpvg ...` code spans of the README's prose, besides its shell blocks; prose may
    name a value by a metavariable as --help does (`--seeds N`, `<cell>`): those are left out."""
    spans = [shlex.split(s) for s in re.findall(r"`(mpvg [^`<>]+)`", README.read_text())]
    return [s for s in spans if not any(re.fullmatch(r"[A-Z][A-Z_]*", w) for w in s)]


@pytest.mark.parametrize("cmd", by_program("mpvg") + _mpvg_spans(), ids=" ".join)
def test_mpvg_commands_parse(cmd):
    """The dry run of an `mpvg` command: its arguments parse and name a handler."""
    from mpvg.cli import build_parser, command_word

    argv = cmd[1:]
    if argv == ["--help"]:
        return
    args = build_parser(command_word(argv)).parse_args(argv)
    assert callable(getattr(args, "func", None)), cmd


def test_snakemake_commands_dry_run(workdir):
    """`snakemake ...` as written, with -n (the README's submitting line is its dry run too)."""
    runs = {tuple(c[1:]) if "-n" in c else ("-n", *c[1:]) for c in by_program("snakemake")}
    assert runs
    for argv in sorted(runs):
        res = run(["snakemake", *argv], workdir, timeout=180)
        assert res.returncode == 0 and "This was a dry-run" in res.stdout, res.stdout[-3000:]


def test_dvc_commands(workdir):
    """`dvc status` and `dvc dag` are read-only and run as written; `dvc repro` runs with --dry
    after a check that its stage exists (its dry run wants the data in place)."""
    cmds = by_program("dvc")
    assert {c[1] for c in cmds} == {"repro", "status", "dag"}
    stages = set(run(["dvc", "stage", "list", "--name-only"], workdir).stdout.split())
    for c in cmds:
        named = [w for w in c[2:] if not w.startswith("-")]
        assert set(named) <= stages, c
        res = run(["dvc", "repro", "--help"] if c[1] == "repro" else c, workdir, timeout=120)
        assert res.returncode == 0, res.stdout[-2000:]
        if c[1] == "dag" and named:
            assert all(f"| {n} |" in res.stdout for n in named), res.stdout
        if c[1] == "dag" and "--md" in c:
            assert res.stdout.startswith("```mermaid") and len(res.stdout) < 20_000


@pytest.mark.parametrize("cmd", by_program("mlflow", "pytest"), ids=" ".join)
def test_mlflow_and_pytest_commands_take_their_options(cmd):
    """These start a server or a test run: their --help must list every option used."""
    res = run([cmd[0], *cmd[1:2], "--help"] if cmd[0] == "mlflow" else ["pytest", "--help"], ROOT, timeout=120)
    assert res.returncode == 0, res.stdout[-2000:]
    for option in (w.split("=")[0] for w in cmd[1:] if w.startswith("-")):
        assert re.search(rf"(^|[\s,]){re.escape(option)}\b", res.stdout), option
    if cmd[0] == "pytest" and "-m" in cmd:
        markers = run(["pytest", "--markers"], ROOT, timeout=120).stdout
        expression = cmd[cmd.index("-m") + 1]
        names = set(re.findall(r"[A-Za-z_]\w*", expression)) - {"and", "or", "not"}
        assert names, expression
        for name in names:
            assert f"@pytest.mark.{name}:" in markers, (name, expression)


def test_mlflow_links_open_the_runs_tables_of_a_fresh_store(tmp_path):
    """The README's table of experiments: each link is runs_table_url of the id that
    `mpvg tracking init` gives that experiment in a fresh store (what `make demo` makes)."""
    from mpvg.config import load_params
    from mpvg.tracking import experiment_ids, experiment_name, init_store, project_experiments, runs_table_url

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    base = experiment_name(load_params(ROOT / "params.yaml"))
    init_store(uri, base)  # what `mpvg tracking init` does (the workflow's onstart)
    ids = experiment_ids(uri, base)
    rows = dict(re.findall(r"^\| `([^`]+)` \|[^|]*\| (http\S+) \|$", README.read_text(), flags=re.M))
    assert sorted(rows) == sorted(project_experiments(base))
    assert rows == {name: runs_table_url("http://127.0.0.1:5000", ids[name]) for name in rows}
    assert "--workers 1" in " ".join(" ".join(c) for c in by_program("mlflow"))
