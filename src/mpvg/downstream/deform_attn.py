"""Multi-scale deformable attention (Zhu et al., Deformable DETR) in pure PyTorch.

ViT-Adapter's injectors and extractors are built on it.  The original ships a CUDA kernel
(``ops/src/cuda/ms_deform_attn_cuda.cu``) that needs compiling against a matching toolkit;
here the sampling is :func:`torch.nn.functional.grid_sample` (bilinear, zero padding,
``align_corners=False``), which is the same arithmetic as that kernel (a sampling location
``(x, y)`` in ``[0, 1]`` reads pixel ``(x * W - 0.5, y * H - 0.5)``; taps outside the map
read zero), so it runs on CPU and GPU alike and needs no build step.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

Shapes = Sequence[tuple[int, int]]


def ms_deform_attn(value: torch.Tensor, spatial_shapes: Shapes, sampling_locations: torch.Tensor,
                   attention_weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum of bilinear samples of ``value`` over levels and points.

    Args:
        value: ``(B, S, M, Dh)``, the levels flattened one after another (``S = sum H_l W_l``).
        spatial_shapes: ``[(H_l, W_l), ...]`` as Python ints (no device sync).
        sampling_locations: ``(B, Lq, M, L, P, 2)``, ``(x, y)`` normalised to ``[0, 1]``.
        attention_weights: ``(B, Lq, M, L, P)`` (already softmax-normalised over ``L * P``).

    Returns:
        ``(B, Lq, M * Dh)``, in float32 (or wider) whatever the inputs' dtype.

    Under autocast the sampling runs in float32, as ViT-Adapter's ``MSDeformAttnFunction``
    (``custom_fwd(cast_inputs=torch.float32)``): a bf16 sampling grid has 8 bits, so at a
    128-pixel-wide level (COCO's 1024 crop at stride 8) locations would snap to half pixels and
    the offsets' gradients would be mostly rounding noise.
    """
    dtype = torch.promote_types(value.dtype, torch.float32)
    with torch.autocast(value.device.type, enabled=False):
        return _ms_deform_attn(value.to(dtype), spatial_shapes, sampling_locations.to(dtype),
                               attention_weights.to(dtype))


def _ms_deform_attn(value: torch.Tensor, spatial_shapes: Shapes, sampling_locations: torch.Tensor,
                    attention_weights: torch.Tensor) -> torch.Tensor:
    B, S, M, Dh = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    if sum(h * w for h, w in spatial_shapes) != S:
        raise ValueError(f"spatial_shapes {list(spatial_shapes)} cover {sum(h * w for h, w in spatial_shapes)} "
                         f"positions but value has {S}")
    values = value.split([h * w for h, w in spatial_shapes], dim=1)
    grids = 2 * sampling_locations - 1  # grid_sample's [-1, 1] coordinates
    sampled = []
    for lvl, (h, w) in enumerate(spatial_shapes):
        # (B, HW, M, Dh) -> (B*M, Dh, H, W)
        v = values[lvl].permute(0, 2, 3, 1).reshape(B * M, Dh, h, w)
        # (B, Lq, M, P, 2) -> (B*M, Lq, P, 2)
        g = grids[:, :, :, lvl].transpose(1, 2).reshape(B * M, Lq, P, 2)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    # (B*M, Dh, Lq, L, P) * (B*M, 1, Lq, L, P) -> sum over L, P
    stacked = torch.stack(sampled, dim=-2)
    weights = attention_weights.transpose(1, 2).reshape(B * M, 1, Lq, L, P)
    out = (stacked * weights).sum(dim=(-2, -1))  # (B*M, Dh, Lq)
    return out.view(B, M * Dh, Lq).transpose(1, 2).contiguous()


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention with Deformable DETR's parameters and initialisation.

    Each query attends to ``n_points`` learned offsets around its reference point in each of
    ``n_levels`` feature maps, per head.  ``ratio`` shrinks the value projection (ViT-Adapter's
    ``deform_ratio``).  Parameter names follow the original so its checkpoints would map 1:1.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4,
                 ratio: float = 1.0):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        value_dim = int(d_model * ratio)
        if value_dim % n_heads != 0:
            raise ValueError(f"d_model * ratio ({value_dim}) must be divisible by n_heads ({n_heads})")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.ratio = ratio
        self.value_dim = value_dim
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, value_dim)
        self.output_proj = nn.Linear(value_dim, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Offsets start on a ring (head ``m`` points in direction ``2 pi m / M``, point ``p``
        at distance ``p + 1``), attention starts uniform; projections Xavier."""
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.n_heads, 1, 1, 2)
        grid = grid.repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(self, query: torch.Tensor, reference_points: torch.Tensor, input_flatten: torch.Tensor,
                spatial_shapes: Shapes, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Args:
            query: ``(B, Lq, C)``.
            reference_points: ``(B or 1, Lq, n_levels or 1, 2)``, ``(x, y)`` in ``[0, 1]``.
            input_flatten: ``(B, S, C)``, the ``n_levels`` maps flattened and concatenated.
            spatial_shapes: ``[(H_l, W_l), ...]`` of those maps.
            padding_mask: optional ``(B, S)``, ``True`` where the input is padding.
        """
        B, Lq, _ = query.shape
        S = input_flatten.shape[1]
        if len(spatial_shapes) != self.n_levels:
            raise ValueError(f"expected {self.n_levels} levels, got spatial_shapes {list(spatial_shapes)}")
        value = self.value_proj(input_flatten)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.view(B, S, self.n_heads, self.value_dim // self.n_heads)
        offsets = self.sampling_offsets(query).view(B, Lq, self.n_heads, self.n_levels, self.n_points, 2)
        weights = self.attention_weights(query).view(B, Lq, self.n_heads, self.n_levels * self.n_points)
        weights = weights.softmax(-1).view(B, Lq, self.n_heads, self.n_levels, self.n_points)
        # offsets are in pixels of each level: normalise by (W_l, H_l)
        normalizer = torch.tensor([[w, h] for h, w in spatial_shapes], dtype=offsets.dtype, device=offsets.device)
        locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        out = ms_deform_attn(value, spatial_shapes, locations, weights)
        return self.output_proj(out)
