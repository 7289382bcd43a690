"""The numbers behind the analysis figures (paper Figures 2, 4, 6, 7, 8 and the Appendix), and
the statistics of differences over seeds behind the verdicts on the paper's claims.

numpy (and scipy's t quantiles) on arrays already taken out of a model or out of results, so
every definition here is tested on constructed inputs with known answers and the figures and
verdicts only show what these functions return.

Conventions (docs/reports.md explains why):

* token maps are ``(N, D)``: tokens x channels, averaged over the batch first (the paper's
  heatmaps are "averaged over the batch size");
* correlations are Pearson's r over all ``N * D`` entries of two maps;
* variances are unbiased (``ddof=1``, as ``torch.Tensor.var`` computes them).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np


def as_array(x) -> np.ndarray:
    """A float64 numpy copy of ``x`` (numpy array, list or a CPU torch tensor)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def batch_mean(x) -> np.ndarray:
    """``(B, N, D) -> (N, D)``; a ``(1, N, D)`` PE term or an ``(N, D)`` map is squeezed."""
    a = as_array(x)
    if a.ndim == 3:
        return a.mean(axis=0)
    if a.ndim == 2:
        return a
    raise ValueError(f"expected a (B, N, D) or (N, D) array, got shape {a.shape}")


def patch_tokens(x: np.ndarray, num_patches: int) -> np.ndarray:
    """The last ``num_patches`` tokens of an ``(N, D)`` or ``(B, N, D)`` array.

    Prefix tokens (the class token) come first in every model of this project, and a PE
    term may or may not carry a row for them; taking the last rows aligns both.
    """
    if x.shape[-2] < num_patches:
        raise ValueError(f"array has {x.shape[-2]} tokens, fewer than the {num_patches} patches asked for")
    return x[..., x.shape[-2] - num_patches:, :]


def _flat_pair(a, b, what: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = as_array(a).ravel(), as_array(b).ravel()
    if x.shape != y.shape:
        raise ValueError(f"{what}: shapes differ after flattening: {x.shape} vs {y.shape}")
    return x, y


def pearson(a, b) -> float:
    """Pearson's correlation of the flattened ``a`` and ``b`` (NaN if either is constant)."""
    x, y = _flat_pair(a, b, "pearson")
    x = x - x.mean()
    y = y - y.mean()
    denom = math.sqrt(float(x @ x) * float(y @ y))
    if denom == 0.0:
        return float("nan")
    return float(x @ y) / denom


def variance(v, ddof: int = 1) -> float:
    """Variance of all entries of ``v`` (unbiased by default, like ``torch.var``)."""
    a = as_array(v).ravel()
    if a.size <= ddof:
        raise ValueError(f"variance needs more than {ddof} values, got {a.size}")
    return float(a.var(ddof=ddof))


def cosine_similarity(a, b) -> float:
    """cos(a, b) of the flattened vectors (NaN when either is zero)."""
    x, y = _flat_pair(a, b, "cosine_similarity")
    denom = float(np.linalg.norm(x) * np.linalg.norm(y))
    if denom == 0.0:
        return float("nan")
    return float(x @ y) / denom


def token_norms(x) -> np.ndarray:
    """L2 norm of each token: ``(..., N, D) -> (..., N)``."""
    return np.linalg.norm(as_array(x), axis=-1)


def norm_grid(x, num_patches: Optional[int] = None) -> np.ndarray:
    """Per-token norms of the patch tokens laid on their ``sqrt(N) x sqrt(N)`` grid (Figure 7).

    ``x`` is ``(N, D)`` or ``(B, N, D)``; prefix tokens are dropped when ``num_patches`` is given.
    """
    a = as_array(x)
    if num_patches is not None:
        a = patch_tokens(a, num_patches)
    norms = token_norms(a)
    n = norms.shape[-1]
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"norm_grid: {n} tokens do not form a square grid")
    return norms.reshape(*norms.shape[:-1], side, side)


def layer_correlations(tokens: Sequence, pos: Sequence, num_patches: int) -> list[Optional[float]]:
    """Per layer, r between the batch-mean ``LN_l(x_l)`` map and the PE term ``LN'_l(pos)``.

    ``tokens[l]`` is ``(B, N, D)`` or ``(N, D)``; ``pos[l]`` is ``(1, N', D)``, ``(N', D)`` or
    ``None`` (a layer without PE gives ``None``). Only patch tokens enter (Figures 2 and 4).
    """
    if len(tokens) != len(pos):
        raise ValueError(f"layer_correlations: {len(tokens)} token maps but {len(pos)} PE terms")
    out: list[Optional[float]] = []
    for t, p in zip(tokens, pos):
        if p is None:
            out.append(None)
            continue
        out.append(pearson(patch_tokens(batch_mean(t), num_patches), patch_tokens(batch_mean(p), num_patches)))
    return out


def pooled_vector(token_map, num_prefix: int) -> np.ndarray:
    """What the head sees of an ``(N, D)`` map: the class token (row 0) or the mean of all tokens."""
    m = batch_mean(token_map)
    return m[0] if num_prefix > 0 else m.mean(axis=0)


