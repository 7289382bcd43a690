"""`mpvg report`: paper numbers, constructed result.json files, Markdown and LaTeX output."""
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from mpvg.config import expand_cells, load_params
from mpvg.reporting.paper import load_paper_numbers, match_cells, parse_overrides
from mpvg.reporting.render import Entry, Table, latex_escape, render_latex
from mpvg.reporting.report import build_reports
from mpvg.reporting.results import aggregate, collect_results, load_result

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params.yaml"


@pytest.fixture(scope="module")
def params():
    return load_params(PARAMS, ["seeds=[0,1]"])


@pytest.fixture(scope="module")
def cells(params):
    return expand_cells(params)


def write_result(runs: Path, cell: str, seed: int, metrics: dict, *, stage="train", scale="tiny",
                 params_count=5_721_640, gpu_hours=0.0, cpu_hours=0.01, device="cpu") -> Path:
    path = runs / stage / cell / f"seed{seed}" / "result.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "cell": cell, "stage": stage, "task": cell.split("-")[0], "model": "DeiT-Ti", "method": "x",
        "dataset": "imagenet", "seed": seed, "scale": scale, "pe": {}, "params": params_count,
        "metrics": metrics, "epochs": 1, "wall_time_s": 36.0, "gpu_hours": gpu_hours, "cpu_hours": cpu_hours,
        "device": device, "world_size": 1, "git_commit": "abc", "checkpoint": "", "mlflow_run_id": ""}))
    return path


# ----------------------------------------------------------------------------- Markdown / LaTeX parsers

def parse_pipe_tables(md: str) -> list[list[list[str]]]:
    """Every pipe table of a Markdown text as rows of cells; asserts it is well formed."""
    tables, block = [], []
    for line in md.splitlines() + [""]:
        if line.startswith("|"):
            block.append(line)
            continue
        if block:
            rows = [[c.strip() for c in re.split(r"(?<!\\)\|", l)[1:-1]] for l in block]
            assert len(rows) >= 2, block
            assert all(re.fullmatch(r":?-+:?", c) for c in rows[1]), f"no separator row: {block[1]}"
            assert {len(r) for r in rows} == {len(rows[0])}, f"ragged table: {block}"
            tables.append([rows[0]] + rows[2:])
            block = []
    return tables


def check_latex_structure(tex: str) -> int:
    """Balanced environments and braces, booktabs rules, every row as wide as its column spec."""
    envs = re.findall(r"\\(begin|end)\{(\w+)\}", tex)
    stack = []
    for kind, name in envs:
        if kind == "begin":
            stack.append(name)
        else:
            assert stack and stack.pop() == name, f"\\end{{{name}}} does not close the open environment"
    assert not stack, f"unclosed environments {stack}"
    depth = 0
    for ch in re.sub(r"\\[{}]", "", tex):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        assert depth >= 0
    assert depth == 0
    n = 0
    for spec, body in re.findall(r"\\begin\{tabular\}\{([lrc]+)\}(.*?)\\end\{tabular\}", tex, re.S):
        n += 1
        assert "\\toprule" in body and "\\midrule" in body and "\\bottomrule" in body
        rows = [l for l in body.strip().splitlines() if l.endswith("\\\\")]
        assert rows
        for row in rows:
            assert len(re.findall(r"(?<!\\)&", row)) == len(spec) - 1, row
    return n


# ----------------------------------------------------------------------------- paper numbers

def test_parse_overrides_types():
    assert parse_overrides("pool=avg; last_ln_pe=0;hierarchical=false") == {
        "pool": "avg", "last_ln_pe": 0, "hierarchical": False}
    assert parse_overrides("") == {}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_overrides("pool")


def test_paper_numbers_transcribed():
    rows = load_paper_numbers()
    by = {(r.table, r.model, r.method, tuple(sorted(r.overrides.items()))): r for r in rows}
    assert len([r for r in rows if r.table == "T1"]) == 24
    assert all(set(r.values) == {"params_m", "top1"} for r in rows if r.table in ("T1", "T2"))
    assert by[("T1", "DeiT-Ti", "MPVG", ())].values == {"params_m": 5.721, "top1": 73.51}
    assert by[("T1", "Swin-Ti", "Default", ())].values["top1"] == 81.37
    assert by[("T2", "T2T-ViT-7", "MPVG", ())].values["top1"] == 83.51
    assert by[("T3", "DeiT-Ti", "MPVG", ())].values == {"bbox_ap": 46.5, "segm_ap": 41.4}
    assert by[("T4", "DeiT-Ti", "Default", ())].values == {"miou": 40.55}
    assert by[("T5", "DeiT-Ti", "MPVG", (("last_ln_pe", 8),))].values == {"top1": 73.38}
    assert by[("T6", "DeiT-Ti", "MPVG", (("add_at_input", False),))].values == {"top1": 73.28}
    assert by[("F5", "DeiT-Ti", "Default", (("last_ln_pe", 0), ("pool", "avg")))].values == {"top1": 72.14}
    assert by[("F1", "DeiT-Ti", "PVG", (("pool", "token"),))].values == {"top1": None}  # only in the image
    assert by[("F6", "DeiT-Ti", "MPVG", ())].values == {"beta_var": 0.0193}


