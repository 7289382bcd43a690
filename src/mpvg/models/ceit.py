"""CeiT-Ti (Yuan et al. 2021a, "Incorporating convolution designs into visual transformers")
with every PE method of the paper.

Structure follows the reference code (coeusguo/ceit, ``ceit_model.py``), checked by the
#Params of the paper's Table 1 (Default 6,356,904 -> 6.356):

* I2T stem: conv 7x7 stride 2 (3 -> 64 channels, no bias), BN, max-pool 3x3 stride 2, then a
  patch-embedding conv (kernel = stride = ``patch_size`` = 4) to ``embed_dim``.  The
  reference's ``Image2Tokens`` defaults to 64 channels (the count needs 64: 32 gives 6.253M).
* 12 blocks (dim 192, 3 heads) whose feed-forward is LeFF: 1x1 conv (x4) + BN + GELU,
  depthwise 3x3 + BN + GELU, 1x1 conv back + BN, on the patch grid; prefix tokens (the class
  token) bypass it, i.e. its LeFF output is its input, as in the reference.
* LCA: a standard transformer block over the per-layer summary tokens plus a learnable
  per-layer embedding (zero-initialised as in the reference); its last output token goes
  through the Last LN (``norm``) and the head.

How the PE methods reach CeiT (``pe.py`` defines them, Eq. 5-11):

* Default/LaPE keep CeiT's class-token readout: LCA attends over the per-layer class tokens.
* PVG/MPVG use GAP: the per-layer summary token given to LCA is the mean of the patch tokens
  of that layer's output (LCA keeps its parameters and role).  The paper does not say how CeiT
  drops its class token; its #Params decide: PVG 6.361 needs 384 parameters beyond a model
  without the class token and its PE row (that model has 6,360,744 -> 6.360), exactly the
  class token (192) plus its PE row (192).  So the class token stays in the sequence (it is
  attended to and bypasses LeFF as before) but is never read out.  ``class_token=False``
  builds the variant without it (then only GAP is possible).
* MPVG's Last LN acts on the LCA output token, so its PE term is the GAP of the term:
  ``y = LN(lca) + mean_patches(LN'_last(pos_k))`` (the mean over patch tokens of
  ``LN(x) + P`` as in DeiT with GAP), which a head bias can absorb.

Counts (1000 classes, 224): Default 6,356,904; LaPE 6,361,512; PVG 6,361,128;
MPVG 6,361,512 -> 6.356 / 6.361 / 6.361 / 6.361 as in Table 1 (docs/models-ceit-swin.md).
"""
from __future__ import annotations

from functools import partial
from typing import Optional

import torch
from torch import nn
from timm.layers import calculate_drop_path_rates, trunc_normal_
from timm.models import register_model
from timm.models.vision_transformer import Block

from .blocks import PEBlock
from .pe import LayerwisePE, PEConfig, pe_config

__all__ = ["CeiT", "Image2Tokens", "LeFF", "mpvg_ceit_tiny_patch16_224"]


