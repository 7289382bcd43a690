"""A slice of the tiny DAG through a real one-node SLURM cluster (scripts/slurm-cluster.sh).

The profile is the real `slurm` one, with the test's partition and sizes on the command line
(the way a user overrides it); the jobs must go through sbatch (sacct records, plugin logs).
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import SLURM_SCRIPT as SCRIPT, run, tool_env

pytestmark = pytest.mark.slurm

TEST_OVERRIDES = [
    "--profile", "slurm", "--config", "scale=tiny", "cluster=test",
    # the one place a user sets the partition, overridden here with small sizes for CI
    "--default-resources", "slurm_partition=debug", "runtime=20", "mem_mb=1500",
    "slurm_extra='--signal=TERM@300'",
    "--slurm-init-seconds-before-status-checks", "2", "--slurm-keep-successful-logs", "--jobs", "2",
]


def snakemake_on_slurm(workdir: Path, *args: str, timeout: float = 240) -> tuple[int, str]:
    """Run Snakemake; on timeout send SIGINT so it scancels its jobs (SIGTERM would wait)."""
    proc = subprocess.Popen(["snakemake", *TEST_OVERRIDES, *args], cwd=workdir, env=tool_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        pytest.fail(f"snakemake did not finish in {timeout} s:\n{out[-3000:]}")
    return proc.returncode, out


def slurm_job_ids(log: str) -> list[str]:
    return re.findall(r"has been submitted with SLURM jobid (\d+)", log)


def sacct_states(job_ids: list[str]) -> dict[str, str]:
    res = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ",".join(job_ids)],
                         capture_output=True, text=True, check=True)
    return dict(line.split("|", 1) for line in res.stdout.split())


def test_tiny_slice_runs_through_sbatch(slurm_cluster, workdir):
    """Tiny data + one training cell as two SLURM jobs; a second run has nothing to do."""
    target = "runs/train/c100-vit_lite-mpvg/seed0/result.json"
    code, log = snakemake_on_slurm(workdir, "--config", "scale=tiny", "cluster=test",
                                   "set=[tiny.recipes.vit_lite_c100.epochs=1]", "--", target)
    assert code == 0, log[-4000:]
    assert (workdir / target).is_file() and (workdir / target.replace("result.json", "checkpoint.pt")).is_file()
    ids = slurm_job_ids(log)
    assert len(ids) == 2, log[-3000:]
    assert set(sacct_states(ids).values()) == {"COMPLETED"}
    logs = {rule: list((workdir / ".snakemake/slurm_logs" / f"rule_{rule}").rglob(f"{job_id}.log"))
            for rule, job_id in zip(("data_tiny", "train"), ids)}
    assert all(len(found) == 1 for found in logs.values()), logs
    # the job ran the planned command inside SLURM
    train_log = logs["train"][0].read_text()
    assert "mpvg train --params params.yaml --set tiny.recipes.vit_lite_c100.epochs=1 --set scale=tiny" in train_log
    # the MLflow store was created before the jobs (onstart) and the run is in it
    assert (workdir / "mlruns.db").is_file()

    def dry_run(*overrides):
        return run(["snakemake", "-n", *TEST_OVERRIDES[:2], "--config", "scale=tiny", "cluster=test",
                    f"set=[{','.join(overrides)}]", "--", target], workdir).stdout

    # the rerun rule: another recipe changed -> nothing to do; this cell's recipe changed -> rerun
    again = dry_run("tiny.recipes.vit_lite_c100.epochs=1", "tiny.recipes.t2t_c100.epochs=2")
    assert "Nothing to be done" in again, again[-2000:]
    changed = dry_run("tiny.recipes.vit_lite_c100.epochs=2")
    # the plan set the stale result aside (its kept copy): Snakemake sees a missing output
    assert re.search(r"rule train:(.|\n)*reason: Missing output files: runs/train/c100-vit_lite-mpvg/seed0/result\.json",
                     changed), \
        changed[-2000:]
    assert "train@c100-vit_lite-mpvg-seed0: stale (recipe.epochs: 1 -> 2" in changed, changed[:3000]


def test_status_polling_with_squeue(slurm_cluster, workdir):
    """The documented option for clusters without accounting: poll with squeue."""
    code, log = snakemake_on_slurm(workdir, "--slurm-status-command", "squeue", "--", "data/tiny/imagenet")
    assert code == 0, log[-4000:]
    assert len(slurm_job_ids(log)) == 1 and (workdir / "data/tiny/imagenet").is_dir()


@pytest.mark.slow
def test_signal_before_the_time_limit_resumes_the_run(slurm_cluster, workdir):
    """SIGTERM to every process of a running training job step (what the profile's
    `--signal=TERM@300` sends before the limit): the per-job Snakemake waits, the run saves its
    checkpoint and exits 75, Snakemake resubmits it, and it resumes. squeue names the cell and seed."""
    import time

    run_dir = workdir / "runs/train/c100-vit_lite-mpvg/seed0"
    proc = subprocess.Popen(["snakemake", *TEST_OVERRIDES, "--retries", "1", "--",
                             str(run_dir.relative_to(workdir) / "result.json")],
                            cwd=workdir, env=tool_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (run_dir / "checkpoint.pt").exists():  # a first epoch is done: signal the job
            assert proc.poll() is None and time.monotonic() < deadline, "training never checkpointed"
            time.sleep(1)
        jobs = subprocess.run(["squeue", "-h", "-o", "%i %k"], capture_output=True, text=True).stdout.split("\n")
        line = next(line for line in jobs if "rule_train" in line)
        assert "c100-vit_lite-mpvg" in line and line.rstrip().endswith("0"), line  # the comment: cell, seed
        job_id = line.split()[0]
        subprocess.run(["scancel", "--signal=TERM", job_id], check=True)
        out, _ = proc.communicate(timeout=300)
    except BaseException:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
        raise
    assert proc.returncode == 0, out[-4000:]
    assert "Trying to restart job" in out
    assert len(slurm_job_ids(out)) == 3  # data, train, train again
    assert (run_dir / "result.json").is_file()
    assert "resumed from" in (run_dir / "log.txt").read_text()
    ends = [line for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"event": "end"' in line]
    assert '"KILLED"' in ends[0] and '"FINISHED"' in ends[-1]  # stopped by the signal, then finished
