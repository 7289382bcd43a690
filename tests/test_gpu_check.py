"""benchmarks/gpu_check.py --smoke: the GPU acceptance run's code, at the tiny scale on CPU, so it
cannot rot before a GPU runs it; and its failure reporting (any failed section -> exit 1)."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_smoke_runs_every_section_and_writes_json_and_table(tmp_path):
    rc = gpu_check.main(["--smoke", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert rc == 0, report["failed"]
    assert report["failed"] == [] and list(report["sections"]) == list(gpu_check.SECTIONS)
    sec = report["sections"]
    rows = sec["models"]["rows"]
    assert [(r["model"], r["variant"]) for r in rows] == [(f, m) for f in gpu_check.FAMILIES for m in gpu_check.METHODS]
    for r in rows:
        assert r["images_per_s"] > 0 and r["gflop_per_step"] > 0 and r["mfu"] is None  # no peak known on CPU
        assert r["ratio_to_default"] == pytest.approx(r["images_per_s"] / next(
            o["images_per_s"] for o in rows if o["model"] == r["model"] and o["variant"] == "Default"), rel=0.01)  # rounded
    assert [v["timm_model"] for v in sec["models"]["vs_timm"]] == ["deit_tiny_patch16_224",
                                                                   "swin_tiny_patch4_window7_224"]
    assert sec["models"]["amp"] == "torch.bfloat16"
    comp = sec["compile"]["rows"]
    assert [r["model"] for r in comp] == list(gpu_check.FAMILIES)  # every family, compiled or left out by budget
    assert comp[0]["backend"] == "eager" and comp[0]["compile_s"] > 0 and comp[0]["speedup"] > 0
    assert comp[0]["losses_agree"] and comp[0]["use_compile"] == (comp[0]["speedup"] > 1.0)
    assert all("compile_s" in r or r["skipped"] == "section budget 20 s spent" for r in comp)
    steps = sec["step"]["rows"] if (ROOT / ".fetched" / "timm_train.py").is_file() else []
    assert [r["model"] for r in steps] == (["DeiT-Ti", "Swin-Ti"] if steps else [])
    assert all(r["ratio_ours_over_timm"] > 0 for r in steps)
    if not steps:
        assert "timm_train.py is missing" in sec["step"]["skipped"]
    # the measured speeds for the plan: every model and method; a smoke file is refused by name
    from mpvg.workflow import plan

    speeds = json.loads((tmp_path / "speeds.json").read_text())
    assert speeds["smoke"] is True and set(speeds["images_per_s_per_gpu"]) == {*gpu_check.FAMILIES, "coco", "ade20k"}
    assert all(set(v) == set(gpu_check.METHODS) for k, v in speeds["images_per_s_per_gpu"].items() if k in gpu_check.FAMILIES)
    with pytest.raises(ValueError, match=f"measured speeds file {tmp_path / 'speeds.json'} .*--smoke"):
        plan.load_speeds(tmp_path / "speeds.json")
    (tmp_path / "gpu.json").write_text(json.dumps({**speeds, "smoke": False}))
    assert plan.load_speeds(tmp_path / "gpu.json")["images_per_s_per_gpu"]["DeiT-Ti"]["MPVG"] > 0
    (nccl,) = sec["nccl"]["rows"]
    assert nccl["backend"] == "gloo" and nccl["world_size"] == 1 and nccl["all_reduce_ok"]
    assert nccl["engine_images_per_s"] > 0 and nccl["engine_train_loss"] > 0
    down = sec["downstream"]["rows"]
    assert [(r["task"], r["precision"]) for r in down] == [
        ("detect", "None"), ("detect", "torch.bfloat16"), ("segment", "None"), ("segment", "torch.bfloat16")]
    (deform,) = sec["deform_attn"]["rows"]
    assert all(deform[f"rel_err_{k}"] <= tol for k, tol in gpu_check.DEFORM_TOLERANCE.items())
    (loader,) = sec["loader"]["rows"]
    assert loader["images"] == 48 and loader["workers"] == 1 and loader["images_per_s"] > 0
    table = (tmp_path / "gpu_check.md").read_text()
    assert "status **ok**" in table and all(f"## {name} (" in table for name in gpu_check.SECTIONS)
    assert "ours (engine step, same loop) / timm" in table


def test_a_failing_section_is_reported_and_fails_the_run(tmp_path, monkeypatch):
    def broken(cfg):
        raise gpu_check.CheckFailed("deformable attention bf16 vs fp32: output 0.08 > 0.03")

    monkeypatch.setattr(gpu_check, "section_deform_attn", broken)
    rc = gpu_check.main(["--smoke", "--only", "deform_attn", "loader", "--skip", "loader", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert rc == 1 and report["failed"] == ["deform_attn"] and list(report["sections"]) == ["deform_attn"]
    assert "output 0.08 > 0.03" in report["sections"]["deform_attn"]["error"]
    assert "status **FAILED**" in (tmp_path / "gpu_check.md").read_text()


def test_deform_check_catches_a_bf16_sampling_grid(monkeypatch):
    """At the COCO crop (1024) the check fails on the old bug: the grid cast to bf16 before sampling."""
    from mpvg.downstream import deform_attn

    cfg = SimpleNamespace(smoke=False, device=torch.device("cpu"))
    (row,) = gpu_check.section_deform_attn(cfg)["rows"]
    assert row["crop"] == 1024 and row["rel_err_output"] < 0.03
    real = deform_attn._ms_deform_attn

    def bf16_grid(value, shapes, locations, weights):
        return real(value, shapes, locations.to(torch.bfloat16).float(), weights)

    monkeypatch.setattr(deform_attn, "_ms_deform_attn", bf16_grid)
    with pytest.raises(gpu_check.CheckFailed, match="over the tolerances"):
        gpu_check.section_deform_attn(cfg)


def test_no_gpu_means_a_clear_message_not_a_crash(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--device", "cuda"]) == 2
    assert "no CUDA device visible" in capsys.readouterr().err


def test_mfu_peak_lookup(monkeypatch):
    assert gpu_check.peak_tflops(torch.device("cpu"), None) is None
    assert gpu_check.peak_tflops(torch.device("cpu"), 100.0) == 100.0
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H100 PCIe")
    assert gpu_check.peak_tflops(torch.device("cuda", 0), None) == 756.0
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H200")
    assert gpu_check.peak_tflops(torch.device("cuda", 0), None) == 989.4
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Some Future GPU")
    assert gpu_check.peak_tflops(torch.device("cuda", 0), None) is None
