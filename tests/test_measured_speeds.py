"""gpu_check's measured images/s flow into the plan: `paths.measured_speeds` names the file, the
plan's GPU-hours, SLURM runtimes, CPUs per GPU and `mpvg workflow cost` use it; a malformed file
is an error naming it."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from mpvg import cli
from mpvg.config import expand_cells, load_params
from mpvg.workflow import plan
from mpvg.workflow.cost import cost_table

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params.yaml"


def speeds_file(path: Path, table: dict, gpu: str = "NVIDIA H100 80GB HBM3") -> Path:
    path.write_text(json.dumps({"format": plan.SPEEDS_FORMAT, "gpu": gpu, "commit": "abc",
                                "images_per_s_per_gpu": table}))
    return path


def test_the_plan_uses_measured_speeds_where_the_file_has_them(tmp_path, capsys):
    path = speeds_file(tmp_path / "speeds.json", {"DeiT-Ti": {"MPVG": 5000.0}, "coco": {"MPVG": 14.0}})
    estimated = load_params(PARAMS, ["scale=paper"])
    measured = load_params(PARAMS, ["scale=paper", f"paths.measured_speeds={path}"])
    cells = expand_cells(measured)
    mpvg, default = cells["in1k-deit_ti-mpvg"], cells["in1k-deit_ti-default"]
    assert plan.throughput(mpvg, measured) == 5000.0 and plan.throughput(mpvg, estimated) == 2500
    assert plan.throughput(default, measured) == 2500  # no entry: the estimate
    assert plan.paper_gpu_hours(measured, mpvg) == pytest.approx(plan.paper_gpu_hours(estimated, mpvg) / 2)
    coco = cells["coco-deit_ti-mpvg"]
    assert plan.throughput(coco, measured) == 14.0
    # SLURM resources: runtime from the measured speed, CPUs to feed the fastest measured model
    res = plan.cell_resources(measured, mpvg)
    assert res["cpus_per_task"] == res["gpu"] * plan.loader_cpus_per_gpu(5000)
    assert res["runtime"] < plan.cell_resources(estimated, mpvg)["runtime"]
    assert plan.cell_resources(estimated, mpvg)["cpus_per_task"] == res["gpu"] * plan.CPUS_PER_GPU
    # the cost table says which numbers are measured and on which GPU
    table = cost_table(measured)
    assert "| img/s/GPU (measured on NVIDIA H100 80GB HBM3, * estimated) |" in table
    assert "| in1k-deit_ti-mpvg | " in table and "| 5000 |" in table and "| 2500* |" in table
    assert "| img/s/GPU (estimated) |" in cost_table(estimated)
    assert cli.main(["workflow", "cost", "--params", str(PARAMS), "--set", "scale=paper",
                     "--set", f"paths.measured_speeds={path}"]) == 0
    assert "measured on NVIDIA H100 80GB HBM3" in capsys.readouterr().out


@pytest.mark.parametrize("content, message", [
    ("{not json", "not readable JSON"),
    (json.dumps({"format": "other"}), "'format' is not 'mpvg-speeds-v1'"),
    (json.dumps({"format": "mpvg-speeds-v1", "images_per_s_per_gpu": {"DeiT-Ti": {"MPVG": 1}}}), "'gpu'"),
    (json.dumps({"format": "mpvg-speeds-v1", "gpu": "A100", "images_per_s_per_gpu": {"DeiT-X": {"MPVG": 1}}}),
     "unknown model 'DeiT-X'"),
    (json.dumps({"format": "mpvg-speeds-v1", "gpu": "A100", "images_per_s_per_gpu": {"DeiT-Ti": {"MPVG": -3}}}),
     "DeiT-Ti/MPVG: -3 is not a positive images/s"),
])
def test_a_malformed_speeds_file_is_an_error_naming_it(tmp_path, capsys, content, message):
    path = tmp_path / "speeds.json"
    path.write_text(content)
    params = load_params(PARAMS, ["scale=paper", f"paths.measured_speeds={path}"])
    with pytest.raises(ValueError, match=f"measured speeds file {re.escape(str(path))} .*{re.escape(message)}"):
        plan.throughput(expand_cells(params)["in1k-deit_ti-mpvg"], params)
    with pytest.raises(SystemExit) as stop:
        cli.main(["workflow", "cost", "--params", str(PARAMS), "--set", "scale=paper",
                  "--set", f"paths.measured_speeds={path}"])
    assert stop.value.code == 2 and f"mpvg: measured speeds file {path}" in capsys.readouterr().err


def test_a_missing_speeds_file_is_named(tmp_path):
    params = load_params(PARAMS, ["scale=paper", f"paths.measured_speeds={tmp_path / 'nope.json'}"])
    with pytest.raises(ValueError, match=f"measured speeds file {tmp_path / 'nope.json'} .*no such file"):
        plan.cell_resources(params, expand_cells(params)["in1k-deit_ti-mpvg"])


@pytest.mark.parametrize("cell, args, compile, verdict", [
    ("in1k-deit_ti-mpvg", [], "auto", True),
    ("in1k-swin_ti-mpvg", [], "auto", False),
    ("in1k-t2t_vit_7-mpvg", [], "auto", None),  # not measured: auto stays eager on CUDA
    ("in1k-deit_ti-mpvg", ["--compile"], "on", True),
    ("in1k-deit_ti-mpvg", ["--compile", "off", "--fused", "off"], "off", True),
])
def test_a_training_job_gets_gpu_checks_compile_verdict_for_its_model(tmp_path, monkeypatch, cell, args, compile,
                                                                      verdict):
    """`--compile auto` (the default) follows gpu_check's verdict for the job's model, read from
    paths.measured_speeds by the command line (mpvg.training.gpu_defaults.choose decides on CUDA)."""
    import mpvg.training.engine as engine

    path = speeds_file(tmp_path / "speeds.json", {"DeiT-Ti": {"MPVG": 5000.0}})
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "compile": {"DeiT-Ti": True, "Swin-Ti": False}}))
    seen = {}
    monkeypatch.setattr(engine, "train", lambda spec, opts: seen.update(opts=opts))  # the options it would run with
    assert cli.main(["train", "--params", str(PARAMS), "--set", f"paths.measured_speeds={path}", "--cell", cell,
                     "--out", str(tmp_path / "run"), "--no-tracking", *args]) == 0
    opts = seen["opts"]
    assert (opts.compile, opts.compile_verdict) == (compile, verdict)
    assert opts.fused == ("off" if "--fused" in args else "auto")
