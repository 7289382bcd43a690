"""A slice of the tiny DAG through a real one-node SLURM cluster (scripts/slurm-cluster.sh).

The profile is the real `slurm` one, with the test's partition and sizes on the command line
(the way a user overrides it); the jobs must go through sbatch (sacct records, plugin logs).
"""
from __future__ import annotations

import json
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


@pytest.mark.slow  # ~70 s; the default suite submits through the plugin in the 1x4 placement test
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
    # the run reads its stale marker (made by the local rule `stale`) and Snakemake's params
    # trigger fires too, since it keeps the record of the first run here
    assert re.search(r"rule train:(.|\n)*?reason: Input files updated by another job: "
                     r"runs/\.stale/train@c100-vit_lite-mpvg-seed0\.0; Params have changed since last execution",
                     changed), changed[-2000:]
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


# --------------------------------------------------------------------------- GPU jobs: placement
# The test cluster's nodes have 4 stand-in GPUs and 4 CPUs each (scripts/slurm-cluster.sh). Each job
# is a tiny DeiT-S run with the paper's geometry (config job_gpus): 1 node x 4 GPUs, 2 nodes x 2 GPUs
# (the node shape says 2 GPUs per node, so the plan spreads 4 GPUs over 2 nodes), 1 GPU. No
# per-process randomness (test_training.write_params), so every geometry follows the one-process
# run of the same global batch.
GPU_CELL = "in1k-deit_s-mpvg"
GPU_TARGET = f"runs/train/{GPU_CELL}/seed0/result.json"
GPU_EPOCHS = 6  # 6 x 7 steps: the preemption tests signal after the first epoch, with 5 epochs to spare
GPU_BATCH = 128  # global: 8 steps an epoch on the 1000 tiny images (few collectives on 2 busy cores)
GEOMETRIES = {  # name: (GPUs of the job, node_gpus of the shape, nodes, processes per node)
    "1x4": (4, 4, 1, 4),
    "2x2": (4, 2, 2, 2),
    "1x1": (1, 4, 1, 1),
}
PLACEMENT = re.compile(r"^mpvg: process rank (\d+) of (\d+) \(local rank (\d+)\) on node (\S+), "
                       r"CUDA_VISIBLE_DEVICES=([^,\s]+(?:,[^,\s]+)*), device ([^,\s]+)", re.M)


def gpu_args(geometry: str) -> list[str]:
    gpus, node_gpus, _, _ = GEOMETRIES[geometry]
    return ["--config", "scale=tiny", "cluster=test", f"job_gpus={gpus}", f"node_gpus={node_gpus}", "node_cpus=4",
            "node_mem_mb=4000", "--", GPU_TARGET]


def gpu_workdir(base: Path, data_root: Path) -> Path:
    """A copy of the workflow whose params train the tiny DeiT-S of test_training on ``data_root``."""
    from conftest import copy_workflow
    from test_training import write_params

    copy_workflow(base)
    write_params(base, data_root, epochs=GPU_EPOCHS, batch_size=GPU_BATCH)
    return base


def start_snakemake(workdir: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(["snakemake", *TEST_OVERRIDES, *args], cwd=workdir, env=tool_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float) -> str:
    try:
        return proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)  # Snakemake scancels its jobs
        out = proc.communicate(timeout=60)[0]
        pytest.fail(f"snakemake did not finish in {timeout} s:\n{out[-3000:]}")


def placements(job_log: str) -> list[tuple]:
    """(rank, world, local rank, node, CUDA_VISIBLE_DEVICES, device) of every process a job started."""
    return [(int(r), int(w), int(lr), node, cvd, dev) for r, w, lr, node, cvd, dev in PLACEMENT.findall(job_log)]


