"""`mpvg report`: paper numbers, constructed result.json files, Markdown and LaTeX output."""
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from mpvg.config import expand_cells, load_params
from mpvg.reporting.commands import report_inputs
from mpvg.reporting.report import build_reports
from mpvg.reporting.tables import best_indices
from mpvg.results.paper import load_paper_numbers, match_cells, parse_overrides
from mpvg.results.render import (LONG_TABLE_ROWS, Entry, Table, latex_escape, render_latex, render_markdown,
                                 scale_note)
from mpvg.results.runs import aggregate, collect_results, compute_totals, load_result

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params.yaml"


@pytest.fixture(scope="module")
def params():
    return load_params(PARAMS, ["seeds=[0,1]"])


@pytest.fixture(scope="module")
def cells(params):
    return expand_cells(params)


def write_result(runs: Path, cell: str, seed: int, metrics: dict, *, stage="train", scale="tiny",
                 params_count=5_721_640, gpu_hours=0.0, cpu_hours=0.01, device="cpu", params=None) -> Path:
    """A hand-made result.json; with ``params``, stamped with the run signature those params give
    (as if made by `mpvg train` now), so the report shows it (an unstamped one is 'stale')."""
    from mpvg.signature import digest, expected_inputs

    path = runs / stage / cell / f"seed{seed}" / "result.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "cell": cell, "stage": stage, "task": cell.split("-")[0], "model": "DeiT-Ti", "method": "x",
        "dataset": "imagenet", "seed": seed, "scale": scale, "pe": {}, "params": params_count,
        "metrics": metrics, "epochs": 1, "wall_time_s": 36.0, "gpu_hours": gpu_hours, "cpu_hours": cpu_hours,
        "device": device, "world_size": 1, "git_commit": "abc", "checkpoint": "", "mlflow_run_id": ""}
    if params is not None and cell in expand_cells(params) and scale == params["scale"]:
        inputs = expected_inputs(params, cell, seed)
        record.update(signature=digest(inputs), signature_inputs=inputs)
    path.write_text(json.dumps(record))
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
    for env, spec, body in re.findall(r"\\begin\{(tabular|longtable)\}\{([lrc]+)\}(.*?)\\end\{\1\}", tex, re.S):
        n += 1
        assert "\\toprule" in body and "\\midrule" in body and "\\bottomrule" in body
        rows = [l for l in body.strip().splitlines() if l.endswith("\\\\") and not l.startswith("\\caption")]
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
                write_result(runs, f"in1k-deit_ti-{method}", seed, {"top1": top1, "top5": 90.0, "loss": 1.0},
                             params=params)
        write_result(runs, "coco-deit_ti-mpvg", 0, {"bbox_ap": 10.0, "segm_ap": 9.5}, stage="detect",
                     gpu_hours=0.5, device="cuda", params=params)
        write_result(runs, "in1k-deit_s-mpvg", 0, {"top1": 70.0}, scale="paper")          # other scale
        write_result(runs, "in1k-old-cell", 0, {"top1": 1.0})                               # not in params
    out = tmp_path / out_name
    build_reports(params, cells, runs, out, commit="0123abc", **report_inputs(params, cells, runs))
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
    assert deit["PVG"][6] == "**63.00 ± 1.41**"                                      # best of ours
    assert deit["MPVG"][5] == "**73.51**" and deit["MPVG"][6] == "62.00 ± 1.41"      # paper's best
    assert deit["MPVG"][8] == "2/2"
    deit_s = [r for r in rows if r[0] == "DeiT-S"][0]
    assert deit_s[6] == "pending" and deit_s[7] == "" and deit_s[8] == "0/2"          # paper-scale result left out
    text = (out / "table1.md").read_text()
    assert text.startswith("> Scale: tiny.") and "not comparable" in text
    assert text.count("Scale:") == 1  # once per page, not in the caption


def by_model_method(rows: list[list[str]]) -> dict:
    """Rows of a grouped table by (model, method); the model is written on a group's first row only."""
    out, model = {}, None
    for r in rows:
        model = r[0] or model
        out[(model, r[1])] = r
    return out


