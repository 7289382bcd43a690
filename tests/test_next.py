"""Seeds where they pay: `seeds_per_cell` in params.yaml (which seeds each cell runs, the jobs
planned for them) and `mpvg workflow next --budget H` (the next round that ends the most claims
per GPU-hour) on constructed steps and results with a known best plan (docs/claims.md)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mpvg.config import Cell, ConfigError, cell_seeds, expand_cells, load_params
from mpvg.reporting import claims as C
from mpvg.workflow import next as N
from mpvg.workflow.plan import build_plan, paper_gpu_hours

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params.yaml"


# --------------------------------------------------------------------------- seeds_per_cell

def test_seeds_per_cell_overrides_the_global_seeds_for_matching_cells():
    p = load_params(PARAMS, ["scale=budget", "seeds=[0]",
                             "seeds_per_cell={in1k-deit_ti-mpvg: [0, 1, 2], c100-vit_lite-*: [4, 5]}"])
    cells = expand_cells(p)
    seeds = cell_seeds(p, cells)
    assert seeds["in1k-deit_ti-mpvg"] == [0, 1, 2] and seeds["in1k-deit_ti-pvg"] == [0]
    assert all(seeds[c] == [4, 5] for c in cells if c.startswith("c100-vit_lite-"))
    jobs = build_plan(p, str(PARAMS))
    runs = sorted((j.cell, j.seed) for j in jobs if j.cell)
    assert [s for c, s in runs if c == "in1k-deit_ti-mpvg"] == [0, 1, 2]
    assert [s for c, s in runs if c == "c100-vit_lite-lape"] == [4, 5]
    assert len(runs) == 26 + 2 + 4 * 1                                      # 26 cells, +2 DeiT-Ti, +1 per ViT-Lite
    report = next(j for j in jobs if j.rule == "report")
    assert "runs/train/in1k-deit_ti-mpvg/seed2/result.json" in report.deps
    assert report.params == ["scale", "seeds", "seeds_per_cell"]
    # without the key (or with {}), every cell runs the global seeds
    plain = load_params(PARAMS, ["scale=budget", "seeds=[0,1]"])
    assert set(map(tuple, cell_seeds(plain, expand_cells(plain)).values())) == {(0, 1)}


@pytest.mark.parametrize("value, needle", [
    ("{nope-*: [0]}", "seeds_per_cell: pattern 'nope-*' (scale 'budget') matches no cell of the grid"),
    ("{in1k-deit_ti-*: [0], in1k-deit_ti-mpvg: [1]}",
     "seeds_per_cell: patterns 'in1k-deit_ti-*' and 'in1k-deit_ti-mpvg' both match cell in1k-deit_ti-mpvg"),
    ("{c100-t2t_vit_7-pvg: [0, 3]}",
     "seeds_per_cell: cell c100-t2t_vit_7-pvg runs seed(s) [3], which in1k-t2t_vit_7-pvg, the cell it starts "
     "from, does not run"),
])
def test_bad_seeds_per_cell_is_named(value, needle):
    p = load_params(PARAMS, ["scale=budget", f"seeds_per_cell={value}"])
    with pytest.raises(ConfigError) as err:
        cell_seeds(p, expand_cells(p))
    assert needle in str(err.value)


def test_seeds_per_cell_schema():
    with pytest.raises(ConfigError, match="seeds_per_cell"):
        load_params(PARAMS, ["seeds_per_cell={in1k-deit_ti-mpvg: [0, 0]}"])


# --------------------------------------------------------------------------- the planner

def _cells(*ids, init=None):
    init = init or {}
    return {c: Cell(c, "train", "in1k", "DeiT-Ti", "MPVG", {}, "deit", "imagenet", init.get(c), ["T1"]) for c in ids}


def test_greedy_takes_the_claims_that_share_cells():
    """X-Y and X-Z (0.9 each, sharing X) against W-V (0.95) with 3 GPU-h: the shared pair ends 1.8
    claims for 3 GPU-h, W-V 0.95; the plan is the pair, and W-V does not fit after it."""
    cells = _cells("X", "Y", "Z", "W", "V")
    hours = {"X": 1 / 3, "Y": 1 / 3, "Z": 1 / 3, "W": 0.5, "V": 0.5}
    steps = [N.Step("xy", {"X": 3, "Y": 3}, 0.9, 1), N.Step("xz", {"X": 3, "Z": 3}, 0.9, 1),
             N.Step("wv", {"W": 3, "V": 3}, 0.95, 1)]
    plan = N.propose(steps, {}, cells, hours, budget=3.0)
    assert [s.claim_id for s in plan.steps] == ["xy", "xz"]                 # a tie: the first id
    assert plan.add == {"X": 3, "Y": 3, "Z": 3} and plan.gpu_hours == pytest.approx(3.0)
    # with 2 GPU-h only one of the pair fits (0.45 per GPU-h, better than W-V's 0.317, which costs 3)
    plan = N.propose(steps, {}, cells, hours, budget=2.0)
    assert [s.claim_id for s in plan.steps] == ["xy"] and plan.gpu_hours == pytest.approx(2.0)
    # seeds already there cost nothing; a fine-tune's start cell runs the same seeds (and is paid for)
    cells = _cells("A", "B", "F", init={"F": "B"})
    plan = N.propose([N.Step("af", {"A": 5, "F": 5}, 0.8, 2)], {"A": 3, "F": 3, "B": 3}, cells,
                     {"A": 1.0, "B": 2.0, "F": 0.5}, budget=100)
    assert plan.add == {"A": 2, "F": 2, "B": 2} and plan.gpu_hours == pytest.approx(2 + 1 + 4)
    lists = N.new_seed_lists(plan, {"A": [0, 1, 2], "F": [0, 2, 7], "B": [0, 1, 2]}, cells)
    assert lists == {"A": [0, 1, 2, 3, 4], "F": [0, 1, 2, 3, 7], "B": [0, 1, 2, 3, 7]}   # B: F's new seeds
    assert N.propose(steps, {}, _cells("X", "Y", "Z", "W", "V"), {c: 10.0 for c in "XYZWV"}, 1.0).steps == []


def test_planned_seeds_replace_a_matching_pattern_by_its_cells():
    params = load_params(PARAMS, ["scale=budget", "seeds_per_cell={c100-vit_lite-*: [0, 1], in1k-t2t_vit_7-mpvg: [0, 5]}"])
    cells = expand_cells(params)
    merged = N.merged_seeds_per_cell(params, cells, {"c100-vit_lite-pvg": [0, 1, 2]})
    assert merged == {"c100-vit_lite-default": [0, 1], "c100-vit_lite-lape": [0, 1], "c100-vit_lite-mpvg": [0, 1],
                      "in1k-t2t_vit_7-mpvg": [0, 5], "c100-vit_lite-pvg": [0, 1, 2]}
    p = load_params(PARAMS, ["scale=budget", f"seeds_per_cell={N._flow(merged)}"])
    assert cell_seeds(p, expand_cells(p))["c100-vit_lite-pvg"] == [0, 1, 2]


def test_next_rounds_from_constructed_results():
    params = load_params(PARAMS, ["scale=budget", "seeds=[0,1,2]"])
    cells = expand_cells(params)
    res = {cid: [{"metrics": {"top1": v}, "seed": i} for i, v in enumerate(vals)] for cid, vals in {
        "in1k-deit_ti-mpvg": [73.4, 73.5, 73.6], "in1k-deit_ti-pvg": [73.0, 73.1, 73.2],
        "in1k-deit_ti-default": [72.0, 71.9, 72.1]}.items()}
    hours = {cid: paper_gpu_hours(params, cell) for cid, cell in cells.items()}
    verdicts = C.judge_all(C.load_claims(), cells, res, "budget", gpu_hours=hours)
    steps = {s.claim_id: s for s in N.steps_of(verdicts, cells)}
    assert "t1-deit_ti-mpvg-vs-default" not in steps                         # holds at round 1: stopped
    assert steps["t1-deit_ti-mpvg-vs-pvg"].targets == {"in1k-deit_ti-mpvg": 18, "in1k-deit_ti-pvg": 18}
    assert steps["t1-deit_ti-mpvg-vs-pvg"].round == 2
    assert "t1-deit_s-mpvg-vs-pvg" not in steps                              # not in the budget grid
    v = {v.claim.id: v for v in verdicts}["t1-deit_ti-mpvg-vs-pvg"]
    assert v.next_gpu_hours == pytest.approx(15 * hours["in1k-deit_ti-mpvg"] + 15 * hours["in1k-deit_ti-pvg"])


def test_workflow_next_command_on_an_empty_runs_folder(tmp_path):
    """Budget scale, nothing run, 10 GPU-h: the three ViT-Lite claims (one shared MPVG cell, 4 cells x
    3 seeds x 0.72 GPU-h = 8.6) end 1.5 claims expected (no spread known for CIFAR-100: 0.5 each);
    DeiT-Ti MPVG > Default (2 cells x 3 seeds x 1.44 = 8.6 GPU-h) 0.92; the T2T-ViT-7 claims pay
    for their ImageNet start cells. The plan is the ViT-Lite round, and its commands set exactly
    those seeds."""
    env = {"PYTHONPATH": str(ROOT / "src"), "PATH": str(Path(sys.executable).parent)}
    cmd = [sys.executable, "-m", "mpvg", "workflow", "next", "--params", str(PARAMS), "--set", "scale=budget",
           "--runs", str(tmp_path / "runs"), "--budget", "10"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "mpvg workflow next: scale budget, budget 10 GPU-h; 29 open claim(s), 3 advanced by this round"
    rows = [ln for ln in lines if ln.startswith("| c100-") or ln.startswith("| in1k-")]
    assert sorted(r.split(" | ")[0][2:] for r in rows) == sorted(f"c100-vit_lite-{m}" for m in
                                                                ("mpvg", "pvg", "lape", "default"))
    assert all(" | 0 | 3 | [0, 1, 2] | 2.2 |" in r for r in rows)
    assert "| **total** | | 12 | | **8.6** |" in lines
    assert [ln for ln in lines if ln.startswith("- ")] == [
        f"- t2-vit_lite-mpvg-vs-{m}: round 1 at 3 seeds per cell, P(ends it) 0.50" for m in ("default", "lape", "pvg")]
    value = ("seeds_per_cell={c100-vit_lite-mpvg: [0, 1, 2], c100-vit_lite-default: [0, 1, 2], "
             "c100-vit_lite-lape: [0, 1, 2], c100-vit_lite-pvg: [0, 1, 2]}")
    assert f"  snakemake --profile slurm --config params={PARAMS} scale=budget 'set=[\"{value}\"]'" in lines
    assert f"  dvc exp run -S 'scale=budget' -S '{value}'" in lines
    # the printed value is what params.yaml accepts, and plans exactly those runs
    p = load_params(PARAMS, ["scale=budget", value])
    seeds = cell_seeds(p, expand_cells(p))
    assert {c: s for c, s in seeds.items() if s != [0]} == {f"c100-vit_lite-{m}": [0, 1, 2]
                                                            for m in ("mpvg", "pvg", "lape", "default")}
    # the tiny scale has no cost model: a clear refusal
    out = subprocess.run(cmd[:7] + ["--runs", str(tmp_path), "--budget", "10"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "the cost model is for the paper or budget scale, not 'tiny'" in out.stderr


def test_the_report_prices_next_rounds_with_the_cost_model(tmp_path):
    """`mpvg report` at the budget scale hands the cost model to the claims page: with nothing run,
    DeiT-Ti MPVG > Default's first round is 3 + 3 seeds at the planned GPU-hours of one seed."""
    from mpvg.reporting.commands import planned_gpu_hours, report_inputs
    from mpvg.reporting.report import build_reports

    params = load_params(PARAMS, ["scale=budget"])
    cells = expand_cells(params)
    hours = planned_gpu_hours(params, cells)
    assert hours == {cid: paper_gpu_hours(params, cell) for cid, cell in cells.items()}
    assert planned_gpu_hours(load_params(PARAMS), expand_cells(load_params(PARAMS))) is None
    inputs = report_inputs(params, cells, tmp_path / "runs")
    assert inputs["gpu_hours"] == hours
    build_reports(params, cells, tmp_path / "runs", tmp_path / "reports", commit="x", **inputs)
    md = (tmp_path / "reports" / "claims.md").read_text()
    cost = 3 * hours["in1k-deit_ti-mpvg"] + 3 * hours["in1k-deit_ti-default"]
    row = next(ln for ln in md.splitlines() if ln.startswith("| MPVG > Default (DeiT-Ti) |"))
    assert row.endswith(f"| pending: no run | — | +3/+3 seeds, {cost:.1f} GPU-h |")
    assert "Scale: budget" in md
