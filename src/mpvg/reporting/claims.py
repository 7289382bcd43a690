"""Verdicts on the paper's claims: reports/claims.md and claims.tex, one row per claim.

The claims are data (claims.yaml beside this file): two cells of the grid, a metric, the
paper's difference. For each, the runs' result.json files give ours: the mean over seeds of
cell a minus that of cell b with a 95 % Welch confidence interval, a verdict and the seeds per
cell that would resolve a difference of the paper's size at the spread seen (or, with one seed,
a stated prior spread). The method and why it is used: docs/claims.md.

Verdicts (``expect: greater``, the paper says a > b): ``holds`` (the interval lies above 0),
``contradicted`` (below 0), ``not resolved`` (it contains 0), ``pending`` (a cell is not in the
grid at this scale, has no finished run, or fewer than two seeds). ``expect: similar`` (a about
equal to b within ``margin``): ``holds`` when the interval lies inside ``[-margin, margin]``,
``contradicted`` when it lies wholly outside, ``not resolved`` otherwise.
"""
from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from mpvg.reporting.paper import METRICS
from mpvg.reporting.render import Entry, Table, latex_document, latex_escape, render_markdown
from mpvg.reporting.results import metric_value

CLAIMS_FILE = Path(__file__).with_name("claims.yaml")
LEVEL = 0.95     # two-sided confidence level of the intervals
POWER = 0.80     # probability the planned seeds resolve a true difference of the planned size
HOLDS, NOT_RESOLVED, CONTRADICTED, PENDING = "holds", "not resolved", "contradicted", "pending"
VERDICTS = (HOLDS, NOT_RESOLVED, CONTRADICTED, PENDING)
# MLflow metric value of a verdict (pending has none: no interval exists).
VERDICT_CODES = {HOLDS: 1.0, NOT_RESOLVED: 0.0, CONTRADICTED: -1.0}
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
            "type": "object", "additionalProperties": False, "required": ["task", "metric", "sd", "source"],
            "properties": {"task": {"type": "string"}, "metric": {"type": "string"},
                           "sd": {"type": "number", "exclusiveMinimum": 0}, "source": {"type": "string"}}}},
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
    task: str
    metric: str
    sd: float
    source: str


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
    priors = {(p["task"], p["metric"]): Prior(**p) for p in data["priors"]}
    return ClaimSet(claims, priors, {g["source"]: " ".join(g["says"].split()) for g in data["groups"]})


# --------------------------------------------------------------------------- verdicts

@dataclass(frozen=True)
class Verdict:
    """Ours for one claim: the seeds' values, the difference, its interval and the verdict."""

    claim: Claim
    verdict: str
    reason: str                  # why pending / what the interval says
    n_a: int
    n_b: int
    diff: Optional[float]        # mean(a) - mean(b) (one seed each: the plain difference)
    low: Optional[float]         # the Welch interval (None without two seeds on each side)
    high: Optional[float]
    df: Optional[float]
    sd: Optional[float]          # the spread the plan uses
    sd_kind: Optional[str]       # "observed" | "prior" | None
    seeds_needed: Optional[int]
    label: str = ""              # the table's verdict text: the verdict, or why it is pending

    @property
    def paper_in_interval(self) -> Optional[bool]:
        if self.low is None or self.claim.paper is None:
            return None
        return self.low <= self.claim.paper <= self.high


def _values(results: list[dict], metric: str) -> list[float]:
    vals = [metric_value(r, metric) for r in results]
    return [v for v in vals if v is not None and math.isfinite(v)]


def _task(cells: dict, cid: str) -> str:
    return cells[cid].task if cid in cells else cid.split("-")[0]


def judge(claim: Claim, cells: dict, results: dict, priors: dict, scale: str = "?") -> Verdict:
    """The verdict on ``claim`` from the finished runs (``results``: cell id -> result dicts)."""
    from mpvg.analysis.stats import seeds_needed, welch_interval

    a = _values(results.get(claim.a, []), claim.metric)
    b = _values(results.get(claim.b, []), claim.metric)
    diff = statistics.fmean(a) - statistics.fmean(b) if a and b else None
    low = high = df = None
    if len(a) >= 2 and len(b) >= 2:
        sd = math.sqrt((statistics.variance(a) + statistics.variance(b)) / 2)
        sd_kind = "observed"
    else:
        prior = priors.get((_task(cells, claim.a), claim.metric))
        sd, sd_kind = (prior.sd, "prior") if prior is not None else (None, None)
    need = None
    if sd is not None and claim.size is not None:
        need = seeds_needed(claim.size, sd, LEVEL, POWER, equivalence=claim.expect == "similar")

    missing = [c for c in (claim.a, claim.b) if c not in cells]
    if missing:
        verdict, reason, label = PENDING, f"{' and '.join(missing)} not in the grid at scale {scale}", "pending: not in grid"
    elif not a or not b:
        verdict, label = PENDING, "pending: no run"
        reason = "no finished run of " + " and ".join(c for c, v in ((claim.a, a), (claim.b, b)) if not v)
    elif len(a) < 2 or len(b) < 2:
        verdict, label = PENDING, "pending: < 2 seeds"
        reason = f"{len(a)} and {len(b)} seed(s): an interval needs 2 or more on each side"
    else:
        w = welch_interval(a, b, LEVEL)
        low, high, df = w["low"], w["high"], w["df"]
        if claim.expect == "greater":
            verdict = HOLDS if low > 0 else CONTRADICTED if high < 0 else NOT_RESOLVED
            reason = {HOLDS: "interval above 0", CONTRADICTED: "interval below 0",
                      NOT_RESOLVED: "interval contains 0"}[verdict]
        else:
            m = claim.margin
            verdict = HOLDS if -m <= low and high <= m else CONTRADICTED if low > m or high < -m else NOT_RESOLVED
            reason = {HOLDS: f"interval inside +-{m:g}", CONTRADICTED: f"interval outside +-{m:g}",
                      NOT_RESOLVED: f"interval crosses +-{m:g}"}[verdict]
    return Verdict(claim, verdict, reason, len(a), len(b), diff, low, high, df, sd, sd_kind, need,
                   label if verdict == PENDING else verdict)


