"""Verdicts on the paper's claims: Welch intervals, seed counts and the sequential design by hand,
a simulation of the design's error rates over every round, verdicts and their edges on
constructed result.json files with known answers, the claims file against its rule and the
paper's numbers, the pages (claims.md, .tex, .json) and the MLflow metrics (docs/claims.md)."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from mpvg.reporting import sequential as S
from mpvg.reporting.sequential import seeds_needed, welch_interval
from mpvg.config import TABLES, expand_cells, load_params
from mpvg.reporting import claims as C
from mpvg.results.paper import load_paper_numbers, match_cells
from mpvg.reporting.commands import report_inputs
from mpvg.reporting.report import build_reports
from test_reporting import check_latex_structure, parse_pipe_tables, write_result

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params.yaml"
T_975_DF4 = 2.7764451051977987    # t table: 97.5 % quantile, 4 degrees of freedom


@pytest.fixture(scope="module")
def params():
    return load_params(PARAMS, ["seeds=[0,1,2]"])


@pytest.fixture(scope="module")
def cells(params):
    return expand_cells(params)


# --------------------------------------------------------------------------- statistics by hand

def test_welch_interval_by_hand():
    # three seeds each, equal spread 0.1: se = sqrt(0.01/3 + 0.01/3), df = 4 exactly
    w = welch_interval([73.4, 73.5, 73.6], [73.0, 73.1, 73.2])
    se = math.sqrt(2 * 0.01 / 3)
    assert w["diff"] == pytest.approx(0.4, abs=1e-12) and w["se"] == pytest.approx(se, abs=1e-12)
    assert w["df"] == pytest.approx(4.0, abs=1e-12)
    assert w["low"] == pytest.approx(0.4 - T_975_DF4 * se, abs=1e-9)        # 0.17330
    assert w["high"] == pytest.approx(0.4 + T_975_DF4 * se, abs=1e-9)       # 0.62670
    assert (round(w["low"], 4), round(w["high"], 4)) == (0.1733, 0.6267)
    # unequal sizes and spreads: the Welch-Satterthwaite degrees of freedom, by hand
    w = welch_interval([1.0, 2.0, 3.0, 4.0], [0.0, 3.0])
    va, vb = (5 / 3) / 4, 4.5 / 2                                            # s^2 / n
    assert w["diff"] == pytest.approx(1.0) and w["se"] == pytest.approx(math.sqrt(va + vb))
    assert w["df"] == pytest.approx((va + vb) ** 2 / (va ** 2 / 3 + vb ** 2 / 1))  # 1.38879
    assert w["df"] == pytest.approx(1.388788, abs=1e-6)
    assert w["high"] - w["diff"] == pytest.approx(w["diff"] - w["low"])
    # no spread at all: the interval is the point
    w = welch_interval([2.0, 2.0], [1.5, 1.5, 1.5])
    assert (w["low"], w["high"], w["df"]) == (0.5, 0.5, None)
    with pytest.raises(ValueError, match="at least 2 values per side"):
        welch_interval([1.0], [1.0, 2.0])


def test_seeds_needed_by_hand():
    # sd 0.2, difference 0.34 (MPVG - PVG, DeiT-Ti): (t_.975 + t_.80) * 0.2 * sqrt(2/n) <= 0.34
    # n = 6, df 10: (2.2281 + 0.8791) * 0.2 * 0.5774 = 0.3588 > 0.34; n = 7, df 12: (2.1788 + 0.8726) * 0.2 * 0.5345 = 0.3262
    assert (2.2281 + 0.8791) * 0.2 * math.sqrt(2 / 6) > 0.34 > (2.1788 + 0.8726) * 0.2 * math.sqrt(2 / 7)
    assert seeds_needed(0.34, 0.2) == 7
    assert seeds_needed(-0.34, 0.2) == 7                                     # the size, not the sign
    # equivalence within 0.17: t_.90 instead of t_.80; n = 30, df 58: 0.1703 > 0.17; n = 31, df 60: 0.1675
    assert (2.0017 + 1.2963) * 0.2 * math.sqrt(2 / 30) > 0.17 > (2.0003 + 1.2958) * 0.2 * math.sqrt(2 / 31)
    assert seeds_needed(0.17, 0.2, equivalence=True) == 31
    assert seeds_needed(1.0, 0.0) == 2 and seeds_needed(0.0, 0.2) is None
    assert seeds_needed(0.001, 0.2, max_seeds=50) is None


# --------------------------------------------------------------------------- the sequential design

def _obf(t):
    from scipy.stats import norm

    return 2 - 2 * norm.cdf(norm.ppf(0.975) / math.sqrt(t))


def test_design_by_hand():
    # rounds: 3 seeds first, the last at N, evenly between (at most 3 rounds)
    assert S.rounds_for(3) == (3,) and S.rounds_for(4) == (3, 4) and S.rounds_for(5) == (3, 4, 5)
    assert S.rounds_for(33) == (3, 18, 33) and S.rounds_for(2) == (3,)
    # alpha spent per round: Lan-DeMets O'Brien-Fleming a(t) = 2 - 2 Phi(z_.975 / sqrt(t)), the rest at the end
    d = S.design_from_rounds((3, 18, 33))
    assert d.alphas[0] == pytest.approx(_obf(3 / 33)) and d.alphas[1] == pytest.approx(_obf(18 / 33) - _obf(3 / 33))
    assert sum(d.alphas) == pytest.approx(0.05, abs=1e-15)
    # N: the smallest n whose last round alone has power 0.80 + 0.025 per futility look, at df n - 1
    from scipy.stats import t

    def enough(n, sd, size):
        dd = S.design_from_rounds(S.rounds_for(n))
        q = 0.80 + 0.025 * (len(dd.rounds) - 1)
        return (t.ppf(1 - dd.alphas[-1] / 2, n - 1) + t.ppf(q, n - 1)) * sd * math.sqrt(2 / n) <= size

    for size, sd in ((0.34, 0.43), (1.37, 0.43), (0.34, 0.2)):
        n = S.design(size, sd).n_max
        assert enough(n, sd, size) and not any(enough(m, sd, size) for m in range(3, n)), (size, sd)
    assert S.design(0.34, 0.43).rounds == (3, 18, 33)
    sd = C.load_claims().priors[("in1k", "top1")].sd
    assert S.design(0.34, sd).rounds == (3, 18, 32) and S.seeds_needed(0.34, sd) == 26   # DeiT-Ti MPVG > PVG
    assert S.design(1.0, 0.0).rounds == (3,) and S.design(0.3, None) is None and S.design(1e-4, 1.0) is None
    # the design's spread: the sample sd of the source's reruns, 0.43 (not the 0.2 the source calls noise)
    assert C.load_claims().priors[("in1k", "top1")].sd == pytest.approx(0.4258, abs=1e-4)


@pytest.mark.parametrize("size, sd", [(0.34, 0.43), (1.37, 0.43), (0.2, 0.2)])
def test_sequential_error_rates_hold_over_every_round(size, sd):
    """20,000 simulated claims per case, every round looked at: at a true difference of 0 the share
    that ends holds or contradicted is at most 5 % (plus 3 Monte Carlo standard errors); at the
    paper's size at least 80 % end holds (minus 3 standard errors)."""
    k = 20_000
    mc = 3 * math.sqrt(0.05 * 0.95 / k)
    null = S.simulate(0.0, size, sd, k, rng_seed=1)
    assert null["holds"] + null["contradicted"] <= 0.05 + mc, null
    alt = S.simulate(size, size, sd, k, rng_seed=2)
    assert alt["holds"] >= 0.80 - 3 * math.sqrt(0.8 * 0.2 / k), alt
    assert alt["contradicted"] == 0.0 and null["futile"] > 0.5      # futility stops most true-0 claims early
    assert alt["mean_seeds"] <= alt["design"].n_max


