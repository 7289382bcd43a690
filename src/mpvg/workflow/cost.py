"""The README's cost table: GPU-hours per cell at the paper scale, from the recipes.

GPU-hours of a job = images it trains on (epochs x training-set size, or iterations x batch)
/ planned throughput per GPU (mpvg.workflow.plan.IMAGES_PER_S_PER_GPU) / 3600. The job's
SLURM runtime adds the safety margin on top of this divided by its GPUs.
"""
from __future__ import annotations

from typing import Mapping

from mpvg.config import expand_cells
from mpvg.workflow.plan import epochs_images, gpus_for, paper_gpu_hours, throughput


def cost_rows(params: Mapping) -> list[dict]:
    """One row per cell: GPUs, images, throughput, GPU-hours per seed and for all seeds."""
    if params["scale"] != "paper":
        raise ValueError("the cost table is for the paper scale: load params with scale=paper")
    rows = []
    for cell in expand_cells(params).values():
        hours = paper_gpu_hours(params, cell)
        rows.append({"cell": cell.id, "tables": ",".join(cell.tables), "gpus": gpus_for(cell),
                     "images_m": epochs_images(params, cell) / 1e6, "img_s_gpu": throughput(cell),
                     "gpu_hours": hours, "all_seeds": hours * len(params["seeds"])})
    return rows


def cost_table(params: Mapping, by_model: bool = False) -> str:
    """Markdown table of :func:`cost_rows` with a total line; ``by_model`` folds the cells of one
    task and model (same recipe, same cost) into one row with their count."""
    rows = cost_rows(params)
    if by_model:
        groups: dict[str, list[dict]] = {}
        for r in rows:
            task, model = r["cell"].split("-")[:2]
            groups.setdefault(f"{task}-{model}-*", []).append(r)
        rows = [{**g[0], "cell": f"{key} ({len(g)} cells)",
                 "tables": ",".join(dict.fromkeys(t for r in g for t in r["tables"].split(",")))}
                for key, g in groups.items()]
        for row, g in zip(rows, groups.values()):
            row["all_seeds"] = sum(r["all_seeds"] for r in g)
    lines = ["| cell | tables | GPUs | images (M) | img/s/GPU | GPU-h per cell and seed | wall-clock h |",
             "|---|---|--:|--:|--:|--:|--:|"]
    for r in rows:
        lines.append(f"| {r['cell']} | {r['tables']} | {r['gpus']} | {r['images_m']:.1f} | {r['img_s_gpu']} "
                     f"| {r['gpu_hours']:.1f} | {r['gpu_hours'] / r['gpus']:.1f} |")
    total = sum(r["all_seeds"] for r in rows)
    ncells = len(cost_rows(params)) if by_model else len(rows)
    lines.append(f"| **total** ({ncells} cells x {len(params['seeds'])} seed(s)) | | | | | **{total:.0f}** | |")
    return "\n".join(lines)
