"""Verdicts on the paper's claims: reports/claims.md, claims.tex and claims.json, one row per claim.

The claims are data (claims.yaml beside this file, built by the rule of docs/claims.md): two
cells of the grid, a metric, the paper's difference. Each claim is judged round by round by the
group-sequential design of :mod:`mpvg.reporting.sequential` (rounds of seeds per cell, alpha
spent per round, a futility stop), so its error rates hold however often the report is rebuilt;
beside it, Holm's adjustment within the claim's table. The edges (identical seeds, diverged
seeds, stale seeds, cells outside the grid) each have their own verdict or count. The method and
why: docs/claims.md.

Verdicts: ``holds`` / ``contradicted`` (a round's interval on the paper's / the other side of 0,
or inside / wholly outside ``+-margin`` for about-equal claims), ``futile`` (stopped before the
last round: the paper's size is excluded), ``not resolved`` (at an open round, or after the last
one), ``flagged`` (a cell's seeds are identical: broken seeding, never a verdict on the claim),
``diverged`` (every finished seed of a cell has no finite value), ``pending`` (not in the grid,
no current run, stale runs only, or fewer than ``MIN_SEEDS`` finite seeds per cell).
"""
from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

from mpvg.reporting.sequential import ALPHA, MIN_SEEDS, POWER
from mpvg.results.paper import METRICS
from mpvg.results.render import Entry, Table, latex_document, latex_escape, render_markdown
from mpvg.results.runs import metric_value

CLAIMS_FILE = Path(__file__).with_name("claims.yaml")
LEVEL = 1 - ALPHA  # the descriptive interval over every finite seed (the verdicts use each round's level)
HOLDS, NOT_RESOLVED, CONTRADICTED, FUTILE = "holds", "not resolved", "contradicted", "futile"
FLAGGED, DIVERGED, PENDING = "flagged", "diverged", "pending"
VERDICTS = (HOLDS, CONTRADICTED, FUTILE, NOT_RESOLVED, FLAGGED, DIVERGED, PENDING)
# MLflow metric value of a verdict (futile: not resolved, with the paper's size excluded; the
# others have no interval to code).
VERDICT_CODES = {HOLDS: 1.0, NOT_RESOLVED: 0.0, FUTILE: 0.0, CONTRADICTED: -1.0}
EXPECTS = ("greater", "similar")

_NUM = {"type": "number"}
_CLAIM_SCHEMA = {
    "type": "object", "additionalProperties": False,
    "required": ["id", "claim", "metric", "a", "b", "paper"],
    "properties": {
        "id": {"type": "string", "pattern": "^[a-z0-9][a-z0-9_-]*$"},
        "claim": {"type": "string", "minLength": 1}, "metric": {"enum": [m for m in METRICS if m != "params_m"]},
        "a": {"type": "string"}, "b": {"type": "string"}, "paper": {"type": ["number", "null"]},
        "expect": {"enum": list(EXPECTS)}, "margin": {"type": "number", "exclusiveMinimum": 0},
        "plan_size": {"type": "number", "exclusiveMinimum": 0},
    },
}
SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["priors", "groups"],
    "properties": {
        "priors": {"type": "array", "items": {
            "type": "object", "additionalProperties": False, "required": ["task", "metric", "reruns", "source"],
            "properties": {"task": {"type": "string"}, "metric": {"type": "string"},
                           "reruns": {"type": "array", "items": _NUM, "minItems": 2},
                           "source": {"type": "string"}}}},
        "groups": {"type": "array", "minItems": 1, "items": {
            "type": "object", "additionalProperties": False, "required": ["source", "says", "claims"],
            "properties": {"source": {"type": "string"}, "says": {"type": "string"},
                           "claims": {"type": "array", "minItems": 1, "items": _CLAIM_SCHEMA}}}},
    },
}


