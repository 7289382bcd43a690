"""Tables 1-6, the Figure 1 and Figure 5 comparisons, and the cost table, as :class:`Table`.

Each paper row shows the paper's number, ours (mean ± sample std over seeds) and the
difference; a configured cell without a finished run shows "pending", a paper row that no
cell of params.yaml runs shows "not configured". Nothing is ever filled in.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from mpvg.reporting.paper import PaperRow, effective_pe, match_cells
from mpvg.reporting.render import Entry, Table
from mpvg.reporting.results import Aggregate, aggregate, metric_value

PENDING = "pending"
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
    TableSpec("T1", "table1", "Table 1: ImageNet-1K", "Top-1 accuracy of each model and PE method on ImageNet-1K.",
              [PARAMS, TOP1], ("top1",), group=lambda r: r.model, label=_method),
    TableSpec("T2", "table2", "Table 2: CIFAR-100",
              "Top-1 accuracy on CIFAR-100 (T2T-ViT-7: fine-tuned from its ImageNet-1K model).",
              [PARAMS, TOP1], ("top1",), group=lambda r: r.model, label=_method),
    TableSpec("T3", "table3", "Table 3: COCO 2017 detection",
              "Mask R-CNN with a ViT-Adapter-Ti backbone pre-trained as DeiT-Ti with each method.",
              [Metric("bbox_ap", "AP box", 1), Metric("segm_ap", "AP mask", 1)], ("bbox_ap", "segm_ap"),
              group=_adapter, group_header="Model (pre-trained)", label=_method),
    TableSpec("T4", "table4", "Table 4: ADE20K segmentation",
              "UperNet with a ViT-Adapter-Ti backbone pre-trained as DeiT-Ti with each method.",
              [Metric("miou", "mIoU", 2)], ("miou",), group=_adapter, group_header="Model (pre-trained)",
              label=_method),
    TableSpec("T5", "table5", "Table 5: PE added after the Last LN",
              "DeiT-Ti MPVG on ImageNet-1K with LN'(pos_k) added after the Last LN, k = 11, 8, 5, 0.",
              [TOP1], ("top1",), label_headers=["Last LN PE"], label=_t5_label),
    TableSpec("T6", "table6", "Table 6: structural ablation of MPVG",
              "DeiT-Ti MPVG on ImageNet-1K: PE to layer 0, hierarchical PE chain, PE added to x before layer 0.",
              [TOP1], ("top1",), label_headers=["Layer 0", "Hierarchical", "(x+PE)"], label=_t6_label),
    TableSpec("F1", "figure1", "Figure 1: class token vs GAP, non-layer-wise vs layer-wise",
              "DeiT-Ti on ImageNet-1K (the bars of Figure 1).",
              [TOP1], ("top1",), label_headers=["Structure"], label=_method),
    TableSpec("F5", "figure5", "Figure 5: Last-LN PE without the layer-wise structure",
              "DeiT-Ti on ImageNet-1K, GAP, non-layer-wise.",
              [TOP1], ("top1",), label_headers=["Structure"], label=_method),
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


def scale_note(scale: str) -> str:
    """The caption sentence that says which scale the reproduced numbers come from."""
    if scale == "paper":
        return "Scale: paper (the paper's datasets, models and schedules)."
    return (f"Scale: {scale}. These are {scale}-scale numbers (shrunk models, generated data, a few "
            "epochs): they show that the pipeline runs end to end and are not comparable with the "
            "paper's values; the difference column is given for form only.")


def _best(values: list[Optional[float]], d: int) -> set[int]:
    """Indices of the highest value (after rounding to what is shown, so ties are all bold)."""
    shown = [None if v is None else round(v, d) for v in values]
    top = max((v for v in shown if v is not None), default=None)
    return {i for i, v in enumerate(shown) if v is not None and v == top}


def build_table(spec: TableSpec, paper_rows: list[PaperRow], cells: dict, params: dict,
                results: dict[str, list[dict]], matches: Optional[dict] = None) -> Table:
    """One paper table with the paper's numbers and ours beside them."""
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

    # Per row: status and aggregates per metric.
    status, aggs = [], []
    for r in rows:
        cid = matches.get(r.key)
        rs = results.get(cid, []) if cid else []
        status.append(NOT_CONFIGURED if cid is None else (PENDING if not rs else ""))
        aggs.append({m.key: aggregate([metric_value(x, m.key) for x in rs]) for m in spec.metrics})

    groups = [spec.group(r) if spec.group else "" for r in rows]
    bold_paper: dict[tuple, bool] = {}
    bold_ours: dict[tuple, bool] = {}
    for g in dict.fromkeys(groups):
        idx = [i for i, x in enumerate(groups) if x == g]
        for m in spec.metrics:
            if m.key not in spec.best:
                continue
            for j in _best([rows[i].values.get(m.key) for i in idx], m.decimals):
                bold_paper[(idx[j], m.key)] = True
            for j in _best([aggs[i][m.key].mean if aggs[i][m.key] else None for i in idx], m.decimals):
                bold_ours[(idx[j], m.key)] = True

    table = Table(spec.name, spec.title, "", columns, align)
    prev_group = None
    for i, r in enumerate(rows):
        cfg = effective_pe(r.model, r.method, r.overrides, params)
        entries: list = []
        if spec.group:
            entries.append(groups[i] if groups[i] != prev_group else "")
        entries += spec.label(r, cfg)
        for m in spec.metrics:
            pv = r.values.get(m.key)
            agg = aggs[i][m.key]
            entries.append(Entry(MISSING if pv is None else _fmt(pv, m.decimals), bold_paper.get((i, m.key), False)))
            entries.append(Entry(status[i] or _ours(agg, m.decimals), bold_ours.get((i, m.key), False)))
            entries.append(_fmt_diff(agg.mean - pv, m.decimals) if agg is not None and pv is not None else "")
        n = max((a.n for a in aggs[i].values() if a is not None), default=0)
        entries.append(f"{n}/{n_seeds}")
        table.add_row(entries, new_group=bool(spec.group) and groups[i] != prev_group)
        prev_group = groups[i]

    table.caption = (f"{spec.what} Paper: the paper's value; ours: mean ± sample standard deviation over "
                     f"seeds (value alone for one seed); Δ = ours − paper. Bold: the highest value "
                     f"{'per model ' if spec.group else ''}in each column (paper and ours separately). "
                     f"'{PENDING}': the cell is configured but has no finished run; "
                     f"'{MISSING}': no value. {scale_note(scale)}")
    table.notes = sorted({f"{r.label}: paper value from {src}" for r in rows for src in r.sources.values()
                          if "inferred" in src or "image" in src})
    return table


