"""Verdicts on the paper's claims: Welch intervals and seed counts by hand, verdicts on
constructed result.json files with known answers, the claims file against the paper's numbers,
the pages (claims.md, .tex, .json) and the MLflow metrics (docs/claims.md)."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from mpvg.analysis.stats import seeds_needed, welch_interval
from mpvg.config import TABLES, expand_cells, load_params
from mpvg.reporting import claims as C
from mpvg.reporting.paper import load_paper_numbers, match_cells
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


# --------------------------------------------------------------------------- verdicts

def _results(values: dict[str, list[float]], metric="top1") -> dict:
    return {cid: [{"metrics": {metric: v}, "seed": i} for i, v in enumerate(vs)] for cid, vs in values.items()}


def _claim(a, b, paper=0.3, **kw):
    return C.Claim(id="x", source="Table 1", claim="a > b", metric="top1", a=a, b=b, paper=paper, **kw)


def test_verdicts_on_constructed_values(cells):
    priors = C.load_claims().priors
    mpvg, pvg, lape = "in1k-deit_ti-mpvg", "in1k-deit_ti-pvg", "in1k-deit_ti-lape"
    res = _results({mpvg: [73.4, 73.5, 73.6], pvg: [73.0, 73.1, 73.2], lape: [73.9, 74.0, 74.1],
                    "in1k-deit_ti-default": [72.0], "in1k-deit_ti-mpvg-layer0": [73.3, 73.6, 73.5]})
    v = C.judge(_claim(mpvg, pvg, 0.34), cells, res, priors)
    se = math.sqrt(2 * 0.01 / 3)
    assert (v.verdict, v.n_a, v.n_b) == ("holds", 3, 3)
    assert v.low == pytest.approx(0.4 - T_975_DF4 * se) and v.high == pytest.approx(0.4 + T_975_DF4 * se)
    assert v.paper_in_interval is True                                       # 0.34 in [0.173, 0.627]
    assert (v.sd_kind, v.sd) == ("observed", pytest.approx(0.1))
    assert v.seeds_needed == seeds_needed(0.34, 0.1)
    v = C.judge(_claim(mpvg, lape, 0.57), cells, res, priors)                # -0.5 +- 0.2267
    assert (v.verdict, round(v.high, 4)) == ("contradicted", round(-0.5 + T_975_DF4 * se, 4))
    assert v.paper_in_interval is False
    v = C.judge(_claim(mpvg, "in1k-deit_ti-mpvg-layer0", 0.2), cells, res, priors)
    assert v.verdict == "not resolved" and v.low < 0 < v.high
    # one seed: the plain difference, no interval, seeds planned with the prior spread (0.2)
    v = C.judge(_claim(mpvg, "in1k-deit_ti-default", 1.37), cells, res, priors)
    assert (v.verdict, v.label, v.low) == ("pending", "pending: < 2 seeds", None)
    assert v.diff == pytest.approx(1.5) and (v.sd_kind, v.sd, v.seeds_needed) == ("prior", 0.2, 2)
    v = C.judge(_claim(mpvg, "in1k-deit_ti-mpvg-nonhier"), cells, res, priors)
    assert (v.verdict, v.label, v.diff) == ("pending", "pending: no run", None)
    assert v.reason == "no finished run of in1k-deit_ti-mpvg-nonhier"
    v = C.judge(_claim(mpvg, "in1k-deit_x-mpvg"), cells, res, priors, scale="tiny")
    assert (v.label, v.reason) == ("pending: not in grid", "in1k-deit_x-mpvg not in the grid at scale tiny")
    # about-equal claims: inside the margin holds, wholly outside is contradicted
    sim = dict(expect="similar", paper=0.03)
    assert C.judge(_claim(mpvg, pvg, margin=0.7, **sim), cells, res, priors).verdict == "holds"      # [0.17, 0.63]
    assert C.judge(_claim(mpvg, pvg, margin=0.1, **sim), cells, res, priors).verdict == "contradicted"
    assert C.judge(_claim(mpvg, pvg, margin=0.3, **sim), cells, res, priors).verdict == "not resolved"
    v = C.judge(_claim(mpvg, pvg, margin=0.3, **sim), cells, res, priors)
    assert v.seeds_needed == seeds_needed(0.3, 0.1, equivalence=True)
    # a metric without a sourced prior: no plan from one seed
    res = _results({"c100-vit_lite-mpvg": [70.0], "c100-vit_lite-pvg": [69.0]})
    v = C.judge(_claim("c100-vit_lite-mpvg", "c100-vit_lite-pvg"), cells, res, priors)
    assert (v.sd, v.seeds_needed, v.diff) == (None, None, 1.0)


def test_claims_metrics_counts_and_per_claim_values(cells):
    claim_set = C.load_claims()
    res = _results({"in1k-deit_ti-mpvg": [73.4, 73.5, 73.6], "in1k-deit_ti-pvg": [73.0, 73.1, 73.2]})
    verdicts = C.judge_all(claim_set, cells, res, "tiny")
    counts, per_claim = C.claims_metrics(verdicts)
    m = per_claim["t1-deit_ti-mpvg-vs-pvg"]
    assert m["verdict"] == 1.0 and m["paper"] == 0.34 and m["diff"] == pytest.approx(0.4)
    assert m["ci_low"] == pytest.approx(0.4 - T_975_DF4 * math.sqrt(2 * 0.01 / 3))
    # observed sd 0.1: n = 3, df 4: (2.7764 + 0.9410) * 0.1 * sqrt(2/3) = 0.3035 <= 0.34 (n = 2: 0.536)
    assert (m["n_a"], m["n_b"], m["seeds_needed"]) == (3.0, 3.0, 3.0)
    assert "verdict" not in per_claim["t1-deit_ti-mpvg-vs-lape"]           # pending: no verdict value
    assert counts["claims_n_holds"] == 1.0 and counts["claims_n_pending"] == len(verdicts) - 1
    assert counts["claims_n_not_resolved"] == counts["claims_n_contradicted"] == 0.0
    values = [*counts.values(), *(v for claim in per_claim.values() for v in claim.values())]
    assert all(isinstance(v, float) and math.isfinite(v) for v in values)


# --------------------------------------------------------------------------- the claims file

def test_claims_file_covers_the_paper_and_matches_its_numbers():
    claim_set = C.load_claims()
    paper = load_params(PARAMS, ["scale=paper"])
    cells = expand_cells(paper)
    ids = {c.id for c in claim_set.claims}
    # the examples are there, and every table and figure of the grid has claims
    assert {"t1-deit_ti-mpvg-vs-pvg", "t1-deit_ti-pvg-vs-lape", "t5-pos0-vs-pos11", "t6-x-plus-pe",
            "t6-exclude-layer0", "f5-gap-vs-gap-lastpe", "f1-gap-vs-token", "f1-layerwise-token-vs-gap",
            "c1-gain-needs-gradient", "c1-detach-equals-pvg", "t3-bbox_ap-mpvg-vs-pvg", "t4-miou-lape-vs-pvg"} <= ids
    sources = {c.source for c in claim_set.claims}
    assert sources == {"Table 1", "Table 2", "Table 3", "Table 4", "Table 5", "Table 6", "Figure 1", "Figure 5",
                       "Control"}
    assert {t for c in claim_set.claims for cid in (c.a, c.b) for t in cells[cid].tables} == set(TABLES)
    # every cell is in the full grid; the paper's difference is paper_numbers.csv's, rounded as printed
    rows = load_paper_numbers()
    match = match_cells(rows, cells, paper)
    value = {(match[r.key], m): v for r in rows for m, v in r.values.items() if match[r.key] and v is not None}
    for c in claim_set.claims:
        assert c.a in cells and c.b in cells, c.id
        va, vb = value.get((c.a, c.metric)), value.get((c.b, c.metric))
        if va is None or vb is None:
            assert c.paper is None, f"{c.id}: the paper gives no value for both cells"
        else:
            assert c.paper == pytest.approx(round(va - vb, 2), abs=1e-9), c.id
    assert claim_set.priors[("in1k", "top1")].sd == 0.2
    assert "facebookresearch/deit/issues/32" in claim_set.priors[("in1k", "top1")].source


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
    for seed, (a, b) in enumerate(zip([73.4, 73.5, 73.6], [73.0, 73.1, 73.2])):
        write_result(runs, "in1k-deit_ti-mpvg", seed, {"top1": a}, params=params)
        write_result(runs, "in1k-deit_ti-pvg", seed, {"top1": b}, params=params)
    write_result(runs, "in1k-deit_ti-mpvg-detach", 0, {"top1": 73.3}, params=params)
    out = tmp_path / "reports"
    written = build_reports(params, cells, runs, out, commit="0123abc")
    assert {out / n for n in ("claims.md", "claims.tex", "claims.json")} <= set(written)
    md = (out / "claims.md").read_text()
    assert "The verdicts are not meaningful here" in md and "1 holds" in md
    assert "facebookresearch/deit/issues/32" in md and "Welch's t interval at 95%" in md
    tables = parse_pipe_tables(md)
    rows = {r[0]: r for t in reversed(tables) for r in t[1:]}                # first table's row wins
    n_claims = len(C.load_claims().claims)
    assert sum(len(t) - 1 for t in tables) == n_claims and len(tables) == 9  # one table per source
    assert rows["MPVG > PVG (DeiT-Ti)"] == ["MPVG > PVG (DeiT-Ti)", "top1", "+0.34", "+0.40", "[0.17, 0.63]", "3/3",
                                             "**holds**", "3 (obs. 0.10)"]
    assert rows["MPVG > MPVG-detach (needs grad.)"][2:8] == ["order only", "+0.20", "—", "3/1", "pending: < 2 seeds",
                                                             "7 (prior 0.20)"]  # plan_size 0.34
    assert rows["MPVG > PVG (DeiT-S)"][6:] == ["pending: no run", "13 (prior 0.20)"]
    assert rows["MPVG-detach = PVG (similar)"][2] == "order only (+-0.17)"
    data = json.loads((out / "claims.json").read_text())
    assert data["scale"] == "tiny" and data["level"] == 0.95 and len(data["claims"]) == n_claims
    first = {c["id"]: c for c in data["claims"]}["t1-deit_ti-mpvg-vs-pvg"]
    assert first["ci_low"] == pytest.approx(0.4 - T_975_DF4 * math.sqrt(2 * 0.01 / 3)) and first["df"] == 4.0
    assert (first["verdict"], first["paper_in_ci"], first["sd_kind"]) == ("holds", True, "observed")
    assert ("| Verdicts on the paper's claims (claims.md, claims.tex, claims.json) | [claims.md](claims.md) | "
            "[claims.tex](claims.tex) |") in (out / "README.md").read_text()
    tex = (out / "claims.tex").read_text()
    assert check_latex_structure(tex) == 9 and "\\textbf{holds}" in tex
    if shutil.which("pdflatex"):
        run = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "claims.tex"], cwd=out,
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stdout[-2000:]
        assert "Float too large" not in run.stdout and "Overfull" not in run.stdout
    # one seed per cell (the tiny default): every verdict pending, and the page says why
    tiny = load_params(PARAMS)
    write_result(tmp_path / "one", "in1k-deit_ti-mpvg", 0, {"top1": 73.4}, params=tiny)
    write_result(tmp_path / "one", "in1k-deit_ti-pvg", 0, {"top1": 73.0}, params=tiny)
    build_reports(tiny, expand_cells(tiny), tmp_path / "one", tmp_path / "one-reports")
    text = (tmp_path / "one-reports" / "claims.md").read_text()
    assert f"0 holds, 0 not resolved, 0 contradicted, {n_claims} pending" in text
    assert "with fewer than 2 seeds per cell every verdict is pending" in text
    assert "| MPVG > PVG (DeiT-Ti) | top1 | +0.34 | +0.40 | — | 1/1 | pending: < 2 seeds | 7 (prior 0.20) |" in text