@dataclass(frozen=True)
class Claim:
    """One comparative claim: the paper says ``a > b`` (greater) or ``a`` about ``b`` (similar)."""

    id: str
    source: str                  # "Table 1", "Figure 5", "Control", ...
    claim: str
    metric: str
    a: str                       # cell ids
    b: str
    paper: Optional[float]       # the paper's a - b; None when it gives the ordering only
    expect: str = "greater"
    margin: Optional[float] = None
    plan_size: Optional[float] = None

    @property
    def size(self) -> Optional[float]:
        """The difference the seeds-needed column plans for: the margin (similar), the paper's
        difference, or ``plan_size`` where the paper gives none."""
        if self.expect == "similar":
            return self.margin
        return abs(self.paper) if self.paper is not None else self.plan_size


@dataclass(frozen=True)
class Prior:
    """A spread from the stated source's own reruns of one recipe (their sample sd)."""

    task: str
    metric: str
    reruns: tuple
    source: str

    @property
    def sd(self) -> float:
        return statistics.stdev(self.reruns)


@dataclass(frozen=True)
class ClaimSet:
    claims: list
    priors: dict                 # (task, metric) -> Prior
    says: dict                   # source -> what the paper says there


def load_claims(path: Path | str = CLAIMS_FILE) -> ClaimSet:
    """claims.yaml, validated: unknown keys, duplicate ids or inconsistent fields are errors."""
    import jsonschema
    import yaml

    path = Path(path)
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    errors = sorted(jsonschema.Draft202012Validator(SCHEMA).iter_errors(data), key=lambda e: list(e.absolute_path))
    if errors:
        err = max(errors, key=lambda e: len(e.absolute_path))
        where = ".".join(str(p) for p in err.absolute_path) or "<top>"
        raise ValueError(f"{path}: {where}: {err.message}")
    claims, seen = [], set()
    for group in data["groups"]:
        for raw in group["claims"]:
            c = Claim(source=group["source"], **raw)
            where = f"{path}: claim {c.id}"
            if c.id in seen:
                raise ValueError(f"{where}: id used twice")
            seen.add(c.id)
            if c.a == c.b:
                raise ValueError(f"{where}: a and b are the same cell {c.a!r}")
            if c.expect == "similar" and c.margin is None:
                raise ValueError(f"{where}: expect: similar needs a margin")
            if c.expect == "greater":
                if c.margin is not None:
                    raise ValueError(f"{where}: margin is for expect: similar only")
                if c.paper is not None and c.paper <= 0:
                    raise ValueError(f"{where}: expect: greater means the paper has a > b, but paper = {c.paper}; "
                                     "swap a and b")
                if c.paper is None and c.plan_size is None:
                    raise ValueError(f"{where}: paper is null: give plan_size, the difference to plan seeds for")
            claims.append(c)
    priors = {(p["task"], p["metric"]): Prior(p["task"], p["metric"], tuple(p["reruns"]), p["source"])
              for p in data["priors"]}
    return ClaimSet(claims, priors, {g["source"]: " ".join(g["says"].split()) for g in data["groups"]})


# --------------------------------------------------------------------------- verdicts

@dataclass(frozen=True)
class Verdict:
    """Ours for one claim: the seeds, the difference, the round reached and its verdict."""

    claim: Claim
    verdict: str
    reason: str                  # why pending / what the deciding round says
    n_a: int                     # finite seeds of each cell (the ones judged)
    n_b: int
    diff: Optional[float]        # mean(a) - mean(b) over every finite seed
    low: Optional[float]         # the descriptive 95 % Welch interval over every finite seed
    high: Optional[float]
    df: Optional[float]
    sd: Optional[float]          # the design's spread
    sd_kind: Optional[str]       # "prior" (the source's reruns) | "pooled" (every seed of the report) | None
    seeds_needed: Optional[int]  # seeds per cell at the design's last round
    label: str = ""              # the table's verdict text
    rounds: tuple = ()           # seeds per cell at each round of the design
    round: int = 0               # rounds judged (0: the first not reached)
    final: bool = False          # no further round: a stop or the last round
    round_level: Optional[float] = None   # the level of the deciding round's interval
    round_low: Optional[float] = None
    round_high: Optional[float] = None
    p: Optional[float] = None    # the sequential p-value (min over rounds of p_k * ALPHA / alpha_k)
    holm: Optional[str] = None   # the verdict after Holm within the claim's table
    diverged: tuple = (0, 0)     # finished seeds without a finite value, per cell
    stale: tuple = (0, 0)        # seeds kept out because made with other settings, per cell
    next_seeds: Optional[tuple] = None   # new seeds per cell the next round needs
    next_gpu_hours: Optional[float] = None

    @property
    def paper_in_interval(self) -> Optional[bool]:
        if self.low is None or self.claim.paper is None:
            return None
        return self.low <= self.claim.paper <= self.high

    @property
    def paper_excluded(self) -> Optional[bool]:
        """The 95 % interval excludes the paper's size (greater claims with a paper value)."""
        inside = self.paper_in_interval
        return None if inside is None or self.claim.expect != "greater" else not inside