def test_holm_by_hand():
    # m = 4: 0.001 <= 0.05/4, 0.012 <= 0.05/3, 0.03 > 0.05/2 stops the rest; None is not in the family
    assert S.holm([0.03, 0.001, None, 0.012, 0.04]) == [False, True, None, True, False]
    assert S.holm([0.02, 0.04]) == [True, True]                       # 0.02 <= 0.025, 0.04 <= 0.05


# --------------------------------------------------------------------------- verdicts

def _results(values: dict[str, list], metric="top1") -> dict:
    return {cid: [{"metrics": {metric: v} if v != "missing" else {}, "seed": i} for i, v in enumerate(vs)]
            for cid, vs in values.items()}


def _claim(a, b, paper=0.3, **kw):
    return C.Claim(id="x", source="Table 1", claim="a > b", metric="top1", a=a, b=b, paper=paper, **kw)


MPVG, PVG, LAPE, DEFAULT = "in1k-deit_ti-mpvg", "in1k-deit_ti-pvg", "in1k-deit_ti-lape", "in1k-deit_ti-default"


def test_verdicts_round_by_round(cells):
    priors = C.load_claims().priors
    res = _results({MPVG: [73.4, 73.5, 73.6], PVG: [73.0, 73.1, 73.2], DEFAULT: [72.0, 71.9, 72.1],
                    LAPE: [73.9, 74.0, 74.1]})
    se = math.sqrt(2 * 0.01 / 3)
    # paper 1.37 at sd 0.43: rounds (3, 4, 5); round 1 spends a(3/5) = 0.0114: diff 1.5 +- t_{1-0.0057, 4} se
    v = C.judge(_claim(MPVG, DEFAULT, 1.37), cells, res, priors)
    assert (v.verdict, v.round, v.rounds, v.final) == ("holds", 1, (3, 4, 5), True)
    from scipy.stats import t
    half = t.ppf(1 - _obf(3 / 5) / 2, 4) * se
    assert (v.round_low, v.round_high) == (pytest.approx(1.5 - half), pytest.approx(1.5 + half))
    assert v.round_level == pytest.approx(1 - _obf(3 / 5)) and v.next_seeds is None
    assert v.p == pytest.approx(2 * t.sf(1.5 / se, 4) * 0.05 / _obf(3 / 5))
    # the descriptive 95 % interval, by hand as before
    assert v.low == pytest.approx(1.5 - T_975_DF4 * se) and v.df == pytest.approx(4.0)
    assert v.paper_excluded is False                                 # 1.37 in [1.27, 1.73]
    # the same data against a paper size of 0.34: round 1 spends ~1e-10, open; round 2 at 18 seeds
    v = C.judge(_claim(MPVG, PVG, 0.34), cells, res, priors)
    assert (v.verdict, v.round, v.rounds[:2], v.final, v.next_seeds) == ("not resolved", 1, (3, 18), False, (15, 15))
    assert v.reason == "round 1 of 3: open; round 2 at 18 seeds per cell"
    # futility: +0.2, round 1 interval contains 0, the one-sided 97.5 % upper bound 0.61 < 1.37: stop
    wide = _results({MPVG: [73.4, 73.5, 73.6], PVG: [73.1, 73.3, 73.5]})
    v = C.judge(_claim(MPVG, PVG, 1.37), cells, wide, priors)
    w = welch_interval([73.4, 73.5, 73.6], [73.1, 73.3, 73.5])
    assert v.round_low < 0 < v.round_high and 0.2 + t.ppf(0.975, w["df"]) * w["se"] < 1.37
    assert (v.verdict, v.final, v.next_seeds) == ("futile", True, None)
    assert v.paper_excluded is True and "stopped for futility at round 1" in v.reason
    # contradicted: -0.5 at paper 1.37, round 1
    v = C.judge(_claim(MPVG, LAPE, 1.37), cells, res, priors)
    assert v.verdict == "contradicted" and v.round_high < 0
    # about-equal claims (no futility): inside the margin holds, wholly outside is contradicted
    sim = dict(expect="similar", paper=0.03)
    assert C.judge(_claim(MPVG, PVG, margin=1.5, **sim), cells, res, priors).verdict == "holds"
    far = _results({MPVG: [75.4, 75.5, 75.6], DEFAULT: [72.0, 71.9, 72.1]})         # +3.5, round 1 of (3, 5, 7)
    assert C.judge(_claim(MPVG, DEFAULT, margin=1.2, **sim), cells, far, priors).verdict == "contradicted"
    assert C.judge(_claim(MPVG, DEFAULT, margin=1.2, **sim), cells, res, priors).verdict == "not resolved"
    # the next round is priced with the cost model handed in
    v = C.judge(_claim(MPVG, PVG, 0.34), cells, res, priors, gpu_hours={MPVG: 1.5, PVG: 2.0})
    assert v.next_gpu_hours == pytest.approx(15 * 1.5 + 15 * 2.0)


