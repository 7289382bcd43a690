"""``mpvg launch --nproc-per-node N COMMAND ...``: one process per GPU on one node, with preemption
that works (docs/training.md, "Preemption").

Why not torchrun: SLURM signals every process of a job step, or only the launcher, depending on
``--signal``; torchrun 2.14 dies at once of SIGUSR1 (its workers are orphaned), and on SIGTERM it
kills its workers after a grace period and exits 1, never with the requeue code. This launcher:

* gives each worker its own GPU (``CUDA_VISIBLE_DEVICES`` = one device): the devices SLURM (or
  the user) made visible to the job, or on a workstation N devices it locks for the job (one
  ``fcntl`` lock file per device, held until every worker ended: concurrent jobs get disjoint
  GPUs, and a lock dies with its holders, so no job waits for a dead one); see :func:`devices`;
* starts ``python -m mpvg COMMAND ...`` N times with torchrun's environment (``RANK``,
  ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR=127.0.0.1``, a free
  ``MASTER_PORT``), so :mod:`mpvg.run.distributed` sets up the process group as under torchrun;
* forwards SIGTERM, SIGUSR1 and SIGINT to every worker (a worker that already got the signal from
  SLURM only sees it twice: its handler just sets a flag), so every rank saves one consistent
  checkpoint at the same step whether the signal reached only the launcher or every process;
* stops the workers too when its own parent dies (``MPVG_STOP_WITH_PARENT=1``, set by the Snakefile);
* when one worker fails, stops the others (SIGTERM, then SIGKILL after ``--grace`` seconds: a peer
  blocked in a collective would otherwise wait for the backend's timeout);
* exits 0 when every worker did, :data:`REQUEUE_EXIT_CODE` when the workers stopped on a signal
  after saving, else the first failing worker's code.

Plain Python (no torch import): it starts at once.
"""
from __future__ import annotations

import errno
import fcntl
import glob
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Sequence

from mpvg.run import REQUEUE_EXIT_CODE
from mpvg.runinfo import CPUS_PER_PROCESS_ENV

FORWARDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
POLL_S = 0.2
# The GPUs of a workstation: NVIDIA's device files, or MPVG_GPUS stand-in devices (a machine whose
# GPUs the files do not show, and the tests). Locks live in MPVG_GPU_LOCK_DIR.
GPU_COUNT_ENV = "MPVG_GPUS"
LOCK_DIR_ENV = "MPVG_GPU_LOCK_DIR"
DEFAULT_LOCK_DIR = "/tmp/mpvg-gpu-locks"
WAIT_REPORT_S = 60.0
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
                    "NUMEXPR_NUM_THREADS")


def machine_gpus() -> int:
    """GPUs of this machine: ``MPVG_GPUS`` if set, else the ``/dev/nvidiaN`` device files."""
    if os.environ.get(GPU_COUNT_ENV, "").strip():
        value = os.environ[GPU_COUNT_ENV].strip()
        if not value.isdigit():
            raise ValueError(f"{GPU_COUNT_ENV} must be a whole number of GPUs, got {value!r}")
        return int(value)
    return len([p for p in glob.glob("/dev/nvidia[0-9]*") if p[len("/dev/nvidia"):].isdigit()])


