"""Write the report folder: one .md and .tex per table, tables.md/.tex (all), the README index.

Everything written here depends only on the results, params, git commit and the figures'
analysis.json, so rebuilding from the same inputs gives the same bytes; the build's own
wall-clock time goes to build.json alone. Each page carries the scale notice once.
"""
from __future__ import annotations

import hashlib
import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Mapping, Optional

from mpvg.reporting.calibration import build_calibration_table
from mpvg.reporting.claims import INDEX_ENTRY, write_claims
from mpvg.reporting.planned import build_planned_cost_table
from mpvg.reporting.tables import build_all
from mpvg.results.paper import load_paper_numbers
from mpvg.results.render import (Table, latex_comment, latex_document, render_latex, render_markdown_page,
                                 scale_note)
from mpvg.results.runs import (collect_results, commits_of, compute_totals, newest_result_time, split_by_scale,
                               split_current)
from mpvg.runinfo import git_commit

FIGURE_SUFFIXES = (".png", ".pdf", ".json", ".md")
THUMBNAIL_WIDTH = 360  # px, in the index
FRAGMENT_NOTE = "A fragment for \\input: needs \\usepackage{booktabs,longtable}; tables.tex is the whole document."


class ReportFiles(list):
    """The files ``build_reports`` wrote; ``metrics``: the counts of the claims' verdicts for the
    report's MLflow run, ``children``: each claim's values for its nested run
    (:func:`mpvg.reporting.claims.claims_metrics`)."""

    metrics: dict = {}
    children: dict = {}


