"""The run folder's life cycle (issue: runs that can't go stale): a run resumes only its own state,
one writer per folder, preemption of one and of several processes, interrupted epochs keep their
metrics, no leaked files, messages instead of tracebacks.

Same tiny DeiT-S and data as test_training.py (CPU, one thread per process)."""
from __future__ import annotations

import json
import re
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from test_training import (CELL, EPOCHS, assert_same_weights, cli_env, reference, start_cli,  # noqa: F401
                           tiny_data, train_in_process, wait_for_start, wait_for_step, weights, write_params)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def finished_copy(ref_run: Path, dest: Path) -> Path:
    shutil.copytree(ref_run, dest)
    return dest


def only_previous(out: Path) -> Path:
    folders = sorted((out / "previous").iterdir())
    assert len(folders) == 1, folders
    return folders[0]


# ------------------------------------------------------------------------------ signatures
def test_result_and_checkpoint_carry_the_signature(reference):
    from mpvg.signature import digest

    _, ref_run, result = reference
    ckpt = torch.load(ref_run / "checkpoint.pt", weights_only=False)
    assert result["signature"] == ckpt["signature"] == digest(result["signature_inputs"])
    inputs = result["signature_inputs"]
    assert inputs["cell"] == CELL and inputs["seed"] == 0 and inputs["recipe"]["epochs"] == EPOCHS
    assert inputs["dataset"]["fingerprint"]["train"]["classes"] == 10
    assert "workers" not in inputs["recipe"]  # does not change the result
    assert json.loads((ref_run / "scores.json").read_text()) == result["metrics"]
    assert [row["epoch"] for row in json.loads((ref_run / "history.json").read_text())] == [1, 2, 3]


def test_rerun_of_a_finished_run_with_the_same_settings_does_nothing(reference, tmp_path):
    params, ref_run, ref = reference
    out = finished_copy(ref_run, tmp_path / "run")
    before = {name: (out / name).read_bytes() for name in ("result.json", "checkpoint.pt")}
    result = train_in_process(params, out)
    assert result["metrics"] == ref["metrics"] and result["signature"] == ref["signature"]
    assert {name: (out / name).read_bytes() for name in before} == before
    assert not (out / "previous").exists()
    assert "already finished with these settings" in (out / "log.txt").read_text()


@pytest.mark.parametrize("change, expect", [
    ({"lr": 2.0e-3}, "recipe.lr: 0.003 -> 0.002"),
    ({"epochs": 2}, "recipe.epochs: 3 -> 2"),
])
def test_rerun_with_a_changed_recipe_retrains_from_scratch_and_keeps_the_old_state(reference, tiny_data, tmp_path,
                                                                                  change, expect):
    params, ref_run, ref = reference
    out = finished_copy(ref_run, tmp_path / "run")
    changed = write_params(tmp_path / "changed", tiny_data, **change)
    result = train_in_process(changed, out)
    kept = only_previous(out)
    assert (kept / "result.json").read_bytes() == (ref_run / "result.json").read_bytes()
    assert_same_weights(weights(kept / "checkpoint.pt"), weights(ref_run / "checkpoint.pt"))
    assert expect in (kept / "REASON.txt").read_text()
    log = (out / "log.txt").read_text()
    assert expect in log and "moved it to" in log and "resumed from" not in log
    assert result["signature"] != ref["signature"]
    assert len(result["history"]) == change.get("epochs", EPOCHS)  # trained from epoch 0, all of it
    assert json.loads((out / "result.json").read_text())["signature_inputs"]["recipe"]["lr"] == \
        change.get("lr", 3.0e-3)


