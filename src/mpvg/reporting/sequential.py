"""Differences over seeds, judged round by round: Welch intervals, a group-sequential design with
Lan-DeMets O'Brien-Fleming alpha spending and a futility stop, p-values and Holm's adjustment.

numpy and scipy's t distribution only, vectorised where the simulation in tests/test_claims.py
needs it (tens of thousands of simulated claims in a second), so the report and the simulation
run the same code. docs/claims.md ("Sequential verdicts") says why each choice is made.

The design of one claim, fixed before its data: ``N`` seeds per cell at most, looked at in up to
``MAX_ROUNDS`` rounds at ``n_1 = MIN_SEEDS < ... < n_K = N`` seeds per cell. Round ``k`` spends
``alpha_k = a(t_k) - a(t_{k-1})`` of the two-sided ``ALPHA`` (``a`` the O'Brien-Fleming-type
spending function, ``t_k = n_k / N``) and judges the first ``n_k`` seeds of each cell (by seed
number) with Welch's interval at level ``1 - alpha_k``. By the union bound the chance of any
false ``holds`` or ``contradicted`` over all rounds is at most ``sum(alpha_k) = ALPHA``, however
often the report is rebuilt (a round's verdict never changes once its seeds exist). Before the
last round a claim stops for futility when the one-sided ``1 - FUTILITY_BETA`` bound on the
paper's side excludes the paper's size (non-binding: it only removes rejections). ``N`` is the
smallest number of seeds whose last round alone has power ``POWER + FUTILITY_BETA * (K - 1)`` at
the paper's size, so the design's power is at least ``POWER`` at every ``N``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

ALPHA = 0.05           # two-sided, over all rounds of one claim
POWER = 0.80           # at the paper's size (similar claims: at a true difference of 0)
MIN_SEEDS = 3          # per cell, the first round: Welch's df is ~1 at 2 seeds (power 0.59, not 0.80)
MAX_ROUNDS = 3
FUTILITY_BETA = 0.025  # one-sided, per round before the last
MAX_SEEDS = 10_000


def _t():
    from scipy import stats as sps

    return sps.t


def spend(t) -> np.ndarray:
    """Lan-DeMets O'Brien-Fleming-type alpha spent by information fraction ``t`` (0 at 0, ALPHA at 1)."""
    from scipy.stats import norm

    t = np.clip(np.asarray(t, dtype=np.float64), 1e-12, 1.0)
    return 2.0 - 2.0 * norm.cdf(norm.ppf(1 - ALPHA / 2) / np.sqrt(t))


def rounds_for(n_max: int) -> tuple[int, ...]:
    """Seeds per cell at each round: ``MIN_SEEDS`` first, the last at ``n_max``, evenly between."""
    n_max = max(int(n_max), MIN_SEEDS)
    k = min(MAX_ROUNDS, n_max - MIN_SEEDS + 1)
    if k == 1:
        return (n_max,)
    return tuple(dict.fromkeys(MIN_SEEDS + math.ceil(i * (n_max - MIN_SEEDS) / (k - 1)) for i in range(k)))


@dataclass(frozen=True)
class Design:
    """One claim's plan: seeds per cell at each round, the alpha each round spends."""

    rounds: tuple[int, ...]
    alphas: tuple[float, ...]
    sd: Optional[float]          # the design spread (None: no spread known, the default 3 rounds of MIN_SEEDS)
    size: Optional[float]

    @property
    def n_max(self) -> int:
        return self.rounds[-1]


def design_from_rounds(rounds: Sequence[int], sd=None, size=None) -> Design:
    t = np.asarray(rounds, dtype=np.float64) / rounds[-1]
    spent = spend(t)
    spent[-1] = ALPHA
    alphas = np.diff(np.concatenate([[0.0], spent]))
    return Design(tuple(int(r) for r in rounds), tuple(float(a) for a in alphas), sd, size)


