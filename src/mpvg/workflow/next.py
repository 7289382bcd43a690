"""`mpvg workflow next --budget H`: the next round of seeds that resolves the most claims per GPU-hour.

Reads the current results (as `mpvg report` does: this scale's result.json files whose run
signature follows from the params; stale ones are rerun), judges every claim with its
group-sequential design (mpvg.reporting.claims), and prices each open claim's next round with
the cost model (mpvg.workflow.plan.paper_gpu_hours, GPU-hours of one seed of a cell; a
fine-tune's start cell runs the same seeds). A claim's value is the chance that its next round
ends it with a verdict when the true difference is the paper's size (about-equal claims: 0),
from the normal approximation of the round's test. Claims share cells, so the plan is built
greedily: repeatedly take the claim with the most value per GPU-hour it adds to the plan (the
seeds its cells still lack), as long as the budget allows. docs/claims.md ("Seeds where they
pay") says why and what it prints.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Optional


@dataclass
class Step:
    """One open claim's next round: the seeds per cell it needs, what it costs alone, its value."""

    claim_id: str
    targets: dict               # cell -> finite seeds per cell the round needs
    value: float                # P(the round ends the claim) at the paper's size
    round: int                  # the round it would reach (1-based)


@dataclass
class Plan:
    add: dict = field(default_factory=dict)      # cell -> number of new seeds
    steps: list = field(default_factory=list)    # the Steps taken
    gpu_hours: float = 0.0
    budget: float = 0.0
    open_claims: int = 0


def round_value(size: Optional[float], sd: Optional[float], n: int, alpha: float, similar: bool) -> float:
    """P(a round at ``n`` seeds per cell and level ``1 - alpha`` ends the claim), normal
    approximation: at the paper's size for a difference, at 0 within the margin (``size``) for an
    about-equal claim. Without a spread: 0.5 (unknown, neither sure nor hopeless)."""
    from scipy.stats import norm

    if size is None:
        return 0.0
    if not sd:
        return 0.5 if sd is None else 1.0
    z = abs(size) / (sd * math.sqrt(2.0 / n)) - norm.ppf(1 - alpha / 2)
    return float(max(0.0, 2 * norm.cdf(z) - 1) if similar else norm.cdf(z))


def steps_of(verdicts, cells: Mapping) -> list[Step]:
    """The next round of every open claim (not stopped, both cells in the grid)."""
    from mpvg.reporting.sequential import MIN_SEEDS, design_from_rounds

    out = []
    for v in verdicts:
        if v.final or v.next_seeds is None:
            continue
        c = v.claim
        rounds = v.rounds or (MIN_SEEDS,)
        k = v.round              # rounds judged; the next is rounds[k]
        alpha = design_from_rounds(rounds).alphas[k] if v.rounds else 0.05
        targets = {c.a: v.n_a + v.next_seeds[0], c.b: v.n_b + v.next_seeds[1]}
        value = round_value(c.size, v.sd, rounds[k], alpha, c.expect == "similar")
        out.append(Step(c.id, targets, value, k + 1))
    return out


def _cost(targets: Mapping[str, int], have: Mapping[str, int], cells: Mapping, gpu_hours: Mapping) -> tuple[float, dict]:
    """GPU-hours and new seeds per cell to bring each cell to its target (a fine-tune's start cell
    runs the same new seeds: its checkpoint is the fine-tune's start)."""
    add: dict[str, int] = {}
    for cid, n in targets.items():
        new = max(0, n - have.get(cid, 0))
        if new:
            add[cid] = max(add.get(cid, 0), new)
            init = cells[cid].init_from
            if init and n > have.get(init, 0):
                add[init] = max(add.get(init, 0), n - have.get(init, 0))
    return sum(k * gpu_hours[cid] for cid, k in add.items()), add


def propose(steps: list[Step], have: Mapping[str, int], cells: Mapping, gpu_hours: Mapping, budget: float) -> Plan:
    """Greedy: the step with the most value per added GPU-hour that still fits, until none does
    (a step whose cells are already covered costs nothing and is always taken; ties: the larger
    value, then the first claim id)."""
    plan = Plan(budget=budget, open_claims=len(steps))
    targets: dict[str, int] = {}
    left = [s for s in steps if s.value > 0]
    while left:
        base, _ = _cost(targets, have, cells, gpu_hours)
        best, best_key = None, None
        for s in sorted(left, key=lambda s: s.claim_id):   # ties: the first id wins
            merged = {**targets, **{c: max(n, targets.get(c, 0)) for c, n in s.targets.items()}}
            cost, _ = _cost(merged, have, cells, gpu_hours)
            extra = cost - base
            if cost > budget + 1e-9:
                continue
            key = (s.value / extra if extra > 0 else math.inf, s.value)
            if best_key is None or key > best_key:
                best, best_key = (s, merged), key
        if best is None:
            break
        step, targets = best
        plan.steps.append(step)
        left.remove(step)
    plan.gpu_hours, plan.add = _cost(targets, have, cells, gpu_hours)
    return plan


def new_seed_lists(plan: Plan, seeds_now: Mapping[str, list], cells: Mapping) -> dict[str, list[int]]:
    """``seeds_per_cell`` after the plan: each planned cell's finished seeds plus the smallest
    unused numbers (a stale seed's number is reused: its rerun is the new seed). A fine-tune's
    start cell runs every seed of its fine-tunes, and takes its own new seeds from those first."""
    starts = {cells[cid].init_from for cid in plan.add if cells[cid].init_from}
    out: dict[str, list[int]] = {}
    for cid in sorted(plan.add, key=lambda c: c in starts):   # fine-tunes before their start cells
        now = set(seeds_now.get(cid, []))
        required = sorted({s for f, seeds in out.items() if cells[f].init_from == cid for s in seeds} - now)
        new = required[:plan.add[cid]]
        s = 0
        while len(new) < plan.add[cid]:
            if s not in now and s not in new:
                new.append(s)
            s += 1
        out[cid] = sorted(now | set(new) | set(required))
    return out