def test_a_checkpoint_of_another_cell_or_architecture_is_set_aside_not_resumed(reference, tiny_data, tmp_path):
    from mpvg.config import load_params, resolve_run
    from mpvg.training.engine import RunOptions, train

    params, ref_run, _ = reference
    p = load_params(params)
    for cell, expect in (("in1k-deit_s-pvg", "cell: \"in1k-deit_s-mpvg\" -> \"in1k-deit_s-pvg\""),
                         ("in1k-deit_ti-mpvg", "model_name: \"mpvg_deit_small_patch16_224\" -> "
                                               "\"mpvg_deit_tiny_patch16_224\"")):
        out = finished_copy(ref_run, tmp_path / cell)
        (out / "result.json").unlink()  # a checkpoint alone (an unfinished run of another cell)
        spec = resolve_run(p, cell)
        spec = type(spec)(**{**spec.__dict__, "recipe": {**spec.recipe, "epochs": 1, "total_epochs": 1}})
        result = train(spec, RunOptions(out_dir=out, quiet=True))
        assert result["cell"] == cell and result["epochs"] == 1
        assert expect in (only_previous(out) / "REASON.txt").read_text()


def test_on_change_fail_refuses_and_names_the_setting(reference, tiny_data, tmp_path):
    params, ref_run, _ = reference
    out = finished_copy(ref_run, tmp_path / "run")
    changed = write_params(tmp_path / "changed", tiny_data, lr=2.0e-3)
    proc = subprocess.run([sys.executable, "-m", "mpvg", "train", "--params", str(changed), "--cell", CELL,
                           "--out", str(out), "--no-tracking", "--on-change", "fail"],
                          env=cli_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "holds a run of other settings" in proc.stderr and "recipe.lr: 0.003 -> 0.002" in proc.stderr
    assert "Traceback" not in proc.stderr and not (out / "previous").exists()


def test_a_stale_start_point_is_refused(tiny_data, tmp_path):
    """Fine-tuning from the planned checkpoint of a cell whose settings changed since: refused."""
    import yaml

    from mpvg.cli import main

    params = write_params(tmp_path, tiny_data, epochs=1)
    raw = yaml.safe_load(params.read_text())
    raw["paths"]["runs"] = str(tmp_path / "runs")
    raw["tiny"]["datasets"]["cifar100"]["root"] = str(tiny_data / "cifar-100-python")
    raw["tiny"]["models"]["T2T-ViT-7"] = {"embed_dim": 32, "depth": 1, "num_heads": 2, "token_dim": 8}
    raw["tiny"]["recipes"]["t2t"] = {**raw["tiny"]["recipes"]["t2t"], "epochs": 1}
    raw["tiny"]["recipes"]["t2t_c100"] = {**raw["tiny"]["recipes"]["t2t_c100"], "epochs": 1}
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    from mpvg.data.tiny import make_tiny

    make_tiny(tiny_data, "cifar100")
    parent = tmp_path / "runs" / "train" / "in1k-t2t_vit_7-mpvg" / "seed0"
    assert main(["train", "--params", str(params), "--cell", "in1k-t2t_vit_7-mpvg", "--no-tracking", "--quiet"]) == 0
    ckpt = parent / "checkpoint.pt"
    raw["tiny"]["recipes"]["t2t"]["lr"] = 1.0e-3  # the parent cell changes afterwards
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    code = subprocess.run([sys.executable, "-m", "mpvg", "train", "--params", str(params), "--cell",
                           "c100-t2t_vit_7-mpvg", "--init-from", str(ckpt), "--no-tracking"],
                          env=cli_env(), capture_output=True, text=True, timeout=120)
    assert code.returncode == 2, code.stderr
    assert "was trained with other settings than cell in1k-t2t_vit_7-mpvg has now" in code.stderr
    assert "recipe.lr: 0.003 -> 0.001" in code.stderr and "Traceback" not in code.stderr


# ------------------------------------------------------------------------------ one writer
def test_a_second_writer_on_the_same_folder_exits_at_once_naming_the_holder(reference, tiny_data, tmp_path):
    params = write_params(tmp_path, tiny_data, epochs=50)  # long enough to be running
    out = tmp_path / "run"
    first = start_cli(["train", "--params", str(params), "--cell", CELL, "--out", str(out), "--no-tracking"], tmp_path)
    try:
        wait_for_start(out, first)

        def timed(folder: Path) -> tuple[subprocess.CompletedProcess, float]:
            started = time.time()
            done = subprocess.run([sys.executable, "-m", "mpvg", "train", "--params", str(params), "--cell", CELL,
                                   "--out", str(folder), "--no-tracking"], env=cli_env(), capture_output=True,
                                  text=True, timeout=120)
            return done, time.time() - started

        (tmp_path / "a-file").write_text("")
        # the baseline: the same command stopping at the same point (the folder) for another reason
        baseline, base_s = timed(tmp_path / "a-file" / "run")
        second, took = timed(out)
    finally:
        first.kill()
        first.wait()
    assert baseline.returncode == 2 and "is a file, not a folder" in baseline.stderr, baseline.stderr
    assert second.returncode == 2, second.stderr
    assert f"is being written by another run (pid {first.pid} on " in second.stderr, second.stderr
    assert "Traceback" not in second.stderr and took < 3 * base_s + 1.0, (took, base_s)  # at once, no waiting
    log = (out / "log.txt").read_text()
    assert log.count("training ") == 1  # the second process wrote nothing into the folder


def test_a_dead_writer_never_blocks_and_its_temp_files_are_removed(reference, tmp_path):
    from mpvg.run.folder import lock_holder

    params, ref_run, _ = reference
    out = finished_copy(ref_run, tmp_path / "run")
    (out / "result.json").unlink()
    leftovers = [out / ".checkpoint.pt.x1y2.tmp", out / ".result.json.abcd.tmp"]
    for path in leftovers:
        path.write_bytes(b"half a file")
    # a lock file left by a process that is gone holds nothing
    (out / ".lock").write_text(json.dumps({"pid": 999999, "host": "gone"}))
    assert lock_holder(out) is None
    result = train_in_process(params, out)
    assert result["metrics"] == json.loads((ref_run / "result.json").read_text())["metrics"]
    assert not any(p.exists() for p in leftovers)
    assert "removed .checkpoint.pt.x1y2.tmp, left by a writer that was killed" in (out / "log.txt").read_text()


def test_files_follow_the_umask(tiny_data, tmp_path):
    params = write_params(tmp_path, tiny_data, epochs=1)
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "mpvg", "train", "--params", str(params), "--cell", CELL,
                           "--out", str(out), "--no-tracking"], env=cli_env(), capture_output=True, text=True,
                          timeout=120, preexec_fn=lambda: os.umask(0o002))
    assert proc.returncode == 0, proc.stderr
    for name in ("checkpoint.pt", "result.json", "scores.json", "history.json"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o664, name


# ------------------------------------------------------------------------------ interruption
def interrupt_mid_epoch(params: Path, out: Path, sig: int, cwd: Path) -> subprocess.CompletedProcess:
    proc = start_cli(["train", "--params", str(params), "--cell", CELL, "--out", str(out), "--no-tracking",
                      "--log-interval", "1"], cwd)
    wait_for_step(out, proc)
    proc.send_signal(sig)
    output = proc.communicate(timeout=120)[0]
    return subprocess.CompletedProcess(proc.args, proc.returncode, output)


def test_an_interrupted_epoch_keeps_its_metrics(reference, tiny_data, tmp_path):
    from mpvg.run import REQUEUE_EXIT_CODE

    params, ref_run, ref = reference
    out = tmp_path / "run"
    done = interrupt_mid_epoch(params, out, signal.SIGUSR1, tmp_path)
    assert done.returncode == REQUEUE_EXIT_CODE, done.stdout
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ckpt["step"] > 0 and ckpt["epoch_progress"]["loss_n"] == ckpt["step"]
    result = train_in_process(params, out)
    row, ref_row = result["history"][ckpt["epoch"]], ref["history"][ckpt["epoch"]]
    assert row["train_loss"] == pytest.approx(ref_row["train_loss"], rel=1e-6)
    assert row["epoch_time_s"] > ckpt["epoch_progress"]["time_s"] > 0  # both parts of the epoch counted
    assert [r["train_loss"] for r in result["history"]] == pytest.approx([r["train_loss"] for r in ref["history"]],
                                                                         rel=1e-6)


def test_sigint_saves_like_sigterm_with_a_one_line_message(reference, tmp_path):
    from mpvg.run import REQUEUE_EXIT_CODE

    params, ref_run, _ = reference
    out = tmp_path / "run"
    done = interrupt_mid_epoch(params, out, signal.SIGINT, tmp_path)
    assert done.returncode == REQUEUE_EXIT_CODE, done.stdout
    assert "Traceback" not in done.stdout and "KeyboardInterrupt" not in done.stdout
    lines = [line for line in done.stdout.splitlines() if line.startswith("mpvg train:")]
    assert len(lines) == 1 and "stopped by SIGINT" in lines[0] and "the same command resumes it" in lines[0]
    train_in_process(params, out)
    assert_same_weights(weights(out / "checkpoint.pt"), weights(ref_run / "checkpoint.pt"))


def test_a_run_whose_parent_dies_saves_and_stops(reference, tmp_path):
    """MPVG_STOP_WITH_PARENT=1 (the Snakefile sets it): Snakemake killed -> no run goes on unsupervised."""
    from mpvg.run import REQUEUE_EXIT_CODE

    params, ref_run, _ = reference
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "mpvg", "train", "--params", str(params), "--cell", CELL, "--out", str(out),
           "--no-tracking", "--log-interval", "1"]
    parent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                               f"p = subprocess.Popen({cmd!r}); print(p.pid, flush=True); time.sleep(600)"],
                              env={**cli_env(), "MPVG_STOP_WITH_PARENT": "1"}, stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    wait_for_step(out, parent)
    parent.kill()
    parent.wait()
    end = time.monotonic() + 60  # the orphan (not our child: no wait()) saves and exits on its own
    while Path(f"/proc/{child}").exists() and time.monotonic() < end:
        time.sleep(0.05)
    assert not Path(f"/proc/{child}").exists(), f"the run (pid {child}) still runs 60 s after its parent died"
    log = (out / "log.txt").read_text()
    assert "the parent process" in log and "is gone: saving a checkpoint and stopping" in log
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ckpt["step"] > 0 or ckpt["epoch"] > 0
    journal = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert journal[-1] == {**journal[-1], "event": "end", "status": "KILLED"}
    assert REQUEUE_EXIT_CODE == 75
    train_in_process(params, out)
    assert_same_weights(weights(out / "checkpoint.pt"), weights(ref_run / "checkpoint.pt"))


