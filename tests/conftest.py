"""Shared fixtures: a throw-away copy of the workflow files to run Snakemake/DVC in."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# What a DAG run needs besides the installed package (src/ is imported from the checkout).
SLURM_SCRIPT = ROOT / "scripts" / "slurm-cluster.sh"
WORKFLOW_FILES = ("Snakefile", "workflow", "profiles", "slurm", "params.yaml", "dvc.yaml", ".dvc", ".dvcignore")


def tool_env(**extra) -> dict:
    """The environment for `snakemake`, `dvc`, `mpvg` subprocesses: this venv first on PATH."""
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(extra)
    return env


def run(cmd: list[str], cwd: Path, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``cmd`` in ``cwd``; stdout and stderr together in ``.stdout``."""
    return subprocess.run(cmd, cwd=cwd, env=env or tool_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A copy of the workflow files in a fresh git repository (DVC wants one)."""
    dest = tmp_path / "repo"
    dest.mkdir()
    for name in WORKFLOW_FILES:
        src = ROOT / name
        if src.is_symlink():
            os.symlink(os.readlink(src), dest / name)
        elif src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("tmp", "cache", "__pycache__"))
        elif src.exists():
            shutil.copy2(src, dest / name)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    return dest


@pytest.fixture(scope="session")
def slurm_cluster():
    """Start the one-node cluster (scripts/slurm-cluster.sh) once per session (installing it with apt-get if needed); stop it afterwards
    unless it was already running."""
    if os.geteuid() != 0:
        pytest.skip("the one-node SLURM cluster needs root (CI runs as root)")
    status = subprocess.run([str(SLURM_SCRIPT), "status"], capture_output=True, text=True)
    was_up = "slurmctld running" in status.stdout and "slurmd running" in status.stdout
    up = subprocess.run([str(SLURM_SCRIPT), "up"], capture_output=True, text=True, timeout=900)
    assert up.returncode == 0, up.stdout + up.stderr
    yield
    if not was_up:
        subprocess.run([str(SLURM_SCRIPT), "down"], capture_output=True, text=True, timeout=300)


@pytest.fixture
def one_torch_thread():
    """torch on one thread: on a busy 2-core machine two threads per test ran up to 20x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
