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
* PVG/MPVG use GAP and, as the paper says, have no class token ("We remove the class token as
  we adapt GAP"): 196 PE rows, LeFF sees every token, and LCA attends over the per-layer GAP
  tokens (the mean of each block's output tokens) with its per-layer embedding, the last
  layer's token as the query as in CeiT.  Their layer 0 receives a PE term too (12 LN'): the
  count of Table 1 (6.361) needs 384 parameters beyond "no class token, 11 LN'" (6,360,744 ->
  6.360), and one LN' (2 x 192) is what the paper's own exception for staged Swin adds; CeiT is
  the other model whose every layer feeds the readout (LCA reads each layer's token).
  ``class_token=True`` keeps the earlier design instead (class token and its PE row kept in
  the sequence, attended to, never read out; layer 0 without PE): it counts the same, which
  is why the counts cannot tell the two apart (class token 192 + PE row 192 = one LN' at 192).
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
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import calculate_drop_path_rates, trunc_normal_
from timm.models import generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models.vision_transformer import Block

from . import contract
from .blocks import PEBlock
from .pe import LayerwisePE, PEConfig, pe_config

__all__ = ["CeiT", "Image2Tokens", "LeFF", "mpvg_ceit_tiny_patch16_224"]


class Image2Tokens(nn.Module):
    """CeiT's I2T stem: low-level features from a small conv stem, then patch embedding.

    Output: ``(B, grid_h * grid_w, embed_dim)``.
    """

    def __init__(self, img_size: int | tuple[int, int] = 224, in_chans: int = 3, stem_chans: int = 64,
                 patch_size: int = 4, embed_dim: int = 192):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, stem_chans, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn = nn.BatchNorm2d(stem_chans)
        self.pool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.proj = nn.Conv2d(stem_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        grid = []
        for n in contract._size2(img_size):
            side = (n - 1) // 2 + 1          # conv 7x7 / 2, padding 3
            side = (side - 1) // 2 + 1       # max-pool 3x3 / 2, padding 1
            if side < patch_size:
                raise ValueError(f"img_size={img_size} gives a {side}-pixel stem output, smaller than "
                                 f"patch_size={patch_size}; expected img_size >= {4 * patch_size}")
            grid.append(side // patch_size)
        self.grid_size = tuple(grid)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.reduction = 4 * patch_size  # input pixels per token side

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
        return torch.cat((prefix, t), dim=1) if p else t


class CeiT(contract.TokenModel, nn.Module):
    """CeiT with a configurable PE method (see the module docstring for the choices).

    Args:
        pe_method: ``"default" | "lape" | "pvg" | "mpvg"`` or a :class:`PEConfig`.
        pe_overrides: :class:`PEConfig` fields overriding the method's (ablations).
        class_token: keep a class token in the sequence.  ``None``: the paper's choice, a class
            token for the class-token methods (``pool="token"``) and none with GAP.  ``True``
            with GAP is the earlier design (class token attended to, never read out).
        global_pool: ``None``, ``''`` or the method's pooling (``'token'`` / ``'avg'``).  CeiT
            pools every layer before LCA, so its features are pooled already and ``''`` leaves
            the head nothing to pool (timm's early-pooling models); the per-layer pooling itself
            belongs to the PE method.
        stem_chans, patch_size, leff_kernel_size: I2T / LeFF sizes (reference: 64, 4, 3).
        The other arguments are as in timm's VisionTransformer.

    For the names ``pvg`` / ``mpvg`` without a class token, ``include_layer0`` defaults to
    ``True`` (see the module docstring) unless ``pe_overrides`` sets it.
    """

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 4, in_chans: int = 3,
                 num_classes: int = 1000, embed_dim: int = 192, depth: int = 12, num_heads: int = 3,
                 mlp_ratio: float = 4., qkv_bias: bool = True, stem_chans: int = 64,
                 leff_kernel_size: int = 3, class_token: Optional[bool] = None, drop_rate: float = 0.,
                 pos_drop_rate: float = 0., proj_drop_rate: float = 0., attn_drop_rate: float = 0.,
                 drop_path_rate: float = 0., norm_layer=None, global_pool: Optional[str] = None,
                 pe_method: str | PEConfig = "default", pe_overrides: Optional[dict] = None):
        super().__init__()
        overrides = dict(pe_overrides or {})
        cfg = pe_config(pe_method, default_pool="token", **overrides)
        if class_token is None:
            class_token = cfg.pool == "token"
        if cfg.pool == "token" and not class_token:
            raise ValueError(f"PE method {pe_method!r} reads out the class token (pool='token') "
                             f"but class_token=False; expected class_token=True or pool='avg'")
        if (isinstance(pe_method, str) and pe_method.lower() in ("pvg", "mpvg") and not class_token
                and "include_layer0" not in overrides):
            cfg = cfg.replace(include_layer0=True)  # the paper's count without a class token
        if global_pool not in (None, "", cfg.pool):
            raise ValueError(f"global_pool={global_pool!r}: CeiT pools each layer before LCA, as its PE method "
                             f"says ({cfg.pool!r}); expected None, '' or {cfg.pool!r}")
        norm_layer = norm_layer or partial(nn.LayerNorm, eps=1e-6)
        self.pe_cfg = cfg
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1 if class_token else 0
        self.has_class_token = bool(class_token)
        self.summary_pool = cfg.pool  # what LCA reads of each layer: its class token or its GAP
        self.global_pool = cfg.pool if global_pool is None else global_pool
        self.grad_checkpointing = False

        self.i2t = Image2Tokens(img_size, in_chans, stem_chans, patch_size, embed_dim)
        self.grid_size = self.i2t.grid_size
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
        self.feature_info = [dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=self.i2t.reduction)
                             for i in range(depth)]
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

    # ------------------------------------------------------------------ timm API
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", "pos_layer_embed"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^cls_token|pos_embed|i2t|pe\.",
                    blocks=[(r"^blocks\.(\d+)", None), (r"^lca|^pos_layer_embed|^norm", (99999,))])

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new head; ``global_pool`` may be ``None``, ``''`` or the method's pooling (CeiT's
        features are pooled before LCA, see the class docstring)."""
        contract.check_not_folded(self, "reset_classifier")
        if global_pool not in (None, "", self.summary_pool):
            raise ValueError(f"global_pool={global_pool!r}: CeiT pools each layer before LCA, as its PE method "
                             f"says ({self.summary_pool!r}); expected None, '' or {self.summary_pool!r}")
        if global_pool is not None:
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    # ------------------------------------------------------------------ forward
    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        x = self.i2t(x)
        if self.cls_token is not None:
            x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        return x

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N, D)`` -> ``(B, D)``: the class token, or GAP over the patch tokens.  Gives the
        per-layer token LCA sees and the pooled Last-LN PE term (mpvg.models.fold uses it)."""
        return x[:, 0] if self.summary_pool == "token" else x[:, self.num_prefix_tokens:].mean(dim=1)

    def _run(self, x: torch.Tensor, record: Optional[dict] = None, take=(), stop: Optional[int] = None,
             readout: bool = True):
        """Blocks (up to ``stop``), LCA and the Last LN.  Returns ``(y, last, block outputs at take)``."""
        if readout and self.lca is None:
            raise RuntimeError("this CeiT was pruned for intermediate features (prune_intermediate_layers with "
                               "prune_head=True removes LCA, the readout); use forward_intermediates(..., "
                               "intermediates_only=True)")
        x = self._tokens(x)
        terms, last = self.pe(self.pos_embed)  # once per forward, on (1, N, D)
        if self.pe_cfg.add_at_input:
            x = x + self.pos_embed
        x = self.pos_drop(x)
        summaries, taken = [], []
        for i, (blk, pos) in enumerate(zip(self.blocks, terms)):
            if stop is not None and i > stop:
                break
            if record is not None:
                record["layer_inputs"].append(x)
                record["layer_tokens"].append(blk.norm1(x))
            x = self._block(blk, x, pos)
            if readout:
                summaries.append(self.pool(x))
            if i in take:
                taken.append(x)
        if not readout:
            return None, last, taken
        s = torch.stack(summaries, dim=1) + self.pos_layer_embed
        s = self.lca(s)[:, -1]
        y = self.norm(s)
        if record is not None:
            record.update(layer_pos=terms, pre_last_ln=s[:, None], post_last_ln=y[:, None], last_ln_pe=last)
        return (y if last is None else y + self.pool(last)), last, taken

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features after the Last LN (and its PE term for MPVG): ``(B, D)``."""
        return self._run(x)[0]

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[int | list[int]] = None,
                              return_prefix_tokens: bool = False, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False,
                              output_dict: bool = False):
        """timm's ViT ``forward_intermediates``: block outputs through the PE path (each block gets
        its term as in ``forward``), patch tokens as ``NCHW`` maps or ``NLC``.

        ``norm`` sends each intermediate through the Last LN stage per token (``LN(x)`` plus
        MPVG's ``LN'_last(pos_k)`` per token).  The final output is ``forward_features(x)``: LCA
        reads every layer, so ``stop_early`` only stops the blocks when ``intermediates_only``.
        """
        contract.check_output_fmt(output_fmt)
        take, max_index = feature_take_indices(len(self.blocks), indices)
        early = stop_early and intermediates_only
        y, last, taken = self._run(x, take=take, stop=max_index if early else None,
                                   readout=not intermediates_only)
        if norm:
            taken = [self.norm(t) if last is None else self.norm(t) + last for t in taken]
        return self._intermediates_out(taken, self.grid_size, output_fmt, y, return_prefix_tokens,
                                       intermediates_only, output_dict)

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Keep the blocks up to the last of ``indices`` and their LN'.  ``prune_head`` removes the
        readout: LCA, its per-layer embedding and the head (LCA reads every layer, so pruning
        blocks needs it); ``prune_norm`` the Last LN and its PE term."""
        contract.check_not_folded(self, "prune_intermediate_layers")
        take, max_index = feature_take_indices(len(self.blocks), indices)
        if max_index < len(self.blocks) - 1 and not prune_head:
            raise ValueError(f"pruning CeiT to blocks 0..{max_index} removes layers that LCA reads; expected "
                             "prune_head=True (the readout goes with them)")
        self.blocks = self.blocks[:max_index + 1]
        self.pe.truncate(max_index + 1, keep_last=not prune_norm)
        self.feature_info = self.feature_info[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
            self.lca = None
            self.pos_layer_embed = None
        return take

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

        ``layer_inputs``/``layer_tokens`` are ``(B, N, D)`` (the class token first when there is
        one, ``num_prefix_tokens``), ``layer_pos`` ``(1, N, D)`` or ``None``.  CeiT's Last LN
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


#: coeusguo/ceit evaluates with DeiT's pipeline (datasets.py: resize 256 bicubic, centre crop
#: 224, ImageNet mean/std); the LeFF grid is fixed at build, so the input size is too.
default_cfgs = generate_default_cfgs({
    "mpvg_ceit_tiny_patch16_224": dict(
        num_classes=1000, input_size=(3, 224, 224), pool_size=None, crop_pct=0.875, interpolation="bicubic",
        fixed_input_size=True, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, first_conv="i2t.conv",
        classifier="head"),
})


@register_model
def mpvg_ceit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> CeiT:
    """CeiT-Ti: I2T stem (64 ch) + patch 4 (stride 16 overall), dim 192, 12 blocks, 3 heads."""
    args = dict(patch_size=4, embed_dim=192, depth=12, num_heads=3, mlp_ratio=4., qkv_bias=True)
    return contract.build(CeiT, "mpvg_ceit_tiny_patch16_224", pretrained, args, kwargs, default_out_indices=3)
