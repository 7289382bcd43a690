"""Position-embedding (PE) methods of the paper as knobs of one mechanism.

Every architecture in :mod:`mpvg.models` takes a :class:`PEConfig` (or a method name that
:func:`pe_config` turns into one) and uses :class:`LayerwisePE` to compute, once per forward
and independently of the image, the PE term that each block adds after its first LN and
the term added after the Last LN.

Notation (paper, Eq. 1-11): ``pos_0`` is the learnable (or fixed) initial PE; ``LN'_l`` are
independent LayerNorms for the PE; the block ``l`` computes
``x'_l = MSA(LN_l(x_l) + P_l) + x_l`` where ``P_l`` is the PE term for layer ``l`` (absent
when the layer receives no PE).

* Default (Eq. 1-4): no layer-wise PE; ``pos_0`` is added to the tokens at the input.
* LaPE (Eq. 5-7): not added at the input; every layer ``l = 0..L-1`` gets
  ``P_l = LN'_l(pos_{l})`` with ``pos_0 = pos`` and ``pos_{l} = LN'_{l-1}(pos_{l-1})``,
  i.e. ``P_0 = LN'_0(pos_0)``, ``P_1 = LN'_1(LN'_0(pos_0))``, ... (one chain, each LN'
  output is both the term added to its layer and the input of the next LN').
* PVG (Eq. 8-10): GAP, no class token; ``pos_0`` added at the input; layer 0 gets nothing;
  ``P_l = pos_l = LN'_l(pos_{l-1})`` for ``l = 1..L-1``.
* MPVG (Eq. 11): PVG and ``y = LN(x_{L+1}) + LN'_last(pos_k)`` with ``k = 0``.

Ablation knobs (Tables 5-6, Figures 1 and 5) are the other fields of :class:`PEConfig`.
``last_ln_pe_detach`` is not in the paper: it is the control of the mechanism (MPVG with
``LN'_last(sg(pos_0))``, docs/models.md).
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional

import torch
from torch import nn

PE_METHODS = ("default", "lape", "pvg", "mpvg")
PAPER_METHOD_NAMES = {"default": "Default", "lape": "LaPE", "pvg": "PVG", "mpvg": "MPVG"}


@dataclass(frozen=True)
class PEConfig:
    """How the PE reaches the network.

    Attributes:
        pool: ``"token"`` (class token) or ``"avg"`` (global average pooling, GAP).
        layerwise: deliver PE to the layers through independent LNs (LN'_l).
        include_layer0: layer 0 also receives a PE term (LaPE: yes; PVG/MPVG: no, except Swin).
        hierarchical: ``pos_l = LN'_l(pos_{l-1})`` (chain) rather than ``LN'_l(pos_0)``.
        add_at_input: add ``pos_0`` to the token embedding before layer 0 (Eq. 1/8).
        last_ln_pe: ``None`` for no PE at the Last LN; ``k`` to add ``LN'_last(pos_k)``
            after the Last LN (Eq. 11 uses ``k = 0``; Table 5 uses 0, 5, 8, 11), where
            ``pos_k`` is the output of the k-th LN' of the chain (``pos_0`` is the raw PE).
        independent_merge_ln: staged models only (Swin; the ViT family has no merging and
            ignores it).  Where the PE crosses a patch merging it goes through an LN' of its
            own at the stage's width, then the merge's 2x2 concatenation and linear
            reduction, instead of through the merge's token LN.  LaPE: yes (its rule that
            the PE never shares an LN's affine parameters with the tokens); PVG/MPVG: no
            (they add the PE to the tokens and let it share the token path).  See
            docs/models-ceit-swin.md.
        last_ln_pe_detach: the control of the mechanism (docs/models.md, "The control"):
            ``LN'_last`` gets a stop-gradient copy of its input, ``LN'_last(sg(pos_k))``.
            Values are unchanged and ``LN'_last`` is still learned, so the term is still a
            learnable bias of the pooled features; only the gradient that MPVG sends from the
            Last LN back into ``pos_k`` (and so into ``pos_0`` and every layer's PE) is cut.
            For Swin the input is the PE carried to the last stage through the patch mergings,
            so the mergings get no gradient from this path either.  Needs ``last_ln_pe``.
    """

    pool: str = "token"
    layerwise: bool = False
    include_layer0: bool = False
    hierarchical: bool = True
    add_at_input: bool = True
    last_ln_pe: Optional[int] = None
    independent_merge_ln: bool = False
    last_ln_pe_detach: bool = False

    def __post_init__(self):
        if self.pool not in ("token", "avg"):
            raise ValueError(f"PEConfig.pool must be 'token' or 'avg', got {self.pool!r}")
        if self.last_ln_pe is not None and self.last_ln_pe < 0:
            raise ValueError(f"PEConfig.last_ln_pe must be None or >= 0, got {self.last_ln_pe!r}")
        if self.last_ln_pe_detach and self.last_ln_pe is None:
            raise ValueError("PEConfig.last_ln_pe_detach=True needs a Last-LN PE (last_ln_pe is None): "
                             "there is no LN'_last input to detach")

    def replace(self, **overrides) -> "PEConfig":
        known = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown PEConfig field(s) {unknown}; expected some of {sorted(known)}")
        return replace(self, **overrides)


def pe_config(method: str | PEConfig, default_pool: str = "token", **overrides) -> PEConfig:
    """The :class:`PEConfig` of a paper method name, with optional ablation overrides.

    ``default_pool`` is the architecture's own pooling for the Default method (class token
    for DeiT/CeiT/T2T-ViT, GAP for Swin, sequence pooling is not used: ViT-Lite uses the
    class token here, see its docstring).
    """
    if isinstance(method, PEConfig):
        return method.replace(**overrides) if overrides else method
    key = str(method).lower()
    if key == "default":
        cfg = PEConfig(pool=default_pool)
    elif key == "lape":
        cfg = PEConfig(pool=default_pool, layerwise=True, include_layer0=True, add_at_input=False,
                       independent_merge_ln=True)
    elif key == "pvg":
        cfg = PEConfig(pool="avg", layerwise=True, include_layer0=False, add_at_input=True)
    elif key == "mpvg":
        cfg = PEConfig(pool="avg", layerwise=True, include_layer0=False, add_at_input=True, last_ln_pe=0)
    else:
        raise ValueError(f"unknown PE method {method!r}; expected one of {list(PE_METHODS)}")
    return cfg.replace(**overrides) if overrides else cfg


class LayerwisePE(nn.Module):
    """The LN' chain: per-layer PE terms and the Last-LN PE term, computed once per forward.

    Owns ``LN'_l`` for each layer that receives PE (``norms[l]``, ``nn.Identity`` where a
    layer receives none, so indices match block indices and no parameter is created) and
    ``LN'_last`` when ``cfg.last_ln_pe`` is set.  Inputs are ``(1, N, D)``: the terms do not
    depend on the image and are broadcast over the batch by the caller.
    """

    def __init__(self, cfg: PEConfig, depth: int, dim: int, norm_layer=nn.LayerNorm):
        super().__init__()
        self.cfg = cfg
        self.depth = depth
        first = 0 if cfg.include_layer0 else 1
        self.receives = [cfg.layerwise and l >= first for l in range(depth)]
        self.norms = nn.ModuleList(norm_layer(dim) if r else nn.Identity() for r in self.receives)
        self.last_norm = norm_layer(dim) if cfg.last_ln_pe is not None else None
        if cfg.last_ln_pe is not None and cfg.last_ln_pe > depth:
            raise ValueError(f"last_ln_pe={cfg.last_ln_pe} exceeds the number of layers ({depth})")

    def forward(self, pos0: torch.Tensor) -> tuple[list[Optional[torch.Tensor]], Optional[torch.Tensor]]:
        """Return ``(per_layer_terms, last_term)`` for ``pos0`` of shape ``(1, N, D)``.

        ``per_layer_terms[l]`` is ``None`` for a layer without PE.  ``pos_k`` for the Last LN
        is the k-th element of the chain ``[pos_0, LN'_a(pos_0), ...]`` of applied LN's.
        """
        terms: list[Optional[torch.Tensor]] = []
        chain = [pos0]  # pos_0, then the output of each applied LN' in order
        cur = pos0
        for l, norm in enumerate(self.norms):
            if not self.receives[l]:
                terms.append(None)
                continue
            src = cur if self.cfg.hierarchical else pos0
            out = norm(src)
            terms.append(out)
            chain.append(out)
            cur = out
        last = None
        if self.last_norm is not None:
            k = self.cfg.last_ln_pe
            if k >= len(chain):
                raise ValueError(f"last_ln_pe={k} but the PE chain has only {len(chain)} entries")
            src = chain[k]
            last = self.last_norm(src.detach() if self.cfg.last_ln_pe_detach else src)
        return terms, last

    def truncate(self, depth: int, keep_last: bool) -> None:
        """Keep the LN' of the first ``depth`` layers (a model pruned to its first ``depth``
        blocks, timm's ``prune_intermediate_layers``); drop ``LN'_last`` unless ``keep_last``.

        A kept ``LN'_last`` still needs ``pos_k``: the LN' that produce the chain up to ``pos_k``
        stay even past ``depth`` (their per-layer terms are then unused by any block).
        """
        if not 0 < depth <= self.depth:
            raise ValueError(f"truncate to {depth} layers; expected 1 to {self.depth}")
        if not keep_last:
            self.last_norm = None
        needed = depth
        k = self.cfg.last_ln_pe
        if self.last_norm is not None and k:
            applied = [l for l, r in enumerate(self.receives) if r]
            needed = max(depth, applied[k - 1] + 1)
        self.norms = nn.ModuleList(list(self.norms)[:needed])
        self.receives = self.receives[:needed]
        self.depth = needed
