"""``mpvg status``: where a long run of the DAG stands, from the run folders alone.

Reads what the jobs write (``result.json``, the ``.lock`` of a run being written, the
``metrics.jsonl`` journal) and the rerun rule (:mod:`mpvg.workflow.state`), so it works on a login
node while Snakemake (or DVC, or a SLURM queue) runs, and never imports torch or mlflow.

Per table: finished, running (epoch or iteration k of n), interrupted, stale and pending runs;
GPU-hours spent (finished runs, and running ones so far) and planned for what is left (the cost
model of :mod:`mpvg.workflow.plan`); the MLflow run of each run.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Mapping

from mpvg.config import expand_cells, resolve_run
from mpvg.run.layout import JOURNAL

ORDER = ("T1", "T2", "T3", "T4", "T5", "T6", "F1", "F5", "C1")
STATES = ("finished", "running", "interrupted", "stale", "pending")


@dataclass
class RunStatus:
    cell: str
    seed: int
    stage: str
    tables: list
    state: str                      # one of STATES
    why: str = ""
    progress: str = ""              # "epoch 3/300", "iter 120/160000"
    gpu_hours: float = 0.0          # spent
    planned_hours: float = 0.0      # planned for what is left of it (paper/budget cost model)
    mlflow_run_id: str | None = None
    holder: dict = field(default_factory=dict)


def _journal(path: Path) -> list[dict]:
    """The run's journal events; none when it has no journal yet or one that cannot be read
    (read_journal already leaves out the torn last line of a killed job)."""
    from mpvg.tracking import read_journal

    try:
        return read_journal(path)
    except (OSError, ValueError):
        return []


def _total(params: Mapping, cell: str) -> tuple[str, int]:
    recipe = resolve_run(params, cell).recipe
    if "iters" in recipe:
        return "iter", int(recipe["iters"])
    if "total_epochs" in recipe:
        return "epoch", int(recipe["total_epochs"])
    return "epoch", int(recipe["epochs"])


def run_statuses(params: Mapping) -> list[RunStatus]:
    """The status of every run of the plan of ``params``."""
    from mpvg.runinfo import read_json_object
    from mpvg.run.folder import STARTED_FORMAT, lock_holder
    from mpvg.workflow.plan import cell_resources, paper_gpu_hours
    from mpvg.workflow.state import plan_states

    jobs, states = plan_states(params)
    grid = expand_cells(params)
    out = []
    for job in jobs:
        if not job.cell:
            continue
        st = states[(job.rule, job.key)]
        cell = grid[job.cell]
        folder = Path(job.outs[0]).parent
        unit, total = _total(params, job.cell)
        planned = paper_gpu_hours(params, cell) if params["scale"] != "tiny" else 0.0
        rs = RunStatus(job.cell, job.seed, job.rule, list(cell.tables), "pending", planned_hours=planned)
        events = _journal(folder / JOURNAL)
        steps = [e.get("step", 0) for e in events if e.get("event") == "metrics"]
        done = max(steps) if steps else 0
        rs.mlflow_run_id = next((e.get("run_id") for e in reversed(events) if e.get("event") == "mlflow_run"), None)
        holder = lock_holder(folder)
        if st.current:
            rs.state = "finished"
            record = read_json_object(job.outs[0]) or {}
            rs.gpu_hours = float(record.get("gpu_hours") or 0.0)
            rs.mlflow_run_id = record.get("mlflow_run_id") or rs.mlflow_run_id
            rs.planned_hours = 0.0
            rs.progress = f"{unit} {total}/{total}"
        elif holder:
            rs.state, rs.holder = "running", holder
            rs.progress = f"{unit} {done}/{total}"
            gpus = cell_resources(params, cell)["gpu"]
            started = holder.get("started")
            if started:
                try:
                    t0 = datetime.strptime(started, STARTED_FORMAT).replace(tzinfo=timezone.utc).timestamp()
                    rs.gpu_hours = max(0.0, time.time() - t0) * gpus / 3600.0
                except ValueError:
                    pass
            rs.planned_hours = planned * (1 - done / max(total, 1))
        elif st.status == "unfinished":
            rs.state, rs.why = "interrupted", "resumes from its checkpoint"
            rs.progress = f"{unit} {done}/{total}"
            rs.planned_hours = planned * (1 - done / max(total, 1))
        elif st.status == "stale" or (st.status == "current" and st.needs_run):
            rs.state, rs.why = "stale", "; ".join(st.reasons[:2])
        else:
            rs.state = "pending"
        out.append(rs)
    return out


def render(params: Mapping, statuses: list[RunStatus], show_all: bool = False) -> str:
    """Per table: counts, then every run that is not finished (all with ``show_all``)."""
    from mpvg.run.folder import holder_text

    gpu = params["scale"] != "tiny"
    lines = [f"mpvg status: scale {params['scale']}, seeds {list(params['seeds'])}, {len(statuses)} runs"]
    tables = [t for t in ORDER if any(t in s.tables for s in statuses)]
    for table in tables:
        rows = [s for s in statuses if table in s.tables]
        counts = {k: sum(s.state == k for s in rows) for k in STATES}
        spent = sum(s.gpu_hours for s in rows)
        left = sum(s.planned_hours for s in rows)
        summary = ", ".join(f"{n} {k}" for k, n in counts.items() if n) or "no runs"
        hours = f"; GPU-h spent {spent:.1f}, planned for the rest {left:.1f}" if gpu else ""
        lines += ["", f"{table}: {summary}{hours}"]
        for s in rows:
            if s.state == "finished" and not show_all:
                continue
            extra = s.progress
            if s.state == "running":
                extra = f"{s.progress} ({holder_text(s.holder)})"
            elif s.why:
                extra = f"{s.progress} {s.why}".strip()
            mlflow = f"  mlflow {s.mlflow_run_id}" if s.mlflow_run_id else ""
            lines.append(f"  {s.state:<11} {s.cell} seed{s.seed}  {extra}{mlflow}".rstrip())
    total = {k: sum(s.state == k for s in statuses) for k in STATES}
    lines += ["", "all: " + ", ".join(f"{n} {k}" for k, n in total.items() if n)]
    if gpu:
        lines.append(f"GPU-hours: spent {sum(s.gpu_hours for s in statuses):.1f}, planned for the rest "
                     f"{sum(s.planned_hours for s in statuses):.1f} (cost model: `mpvg workflow cost`)")
    if total["stale"] or total["pending"] or total["interrupted"]:
        lines.append("`snakemake` (or `dvc repro`) runs what is stale, interrupted or pending; "
                     "`mpvg status --all` lists the finished runs too")
    return "\n".join(lines)