class GpuRuns:
    """Each geometry's job through `snakemake --profile slurm`, run when a test first asks for it,
    and the one-process run of the same global batch (``reference``)."""

    def __init__(self, base: Path):
        from mpvg.data.tiny import make_tiny

        self.base, self.data, self.done = base, base / "tiny", {}
        make_tiny(self.data, "imagenet")
        params = gpu_workdir(base / "params", self.data) / "params.yaml"
        self.reference = base / "reference"
        res = subprocess.run(["mpvg", "train", "--params", str(params), "--cell", GPU_CELL, "--seed", "0",
                              "--out", str(self.reference), "--no-tracking", "--device", "cpu"],
                             env=tool_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stdout + res.stderr

    def __call__(self, geometry: str) -> tuple[Path, str, int]:
        """(workdir, Snakemake's output, its exit code) of the uninterrupted job of ``geometry``."""
        import time

        if geometry not in self.done:
            workdir = gpu_workdir(self.base / geometry, self.data)
            start = time.monotonic()
            proc = start_snakemake(workdir, *gpu_args(geometry))
            try:
                out = finish(proc, 900)
            finally:
                if proc.poll() is None:  # SIGINT: Snakemake scancels its jobs
                    proc.send_signal(signal.SIGINT)
                    proc.communicate(timeout=60)
            print(f"GPU job {geometry} through snakemake --profile slurm: {time.monotonic() - start:.0f} s")
            self.done[geometry] = (workdir, out, proc.returncode)
        return self.done[geometry]


@pytest.fixture(scope="module")
def gpu_runs(slurm_cluster, tmp_path_factory):
    return GpuRuns(tmp_path_factory.mktemp("gpu"))


def job_ids_of(log: str) -> list[str]:
    return slurm_job_ids(log)


@pytest.mark.parametrize("geometry", ["1x4", pytest.param("2x2", marks=pytest.mark.slow),
                                      pytest.param("1x1", marks=pytest.mark.slow)])
def test_gpu_job_runs_one_process_per_gpu_bound_to_its_own_device(gpu_runs, geometry):
    """The job asks SLURM for its GPUs over its nodes; it runs exactly N processes, each on a distinct
    (node, GPU) that SLURM allocated to it, in one group of world size N, and ends with the result of
    the one-process run of the same global batch."""
    from test_training import assert_same_weights, weights

    workdir, log, code = gpu_runs(geometry)
    ref = gpu_runs.reference
    gpus, _, nodes, per_node = GEOMETRIES[geometry]
    assert code == 0, log[-4000:]
    run_dir = workdir / GPU_TARGET.rsplit("/", 1)[0]
    procs = placements((run_dir / "job.log").read_text())
    assert len(procs) == gpus, procs
    assert sorted(p[0] for p in procs) == list(range(gpus)) and {p[1] for p in procs} == {gpus}
    bound = {(p[3], p[4]) for p in procs}
    assert len(bound) == gpus and all("," not in cvd for _, cvd in bound)  # one GPU each, none shared
    by_node = {}
    for rank, _, local, node, _, device in procs:
        by_node.setdefault(node, []).append(local)
        assert device == "cpu"  # stand-in devices: no CUDA behind them
    assert len(by_node) == nodes and all(sorted(v) == list(range(per_node)) for v in by_node.values()), by_node
    # what SLURM allocated: nodes and GPUs (sacct's AllocTRES), the job's submission
    job_id = job_ids_of(log)[-1]
    alloc = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "NNodes,AllocTRES"], capture_output=True,
                           text=True, check=True).stdout.split("\n")[0]
    assert alloc.startswith(f"{nodes}|") and f"gres/gpu={gpus}" in alloc, alloc
    result = json.loads((run_dir / "result.json").read_text())
    assert result["world_size"] == gpus
    # float tolerance: after 84 AdamW steps the 4-process runs were 2.4e-4 (0.2% of the largest
    # weight) from the one-process run, their losses 1.7e-6 apart; 1 process is bit-identical
    assert_same_weights(weights(run_dir / "checkpoint.pt"), weights(ref / "checkpoint.pt"),
                        atol=0.0 if gpus == 1 else 1e-3)
    ref_result = json.loads((ref / "result.json").read_text())
    assert result["metrics"]["loss"] == pytest.approx(ref_result["metrics"]["loss"], abs=1e-4)
    if geometry == "2x2":  # the same 4 ranks, over 2 nodes or on 1: the same reductions, the same bits
        assert_same_weights(weights(run_dir / "checkpoint.pt"),
                            weights(gpu_runs("1x4")[0] / GPU_TARGET.rsplit("/", 1)[0] / "checkpoint.pt"))


# --------------------------------------------------------------------------- GPU jobs: preemption
def squeue_job_of(cell: str) -> str:
    """The SLURM job id of the running job of ``cell`` (the plugin's comment names rule and cell)."""
    lines = subprocess.run(["squeue", "-h", "-o", "%i %t %k"], capture_output=True, text=True).stdout.splitlines()
    ids = [line.split()[0] for line in lines if cell in line and " R " in line]
    assert len(ids) == 1, lines
    return ids[0]