def test_bad_csv_is_named(tmp_path):
    bad = tmp_path / "p.csv"
    bad.write_text("table,task\nT1,in1k\n")
    with pytest.raises(ValueError, match="header must be"):
        load_paper_numbers(bad)
    bad.write_text("table,task,model,method,overrides,label,metric,value,source\nT1,in1k,A,B,,L,acc,1,x\n")
    with pytest.raises(ValueError, match=r"p.csv:2: metric 'acc'"):
        load_paper_numbers(bad)


def test_every_paper_row_has_a_cell(params, cells):
    rows = [r for r in load_paper_numbers() if r.table != "F6"]
    matches = match_cells(rows, cells, params)
    assert [r.key for r in rows if matches[r.key] is None] == []
    by_label = {(r.table, r.label): matches[r.key] for r in rows}
    assert by_label[("T5", "pos_0 (MPVG)")] == "in1k-deit_ti-mpvg"
    assert by_label[("T5", "pos_11")] == "in1k-deit_ti-mpvg-lastpe11"
    assert by_label[("F5", "(b) GAP + Last-LN PE (non-layer-wise)")] == "in1k-deit_ti-default-gap-lastpe0"
    assert by_label[("T1", "MPVG")] in ("in1k-deit_ti-mpvg", "in1k-deit_s-mpvg", "in1k-deit_b-mpvg",
                                        "in1k-swin_ti-mpvg", "in1k-ceit_ti-mpvg", "in1k-t2t_vit_7-mpvg")
    swin = [r for r in rows if r.table == "T1" and r.model == "Swin-Ti" and r.method == "PVG"][0]
    assert matches[swin.key] == "in1k-swin_ti-pvg"  # Swin's include_layer0 from params applies to both sides


# ----------------------------------------------------------------------------- results

def test_collect_and_aggregate(tmp_path):
    write_result(tmp_path, "in1k-deit_ti-pvg", 1, {"top1": 2.0})
    write_result(tmp_path, "in1k-deit_ti-pvg", 0, {"top1": 4.0})
    res = collect_results(tmp_path)
    assert [r["seed"] for r in res["in1k-deit_ti-pvg"]] == [0, 1]
    agg = aggregate([4.0, 2.0])
    assert (agg.mean, agg.n) == (3.0, 2) and agg.std == pytest.approx(2 ** 0.5)
    assert aggregate([5.0]).std is None and aggregate([]) is None
    bad = write_result(tmp_path, "in1k-deit_ti-mpvg", 0, {})
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="in1k-deit_ti-mpvg/seed0/result.json: not valid JSON"):
        collect_results(tmp_path)
    bad.write_text(json.dumps({"cell": "in1k-deit_ti-mpvg"}))
    with pytest.raises(ValueError, match="missing field"):
        load_result(bad)


# ----------------------------------------------------------------------------- the report

def build_sample(tmp_path, params, cells, out_name="reports"):
    runs = tmp_path / "runs"
    if not runs.exists():
        for seed, (d, l, p, m) in enumerate([(60.0, 61.0, 62.0, 63.0), (62.0, 63.0, 64.0, 61.0)]):
            for method, top1 in zip(("default", "lape", "pvg", "mpvg"), (d, l, p, m)):
                write_result(runs, f"in1k-deit_ti-{method}", seed, {"top1": top1, "top5": 90.0, "loss": 1.0})
        write_result(runs, "coco-deit_ti-mpvg", 0, {"bbox_ap": 10.0, "segm_ap": 9.5}, stage="detect",
                     gpu_hours=0.5, device="cuda")
        write_result(runs, "in1k-deit_s-mpvg", 0, {"top1": 70.0}, scale="paper")          # other scale
        write_result(runs, "in1k-old-cell", 0, {"top1": 1.0})                               # not in params
    out = tmp_path / out_name
    build_reports(params, cells, runs, out, commit="0123abc")
    return out


def test_table1_values_pending_and_best(tmp_path, params, cells):
    out = build_sample(tmp_path, params, cells)
    (t1,) = parse_pipe_tables((out / "table1.md").read_text())
    header, rows = t1[0], t1[1:]
    assert header == ["Model", "Method", "#Params (M) paper", "#Params (M) ours", "Δ", "Top-1 (%) paper",
                      "Top-1 (%) ours", "Δ", "Seeds"]
    deit = {r[1]: r for r in rows[:4]}
    assert rows[0][0] == "DeiT-Ti" and rows[1][0] == ""
    assert deit["Default"][6] == "61.00 ± 1.41" and deit["Default"][7] == "-11.14"   # 61 - 72.14
    assert deit["Default"][3] == "5.722 ± 0.000" and deit["Default"][4] == "+0.005"
    assert deit["PVG"][6] == "**63.00 ± 1.41**"                                      # best of ours
    assert deit["MPVG"][5] == "**73.51**" and deit["MPVG"][6] == "62.00 ± 1.41"      # paper's best
    assert deit["MPVG"][8] == "2/2"
    deit_s = [r for r in rows if r[0] == "DeiT-S"][0]
    assert deit_s[6] == "pending" and deit_s[7] == "" and deit_s[8] == "0/2"          # paper-scale result left out
    text = (out / "table1.md").read_text()
    assert "Scale: tiny" in text and "not comparable" in text