class Image2Tokens(nn.Module):
    """CeiT's I2T stem: low-level features from a small conv stem, then patch embedding.

    Output: ``(B, grid_h * grid_w, embed_dim)``.
    """

    def __init__(self, img_size: int = 224, in_chans: int = 3, stem_chans: int = 64,
                 patch_size: int = 4, embed_dim: int = 192):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, stem_chans, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn = nn.BatchNorm2d(stem_chans)
        self.pool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.proj = nn.Conv2d(stem_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        side = (img_size - 1) // 2 + 1   # conv 7x7 / 2, padding 3
        side = (side - 1) // 2 + 1       # max-pool 3x3 / 2, padding 1
        if side < patch_size:
            raise ValueError(f"img_size={img_size} gives a {side}x{side} stem output, smaller than "
                             f"patch_size={patch_size}; expected img_size >= {4 * patch_size}")
        self.grid_size = (side // patch_size, side // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.bn(self.conv(x)))
        return self.proj(x).flatten(2).transpose(1, 2)


class LeFF(nn.Module):
    """Locally-enhanced feed-forward: pointwise expand, depthwise conv on the patch grid,
    pointwise project, each followed by BN (GELU after the first two).

    Called by timm's :class:`Block` as its ``mlp_layer`` (so it accepts that signature);
    ``num_prefix_tokens`` leading tokens (the class token) are passed through unchanged.
    """

    def __init__(self, in_features: int, hidden_features: Optional[int] = None,
                 out_features: Optional[int] = None, act_layer=nn.GELU, drop: float = 0.,
                 grid_size: tuple[int, int] = (14, 14), num_prefix_tokens: int = 1,
                 kernel_size: int = 3, norm_layer=None, bias: bool = True, **_unused):
        super().__init__()
        hidden = hidden_features or in_features
        out_features = out_features or in_features
        self.grid_size = tuple(grid_size)
        self.num_prefix_tokens = num_prefix_tokens
        self.conv1 = nn.Conv2d(in_features, hidden, 1)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.conv2 = nn.Conv2d(hidden, hidden, kernel_size, padding=(kernel_size - 1) // 2, groups=hidden)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.conv3 = nn.Conv2d(hidden, out_features, 1)
        self.bn3 = nn.BatchNorm2d(out_features)
        self.act = act_layer()
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.num_prefix_tokens
        prefix, tokens = x[:, :p], x[:, p:]
        B, N, C = tokens.shape
        h, w = self.grid_size
        if N != h * w:
            raise ValueError(f"LeFF expected {h}x{w}={h * w} patch tokens, got {N}")
        t = tokens.transpose(1, 2).reshape(B, C, h, w)
        t = self.act(self.bn1(self.conv1(t)))
        t = self.act(self.bn2(self.conv2(t)))
        t = self.bn3(self.conv3(t))
        t = self.drop(t.flatten(2).transpose(1, 2))
        return torch.cat((prefix, t), dim=1)


class CeiT(nn.Module):
    """CeiT with a configurable PE method (see the module docstring for the choices).

    Args:
        pe_method: ``"default" | "lape" | "pvg" | "mpvg"`` or a :class:`PEConfig`.
        pe_overrides: :class:`PEConfig` fields overriding the method's (ablations).
        class_token: keep the class token in the sequence (needed for ``pool="token"``).
        stem_chans, patch_size, leff_kernel_size: I2T / LeFF sizes (reference: 64, 4, 3).
        The other arguments are as in timm's VisionTransformer.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 4, in_chans: int = 3,
                 num_classes: int = 1000, embed_dim: int = 192, depth: int = 12, num_heads: int = 3,
                 mlp_ratio: float = 4., qkv_bias: bool = True, stem_chans: int = 64,
                 leff_kernel_size: int = 3, class_token: bool = True, drop_rate: float = 0.,
                 pos_drop_rate: float = 0., proj_drop_rate: float = 0., attn_drop_rate: float = 0.,
                 drop_path_rate: float = 0., norm_layer=None,
                 pe_method: str | PEConfig = "default", pe_overrides: Optional[dict] = None):
        super().__init__()
        cfg = pe_config(pe_method, default_pool="token", **(pe_overrides or {}))
        if cfg.pool == "token" and not class_token:
            raise ValueError(f"PE method {pe_method!r} reads out the class token (pool='token') "
                             f"but class_token=False; expected class_token=True or pool='avg'")
        norm_layer = norm_layer or partial(nn.LayerNorm, eps=1e-6)
        self.pe_cfg = cfg
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1 if class_token else 0
        self.global_pool = cfg.pool

        self.i2t = Image2Tokens(img_size, in_chans, stem_chans, patch_size, embed_dim)
        n_tokens = self.i2t.num_patches + self.num_prefix_tokens
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, n_tokens, embed_dim))
        self.pos_drop = nn.Dropout(pos_drop_rate)
        self.pe = LayerwisePE(cfg, depth, embed_dim, norm_layer)

        leff = partial(LeFF, grid_size=self.i2t.grid_size, num_prefix_tokens=self.num_prefix_tokens,
                       kernel_size=leff_kernel_size)
        dpr = calculate_drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.ModuleList([
            PEBlock(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop_rate,
                    attn_drop=attn_drop_rate, drop_path=dpr[i], norm_layer=norm_layer, mlp_layer=leff)
            for i in range(depth)])
        # layer-wise class(-summary) token attention; no drop path, as in the reference
        self.lca = Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                         proj_drop=proj_drop_rate, attn_drop=attn_drop_rate, norm_layer=norm_layer)
        self.pos_layer_embed = nn.Parameter(torch.zeros(1, depth, embed_dim))
        self.norm = norm_layer(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

        trunc_normal_(self.pos_embed, std=.02)
        if self.cls_token is not None:
            trunc_normal_(self.cls_token, std=.02)
        self.apply(_init_weights)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", "pos_layer_embed"}

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool is not None and global_pool != self.global_pool:
            raise ValueError(f"CeiT's pooling is fixed by its PE method ({self.global_pool!r}); got "
                             f"global_pool={global_pool!r}")
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        x = self.i2t(x)
        if self.cls_token is not None:
            x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        return x

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N, D)`` -> ``(B, D)``: the class token, or GAP over the patch tokens.  Gives the
        per-layer token LCA sees and the pooled Last-LN PE term (mpvg.models.fold uses it)."""
        return x[:, 0] if self.global_pool == "token" else x[:, self.num_prefix_tokens:].mean(dim=1)

    def _run(self, x: torch.Tensor, record: Optional[dict] = None) -> torch.Tensor:
        x = self._tokens(x)
        terms, last = self.pe(self.pos_embed)  # once per forward, on (1, N, D)
        if self.pe_cfg.add_at_input:
            x = x + self.pos_embed
        x = self.pos_drop(x)
        summaries = []
        for blk, pos in zip(self.blocks, terms):
            if record is not None:
                record["layer_inputs"].append(x)
                record["layer_tokens"].append(blk.norm1(x))
            x = blk(x, pos)
            summaries.append(self.pool(x))
        s = torch.stack(summaries, dim=1) + self.pos_layer_embed
        s = self.lca(s)[:, -1]
        y = self.norm(s)
        if record is not None:
            record.update(layer_pos=terms, pre_last_ln=s[:, None], post_last_ln=y[:, None], last_ln_pe=last)
        return y if last is None else y + self.pool(last)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features after the Last LN (and its PE term for MPVG): ``(B, D)``."""
        return self._run(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def last_ln_pe_term(self) -> Optional[torch.Tensor]:
        """``LN'_last(pos_k)`` per token, ``(1, N, D)``, or ``None``; ``pool`` of it is what is
        added after the Last LN and what a head bias absorbs when folding."""
        return self.pe(self.pos_embed)[1]

    @torch.no_grad()
    def forward_analysis(self, x: torch.Tensor) -> dict:
        """Per-layer tensors for the analysis (docs/contracts.md).

        ``layer_inputs``/``layer_tokens`` are ``(B, N, D)`` with the class token first
        (``num_prefix_tokens``), ``layer_pos`` ``(1, N, D)`` or ``None``.  CeiT's Last LN
        normalises the single LCA output token, so ``pre_last_ln``/``post_last_ln`` are
        ``(B, 1, D)``; ``last_ln_pe`` is ``LN'_last(pos_k)`` per token ``(1, N, D)`` (its mean
        over the patch tokens is what is added) or ``None``.
        """
        record = {"layer_inputs": [], "layer_tokens": []}
        self._run(x, record)
        record["num_prefix_tokens"] = self.num_prefix_tokens
        return record


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def _no_pretrained(name: str, pretrained: bool, kwargs: dict) -> None:
    """Drop timm's create_model bookkeeping kwargs; nothing is ever downloaded."""
    if pretrained:
        raise ValueError(f"{name}: no pretrained weights (nothing is downloaded); expected pretrained=False")
    for k in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(k, None)


@register_model
def mpvg_ceit_tiny_patch16_224(pretrained: bool = False, pe_method: str | PEConfig = "default",
                               pe_overrides: Optional[dict] = None, **kwargs) -> CeiT:
    """CeiT-Ti: I2T stem (64 ch) + patch 4 (stride 16 overall), dim 192, 12 blocks, 3 heads."""
    _no_pretrained("mpvg_ceit_tiny_patch16_224", pretrained, kwargs)
    args = dict(patch_size=4, embed_dim=192, depth=12, num_heads=3, mlp_ratio=4., qkv_bias=True)
    return CeiT(**{**args, **kwargs}, pe_method=pe_method, pe_overrides=pe_overrides)
