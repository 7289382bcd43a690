"""Run metadata: git commit, SLURM job id, compute accounting and atomic file writes.

Small, dependency-free helpers shared by training, tracking and the other areas that write
run outputs (``runs/<stage>/<cell>/seed<k>/result.json``, see docs/contracts.md).
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import IO, Iterator

_COMMIT_CACHE: dict[str, str] = {}


def project_root(start: str | os.PathLike | None = None) -> Path:
    """The nearest folder at or above ``start`` (default: the working directory) that holds
    ``params.yaml``, ``pyproject.toml`` or ``.git``; the working directory when none does."""
    here = Path(start or os.getcwd()).resolve()
    for folder in (here, *here.parents):
        if any((folder / marker).exists() for marker in ("params.yaml", "pyproject.toml", ".git")):
            return folder
    return here


def git_commit(root: str | os.PathLike | None = None) -> str:
    """The commit of the code that runs: ``$MPVG_GIT_COMMIT`` if set (for copies without
    ``.git``), else ``git rev-parse HEAD`` in ``root``, with ``-dirty`` when tracked files
    changed; ``"unknown"`` when neither is available."""
    if os.environ.get("MPVG_GIT_COMMIT"):
        return os.environ["MPVG_GIT_COMMIT"]
    root = str(Path(root or Path(__file__).resolve().parent).resolve())
    if root not in _COMMIT_CACHE:
        try:
            run = dict(cwd=root, capture_output=True, text=True, timeout=10, check=True)
            sha = subprocess.run(["git", "rev-parse", "HEAD"], **run).stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], **run).stdout.strip()
            _COMMIT_CACHE[root] = sha + ("-dirty" if dirty else "")
        except (OSError, subprocess.SubprocessError):
            _COMMIT_CACHE[root] = "unknown"
    return _COMMIT_CACHE[root]


def slurm_job_id() -> str | None:
    """``<array job>_<task>`` for an array task, else ``$SLURM_JOB_ID``; None outside SLURM."""
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        return f"{array_job}_{task}"
    return os.environ.get("SLURM_JOB_ID") or None


#: set by `mpvg launch` for each worker: its share of the job's CPUs
CPUS_PER_PROCESS_ENV = "MPVG_CPUS_PER_PROCESS"


def cpus_per_process() -> int:
    """CPU cores this process may use: its share of the job's under `mpvg launch`
    (``MPVG_CPUS_PER_PROCESS``: one SLURM task or machine split over N workers), else SLURM's
    allocation of its task, else the affinity mask."""
    if os.environ.get(CPUS_PER_PROCESS_ENV, "").isdigit():
        return int(os.environ[CPUS_PER_PROCESS_ENV])
    if os.environ.get("SLURM_CPUS_PER_TASK"):
        return int(os.environ["SLURM_CPUS_PER_TASK"])
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def compute_hours(wall_time_s: float, device_type: str, world_size: int) -> dict[str, float]:
    """Allocated resources of a run: ``gpu_hours`` (one GPU per process on CUDA) and
    ``cpu_hours`` (cores per process times processes), both from the wall time."""
    gpus = world_size if device_type == "cuda" else 0
    return {
        "gpu_hours": round(wall_time_s * gpus / 3600.0, 6),
        "cpu_hours": round(wall_time_s * cpus_per_process() * world_size / 3600.0, 6),
    }


def result_record(spec, seed: int, *, pe: dict, params: int, measured: dict, wall_time_s: float,
                  device_type: str, world_size: int, checkpoint, mlflow_run_id: str | None,
                  init_from, history: list) -> dict:
    """The ``result.json`` of a finished run (docs/contracts.md): the cell's identity, what the
    job measured (``measured``: metrics, epochs, ...), and where and how it ran. One record for
    classification and downstream jobs, so the report reads the same fields from both."""
    cell = spec.cell
    return {
        "cell": cell.id, "stage": cell.stage, "task": cell.task, "model": cell.model, "method": cell.method,
        "dataset": spec.dataset, "seed": seed, "scale": spec.scale, "pe": pe, "params": params,
        **measured, "wall_time_s": round(wall_time_s, 3),
        **compute_hours(wall_time_s, device_type, world_size),
        "device": device_type, "world_size": world_size, "git_commit": git_commit(),
        "checkpoint": str(checkpoint), "mlflow_run_id": mlflow_run_id, "slurm_job_id": slurm_job_id(),
        "init_from": str(init_from) if init_from else None, "tables": list(cell.tables), "history": history,
    }


def current_umask() -> int:
    """The process's umask, read without changing it (``/proc/self/status``; else the
    set-and-restore idiom)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Write ``path`` all at once: a temporary file in the same folder, flushed and fsynced,
    then ``os.replace``'d over ``path``. A crash leaves the old file (or none), never half of one;
    the run folder's life cycle removes such leftovers (``.<name>.*.tmp``) at the next start.
    The file gets the permissions a plain ``open()`` would give (0666 minus the umask), not
    ``mkstemp``'s 0600, so the group of a shared project can read results and checkpoints."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~current_umask())
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def read_json_object(path: str | os.PathLike) -> dict | None:
    """The JSON object in ``path``; None when the file is missing, unreadable or not an object
    (a record that cannot be read counts as no record)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_json_atomic(path: str | os.PathLike, obj) -> Path:
    """``obj`` as indented JSON at ``path``, written with :func:`atomic_open`."""
    with atomic_open(path, "w") as handle:
        json.dump(obj, handle, indent=2, sort_keys=False, default=str)
        handle.write("\n")
    return Path(path)
