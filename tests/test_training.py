"""`mpvg train` / `mpvg eval`: results, exact resume after SIGKILL and SIGTERM, NaN stop, errors.

Runs on CPU with one thread per process (bit-exact comparisons, and fast on a busy 2-core
machine), a DeiT at dim 32 / depth 2 and the tiny digits data in the ImageNet layout.
Helpers here are shared by test_tracking.py and test_ddp.py.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
CELL = "in1k-deit_s-mpvg"  # DeiT-S at the tiny scale, shrunk further below
EPOCHS = 3
BATCH = 32


def write_params(folder: Path, data_root: Path, epochs: int = EPOCHS, **recipe) -> Path:
    """params.yaml of the repository with the tiny data at ``data_root`` and a smaller DeiT-S."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["tiny"]["datasets"]["imagenet"]["root"] = str(data_root / "imagenet")
    raw["tiny"]["models"]["DeiT-S"] = {"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8}
    # no per-process randomness (dropout, drop-path, mixup) so that DDP matches one process
    raw["tiny"]["recipes"]["deit"] = {**raw["tiny"]["recipes"]["deit"], "epochs": epochs, "batch_size": BATCH,
                                      "drop_path": 0.0, "mixup": 0.0, "cutmix": 0.0, **recipe}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def steps_per_epoch(data_root: Path) -> int:
    return sum(1 for _ in (data_root / "imagenet" / "train").rglob("*.*")) // BATCH


def make_spec(params_path: Path, cell: str = CELL):
    from mpvg.config import load_params, resolve_run

    return resolve_run(load_params(params_path), cell)


def train_in_process(params_path: Path, out: Path, **opts):
    from mpvg.training.engine import RunOptions, train

    return train(make_spec(params_path), RunOptions(out_dir=out, quiet=True, **opts))


def cli_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}


