"""Transformer blocks that accept a per-layer PE term (Eq. 6/9): ``MSA(LN_l(x) + P_l) + x``."""
from __future__ import annotations

from typing import Optional

import torch
from timm.models.vision_transformer import Block


class PEBlock(Block):
    """timm's ViT :class:`~timm.models.vision_transformer.Block` whose attention input is
    ``norm1(x) + pos`` when a PE term ``pos`` (shape ``(1, N, D)``, broadcast over the batch)
    is given, and exactly timm's block when it is not."""

    def forward(self, x: torch.Tensor, pos: Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
        h = self.norm1(x)
        if pos is not None:
            h = h + pos
        x = x + self.drop_path1(self.ls1(self.attn(h, **kwargs)))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


def set_qk_scale(block: Block, qk_scale: float) -> None:
    """Scale the attention logits of ``block`` by ``qk_scale`` instead of ``head_dim ** -0.5``
    (the ``qk_scale`` argument of the original T2T-ViT / CeiT code).  timm's fused attention
    always uses the default scale, so the block takes timm's explicit path, which multiplies
    ``q`` by ``attn.scale``; the weights and their names are unchanged."""
    if not qk_scale > 0:
        raise ValueError(f"qk_scale must be a positive number, got {qk_scale!r}")
    block.attn.scale = float(qk_scale)
    block.attn.fused_attn = False