def _finite(results: list[dict], metric: str) -> tuple[list[float], int]:
    """The finite values in seed order and how many finished seeds have none (diverged)."""
    vals = [metric_value(r, metric) for r in results]
    good = [v for v in vals if v is not None and math.isfinite(v)]
    return good, len(vals) - len(good)


def _task(cells: dict, cid: str) -> str:
    return cells[cid].task if cid in cells else cid.split("-")[0]


def pooled_spreads(cells: dict, results: dict, metrics) -> dict:
    """``{(task, metric): sd}`` pooled over every cell of the report with two finite seeds or more:
    ``sqrt(sum((n_i - 1) s_i^2) / sum(n_i - 1))``."""
    acc: dict = {}
    for cid, rs in results.items():
        for m in metrics:
            vals, _ = _finite(rs, m)
            if len(vals) >= 2:
                ss, dof = acc.get((_task(cells, cid), m), (0.0, 0))
                acc[(_task(cells, cid), m)] = (ss + statistics.variance(vals) * (len(vals) - 1), dof + len(vals) - 1)
    return {k: math.sqrt(ss / dof) for k, (ss, dof) in acc.items()}


def judge(claim: Claim, cells: dict, results: dict, priors: dict, scale: str = "?", *,
          stale: Optional[Mapping] = None, pooled: Optional[Mapping] = None,
          gpu_hours: Optional[Mapping] = None) -> Verdict:
    """The verdict on ``claim`` from the current runs (``results``: cell id -> result dicts),
    round by round (:mod:`mpvg.reporting.sequential`). ``stale``: cell -> seeds kept out;
    ``pooled``: :func:`pooled_spreads` (the design spread where no prior is sourced);
    ``gpu_hours``: cell -> GPU-hours of one seed (the cost model; prices the next round)."""
    from mpvg.reporting import sequential as S

    stale, pooled = stale or {}, pooled or {}
    a, div_a = _finite(results.get(claim.a, []), claim.metric)
    b, div_b = _finite(results.get(claim.b, []), claim.metric)
    n_stale = (len(stale.get(claim.a, ())), len(stale.get(claim.b, ())))
    diff = statistics.fmean(a) - statistics.fmean(b) if a and b else None
    low = high = df = None
    if len(a) >= 2 and len(b) >= 2:
        w = S.welch_interval(a, b, LEVEL)
        low, high, df = w["low"], w["high"], w["df"]
    key = (_task(cells, claim.a), claim.metric)
    if key in priors:
        sd, sd_kind = priors[key].sd, "prior"
    elif key in pooled:
        sd, sd_kind = pooled[key], "pooled"
    else:
        sd, sd_kind = None, None
    design = S.design(claim.size, sd, equivalence=claim.expect == "similar")
    rounds = design.rounds if design else ()
    base = dict(claim=claim, n_a=len(a), n_b=len(b), diff=diff, low=low, high=high, df=df, sd=sd,
                sd_kind=sd_kind, seeds_needed=design.n_max if design else None, rounds=rounds,
                diverged=(div_a, div_b), stale=n_stale)

    def priced(target: int) -> dict:
        new = (max(0, target - len(a)), max(0, target - len(b)))
        cost = None
        if gpu_hours is not None and claim.a in gpu_hours and claim.b in gpu_hours:
            cost = new[0] * gpu_hours[claim.a] + new[1] * gpu_hours[claim.b]
        return {"next_seeds": new, "next_gpu_hours": cost}

    missing = [c for c in (claim.a, claim.b) if c not in cells]
    if missing:
        return Verdict(verdict=PENDING, reason=f"{' and '.join(missing)} not in the grid at scale {scale}",
                       label="pending: not in grid", final=True, **base)
    empty = [c for c, vals, div in ((claim.a, a, div_a), (claim.b, b, div_b)) if not vals and not div]
    all_diverged = [c for c, vals, div in ((claim.a, a, div_a), (claim.b, b, div_b)) if not vals and div]
    first = rounds[0] if rounds else MIN_SEEDS
    if all_diverged:
        return Verdict(verdict=DIVERGED, label="diverged",
                       reason=f"every finished seed of {' and '.join(all_diverged)} has no finite {claim.metric}",
                       **base, **priced(first))
    if empty:
        stale_cells = [c for c, k in zip((claim.a, claim.b), n_stale) if c in empty and k]
        if stale_cells:
            return Verdict(verdict=PENDING, label="pending: stale",
                           reason=f"only stale runs (other settings) of {' and '.join(stale_cells)}",
                           **base, **priced(first))
        return Verdict(verdict=PENDING, label="pending: no run", reason="no finished run of " + " and ".join(empty),
                       **base, **priced(first))
    n = min(len(a), len(b))
    if design is None:
        why = ("no spread known for this metric yet (no prior; no cell with 2 seeds)" if sd is None else
               f"a difference of {claim.size:g} needs more than {S.MAX_SEEDS} seeds per cell at sd {sd:.2f}")
        if n < MIN_SEEDS:
            return Verdict(verdict=PENDING, label=f"pending: < {MIN_SEEDS} seeds", reason=why, **base,
                           **priced(MIN_SEEDS))
        return Verdict(verdict=NOT_RESOLVED, label="not resolved: no design", reason=why, final=sd is not None,
                       **base)
    if n < rounds[0]:
        return Verdict(verdict=PENDING, label=f"pending: < {rounds[0]} seeds",
                       reason=f"{len(a)} and {len(b)} finite seed(s): the first round needs {rounds[0]} per cell",
                       **base, **priced(rounds[0]))
    p_seq, verdict, reason, k, last = 1.0, NOT_RESOLVED, "", 0, None
    for k, (nk, alpha) in enumerate(zip(rounds, design.alphas), start=1):
        if nk > n:
            k -= 1
            break
        x, y = a[:nk], b[:nk]
        same = [c for c, v in ((claim.a, x), (claim.b, y)) if statistics.pvariance(v) == 0]
        if same:
            verdict, reason = FLAGGED, (f"identical {claim.metric} over the {nk} seeds of {' and '.join(same)}: "
                                        "seeding is likely broken (no spread is not certainty)")
            last = None
            break
        w = S.welch(x, y)
        if alpha > 0:   # a round that spends nothing (underflow at tiny fractions) can reject nothing
            p_seq = min(p_seq, S.p_value(w["diff"], w["se"], w["df"], claim.expect, claim.margin) * ALPHA / alpha)
        out = int(S.decide(w["diff"], w["se"], w["df"], alpha, claim.size, claim.expect, claim.margin,
                           last=k == len(rounds)))
        half = float(S._t().ppf(1 - alpha / 2, w["df"])) * w["se"] if w["se"] else 0.0
        last = (1 - alpha, *((w["diff"] - half, w["diff"] + half) if math.isfinite(half) else (None, None)))
        if out:
            verdict = {1: HOLDS, -1: CONTRADICTED, 2: FUTILE}[out]
            m = claim.margin
            reason = {HOLDS: "interval above 0" if claim.expect == "greater" else f"interval inside +-{m:g}",
                      CONTRADICTED: "interval below 0" if claim.expect == "greater" else f"interval outside +-{m:g}",
                      FUTILE: f"the paper's size {claim.size:g} is excluded: stopped for futility"}[verdict]
            reason += f" at round {k} ({nk} seeds per cell)"
            break
    final = verdict != NOT_RESOLVED or k == len(rounds)
    if verdict == NOT_RESOLVED:
        reason = (f"the last round ({rounds[-1]} seeds per cell) leaves it open" if final else
                  f"round {k} of {len(rounds)}: open; round {k + 1} at {rounds[k]} seeds per cell")
    label = verdict
    if verdict == FLAGGED:
        label = "flagged: identical seeds"
    elif div_a or div_b:
        label += f" ({div_a + div_b} diverged)"
    return Verdict(verdict=verdict, reason=reason, label=label, round=k, final=final,
                   round_level=last[0] if last else None, round_low=last[1] if last else None,
                   round_high=last[2] if last else None, p=None if verdict == FLAGGED else min(1.0, p_seq),
                   **base, **({} if final else priced(rounds[k])))


