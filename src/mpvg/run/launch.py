"""``mpvg launch --nproc-per-node N COMMAND ...``: one process per GPU on one node, with preemption
that works (docs/training.md, "Preemption").

Why not torchrun: SLURM signals every process of a job step, or only the launcher, depending on
``--signal``; torchrun 2.14 dies at once of SIGUSR1 (its workers are orphaned), and on SIGTERM it
kills its workers after a grace period and exits 1, never with the requeue code. This launcher:

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

import os
import signal
import socket
import subprocess
import sys
import time
from typing import Sequence

from mpvg.run import REQUEUE_EXIT_CODE

FORWARDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
POLL_S = 0.2


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(rank: int, world: int, port: int, base: dict | None = None) -> dict:
    env = dict(os.environ if base is None else base)
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
    try:
        for rank in range(nproc):
            procs.append(subprocess.Popen([sys.executable, "-m", "mpvg", *argv],
                                          env=worker_env(rank, nproc, port)))
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
