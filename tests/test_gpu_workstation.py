"""The GPU workstation (profiles/local): jobs that run at once get disjoint GPUs. `mpvg launch`
locks one file per device (fcntl) for as long as any of its workers lives, and gives each worker
its own CUDA_VISIBLE_DEVICES; a lock dies with its holders, so no job waits for a dead one.
Stand-in GPUs: MPVG_GPUS=N (the real count comes from /dev/nvidiaN)."""
from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tool_env

HOLD = """
import sys, time
from mpvg.run.launch import devices
got, fds = devices(int(sys.argv[1]))
print("GOT", ",".join(got), flush=True)
time.sleep(float(sys.argv[2]))
"""


def holder(n: int, seconds: float, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", HOLD, str(n), str(seconds)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def next_line(stream, timeout: float, what: str) -> str:
    """The next line ``stream`` gives, waiting at most ``timeout`` s for one; fails naming ``what``."""
    ready, _, _ = select.select([stream], [], [], timeout)
    assert ready, f"not within {timeout:g} s: {what}"
    return stream.readline()


def got(proc: subprocess.Popen, timeout: float = 60) -> list[str]:
    line = next_line(proc.stdout, timeout, f"pid {proc.pid} says which GPUs it got")
    assert line.startswith("GOT "), (line, proc.stderr.read() if proc.poll() is not None else "")
    return line.split()[1].split(",")


@pytest.fixture
def stand_in_gpus(tmp_path):
    env = tool_env(MPVG_GPUS="4", MPVG_GPU_LOCK_DIR=str(tmp_path / "locks"))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def test_concurrent_jobs_get_disjoint_gpus_and_a_dead_jobs_gpus_come_back(stand_in_gpus):
    first = holder(3, 300, stand_in_gpus)
    second = None
    try:
        assert got(first) == ["0", "1", "2"]
        second = holder(2, 300, stand_in_gpus)  # one GPU is free: it waits, saying for whom
        message = next_line(second.stderr, 60, f"pid {second.pid} says it waits for GPUs")
        assert message.startswith("mpvg launch: waiting for 2 free GPUs of 4") and f"pid {first.pid}" in message, message
        os.kill(first.pid, signal.SIGKILL)  # a job that dies without cleaning up
        first.wait()
        assert got(second) == ["0", "1"]  # its locks died with it
    finally:
        for p in (first, second):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()


def test_launch_gives_each_worker_its_own_gpu(stand_in_gpus):
    """`mpvg launch` end to end: two workers of a real `mpvg` sub-command, each with one device,
    disjoint from a job already holding GPU 0."""
    first = holder(1, 300, stand_in_gpus)
    try:
        assert got(first) == ["0"]
        res = subprocess.run([sys.executable, "-m", "mpvg", "launch", "--nproc-per-node", "2", "cells"],
                             env=stand_in_gpus, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stdout + res.stderr
        assert "mpvg launch: 2 processes on GPUs 1,2" in res.stderr
    finally:
        first.kill()
        first.wait()
    from mpvg.run.launch import worker_env

    env = worker_env(1, 2, 29500, base={"CUDA_VISIBLE_DEVICES": "0,1,2,3"}, device="2")
    assert env["CUDA_VISIBLE_DEVICES"] == "2" and env["RANK"] == "1" and env["WORLD_SIZE"] == "2"


def test_a_job_larger_than_the_machine_or_its_allocation_is_an_error(stand_in_gpus):
    res = subprocess.run([sys.executable, "-m", "mpvg", "launch", "--nproc-per-node", "5", "models"],
                         env=stand_in_gpus, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert "the job asks for 5 GPUs; this machine has 4 (MPVG_GPUS or /dev/nvidia*)" in res.stderr, res.stderr
    given = dict(stand_in_gpus, CUDA_VISIBLE_DEVICES="0,1")  # what SLURM (or the user) gave the job
    res = subprocess.run([sys.executable, "-m", "mpvg", "launch", "--nproc-per-node", "4", "models"],
                         env=given, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert "4 processes but CUDA_VISIBLE_DEVICES=0,1 gives 2 GPUs" in res.stderr, res.stderr


def test_each_worker_counts_its_share_of_the_job_cpus(monkeypatch):
    """cpu_hours in result.json: 4 workers of one SLURM task of 52 CPUs count 13 each (they used to
    count 52 each, 4 times the allocation); a worker of a multi-node srun job (its own task) and a
    single process count their task's CPUs."""
    from mpvg.run.launch import worker_env
    from mpvg.runinfo import compute_hours, cpus_per_process

    env = worker_env(3, 4, 29500, base={"SLURM_CPUS_PER_TASK": "52"})
    assert env["MPVG_CPUS_PER_PROCESS"] == "13"
    monkeypatch.setenv("MPVG_CPUS_PER_PROCESS", env["MPVG_CPUS_PER_PROCESS"])
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "52")
    assert cpus_per_process() == 13
    assert compute_hours(3600.0, "cuda", 4) == {"gpu_hours": 4.0, "cpu_hours": 52.0}
    monkeypatch.delenv("MPVG_CPUS_PER_PROCESS")  # srun: one task per process
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "13")
    assert compute_hours(3600.0, "cuda", 4) == {"gpu_hours": 4.0, "cpu_hours": 52.0}