def params_hash(params: dict) -> str:
    """First 12 hex digits of sha256 over the resolved params as canonical JSON."""
    blob = json.dumps(params, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def _utc(ts: Optional[float]) -> str:
    if ts is None:
        return "no finished run yet"
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _hours(v: Optional[float], scale: float = 1.0) -> str:
    return "not reported" if v is None else f"{v / scale:.4f}"


def measured_gpu_hours(results: dict) -> dict:
    """cell -> mean GPU-hours of one seed as its results report them (cells reporting none are left out)."""
    out = {}
    for cid, rs in results.items():
        vals = [float(r["gpu_hours"]) for r in rs if r.get("gpu_hours") is not None]
        if vals:
            out[cid] = sum(vals) / len(vals)
    return out


def figure_entries(fig_dir: Path) -> tuple[list[dict], list[str]]:
    """The figures of ``fig_dir`` for the index, and the other files there (links only).

    Each figure: ``{"name", "heading", "caption", "status", "png", "pdf"}`` taken from
    ``analysis.json`` (written by ``mpvg analyze``); a PNG that analysis.json does not name is
    listed with an unknown caption rather than dropped.
    """
    if not fig_dir.is_dir():
        return [], []
    files = sorted(p.name for p in fig_dir.iterdir() if p.suffix in FIGURE_SUFFIXES)
    described: dict = {}
    summary = fig_dir / "analysis.json"
    if summary.is_file():
        try:
            described = json.loads(summary.read_text(encoding="utf-8")).get("figures") or {}
        except json.JSONDecodeError as err:
            raise ValueError(f"{summary}: not valid JSON ({err}); rerun `mpvg analyze`") from err
    entries, shown = [], set()
    for name, rec in described.items():
        png, pdf = f"{name}.png", f"{name}.pdf"
        if png not in files:
            continue
        entries.append({"name": name, "heading": rec.get("heading") or name, "status": rec.get("status", "?"),
                        "caption": rec.get("caption") or "(no caption in analysis.json: rerun `mpvg analyze`)",
                        "png": png, "pdf": pdf if pdf in files else None})
        shown.update({png, pdf})
    for png in (f for f in files if f.endswith(".png") and f not in shown):
        stem = png[:-len(".png")]
        pdf = f"{stem}.pdf" if f"{stem}.pdf" in files else None
        entries.append({"name": stem, "heading": stem, "status": "?", "png": png, "pdf": pdf,
                        "caption": "(not described by figures/analysis.json: rerun `mpvg analyze`)"})
        shown.update({png, pdf})
    return entries, [f for f in files if f not in shown]


def render_figures(entries: list[dict], others: list[str]) -> list[str]:
    """The index's figure section: per figure a heading, its caption and a linked thumbnail."""
    if not entries and not others:
        return ["No figures yet: run `mpvg analyze --params params.yaml --runs runs --out reports/figures`."]
    lines: list[str] = []
    for e in entries:
        links = f"[PNG](figures/{e['png']})" + (f", [PDF](figures/{e['pdf']})" if e["pdf"] else "")
        lines += [f"### {e['heading']}", "", f"{e['caption']} (panels: {e['status']}; {links})", "",
                  f'<a href="figures/{e["png"]}"><img src="figures/{e["png"]}" width="{THUMBNAIL_WIDTH}" '
                  f'alt="{e["heading"]}"></a>', ""]
    if others:
        lines.append("Numbers behind the figures: " + ", ".join(f"[{f}](figures/{f})" for f in others))
    return lines


def render_index(tables: list[Table], meta: dict, figures: tuple[list[dict], list[str]]) -> str:
    """reports/README.md: what was built, from what, and links to every table and figure."""
    cost = meta["results_total"]
    lines = [
        "# MPVG reproduction: reports",
        "",
        f"> {meta['notice']}",
        "",
        "Generated by `mpvg report` (tables) and `mpvg analyze` (figures); do not edit by hand.",
        "",
        f"- Results as of: {meta['as_of']} (newest result.json)",
        f"- Git commit of this build: `{meta['git_commit']}`; the numbers come from "
        + (", ".join(f"`{c}` ({n} runs)" for c, n in meta["result_commits"].items()) or "no run yet"),
        f"- Params: `{meta['params_path']}`, resolved params hash `{meta['params_hash']}`, scale `{meta['scale']}`",
        f"- Finished cells: {meta['finished']} of {meta['configured']} configured"
        + (f"; stale (made with other settings, not shown as numbers): {len(meta['stale'])} cells"
           if meta["stale"] else ""),
        f"- Compute of the {cost['runs']} reported runs: wall time {_hours(cost['wall_time_s'], 3600.0)} h, "
        f"GPU-hours {_hours(cost['gpu_hours'])}, CPU-hours {_hours(cost['cpu_hours'])} "
        "(per cell: [cost.md](cost.md))",
        "- Clock time of this build: `build_wall_time_s` in [build.json](build.json)",
        "",
        "## Tables",
        "",
        "| Table | Markdown | LaTeX |",
        "|:--|:--|:--|",
    ]
    lines += [f"| {t.heading} | [{t.name}.md]({t.name}.md) | [{t.name}.tex]({t.name}.tex) |" for t in tables]
    lines += ["", "All tables on one page: [tables.md](tables.md); in one LaTeX document: [tables.tex](tables.tex) "
              "(`pdflatex tables.tex`).", "",
              "## Figures", ""]
    lines += render_figures(*figures)
    if meta["stale"]:
        lines += ["", "## Stale", "",
                  "Results whose run signature differs from what params.yaml gives now (rerun them with "
                  "`snakemake`; `mpvg status` says why):", ""]
        lines += [f"- `{cid}` seed(s) {', '.join(map(str, seeds))}" for cid, seeds in sorted(meta["stale"].items())]
    if meta["skipped"]:
        lines += ["", "## Left out", "",
                  f"Results of another scale than `{meta['scale']}`, or of seeds params.yaml does not run "
                  "(not shown in the tables):", ""]
        lines += [f"- `{p}`" for p in meta["skipped"]]
    return "\n".join(lines) + "\n"


METRICS_DIR = "metrics"


def write_table_metrics(out: Path, cells: dict, results: dict[str, list[dict]]) -> list[Path]:
    """``<out>/metrics/<table>.json`` per paper table and figure: ``{cell: {metric: mean over the
    current seeds}}``, DVC's metrics of the report stage, so `dvc exp show` and `dvc metrics diff`
    show each table's cells by name. A table without results yet is ``{}``."""
    from mpvg.reporting.tables import TABLE_SPECS

    written = []
    for spec in TABLE_SPECS:
        table: dict[str, dict[str, float]] = {}
        for cell_id, cell in cells.items():
            runs = results.get(cell_id) or []
            if spec.key not in cell.tables or not runs:
                continue
            values = {m.key: [float(r["metrics"][m.key]) for r in runs if m.key in r.get("metrics", {})]
                      for m in spec.metrics}
            table[cell_id] = {k: round(sum(v) / len(v), 4) for k, v in values.items() if v}
        written.append(_write(out / METRICS_DIR / f"{spec.name}.json", json.dumps(table, indent=2, sort_keys=True) + "\n"))
    return written


def build_reports(params: dict, cells: dict, runs_dir: Path | str, out_dir: Path | str, *,
                  current: Optional[Mapping[tuple[str, int], Optional[str]]], seen: Optional[dict] = None,
                  planned: Optional[list[dict]] = None, commit: Optional[str] = None,
                  params_path: str = "params.yaml", paper_csv: Optional[Path] = None,
                  only: Optional[list[str]] = None, gpu_hours: Optional[dict] = None) -> list[Path]:
    """Read results, write every table and the index under ``out_dir``; return the written paths.

    What comes from the workflow is handed in by the command line
    (:func:`mpvg.reporting.commands.report_inputs`; reporting does not import the workflow):
    ``current``: every run of the params, ``(cell, seed)``, with the signature of its result when
    it is current, else None (:func:`mpvg.results.runs.split_current`); only those results are
    shown, a result made with other settings is 'stale'. ``None`` shows every result unchecked,
    only for tests of the layout on hand-made results. ``seen``: the signatures of the runs read
    (:func:`mpvg.workflow.state.seen_record`), written into build.json for the workflow's rerun
    rule. ``planned``: the cost model's rows per task and model for the planned-cost table (None
    at the tiny scale). ``only``: table keys (``["T2"]``) whose files alone are rewritten.
    ``gpu_hours``: cell -> planned GPU-hours of one seed, which prices each claim's next round
    (without it, the mean GPU-hours the cell's results report)."""
    started = time.perf_counter()
    out = Path(out_dir)
    paper_rows = load_paper_numbers(paper_csv) if paper_csv else load_paper_numbers()
    scale = params.get("scale", "?")
    notice = scale_note(scale)
    results, skipped = split_by_scale(collect_results(runs_dir), scale)
    stale: dict[str, list[int]] = {}
    if current is not None:
        results, stale, other_seeds = split_current(results, current)
        skipped = sorted(skipped + other_seeds)
    tables = build_all(paper_rows, cells, params, results, stale)
    calibration = build_calibration_table(cells, runs_dir, params)  # once `mpvg eval --weights` has run
    if calibration is not None:
        tables.append(calibration)
    plan_table = build_planned_cost_table(params, planned)  # planned GPU-hours for the seeds (paper/budget scale)
    tables += [plan_table] if plan_table else []
    if only:
        from mpvg.reporting.tables import TABLE_SPECS

        names = {spec.name for spec in TABLE_SPECS if spec.key in only}
        chosen = [t for t in tables if t.name in names]
        return ReportFiles(_write(out / f"{t.name}{ext}", text) for t in chosen
                           for ext, text in ((".md", render_markdown_page([t], notice)),
                                             (".tex", latex_comment(f"{notice}\n{FRAGMENT_NOTE}") + render_latex(t))))

    written = ReportFiles()
    for t in tables:
        written.append(_write(out / f"{t.name}.md", render_markdown_page([t], notice)))
        written.append(_write(out / f"{t.name}.tex", latex_comment(f"{notice}\n{FRAGMENT_NOTE}") + render_latex(t)))
    written.append(_write(out / "tables.tex", latex_document(tables, notice)))
    written.append(_write(out / "tables.md", render_markdown_page(tables, notice, heading="All tables")))
    written += write_table_metrics(out, cells, results)
    if gpu_hours is None:
        gpu_hours = measured_gpu_hours(results)
    claim_files, (written.metrics, written.children) = write_claims(params, cells, results, out, stale=stale,
                                                                    gpu_hours=gpu_hours)  # claims.md, .tex, .json
    written += claim_files

    meta = {
        "as_of": _utc(newest_result_time(results)),
        "git_commit": commit if commit is not None else git_commit(),
        "params_path": params_path,
        "params_hash": params_hash(params),
        "scale": scale,
        "notice": notice,
        "finished": sum(1 for c in cells if results.get(c)),
        "configured": len(cells),
        "skipped": skipped,
        "stale": stale,
        "result_commits": commits_of(results),
        "results_total": compute_totals(results),
    }
    written.append(_write(out / "README.md", render_index(tables + [INDEX_ENTRY], meta,
                                                          figure_entries(out / "figures"))))
    build = {**meta, "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
             "build_wall_time_s": round(time.perf_counter() - started, 3)}
    build.update(seen or {})  # the runs this report shows, by signature (the workflow's rerun rule reads it)
    written.append(_write(out / "build.json", json.dumps(build, indent=2, sort_keys=True) + "\n"))
    return written