def design(size: Optional[float], sd: Optional[float], equivalence: bool = False) -> Optional[Design]:
    """The design of a claim of ``size`` (paper's difference, or the margin of a similar claim) at
    spread ``sd``: the smallest ``N`` whose last round alone has the power the design promises
    (with the last round's own alpha and ``N - 1`` degrees of freedom, the least Welch's can be). ``None`` when
    ``MAX_SEEDS`` is not enough or size / sd are unknown."""
    if size is None or sd is None or size == 0:
        return None
    if sd == 0:
        return design_from_rounds((MIN_SEEDS,), sd, size)
    # every candidate N at once: its rounds (rounds_for), the last round's alpha and power
    n = np.arange(MIN_SEEDS, MAX_SEEDS + 1)
    k = np.minimum(MAX_ROUNDS, n - MIN_SEEDS + 1)
    before = np.where(k >= 3, MIN_SEEDS + np.ceil((n - MIN_SEEDS) / 2), MIN_SEEDS)  # the round before the last
    last_alpha = np.where(k == 1, ALPHA, ALPHA - spend(before / n))
    power = POWER + FUTILITY_BETA * (k - 1)
    q = (1 + power) / 2 if equivalence else power
    df = n - 1   # Welch's df lies between n - 1 and 2n - 2; the low end keeps the power
    t = _t()
    ok = (t.ppf(1 - last_alpha / 2, df) + t.ppf(q, df)) * sd * np.sqrt(2.0 / n) <= abs(size)
    if not ok.any():
        return None
    return design_from_rounds(rounds_for(int(n[ok.argmax()])), sd, size)


def welch(a: Sequence[float], b: Sequence[float]) -> dict:
    """``mean(a) - mean(b)``, Welch's standard error and Welch-Satterthwaite df (``None`` when
    ``se`` is 0). Needs two values or more per side."""
    x, y = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if x.size < 2 or y.size < 2:
        raise ValueError(f"welch needs at least 2 values per side, got {x.size} and {y.size}")
    va, vb = x.var(ddof=1) / x.size, y.var(ddof=1) / y.size
    se = math.sqrt(va + vb)
    df = None if se == 0.0 else (va + vb) ** 2 / (va ** 2 / (x.size - 1) + vb ** 2 / (y.size - 1))
    return {"diff": float(x.mean() - y.mean()), "se": se, "df": None if df is None else float(df),
            "n_a": int(x.size), "n_b": int(y.size)}