def with_holm(verdicts: list[Verdict]) -> list[Verdict]:
    """Each verdict with Holm's adjustment within its table (the claims of one ``source``) at
    ``ALPHA``: a holds or contradicted that Holm does not keep reads ``not resolved``."""
    from dataclasses import replace

    from mpvg.reporting.sequential import holm

    out = list(verdicts)
    for source in dict.fromkeys(v.claim.source for v in verdicts):
        idx = [i for i, v in enumerate(verdicts) if v.claim.source == source]
        kept = holm([verdicts[i].p for i in idx])
        for i, keep in zip(idx, kept):
            v = verdicts[i]
            adj = None if keep is None else (v.verdict if keep or v.verdict not in (HOLDS, CONTRADICTED)
                                              else NOT_RESOLVED)
            out[i] = replace(v, holm=adj)
    return out


def judge_all(claim_set: ClaimSet, cells: dict, results: dict, scale: str = "?", *,
              stale: Optional[Mapping] = None, gpu_hours: Optional[Mapping] = None) -> list[Verdict]:
    pooled = pooled_spreads(cells, results, {c.metric for c in claim_set.claims})
    return with_holm([judge(c, cells, results, claim_set.priors, scale, stale=stale, pooled=pooled,
                            gpu_hours=gpu_hours) for c in claim_set.claims])