def release_requeue_hold(job_id: str, deadline: float) -> None:
    """SLURM holds a requeued job for 120 s (pending, reason BeginTime) before it may start again;
    once the job is back in the queue, the test makes it eligible at once, as an operator may
    (`scontrol update StartTime=now`). The job, its processes and its resume are unchanged: only
    the scheduler's wait is cut, which is 2 minutes of CI time per requeue test."""
    import time

    while True:
        state = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T %r"], capture_output=True,
                               text=True).stdout.split()
        if state == ["PENDING", "BeginTime"]:
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)
            return
        assert time.monotonic() < deadline, f"job {job_id} was never queued again after `scontrol requeue`: {state}"
        time.sleep(0.5)


@pytest.mark.slow
@pytest.mark.parametrize("geometry", ["1x4", "2x2"])
@pytest.mark.parametrize("how", ["time limit", "requeue"])
def test_preempted_gpu_job_comes_back_and_ends_bit_exact(gpu_runs, tmp_path, geometry, how):
    """Mid-run, what a time limit sends (`--signal=TERM@300`: TERM to the job's steps, which
    `scancel --signal=TERM` sends the same way) or `scontrol requeue` (the job killed and queued
    again): every rank stops at the same step, saves one consistent checkpoint and exits 75; the job
    comes back (Snakemake resubmits it, or SLURM restarts it under the same id) and resumes, and
    the finished weights equal the uninterrupted run's of the same geometry bit for bit."""
    import time

    import torch

    from test_training import assert_same_weights, weights

    reference = gpu_runs(geometry)[0] / GPU_TARGET.rsplit("/", 1)[0]
    assert (reference / "result.json").is_file(), "the uninterrupted run of this geometry failed"
    gpus = GEOMETRIES[geometry][0]
    work = gpu_workdir(tmp_path / "work", gpu_runs.data)
    run_dir = work / GPU_TARGET.rsplit("/", 1)[0]
    proc = start_snakemake(work, "--retries", "1", *gpu_args(geometry))
    try:
        deadline = time.monotonic() + 600
        # the run's own journal: the first epoch's checkpoint is written (five epochs are left)
        while not (run_dir / "checkpoint.pt").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the job never checkpointed"
            time.sleep(0.5)
        job_id = squeue_job_of(GPU_CELL)
        if how == "time limit":
            subprocess.run(["scancel", "--signal=TERM", job_id], check=True)
        else:
            subprocess.run(["scontrol", "requeue", job_id], check=True)
            release_requeue_hold(job_id, deadline)
        out = finish(proc, 900)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.communicate(timeout=60)
    assert proc.returncode == 0, out[-4000:]
    # the run stopped (its journal: KILLED, then FINISHED after the restart) and resumed from the
    # checkpoint every rank gave its state to (N RNG states), after the first epoch; the job that
    # came back ran N processes again (Snakemake starts job.log afresh for each attempt)
    ends = [json.loads(line)["status"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if '"event": "end"' in line]
    assert ends == ["KILLED", "FINISHED"], ends
    resumed = re.findall(r"resumed from \S+: epoch (\d+), step (\d+) of (\d+)", (run_dir / "log.txt").read_text())
    assert len(resumed) == 1 and int(resumed[0][0]) >= 1, resumed
    assert len(placements((run_dir / "job.log").read_text())) == gpus
    ids = slurm_job_ids(out)
    if how == "time limit":  # the job failed with 75 and Snakemake resubmitted it
        assert "Trying to restart job" in out and len(ids) == 2, out[-3000:]
    else:  # SLURM put the same job back in the queue and ran it again
        assert len(ids) == 1, out[-3000:]
        states = subprocess.run(["sacct", "-n", "-X", "-D", "-P", "-j", ids[0], "-o", "State"], capture_output=True,
                                text=True, check=True).stdout.split()
        assert states[0] == "REQUEUED" and states[-1] == "COMPLETED", states
    assert len(torch.load(run_dir / "checkpoint.pt", weights_only=False)["rng"]) == gpus
    got, want = weights(run_dir / "checkpoint.pt"), weights(reference / "checkpoint.pt")
    # bit for bit: gloo sums each parameter's gradient on its own (run/loop.py, allreduce_per_parameter),
    # so the resumed processes' first step, on DDP's first bucket layout, sums in the same order
    assert_same_weights(got, want)
    assert json.loads((run_dir / "result.json").read_text())["metrics"] == \
        json.loads((reference / "result.json").read_text())["metrics"]
