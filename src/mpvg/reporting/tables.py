"""Tables 1-6, the Figure 1 and Figure 5 comparisons, and the cost table, as :class:`Table`.

Each paper row shows the paper's number, ours (mean ± sample std over seeds) and the
difference; a configured cell without a finished run shows "pending", a paper row that no
cell of params.yaml runs shows "not configured". Nothing is ever filled in. #Params are not
a run's output: they are counted by building the cell's full-size architecture, so they are
exact at any scale. The scale notice belongs to the page (report.py), not to the captions.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Optional

from mpvg.results.paper import PaperRow, effective_pe, match_cells
from mpvg.results.render import Entry, Table
from mpvg.results.runs import Aggregate, aggregate, compute_totals, metric_value

PENDING = "pending"
STALE = "stale"
NOT_CONFIGURED = "not configured"
MISSING = "—"


@dataclass(frozen=True)
class Metric:
    key: str
    header: str
    decimals: int


@dataclass
class TableSpec:
    """How one paper table is laid out."""

    key: str                        # paper_numbers.csv's table column and Cell.tables tag
    name: str                       # file stem
    title: str
    what: str                       # first sentence of the caption
    metrics: list[Metric]
    best: tuple[str, ...]           # metrics where the highest value is marked bold
    group: Optional[Callable[[PaperRow], str]] = None   # group column text (None: no group column)
    group_header: str = "Model"
    label_headers: list[str] = field(default_factory=lambda: ["Method"])
    label: Callable = None          # (row, pe_config) -> list of label texts
    number: Optional[str] = None    # the paper's number ("1" for Table 1)
    kind: str = "Table"             # "Figure" for the numbers behind a figure


TOP1 = Metric("top1", "Top-1 (%)", 2)
PARAMS = Metric("params_m", "#Params (M)", 3)


def _method(row, cfg):
    return [row.label]


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _t5_label(row, cfg):
    return [row.label if row.values else f"pos_{cfg.last_ln_pe}"]


def _t6_label(row, cfg):
    return [_yes(cfg.include_layer0), _yes(cfg.hierarchical), _yes(cfg.add_at_input)]


def _adapter(row):
    return f"ViT-Adapter-Ti ({row.model})"


TABLE_SPECS = [
    TableSpec("T1", "table1", "ImageNet-1K", "Top-1 accuracy of each model and PE method on ImageNet-1K.",
              [PARAMS, TOP1], ("top1",), group=lambda r: r.model, label=_method, number="1"),
    TableSpec("T2", "table2", "CIFAR-100",
              "Top-1 accuracy on CIFAR-100 (T2T-ViT-7: fine-tuned from its ImageNet-1K model).",
              [PARAMS, TOP1], ("top1",), group=lambda r: r.model, label=_method, number="2"),
    TableSpec("T3", "table3", "COCO 2017 detection",
              "Mask R-CNN with a ViT-Adapter-Ti backbone pre-trained as DeiT-Ti with each method.",
              [Metric("bbox_ap", "AP box", 1), Metric("segm_ap", "AP mask", 1)], ("bbox_ap", "segm_ap"),
              group=_adapter, group_header="Model (pre-trained)", label=_method, number="3"),
    TableSpec("T4", "table4", "ADE20K segmentation",
              "UperNet with a ViT-Adapter-Ti backbone pre-trained as DeiT-Ti with each method.",
              [Metric("miou", "mIoU", 2)], ("miou",), group=_adapter, group_header="Model (pre-trained)",
              label=_method, number="4"),
    TableSpec("T5", "table5", "PE added after the Last LN",
              "DeiT-Ti MPVG on ImageNet-1K with LN'(pos_k) added after the Last LN, k = 11, 8, 5, 0.",
              [TOP1], ("top1",), label_headers=["Last LN PE"], label=_t5_label, number="5"),
    TableSpec("T6", "table6", "Structural ablation of MPVG",
              "DeiT-Ti MPVG on ImageNet-1K: PE to layer 0, hierarchical PE chain, PE added to x before layer 0.",
              [TOP1], ("top1",), label_headers=["Layer 0", "Hierarchical", "(x+PE)"], label=_t6_label, number="6"),
    TableSpec("F1", "figure1", "Class token vs GAP, non-layer-wise vs layer-wise",
              "DeiT-Ti on ImageNet-1K (the bars of Figure 1, as a table).",
              [TOP1], ("top1",), label_headers=["Structure"], label=_method, number="1", kind="Figure"),
    TableSpec("F5", "figure5", "Last-LN PE without the layer-wise structure",
              "DeiT-Ti on ImageNet-1K, GAP, non-layer-wise (the accuracies of Figure 5, as a table).",
              [TOP1], ("top1",), label_headers=["Structure"], label=_method, number="5", kind="Figure"),
]


def _fmt(v: float, d: int) -> str:
    s = f"{v:.{d}f}"
    return s[1:] if s.startswith("-") and float(s) == 0 else s


def _fmt_diff(v: float, d: int) -> str:
    s = _fmt(v, d)
    return s if s.startswith("-") else "+" + s


def _ours(agg: Optional[Aggregate], d: int) -> str:
    if agg is None:
        return MISSING
    if agg.std is None:
        return _fmt(agg.mean, d)
    return f"{_fmt(agg.mean, d)} ± {_fmt(agg.std, d)}"


def best_indices(values: list[Optional[float]], d: int) -> set[int]:
    """Which values are bold: the index of the unique highest value after rounding to ``d``
    decimals (what is shown), when at least two values are given; otherwise none.

    So a lone finished cell, or a tie (four cells at 0.0), is never marked as a best.
    """
    shown = [(i, round(v, d)) for i, v in enumerate(values) if v is not None and math.isfinite(v)]
    if len(shown) < 2:
        return set()
    top = max(v for _, v in shown)
    winners = {i for i, v in shown if v == top}
    return winners if len(winners) == 1 else set()


#: Tables with a #Params column -> their number in :data:`mpvg.models.params.TABLE_SETTINGS`.
PARAMS_TABLES = {"T1": 1, "T2": 2}


@lru_cache(maxsize=None)
def _built_count(table: int, model: str, method: str, overrides_json: str) -> Optional[int]:
    from mpvg.models.params import TABLE_SETTINGS, build_model, count_params

    settings = TABLE_SETTINGS.get((table, model))
    if settings is None:
        return None
    return count_params(build_model(model, method, pe_overrides=json.loads(overrides_json), **settings))


def full_size_params(table_key: str, cell) -> Optional[int]:
    """#Params of ``cell``'s full-size architecture in the paper's table ``table_key`` (T1/T2).

    Built on the ``meta`` device (shapes only) from the registered architecture, the cell's
    method and PE overrides, and the table's classes and image size
    (:data:`mpvg.models.params.TABLE_SETTINGS`); the scale's shrinking ``arch`` is not applied.
    ``None`` when that table has no setting for the model.
    """
    try:
        return _built_count(PARAMS_TABLES[table_key], cell.model, cell.method,
                            json.dumps(dict(cell.pe_overrides or {}), sort_keys=True))
    except Exception as err:  # name the cell: the report must not die with a bare timm traceback
        raise ValueError(f"#Params of cell {cell.id}: building the full-size {cell.model} {cell.method} "
                         f"with PE overrides {dict(cell.pe_overrides or {})} failed: {err}") from err


def _params_notes(spec: TableSpec, rows: list[PaperRow], matches: dict, cells: dict, counts: dict,
                  results: dict, scale: str) -> list[str]:
    """Why a #Params difference is not ours to fix, and (at paper scale) runs whose count differs."""
    from mpvg.models.params import DOCUMENTED_EXCEPTIONS, floor_m

    notes = []
    table = PARAMS_TABLES[spec.key]
    for r in rows:
        cid = matches.get(r.key)
        count, paper = counts.get(cid), r.values.get("params_m")
        if cid is None or count is None:
            if cid is not None:
                notes.append(f"{cid}: #Params not counted: mpvg.models.params.TABLE_SETTINGS has no "
                             f"full-size setting for {r.model} in Table {table}")
            continue
        if paper is not None and round(floor_m(count), 3) != round(paper, 3) and \
                (table, r.model, r.method) in DOCUMENTED_EXCEPTIONS:
            notes.append(f"{r.model} {r.label} #Params: {count:,} parameters; the paper's {paper:.3f} is "
                         "inconsistent with its own other rows (docs/models.md, documented exceptions)")
        if scale == "paper":
            for res in results.get(cid, []):
                if res.get("params") is not None and int(res["params"]) != count:
                    notes.append(f"{cid} seed {res['seed']}: result.json reports {int(res['params']):,} "
                                 f"parameters, the full-size build has {count:,}")
    return notes