def add_last_pe(post, pe_patch, num_prefix: int) -> np.ndarray:
    """``LN(x_{L+1})`` plus the Last-LN PE term (``(..., N, D)``; ``pe_patch`` is ``(n, D)``).

    With every token present the term is added to the patch tokens; a model whose Last LN
    sees one token (CeiT's LCA output) gets the term's mean over the patch tokens, as its
    forward does.
    """
    out = as_array(post).copy()
    pe = as_array(pe_patch)
    if out.shape[-2] == num_prefix + pe.shape[0]:
        out[..., num_prefix:, :] += pe
    elif out.shape[-2] == 1:
        out += pe.mean(axis=0)
    else:
        raise ValueError(f"add_last_pe: {out.shape[-2]} tokens after the Last LN, expected 1 or "
                         f"{num_prefix} prefix + {pe.shape[0]} patch tokens")
    return out


def last_ln_summary(pre, post, gamma, beta, num_prefix: int, last_pe=None) -> dict:
    """Figure 6 / Appendix numbers for the Last LN of one model.

    ``pre`` = ``x_{L+1}`` and ``post`` = ``LN(x_{L+1})`` (``(B, N, D)``); ``last_pe`` the
    patch-token map of the term added after the Last LN (MPVG), or ``None``. The cosine
    similarity is between the vectors the head pools before and after the Last LN: the class
    token (class-token models) or the mean over tokens (GAP), of the batch-mean maps; "after"
    includes the PE term when present. Correlations with the PE need every patch token.
    """
    pre_m = batch_mean(pre)
    post_m = batch_mean(post)
    out_m = post_m if last_pe is None else add_last_pe(post_m, batch_mean(last_pe), num_prefix)
    summary = {
        "gamma_var": variance(gamma),
        "beta_var": variance(beta),
        "gamma_mean": float(as_array(gamma).mean()),
        "beta_mean": float(as_array(beta).mean()),
        "cos_before_after": cosine_similarity(pooled_vector(pre_m, num_prefix), pooled_vector(out_m, num_prefix)),
        "cos_before_after_ln_only": cosine_similarity(pooled_vector(pre_m, num_prefix),
                                                      pooled_vector(post_m, num_prefix)),
        "pooling": "class token" if num_prefix > 0 else "GAP",
    }
    if last_pe is not None and pre_m.shape[0] > 1:
        pe_m = batch_mean(last_pe)
        summary["corr_pre_vs_pe"] = pearson(patch_tokens(pre_m, pe_m.shape[0]), pe_m)
        summary["corr_post_vs_pe"] = pearson(patch_tokens(post_m, pe_m.shape[0]), pe_m)
    return summary


# --------------------------------------------------------------------------- differences over seeds
# The verdicts on the paper's claims (mpvg.reporting.claims, docs/claims.md): a difference of
# two cells' means over independent seeds, its Welch confidence interval, and how many seeds
# per cell a difference of a given size needs.

def welch_interval(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> dict:
    """``mean(a) - mean(b)`` with Welch's t confidence interval (unequal variances).

    ``se = sqrt(s_a^2/n_a + s_b^2/n_b)`` with sample variances (``ddof=1``), degrees of freedom
    from the Welch-Satterthwaite equation, interval ``diff +- t_{(1+level)/2, df} * se``. Needs
    two values or more on each side. When both sides are constant (``se = 0``) the interval is
    the point itself and ``df`` is ``None``. Returns ``{diff, low, high, se, df, n_a, n_b}``.
    """
    from scipy import stats as sps

    x, y = as_array(a).ravel(), as_array(b).ravel()
    if x.size < 2 or y.size < 2:
        raise ValueError(f"welch_interval needs at least 2 values per side, got {x.size} and {y.size}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    va, vb = x.var(ddof=1) / x.size, y.var(ddof=1) / y.size
    diff = float(x.mean() - y.mean())
    se = math.sqrt(va + vb)
    if se == 0.0:
        return {"diff": diff, "low": diff, "high": diff, "se": 0.0, "df": None, "n_a": x.size, "n_b": y.size}
    df = (va + vb) ** 2 / (va ** 2 / (x.size - 1) + vb ** 2 / (y.size - 1))
    half = float(sps.t.ppf((1 + level) / 2, df)) * se
    return {"diff": diff, "low": diff - half, "high": diff + half, "se": se, "df": float(df),
            "n_a": int(x.size), "n_b": int(y.size)}


def seeds_needed(delta: float, sd: float, level: float = 0.95, power: float = 0.8,
                 equivalence: bool = False, max_seeds: int = 10_000) -> Optional[int]:
    """Seeds per cell (the same number in both) for a two-sided ``level`` interval on a difference
    to come out on the right side with probability ``power``, when each run has spread ``sd``.

    Difference (``equivalence=False``): the smallest n >= 2 with
    ``(t_{(1+level)/2, 2n-2} + t_{power, 2n-2}) * sd * sqrt(2/n) <= |delta|``, i.e. a true
    difference ``delta`` gives an interval that excludes 0 with probability ``power``.
    Equivalence (``equivalence=True``, ``delta`` is the margin): ``t_{power}`` becomes
    ``t_{(1+power)/2}``, so a true difference of 0 gives an interval inside ``+-delta`` with
    probability ``power``. ``None`` when even ``max_seeds`` is not enough; ``sd == 0`` gives 2.
    """
    from scipy import stats as sps

    if delta == 0:
        return None
    if sd < 0:
        raise ValueError(f"sd must be >= 0, got {sd}")
    if sd == 0:
        return 2
    q = (1 + power) / 2 if equivalence else power
    for n in range(2, max_seeds + 1):
        df = 2 * n - 2
        if (sps.t.ppf((1 + level) / 2, df) + sps.t.ppf(q, df)) * sd * math.sqrt(2.0 / n) <= abs(delta):
            return n
    return None
