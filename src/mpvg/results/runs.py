"""Finished runs: every ``runs/<stage>/<cell>/seed<k>/result.json`` and the numbers in it.

Only result.json is read (its existence means the run finished, docs/contracts.md); a run
without one is pending, never guessed.
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

REQUIRED_FIELDS = ("cell", "stage", "seed", "scale", "metrics")


@dataclass(frozen=True)
class Aggregate:
    """Mean and sample standard deviation (``None`` for one seed) of one metric over seeds."""

    mean: float
    std: Optional[float]
    n: int


def load_result(path: Path) -> dict:
    """One result.json, checked for the fields the reports use."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    missing = [k for k in REQUIRED_FIELDS if k not in data]
    if missing:
        raise ValueError(f"{path}: missing field(s) {missing}; docs/contracts.md lists what result.json holds")
    if not isinstance(data["metrics"], dict):
        raise ValueError(f"{path}: 'metrics' must be an object, got {type(data['metrics']).__name__}")
    data["_path"] = str(path)
    return data


def collect_results(runs_dir: Path | str) -> dict[str, list[dict]]:
    """``{cell id: [result, ...] sorted by seed}`` for every result.json under ``runs_dir``."""
    runs_dir = Path(runs_dir)
    out: dict[str, list[dict]] = {}
    if not runs_dir.is_dir():
        return out
    for path in sorted(runs_dir.glob("*/*/seed*/result.json")):
        res = load_result(path)
        if res["cell"] != path.parent.parent.name:
            raise ValueError(f"{path}: field cell={res['cell']!r} but the run folder is {path.parent.parent.name!r}")
        out.setdefault(res["cell"], []).append(res)
    for results in out.values():
        results.sort(key=lambda r: (int(r["seed"]), r["_path"]))
    return out


def metric_value(result: dict, metric: str) -> Optional[float]:
    """A report metric of one result: ``params_m`` is ``params / 1e6``; others come from ``metrics``."""
    if metric == "params_m":
        p = result.get("params")
        return None if p is None else float(p) / 1e6
    v = result["metrics"].get(metric)
    return None if v is None else float(v)


def aggregate(values: list[float]) -> Optional[Aggregate]:
    """Mean and sample std of finite values; ``None`` when there are none."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return None
    std = statistics.stdev(vals) if len(vals) > 1 else None
    return Aggregate(statistics.fmean(vals), std, len(vals))


def split_by_scale(results: dict[str, list[dict]], scale: str) -> tuple[dict[str, list[dict]], list[str]]:
    """Keep results of ``scale``; return them and the paths of those left out (other scale)."""
    kept: dict[str, list[dict]] = {}
    skipped: list[str] = []
    for cid, rs in results.items():
        same = [r for r in rs if r.get("scale") == scale]
        skipped.extend(r["_path"] for r in rs if r.get("scale") != scale)
        if same:
            kept[cid] = same
    return kept, sorted(skipped)


def newest_result_time(results: dict[str, list[dict]]) -> Optional[float]:
    """Modification time (epoch s) of the newest result.json: the 'as of' of a report."""
    times = [Path(r["_path"]).stat().st_mtime for rs in results.values() for r in rs]
    return max(times) if times else None


COST_FIELDS = ("wall_time_s", "gpu_hours", "cpu_hours")


def compute_totals(results: dict[str, list[dict]]) -> dict:
    """``{"runs": n, "wall_time_s": .., "gpu_hours": .., "cpu_hours": ..}`` summed over every result.

    A field no result reports is ``None`` (never 0: unknown is not free); the cost table and
    build.json both use this sum.
    """
    rs = [r for group in results.values() for r in group]
    out: dict = {"runs": len(rs)}
    for key in COST_FIELDS:
        vals = [float(r[key]) for r in rs if r.get(key) is not None]
        out[key] = math.fsum(vals) if vals else None
    return out


def split_current(results: dict[str, list[dict]], current: Mapping[tuple[str, int], Optional[str]]
                  ) -> tuple[dict[str, list[dict]], dict[str, list[int]], list[str]]:
    """Keep only results that follow from the current params: ``(current, stale, left_out)``.

    ``current`` holds every run the current params make, ``(cell, seed)``, with the signature its
    result.json records when the workflow's rerun rule finds it current, else ``None``; the command
    line computes it (:func:`mpvg.workflow.state.current_runs`), so the readers do not plan the DAG.
    A result is shown when it is the one judged current (same signature); ``stale`` maps a cell to
    the seeds whose result was made with other settings (shown as ``stale``, never as a number);
    ``left_out`` lists results of seeds params.yaml does not run."""
    kept: dict[str, list[dict]] = {}
    stale: dict[str, list[int]] = {}
    left_out: list[str] = []
    for cid, rs in results.items():
        for r in rs:
            key = (cid, int(r["seed"]))
            if key not in current:
                left_out.append(r["_path"])
            elif current[key] is not None and r.get("signature") == current[key]:
                kept.setdefault(cid, []).append(r)
            else:
                stale.setdefault(cid, []).append(int(r["seed"]))
    return kept, stale, sorted(left_out)


def commits_of(results: dict[str, list[dict]]) -> dict[str, int]:
    """``{git commit: number of results}`` of the results shown (what produced the numbers)."""
    out: dict[str, int] = {}
    for rs in results.values():
        for r in rs:
            key = str(r.get("git_commit") or "unknown")
            out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: (-kv[1], kv[0])))
