"""Shared fixtures: a throw-away copy of the workflow files to run Snakemake/DVC in."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# A shell that starts the suite in the background (`cmd &`, nohup, some CI runners) ignores SIGINT,
# and an ignored signal stays ignored through exec: every Snakemake the tests start would then
# ignore Ctrl-C (the interrupted-DAG test ran its DAG to the end and exited 0). A handler is reset
# to the default on exec, so the tools start as they do from a terminal.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (once this socket is closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(folder: Path, port: int | None = None):
    """A real `mlflow server` on 127.0.0.1 (one worker; SQLite backend and artifacts in
    ``folder``), ready to answer: yields ``(uri, process)``; the caller may kill the process.
    Stopped at the end either way."""
    import urllib.request

    port = port or free_port()
    proc = subprocess.Popen(
        ["mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{folder / 'server.db'}", "--artifacts-destination", str(folder / "artifacts")],
        cwd=folder, env=tool_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError("mlflow server did not start") from None
                time.sleep(0.5)
        yield uri, proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


def processes_in(folder: Path) -> dict[int, str]:
    """The processes (pid -> command line) whose working directory is ``folder`` or below it, this
    one excepted: what Snakemake started there (its jobs run in the workflow folder)."""
    root = os.path.realpath(folder)
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # gone, or another user's
            continue
        if cwd == root or cwd.startswith(root + os.sep):
            found[int(entry.name)] = cmdline
    return found


def wait_until_no_process_in(folder: Path, timeout: float = 120) -> None:
    """Until every process working in ``folder`` has exited (e.g. the jobs of a Snakemake that was
    stopped); fails listing those still there after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while left := processes_in(folder):
        assert time.monotonic() < deadline, f"still running in {folder} after {timeout:g} s: {left}"
        time.sleep(0.2)


def copy_workflow(dest: Path) -> Path:
    """The workflow files copied into ``dest`` (created), a fresh git repository (DVC wants one)."""
    dest.mkdir(parents=True)
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


@contextlib.contextmanager
def cluster_up(install: bool):
    """scripts/slurm-cluster.sh up for the session (``install``: apt-get it if missing, else only
    where SLURM is installed); stopped at the end unless it was already running. Yields
    `up`'s CompletedProcess, or None when nothing was tried."""
    if os.geteuid() != 0 or not (install or shutil.which("slurmctld")):
        yield None
        return
    status = subprocess.run([str(SLURM_SCRIPT), "status"], capture_output=True, text=True)
    was_up = "slurmctld running" in status.stdout and "slurmd-n1 running" in status.stdout
    up = subprocess.run([str(SLURM_SCRIPT), "up"], capture_output=True, text=True, timeout=900)
    try:
        yield up
    finally:
        if not was_up:
            subprocess.run([str(SLURM_SCRIPT), "down"], capture_output=True, text=True, timeout=300)


TOOL_TESTS_WORTH_A_CLUSTER = 8  # tests that run the tools (`workdir`)


@pytest.fixture(scope="session")
def slurm_answers(request):
    """Where SLURM is installed, its controller is up while the tools run: the SLURM executor
    plugin (2.8) runs `scontrol show config` when Snakemake imports it, at every start, and with
    SLURM installed but its controller down that call waits 9 s (its connect retries) before
    failing. On a machine without SLURM nothing is started (`scontrol` is not found: no wait).
    Starting and stopping the cluster costs about 25 s, so a session of a few tool tests
    (fewer than TOOL_TESTS_WORTH_A_CLUSTER) leaves it as it is."""
    tool_tests = sum("workdir" in item.fixturenames for item in request.session.items)
    with cluster_up(install=False) if tool_tests >= TOOL_TESTS_WORTH_A_CLUSTER else contextlib.nullcontext():
        yield


@pytest.fixture
def workdir(tmp_path: Path, slurm_answers) -> Path:
    """A copy of the workflow files in a fresh git repository (DVC wants one)."""
    return copy_workflow(tmp_path / "repo")


@pytest.fixture(scope="session")
def slurm_cluster():
    """Start the test cluster (scripts/slurm-cluster.sh: two nodes of 4 stand-in GPUs) once per
    session (installing it with apt-get if needed); stop it afterwards unless it was already running."""
    if os.geteuid() != 0:
        pytest.skip("the SLURM test cluster needs root (CI runs as root)")
    with cluster_up(install=True) as up:
        assert up.returncode == 0, up.stdout + up.stderr
        yield


@pytest.fixture
def one_torch_thread():
    """torch on one thread: on a busy 2-core machine two threads per test ran up to 20x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="session")
def _private_tracking_store(tmp_path_factory):
    """In-process commands of the tests log to a store of their own, never to the checkout's
    mlruns.db (subprocesses get their store from tool_env(), which drops this variable)."""
    store = tmp_path_factory.mktemp("mlflow") / "mlruns.db"
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store}"
    yield
    if old is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old