def claims_metrics(verdicts: list[Verdict]) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """The verdicts as MLflow metrics (the report's run logs them): the counts
    ``claims_n_<verdict>`` for the report's run, and per claim id the values of its nested run,
    ``{paper, diff, ci_low, ci_high, verdict, holm, round, seeds_needed, p, n_a, n_b}`` where
    defined (verdict and holm: holds 1, not resolved and futile 0, contradicted -1)."""
    per_claim: dict[str, dict[str, float]] = {}
    for v in verdicts:
        values = {"paper": v.claim.paper, "diff": v.diff, "ci_low": v.low, "ci_high": v.high,
                  "verdict": VERDICT_CODES.get(v.verdict), "holm": VERDICT_CODES.get(v.holm),
                  "round": v.round if v.rounds else None, "seeds_needed": v.seeds_needed, "p": v.p,
                  "n_a": v.n_a, "n_b": v.n_b}
        defined = {name: float(x) for name, x in values.items() if x is not None}
        if defined:
            per_claim[v.claim.id] = defined
    counts = {f"claims_n_{verdict.replace(' ', '_')}": float(sum(v.verdict == verdict for v in verdicts))
              for verdict in VERDICTS}
    return counts, per_claim


# --------------------------------------------------------------------------- the page

def _fmt(x: Optional[float], plus: bool = False) -> str:
    if x is None:
        return "—"
    s = f"{x:.2f}"
    if s in ("-0.00", "0.00"):
        s = "0.00"
    return ("+" + s) if plus and not s.startswith("-") else s