def test_edges(cells):
    priors = C.load_claims().priors
    J = lambda res, a, b, paper=1.37, **kw: C.judge(_claim(a, b, paper), cells, res, priors, **kw)  # noqa: E731
    # fewer than 3 seeds: pending, never an interval from 2 (Welch's df ~1 there)
    v = J(_results({MPVG: [73.4, 73.5], PVG: [73.0, 73.1]}), MPVG, PVG)
    assert (v.verdict, v.label, v.next_seeds) == ("pending", "pending: < 3 seeds", (1, 1))
    # zero variance on both sides: flagged, not holds (a zero-width interval is broken seeding)
    v = J(_results({MPVG: [73.5, 73.5, 73.5], PVG: [73.0, 73.0, 73.0]}), MPVG, PVG)
    assert (v.verdict, v.label, v.p) == ("flagged", "flagged: identical seeds", None)
    assert v.reason.startswith(f"identical top1 over the 3 seeds of {MPVG} and {PVG}")
    # on one side only: flagged as well, naming that cell
    v = J(_results({MPVG: [75.0, 75.0, 75.0], PVG: [73.0, 73.1, 73.2]}), MPVG, PVG)
    assert v.verdict == "flagged" and f"seeds of {MPVG}:" in v.reason
    assert C._next_text(v) == "fix the seeding first" and v.final                # no planned round for it
    # diverged seeds (NaN, or no value) are counted and shown; the finite ones are judged
    v = J(_results({MPVG: [73.4, float("nan"), 73.5, 73.6], PVG: [73.1, 73.3, "missing", 73.5]}), MPVG, PVG)
    assert (v.verdict, v.label, v.diverged, v.n_a, v.n_b) == ("futile", "futile (2 diverged)", (1, 1), 3, 3)
    # every seed diverged: "diverged", not "no run"
    v = J(_results({MPVG: [float("nan"), float("inf")], PVG: [73.0, 73.1, 73.2]}), MPVG, PVG)
    assert (v.verdict, v.label, v.diverged) == ("diverged", "diverged", (2, 0))
    assert v.reason == f"every finished seed of {MPVG} has no finite top1"
    # stale seeds: counted; a cell with stale runs only is "pending: stale", not "no run"
    res = _results({MPVG: [73.4, 73.5, 73.6]})
    v = J(res, MPVG, PVG, stale={PVG: [0, 1, 2], MPVG: [3]})
    assert (v.verdict, v.label, v.stale) == ("pending", "pending: stale", (1, 3))
    assert v.reason == f"only stale runs (other settings) of {PVG}" and v.next_seeds == (0, 3)
    assert J(res, MPVG, PVG).label == "pending: no run"
    # not in the grid at this scale
    v = C.judge(_claim(MPVG, "in1k-deit_x-mpvg"), cells, res, priors, scale="tiny")
    assert (v.label, v.reason) == ("pending: not in grid", "in1k-deit_x-mpvg not in the grid at scale tiny")
    # no sourced prior (CIFAR-100): the spread pooled over every seed of the report plans the design
    res = _results({"c100-vit_lite-mpvg": [70.0, 70.2, 70.4], "c100-vit_lite-pvg": [69.0, 69.3, 69.6],
                    "c100-vit_lite-lape": [68.0]})
    pooled = C.pooled_spreads(cells, res, {"top1"})
    assert pooled[("c100", "top1")] == pytest.approx(math.sqrt((0.04 * 2 + 0.09 * 2) / 4))
    v = C.judge(_claim("c100-vit_lite-mpvg", "c100-vit_lite-pvg", 1.97), cells, res, priors, pooled=pooled)
    assert (v.sd_kind, v.sd, v.rounds) == ("pooled", pytest.approx(math.sqrt(0.065)),
                                           S.design(1.97, math.sqrt(0.065)).rounds)
    v = C.judge(_claim("c100-vit_lite-mpvg", "c100-vit_lite-lape", 1.35), cells, res, priors)
    assert (v.sd, v.label) == (None, "pending: < 3 seeds")