def test_params_column_is_the_full_size_build(tmp_path, params, cells):
    """#Params ours = the full-size architecture (meta-device build), not the shrunk run's count
    (the sample results say 5,721,640 for every cell), floored to 3 decimals like the paper."""
    out = build_sample(tmp_path, params, cells)
    (t1,) = parse_pipe_tables((out / "table1.md").read_text())
    by = by_model_method(t1[1:])
    assert by[("DeiT-Ti", "Default")][3:5] == ["5.717", "+0.000"]            # 5,717,416
    assert by[("DeiT-Ti", "MPVG")][3:5] == ["5.721", "+0.000"]               # 5,721,640
    assert by[("DeiT-Ti", "LaPE")][3:5] == ["5.722", "+0.001"]               # 5,722,024: documented exception
    assert by[("DeiT-B", "MPVG")][3:5] == ["86.584", "+0.000"]               # pending cell: still counted
    assert by[("Swin-Ti", "PVG")][3:5] == ["28.598", "+0.000"]
    assert by[("T2T-ViT-7", "Default")][3:5] == ["4.310", "+0.000"]
    text = (out / "table1.md").read_text()
    assert "- DeiT-Ti LaPE #Params: 5,722,024 parameters; the paper's 5.721 is inconsistent" in text
    (t2,) = parse_pipe_tables((out / "table2.md").read_text())
    assert by_model_method(t2[1:])[("ViT-Lite", "MPVG")][3:5] == ["3.743", "+0.000"]    # 100 classes, 32 px
    assert by_model_method(t2[1:])[("T2T-ViT-7", "MPVG")][3:5] == ["4.081", "+0.000"]   # 100 classes, 224 px


def test_params_mismatch_at_paper_scale_is_noted(tmp_path):
    params = load_params(PARAMS, ["scale=paper"])
    cells = expand_cells(params)
    runs = tmp_path / "runs"
    write_result(runs, "in1k-deit_ti-mpvg", 0, {"top1": 73.0}, scale="paper", params_count=5_721_640, params=params)
    write_result(runs, "in1k-deit_ti-pvg", 0, {"top1": 73.0}, scale="paper", params_count=5_000_000, params=params)
    build_reports(params, cells, runs, tmp_path / "r", commit="x", **report_inputs(params, cells, runs))
    text = (tmp_path / "r" / "table1.md").read_text()
    assert "in1k-deit_ti-pvg seed 0: result.json reports 5,000,000 parameters, the full-size build has 5,721,256" in text
    assert "in1k-deit_ti-mpvg seed 0" not in text
    assert text.startswith("> Scale: paper")


def test_bold_rule_unique_best_of_at_least_two():
    assert best_indices([1.0, 3.0, 2.0], 2) == {1}
    assert best_indices([0.0, 0.0, 0.0, 0.0], 1) == set()        # a tie is no best
    assert best_indices([2.04, 2.03], 1) == set()                 # tie after rounding to what is shown
    assert best_indices([None, 5.0, None], 2) == set()            # one finished value: nothing to beat
    assert best_indices([None, 5.0, 4.0, float("nan")], 2) == {1}


def test_all_zero_cells_are_not_bold(tmp_path, params, cells):
    runs = tmp_path / "runs"
    for method in ("default", "lape", "pvg", "mpvg"):
        write_result(runs, f"coco-deit_ti-{method}", 0, {"bbox_ap": 0.0, "segm_ap": 0.0}, stage="detect", params=params)
    build_reports(params, cells, runs, tmp_path / "r", commit="x", **report_inputs(params, cells, runs))
    (t3,) = parse_pipe_tables((tmp_path / "r" / "table3.md").read_text())
    assert [r[3] for r in t3[1:]] == ["0.0"] * 4 and [r[6] for r in t3[1:]] == ["0.0"] * 4
    assert [r[5] for r in t3[1:]].count("**41.4**") == 1         # the paper's own best stays bold