def test_other_tables(tmp_path, params, cells):
    out = build_sample(tmp_path, params, cells)
    (t3,) = parse_pipe_tables((out / "table3.md").read_text())
    mpvg = [r for r in t3 if r[1] == "MPVG"][0]
    assert mpvg[:5] == ["", "MPVG", "**46.5**", "**10.0**", "-36.5"] and mpvg[6:9] == ["**9.5**", "-31.9", "1/2"]
    (t6,) = parse_pipe_tables((out / "table6.md").read_text())
    assert t6[1][:3] == ["yes", "yes", "yes"] and t6[4][:4] == ["no", "yes", "yes", "**73.51**"]
    assert t6[4][4] == "**62.00 ± 1.41**"  # the only finished row of Table 6 is MPVG itself
    (f1,) = parse_pipe_tables((out / "figure1.md").read_text())
    assert [r[1] for r in f1[1:]] == ["72.14", "72.40", "—", "73.17", "**73.51**"]
    (cost,) = parse_pipe_tables((out / "cost.md").read_text())
    by = {r[0]: r for r in cost[1:]}
    assert by["in1k-deit_ti-pvg"][3:] == ["2/2", "0.0200", "0.0000", "0.0200"]
    assert by["coco-deit_ti-mpvg"][1:3] == ["detect", "cuda"] and by["coco-deit_ti-mpvg"][5] == "0.5000"
    assert by["in1k-deit_s-mpvg"][4] == "pending"
    assert by["in1k-old-cell (not in params)"][3] == "1/2"
    assert by["**Total**"][5] == "**0.5000**"
    index = (out / "README.md").read_text()
    assert "`0123abc`" in index and "[table5.md](table5.md)" in index
    assert "runs/train/in1k-deit_s-mpvg/seed0/result.json" in index  # left out: other scale
    assert re.search(r"resolved params hash `[0-9a-f]{12}`", index)
    for md in out.glob("*.md"):
        parse_pipe_tables(md.read_text())  # every Markdown file holds well-formed tables


def test_rebuild_is_byte_identical(tmp_path, params, cells):
    a = build_sample(tmp_path, params, cells, "a")
    b = build_sample(tmp_path, params, cells, "b")
    files = sorted(p.name for p in a.iterdir() if p.name != "build.json")
    # 9 tables x (.md, .tex), tables.md, tables.tex, README.md, claims.{md,tex,json}
    assert len(files) == 24
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert json.loads((a / "build.json").read_text())["built_at"].endswith("Z")
    (a / "figures").mkdir()
    (a / "figures" / "figure2.png").write_bytes(b"png")
    build_sample(tmp_path, params, cells, "a")
    assert "- [figure2.png](figures/figure2.png)" in (a / "README.md").read_text()


def test_latex_structure_and_compile(tmp_path, params, cells):
    out = build_sample(tmp_path, params, cells)
    assert check_latex_structure((out / "tables.tex").read_text()) == 9
    for tex in out.glob("table*.tex"):
        check_latex_structure(tex.read_text())
    assert "\\textbf{73.51}" in (out / "table1.tex").read_text()
    if shutil.which("pdflatex") is None:
        pytest.skip("pdflatex not installed (apt-get install texlive-latex-base texlive-latex-recommended); "
                    "the structural check above ran")
    run = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "tables.tex"], cwd=out,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-2000:]
    assert (out / "tables.pdf").stat().st_size > 1000


def test_latex_escape_and_table_checks():
    assert latex_escape("a_b & 5% ± Δ") == r"a\_b \& 5\% $\pm$ $\Delta$"
    with pytest.raises(ValueError, match="no LaTeX form"):
        latex_escape("✓")
    t = Table("t", "T", "c", ["a", "b"], "lr")
    with pytest.raises(ValueError, match="row has 1 entries"):
        t.add_row(["x"])
    t.add_row([Entry("x", True), "1"])
    assert "\\textbf{x} & 1 \\\\" in render_latex(t)


def test_report_command(tmp_path):
    from mpvg.cli import main

    runs = tmp_path / "runs"
    write_result(runs, "c100-vit_lite-mpvg", 0, {"top1": 12.5}, params_count=3_743_000)
    assert main(["report", "--params", str(PARAMS), "--runs", str(runs), "--out", str(tmp_path / "r")]) == 0
    (t2,) = parse_pipe_tables((tmp_path / "r" / "table2.md").read_text())
    row = [r for r in t2 if r[1] == "MPVG"][0]
    assert row[3] == "3.743" and row[4] == "+0.000" and row[6] == "**12.50**" and row[7] == "-64.37"
