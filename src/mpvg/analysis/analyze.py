"""``mpvg analyze``: which cells each figure needs, their checkpoints, figures and analysis.json.

A panel names what was trained (model, method, PE overrides), not a cell id; the cell of
params.yaml with the same effective PE configuration is used (as the report tables do). A
missing checkpoint skips its panel with a note; a figure with no input at all is written as
a "pending" placeholder, so the stage never fails for lack of runs.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from mpvg.analysis import figures
from mpvg.analysis.extract import CellData
from mpvg.run.layout import CHECKPOINT

TASK = "in1k"


@dataclass(frozen=True)
class Want:
    """One panel: its title and the runs that can fill it, best first."""

    title: str
    candidates: tuple  # of (model, method, overrides dict)


def _w(title: str, *candidates) -> Want:
    return Want(title, tuple(candidates))


GAP_ONLY = ("DeiT-Ti", "Default", {"pool": "avg"})
PVG = ("DeiT-Ti", "PVG", {})
MPVG = ("DeiT-Ti", "MPVG", {})
PVG_CLS = ("DeiT-Ti", "PVG", {"pool": "token"})
GAP_LAST_PE = ("DeiT-Ti", "Default", {"pool": "avg", "last_ln_pe": 0})

FIG2 = [_w("(a) original (GAP)", GAP_ONLY, ("DeiT-Ti", "Default", {})),
        _w("(b) layer-wise, PVG", PVG), _w("(b) layer-wise, MPVG", MPVG)]
FIG4_MODELS = ("DeiT-Ti", "DeiT-S", "CeiT-Ti", "T2T-ViT-7")
FIG4_METHODS = ("PVG", "MPVG")
FIG6 = [_w("(a) PVG, class token", PVG_CLS), _w("(b) PVG, GAP", PVG), _w("(c) MPVG", MPVG)]
FIG7 = [_w("PVG", PVG), _w("MPVG", MPVG)]
FIG8 = [_w("(a) layer-wise, MPVG", MPVG), _w("(b) non-layer-wise, GAP + Last-LN PE", GAP_LAST_PE)]
# Appendix numbers: panel title of Figure 6 -> paper_numbers.csv row (model, method, overrides).
FIG6_PAPER = {"(a) PVG, class token": PVG_CLS, "(b) PVG, GAP": PVG, "(c) MPVG": MPVG}

# Heading and caption of each figure (analysis.json carries them; `mpvg report` shows them in the index).
CAPTIONS = {
    "figure2": ("Figure 2: token embedding and PE per layer",
                "DeiT-Ti on ImageNet-1K: per layer, the batch-mean token embedding LN_l(x_l) (patch tokens × "
                "dimensions) of (a) the original structure with GAP and (b) the layer-wise PVG and MPVG; under "
                "each layer-wise row the PE term LN'_l(pos) with r, its correlation with the token map. Last "
                "column: the Last LN. One colour scale for all panels."),
    "figure4": ("Figure 4: correlation of token embedding and PE per layer",
                "Pearson's r between LN_l(x_l) and LN'_l(pos) (both after LN) per layer, PVG and MPVG, for "
                "DeiT-Ti, DeiT-S, CeiT-Ti and T2T-ViT-7; a layer without a PE term has no point."),
    "figure6": ("Figure 6: the Last LN of PVG (class token), PVG (GAP) and MPVG",
                "Batch-mean heatmaps before and after the Last LN (tokens × dimensions, one colour scale; "
                "'after' includes MPVG's PE term), the Last LN's gamma and beta per dimension with their "
                "variances, and the cosine similarity of the pooled vector before/after, beside the paper's "
                "Appendix numbers."),
    "figure7": ("Figure 7: token norms before and after the Last LN",
                "L2 norm of each patch token on its grid for sample validation images, PVG and MPVG, before "
                "and after the Last LN ('after' includes the PE term); one colour scale for all maps."),
    "figure8": ("Figure 8: PE in the Last LN, layer-wise vs non-layer-wise",
                "(a) MPVG and (b) the Figure 5(b) structure (non-layer-wise, GAP + Last-LN PE): x_{L+1}, "
                "LN(x_{L+1}), the PE term added after it and the output (tokens × dimensions), with r against "
                "the PE; one colour scale."),
}


def find_cell(cells: dict, params: dict, model: str, method: str, overrides: dict, task: str = TASK) -> Optional[str]:
    """The cell id that trains ``model``/``method``/``overrides`` on ``task`` (effective PE), or None."""
    from mpvg.results.paper import effective_pe

    want = effective_pe(model, method, overrides, params)
    for cid in sorted(cells):
        c = cells[cid]
        if (c.task, c.model, c.method) == (task, model, method) and \
                effective_pe(c.model, c.method, c.pe_overrides, params) == want:
            return cid
    return None


class Loader:
    """Finds, loads and analyzes checkpoints once per cell; remembers why a cell is missing."""

    def __init__(self, params: dict, cells: dict, runs: Path, analyze_cell: Callable[[str, Path], CellData],
                 seed: Optional[int] = None):
        self.params, self.cells, self.runs = params, cells, Path(runs)
        self.analyze_cell = analyze_cell
        self.seeds = [seed] if seed is not None else list(params.get("seeds") or [0])
        self.data: dict[str, CellData] = {}
        self.notes: dict[str, str] = {}

    def checkpoint(self, cid: str) -> Optional[Path]:
        stage = self.cells[cid].stage
        for s in self.seeds:
            path = self.runs / stage / cid / f"seed{s}" / CHECKPOINT
            if path.is_file():
                return path
        return None

    def get(self, want: Want) -> tuple[Optional[str], Optional[CellData], str]:
        """``(cell id, data, note)`` for the first candidate with a checkpoint."""
        notes = []
        first = None
        for cand in want.candidates:
            cid = find_cell(self.cells, self.params, *cand)
            if cid is None:
                notes.append(f"no cell of params.yaml trains {cand[0]} {cand[1]} {cand[2] or ''}".rstrip())
                continue
            first = first or cid
            if cid not in self.data and cid not in self.notes:
                path = self.checkpoint(cid)
                if path is None:
                    self.notes[cid] = (f"pending: no checkpoint at {self.runs}/{self.cells[cid].stage}/{cid}/"
                                       f"seed{{{','.join(map(str, self.seeds))}}}/checkpoint.pt")
                else:
                    try:
                        d = self.analyze_cell(cid, path)
                        d.meta.update(checkpoint=str(path), seed=int(path.parent.name[len("seed"):]))
                        self.data[cid] = d
                    except (ValueError, RuntimeError, KeyError, OSError) as err:
                        self.notes[cid] = f"skipped: {type(err).__name__}: {err}"
            if cid in self.data:
                return cid, self.data[cid], ""
            notes.append(self.notes[cid])
        return first, None, "; ".join(notes)


def _panels(loader: Loader, wants: list[Want], record: dict) -> list[tuple]:
    out = []
    for w in wants:
        cid, d, note = loader.get(w)
        record["panels"].append({"title": w.title, "cell": cid, "status": "ok" if d else "missing", "note": note})
        out.append((w.title, d))
    return out


def _paper_fig6() -> dict:
    from mpvg.results.paper import load_paper_numbers

    rows = [r for r in load_paper_numbers() if r.table == "F6"]
    out = {}
    for title, (model, method, over) in FIG6_PAPER.items():
        vals = {}
        for r in rows:
            if (r.model, r.method, r.overrides) == (model, method, over):
                vals.update({k: v for k, v in r.values.items() if v is not None})
        out[title] = vals
    return out


def _finish(name: str, record: dict, stem: Path, draw: Callable[[], list[Path]]) -> None:
    ok = [p for p in record["panels"] if p["status"] == "ok"]
    if ok:
        paths = draw()
        record["status"] = "complete" if len(ok) == len(record["panels"]) else "partial"
    else:
        reasons = [f"{p['title']}: {p['note']}" for p in record["panels"]]
        paths = figures.placeholder(stem, f"{name}: inputs pending", reasons)
        record["status"] = "pending"
    record["files"] = [p.name for p in paths]


def run_analysis(params: dict, cells: dict, runs: Path | str, out: Path | str,
                 analyze_cell: Callable[[str, Path], CellData], seed: Optional[int] = None,
                 samples: int = 4) -> dict:
    """Draw every figure into ``out`` and write ``out/analysis.json``; return its content."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    loader = Loader(params, cells, Path(runs), analyze_cell, seed)
    figs: dict[str, dict] = {}

    def new(name: str) -> dict:
        heading, caption = CAPTIONS[name]
        figs[name] = {"heading": heading, "caption": caption, "panels": []}
        return figs[name]

    rec = new("figure2")
    p2 = _panels(loader, FIG2, rec)
    _finish("Figure 2", rec, out / "figure2", lambda: figures.figure2(p2, out / "figure2"))

    rec = new("figure4")
    series: dict[str, dict] = {}
    for model in FIG4_MODELS:
        series[model] = {}
        for method in FIG4_METHODS:
            (_, d), = _panels(loader, [_w(f"{model} {method}", (model, method, {}))], rec)
            series[model][method] = None if d is None else d.layer_corr
    _finish("Figure 4", rec, out / "figure4", lambda: figures.figure4(series, out / "figure4"))

    rec = new("figure6")
    paper6 = _paper_fig6()
    p6 = _panels(loader, FIG6, rec)
    _finish("Figure 6", rec, out / "figure6", lambda: figures.figure6(p6, out / "figure6", paper6))
    rec["paper"] = paper6
    rec["ours"] = {t: (None if d is None else {"beta_var": d.last_ln["beta_var"],
                                                "cos_last_ln": d.last_ln["cos_before_after"]}) for t, d in p6}

    rec = new("figure7")
    p7 = _panels(loader, FIG7, rec)
    _finish("Figure 7", rec, out / "figure7", lambda: figures.figure7(p7, out / "figure7", samples))

    rec = new("figure8")
    p8 = _panels(loader, FIG8, rec)
    _finish("Figure 8", rec, out / "figure8", lambda: figures.figure8(p8, out / "figure8"))

    result = {
        "scale": params.get("scale"),
        "figures": figs,
        "cells": {cid: loader.data[cid].numbers() for cid in sorted(loader.data)},
        "missing": dict(sorted(loader.notes.items())),
    }
    result = finite(result)
    (out / "analysis.json").write_text(json.dumps(result, indent=2, sort_keys=True, allow_nan=False) + "\n",
                                       encoding="utf-8")
    return result


