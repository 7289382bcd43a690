"""Fold the Last-LN PE of MPVG into the head bias for inference.

With GAP, ``logits = W mean_t(LN(x_{L+1}) + LN'_last(pos_k)) + b
= W mean_t(LN(x_{L+1})) + (b + W mean_t(LN'_last(pos_k)))``: the PE term is a constant of the
trained model, so an inference copy can drop ``LN'_last`` and add ``W @ mean_t(LN'_last(pos_k))``
to the head bias (with a class token the pooled row is the class token's).  The constant
depends on the token grid, so the folded copy refuses other input resolutions.

A model supports folding when it has ``pe`` (with ``last_norm``), a linear classifier
(timm's ``get_classifier()``: ``head`` for the ViT family and CeiT, ``head.fc`` for Swin),
``pool(x)`` (the pooling of ``forward_head`` on ``(B, N, D)`` tokens) and ``last_ln_pe_term()``
(the ``(1, N, D)`` Last-LN PE at the build resolution), as every model of the package does.

Folding refuses, and says why, a model whose head does not pool (``global_pool=''``: a
per-position head sees a different PE row at each position, which no single bias holds) and a
model that is already folded.  The folded copy refuses ``reset_classifier`` and
``prune_intermediate_layers``: a new or pruned head would lose the absorbed term.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


def _classifier(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_classifier", None)
    return get() if callable(get) else getattr(model, "head", None)


def can_fold(model: nn.Module) -> bool:
    pe = getattr(model, "pe", None)
    return (getattr(pe, "last_norm", None) is not None and isinstance(_classifier(model), nn.Linear)
            and hasattr(model, "pool") and hasattr(model, "last_ln_pe_term"))


@torch.no_grad()
def fold_last_ln_pe(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` without ``LN'_last`` whose head bias absorbs its term.

    ``model`` itself is not changed.  The copy's logits equal the original's (up to float
    rounding) at the build resolution; ``forward_features`` / ``forward_head(pre_logits=True)``
    of the copy no longer include the PE term.  ``copy.pe_cfg`` still describes the trained
    method; ``copy.last_ln_pe_folded`` is ``True``.
    """
    if getattr(model, "last_ln_pe_folded", False):
        raise ValueError("the model is already folded (fold_last_ln_pe): its head bias holds the Last-LN PE term")
    if getattr(getattr(model, "pe", None), "last_norm", None) is None:
        raise ValueError("the model has no Last-LN PE (pe_cfg.last_ln_pe is None): nothing to fold")
    if not can_fold(model):
        raise TypeError(f"{type(model).__name__} does not support folding (needs a linear head, "
                        "pool() and last_ln_pe_term())")
    if model.pool(model.last_ln_pe_term()).ndim != 2:  # (1, D) when the head pools
        raise ValueError(f"the head does not pool (global_pool={getattr(model, 'global_pool', None)!r}): it sees "
                         "LN'_last(pos_k) per position, which no single head bias can hold; fold a model whose "
                         "head pools (global_pool 'avg' or 'token')")
    folded = copy.deepcopy(model).eval()
    term = folded.last_ln_pe_term()  # (1, N[+1], D)
    head = _classifier(folded)
    pooled = folded.pool(term)[0].to(head.weight.dtype)  # (D,)
    shift = head.weight @ pooled
    if head.bias is None:
        head.bias = nn.Parameter(shift.clone())
    else:
        head.bias.add_(shift)
    folded.pe.last_norm = None
    if hasattr(folded, "_fold_grid"):
        folded._fold_grid = tuple(folded.grid_size)
    folded.last_ln_pe_folded = True
    return folded
