"""Swin-Ti (Liu et al. 2021) with a learnable absolute PE and every PE method of the paper.

Built on timm's :class:`~timm.models.swin_transformer.SwinTransformer` (same module names, so
timm's Swin weights load; only ``absolute_pos_embed`` and ``pe.*`` are new):

* Default = Swin-T with the original code's ``ape=True``: a learnable ``(1, H0*W0, C0)`` PE
  added after the patch embedding (28,288,354 + 3136*96 = 28,589,410 -> 28.589, Table 1).
* The LN' chain runs block by block over all stages (``pos_0`` at stage 1's grid and width);
  each block that receives PE owns one LN' at its stage's width:
  2*(2*96 + 2*192 + 6*384 + 2*768) = 8,832 parameters.
* At a stage boundary the PE crosses that stage's own PatchMerging, which halves the grid and
  doubles the width exactly as for the tokens.  PVG/MPVG send it through the whole merge (no
  parameter added: they already share the token path, x + PE).  LaPE keeps its rule that the
  PE never goes through an LN shared with the tokens: the PE gets an LN' of its own at the
  width it leaves, then the merge's 2x2 concatenation and linear reduction
  (``PEConfig.independent_merge_ln``): 2*(96 + 192 + 384) = 1,344 parameters.
* PVG/MPVG include layer 0 for Swin (paper: "both PVG and MPVG exceptionally include layer
  0"); the factory sets ``include_layer0=True`` for these names unless ``pe_overrides`` says
  otherwise.
* MPVG's ``LN'_last(pos_k)`` is taken at the last stage: ``pos_k`` is carried through the
  remaining PatchMergings to the final grid and width, then LN'_last (768: +1,536).

Counts (1000 classes, 224), all equal to Table 1 as floor(count/1e3)/1e3: Default 28,589,410
(28.589); LaPE 28,599,586 (28.599); PVG 28,598,242 (28.598); MPVG 28,599,778 (28.599).
docs/models-ceit-swin.md has the arithmetic and the alternatives that were rejected.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import trunc_normal_
from timm.models import generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock

from . import contract
from .pe import LayerwisePE, PEConfig, pe_config

__all__ = ["concat_2x2", "PESwinBlock", "StagewisePE", "SwinTransformerPE", "mpvg_swin_tiny_patch4_window7_224"]


def concat_2x2(x: torch.Tensor) -> torch.Tensor:
    """PatchMerging's concatenation of each 2x2 neighbourhood, in timm's channel order (odd
    sizes zero-padded): ``(B, H, W, C)`` -> ``(B, ceil(H/2), ceil(W/2), 4C)``."""
    B, H, W, C = x.shape
    x = nn.functional.pad(x, (0, 0, 0, W % 2, 0, H % 2))
    _, H, W, _ = x.shape
    return x.reshape(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).flatten(3)


class PESwinBlock(SwinTransformerBlock):
    """timm's Swin block whose (shifted-)window attention input is ``norm1(x) + pos`` when a PE
    term ``pos`` of shape ``(1, H, W, C)`` is given (added at absolute positions, before the
    cyclic shift), and exactly timm's block when it is not."""

    def forward(self, x: torch.Tensor, pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, H, W, C = x.shape
        h = self.norm1(x)
        if pos is not None:
            h = h + pos
        x = x + self.drop_path1(self._attn(h))
        x = x.reshape(B, -1, C)
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x.reshape(B, H, W, C)


class StagewisePE(nn.Module):
    """The LN' chain of a staged model: one :class:`LayerwisePE` per stage (LN' at the stage's
    width), the chain carried across stage boundaries by the given ``merges``, and LN'_last at
    the last width.

    Same output as :class:`LayerwisePE`: ``(per_layer_terms, last_term)`` with the per-layer
    terms listed over all blocks in order (``None`` where a block receives none).  ``pos_k`` for
    the Last LN is the k-th element of the whole chain ``[pos_0, LN'_a(pos_0), ...]``.
    ``include_layer0`` refers to the network's first block only.
    """

    def __init__(self, cfg: PEConfig, depths: Sequence[int], dims: Sequence[int], norm_layer=nn.LayerNorm):
        super().__init__()
        self.cfg = cfg
        self.stages = nn.ModuleList(
            LayerwisePE(cfg.replace(last_ln_pe=None, last_ln_pe_detach=False,
                                    include_layer0=cfg.include_layer0 or s > 0), d, dim, norm_layer)
            for s, (d, dim) in enumerate(zip(depths, dims)))
        self.receives = [r for st in self.stages for r in st.receives]
        self.last_norm = norm_layer(dims[-1]) if cfg.last_ln_pe is not None else None
        # LaPE: the PE's own LN' before each patch merging, at the width it leaves (PEConfig).
        self.merge_norms = None
        if cfg.independent_merge_ln and (cfg.layerwise or cfg.last_ln_pe is not None):
            self.merge_norms = nn.ModuleList(norm_layer(dim) for dim in dims[:-1])
        if cfg.last_ln_pe is not None and cfg.last_ln_pe > sum(self.receives):
            raise ValueError(f"last_ln_pe={cfg.last_ln_pe} but the PE chain has only {sum(self.receives) + 1} "
                             f"entries (pos_0 and {sum(self.receives)} LN')")

    def merge(self, s: int, p: torch.Tensor, merges: Sequence[nn.Module]) -> torch.Tensor:
        """Carry the PE ``p`` from stage ``s-1`` to stage ``s`` through ``merges[s]``: the whole
        merge (its token LN included), or, with ``independent_merge_ln``, the PE's own LN' then
        the merge's 2x2 concatenation and linear reduction."""
        if self.merge_norms is None:
            return merges[s](p)
        reduction = getattr(merges[s], "reduction", None)
        if not isinstance(reduction, nn.Module):
            raise TypeError(f"independent_merge_ln needs a patch merging with a 'reduction' layer at stage {s}, "
                            f"got {type(merges[s]).__name__}")
        return reduction(concat_2x2(self.merge_norms[s - 1](p)))

    def forward(self, pos0: torch.Tensor, merges: Sequence[nn.Module]):
        """``pos0``: ``(1, H, W, C)`` at stage 1; ``merges[s]`` (a PatchMerging) maps stage
        ``s-1``'s PE to stage ``s`` (``merges[0]`` is unused)."""
        if not any(self.receives) and self.last_norm is None:
            return [None] * len(self.receives), None
        terms: List[Optional[torch.Tensor]] = []
        chain = [(pos0, 0)]  # (entry, stage it lives at)
        cur = pos0           # what the next stage's chain starts from
        for s, stage_pe in enumerate(self.stages):
            if s > 0:
                cur = self.merge(s, cur, merges)
            stage_terms, _ = stage_pe(cur)
            applied = [t for t in stage_terms if t is not None]
            chain += [(t, s) for t in applied]
            terms += stage_terms
            if self.cfg.hierarchical and applied:
                cur = applied[-1]
        last = None
        if self.last_norm is not None:
            p, s = chain[self.cfg.last_ln_pe]
            for t in range(s + 1, len(self.stages)):
                p = self.merge(t, p, merges)
            last = self.last_norm(p.detach() if self.cfg.last_ln_pe_detach else p)
        return terms, last

    def truncate(self, n_stages: int, keep_last: bool) -> None:
        """Keep the first ``n_stages`` stages' LN' (a model pruned to them); drop ``LN'_last``
        unless ``keep_last`` (it lives at the last stage, so pruning stages drops it)."""
        if not 0 < n_stages <= len(self.stages):
            raise ValueError(f"truncate to {n_stages} stages; expected 1 to {len(self.stages)}")
        if n_stages < len(self.stages) or not keep_last:
            self.last_norm = None
        self.stages = self.stages[:n_stages]
        if self.merge_norms is not None:
            self.merge_norms = self.merge_norms[:n_stages - 1]
        self.receives = [r for st in self.stages for r in st.receives]


class SwinTransformerPE(SwinTransformer):
    """timm's Swin Transformer plus a learnable absolute PE and the paper's PE methods.

    Args:
        pe_method: ``"default" | "lape" | "pvg" | "mpvg"`` or a :class:`PEConfig`; Swin pools
            by GAP, a config with ``pool="token"`` is rejected.
        pe_overrides: :class:`PEConfig` fields overriding the method's.
        Other arguments: timm's :class:`SwinTransformer` (``embed_dim``, ``depths``,
        ``num_heads``, ``window_size``, ``img_size``, ``patch_size``, ...).
    """

    def __init__(self, pe_method: str | PEConfig = "default", pe_overrides: Optional[dict] = None, **kwargs):
        overrides = dict(pe_overrides or {})
        if isinstance(pe_method, str) and pe_method.lower() in ("pvg", "mpvg"):
            overrides.setdefault("include_layer0", True)  # paper: Swin's exception
        cfg = pe_config(pe_method, default_pool="avg", **overrides)
        if cfg.pool != "avg":
            raise ValueError(f"Swin has no class token: PE method {pe_method!r} with pool={cfg.pool!r}; "
                             f"expected pool='avg'")
        contract.check_pool(kwargs.get("global_pool"), False, type(self).__name__)
        super().__init__(**kwargs)
        self.pe_cfg = cfg
        for stage in self.layers:
            for blk in stage.blocks:
                # PESwinBlock only adds forward(x, pos): no state, so re-classing timm's block
                # (built by timm's stage) keeps every weight and buffer as they are.
                blk.__class__ = PESwinBlock
        depths = [len(stage.blocks) for stage in self.layers]
        dims = [info["num_chs"] for info in self.feature_info]
        grid = self.patch_embed.grid_size
        self.absolute_pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1], dims[0]))
        trunc_normal_(self.absolute_pos_embed, std=.02)
        self.pe = StagewisePE(cfg, depths, dims, nn.LayerNorm)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"absolute_pos_embed"}

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """timm's Swin head reset; ``global_pool`` ``''`` (per-position head) or ``'avg'`` (GAP)."""
        contract.check_not_folded(self, "reset_classifier")
        contract.check_pool(global_pool, False, type(self).__name__)
        super().reset_classifier(num_classes, global_pool)

    def set_input_size(self, *args, **kwargs):
        raise NotImplementedError("SwinTransformerPE keeps a fixed grid for its absolute PE; build a new model "
                                  "with img_size=... and load with mpvg.models.checkpoint.load_checkpoint_into")

    def _pos0(self) -> torch.Tensor:
        h, w = self.patch_embed.grid_size
        return self.absolute_pos_embed.reshape(1, h, w, -1)

    def _pe_terms(self):
        return self.pe(self._pos0(), [stage.downsample for stage in self.layers])

    def _run(self, x: torch.Tensor, record: Optional[dict] = None, stage_out: Optional[list] = None,
             stop: Optional[int] = None):
        """Stages (up to ``stop``) with the PE terms; the Last LN (+ ``LN'_last(pos_k)``) after the
        last stage only (it is sized for it)."""
        x = self.patch_embed(x)
        terms, last = self._pe_terms()  # once per forward, on (1, H, W, C) tensors
        if self.pe_cfg.add_at_input:
            x = x + self._pos0()
        i = 0
        for s, stage in enumerate(self.layers):
            if stop is not None and s > stop:
                return x
            x = stage.downsample(x)
            for blk in stage.blocks:
                pos = terms[i]
                if record is not None:
                    record["layer_inputs"].append(x.flatten(1, 2))
                    record["layer_tokens"].append(blk.norm1(x).flatten(1, 2))
                    record["layer_pos"].append(None if pos is None else pos.flatten(1, 2))
                    record["layer_stage"].append(s)
                if stage.grad_checkpointing and self.training and not torch.jit.is_scripting():
                    x = checkpoint(blk, x, pos, use_reentrant=False)
                else:
                    x = blk(x, pos)
                i += 1
            if stage_out is not None:
                stage_out.append(x)
        y = self.norm(x)
        if record is not None:
            record.update(pre_last_ln=x.flatten(1, 2), post_last_ln=y.flatten(1, 2),
                          last_ln_pe=None if last is None else last.flatten(1, 2))
        return y if last is None else y + last

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """NHWC features after the Last LN (plus ``LN'_last(pos_k)`` for MPVG)."""
        return self._run(x)

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False):
        """timm's Swin ``forward_intermediates`` (per-stage NCHW maps) through the PE path: each
        block gets its term as in ``forward``.  ``norm`` applies the Last LN stage (with MPVG's
        ``LN'_last(pos_k)``) to the last stage's map, the only one it is sized for.  The final
        output equals ``forward_features(x)`` unless ``stop_early`` ends the run early."""
        contract.check_output_fmt(output_fmt, ("NCHW",))
        take, max_index = feature_take_indices(len(self.layers), indices)
        n = len(self.layers)
        stages: list = []
        final = self._run(x, stage_out=stages, stop=max_index if stop_early else None)
        if norm and n - 1 in take:
            stages[n - 1] = final  # the last stage through the Last LN stage: what forward_features returns
        inter = [stages[i].permute(0, 3, 1, 2).contiguous() for i in take]
        return inter if intermediates_only else (final, inter)

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """timm's Swin pruning, and the stage-wise PE pruned with the stages (``LN'_last`` goes with
        the Last LN, which timm drops when it prunes the norm or the last stage)."""
        contract.check_not_folded(self, "prune_intermediate_layers")
        n_before = len(self.layers)
        take = super().prune_intermediate_layers(indices, prune_norm=prune_norm, prune_head=prune_head)
        n = len(self.layers)
        self.pe.truncate(n, keep_last=not prune_norm and n == n_before)
        return take

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """What the head does to ``(B, N, C)`` tokens: GAP (``global_pool='avg'``) or nothing (``''``)."""
        return x.mean(dim=1) if self.global_pool == "avg" else x

    def last_ln_pe_term(self) -> Optional[torch.Tensor]:
        """``LN'_last(pos_k)`` at the last stage, ``(1, N, C)``, or ``None``; its ``pool`` is what
        a head bias absorbs when folding (the head's linear layer is ``head.fc``)."""
        last = self._pe_terms()[1]
        return None if last is None else last.flatten(1, 2)

    @torch.no_grad()
    def forward_analysis(self, x: torch.Tensor) -> dict:
        """What applies of docs/contracts.md's analysis dict, tokens flattened to ``(B, H*W, C)``.

        Per-block lists (``layer_inputs``, ``layer_tokens``, ``layer_pos``) change width and grid
        at stage boundaries; ``layer_stage`` gives each block's stage.  ``pre_last_ln``,
        ``post_last_ln`` (without the PE term) and ``last_ln_pe`` are at the last stage.
        """
        record = {"layer_inputs": [], "layer_tokens": [], "layer_pos": [], "layer_stage": []}
        self._run(x, record)
        record["num_prefix_tokens"] = 0
        return record


#: microsoft/Swin-Transformer evaluates with data/build.py (TEST.CROP: resize 256/224 x 224
#: bicubic, centre crop 224, ImageNet mean/std); the absolute PE fixes the input size.
default_cfgs = generate_default_cfgs({
    "mpvg_swin_tiny_patch4_window7_224": dict(
        num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.875, interpolation="bicubic",
        fixed_input_size=True, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
        first_conv="patch_embed.proj", classifier="head.fc", license="mit"),
})


@register_model
def mpvg_swin_tiny_patch4_window7_224(pretrained: bool = False, **kwargs) -> SwinTransformerPE:
    """Swin-T: patch 4, embed 96, depths (2, 2, 6, 2), heads (3, 6, 12, 24), window 7, GAP."""
    args = dict(patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
    stages = len(kwargs.get("depths", args["depths"]))
    return contract.build(SwinTransformerPE, "mpvg_swin_tiny_patch4_window7_224", pretrained, args, kwargs,
                          default_out_indices=tuple(range(stages)))