# ------------------------------------------------------------------------------ several processes
DDP_PROCESSES = 4
DDP_EPOCHS = 2  # the stop lands in the first; the second runs after the resume


@pytest.fixture(scope="module")
def ddp_reference(tmp_path_factory, tiny_data):
    """An uninterrupted 4-process run through `mpvg launch` (gloo). Four, not two: a sum of two
    terms is the same in either order, so only three or more processes show a resume that sums
    the gradients in another order than the uninterrupted run (DDP's bucket layout)."""
    folder = tmp_path_factory.mktemp("ddp_ref")
    params = write_params(folder, tiny_data, epochs=DDP_EPOCHS)
    out = folder / "run"
    proc = subprocess.run([sys.executable, "-m", "mpvg", "launch", "--nproc-per-node", str(DDP_PROCESSES), "train",
                           "--params", str(params), "--cell", CELL, "--out", str(out), "--no-tracking", "--device", "cpu"],
                          env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return params, out


@pytest.mark.parametrize("delivery, sig", [("launcher", signal.SIGTERM),
                                            pytest.param("every process", signal.SIGUSR1, marks=pytest.mark.slow)])
def test_four_processes_preempted_save_one_checkpoint_exit_requeue_and_resume_bit_exact(ddp_reference, tmp_path,
                                                                                       delivery, sig):
    from mpvg.run import REQUEUE_EXIT_CODE

    params, ref_out = ddp_reference
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "mpvg", "launch", "--nproc-per-node", str(DDP_PROCESSES), "train", "--params",
           str(params), "--cell", CELL, "--out", str(out), "--no-tracking", "--device", "cpu", "--log-interval", "1"]
    proc = subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    wait_for_step(out, proc, epochs=DDP_EPOCHS)
    if delivery == "launcher":
        proc.send_signal(sig)
    else:  # SLURM's --signal without B: reaches every process of the step
        os.killpg(proc.pid, sig)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == REQUEUE_EXIT_CODE, output
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert len(ckpt["rng"]) == DDP_PROCESSES and (ckpt["epoch"], ckpt["step"]) != (0, 0)
    # every rank stopped at the same, saved step
    assert output.count("the same command resumes it") == DDP_PROCESSES
    again = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert_same_weights(weights(out / "checkpoint.pt"), weights(ref_out / "checkpoint.pt"))
    assert json.loads((out / "result.json").read_text())["metrics"] == \
        json.loads((ref_out / "result.json").read_text())["metrics"]