def scale_caveat(scale: str, intervals: bool = True) -> str:
    """What the verdicts mean at this scale (the first sentence a reader needs); ``intervals``:
    whether any claim reached its first round."""
    if scale == "paper":
        return "Scale: paper (the paper's datasets, models and schedules): the verdicts test the paper's claims."
    if scale == "budget":
        return ("Scale: budget (ImageNet-100 of HobbitLong/CMC instead of ImageNet-1K, 100 instead of 300 "
                "epochs, one GPU per job; CIFAR-100 cells with their full recipes; no DeiT-S/B, Swin-Ti, CeiT-Ti, "
                "Tables 3-4): a verdict tests the claim at this smaller scale, not the paper's numbers themselves.")
    few = "" if intervals else f" and with fewer than {MIN_SEEDS} seeds per cell every verdict is pending"
    return (f"Scale: {scale}. The verdicts are not meaningful here: shrunk models trained for a few epochs on "
            f"generated digits say nothing about the paper{few}. The page shows that the pipeline computes "
            "them; run the budget or paper scale with several seeds (--set scale=budget --set seeds=[0,1,2]) "
            "for verdicts.")


COLUMNS = ["Claim", "Metric", "Paper Δ", "Ours Δ", f"{LEVEL:.0%} CI", "Excl. paper Δ", "Seeds a/b", "Round",
           "Verdict", "Holm", "Next round"]


def _seeds_text(v: Verdict) -> str:
    text = f"{v.n_a}/{v.n_b}"
    extra = []
    if any(v.diverged):
        extra.append(f"{v.diverged[0]}/{v.diverged[1]} div.")
    if any(v.stale):
        extra.append(f"{v.stale[0]}/{v.stale[1]} stale")
    return text + (f" ({', '.join(extra)})" if extra else "")


def _round_text(v: Verdict) -> str:
    if not v.rounds:
        return "—"
    return f"{v.round} of {len(v.rounds)} (N={v.seeds_needed}, {v.sd_kind} sd {v.sd:.2f})"


def _next_text(v: Verdict) -> str:
    if v.verdict == FLAGGED:
        return "fix the seeding first"
    if v.final:
        return "done"
    if v.next_seeds is None:
        return "—"
    seeds = f"+{v.next_seeds[0]}/+{v.next_seeds[1]} seeds"
    return seeds + (f", {v.next_gpu_hours:.1f} GPU-h" if v.next_gpu_hours is not None else ", cost unknown")


def summary_line(verdicts: list[Verdict], gpu_hours_spent: Optional[float]) -> str:
    counts = ", ".join(f"{sum(v.verdict == k for v in verdicts)} {k}" for k in VERDICTS)
    resolved = sum(v.verdict in (HOLDS, CONTRADICTED) for v in verdicts)
    adjusted = sum(v.holm in (HOLDS, CONTRADICTED) for v in verdicts)
    if gpu_hours_spent:
        bought = (f"{resolved} resolved (holds or contradicted) for {gpu_hours_spent:.1f} GPU-h of the reported "
                  f"runs: {resolved / gpu_hours_spent:.3f} claims per GPU-hour")
    else:
        bought = f"{resolved} resolved (holds or contradicted); the runs report no GPU-hours (CPU runs, or none reported), so none per GPU-hour"
    return f"{len(verdicts)} claims: {counts}. {bought}; {adjusted} still resolved after Holm within each table."


