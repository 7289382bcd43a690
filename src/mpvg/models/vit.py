"""The ViT family of the paper: DeiT-Ti/S/B, T2T-ViT-7 and ViT-Lite-7/4 as one class.

:class:`MPVGVisionTransformer` is a timm-style ``nn.Module`` (``forward_features`` /
``forward_head`` / ``forward``) whose constructor variants pick

* the tokenizer: ``"patch"`` (DeiT: timm's :class:`~timm.layers.PatchEmbed`, a 16x16 conv),
  ``"t2t"`` (T2T-ViT: tokens-to-token module with Performer attention, Yuan et al. 2021,
  ``yitu-opensource/T2T-ViT`` ``models/t2t_vit.py`` + ``token_performer.py``) or ``"conv"``
  (ViT-Lite: Compact-Transformers' ``Tokenizer`` with one conv, kernel = stride = patch size,
  padding 0, bias, no activation, no max-pool: the same layer as a patch embedding, with
  Kaiming-normal init);
* the block: ``"pre"`` (timm's pre-norm block, DeiT and T2T-ViT) or ``"vit_lite"``
  (Compact-Transformers' ``TransformerEncoderLayer``: ``x = x + MSA(LN1(x)); x = LN2(x);
  x = x + MLP(x)``, qkv without bias);
* the initial PE: ``"learn"`` (DeiT, ViT-Lite) or ``"sincos1d"`` (T2T-ViT's fixed 1-D sinusoid
  table, stored as a non-trainable ``nn.Parameter`` as in the original, so it counts in #Params).

The PE method (Default, LaPE, PVG, MPVG and the ablation knobs) comes from a
:class:`~mpvg.models.pe.PEConfig`: the LN' chain is evaluated once per forward on the
``(1, N, D)`` PE by :class:`~mpvg.models.pe.LayerwisePE` and broadcast over the batch.
With ``pool="avg"`` the model has no class token and its PE has ``N`` positions (``N + 1``
with the class token).  MPVG (Eq. 11): ``y = LN(x_{L+1}) + LN'_last(pos_k)``, then GAP, then
the head.

Models are registered with timm (``mpvg_deit_{tiny,small,base}_patch16_224``,
``mpvg_t2t_vit_7``, ``mpvg_vit_lite_7_4``)::

    timm.create_model("mpvg_deit_tiny_patch16_224", pe_method="mpvg",
                      pe_overrides={"last_ln_pe": 5}, num_classes=1000, embed_dim=64, depth=2)
"""
from __future__ import annotations

import math
from functools import partial
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import LayerNorm, Mlp, PatchEmbed, resample_abs_pos_embed, trunc_normal_
from timm.models import generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from . import contract
from .blocks import PEBlock, set_qk_scale
from .pe import LayerwisePE, PEConfig, pe_config

__all__ = [
    "MPVGVisionTransformer",
    "T2TModule",
    "TokenPerformer",
    "ViTLiteBlock",
    "sinusoid_table",
]

CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)  # Compact-Transformers configs/datasets/cifar100.yml
CIFAR100_STD = (0.2675, 0.2565, 0.2761)