def test_holm_within_each_table(cells):
    """Claims with a one-round design (size 3.0 at sd 0.43: N = 3) that all hold raw. Holm within
    a table: two p-values of 0.0376 (both > 0.05/2) are both not resolved; a p < 0.025 beside a
    0.0376 keeps both (0.025, then 0.05). A pending claim has no p and is not in the family."""
    from scipy.stats import t

    def mk(i, model, src, b_method="default"):
        return C.Claim(id=f"h{i}", source=src, claim=f"h{i}", metric="top1", a=f"in1k-{model}-mpvg",
                       b=f"in1k-{model}-{b_method}", paper=3.0)

    claim_set = C.ClaimSet([mk(1, "deit_s", "Table 1"), mk(2, "deit_b", "Table 1"), mk(3, "deit_ti", "Table 2"),
                            mk(4, "swin_ti", "Table 2"), mk(5, "deit_ti", "Table 2", "lape")], C.load_claims().priors, {})
    weak = ([74.1, 74.5, 74.9], [73.1, 73.5, 73.9])
    res = _results({"in1k-deit_s-mpvg": weak[0], "in1k-deit_s-default": weak[1], "in1k-deit_b-mpvg": weak[0],
                    "in1k-deit_b-default": weak[1], "in1k-swin_ti-mpvg": weak[0], "in1k-swin_ti-default": weak[1],
                    MPVG: [73.4, 73.5, 73.6], DEFAULT: [72.0, 71.9, 72.1]})
    v1, v2, v3, v4, v5 = C.judge_all(claim_set, cells, res, "tiny")
    assert v1.rounds == v3.rounds == (3,)
    p_weak = 2 * t.sf(1.0 / math.sqrt(2 * 0.16 / 3), 4)               # 0.0376
    assert v1.p == pytest.approx(p_weak) and 0.025 < p_weak <= 0.05 and v3.p < 0.025
    assert [v.verdict for v in (v1, v2, v3, v4)] == ["holds"] * 4
    assert (v1.holm, v2.holm) == ("not resolved", "not resolved")
    assert (v3.holm, v4.holm) == ("holds", "holds")
    assert (v5.verdict, v5.holm) == ("pending", None)