def test_other_tables(tmp_path, params, cells):
    out = build_sample(tmp_path, params, cells)
    (t3,) = parse_pipe_tables((out / "table3.md").read_text())
    mpvg = [r for r in t3 if r[1] == "MPVG"][0]
    assert mpvg[:5] == ["", "MPVG", "**46.5**", "10.0", "-36.5"] and mpvg[6:9] == ["9.5", "-31.9", "1/2"]
    (t6,) = parse_pipe_tables((out / "table6.md").read_text())
    assert t6[1][:3] == ["yes", "yes", "yes"] and t6[4][:4] == ["no", "yes", "yes", "**73.51**"]
    assert t6[4][4] == "62.00 ± 1.41"  # the only finished row of Table 6: a lone value is not bold
    (f1,) = parse_pipe_tables((out / "figure1.md").read_text())
    assert [r[1] for r in f1[1:]] == ["72.14", "72.40", "—", "73.17", "**73.51**"]
    cost_md = (out / "cost.md").read_text()
    (cost,) = parse_pipe_tables(cost_md)
    assert "difference" not in cost_md and "Δ" not in cost_md
    by = {r[0]: r for r in cost[1:]}
    assert by["in1k-deit_ti-pvg"][3:] == ["2/2", "0.0200", "0.0000", "0.0200"]
    assert by["coco-deit_ti-mpvg"][1:3] == ["detect", "cuda"] and by["coco-deit_ti-mpvg"][5] == "0.5000"
    assert by["in1k-deit_s-mpvg"][4] == "pending"
    assert not any("in1k-old-cell" in key for key in by)  # not a cell of params.yaml: left out, listed below
    assert by["**Total**"][4:] == ["**0.0900**", "**0.5000**", "**0.0900**"]   # 9 runs x 36 s; 9 x 0.01 CPU-h
    index = (out / "README.md").read_text()
    assert "`0123abc`" in index and "[table5.md](table5.md)" in index
    assert "| Table 1: ImageNet-1K | [table1.md](table1.md) |" in index
    assert "| Figure 5: Last-LN PE without the layer-wise structure |" in index
    assert "runs/train/in1k-deit_s-mpvg/seed0/result.json" in index  # left out: other scale
    assert "runs/train/in1k-old-cell/seed0/result.json" in index    # left out: not a cell of params.yaml
    assert "the numbers come from `abc` (9 runs)" in index
    assert re.search(r"resolved params hash `[0-9a-f]{12}`", index)
    assert "- Compute of the 9 reported runs: wall time 0.0900 h, GPU-hours 0.5000, CPU-hours 0.0900" in index
    all_md = (out / "tables.md").read_text()
    assert all_md.count("Scale: tiny") == 1 and all_md.count("### Table 1: ImageNet-1K") == 1
    for md in out.glob("*.md"):
        parse_pipe_tables(md.read_text())  # every Markdown file holds well-formed tables
        if md.name != "README.md":
            assert md.read_text().count("Scale:") == 1, md.name


def test_build_json_totals(tmp_path, params, cells):
    out = build_sample(tmp_path, params, cells)
    build = json.loads((out / "build.json").read_text())
    assert build["results_total"] == {"runs": 9, "wall_time_s": 324.0, "gpu_hours": 0.5, "cpu_hours": pytest.approx(0.09)}
    assert isinstance(build["build_wall_time_s"], float) and 0 < build["build_wall_time_s"] < 600
    assert build["built_at"].endswith("Z") and build["finished"] == 5  # the 6th cell is not in params
    assert compute_totals({}) == {"runs": 0, "wall_time_s": None, "gpu_hours": None, "cpu_hours": None}
    assert compute_totals({"a": [{"wall_time_s": 2.0}, {"wall_time_s": 3.0, "gpu_hours": 1.5}]}) == {
        "runs": 2, "wall_time_s": 5.0, "gpu_hours": 1.5, "cpu_hours": None}