def welch_interval(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> dict:
    """:func:`welch` with the two-sided ``level`` interval ``diff +- t_{(1+level)/2, df} * se``
    (the point itself when ``se`` is 0)."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    w = welch(a, b)
    half = 0.0 if w["se"] == 0.0 else float(_t().ppf((1 + level) / 2, w["df"])) * w["se"]
    return {**w, "low": w["diff"] - half, "high": w["diff"] + half}


def decide(diff, se, df, alpha, size, expect: str = "greater", margin=None, last=True):
    """The decision of one round, vectorised: ``+1`` holds, ``-1`` contradicted, ``2`` futile
    (stopped: the paper's size is excluded), ``0`` go on / not resolved. ``greater``: the
    ``1 - alpha`` interval above 0 holds, below 0 contradicts. ``similar``: inside ``+-margin``
    holds, wholly outside contradicts. Futility only before the ``last`` round, for greater claims
    with a size: the one-sided ``1 - FUTILITY_BETA`` upper bound below ``size``."""
    t = _t()
    diff, se, df = (np.asarray(x, dtype=np.float64) for x in (diff, se, df))
    half = t.ppf(1 - np.asarray(alpha) / 2, df) * se
    low, high = diff - half, diff + half
    if expect == "similar":
        out = np.where((low >= -margin) & (high <= margin), 1, np.where((low > margin) | (high < -margin), -1, 0))
    else:
        out = np.where(low > 0, 1, np.where(high < 0, -1, 0))
        if not last and size is not None:
            upper = diff + t.ppf(1 - FUTILITY_BETA, df) * se
            out = np.where((out == 0) & (upper < size), 2, out)
    return out


def p_value(diff: float, se: float, df: Optional[float], expect: str = "greater", margin=None) -> float:
    """The p-value whose ``<= alpha`` is the verdict at level ``1 - alpha``: two-sided against 0
    (greater), or the smaller of the equivalence p (interval inside ``+-margin``) and the
    non-equivalence p (interval wholly outside) for similar claims."""
    if se == 0.0:
        return 0.0 if (diff != 0 if expect == "greater" else True) else 1.0
    t = _t()
    if expect == "greater":
        return float(min(1.0, 2 * t.sf(abs(diff) / se, df)))
    inside = 2 * max(t.sf((diff + margin) / se, df), t.sf((margin - diff) / se, df))
    outside = 2 * t.sf((abs(diff) - margin) / se, df)
    return float(min(1.0, inside, outside))


def holm(pvalues: Sequence[Optional[float]], alpha: float = ALPHA) -> list[Optional[bool]]:
    """Holm's step-down at family-wise level ``alpha``: which p-values are rejected (``None``
    stays ``None`` and does not count in the family)."""
    idx = [i for i, p in enumerate(pvalues) if p is not None]
    out: list[Optional[bool]] = [None] * len(pvalues)
    m = len(idx)
    going = True
    for rank, i in enumerate(sorted(idx, key=lambda j: pvalues[j])):
        going = going and pvalues[i] <= alpha / (m - rank)
        out[i] = going
    return out


def seeds_needed(delta: float, sd: float, level: float = 0.95, power: float = 0.8,
                 equivalence: bool = False, max_seeds: int = MAX_SEEDS) -> Optional[int]:
    """Fixed-sample seeds per cell (one look): the smallest n >= 2 with
    ``(t_{(1+level)/2, 2n-2} + t_{q, 2n-2}) * sd * sqrt(2/n) <= |delta|``, ``q = power``
    (difference) or ``(1+power)/2`` (equivalence within ``delta``)."""
    if delta == 0:
        return None
    if sd < 0:
        raise ValueError(f"sd must be >= 0, got {sd}")
    if sd == 0:
        return 2
    t = _t()
    n = np.arange(2, max_seeds + 1)
    q = (1 + power) / 2 if equivalence else power
    ok = (t.ppf((1 + level) / 2, 2 * n - 2) + t.ppf(q, 2 * n - 2)) * sd * np.sqrt(2.0 / n) <= abs(delta)
    return int(n[ok.argmax()]) if ok.any() else None


def simulate(true_diff: float, size: float, sd: float, claims: int = 10_000, rng_seed: int = 0) -> dict:
    """The design of a greater claim of ``size`` at ``sd`` run on ``claims`` simulated claims whose
    cells differ by ``true_diff`` (normal seeds), every round looked at: the share that ends
    holds, contradicted, futile, not resolved, and the mean seeds per cell spent."""
    d = design(size, sd)
    rng = np.random.default_rng(rng_seed)
    a = rng.normal(true_diff, sd, (claims, d.n_max))
    b = rng.normal(0.0, sd, (claims, d.n_max))
    state = np.zeros(claims, dtype=np.int64)
    seeds = np.full(claims, d.n_max)
    open_ = np.ones(claims, dtype=bool)
    for k, (n, alpha) in enumerate(zip(d.rounds, d.alphas)):
        x, y = a[:, :n], b[:, :n]
        va, vb = x.var(axis=1, ddof=1) / n, y.var(axis=1, ddof=1) / n
        se = np.sqrt(va + vb)
        df = (va + vb) ** 2 / (va ** 2 / (n - 1) + vb ** 2 / (n - 1))
        out = decide(x.mean(axis=1) - y.mean(axis=1), se, df, alpha, size, last=k == len(d.rounds) - 1)
        stop = open_ & (out != 0)
        state[stop] = out[stop]
        seeds[stop] = n
        open_ &= ~stop
    return {"holds": float(np.mean(state == 1)), "contradicted": float(np.mean(state == -1)),
            "futile": float(np.mean(state == 2)), "not resolved": float(np.mean(state == 0)),
            "mean_seeds": float(seeds.mean()), "design": d}