def test_claims_metrics_counts_and_per_claim_values(cells):
    claim_set = C.load_claims()
    res = _results({MPVG: [73.4, 73.5, 73.6], DEFAULT: [72.0, 71.9, 72.1]})
    verdicts = C.judge_all(claim_set, cells, res, "tiny")
    counts, per_claim = C.claims_metrics(verdicts)
    m = per_claim["t1-deit_ti-mpvg-vs-default"]
    assert m["verdict"] == 1.0 and m["holm"] == 1.0 and m["paper"] == 1.37 and m["diff"] == pytest.approx(1.5)
    assert (m["n_a"], m["n_b"], m["round"], m["seeds_needed"]) == (3.0, 3.0, 1.0, 5.0)
    assert "verdict" not in per_claim["t1-deit_ti-mpvg-vs-lape"]           # pending: no verdict value
    assert counts["claims_n_holds"] == 1.0 and counts["claims_n_pending"] == len(verdicts) - 1
    assert counts["claims_n_not_resolved"] == counts["claims_n_contradicted"] == 0.0
    values = [*counts.values(), *(v for claim in per_claim.values() for v in claim.values())]
    assert all(isinstance(v, float) and math.isfinite(v) for v in values)


# --------------------------------------------------------------------------- the claims file

def _paper_values():
    """{(table, cell, metric): value} of paper_numbers.csv matched to the paper-scale grid."""
    paper = load_params(PARAMS, ["scale=paper"])
    cells = expand_cells(paper)
    rows = load_paper_numbers()
    match = match_cells(rows, cells, paper)
    return cells, rows, match


