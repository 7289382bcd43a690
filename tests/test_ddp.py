"""DDP: two CPU processes (gloo, launched by torchrun) follow the one-process run with the same
global batch. Augmentations stay on: they are seeded per sample, not per process; the tiny
recipe has no dropout, drop-path or mixup, whose streams are per process."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from test_training import (CELL, assert_same_weights, cli_env, reference, tiny_data,  # noqa: F401
                           weights)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_two_processes_match_one_process_with_the_same_global_batch(reference, tmp_path):
    params, ref_run, ref = reference
    out = tmp_path / "ddp"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "mpvg", "train", "--params", str(params), "--cell", CELL, "--out", str(out), "--no-tracking",
         "--device", "cpu"],
        cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((out / "result.json").read_text())
    assert result["world_size"] == 2
    log = (out / "log.txt").read_text()
    assert "batch 32 (16 per process)" in log and "on 2 x cpu (gloo)" in log
    assert log.count("done:") == 1  # rank 0 alone writes
    assert_same_weights(weights(out / "checkpoint.pt"), weights(ref_run / "checkpoint.pt"), atol=1e-4)
    for key in ("top1", "top5"):
        assert result["metrics"][key] == pytest.approx(ref["metrics"][key], abs=1.0)  # one image of 200 at most
    assert result["metrics"]["loss"] == pytest.approx(ref["metrics"]["loss"], abs=1e-3)
    losses = [h["train_loss"] for h in result["history"]]
    assert losses == pytest.approx([h["train_loss"] for h in ref["history"]], abs=1e-4)
    assert torch.load(out / "checkpoint.pt", weights_only=False)["rng"].__len__() == 2  # both ranks' RNG kept


def test_ranks_come_from_torchrun_or_srun_and_never_from_a_bare_batch_script(monkeypatch):
    import os

    from mpvg.run.distributed import _env_ranks

    # _env_ranks writes RANK/WORLD_SIZE/MASTER_* into os.environ (as srun needs); give it a copy so
    # nothing leaks into later tests (monkeypatch.delenv records nothing for an absent key).
    monkeypatch.setattr(os, "environ", dict(os.environ))
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_STEP_NUM_TASKS",
                "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS", "SLURM_JOB_ID", "SLURM_LAUNCH_NODE_IPADDR"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "8")  # sbatch --ntasks=8 without srun: one process
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert _env_ranks() == (0, 0, 1)
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "8")  # srun: task 5 of 8, local 1
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    monkeypatch.setenv("SLURM_LAUNCH_NODE_IPADDR", "10.0.0.7")
    assert _env_ranks() == (5, 1, 8)
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"], os.environ["RANK"]) == ("10.0.0.7", "29734", "5")
    monkeypatch.setenv("RANK", "3")  # torchrun's variables win
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert _env_ranks() == (3, 3, 4)


@pytest.mark.slow
def test_the_metrics_of_a_two_process_run_are_those_of_the_checkpoint_it_saves(tiny_data, tmp_path):
    """CeiT has BatchNorm: each rank updates its running statistics from its own batches. The
    sharded evaluation and the checkpoint (rank 0's state) must be one model, so that result.json
    says what `mpvg eval` of the saved checkpoint says (without the sync before evaluation the
    losses were 4.4e-4 apart on this run)."""
    from test_training import write_params

    params = write_params(tmp_path, tiny_data)
    common = ["--params", str(params), "--set", "tiny.recipes.ceit.epochs=1", "--cell", "in1k-ceit_ti-mpvg"]
    out = tmp_path / "ddp"
    proc = subprocess.run([sys.executable, "-m", "mpvg", "launch", "--nproc-per-node", "2", "train", *common,
                           "--out", str(out), "--no-tracking", "--device", "cpu"],
                          cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    trained = json.loads((out / "result.json").read_text())["metrics"]
    proc = subprocess.run([sys.executable, "-m", "mpvg", "eval", *common, "--checkpoint", str(out / "checkpoint.pt"),
                           "--device", "cpu"], cwd=tmp_path, env=cli_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    evaluated = json.loads(proc.stdout)["metrics"]
    assert trained["top1"] == evaluated["top1"] and trained["top5"] == evaluated["top5"]
    assert trained["loss"] == pytest.approx(evaluated["loss"], abs=1e-6)  # one summation order vs another