def sinusoid_table(n_position: int, d_hid: int) -> torch.Tensor:
    """T2T-ViT's ``get_sinusoid_encoding`` (float64 in numpy, then float32): ``(1, n, d)``."""
    pos = np.arange(n_position, dtype=np.float64)[:, None]
    hid = np.arange(d_hid)
    table = pos / np.power(10000, 2 * (hid // 2) / d_hid)
    table[:, 0::2] = np.sin(table[:, 0::2])
    table[:, 1::2] = np.cos(table[:, 1::2])
    return torch.from_numpy(table).float().unsqueeze(0)


# --------------------------------------------------------------------------------------
# Tokenizers.  Each returns NHWC tokens (B, h, w, D) so the model knows the token grid.
# --------------------------------------------------------------------------------------
class TokenPerformer(nn.Module):
    """T2T-ViT's ``Token_performer`` (one head, positive random features, kernel ratio 0.5).

    Parameter names match the original.  The random-feature matrix ``w`` is a non-trainable
    ``nn.Parameter`` (orthogonal rows scaled by ``sqrt(m)``) exactly as in the original, so it
    is saved in checkpoints and counted in #Params.  The kernel arithmetic runs in float32
    (the original casts to float as well) with autocast off, which keeps ``exp`` stable
    under mixed precision.
    """

    def __init__(self, dim: int, in_dim: int, head_cnt: int = 1, kernel_ratio: float = 0.5,
                 dp1: float = 0.1, dp2: float = 0.1):
        super().__init__()
        self.emb = in_dim * head_cnt
        self.kqv = nn.Linear(dim, 3 * self.emb)
        self.dp = nn.Dropout(dp1)
        self.proj = nn.Linear(self.emb, self.emb)
        self.head_cnt = head_cnt
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(self.emb)
        self.epsilon = 1e-8
        self.mlp = nn.Sequential(
            nn.Linear(self.emb, self.emb),
            nn.GELU(),
            nn.Linear(self.emb, self.emb),
            nn.Dropout(dp2),
        )
        self.m = int(self.emb * kernel_ratio)
        self.w = nn.Parameter(torch.empty(self.m, self.emb), requires_grad=False)
        self.reset_random_features()

    def reset_random_features(self) -> None:
        with torch.no_grad():
            if self.w.is_meta:
                return
            w = torch.randn(self.m, self.emb, device=self.w.device)
            self.w.copy_(nn.init.orthogonal_(w) * math.sqrt(self.m))

    def prm_exp(self, x: torch.Tensor) -> torch.Tensor:
        # exp(w^T x - |x|^2 / 2) / sqrt(m): positive random features of the softmax kernel
        xd = (x * x).sum(dim=-1, keepdim=True) / 2
        wtx = x @ self.w.t()
        return torch.exp(wtx - xd) / math.sqrt(self.m)

    def single_attn(self, x: torch.Tensor) -> torch.Tensor:
        k, q, v = torch.split(self.kqv(x), self.emb, dim=-1)
        with torch.autocast(device_type=x.device.type, enabled=False):
            k, q, vf = k.float(), q.float(), v.float()
            kp, qp = self.prm_exp(k), self.prm_exp(q)  # (B, T, m)
            d = qp @ kp.sum(dim=1).unsqueeze(-1)  # (B, T, 1)
            kptv = vf.transpose(1, 2) @ kp  # (B, emb, m)
            y = (qp @ kptv.transpose(1, 2)) / (d + self.epsilon)  # (B, T, emb)
        y = y.to(v.dtype)
        return v + self.dp(self.proj(y))  # v as the skip connection, as in the original

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.single_attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def _unfold_size(n: int, k: int, s: int, p: int) -> int:
    return (n + 2 * p - k) // s + 1


class T2TModule(nn.Module):
    """Tokens-to-token module (``tokens_type='performer'``) of T2T-ViT.

    Soft split (unfold) 7/4/2, Performer, soft split 3/2/1, Performer, soft split 3/2/1,
    linear projection to ``embed_dim``.  Submodule names match the original's
    ``tokens_to_token`` so original checkpoints load after renaming that prefix to
    ``patch_embed``.
    """

    def __init__(self, img_size: int | Sequence[int] = 224, in_chans: int = 3, embed_dim: int = 256,
                 token_dim: int = 64, kernel_ratio: float = 0.5, drop: float = 0.1,
                 kernels: Sequence[int] = (7, 3, 3), strides: Sequence[int] = (4, 2, 2),
                 paddings: Sequence[int] = (2, 1, 1)):
        super().__init__()
        k, s, p = tuple(kernels), tuple(strides), tuple(paddings)
        self.soft_split0 = nn.Unfold(kernel_size=(k[0], k[0]), stride=(s[0], s[0]), padding=(p[0], p[0]))
        self.soft_split1 = nn.Unfold(kernel_size=(k[1], k[1]), stride=(s[1], s[1]), padding=(p[1], p[1]))
        self.soft_split2 = nn.Unfold(kernel_size=(k[2], k[2]), stride=(s[2], s[2]), padding=(p[2], p[2]))
        self.attention1 = TokenPerformer(dim=in_chans * k[0] * k[0], in_dim=token_dim,
                                         kernel_ratio=kernel_ratio, dp1=drop, dp2=drop)
        self.attention2 = TokenPerformer(dim=token_dim * k[1] * k[1], in_dim=token_dim,
                                         kernel_ratio=kernel_ratio, dp1=drop, dp2=drop)
        self.project = nn.Linear(token_dim * k[2] * k[2], embed_dim)
        self._ksp = (k, s, p)
        img = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.img_size = img
        self.grid_size = self.token_grid(*img)
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    def token_grid(self, h: int, w: int) -> tuple[int, int]:
        k, s, p = self._ksp
        for i in range(3):
            h, w = _unfold_size(h, k[i], s[i], p[i]), _unfold_size(w, k[i], s[i], p[i])
        return h, w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, s, p = self._ksp
        B, _, h, w = x.shape
        x = self.soft_split0(x).transpose(1, 2)
        h, w = _unfold_size(h, k[0], s[0], p[0]), _unfold_size(w, k[0], s[0], p[0])
        x = self.attention1(x)
        x = x.transpose(1, 2).reshape(B, x.shape[-1], h, w)
        x = self.soft_split1(x).transpose(1, 2)
        h, w = _unfold_size(h, k[1], s[1], p[1]), _unfold_size(w, k[1], s[1], p[1])
        x = self.attention2(x)
        x = x.transpose(1, 2).reshape(B, x.shape[-1], h, w)
        x = self.soft_split2(x).transpose(1, 2)
        h, w = _unfold_size(h, k[2], s[2], p[2]), _unfold_size(w, k[2], s[2], p[2])
        x = self.project(x)
        return x.reshape(B, h, w, x.shape[-1])


# --------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------
class ViTLiteBlock(PEBlock):
    """Compact-Transformers' ``TransformerEncoderLayer`` with the PE term of Eq. 6/9.

    ``x = x + MSA(LN1(x) + P); x = LN2(x); x = x + MLP(x)`` (``norm1`` is the original's
    ``pre_norm``, ``norm2`` its ``norm1``, applied to the residual stream itself).
    """

    def forward(self, x: torch.Tensor, pos: Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
        h = self.norm1(x)
        if pos is not None:
            h = h + pos
        x = x + self.drop_path1(self.ls1(self.attn(h, **kwargs)))
        x = self.norm2(x)
        x = x + self.drop_path2(self.ls2(self.mlp(x)))
        return x


# --------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------
class MPVGVisionTransformer(contract.TokenModel, nn.Module):
    """ViT with the PE methods of the paper.  See the module docstring.

    Args:
        img_size, patch_size, in_chans, num_classes, embed_dim, depth, num_heads, mlp_ratio,
        qkv_bias: as in timm's ``VisionTransformer`` (``patch_size`` is unused by ``"t2t"``).
        pe_method: ``default | lape | pvg | mpvg`` (any case) or a :class:`PEConfig`.
        pe_overrides: fields of :class:`PEConfig` to override (ablations).
        tokenizer: ``"patch"`` | ``"t2t"`` | ``"conv"``.
        block: ``"pre"`` | ``"vit_lite"``.
        pos_embed_type: ``"learn"`` | ``"sincos1d"``.
        init_style: ``"timm"`` (DeiT: the DeiT/LaPE code's timm-0.3 ViT init: PE and class
            token trunc-normal 0.02, linear trunc-normal 0.02, LN 1/0, patch conv PyTorch
            default), ``"t2t"`` (same, fixed PE) or ``"cct"`` (ViT-Lite: class token zeros, PE
            trunc-normal 0.2, Kaiming-normal tokenizer conv): the original repositories' inits.
        norm_layer: LayerNorm class for the blocks, the Last LN and the LN's (DeiT: timm's
            eps=1e-6; T2T-ViT and ViT-Lite: ``nn.LayerNorm`` eps=1e-5 as in their repos).
        token_dim, t2t_kernel_ratio, t2t_drop: T2T module (Performer) settings.
        drop_rate: dropout before the head; pos_drop_rate: after adding the PE at the input;
        proj_drop_rate: attention projection and MLP dropout; attn_drop_rate; drop_path_rate.
        global_pool: the head's readout, as timm's ViT: ``None`` (the PE method's: class token
            for Default/LaPE, GAP for PVG/MPVG), ``'avg'`` (mean of the patch tokens),
            ``'token'`` (the class token; only where the method keeps one) or ``''`` (no
            pooling: ``forward`` returns per-token outputs).  The class token itself is part of
            the PE method (``pe_overrides={'pool': ...}``), not of the readout.
        qk_scale: attention logit scale; ``None`` is timm's ``head_dim ** -0.5``.  The original
            T2T-ViT code takes it as an argument (see docs/models.md for what its released
            weights need).
    """

    def __init__(
            self,
            img_size: int | Sequence[int] = 224,
            patch_size: int = 16,
            in_chans: int = 3,
            num_classes: int = 1000,
            embed_dim: int = 768,
            depth: int = 12,
            num_heads: int = 12,
            mlp_ratio: float = 4.0,
            qkv_bias: bool = True,
            pe_method: str | PEConfig = "default",
            pe_overrides: Optional[dict] = None,
            tokenizer: str = "patch",
            block: str = "pre",
            pos_embed_type: str = "learn",
            init_style: str = "timm",
            norm_layer: Any = None,
            token_dim: int = 64,
            t2t_kernel_ratio: float = 0.5,
            t2t_drop: float = 0.1,
            drop_rate: float = 0.0,
            pos_drop_rate: float = 0.0,
            proj_drop_rate: float = 0.0,
            attn_drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            global_pool: Optional[str] = None,
            qk_scale: Optional[float] = None,
    ):
        super().__init__()
        cfg = pe_config(pe_method, default_pool="token", **(pe_overrides or {}))
        contract.check_pool(global_pool, cfg.pool == "token", type(self).__name__)
        if tokenizer not in ("patch", "t2t", "conv"):
            raise ValueError(f"tokenizer must be 'patch', 't2t' or 'conv', got {tokenizer!r}")
        if block not in ("pre", "vit_lite"):
            raise ValueError(f"block must be 'pre' or 'vit_lite', got {block!r}")
        if pos_embed_type not in ("learn", "sincos1d"):
            raise ValueError(f"pos_embed_type must be 'learn' or 'sincos1d', got {pos_embed_type!r}")
        norm_layer = norm_layer or partial(LayerNorm, eps=1e-6)

        self.pe_cfg = cfg
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = cfg.pool if global_pool is None else global_pool
        self.qk_scale = qk_scale
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.has_class_token = cfg.pool == "token"
        self.num_prefix_tokens = 1 if self.has_class_token else 0
        self.tokenizer_type, self.block_type = tokenizer, block
        self.pos_embed_type, self.init_style = pos_embed_type, init_style
        self.grad_checkpointing = False
        self._fold_grid: Optional[tuple[int, int]] = None  # set by fold.fold_last_ln_pe

        if tokenizer == "t2t":
            self.patch_embed = T2TModule(img_size=img_size, in_chans=in_chans, embed_dim=embed_dim,
                                         token_dim=token_dim, kernel_ratio=t2t_kernel_ratio, drop=t2t_drop)
        else:  # "patch" (DeiT) and "conv" (ViT-Lite tokenizer: one conv k=s=patch, p=0, bias)
            self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                          embed_dim=embed_dim, bias=True, flatten=False,
                                          output_fmt="NHWC", strict_img_size=False)
        self.grid_size = tuple(self.patch_embed.grid_size)
        num_patches = self.grid_size[0] * self.grid_size[1]
        # input pixels per token side: patch size, or the T2T soft splits' strides (4 * 2 * 2)
        reduction = math.prod(self.patch_embed._ksp[1]) if tokenizer == "t2t" else \
            int(self.patch_embed.patch_size[0])

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if self.has_class_token else None
        embed_len = num_patches + self.num_prefix_tokens
        self.pos_embed = nn.Parameter(torch.zeros(1, embed_len, embed_dim),
                                      requires_grad=pos_embed_type == "learn")
        self.pos_drop = nn.Dropout(pos_drop_rate)
        self.pe = LayerwisePE(cfg, depth, embed_dim, norm_layer=norm_layer)

        dpr = [float(v) for v in torch.linspace(0, drop_path_rate, depth, device="cpu")]
        block_cls = PEBlock if block == "pre" else ViTLiteBlock
        self.blocks = nn.ModuleList([
            block_cls(dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                      proj_drop=proj_drop_rate, attn_drop=attn_drop_rate, drop_path=dpr[i],
                      norm_layer=norm_layer, act_layer=nn.GELU, mlp_layer=Mlp)
            for i in range(depth)])
        if qk_scale is not None:
            for blk in self.blocks:
                set_qk_scale(blk, qk_scale)
        self.feature_info = [dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=reduction)
                             for i in range(depth)]
        self.norm = norm_layer(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    # ------------------------------------------------------------------ init
    def init_weights(self) -> None:
        """The original repositories' initialisation (see ``init_style``)."""
        with torch.no_grad():
            if self.pos_embed_type == "sincos1d":
                if not self.pos_embed.is_meta:
                    self.pos_embed.copy_(sinusoid_table(self.pos_embed.shape[1], self.embed_dim))
            else:
                trunc_normal_(self.pos_embed, std=0.2 if self.init_style == "cct" else 0.02)
            if self.cls_token is not None:
                if self.init_style == "cct":  # Compact-Transformers: class_emb = zeros
                    nn.init.zeros_(self.cls_token)
                else:  # DeiT / LaPE (timm 0.3 VisionTransformer) and T2T-ViT: trunc-normal 0.02
                    trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if self.init_style == "cct" and isinstance(self.patch_embed, PatchEmbed):
            nn.init.kaiming_normal_(self.patch_embed.proj.weight)

    # ------------------------------------------------------------------ timm API
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^cls_token|pos_embed|patch_embed|pe\.",
                    blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new head (``num_classes=0``: none) and, if given, a new readout, as timm's ViT:
        ``''`` stops pooling (``forward`` returns per-token outputs), ``'avg'`` / ``'token'``
        pool (``'token'`` only with a class token)."""
        contract.check_not_folded(self, "reset_classifier")
        contract.check_pool(global_pool, self.has_class_token, type(self).__name__)
        if global_pool is not None:
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    # ------------------------------------------------------------------ PE helpers
    def pos_embed_at(self, grid: tuple[int, int]) -> torch.Tensor:
        """``pos_0`` for a token grid: the stored PE, resampled (bicubic) off the build grid."""
        if self._fold_grid is not None and tuple(grid) != self._fold_grid:
            raise RuntimeError(f"this model was folded (fold_last_ln_pe) at token grid {self._fold_grid}; "
                               f"it cannot run at grid {tuple(grid)}")
        if tuple(grid) == self.grid_size:
            return self.pos_embed
        return resample_abs_pos_embed(self.pos_embed, new_size=list(grid), old_size=list(self.grid_size),
                                      num_prefix_tokens=self.num_prefix_tokens)

    def pos_embed_for_grid(self, h: int, w: int) -> torch.Tensor:
        """Patch part of the PE (no class-token position) interpolated to an ``h x w`` grid."""
        pos = self.pos_embed[:, self.num_prefix_tokens:]
        if (h, w) == self.grid_size:
            return pos
        return resample_abs_pos_embed(pos, new_size=[h, w], old_size=list(self.grid_size), num_prefix_tokens=0)

    def last_ln_pe_term(self, grid: Optional[tuple[int, int]] = None) -> Optional[torch.Tensor]:
        """``LN'_last(pos_k)`` at a token grid (the build grid by default), ``(1, N[+1], D)``."""
        _, last = self.pe(self.pos_embed_at(tuple(grid or self.grid_size)))
        return last

    # ------------------------------------------------------------------ forward
    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """Tokens with the class token and (if ``add_at_input``) ``pos_0``; ``pos_0``; the token grid."""
        x = self.patch_embed(x)  # (B, h, w, D)
        B, h, w, D = x.shape
        x = x.reshape(B, h * w, D)
        pos = self.pos_embed_at((h, w))
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)
        else:
            # The conv patch embedding's NHWC tokens are a permuted view; element-wise ops keep
            # that layout, so without the concatenation the whole residual stream would stay
            # channel-strided and every LayerNorm (forward and backward) would copy its input.
            x = x.contiguous()
        if self.pe_cfg.add_at_input:
            x = x + pos
        return self.pos_drop(x), pos, (h, w)

    def _last_ln(self, x: torch.Tensor, last: Optional[torch.Tensor]) -> torch.Tensor:
        """The Last LN stage: ``LN(x)`` (+ ``LN'_last(pos_k)``, Eq. 11)."""
        x = self.norm(x)
        return x if last is None else x + last

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``LN(x_{L+1}) (+ LN'_last(pos_k))`` for every token, ``(B, N[+1], D)``."""
        x, pos, _ = self._embed(x)
        terms, last = self.pe(pos)  # once per forward, on (1, N, D)
        for blk, term in zip(self.blocks, terms):
            x = self._block(blk, x, term)
        return self._last_ln(x, last)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[int | list[int]] = None,
            return_prefix_tokens: bool = False,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
            output_dict: bool = False,
    ):
        """timm's ViT ``forward_intermediates`` through the PE path: block outputs (the block
        ``l`` gets its term ``P_l`` as in ``forward``), patch tokens as ``NCHW`` maps or ``NLC``.

        ``indices``: last n blocks (int), all (``None``) or these (list).  ``norm`` sends each
        intermediate through the Last LN stage (with MPVG's ``LN'_last(pos_k)``).  The final
        output equals ``forward_features(x)`` (unless ``stop_early`` ends the run early).
        """
        contract.check_output_fmt(output_fmt)
        take, max_index = feature_take_indices(len(self.blocks), indices)
        x, pos, grid = self._embed(x)
        terms, last = self.pe(pos)
        blocks = self.blocks[:max_index + 1] if stop_early else self.blocks
        inter = []
        for i, (blk, term) in enumerate(zip(blocks, terms)):
            x = self._block(blk, x, term)
            if i in take:
                inter.append(self._last_ln(x, last) if norm else x)
        final = None if intermediates_only else self._last_ln(x, last)
        return self._intermediates_out(inter, grid, output_fmt, final, return_prefix_tokens, intermediates_only,
                                       output_dict)

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Keep the blocks up to the last of ``indices`` and their LN' (timm's ViT contract);
        ``prune_norm`` drops the Last LN and its PE term, ``prune_head`` the head and pooling."""
        contract.check_not_folded(self, "prune_intermediate_layers")
        take, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        self.pe.truncate(max_index + 1, keep_last=not prune_norm)
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """The head's readout of ``(B, N, D)`` tokens (``global_pool``; ``''`` leaves them)."""
        if self.global_pool == "avg":
            return x[:, self.num_prefix_tokens:].mean(dim=1)
        if self.global_pool == "token":
            return x[:, 0]
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.pool(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    @torch.no_grad()
    def forward_analysis(self, x: torch.Tensor) -> dict:
        """Per-layer tensors for the analysis figures (docs/contracts.md)."""
        x, pos, _ = self._embed(x)
        terms, last = self.pe(pos)
        inputs, tokens = [], []
        for blk, term in zip(self.blocks, terms):
            inputs.append(x)
            tokens.append(blk.norm1(x))
            x = blk(x, pos=term)
        post = self.norm(x)
        return {
            "layer_inputs": inputs,
            "layer_tokens": tokens,
            "layer_pos": list(terms),
            "pre_last_ln": x,
            "post_last_ln": post,
            "last_ln_pe": last,
            "num_prefix_tokens": self.num_prefix_tokens,
        }


# --------------------------------------------------------------------------------------
# timm registration
# --------------------------------------------------------------------------------------
def _cfg(**kwargs) -> dict:
    """A pretrained cfg without weights: what the original code base's evaluation uses."""
    cfg = {
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None,
        "crop_pct": 0.875, "interpolation": "bicubic", "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj", "classifier": "head", "license": "apache-2.0",
    }
    cfg.update(kwargs)
    return cfg


#: Registered with timm by ``register_model`` (``timm.get_pretrained_cfg(name)``); the
#: instance's ``pretrained_cfg`` holds the built input size and class count on top.
#: DeiT: facebookresearch/deit datasets.py (resize 256 bicubic, centre crop 224, ImageNet
#: mean/std).  T2T-ViT: yitu-opensource/T2T-ViT models/t2t_vit.py ``_cfg`` (crop 0.9, bicubic);
#: its first layer is the Performer over unfolded 7x7 patches, no conv: ``first_conv`` names its
#: ``kqv`` projection, the first weight that reads the (3 x 7 x 7 unfolded) pixels, as timm's
#: tests want a layer name.  ViT-Lite: Compact-Transformers' CIFAR-100 (32x32, no
#: resize or crop at evaluation, its dataset mean/std).
default_cfgs = generate_default_cfgs({
    "mpvg_deit_tiny_patch16_224": _cfg(),
    "mpvg_deit_small_patch16_224": _cfg(),
    "mpvg_deit_base_patch16_224": _cfg(),
    "mpvg_t2t_vit_7": _cfg(crop_pct=0.9, first_conv="patch_embed.attention1.kqv"),
    "mpvg_vit_lite_7_4": _cfg(num_classes=100, input_size=(3, 32, 32), crop_pct=1.0,
                              mean=CIFAR100_MEAN, std=CIFAR100_STD),
})


def _create(variant: str, pretrained: bool, model_args: dict, kwargs: dict) -> MPVGVisionTransformer:
    return contract.build(MPVGVisionTransformer, variant, pretrained, model_args, kwargs,
                          default_img_size=model_args.get("img_size", 224), default_out_indices=3)


_DEIT = dict(patch_size=16, mlp_ratio=4.0, qkv_bias=True, tokenizer="patch", block="pre",
             pos_embed_type="learn", init_style="timm")
_T2T = dict(tokenizer="t2t", block="pre", pos_embed_type="sincos1d", init_style="t2t", qkv_bias=False,
            norm_layer=nn.LayerNorm, token_dim=64)
_VIT_LITE = dict(tokenizer="conv", block="vit_lite", pos_embed_type="learn", init_style="cct",
                 qkv_bias=False, norm_layer=nn.LayerNorm)


@register_model
def mpvg_deit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> MPVGVisionTransformer:
    """DeiT-Ti (Touvron et al. 2021): dim 192, depth 12, 3 heads, patch 16, 224x224."""
    args = dict(_DEIT, embed_dim=192, depth=12, num_heads=3)
    return _create("mpvg_deit_tiny_patch16_224", pretrained, args, kwargs)


@register_model
def mpvg_deit_small_patch16_224(pretrained: bool = False, **kwargs) -> MPVGVisionTransformer:
    """DeiT-S: dim 384, depth 12, 6 heads, patch 16, 224x224."""
    args = dict(_DEIT, embed_dim=384, depth=12, num_heads=6)
    return _create("mpvg_deit_small_patch16_224", pretrained, args, kwargs)


@register_model
def mpvg_deit_base_patch16_224(pretrained: bool = False, **kwargs) -> MPVGVisionTransformer:
    """DeiT-B: dim 768, depth 12, 12 heads, patch 16, 224x224."""
    args = dict(_DEIT, embed_dim=768, depth=12, num_heads=12)
    return _create("mpvg_deit_base_patch16_224", pretrained, args, kwargs)


@register_model
def mpvg_t2t_vit_7(pretrained: bool = False, **kwargs) -> MPVGVisionTransformer:
    """T2T-ViT-7 (Yuan et al. 2021): Performer T2T module (token_dim 64), dim 256, depth 7,
    4 heads, mlp ratio 2, no qkv bias, fixed 1-D sinusoid PE, 224x224."""
    args = dict(_T2T, embed_dim=256, depth=7, num_heads=4, mlp_ratio=2.0)
    return _create("mpvg_t2t_vit_7", pretrained, args, kwargs)


@register_model
def mpvg_vit_lite_7_4(pretrained: bool = False, **kwargs) -> MPVGVisionTransformer:
    """ViT-Lite-7/4 (Hassani et al. 2022, ``vit_7_4_32``): 4x4 conv tokenizer, dim 256, 7 layers,
    4 heads, mlp ratio 2, learnable PE, class token, 32x32, 100 classes.  Dropout defaults are
    the original's (attention dropout 0.1, stochastic depth 0.1, no other dropout)."""
    args = dict(_VIT_LITE, img_size=32, patch_size=4, num_classes=100, embed_dim=256, depth=7,
                num_heads=4, mlp_ratio=2.0, attn_drop_rate=0.1, drop_path_rate=0.1)
    return _create("mpvg_vit_lite_7_4", pretrained, args, kwargs)