def test_the_claims_are_the_rule_applied_to_every_table():
    """docs/claims.md, "What a claim is": the text's comparisons, one row per pair of cells and
    metric. Tables 1-4 ("MPVG ... achieves the best performance among all methods"): MPVG > every
    other method of every model and metric; Table 5: pos_0 > every other source, every source >
    PVG; Table 6: MPVG > every other row, plus hierarchical = non-hierarchical. Rebuilt here from
    paper_numbers.csv and compared with claims.yaml, pair for pair."""
    claim_set = C.load_claims()
    cells, rows, match = _paper_values()
    listed = {}
    for c in claim_set.claims:
        listed.setdefault(c.source, set()).add((c.a, c.b, c.metric, c.expect))
    expected: dict[str, set] = {}
    for t, source in (("T1", "Table 1"), ("T2", "Table 2"), ("T3", "Table 3"), ("T4", "Table 4")):
        table_rows = [r for r in rows if r.table == t]
        for r in table_rows:
            if r.method != "MPVG" or r.overrides:
                continue
            for other in table_rows:
                if other.model == r.model and other.method != "MPVG":
                    for metric in set(r.values) & set(other.values) - {"params_m"}:
                        expected.setdefault(source, set()).add((match[r.key], match[other.key], metric, "greater"))
    t5 = [r for r in rows if r.table == "T5"]
    pos0 = next(match[r.key] for r in t5 if not r.overrides)
    pvg = next(match[r.key] for r in rows if r.table == "T1" and r.model == "DeiT-Ti" and r.method == "PVG")
    expected["Table 5"] = ({(pos0, match[r.key], "top1", "greater") for r in t5 if r.overrides}
                           | {(match[r.key], pvg, "top1", "greater") for r in t5 if r.overrides})
    t6 = [r for r in rows if r.table == "T6"]
    mpvg = next(match[r.key] for r in t6 if not r.overrides)
    nonhier = next(match[r.key] for r in t6 if r.overrides == {"hierarchical": False})
    expected["Table 6"] = {(mpvg, match[r.key], "top1", "greater") for r in t6 if r.overrides} | {
        (mpvg, nonhier, "top1", "similar")}
    for source, pairs in expected.items():
        assert listed[source] == pairs, source
    assert sum(len(p) for p in expected.values()) == 18 + 6 + 6 + 3 + 6 + 4
    # a pair stated twice is one row: no (a, b, metric, expect) twice in the whole file
    every = [(c.a, c.b, c.metric, c.expect) for c in claim_set.claims]
    assert len(every) == len(set(every)) == 50
    # orderings of a table that the text does not state are not claims (the examples)
    ids = {c.id for c in claim_set.claims}
    assert not ids & {"t1-deit_ti-pvg-vs-lape", "t3-bbox_ap-lape-vs-pvg", "t4-miou-pvg-vs-default"}
    assert {c.source for c in claim_set.claims} == {"Table 1", "Table 2", "Table 3", "Table 4", "Table 5", "Table 6",
                                                    "Figure 1", "Figure 5", "Control"}
    # the Table 3 caption: text and table agree on +0.6 box AP over Default
    says = claim_set.says["Table 3"]
    assert "the table agrees on box AP over Default (46.5 - 45.9 = +0.6)" in says and "disagree" not in says