def test_launch_exit_codes():
    from mpvg.run.launch import exit_code

    assert exit_code([0, 0]) == 0
    assert exit_code([75, 75]) == 75 and exit_code([0, 75]) == 75
    assert exit_code([75, 1]) == 1 and exit_code([2, 0]) == 2
    assert exit_code([-9, 75]) == 137  # killed by SIGKILL, as a shell reports it


# ------------------------------------------------------------------------------ messages
@pytest.mark.parametrize("args, expect", [
    (["--device", "cuda"], "--device cuda was asked for, but torch sees no CUDA device"),
    (["--seed", "-1"], "argument --seed: expected a non-negative integer, got -1"),
])
def test_bad_arguments_give_messages_not_tracebacks(reference, tmp_path, args, expect):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("this host has a GPU")
    params, _, _ = reference
    proc = subprocess.run([sys.executable, "-m", "mpvg", "train", "--params", str(params), "--cell", CELL,
                           "--out", str(tmp_path / "run"), "--no-tracking", *args],
                          env=cli_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and expect in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_out_below_a_regular_file_is_a_message(reference, tmp_path):
    params, _, _ = reference
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder")
    proc = subprocess.run([sys.executable, "-m", "mpvg", "train", "--params", str(params), "--cell", CELL,
                           "--out", str(blocker / "run"), "--no-tracking"],
                          env=cli_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert f"cannot create the run folder {blocker / 'run'}: {blocker} is a file, not a folder" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_deleted_result_of_a_finished_run_comes_back_from_its_kept_copy(reference, tmp_path):
    """Snakemake and DVC delete a job's result.json before they run it again: a run that had
    finished with these settings gets it back as it was, without evaluating or training."""
    params, ref_run, _ = reference
    out = finished_copy(ref_run, tmp_path / "run")
    before = (out / "result.json").read_bytes()
    (out / "result.json").unlink()
    result = train_in_process(params, out)
    assert (out / "result.json").read_bytes() == before and result["signature"] == json.loads(before)["signature"]
    log = (out / "log.txt").read_text()
    assert "restored from .result.kept.json" in log and log.count(" INFO training ") == 1


def test_status_shows_running_interrupted_stale_and_pending_runs(reference, tiny_data, tmp_path):
    """`mpvg status` on a folder with one finished run, one being written (its lock held), one
    interrupted (checkpoint, no result) and one of other settings."""
    import yaml

    from mpvg.cli import main
    params, ref_run, _ = reference
    raw = yaml.safe_load(params.read_text())
    raw["paths"]["runs"] = str(tmp_path / "runs")
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(raw, sort_keys=False))
    runs = tmp_path / "runs" / "train"
    finished_copy(ref_run, runs / CELL / "seed0")
    other = finished_copy(ref_run, runs / "in1k-deit_s-pvg" / "seed0")  # a result of another cell: stale
    interrupted = runs / "in1k-deit_s-lape" / "seed0"
    interrupted.mkdir(parents=True)
    shutil.copy(ref_run / "checkpoint.pt", interrupted / "checkpoint.pt")
    busy = runs / "in1k-deit_s-default" / "seed0"
    busy.mkdir(parents=True)
    (busy / "metrics.jsonl").write_text(json.dumps({"event": "metrics", "step": 2, "metrics": {}}) + "\n")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from mpvg.run.folder import FolderLock; "
                               f"FolderLock(Path({str(busy)!r})).acquire(); print('held', flush=True); time.sleep(600)"],
                              env=cli_env(), stdout=subprocess.PIPE, text=True)  # POSIX locks are per process
    try:
        assert holder.stdout.readline().strip() == "held"
        import contextlib
        import io

        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            assert main(["status", "--params", str(p)]) == 0
    finally:
        holder.kill()
        holder.wait()
    text = buf.getvalue()
    assert re.search(r"T1: 1 finished, 1 running, 1 interrupted, 1 stale, \d+ pending", text), text
    assert f"running     in1k-deit_s-default seed0  epoch 2/{EPOCHS} (pid {holder.pid} on " in text
    assert f"interrupted in1k-deit_s-lape seed0  epoch 0/{EPOCHS} resumes from its checkpoint" in text
    assert 'stale       in1k-deit_s-pvg seed0' in text and 'cell: "in1k-deit_s-mpvg" -> "in1k-deit_s-pvg"' in text
    assert other.exists()