def test_rebuild_is_byte_identical(tmp_path, params, cells):
    a = build_sample(tmp_path, params, cells, "a")
    b = build_sample(tmp_path, params, cells, "b")
    files = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file() and p.name != "build.json")
    # 9 tables x (.md, .tex), tables.md, tables.tex, README.md, claims.{md,tex,json}; DVC's metrics per table
    assert len(files) == 24 + 8 and len([f for f in files if f.startswith("metrics/")]) == 8
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_index_figures_caption_and_thumbnail(tmp_path, params, cells):
    out = build_sample(tmp_path, params, cells)
    assert "No figures yet" in (out / "README.md").read_text()
    figs = out / "figures"
    figs.mkdir()
    for name in ("figure2.png", "figure2.pdf", "figure9.png", "analysis.md"):
        (figs / name).write_bytes(b"x")
    (figs / "analysis.json").write_text(json.dumps({"figures": {
        "figure2": {"heading": "Figure 2: token embedding and PE per layer", "caption": "Per layer maps.",
                    "status": "partial", "files": ["figure2.png", "figure2.pdf"], "panels": []},
        "figure4": {"heading": "Figure 4: r", "caption": "not drawn", "status": "pending", "panels": []}}}))
    build_sample(tmp_path, params, cells)
    index = (out / "README.md").read_text()
    assert ("### Figure 2: token embedding and PE per layer\n\nPer layer maps. (panels: partial; "
            "[PNG](figures/figure2.png), [PDF](figures/figure2.pdf))\n\n"
            '<a href="figures/figure2.png"><img src="figures/figure2.png" width="360" '
            'alt="Figure 2: token embedding and PE per layer"></a>\n') in index
    assert "Figure 4" not in index  # named in analysis.json but its PNG is not there
    assert "### figure9\n\n(not described by figures/analysis.json: rerun `mpvg analyze`)" in index
    assert "Numbers behind the figures: [analysis.json](figures/analysis.json), [analysis.md](figures/analysis.md)" in index
    (figs / "analysis.json").write_text("{broken")
    with pytest.raises(ValueError, match="analysis.json: not valid JSON"):
        build_sample(tmp_path, params, cells)


def _aux_captions(aux: str) -> list[tuple[str, str, str]]:
    """``(kind, number, text)`` of every caption LaTeX recorded in the .aux (lists of tables/figures)."""
    return re.findall(r"\\@writefile\{lo[tf]\}\{\\contentsline \{(table|figure)\}\{\\numberline \{([^}]*)\}"
                      r"\{\\ignorespaces (.*?)\}\}\{\d+\}", aux)


def _pdflatex(cwd: Path, name: str) -> str:
    for _ in range(2):  # twice, as a LaTeX build does: longtable settles its column widths on the second run
        run = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", name], cwd=cwd,
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stdout[-2000:]
    return (cwd / name).with_suffix(".log").read_text(errors="replace")


def test_latex_structure_and_compile(tmp_path, params, cells):
    out = build_sample(tmp_path, params, cells)
    tex = (out / "tables.tex").read_text()
    assert check_latex_structure(tex) == 9
    for frag in out.glob("table*.tex"):
        check_latex_structure(frag.read_text())
    assert "\\textbf{73.51}" in (out / "table1.tex").read_text()
    assert "\\renewcommand{\\thetable}{1}\n\\caption{ImageNet-1K. Top-1" in tex
    assert "\\renewcommand{\\thefigure}{5}\n\\caption{Last-LN PE without" in tex
    assert tex.count("Scale: tiny") == 1 and "\\pagestyle{notice}" in tex  # the footer of every page
    assert (out / "table1.tex").read_text().startswith("% Scale: tiny.")
    if shutil.which("pdflatex") is None:
        pytest.skip("pdflatex not installed (apt-get install texlive-latex-base texlive-latex-recommended); "
                    "the structural checks above ran")
    log = _pdflatex(out, "tables.tex")
    assert (out / "tables.pdf").stat().st_size > 1000
    assert "Rerun" not in log and "Float too large" not in log and "Overfull" not in log
    pages = int(re.search(r"Output written on tables\.pdf \((\d+) pages", log).group(1))
    assert pages == 10  # 8 paper tables, one page each, and the cost table over two
    caps = _aux_captions((out / "tables.aux").read_text())
    assert [(k, n) for k, n, _ in caps] == [("table", str(i)) for i in range(1, 7)] + [("figure", "1"), ("figure", "5")]
    assert caps[0][2].startswith("ImageNet-1K. Top-1 accuracy") and caps[6][2].startswith("Class token vs GAP")
    assert not [c for c in caps if re.match(r"(Table|Figure) \d", c[2])]  # no "Table 1: Table 1: ..."
    assert not [c for c in caps if "Scale" in c[2]]                        # the notice is the page's, not the caption's
    # Fragments carry their own number wherever they are included.
    (out / "frag.tex").write_text("\\documentclass{article}\\usepackage[T1]{fontenc}\\usepackage{booktabs,longtable}\n"
                                  "\\begin{document}\n\\input{table3}\n\\input{figure1}\n\\input{cost}\n\\end{document}\n")
    _pdflatex(out, "frag.tex")
    assert [(k, n) for k, n, _ in _aux_captions((out / "frag.aux").read_text())] == [("table", "3"), ("figure", "1")]


