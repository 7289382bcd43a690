"""The numbers behind the analysis figures (paper Figures 2, 4, 6, 7, 8 and the Appendix).

numpy on arrays already taken out of a model, so every definition here is tested on constructed
inputs with known answers and the figures only show what these functions return. (The
statistics of differences over seeds behind the verdicts on the paper's claims are in
mpvg.reporting.sequential: reporting does not import analysis.)

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