def build_table(spec: TableSpec, paper_rows: list[PaperRow], cells: dict, params: dict,
                results: dict[str, list[dict]], matches: Optional[dict] = None,
                stale: Optional[dict[str, list[int]]] = None) -> Table:
    """One paper table with the paper's numbers and ours beside them. ``stale``: cells whose
    results were made with other settings than params.yaml gives now (shown as 'stale')."""
    stale = stale or {}
    rows = [r for r in paper_rows if r.table == spec.key]
    matches = matches if matches is not None else match_cells(rows, cells, params)
    used = {matches.get(r.key) for r in rows}
    for cid in sorted(cells):  # cells tagged with this table that no paper row names
        c = cells[cid]
        if spec.key in (c.tables or ()) and cid not in used:
            extra = PaperRow(spec.key, c.task, c.model, c.method, dict(c.pe_overrides or {}), f"{c.method} ({cid})")
            rows.append(extra)
            matches = {**matches, extra.key: cid}
    if spec.group is not None:  # keep file order, gather rows of a group together
        order: dict[str, int] = {}
        for r in rows:
            order.setdefault(spec.group(r), len(order))
        rows = sorted(rows, key=lambda r: order[spec.group(r)])

    n_seeds = len(params.get("seeds") or [0])
    scale = params.get("scale", "?")
    columns = ([spec.group_header] if spec.group else []) + list(spec.label_headers)
    align = "l" * len(columns)
    for m in spec.metrics:
        columns += [f"{m.header} paper", f"{m.header} ours", "Δ"]
        align += "rrr"
    columns.append("Seeds")
    align += "r"

    # Per row: status and aggregates of the run metrics; #Params from the full-size build.
    run_metrics = [m for m in spec.metrics if m.key != PARAMS.key]
    counts: dict[str, Optional[int]] = {}
    status, aggs = [], []
    for r in rows:
        cid = matches.get(r.key)
        rs = results.get(cid, []) if cid else []
        status.append(NOT_CONFIGURED if cid is None else
                      ("" if rs else (STALE if stale.get(cid) else PENDING)))
        aggs.append({m.key: aggregate([metric_value(x, m.key) for x in rs]) for m in run_metrics})
        if cid is not None and PARAMS in spec.metrics and cid not in counts:
            counts[cid] = full_size_params(spec.key, cells[cid])

    groups = [spec.group(r) if spec.group else "" for r in rows]
    bold_paper: dict[tuple, bool] = {}
    bold_ours: dict[tuple, bool] = {}
    for g in dict.fromkeys(groups):
        idx = [i for i, x in enumerate(groups) if x == g]
        for m in spec.metrics:
            if m.key not in spec.best:
                continue
            for j in best_indices([rows[i].values.get(m.key) for i in idx], m.decimals):
                bold_paper[(idx[j], m.key)] = True
            for j in best_indices([aggs[i][m.key].mean if aggs[i][m.key] else None for i in idx], m.decimals):
                bold_ours[(idx[j], m.key)] = True

    table = Table(spec.name, spec.title, "", columns, align, kind=spec.kind, number=spec.number)
    prev_group = None
    for i, r in enumerate(rows):
        cfg = effective_pe(r.model, r.method, r.overrides, params)
        entries: list = []
        if spec.group:
            entries.append(groups[i] if groups[i] != prev_group else "")
        entries += spec.label(r, cfg)
        for m in spec.metrics:
            pv = r.values.get(m.key)
            entries.append(Entry(MISSING if pv is None else _fmt(pv, m.decimals), bold_paper.get((i, m.key), False)))
            if m.key == PARAMS.key:
                from mpvg.models.params import floor_m

                count = counts.get(matches.get(r.key))
                ours = None if count is None else floor_m(count)
                entries.append(NOT_CONFIGURED if status[i] == NOT_CONFIGURED else
                               (MISSING if ours is None else _fmt(ours, m.decimals)))
                entries.append(_fmt_diff(ours - pv, m.decimals) if ours is not None and pv is not None else "")
                continue
            agg = aggs[i][m.key]
            entries.append(Entry(status[i] or _ours(agg, m.decimals), bold_ours.get((i, m.key), False)))
            entries.append(_fmt_diff(agg.mean - pv, m.decimals) if agg is not None and pv is not None else "")
        n = max((a.n for a in aggs[i].values() if a is not None), default=0)
        entries.append(f"{n}/{n_seeds}")
        table.add_row(entries, new_group=bool(spec.group) and groups[i] != prev_group)
        prev_group = groups[i]

    params_text = ""
    if PARAMS in spec.metrics:
        params_text = ("#Params ours: counted by building the cell's full-size architecture (the paper's "
                       "classes and image size, whatever the scale), in millions floored to 3 decimals as "
                       "the paper prints them. ")
    table.caption = (f"{spec.what} Paper: the paper's value; ours: mean ± sample standard deviation over "
                     f"seeds (value alone for one seed); Δ = ours − paper. {params_text}Bold: the single "
                     f"highest value {'per model ' if spec.group else ''}in a column, paper and ours "
                     "separately, when at least two values are given (ties and lone values are not bold). "
                     f"'{PENDING}': the cell is configured but has no finished run; "
                     f"'{STALE}': its runs were made with other settings than params.yaml gives now "
                     "(rerun them: `snakemake` does); "
                     f"'{MISSING}': no value.")
    notes = {f"{r.label}: paper value from {src}" for r in rows for src in r.sources.values()
             if "inferred" in src or "image" in src}
    if PARAMS in spec.metrics:
        notes.update(_params_notes(spec, rows, matches, cells, counts, results, scale))
    for r in rows:
        cid = matches.get(r.key)
        if cid and stale.get(cid) and results.get(cid):
            notes.add(f"{r.label}: seed(s) {', '.join(map(str, sorted(stale[cid])))} stale (made with other "
                      "settings), left out of the mean")
    table.notes = sorted(notes)
    return table