def _hours(results: list[dict], key: str) -> Optional[float]:
    vals = [float(r[key]) for r in results if r.get(key) is not None]
    return sum(vals) if vals else None


def build_cost_table(cells: dict, results: dict[str, list[dict]], params: dict) -> Table:
    """Measured compute per cell (summed over seeds) from result.json, and the total."""
    columns = ["Cell", "Stage", "Device", "Runs", "Wall time (h)", "GPU-hours", "CPU-hours"]
    t = Table("cost", "Compute cost per cell", "", columns, "llllrrr")
    n_seeds = len(params.get("seeds") or [0])
    totals = {"wall": 0.0, "gpu_hours": 0.0, "cpu_hours": 0.0}
    ids = sorted(set(cells) | set(results))
    for cid in ids:
        rs = results.get(cid, [])
        stage = cells[cid].stage if cid in cells else (rs[0]["stage"] if rs else "")
        name = cid if cid in cells else f"{cid} (not in params)"
        if not rs:
            t.add_row([name, stage, "", f"0/{n_seeds}", PENDING, "", ""])
            continue
        wall_s = _hours(rs, "wall_time_s")
        wall = None if wall_s is None else wall_s / 3600.0
        gpu, cpu = _hours(rs, "gpu_hours"), _hours(rs, "cpu_hours")
        for k, v in (("wall", wall), ("gpu_hours", gpu), ("cpu_hours", cpu)):
            totals[k] += v or 0.0
        devices = ", ".join(sorted({str(r.get("device", "?")) for r in rs}))
        t.add_row([name, stage, devices, f"{len(rs)}/{n_seeds}",
                   *(MISSING if v is None else f"{v:.4f}" for v in (wall, gpu, cpu))])
    done = sum(1 for cid in ids if results.get(cid))
    t.add_row([Entry("Total", True), "", "", f"{done}/{len(ids)} cells",
               *(Entry(f"{totals[k]:.4f}", True) for k in ("wall", "gpu_hours", "cpu_hours"))], new_group=True)
    t.caption = ("GPU-hours and CPU-hours as measured by each run (result.json: gpu_hours, cpu_hours, "
                 "wall_time_s), summed over the seeds of a cell; 'Runs' is finished seeds / configured seeds. "
                 + scale_note(params.get("scale", "?")))
    return t


def build_all(paper_rows: list[PaperRow], cells: dict, params: dict, results: dict[str, list[dict]]) -> list[Table]:
    """Every paper table (in paper order) and the cost table last."""
    matches = match_cells(paper_rows, cells, params)
    tables = [build_table(s, paper_rows, cells, params, results, matches) for s in TABLE_SPECS]
    return tables + [build_cost_table(cells, results, params)]
