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
