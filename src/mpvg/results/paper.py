"""The paper's own numbers (paper_numbers.csv), transcribed once, and how a cell finds its row.

A row of the paper is named by what was run, not by a cell id: ``(task, model, method,
PE overrides)``. A cell of params.yaml matches a row when both give the same effective
:class:`mpvg.models.pe.PEConfig`, so renaming a variant in params.yaml, or writing MPVG's
``last_ln_pe: 0`` explicitly, does not lose the paper's number.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

PAPER_CSV = Path(__file__).with_name("paper_numbers.csv")
CSV_COLUMNS = ("table", "task", "model", "method", "overrides", "label", "metric", "value", "source")
METRICS = ("params_m", "top1", "bbox_ap", "segm_ap", "miou", "beta_var", "cos_last_ln")


@dataclass
class PaperRow:
    """One row of a paper table: its values per metric (``None``: given only graphically)."""

    table: str
    task: str
    model: str
    method: str
    overrides: dict
    label: str
    values: dict = field(default_factory=dict)
    sources: dict = field(default_factory=dict)

    @property
    def key(self) -> tuple:
        return (self.table, self.task, self.model, self.method, tuple(sorted(self.overrides.items())))


def parse_overrides(text: str, where: str = "overrides") -> dict:
    """``"pool=avg;last_ln_pe=0"`` -> ``{"pool": "avg", "last_ln_pe": 0}`` (ints, booleans, strings)."""
    out: dict = {}
    for part in filter(None, (p.strip() for p in (text or "").split(";"))):
        if "=" not in part:
            raise ValueError(f"{where}: expected KEY=VALUE items separated by ';', got {part!r}")
        key, raw = (s.strip() for s in part.split("=", 1))
        low = raw.lower()
        if low in ("true", "false"):
            value: object = low == "true"
        elif low in ("none", "null"):
            value = None
        else:
            try:
                value = int(raw)
            except ValueError:
                value = raw
        out[key] = value
    return out


def load_paper_numbers(path: Path | str = PAPER_CSV) -> list[PaperRow]:
    """Rows in file order, one per (table, task, model, method, overrides), metrics merged."""
    path = Path(path)
    rows: dict[tuple, PaperRow] = {}
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if tuple(reader.fieldnames or ()) != CSV_COLUMNS:
            raise ValueError(f"{path}: header must be {','.join(CSV_COLUMNS)}, got {reader.fieldnames}")
        for i, rec in enumerate(reader, start=2):
            where = f"{path}:{i}"
            if rec["metric"] not in METRICS:
                raise ValueError(f"{where}: metric {rec['metric']!r} is not one of {METRICS}")
            value: Optional[float] = float(rec["value"]) if rec["value"].strip() else None
            row = PaperRow(rec["table"], rec["task"], rec["model"], rec["method"],
                           parse_overrides(rec["overrides"], where), rec["label"])
            row = rows.setdefault(row.key, row)
            if rec["metric"] in row.values:
                raise ValueError(f"{where}: {rec['metric']} given twice for {row.key}")
            row.values[rec["metric"]] = value
            row.sources[rec["metric"]] = rec["source"]
    return list(rows.values())


def effective_pe(model: str, method: str, overrides: dict, params: dict):
    """The (frozen, hashable) PEConfig that ``method`` + ``overrides`` give on ``model``.

    The architecture's own per-method overrides from params (``models.<m>.method_pe_overrides``,
    e.g. Swin's ``include_layer0``) are applied under the cell's, as config.py does.
    """
    from mpvg.models.pe import pe_config

    model_cfg = (params.get("models") or {}).get(model) or {}
    base = dict((model_cfg.get("method_pe_overrides") or {}).get(method) or {})
    base.update(overrides or {})
    # Both sides of a comparison use the same default pool, so the choice cannot split a match.
    return pe_config(method, default_pool="token", **base)


def match_cells(rows: list[PaperRow], cells: dict, params: dict) -> dict[tuple, Optional[str]]:
    """``{row.key: cell id or None}``; a cell that lists the row's table wins a tie."""
    index: dict[tuple, list] = {}
    for cid in sorted(cells):
        c = cells[cid]
        key = (c.task, c.model, c.method, effective_pe(c.model, c.method, c.pe_overrides, params))
        index.setdefault(key, []).append(c)
    out: dict[tuple, Optional[str]] = {}
    for r in rows:
        found = index.get((r.task, r.model, r.method, effective_pe(r.model, r.method, r.overrides, params)), [])
        tagged = [c for c in found if r.table in (c.tables or ())]
        pick = (tagged or found or [None])[0]
        out[r.key] = pick.id if pick is not None else None
    return out