def test_claims_file_matches_the_paper_numbers():
    claim_set = C.load_claims()
    cells, rows, match = _paper_values()
    assert {t for c in claim_set.claims for cid in (c.a, c.b) for t in cells[cid].tables} == set(TABLES)
    value = {(match[r.key], m): v for r in rows for m, v in r.values.items() if match[r.key] and v is not None}
    for c in claim_set.claims:
        assert c.a in cells and c.b in cells, c.id
        va, vb = value.get((c.a, c.metric)), value.get((c.b, c.metric))
        if va is None or vb is None:
            assert c.paper is None, f"{c.id}: the paper gives no value for both cells"
        else:
            assert c.paper == pytest.approx(round(va - vb, 2), abs=1e-9), c.id
    prior = claim_set.priors[("in1k", "top1")]
    assert prior.reruns == (72.2, 71.95, 72.78) and round(prior.sd, 2) == 0.43
    assert "facebookresearch/deit/issues/32" in prior.source


@pytest.mark.parametrize("edit, needle", [
    (lambda d: d["groups"][0]["claims"][0].update(cells="x"), "Additional properties are not allowed ('cells'"),
    (lambda d: d["groups"][0]["claims"][0].update(paper=-0.3), "swap a and b"),
    (lambda d: d["groups"][0]["claims"][0].update(expect="similar"), "needs a margin"),
    (lambda d: d["groups"][0]["claims"][0].update(paper=None), "give plan_size"),
    (lambda d: d["groups"][0]["claims"][1].update(id=d["groups"][0]["claims"][0]["id"]), "id used twice"),
    (lambda d: d["groups"][0]["claims"][0].update(metric="top2"), "'top2' is not one of"),
    (lambda d: d["groups"][0]["claims"][0].update(b=d["groups"][0]["claims"][0]["a"]), "are the same cell"),
])
def test_bad_claims_file_is_named(tmp_path, edit, needle):
    data = yaml.safe_load(C.CLAIMS_FILE.read_text())
    edit(data)
    path = tmp_path / "claims.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError, match=None) as err:
        C.load_claims(path)
    assert needle in str(err.value) and str(path) in str(err.value)


# --------------------------------------------------------------------------- the pages