def finite(x):
    """``x`` with NaN/inf floats replaced by None (strict JSON; a constant map has no r)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    return x


def _num(v) -> str:
    return "—" if v is None or v != v else f"{v:.4f}"


def summary_tables(result: dict) -> list:
    """The numbers of analysis.json as tables: figure status, Appendix values, correlations."""
    from mpvg.results.render import Table

    status = Table("analysis-status", "Figures", "Which panels were drawn and why others are missing.",
                   ["Figure", "Status", "Missing panels"], "lll")
    for name, rec in result["figures"].items():
        missing = "; ".join(f"{p['title']} ({p['note']})" for p in rec["panels"] if p["status"] != "ok")
        status.add_row([name, rec["status"], missing or "none"])

    f6 = result["figures"]["figure6"]
    appendix = Table("analysis-appendix", "Figure 6 / Appendix numbers",
                     "Variance of the Last LN's beta and cosine similarity of the pooled vector before and "
                     "after the Last LN (class token or token mean; after = output incl. the PE term).",
                     ["Panel", "beta var paper", "beta var ours", "cos paper", "cos ours"], "lrrrr")
    for title, paper in f6["paper"].items():
        ours = f6["ours"].get(title) or {}
        appendix.add_row([title, _num(paper.get("beta_var")), _num(ours.get("beta_var")),
                          _num(paper.get("cos_last_ln")), _num(ours.get("cos_last_ln"))])

    depth = max((c["layers"] for c in result["cells"].values()), default=0)
    corr = Table("analysis-correlations", "Per-layer correlation of LN_l(x_l) and LN'_l(pos)",
                 "Figures 2 and 4; '—': the layer receives no PE.",
                 ["Cell"] + [f"L{l}" for l in range(depth)], "l" + "r" * depth)
    for cid, c in result["cells"].items():
        vals = list(c["layer_correlations"]) + [None] * (depth - c["layers"])
        corr.add_row([cid] + [_num(v) for v in vals])
    return [status, appendix, corr]


def write_summary(result: dict, out: Path | str, params: dict) -> Path:
    """``out/analysis.md`` and, when mpvg.tracking offers it, the numbers to MLflow."""
    from mpvg import tracking
    from mpvg.results.render import render_markdown, scale_note

    out = Path(out)
    text = (f"# Analysis numbers\n\n> {scale_note(params.get('scale', '?'))}\n\n"
            "Generated by `mpvg analyze`; figures beside this file.\n\n")
    text += "\n".join(render_markdown(t) for t in summary_tables(result))
    path = out / "analysis.md"
    path.write_text(text, encoding="utf-8")
    log = getattr(tracking, "log_analysis", None)
    if log is not None:
        log(params, result, sorted(str(p) for p in out.iterdir() if p.is_file()))
    return path
