"""The report's planned-cost table: GPU-hours of the grid for the configured seeds.

The same cost model as `mpvg workflow cost` (mpvg.workflow.cost: images trained on / planned
throughput per GPU), one row per task and model, for ``len(seeds)`` seeds. Only the paper and
budget scales are planned (the tiny scale runs on CPU in minutes). The command line hands in the
rows (:func:`mpvg.reporting.commands.report_inputs`): reporting does not import the workflow.
"""
from __future__ import annotations

from typing import Optional

from mpvg.results.render import Entry, Table


def build_planned_cost_table(params: dict, rows: Optional[list[dict]]) -> Optional[Table]:
    """The planned GPU-hours per task and model and in total, or ``None`` without ``rows`` (the
    tiny scale). ``rows``: the cost model's rows folded per task and model
    (``mpvg.workflow.cost.rows_by_model(cost_rows(params))``)."""
    if rows is None:
        return None
    scale = params.get("scale")
    n = len(params["seeds"])
    t = Table("cost-plan", f"Planned GPU-hours for {n} seed(s)", "",
              ["Cells", "Tables", "GPUs per job", "GPU-h per cell and seed", f"GPU-h, {n} seed(s)"], "llrrr")
    for r in rows:
        t.add_row([r["cell"], r["tables"], str(r["gpus"]), f"{r['gpu_hours']:.1f}", f"{r['all_seeds']:.1f}"])
    total = sum(r["all_seeds"] for r in rows)
    t.add_row([Entry("Total", True), "", "", "", Entry(f"{total:.0f}", True)], new_group=True)
    t.caption = (f"Scale: {scale}. GPU-hours planned from the recipes (images trained on / planned training "
                 f"throughput per GPU, mpvg.workflow.plan), before any run, for the {n} seed(s) of the params; "
                 f"the measured hours are in the compute-cost table. `mpvg workflow cost --set scale={scale} "
                 f"--seeds N` gives it for N seeds.")
    return t
