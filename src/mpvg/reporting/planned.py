"""The report's planned-cost table: GPU-hours of the grid for the configured seeds.

The same cost model as `mpvg workflow cost` (mpvg.workflow.cost: images trained on / planned
throughput per GPU), one row per task and model, for ``len(seeds)`` seeds. Only the paper and
budget scales are planned (the tiny scale runs on CPU in minutes).
"""
from __future__ import annotations

from typing import Optional

from mpvg.reporting.render import Entry, Table


def build_planned_cost_table(params: dict) -> Optional[Table]:
    """The planned GPU-hours per task and model and in total, or ``None`` at the tiny scale."""
    from mpvg.workflow.cost import PLANNED_SCALES, cost_rows

    scale = params.get("scale")
    if scale not in PLANNED_SCALES:
        return None
    n = len(params["seeds"])
    groups: dict[str, list[dict]] = {}
    for r in cost_rows(params):
        task, model = r["cell"].split("-")[:2]
        groups.setdefault(f"{task}-{model}-*", []).append(r)
    t = Table("cost-plan", f"Planned GPU-hours for {n} seed(s)", "",
              ["Cells", "Tables", "GPUs per job", "GPU-h per cell and seed", f"GPU-h, {n} seed(s)"], "llrrr")
    total = 0.0
    for key, rows in groups.items():
        hours = sum(r["all_seeds"] for r in rows)
        total += hours
        tables = ",".join(dict.fromkeys(x for r in rows for x in r["tables"].split(",")))
        t.add_row([f"{key} ({len(rows)} cells)", tables, str(rows[0]["gpus"]), f"{rows[0]['gpu_hours']:.1f}",
                   f"{hours:.1f}"])
    t.add_row([Entry("Total", True), "", "", "", Entry(f"{total:.0f}", True)], new_group=True)
    t.caption = (f"Scale: {scale}. GPU-hours planned from the recipes (images trained on / planned training "
                 f"throughput per GPU, mpvg.workflow.plan), before any run, for the {n} seed(s) of the params; "
                 f"the measured hours are in the compute-cost table. `mpvg workflow cost --set scale={scale} "
                 f"--seeds N` gives it for N seeds.")
    return t