def method_text(verdicts: list[Verdict], params: dict, gpu_hours_spent: Optional[float] = None,
                stale: Optional[Mapping] = None) -> list[str]:
    """The page's opening: the scale caveat, the counts, the seeds kept out, each column."""
    stale = stale or {}
    n_stale = sum(len(s) for s in stale.values())
    lines = [
        scale_caveat(params.get("scale", "?"), any(v.round for v in verdicts)),
        summary_line(verdicts, gpu_hours_spent),
        (f"Kept out: {n_stale} stale seed(s) of {len(stale)} cell(s) (result made with other settings than the "
         "current params; rerun them with snakemake), counted per claim under Seeds a/b." if n_stale else
         "Kept out: no stale seed (every result follows from the current params)."),
        "Diverged seeds (a finished run with no finite value of the metric) are outcomes, not missing runs: "
        "counted under Seeds a/b; the rounds judge the finite ones; a cell whose seeds all diverged reads diverged.",
        "Paper Δ: the paper's a minus b ('order only': the paper gives the ordering, not the values; (+-m): a "
        "claim that a and b are about equal, within m). Ours Δ: mean over finite seeds of a minus that of b.",
        f"{LEVEL:.0%} CI: Welch's t interval over every finite seed (descriptive; unequal variances, "
        "Welch-Satterthwaite df). Excl. paper Δ: whether it excludes the paper's difference (yes: ours differs "
        "from the paper's size, whatever the verdict).",
        f"Round k of K (N, sd): the claim's group-sequential design: K rounds at {MIN_SEEDS} to N seeds per cell, "
        f"N chosen for {POWER:.0%} power at the paper's size at the design spread (prior: the source's reruns; "
        "pooled: every seed of this report for the metric); each round spends part of the 5 % (Lan-DeMets "
        "O'Brien-Fleming) and judges its first n_k seeds, so rebuilding the report never adds a look.",
        "Verdict: holds / contradicted (the round's interval on the paper's / the other side of 0; about-equal "
        "claims: inside / wholly outside +-m), futile (stopped: the paper's size is excluded), not resolved, "
        "flagged (identical seeds in a cell: broken seeding, never holds), diverged, pending. Holm: the verdict "
        "after Holm's correction within the table (family-wise 5 % per table).",
        "Next round: the seeds per cell to add for the next round and their GPU-hours (cost model: mpvg "
        "workflow cost); done: the design has stopped. `mpvg workflow next --budget H` plans the round that "
        "resolves the most claims per GPU-hour.",
        "Method and sources: docs/claims.md; every number and the full reasons: claims.json.",
    ]
    return lines


def build_claims_tables(verdicts: list[Verdict], claim_set: ClaimSet, params: dict) -> list[Table]:
    """One table per place of the paper (Table 1, ..., Control), one row per claim."""
    groups: dict[str, list[Verdict]] = {}
    for v in verdicts:
        groups.setdefault(v.claim.source, []).append(v)
    tables = []
    for source, vs in groups.items():
        t = Table(f"claims-{re.sub(r'[^a-z0-9]+', '', source.lower())}", f"Claims: {source}", "", list(COLUMNS),
                  "llrrrlllllr")
        for v in vs:
            c = v.claim
            ci = f"[{_fmt(v.low)}, {_fmt(v.high)}]" if v.low is not None else "—"
            paper = _fmt(c.paper, plus=True) if c.paper is not None else "order only"
            if c.expect == "similar":
                paper += f" (+-{c.margin:g})"
            excl = {True: "yes", False: "no", None: "—"}[v.paper_excluded]
            t.add_row([c.claim, c.metric, paper, _fmt(v.diff, plus=True), ci, excl, _seeds_text(v), _round_text(v),
                       Entry(v.label, v.verdict in (HOLDS, CONTRADICTED)), v.holm or "—", _next_text(v)])
        t.caption = f"The paper: {claim_set.says.get(source, '')}"
        t.notes = [f"{v.claim.id}: a = {v.claim.a}, b = {v.claim.b}; {v.reason}" for v in vs]
        tables.append(t)
    return tables


def _preface(verdicts, claim_set, params, gpu_hours_spent=None, stale=None) -> list[str]:
    return method_text(verdicts, params, gpu_hours_spent, stale) + [
        f"Prior spread for one seed, {p.task} {p.metric}: sd {p.sd:.2f} (sample sd of the reruns "
        f"{', '.join(f'{x:g}' for x in p.reruns)}); {' '.join(p.source.split())}" for p in claim_set.priors.values()]


def render_claims_markdown(tables, verdicts, claim_set, params, gpu_hours_spent=None, stale=None) -> str:
    """reports/claims.md: what the verdicts mean here, how they are computed, then the tables."""
    lines = ["# Verdicts on the paper's claims", "",
             "Generated by `mpvg report` from `runs/**/result.json` and `src/mpvg/reporting/claims.yaml`; "
             "do not edit by hand.", ""]
    lines += [f"- {text}" for text in _preface(verdicts, claim_set, params, gpu_hours_spent, stale)]
    return "\n".join(lines) + "\n\n" + "\n".join(render_markdown(t) for t in tables)