def _flow(mapping: Mapping[str, list]) -> str:
    return "{" + ", ".join(f"{cid}: [{', '.join(map(str, seeds))}]" for cid, seeds in mapping.items()) + "}"


def merged_seeds_per_cell(params: Mapping, cells: Mapping, seed_lists: Mapping[str, list]) -> dict:
    """The params' ``seeds_per_cell`` with the planned cells' lists: a pattern of the params that
    matches a planned cell is written out as the ids it matches (each keeping its seeds), so that
    no cell is matched twice."""
    import fnmatch

    out: dict[str, list] = {}
    for pat, seeds in (params.get("seeds_per_cell") or {}).items():
        hit = [c for c in cells if fnmatch.fnmatchcase(c, pat)]
        if any(c in seed_lists for c in hit):
            out.update({c: list(seeds) for c in hit if c not in seed_lists})
        else:
            out[pat] = list(seeds)
    out.update(seed_lists)
    return out


def render(plan: Plan, seed_lists: Mapping[str, list], have: Mapping[str, int], gpu_hours: Mapping,
           params: Mapping, params_file: str = "params.yaml", cells: Mapping = None) -> str:
    lines = [f"mpvg workflow next: scale {params['scale']}, budget {plan.budget:g} GPU-h; {plan.open_claims} open "
             f"claim(s), {len(plan.steps)} advanced by this round"]
    if not plan.steps:
        lines.append("nothing to run: no open claim's next round fits the budget" if plan.open_claims else
                     "nothing to run: every claim has stopped (or is not in the grid at this scale)")
        return "\n".join(lines) + "\n"
    lines += ["", "| cell | finite seeds now | add | seeds_per_cell | GPU-h |", "|---|--:|--:|---|--:|"]
    for cid, k in plan.add.items():
        lines.append(f"| {cid} | {have.get(cid, 0)} | {k} | {seed_lists[cid]} | {k * gpu_hours[cid]:.1f} |")
    expected = sum(s.value for s in plan.steps)
    over = f" (over the budget by {plan.gpu_hours - plan.budget:.1f}: start cells' seeds)" \
        if plan.gpu_hours > plan.budget + 1e-9 else ""
    lines += [f"| **total** | | {sum(plan.add.values())} | | **{plan.gpu_hours:.1f}**{over} |", "",
              f"Claims this round advances (expected to end {expected:.1f} of them at the paper's size; "
              f"{expected / plan.gpu_hours if plan.gpu_hours else math.inf:.3f} per GPU-hour):"]
    lines += [f"- {s.claim_id}: round {s.round} at {max(s.targets.values())} seeds per cell, "
              f"P(ends it) {s.value:.2f}" for s in plan.steps]
    value = f"seeds_per_cell={_flow(merged_seeds_per_cell(params, cells, seed_lists))}"
    scale = params["scale"]
    lines += ["", "Run it with Snakemake:",
              f"  snakemake --profile slurm --config params={params_file} scale={scale} 'set=[\"{value}\"]'",
              "or with DVC (dvc.yaml has one stage per cell and seed: the first command sets params.yaml and "
              "stops because dvc.yaml lacks the new stages; the second writes them and runs):",
              f"  dvc exp run -S 'scale={scale}' -S '{value}'",
              "  mpvg workflow dvc-yaml && dvc exp run"]
    return "\n".join(lines) + "\n"


def run_next(params: dict, runs_dir: str, budget: float, params_file: str = "params.yaml") -> str:
    """Read the runs, judge the claims, plan the round; the text `mpvg workflow next` prints."""
    from mpvg.config import cell_seeds, expand_cells
    from mpvg.reporting.claims import judge_all, load_claims
    from mpvg.results.runs import collect_results, split_by_scale, split_current
    from mpvg.workflow.cost import PLANNED_SCALES
    from mpvg.workflow.plan import paper_gpu_hours
    from mpvg.workflow.state import current_runs

    if params["scale"] not in PLANNED_SCALES:
        raise ValueError(f"the cost model is for the {' or '.join(PLANNED_SCALES)} scale, not {params['scale']!r}: "
                         "use --set scale=budget or --set scale=paper")
    cells = expand_cells(params)
    results, _ = split_by_scale(collect_results(runs_dir), params["scale"])
    results, stale, _ = split_current(results, current_runs(params, runs_dir))
    gpu_hours = {cid: paper_gpu_hours(params, cell) for cid, cell in cells.items()}
    verdicts = judge_all(load_claims(), cells, results, params["scale"], stale=stale, gpu_hours=gpu_hours)
    have = {cid: v.n_a if v.claim.a == cid else v.n_b for v in verdicts for cid in (v.claim.a, v.claim.b)}
    for cid, rs in results.items():
        have.setdefault(cid, len(rs))
    plan = propose(steps_of(verdicts, cells), have, cells, gpu_hours, budget)
    seeds_now = {cid: sorted({int(r["seed"]) for r in rs}) for cid, rs in results.items()}
    cell_seeds(params, cells)   # the params' own seeds_per_cell must be valid before it is extended
    lists = new_seed_lists(plan, seeds_now, cells)
    # what the lists really add (a fine-tune's start cell may need other seed numbers than planned)
    plan.add = {cid: len(set(seeds) - set(seeds_now.get(cid, []))) for cid, seeds in lists.items()}
    plan.gpu_hours = sum(k * gpu_hours[cid] for cid, k in plan.add.items())
    return render(plan, lists, have, gpu_hours, params, params_file, cells)