def _try_lock(path: str) -> int | None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        if err.errno in (errno.EAGAIN, errno.EACCES):
            return None
        raise
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} since {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n".encode())
    return fd


def lock_devices(n: int, total: int, lock_dir: str | None = None) -> tuple[list[str], list[int]]:
    """Lock ``n`` of this machine's ``total`` GPUs (the lowest free ones): their indices and the
    lock file descriptors. Waits while fewer are free, saying for whom once a minute; a lock is
    released when every process holding its descriptor has ended, however it ended."""
    if n > total:
        raise ValueError(f"the job asks for {n} GPUs; this machine has {total} "
                         f"({GPU_COUNT_ENV} or /dev/nvidia*): run it with fewer (--nproc-per-node)")
    lock_dir = lock_dir or os.environ.get(LOCK_DIR_ENV) or DEFAULT_LOCK_DIR
    os.makedirs(lock_dir, exist_ok=True)
    started = next_report = time.monotonic()
    while True:
        held: dict[str, int] = {}
        for i in range(total):
            fd = _try_lock(os.path.join(lock_dir, f"gpu{i}.lock"))
            if fd is not None:
                held[str(i)] = fd
                if len(held) == n:
                    return list(held), list(held.values())
        for fd in held.values():
            os.close(fd)
        if time.monotonic() >= next_report:
            busy = []
            for i in range(total):
                try:
                    with open(os.path.join(lock_dir, f"gpu{i}.lock")) as f:
                        busy.append(f"gpu{i}: {f.read().strip() or 'free'}")
                except OSError:
                    pass
            print(f"mpvg launch: waiting for {n} free GPUs of {total} ({time.monotonic() - started:.0f} s so far; "
                  f"locks in {lock_dir}): " + "; ".join(busy), file=sys.stderr, flush=True)
            next_report = time.monotonic() + WAIT_REPORT_S
        time.sleep(1.0)


def devices(nproc: int) -> tuple[list[str] | None, list[int]]:
    """The device of each worker and the lock descriptors to hold: the ``CUDA_VISIBLE_DEVICES``
    the job was given (SLURM binds them; no locks), else ``nproc`` locked GPUs of this machine;
    ``(None, [])`` on a machine without GPUs (the workers run on CPU)."""
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    if given is not None:
        visible = [d.strip() for d in given.split(",") if d.strip()]
        if not visible:
            return None, []
        if len(visible) < nproc:
            raise ValueError(f"{nproc} processes but CUDA_VISIBLE_DEVICES={given} gives {len(visible)} GPUs: "
                             "ask the scheduler for one GPU per process")
        return visible[:nproc], []
    total = machine_gpus()
    if total == 0:
        return None, []
    return lock_devices(nproc, total)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(rank: int, world: int, port: int, base: dict | None = None, device: str | None = None) -> dict:
    env = dict(os.environ if base is None else base)
    # the job's threads (Snakemake's OMP_NUM_THREADS = the rule's threads, else the SLURM task's
    # CPUs, else the machine's) shared by its workers: N workers with the job's count each would
    # oversubscribe the CPUs N times (measured on the test cluster: a 4-process tiny DeiT-S epoch took 14-23 s with
    # MKL_NUM_THREADS=2 per worker, 1.4-2.5 s with 1). Snakemake sets the
    # BLAS libraries' variables too; torch's thread pool follows MKL_NUM_THREADS as well.
    total = env.get("OMP_NUM_THREADS") or env.get("SLURM_CPUS_PER_TASK") or str(os.cpu_count() or 1)
    per_worker = str(max(1, int(total) // world)) if total.isdigit() else "1"
    for name in THREAD_VARIABLES:
        env[name] = per_worker
    # the CPUs allocated to the job (SLURM's task, else this process's affinity), shared by its
    # workers: what each one counts in its result's cpu_hours (mpvg.runinfo.cpus_per_process)
    job_cpus = env.get("SLURM_CPUS_PER_TASK") or str(len(os.sched_getaffinity(0)))
    env[CPUS_PER_PROCESS_ENV] = str(max(1, int(job_cpus) // world)) if job_cpus.isdigit() else "1"
    if device is not None:
        env["CUDA_VISIBLE_DEVICES"] = device  # this worker's GPU only: it is cuda:0 in the process
    env.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                "LOCAL_WORLD_SIZE": str(world), "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port), "TORCHELASTIC_RUN_ID": f"mpvg-{os.getpid()}"})
    env["MPVG_STOP_WITH_PARENT"] = "1"  # a worker whose launcher dies saves and stops
    return env


def exit_code(codes: Sequence[int]) -> int:
    """0 if all 0; the requeue code if every worker ended 0 or with it; else the first failure
    (a worker killed by signal S counts as 128 + S, as a shell reports it)."""
    norm = [128 - c if c < 0 else c for c in codes]
    if all(c == 0 for c in norm):
        return 0
    if all(c in (0, REQUEUE_EXIT_CODE) for c in norm):
        return REQUEUE_EXIT_CODE
    return next(c for c in norm if c not in (0, REQUEUE_EXIT_CODE))


def launch(nproc: int, argv: Sequence[str], grace: float = 60.0) -> int:
    """Run ``python -m mpvg *argv`` in ``nproc`` processes; return the exit code (see module doc)."""
    if nproc < 1:
        raise ValueError(f"--nproc-per-node must be at least 1, got {nproc}")
    port = free_port()
    parent = os.getppid()
    watch_parent = os.environ.get("MPVG_STOP_WITH_PARENT") == "1"
    received: list[int] = []
    procs: list[subprocess.Popen] = []

    def forward(signum, frame) -> None:
        received.append(signum)
        for p in procs:
            if p.poll() is None:
                try:
                    p.send_signal(signum)
                except ProcessLookupError:
                    pass

    old = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    locks: list[int] = []
    try:
        assigned, locks = devices(nproc)
        if assigned is not None:
            print(f"mpvg launch: {nproc} processes on GPUs {','.join(assigned)}", file=sys.stderr, flush=True)
        for rank in range(nproc):
            # the workers hold the device locks too (pass_fds): the GPUs stay locked until the last one ends
            procs.append(subprocess.Popen([sys.executable, "-m", "mpvg", *argv], pass_fds=locks,
                                          env=worker_env(rank, nproc, port,
                                                         device=None if assigned is None else assigned[rank])))
        stop_sent_at = None
        while True:
            codes = [p.poll() for p in procs]
            if all(c is not None for c in codes):
                return exit_code(codes)
            failed = [c for c in codes if c not in (None, 0, REQUEUE_EXIT_CODE)]
            if failed and stop_sent_at is None:
                print(f"mpvg launch: a worker exited with code {failed[0]}; stopping the others",
                      file=sys.stderr)
                forward(signal.SIGTERM, None)
                stop_sent_at = time.monotonic()
            if watch_parent and os.getppid() != parent and stop_sent_at is None:
                print("mpvg launch: the parent process is gone; stopping the workers (they save a checkpoint)",
                      file=sys.stderr)
                forward(signal.SIGTERM, None)
                stop_sent_at = time.monotonic()
            if stop_sent_at is not None and time.monotonic() - stop_sent_at > grace:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
            time.sleep(POLL_S)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for fd in locks:
            os.close(fd)