def render_claims_latex(tables, verdicts, claim_set, params, gpu_hours_spent=None, stale=None) -> str:
    """claims.tex: a standalone document, the same preface as paragraphs, then one float per table."""
    preface = "\\section*{Verdicts on the paper's claims}\n" + "".join(
        latex_escape(text) + "\n\n" for text in _preface(verdicts, claim_set, params, gpu_hours_spent, stale)
    ) + "\\clearpage\n"
    return latex_document(tables).replace("\\begin{document}\n", "\\begin{document}\n" + preface, 1)


def verdicts_json(verdicts: list[Verdict], params: dict, gpu_hours_spent: Optional[float] = None,
                  stale: Optional[Mapping] = None) -> dict:
    """claims.json: every verdict with its numbers (the machine-readable twin of claims.md)."""
    rows = []
    for v in verdicts:
        c = v.claim
        rows.append({"id": c.id, "source": c.source, "claim": c.claim, "metric": c.metric, "a": c.a, "b": c.b,
                     "expect": c.expect, "margin": c.margin, "paper": c.paper, "verdict": v.verdict,
                     "label": v.label, "holm": v.holm, "reason": v.reason, "n_a": v.n_a, "n_b": v.n_b,
                     "diverged": list(v.diverged), "stale": list(v.stale), "diff": v.diff, "ci_low": v.low,
                     "ci_high": v.high, "df": v.df, "sd": v.sd, "sd_kind": v.sd_kind,
                     "seeds_needed": v.seeds_needed, "rounds": list(v.rounds), "round": v.round,
                     "final": v.final, "round_level": v.round_level, "round_ci_low": v.round_low,
                     "round_ci_high": v.round_high, "p_sequential": v.p,
                     "next_seeds": list(v.next_seeds) if v.next_seeds else None,
                     "next_gpu_hours": v.next_gpu_hours,
                     "paper_in_ci": v.paper_in_interval, "paper_excluded": v.paper_excluded})
    stale = stale or {}
    return {"scale": params.get("scale"), "level": LEVEL, "alpha": ALPHA, "power": POWER, "min_seeds": MIN_SEEDS,
            "gpu_hours_spent": gpu_hours_spent, "summary": summary_line(verdicts, gpu_hours_spent),
            "stale": {cid: sorted(s) for cid, s in sorted(stale.items())}, "claims": rows}


# The index's entry for the page (mpvg.reporting.report lists it with the tables).
INDEX_ENTRY = Table("claims", "Verdicts on the paper's claims (claims.md, claims.tex, claims.json)", "", [], "")


def write_claims(params: dict, cells: dict, results: dict, out_dir: Path | str,
                 path: Path | str = CLAIMS_FILE, *, stale: Optional[Mapping] = None,
                 gpu_hours: Optional[Mapping] = None) -> tuple[list[Path], tuple[dict, dict]]:
    """Write ``claims.md``, ``claims.tex`` (a standalone document) and ``claims.json`` under
    ``out_dir`` from these results (one scale's, current only); ``stale``: cell -> seeds kept out;
    ``gpu_hours``: cell -> planned GPU-hours of one seed (handed in by the caller: reporting does
    not import the workflow's cost model). Return the paths and :func:`claims_metrics`."""
    import json

    claim_set = load_claims(path)
    verdicts = judge_all(claim_set, cells, results, params.get("scale", "?"), stale=stale, gpu_hours=gpu_hours)
    spent_vals = [float(r["gpu_hours"]) for rs in results.values() for r in rs if r.get("gpu_hours") is not None]
    spent = math.fsum(spent_vals) if spent_vals else None
    tables = build_claims_tables(verdicts, claim_set, params)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"claims.md": render_claims_markdown(tables, verdicts, claim_set, params, spent, stale),
             "claims.tex": render_claims_latex(tables, verdicts, claim_set, params, spent, stale),
             "claims.json": json.dumps(verdicts_json(verdicts, params, spent, stale), indent=2, sort_keys=True,
                                       allow_nan=False) + "\n"}
    written = []
    for name, text in files.items():
        (out / name).write_text(text, encoding="utf-8")
        written.append(out / name)
    return written, claims_metrics(verdicts)