def test_render_numbered_unnumbered_and_long_tables():
    t = Table("t", "Title", "Cap.", ["a", "b"], "lr", number="3")
    assert t.heading == "Table 3: Title" and render_markdown(t).startswith("### Table 3: Title\n")
    tex = render_latex(t)
    assert "\\begin{table}[htbp]" in tex and "\\renewcommand{\\thetable}{3}\n\\caption{Title. Cap.}" in tex
    f = Table("f", "Bars", "", ["a"], "l", kind="Figure", number="1")
    assert f.heading == "Figure 1: Bars" and "\\begin{figure}[htbp]" in render_latex(f)
    assert "\\renewcommand{\\thefigure}{1}\n\\caption{Bars.}" in render_latex(f)
    u = Table("u", "Ours", "Cap.", ["a"], "l")
    assert u.heading == "Ours" and "\\caption" not in render_latex(u) and "\\textbf{Ours.} Cap." in render_latex(u)
    for i in range(LONG_TABLE_ROWS + 1):
        u.add_row([str(i)])
    long = render_latex(u)
    assert "\\begin{longtable}{l}" in long and "\\endhead" in long and "\\begin{table}" not in long
    with pytest.raises(ValueError, match="kind 'Plot'"):
        Table("x", "X", "", ["a"], "l", kind="Plot")
    assert "Scale: tiny." in scale_note("tiny") and scale_note("paper").startswith("Scale: paper")


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
    write_result(runs, "c100-vit_lite-mpvg", 0, {"top1": 12.5}, params_count=3_743_000, params=load_params(PARAMS))
    assert main(["report", "--params", str(PARAMS), "--runs", str(runs), "--out", str(tmp_path / "r")]) == 0
    (t2,) = parse_pipe_tables((tmp_path / "r" / "table2.md").read_text())
    row = [r for r in t2 if r[1] == "MPVG"][0]
    assert row[3] == "3.743" and row[4] == "+0.000" and row[6] == "12.50" and row[7] == "-64.37"  # lone: not bold


def test_a_result_of_other_settings_is_stale_never_a_number(tmp_path, params, cells):
    runs = tmp_path / "runs"
    write_result(runs, "in1k-deit_ti-mpvg", 0, {"top1": 73.0}, params=params)
    write_result(runs, "in1k-deit_ti-mpvg", 1, {"top1": 99.0})                      # no signature: stale
    old = write_result(runs, "in1k-deit_ti-pvg", 0, {"top1": 98.0}, params=load_params(PARAMS, ["seeds=[0,1]",
                       "tiny.recipes.deit.lr=0.5"]))                                     # made with another lr
    assert json.loads(old.read_text())["signature"]
    out = tmp_path / "r"
    build_reports(params, cells, runs, out, commit="x", **report_inputs(params, cells, runs))
    (t1,) = parse_pipe_tables((out / "table1.md").read_text())
    deit = {r[1]: r for r in t1[1:5]}
    assert deit["PVG"][6] == "stale" and deit["MPVG"][6] == "73.00" and deit["MPVG"][-1] == "1/2"
    text = (out / "table1.md").read_text()
    assert "99.00" not in text and "98.00" not in text
    assert "seed(s) 1 stale (made with other settings), left out of the mean" in text
    index = (out / "README.md").read_text()
    assert "## Stale" in index and "- `in1k-deit_ti-pvg` seed(s) 0" in index
    build = json.loads((out / "build.json").read_text())
    assert build["stale"] == {"in1k-deit_ti-mpvg": [1], "in1k-deit_ti-pvg": [0]}
    assert build["result_commits"] == {"abc": 1} and build["signature"]