# ------------------------------------------------------------------------------ damaged or missing files
def damage(path: Path, how: str) -> bytes:
    """Empty ``path`` or cut it in half, in place (so a hard link to it is damaged too); return its bytes."""
    data = path.read_bytes()
    with open(path, "r+b") as handle:
        handle.truncate(0 if how == "empty" else len(data) // 2)
    return path.read_bytes()


@pytest.mark.parametrize("how", ["empty", "truncated"])
def test_a_damaged_checkpoint_is_set_aside_and_the_run_starts_fresh(reference, tmp_path, how):
    params, ref_run, ref = reference
    out = finished_copy(ref_run, tmp_path / "run")
    (out / "result.json").unlink()
    (out / ".result.kept.json").unlink()  # an unfinished run whose checkpoint.pt was damaged
    damaged = damage(out / "checkpoint.pt", how)
    result = train_in_process(params, out)
    kept = only_previous(out)
    assert (kept / "checkpoint.pt").read_bytes() == damaged  # set aside, never deleted
    assert "checkpoint.pt is unreadable (cannot read checkpoint" in (kept / "REASON.txt").read_text()
    log = (out / "log.txt").read_text()
    assert f"{out} held state it cannot continue (checkpoint.pt is unreadable (cannot read checkpoint " \
           f"{out / 'checkpoint.pt'}" in log
    assert f"moved it to {kept} and starting fresh" in log
    assert result["metrics"] == ref["metrics"]
    assert_same_weights(weights(out / "checkpoint.pt"), weights(ref_run / "checkpoint.pt"))


@pytest.mark.parametrize("kept_too", [False, True])
@pytest.mark.parametrize("how", ["empty", "truncated"])
def test_a_damaged_result_is_set_aside_and_written_again_without_training(reference, tmp_path, how, kept_too):
    """result.json empty or cut short: set aside; the finished checkpoint gives it back (from the kept
    copy when that is intact, else by evaluating the final checkpoint: no epoch is trained again)."""
    params, ref_run, ref = reference
    out = finished_copy(ref_run, tmp_path / "run")
    damaged = damage(out / "result.json", how)
    if kept_too:  # result.json damaged in place: its hard link .result.kept.json is the same file
        damage(out / ".result.kept.json", how)
    checkpoint_before, log_before = (out / "checkpoint.pt").read_bytes(), (out / "log.txt").read_text()
    result = train_in_process(params, out)
    aside = only_previous(out)
    assert (aside / "result.json").read_bytes() == damaged
    assert sorted(p.name for p in aside.iterdir()) == sorted(["result.json", "REASON.txt"] +
                                                             ([".result.kept.json"] if kept_too else []))
    log = (out / "log.txt").read_text()[len(log_before):]  # this run's lines
    assert f"{out / 'result.json'} was unreadable (empty, cut short or not a JSON object): moved it to {aside}" in log
    assert "epoch 1/3" not in log  # nothing trained again
    assert result["metrics"] == ref["metrics"] and result["signature"] == ref["signature"]
    assert json.loads((out / "result.json").read_text())["metrics"] == ref["metrics"]
    if kept_too:
        assert f"resumed from {out / 'checkpoint.pt'}: epoch 3, step 0" in log
    else:
        assert (out / "result.json").read_bytes() == (ref_run / "result.json").read_bytes()
        assert (out / "checkpoint.pt").read_bytes() == checkpoint_before
        assert "restored from .result.kept.json" in log


def test_a_result_without_its_checkpoint_is_set_aside_and_trained_again(reference, tmp_path):
    params, ref_run, ref = reference
    out = finished_copy(ref_run, tmp_path / "run")
    (out / "checkpoint.pt").unlink()
    result = train_in_process(params, out)
    kept = only_previous(out)
    assert (kept / "result.json").read_bytes() == (ref_run / "result.json").read_bytes()
    reason = "result.json is there but its checkpoint.pt is gone (the run cannot be continued or fine-tuned from)"
    assert reason in (kept / "REASON.txt").read_text()
    assert f"{out} held state it cannot continue ({reason}); moved it to {kept}" in (out / "log.txt").read_text()
    assert result["metrics"] == ref["metrics"]


def test_a_run_from_before_signatures_is_set_aside_with_the_reason(reference, tmp_path):
    """result.json and checkpoint.pt written by an mpvg that had no run signatures."""
    params, ref_run, ref = reference
    out = finished_copy(ref_run, tmp_path / "run")
    for name in ("result.json", ".result.kept.json"):
        old = json.loads((out / name).read_text())
        (out / name).write_text(json.dumps({k: v for k, v in old.items() if not k.startswith("signature")}))
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    torch.save({k: v for k, v in ckpt.items() if not k.startswith("signature")}, out / "checkpoint.pt")
    result = train_in_process(params, out)
    kept = only_previous(out)
    reason = "checkpoint: no signature recorded (written by an older mpvg, or not by mpvg)"
    assert reason in (kept / "REASON.txt").read_text()
    assert f"{out} held a run of other settings ({reason}; result: no signature recorded" in \
        (out / "log.txt").read_text()
    assert "signature" not in json.loads((kept / "result.json").read_text())
    assert result["metrics"] == ref["metrics"] and result["signature"] == ref["signature"]


@pytest.fixture
def small_disk(tmp_path):
    """A real tmpfs of a given size, mounted by the test (root only)."""
    mounts = []

    def mount(size: int) -> Path:
        where = tmp_path / f"disk{len(mounts)}"
        where.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                              capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs to fill (needs root): {done.stderr.strip()}")
        mounts.append(where)
        return where

    yield mount
    for where in mounts:
        subprocess.run(["umount", str(where)], check=True)


def test_a_full_disk_while_a_checkpoint_is_written_keeps_the_previous_one(reference, tmp_path, small_disk, capsys):
    from mpvg.run.commands import run_training_job

    params, ref_run, _ = reference
    size = (ref_run / "checkpoint.pt").stat().st_size
    # room for one checkpoint and the logs, not for the next one written beside it (atomic write)
    out = small_disk(size + size // 2 + 64 * 1024) / "run"
    code = run_training_job("train", lambda: train_in_process(params, out))
    err = capsys.readouterr().err
    ckpt = out / "checkpoint.pt"
    assert code == 1
    lines = [line for line in err.splitlines() if line.startswith("mpvg train: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"mpvg train: error: cannot write {ckpt} (")
    assert lines[0].endswith("the previous checkpoint.pt there is unchanged. Free space on that disk (or point "
                             "--out elsewhere) and run the same command again: it continues from the last "
                             "checkpoint"), lines[0]
    state = torch.load(ckpt, weights_only=False)  # intact, the first epoch's
    assert (state["epoch"], state["step"]) == (1, 0)
    assert not list(out.glob(".*.tmp")) and not (out / "result.json").exists()
    journal = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert journal[-1]["event"] == "end" and journal[-1]["status"] == "FAILED"