def judge_all(claim_set: ClaimSet, cells: dict, results: dict, scale: str = "?") -> list[Verdict]:
    return [judge(c, cells, results, claim_set.priors, scale) for c in claim_set.claims]


def claims_metrics(verdicts: list[Verdict]) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """The verdicts as MLflow metrics (the report's run logs them): the counts
    ``claims_n_<verdict>`` for the report's run, and per claim id the values of its nested run,
    ``{paper, diff, ci_low, ci_high, verdict, seeds_needed, n_a, n_b}`` where defined (verdict:
    holds 1, not resolved 0, contradicted -1; a pending claim has none)."""
    per_claim: dict[str, dict[str, float]] = {}
    for v in verdicts:
        values = {"paper": v.claim.paper, "diff": v.diff, "ci_low": v.low, "ci_high": v.high,
                  "verdict": VERDICT_CODES.get(v.verdict), "seeds_needed": v.seeds_needed,
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
    whether any claim has two seeds or more on both sides."""
    if scale == "paper":
        return "Scale: paper (the paper's datasets, models and schedules): the verdicts test the paper's claims."
    if scale == "budget":
        return ("Scale: budget (ImageNet-100 of HobbitLong/CMC instead of ImageNet-1K, 100 instead of 300 "
                "epochs, one GPU per job; CIFAR-100 cells with their full recipes; no DeiT-S/B, Swin-Ti, CeiT-Ti, "
                "Tables 3-4): a verdict tests the claim at this smaller scale, not the paper's numbers themselves.")
    few = "" if intervals else " and with fewer than 2 seeds per cell every verdict is pending"
    return (f"Scale: {scale}. The verdicts are not meaningful here: shrunk models trained for a few epochs on "
            f"generated digits say nothing about the paper{few}. The page shows that the pipeline computes "
            "them; run the budget or paper scale with several seeds (--set scale=budget --set seeds=[0,1,2]) "
            "for verdicts.")


COLUMNS = ["Claim", "Metric", "Paper Δ", "Ours Δ", f"{LEVEL:.0%} CI", "Seeds a/b", "Verdict", "Seeds needed"]


def method_text(verdicts: list[Verdict], params: dict) -> list[str]:
    """The page's opening: the scale caveat, the counts, and how each column is computed."""
    counts = ", ".join(f"{sum(v.verdict == k for v in verdicts)} {k}" for k in VERDICTS)
    return [
        scale_caveat(params.get("scale", "?"), any(v.low is not None for v in verdicts)),
        f"{len(verdicts)} claims: {counts}.",
        "Paper Δ: the paper's a minus b ('order only': the paper gives the ordering, not the values; (+-m): a "
        "claim that a and b are about equal, within m). Ours Δ: mean over seeds of a minus mean over seeds of b "
        "(one seed each: the plain difference).",
        f"CI: Welch's t interval at {LEVEL:.0%} (the seeds of the two cells are independent runs; unequal "
        "variances; Welch-Satterthwaite degrees of freedom).",
        "Verdict: holds (CI on the paper's side of 0), contradicted (CI on the other side), not resolved (CI "
        "contains 0), pending (a cell not in the grid at this scale, with no finished run, or with fewer than 2 "
        "seeds); an about-equal claim holds when the CI lies inside +-m and is contradicted when it lies wholly "
        "outside. No correction for the number of claims: about 1 in 20 differences that are truly 0 would still "
        "read holds or contradicted.",
        f"Seeds needed: seeds per cell for which the CI of a true difference of the paper's size excludes 0 with "
        f"{POWER:.0%} probability (about-equal claims: lies inside +-m when the truth is 0), at the observed spread "
        "(obs.: sd pooled over the two cells) or, with fewer than 2 seeds, a prior spread.",
        "Method and sources: docs/claims.md; every number and the full reasons: claims.json.",
    ]


def build_claims_tables(verdicts: list[Verdict], claim_set: ClaimSet, params: dict) -> list[Table]:
    """One table per place of the paper (Table 1, ..., Control), one row per claim; the first
    caption explains the columns (each table fits a page of claims.tex)."""
    groups: dict[str, list[Verdict]] = {}
    for v in verdicts:
        groups.setdefault(v.claim.source, []).append(v)
    tables = []
    for source, vs in groups.items():
        t = Table(f"claims-{re.sub(r'[^a-z0-9]+', '', source.lower())}", f"Claims: {source}", "", list(COLUMNS),
                  "llrrrrll")
        for v in vs:
            c = v.claim
            ci = f"[{_fmt(v.low)}, {_fmt(v.high)}]" if v.low is not None else "—"
            need = "—" if v.sd is None or c.size is None else (
                (f"{v.seeds_needed}" if v.seeds_needed is not None else "> 10000")
                + f" ({'obs.' if v.sd_kind == 'observed' else 'prior'} {v.sd:.2f})")
            paper = _fmt(c.paper, plus=True) if c.paper is not None else "order only"
            if c.expect == "similar":
                paper += f" (+-{c.margin:g})"
            t.add_row([c.claim, c.metric, paper, _fmt(v.diff, plus=True), ci, f"{v.n_a}/{v.n_b}",
                       Entry(v.label, v.verdict in (HOLDS, CONTRADICTED)), need])
        t.caption = f"The paper: {claim_set.says.get(source, '')}"
        t.notes = [f"{v.claim.id}: a = {v.claim.a}, b = {v.claim.b}" for v in vs]
        tables.append(t)
    return tables


def _preface(verdicts: list[Verdict], claim_set: ClaimSet, params: dict) -> list[str]:
    return method_text(verdicts, params) + [
        f"Prior spread for one seed, {p.task} {p.metric}: sd {p.sd:g}; {' '.join(p.source.split())}"
        for p in claim_set.priors.values()]


def render_claims_markdown(tables: list[Table], verdicts: list[Verdict], claim_set: ClaimSet, params: dict) -> str:
    """reports/claims.md: what the verdicts mean here, how they are computed, then the tables."""
    lines = ["# Verdicts on the paper's claims", "",
             "Generated by `mpvg report` from `runs/**/result.json` and `src/mpvg/reporting/claims.yaml`; "
             "do not edit by hand.", ""]
    lines += [f"- {text}" for text in _preface(verdicts, claim_set, params)]
    return "\n".join(lines) + "\n\n" + "\n".join(render_markdown(t) for t in tables)


def render_claims_latex(tables: list[Table], verdicts: list[Verdict], claim_set: ClaimSet, params: dict) -> str:
    """claims.tex: a standalone document, the same preface as paragraphs, then one float per table."""
    preface = "\\section*{Verdicts on the paper's claims}\n" + "".join(
        latex_escape(text) + "\n\n" for text in _preface(verdicts, claim_set, params)) + "\\clearpage\n"
    return latex_document(tables).replace("\\begin{document}\n", "\\begin{document}\n" + preface, 1)


def verdicts_json(verdicts: list[Verdict], params: dict) -> dict:
    """claims.json: every verdict with its numbers (the machine-readable twin of claims.md)."""
    rows = []
    for v in verdicts:
        c = v.claim
        rows.append({"id": c.id, "source": c.source, "claim": c.claim, "metric": c.metric, "a": c.a, "b": c.b,
                     "expect": c.expect, "margin": c.margin, "paper": c.paper, "verdict": v.verdict,
                     "reason": v.reason, "n_a": v.n_a, "n_b": v.n_b, "diff": v.diff, "ci_low": v.low,
                     "ci_high": v.high, "df": v.df, "sd": v.sd, "sd_kind": v.sd_kind,
                     "seeds_needed": v.seeds_needed, "paper_in_ci": v.paper_in_interval})
    return {"scale": params.get("scale"), "level": LEVEL, "power": POWER, "claims": rows}


# The index's entry for the page (mpvg.reporting.report lists it with the tables).
INDEX_ENTRY = Table("claims", "Verdicts on the paper's claims (claims.md, claims.tex, claims.json)", "", [], "")


def write_claims(params: dict, cells: dict, results: dict, out_dir: Path | str,
                 path: Path | str = CLAIMS_FILE) -> tuple[list[Path], tuple[dict, dict]]:
    """Write ``claims.md``, ``claims.tex`` (a standalone document) and ``claims.json`` under
    ``out_dir`` from these results (one scale's); return the paths and :func:`claims_metrics`."""
    import json

    claim_set = load_claims(path)
    verdicts = judge_all(claim_set, cells, results, params.get("scale", "?"))
    tables = build_claims_tables(verdicts, claim_set, params)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"claims.md": render_claims_markdown(tables, verdicts, claim_set, params),
             "claims.tex": render_claims_latex(tables, verdicts, claim_set, params),
             "claims.json": json.dumps(verdicts_json(verdicts, params), indent=2, sort_keys=True,
                                       allow_nan=False) + "\n"}
    written = []
    for name, text in files.items():
        (out / name).write_text(text, encoding="utf-8")
        written.append(out / name)
    return written, claims_metrics(verdicts)