def start_cli(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mpvg", *args], cwd=cwd, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 120.0) -> None:
    """Until ``predicate()`` holds (an event the run makes observable: a log line, a file), polling;
    fails naming ``what`` never happened, or that ``proc`` ended first."""
    end = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"process ended ({proc.returncode}) before {what}:\n{proc.stdout.read()}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError(f"not within {timeout:g} s: {what}")
        time.sleep(0.01)


def wait_for_step(out: Path, proc: subprocess.Popen, step: int = 1, epoch: int = 1, epochs: int = EPOCHS) -> None:
    """Until the run's own log says it finished ``step`` of ``epoch`` (a line per --log-interval steps):
    a signal sent then lands inside that epoch, not at a time a sleep guessed."""
    line = f"epoch {epoch}/{epochs} step {step}/"
    log = out / "log.txt"
    wait_for(lambda: log.exists() and line in log.read_text(), proc, f"{log} says '{line}'")


def wait_for_start(out: Path, proc: subprocess.Popen) -> None:
    """Until the run's own log says it started training (its folder is taken and the model built)."""
    log = out / "log.txt"
    wait_for(lambda: log.exists() and "training " in log.read_text(), proc, f"{log} says 'training '")


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def assert_same_weights(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if atol:
            torch.testing.assert_close(a[key], b[key], atol=atol, rtol=atol, msg=key)
        else:
            assert torch.equal(a[key], b[key]), f"{key} differs"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    from mpvg.data.tiny import make_tiny

    root = tmp_path_factory.mktemp("tiny")
    make_tiny(root, "imagenet")
    return root


@pytest.fixture(scope="session")
def reference(tmp_path_factory, tiny_data):
    """One uninterrupted run: (params path, run folder, result)."""
    folder = tmp_path_factory.mktemp("reference")
    params = write_params(folder, tiny_data)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # session fixtures start before the one_torch_thread fixture
    try:
        result = train_in_process(params, folder / "run")
    finally:
        torch.set_num_threads(threads)
    return params, folder / "run", result


# ------------------------------------------------------------------------------ unit
def test_epoch_sampler_is_a_function_of_seed_and_epoch_and_shards_the_global_batch():
    from mpvg.run.seeding import EpochSampler

    one = EpochSampler(100, 8, seed=1)
    one.set_epoch(3)
    order = list(one)
    assert len(order) == len(one) == 96 and len({i for i, _ in order}) == 96
    again = EpochSampler(100, 8, seed=1)
    again.set_epoch(3)
    assert list(again) == order
    again.set_epoch(4)
    assert [i for i, _ in again] != [i for i, _ in order]
    # two ranks: their k-th local batches (4 each) together are the k-th global batch, same seeds
    ranks = []
    for r in range(2):
        s = EpochSampler(100, 8, seed=1, rank=r, world_size=2)
        s.set_epoch(3)
        ranks.append(list(s))
    for k in range(12):
        merged = sorted(ranks[0][4 * k:4 * k + 4] + ranks[1][4 * k:4 * k + 4])
        assert merged == sorted(order[8 * k:8 * k + 8])
    # resume inside an epoch: skip whole global batches
    one.set_epoch(3, start_step=5)
    assert list(one) == order[40:]
    # repeated augmentation: each image three times in a row, distinct seeds per copy
    rep = EpochSampler(30, 6, seed=0, repeats=3)
    items = list(rep)
    assert [i for i, _ in items[:3]] == [items[0][0]] * 3 and len({s for _, s in items[:3]}) == 3
    with pytest.raises(ValueError, match="not divisible"):
        EpochSampler(100, 9, seed=0, world_size=2)


def test_seeded_samples_repeat_augmentation_and_leave_global_rng_alone(tiny_data, tmp_path):
    from mpvg.run.seeding import SeededSamples
    from mpvg.training.engine import build_datasets

    spec = make_spec(write_params(tmp_path, tiny_data))
    train_set, _ = build_datasets(spec)
    data = SeededSamples(train_set)
    torch.manual_seed(0)
    expected_next = torch.rand(3)
    torch.manual_seed(0)
    a, b, c = (torch.as_tensor(data[item][0]) for item in ((5, 123), (5, 123), (5, 124)))  # uint8 HWC arrays
    assert torch.equal(a, b) and not torch.equal(a, c)  # same seed, same crop/flip; another seed differs
    assert torch.equal(torch.rand(3), expected_next)  # the training RNG stream is untouched


# ------------------------------------------------------------------------------ runs
def test_run_writes_result_checkpoint_log_and_learns(reference, tiny_data):
    from mpvg.config import load_params

    params, run, result = reference
    saved = json.loads((run / "result.json").read_text())
    assert saved == json.loads(json.dumps(result))
    for key in ("cell", "stage", "task", "model", "method", "dataset", "seed", "scale", "pe", "params",
                "metrics", "epochs", "wall_time_s", "gpu_hours", "cpu_hours", "device", "world_size",
                "git_commit", "checkpoint", "mlflow_run_id"):
        assert key in saved, key
    assert (saved["cell"], saved["model"], saved["method"], saved["epochs"]) == (CELL, "DeiT-S", "MPVG", EPOCHS)
    assert saved["pe"]["pool"] == "avg" and saved["pe"]["last_ln_pe"] == 0  # MPVG
    assert saved["device"] == "cpu" and saved["world_size"] == 1 and saved["gpu_hours"] == 0
    assert set(saved["metrics"]) == {"top1", "top5", "loss"} and 0 <= saved["metrics"]["top1"] <= 100
    hist = saved["history"]
    assert [h["epoch"] for h in hist] == [1, 2, 3] and hist[-1]["train_loss"] < hist[0]["train_loss"]
    assert saved["metrics"]["top5"] > 60  # chance is 50 for 10 classes
    ckpt = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert (ckpt["epoch"], ckpt["step"], ckpt["num_updates"]) == (EPOCHS, 0, EPOCHS * steps_per_epoch(tiny_data))
    n = sum(v.numel() for k, v in ckpt["model"].items())
    assert n == saved["params"]
    log = (run / "log.txt").read_text()
    assert log.count("epoch ") >= EPOCHS and "val_top1" in log
    journal = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in journal if e["event"] == "metrics"][:EPOCHS] == [1, 2, 3]
    assert load_params(params)["scale"] == "tiny"


def test_eval_command_reproduces_the_final_metrics(reference, capsys):
    from mpvg.cli import main

    params, run, result = reference
    out = run.parent / "eval.json"
    assert main(["eval", "--params", str(params), "--cell", CELL, "--checkpoint", str(run / "checkpoint.pt"),
                 "--out", str(out), "--workers", "0"]) == 0
    got = json.loads(out.read_text())
    assert got == json.loads(capsys.readouterr().out)
    for key in ("top1", "top5", "loss"):
        assert got["metrics"][key] == pytest.approx(result["metrics"][key], abs=1e-6)


def test_resume_after_sigkill_ends_identical(reference, tmp_path):
    params, ref_run, _ = reference
    out = tmp_path / "run"
    ckpt = out / "checkpoint.pt"
    proc = start_cli(["train", "--params", str(params), "--cell", CELL, "--out", str(out), "--no-tracking"], tmp_path)
    wait_for(ckpt.exists, proc, f"the first epoch's {ckpt} is written")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = torch.load(ckpt, weights_only=False)["epoch"]
    assert 1 <= killed_at < EPOCHS and not (out / "result.json").exists()
    result = train_in_process(params, out)  # resumes from the checkpoint
    assert_same_weights(weights(out / "checkpoint.pt"), weights(ref_run / "checkpoint.pt"))
    assert result["metrics"] == json.loads((ref_run / "result.json").read_text())["metrics"]
    log = (out / "log.txt").read_text()
    assert f"resumed from {ckpt}: epoch {killed_at}, step 0" in log


def test_sigterm_checkpoints_mid_epoch_exits_for_requeue_and_resumes_identical(reference, tiny_data, tmp_path):
    from mpvg.run import REQUEUE_EXIT_CODE

    params, ref_run, _ = reference
    out = tmp_path / "run"
    proc = start_cli(["train", "--params", str(params), "--cell", CELL, "--out", str(out), "--no-tracking",
                      "--log-interval", "1"], tmp_path)
    wait_for_step(out, proc)  # inside epoch 1
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == REQUEUE_EXIT_CODE, output
    assert "requeue" in output
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ckpt["format"] == "mpvg-train-v1" and not (out / "result.json").exists()
    assert ckpt["num_updates"] == ckpt["epoch"] * steps_per_epoch(tiny_data) + ckpt["step"] > 0
    journal = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert journal[-1]["event"] == "end" and journal[-1]["status"] == "KILLED"
    train_in_process(params, out)
    assert_same_weights(weights(out / "checkpoint.pt"), weights(ref_run / "checkpoint.pt"))


def test_nonfinite_loss_stops_with_epoch_and_step_and_keeps_last_checkpoint(tiny_data, tmp_path, monkeypatch):
    from mpvg.training import engine

    build, steps = engine.build_model, steps_per_epoch(tiny_data)

    class NaNAfter(torch.nn.Module):
        """The real model, whose logits turn NaN from the 4th training step of epoch 2 on."""

        def __init__(self, inner):
            super().__init__()
            self.inner, self.calls = inner, 0

        def forward(self, x):
            self.calls += self.training
            out = self.inner(x)
            return out * float("nan") if self.training and self.calls > steps + 3 else out

    monkeypatch.setattr(engine, "build_model", lambda spec: NaNAfter(build(spec)))
    out = tmp_path / "run"
    with pytest.raises(engine.NonFiniteLossError, match=rf"epoch 2/{EPOCHS}, step 4/{steps}"):
        train_in_process(write_params(tmp_path, tiny_data), out, log_interval=5)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert (ckpt["epoch"], ckpt["step"]) == (1, 0)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert not (out / "result.json").exists()


def test_cli_errors_name_the_missing_dataset_and_the_fine_tuning_source(tmp_path, capsys):
    from mpvg.cli import main

    missing = tmp_path / "nowhere"
    params = write_params(tmp_path, missing)
    assert main(["train", "--params", str(params), "--cell", CELL, "--out", str(tmp_path / "r"), "--no-tracking"]) == 2
    err = capsys.readouterr().err
    assert str(missing / "imagenet") in err and "does not exist" in err
    assert main(["train", "--params", str(params), "--cell", "c100-t2t_vit_7-mpvg", "--out", str(tmp_path / "f"),
                 "--no-tracking"]) == 2
    assert "--init-from" in capsys.readouterr().err


def test_no_resume_refuses_an_existing_checkpoint(reference, tmp_path):
    import shutil

    params, ref_run, _ = reference
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(ref_run / "checkpoint.pt", out / "checkpoint.pt")
    with pytest.raises(FileExistsError, match="--no-resume"):
        train_in_process(params, out, resume=False)


def test_init_from_loads_weights_and_lr_zero_keeps_them(reference, tiny_data, tmp_path):
    """Fine-tuning start: every tensor comes from --init-from (and lr 0 leaves it there)."""
    _, ref_run, _ = reference
    params = write_params(tmp_path, tiny_data, epochs=1, lr=0.0, warmup_lr=0.0, min_lr=0.0)
    train_in_process(params, tmp_path / "ft", init_from=ref_run / "checkpoint.pt", eval_every=0)
    assert_same_weights(weights(tmp_path / "ft" / "checkpoint.pt"), weights(ref_run / "checkpoint.pt"))


# ------------------------------------------------------------------------------ slow
FAMILIES = ["in1k-deit_ti-mpvg", "in1k-swin_ti-mpvg", "in1k-ceit_ti-mpvg", "in1k-t2t_vit_7-mpvg",
            "c100-vit_lite-mpvg"]


@pytest.mark.slow
@pytest.mark.parametrize("cell", FAMILIES)
def test_each_family_learns_the_tiny_data(cell, tiny_data, tmp_path):
    """The tiny configuration of params.yaml (12 epochs) gets well above chance (10%): 91-99% top-1
    when written (about 30-90 s per model on the 2-core CPU)."""
    from mpvg.data.tiny import make_tiny
    from mpvg.training.engine import RunOptions, train

    make_tiny(tiny_data, "cifar100")
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["tiny"]["datasets"]["imagenet"]["root"] = str(tiny_data / "imagenet")
    raw["tiny"]["datasets"]["cifar100"]["root"] = str(tiny_data / "cifar-100-python")
    for name in ("deit", "swin", "ceit", "t2t", "vit_lite_c100"):
        raw["tiny"]["recipes"][name] = {**raw["tiny"]["recipes"][name], "epochs": 12}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    result = train(make_spec(tmp_path / "params.yaml", cell), RunOptions(out_dir=tmp_path / "run", quiet=True,
                                                                          eval_every=0))
    assert result["metrics"]["top1"] > 70, result["metrics"]


def test_param_groups_scale_the_backbone_lr_and_skip_decay_on_norms_and_biases(tiny_data, tmp_path):
    from mpvg.training.engine import build_model, param_groups

    spec = make_spec(write_params(tmp_path, tiny_data))
    model = build_model(spec)
    head = {id(p) for p in model.get_classifier().parameters()}
    names = {id(p): n for n, p in model.named_parameters()}
    groups = param_groups(model, {**spec.recipe, "backbone_lr_ratio": 0.1})
    assert sum(len(g["params"]) for g in groups) == len(names)
    for g in groups:
        for p in g["params"]:
            assert g["lr_scale"] == (1.0 if id(p) in head else 0.1), names[id(p)]
            no_decay = p.ndim <= 1 or names[id(p)] in model.no_weight_decay()
            assert g["weight_decay"] == (0.0 if no_decay else spec.recipe["weight_decay"]), names[id(p)]
    sgd = param_groups(model, {**spec.recipe, "optimizer": "sgd"})  # the T2T transfer script decays all
    assert all(g["weight_decay"] == spec.recipe["weight_decay"] for g in sgd)


@pytest.mark.slow
def test_t2t_finetunes_on_cifar_from_its_imagenet_checkpoint(tiny_data, tmp_path):
    """Table 2's T2T-ViT-7 path: train in1k, then `mpvg train --init-from` on the c100 cell."""
    from mpvg.cli import main
    from mpvg.data.tiny import make_tiny

    make_tiny(tiny_data, "cifar100")
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["tiny"]["datasets"]["imagenet"]["root"] = str(tiny_data / "imagenet")
    raw["tiny"]["datasets"]["cifar100"]["root"] = str(tiny_data / "cifar-100-python")
    raw["tiny"]["recipes"]["t2t"] = {**raw["tiny"]["recipes"]["t2t"], "epochs": 2}
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    common = ["--params", str(params), "--no-tracking", "--quiet", "--eval-every", "0"]
    assert main(["train", "--cell", "in1k-t2t_vit_7-mpvg", "--out", str(tmp_path / "in1k"), *common]) == 0
    assert main(["train", "--cell", "c100-t2t_vit_7-mpvg", "--out", str(tmp_path / "c100"), *common,
                 "--init-from", str(tmp_path / "in1k" / "checkpoint.pt")]) == 0
    result = json.loads((tmp_path / "c100" / "result.json").read_text())
    assert result["stage"] == "finetune" and result["init_from"].endswith("in1k/checkpoint.pt")
    assert result["metrics"]["top1"] > 20, result["metrics"]


def test_ending_run_closes_the_run_with_the_right_status():
    from mpvg.run.folder import Preempted, ending_run

    class Tracker:
        def __init__(self):
            self.statuses = []

        def finish(self, status):
            self.statuses.append(status)

    t = Tracker()
    with ending_run(t):
        pass
    with pytest.raises(Preempted):
        with ending_run(t):
            raise Preempted("signal")
    with pytest.raises(ValueError):
        with ending_run(t):
            raise ValueError("bad")
    assert t.statuses == ["FINISHED", "KILLED", "FAILED"]
