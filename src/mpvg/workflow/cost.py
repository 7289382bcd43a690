"""The README's cost tables: planned GPU-hours per cell at the paper or budget scale, from the recipes.

GPU-hours of a job = images it trains on (epochs x training-set size, or iterations x batch)
/ throughput per GPU (mpvg.workflow.plan.throughput: measured by gpu_check when
``paths.measured_speeds`` names its file, else the estimates IMAGES_PER_S_PER_GPU) / 3600. The job's
SLURM runtime adds the safety margin on top of this divided by its GPUs. ``seeds`` multiplies
every cell (each seed is one more run of the whole grid).
"""
from __future__ import annotations

from typing import Mapping, Optional

from mpvg.config import expand_cells
from mpvg.workflow.plan import (epochs_images, gpus_for, measured_throughput, paper_gpu_hours, throughput,
                                throughput_source)

PLANNED_SCALES = ("paper", "budget")


def cost_rows(params: Mapping, seeds: Optional[int] = None) -> list[dict]:
    """One row per cell: GPUs, images, throughput, GPU-hours per seed and for ``seeds`` seeds
    (default: the number of ``params["seeds"]``)."""
    if params["scale"] not in PLANNED_SCALES:
        raise ValueError(f"the cost table is for the {' or '.join(PLANNED_SCALES)} scale, not "
                         f"{params['scale']!r}: load params with scale=paper or scale=budget")
    n = len(params["seeds"]) if seeds is None else int(seeds)
    if n < 1:
        raise ValueError(f"seeds must be at least 1, got {n}")
    rows = []
    for cell in expand_cells(params).values():
        hours = paper_gpu_hours(params, cell)
        rows.append({"cell": cell.id, "tables": ",".join(cell.tables), "gpus": gpus_for(cell, params["scale"]),
                     "images_m": epochs_images(params, cell) / 1e6, "img_s_gpu": throughput(cell, params),
                     "measured": measured_throughput(cell, params) is not None,
                     "gpu_hours": hours, "all_seeds": hours * n, "seeds": n})
    return rows


def total_gpu_hours(params: Mapping, seeds: Optional[int] = None) -> float:
    """GPU-hours of the whole grid for ``seeds`` seeds (default: params' seeds)."""
    return sum(r["all_seeds"] for r in cost_rows(params, seeds))


def rows_by_model(rows: list[dict]) -> list[dict]:
    """:func:`cost_rows` with the cells of one task and model (same recipe, same cost) folded
    into one row: ``cell`` is ``"in1k-deit_ti-* (14 cells)"``, ``tables`` their union and
    ``all_seeds`` their sum; the per-cell values are the first cell's."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        task, model = r["cell"].split("-")[:2]
        groups.setdefault(f"{task}-{model}-*", []).append(r)
    return [{**g[0], "cell": f"{key} ({len(g)} cells)", "cells": len(g),
             "tables": ",".join(dict.fromkeys(t for r in g for t in r["tables"].split(","))),
             "all_seeds": sum(r["all_seeds"] for r in g)} for key, g in groups.items()]


def cost_table(params: Mapping, by_model: bool = False, seeds: Optional[int] = None,
               reference: Optional[float] = None) -> str:
    """Markdown table of :func:`cost_rows` with a total line; ``by_model`` folds the cells of one
    task and model into one row (:func:`rows_by_model`). ``reference`` (the GPU-hours of one
    paper-scale seed) adds the total's share of it."""
    rows = cost_rows(params, seeds)
    n = rows[0]["seeds"] if rows else (len(params["seeds"]) if seeds is None else int(seeds))
    ncells = len(rows)
    if by_model:
        rows = rows_by_model(rows)
    source = throughput_source(params)  # which img/s are measured (gpu_check) and on which GPU
    lines = [f"| cell | tables | GPUs | images (M) | img/s/GPU ({source}) | GPU-h per cell and seed | wall-clock h |",
             "|---|---|--:|--:|--:|--:|--:|"]
    for r in rows:
        lines.append(f"| {r['cell']} | {r['tables']} | {r['gpus']} | {r['images_m']:.1f} | {r['img_s_gpu']:.0f}{'' if r['measured'] or source == 'estimated' else '*'} "
                     f"| {r['gpu_hours']:.1f} | {r['gpu_hours'] / r['gpus']:.1f} |")
    total = sum(r["all_seeds"] for r in rows)
    share = f" = {100 * total / reference:.1f} % of one paper-scale seed ({reference:.0f} GPU-h)" if reference else ""
    lines.append(f"| **total** ({ncells} cells x {n} seed(s)) | | | | | **{total:.0f}**{share} | |")
    return "\n".join(lines)