def build_cost_table(cells: dict, results: dict[str, list[dict]], params: dict) -> Table:
    """Measured compute per cell (summed over seeds) from result.json, and the total."""
    columns = ["Cell", "Stage", "Device", "Runs", "Wall time (h)", "GPU-hours", "CPU-hours"]
    t = Table("cost", "Compute cost per cell", "", columns, "llllrrr")
    n_seeds = len(params.get("seeds") or [0])

    def hours(tot: dict) -> list:
        wall = None if tot["wall_time_s"] is None else tot["wall_time_s"] / 3600.0
        return [MISSING if v is None else f"{v:.4f}" for v in (wall, tot["gpu_hours"], tot["cpu_hours"])]

    ids = sorted(set(cells) | set(results))
    for cid in ids:
        rs = results.get(cid, [])
        stage = cells[cid].stage if cid in cells else (rs[0]["stage"] if rs else "")
        name = cid if cid in cells else f"{cid} (not in params)"
        if not rs:
            t.add_row([name, stage, "", f"0/{n_seeds}", PENDING, "", ""])
            continue
        devices = ", ".join(sorted({str(r.get("device", "?")) for r in rs}))
        t.add_row([name, stage, devices, f"{len(rs)}/{n_seeds}", *hours(compute_totals({cid: rs}))])
    done = sum(1 for cid in ids if results.get(cid))
    total = {k: (0.0 if v is None else v) for k, v in compute_totals(results).items()}
    t.add_row([Entry("Total", True), "", "", f"{done}/{len(ids)} cells", *(Entry(h, True) for h in hours(total))],
              new_group=True)
    t.caption = ("Wall time, GPU-hours and CPU-hours as measured by each run (result.json: wall_time_s, "
                 "gpu_hours, cpu_hours), summed over the finished seeds of a cell; 'Runs': finished seeds / "
                 f"configured seeds; '{MISSING}': no run of the cell reports it.")
    return t


def build_all(paper_rows: list[PaperRow], cells: dict, params: dict, results: dict[str, list[dict]],
              stale: Optional[dict[str, list[int]]] = None) -> list[Table]:
    """Every paper table (in paper order) and the cost table last."""
    matches = match_cells(paper_rows, cells, params)
    tables = [build_table(s, paper_rows, cells, params, results, matches, stale) for s in TABLE_SPECS]
    return tables + [build_cost_table(cells, results, params)]