def test_report_writes_the_claims_pages(tmp_path, params, cells):
    runs = tmp_path / "runs"
    for seed, (a, b, d) in enumerate(zip([73.4, 73.5, 73.6], [73.0, 73.1, 73.2], [72.0, 71.9, 72.1])):
        write_result(runs, "in1k-deit_ti-mpvg", seed, {"top1": a}, params=params, gpu_hours=0.5)
        write_result(runs, "in1k-deit_ti-pvg", seed, {"top1": b}, params=params, gpu_hours=0.5)
        write_result(runs, "in1k-deit_ti-default", seed, {"top1": d}, params=params, gpu_hours=0.5)
    write_result(runs, "in1k-deit_ti-lape", 0, {"top1": float("nan")}, params=params, gpu_hours=0.5)
    write_result(runs, "in1k-deit_ti-mpvg-detach", 0, {"top1": 73.3})      # unstamped: stale
    out = tmp_path / "reports"
    written = build_reports(params, cells, runs, out, commit="0123abc", **report_inputs(params, cells, runs))
    assert {out / n for n in ("claims.md", "claims.tex", "claims.json")} <= set(written)
    md = (out / "claims.md").read_text()
    n_claims = len(C.load_claims().claims)
    assert "The verdicts are not meaningful here" in md
    assert (f"{n_claims} claims: 1 holds, 0 contradicted, 0 futile, 1 not resolved, 0 flagged, 1 diverged, "
            f"{n_claims - 3} pending. 1 resolved (holds or contradicted) for 5.0 GPU-h of the reported runs: "
            "0.200 claims per GPU-hour; 1 still resolved after Holm within each table.") in md
    assert ("Kept out: 1 stale seed(s) of 1 cell(s) (result made with other settings than the current params; "
            "rerun them with snakemake)") in md
    assert "facebookresearch/deit/issues/32" in md and "sd 0.43 (sample sd of the reruns 72.2, 71.95, 72.78)" in md
    tables = parse_pipe_tables(md)
    rows = {r[0]: r for t in reversed(tables) for r in t[1:]}                # first table's row wins
    assert sum(len(t) - 1 for t in tables) == n_claims and len(tables) == 9  # one table per source
    assert tables[0][0] == C.COLUMNS
    assert rows["MPVG > PVG (DeiT-Ti)"] == [
        "MPVG > PVG (DeiT-Ti)", "top1", "+0.34", "+0.40", "[0.17, 0.63]", "no", "3/3", "1 of 3 (N=32, prior sd 0.43)",
        "not resolved", "not resolved", "+15/+15 seeds, 15.0 GPU-h"]          # round 2 at 18 seeds, 0.5 GPU-h each
    assert rows["MPVG > Default (DeiT-Ti)"][3:] == ["+1.50", "[1.27, 1.73]", "no", "3/3",
                                                    "1 of 3 (N=5, prior sd 0.43)", "**holds**", "holds", "done"]
    lape = rows["MPVG > LaPE (DeiT-Ti)"]
    assert (lape[6], lape[8], lape[10]) == ("3/0 (0/1 div.)", "diverged", "+0/+3 seeds, 1.5 GPU-h")
    assert rows["MPVG > MPVG-detach (needs grad.)"][6:] == ["3/0 (0/1 stale)", "0 of 3 (N=32, prior sd 0.43)",
                                                            "pending: stale", "—", "+0/+3 seeds, cost unknown"]
    assert rows["MPVG > PVG (DeiT-S)"][8:] == ["pending: no run", "—", "+3/+3 seeds, cost unknown"]
    assert rows["MPVG-detach = PVG (similar)"][2] == "order only (+-0.17)"
    data = json.loads((out / "claims.json").read_text())
    assert data["scale"] == "tiny" and data["alpha"] == 0.05 and len(data["claims"]) == n_claims
    assert data["stale"] == {"in1k-deit_ti-mpvg-detach": [0]} and data["gpu_hours_spent"] == 5.0
    first = {c["id"]: c for c in data["claims"]}["t1-deit_ti-mpvg-vs-pvg"]
    assert first["ci_low"] == pytest.approx(0.4 - T_975_DF4 * math.sqrt(2 * 0.01 / 3)) and first["df"] == 4.0
    assert (first["verdict"], first["paper_in_ci"], first["paper_excluded"], first["sd_kind"]) == (
        "not resolved", True, False, "prior")
    assert (first["rounds"], first["round"], first["next_seeds"], first["next_gpu_hours"]) == ([3, 18, 32], 1,
                                                                                              [15, 15], 15.0)
    assert ("| Verdicts on the paper's claims (claims.md, claims.tex, claims.json) | [claims.md](claims.md) | "
            "[claims.tex](claims.tex) |") in (out / "README.md").read_text()
    tex = (out / "claims.tex").read_text()
    assert check_latex_structure(tex) == 9 and "\\textbf{holds}" in tex
    if shutil.which("pdflatex"):
        run = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "claims.tex"], cwd=out,
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stdout[-2000:]
        assert "Float too large" not in run.stdout
    # one seed per cell (the tiny default): every verdict pending, and the page says why
    tiny = load_params(PARAMS)
    write_result(tmp_path / "one", "in1k-deit_ti-mpvg", 0, {"top1": 73.4}, params=tiny)
    write_result(tmp_path / "one", "in1k-deit_ti-pvg", 0, {"top1": 73.0}, params=tiny)
    build_reports(tiny, expand_cells(tiny), tmp_path / "one", tmp_path / "one-reports",
                  **report_inputs(tiny, expand_cells(tiny), tmp_path / "one"))
    text = (tmp_path / "one-reports" / "claims.md").read_text()
    assert f"0 holds, 0 contradicted, 0 futile, 0 not resolved, 0 flagged, 0 diverged, {n_claims} pending" in text
    assert "with fewer than 3 seeds per cell every verdict is pending" in text
    assert "the runs report no GPU-hours (CPU runs, or none reported), so none per GPU-hour" in text
    assert ("| MPVG > PVG (DeiT-Ti) | top1 | +0.34 | +0.40 | — | — | 1/1 | 0 of 3 (N=32, prior sd 0.43) | "
            "pending: < 3 seeds | — | +2/+2 seeds, 0.0 GPU-h |") in text
