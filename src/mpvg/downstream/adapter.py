"""ViT-Adapter (Chen et al. 2022) around the package's DeiT, carrying each PE method.

The adapter turns a plain ViT into a 4-level feature pyramid (strides 4, 8, 16, 32) for
Mask R-CNN and UperNet: a small conv stem (the *spatial prior module*, SPM) produces
multi-scale features ``c``; before each group of ViT blocks an *injector* (deformable
cross-attention, ViT tokens query ``c``) adds spatial detail to the tokens, after it an
*extractor* (``c`` queries the tokens) pulls the ViT's semantics back into ``c``.

How each PE method reaches the dense backbone (``vit.pe_cfg``):

* ``pos_0`` is the checkpoint's patch PE resampled (bicubic) to the input's token grid;
* it is added to the tokens at the input when ``pe_cfg.add_at_input`` (Default, PVG, MPVG;
  not LaPE);
* the layer-wise terms ``P_l`` (LaPE, PVG, MPVG) are computed once per forward from that
  resampled ``pos_0`` by the checkpoint's own LN' chain and added after each block's LN;
* the class token is dropped (as ViT-Adapter does), and so are the Last LN, the head and
  MPVG's Last-LN PE term ``LN'_last(pos_k)``: the dense backbone reads the tokens after the
  last block of each stage, never through the Last LN / GAP where Eq. 11 adds that term.
  MPVG therefore equals PVG inside the adapter; it differs only by its pretrained weights.

Differences from ``czczup/ViT-Adapter`` that are not choices of the paper are listed in
``docs/downstream.md``.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import DropPath, LayerScale, trunc_normal_

from .deform_attn import MSDeformAttn, Shapes

DEFAULT_INTERACTIONS = ((0, 2), (3, 5), (6, 8), (9, 11))
# ViT-Adapter-Ti Mask R-CNN config: windowed attention (14x14) in all blocks but 2, 5, 8, 11.
DETECTION_WINDOW_ATTN = tuple(i % 3 != 2 for i in range(12))


def reference_points(shapes: Shapes, device: torch.device) -> torch.Tensor:
    """Pixel centres of each ``(H, W)`` grid, normalised to ``[0, 1]``: ``(1, sum HW, 1, 2)``."""
    refs = []
    for h, w in shapes:
        ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
        xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
        ref_y, ref_x = torch.meshgrid(ys, xs, indexing="ij")
        refs.append(torch.stack((ref_x.reshape(-1), ref_y.reshape(-1)), -1))
    return torch.cat(refs, 0)[None, :, None]


# --------------------------------------------------------------------------------------
# Adapter modules
# --------------------------------------------------------------------------------------
def _conv_bn_relu(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SpatialPriorModule(nn.Module):
    """ResNet-like stem giving ``c1`` (stride 4, a map) and ``c2..c4`` (strides 8, 16, 32, as
    token sequences), all projected to the ViT width."""

    def __init__(self, inplanes: int = 64, embed_dim: int = 192):
        super().__init__()
        self.stem = nn.Sequential(
            *_conv_bn_relu(3, inplanes, 2), *_conv_bn_relu(inplanes, inplanes, 1),
            *_conv_bn_relu(inplanes, inplanes, 1), nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        self.conv2 = nn.Sequential(*_conv_bn_relu(inplanes, 2 * inplanes, 2))
        self.conv3 = nn.Sequential(*_conv_bn_relu(2 * inplanes, 4 * inplanes, 2))
        self.conv4 = nn.Sequential(*_conv_bn_relu(4 * inplanes, 4 * inplanes, 2))
        self.fc1 = nn.Conv2d(inplanes, embed_dim, 1)
        self.fc2 = nn.Conv2d(2 * inplanes, embed_dim, 1)
        self.fc3 = nn.Conv2d(4 * inplanes, embed_dim, 1)
        self.fc4 = nn.Conv2d(4 * inplanes, embed_dim, 1)

    def forward(self, x: torch.Tensor):
        c1 = self.stem(x)
        c2 = self.conv2(c1)
        c3 = self.conv3(c2)
        c4 = self.conv4(c3)
        seq = lambda t: t.flatten(2).transpose(1, 2)  # noqa: E731  (B, C, H, W) -> (B, HW, C)
        return self.fc1(c1), seq(self.fc2(c2)), seq(self.fc3(c3)), seq(self.fc4(c4))


class ConvFFN(nn.Module):
    """MLP with a 3x3 depth-wise conv applied to each pyramid level of the sequence."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, shapes: Shapes) -> torch.Tensor:
        x = self.fc1(x)
        B, _, C = x.shape
        parts = []
        for part, (h, w) in zip(x.split([h * w for h, w in shapes], dim=1), shapes):
            m = part.transpose(1, 2).reshape(B, C, h, w)
            parts.append(self.dwconv(m).flatten(2).transpose(1, 2))
        x = self.drop(self.act(torch.cat(parts, dim=1)))
        return self.drop(self.fc2(x))


class Injector(nn.Module):
    """ViT tokens query the SPM pyramid; the result enters through a zero-initialised gate,
    so at the start of fine-tuning the pretrained ViT sees its usual input."""

    def __init__(self, dim: int, num_heads: int, n_points: int, n_levels: int, deform_ratio: float,
                 init_values: float, norm_layer):
        super().__init__()
        self.query_norm = norm_layer(dim)
        self.feat_norm = norm_layer(dim)
        self.attn = MSDeformAttn(dim, n_levels, num_heads, n_points, ratio=deform_ratio)
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, query, ref, feat, shapes):
        return query + self.gamma * self.attn(self.query_norm(query), ref, self.feat_norm(feat), shapes)


class Extractor(nn.Module):
    """The SPM pyramid queries the ViT tokens, then a ConvFFN."""

    def __init__(self, dim: int, num_heads: int, n_points: int, deform_ratio: float, with_cffn: bool,
                 cffn_ratio: float, drop: float, drop_path: float, norm_layer):
        super().__init__()
        self.query_norm = norm_layer(dim)
        self.feat_norm = norm_layer(dim)
        self.attn = MSDeformAttn(dim, 1, num_heads, n_points, ratio=deform_ratio)
        self.ffn = ConvFFN(dim, int(dim * cffn_ratio), drop) if with_cffn else None
        self.ffn_norm = norm_layer(dim) if with_cffn else None
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, query, ref, feat, feat_shape, query_shapes):
        query = query + self.attn(self.query_norm(query), ref, self.feat_norm(feat), feat_shape)
        if self.ffn is not None:
            query = query + self.drop_path(self.ffn(self.ffn_norm(query), query_shapes))
        return query


class InteractionBlock(nn.Module):
    """injector -> a group of ViT blocks (each with its layer-wise PE term) -> extractor(s)."""

    def __init__(self, dim: int, num_heads: int, n_points: int, init_values: float, drop_path: float,
                 with_cffn: bool, cffn_ratio: float, deform_ratio: float, extra_extractor: bool, norm_layer):
        super().__init__()
        self.injector = Injector(dim, num_heads, n_points, 3, deform_ratio, init_values, norm_layer)
        ext = dict(dim=dim, num_heads=num_heads, n_points=n_points, deform_ratio=deform_ratio,
                   with_cffn=with_cffn, cffn_ratio=cffn_ratio, drop=0.0, drop_path=drop_path,
                   norm_layer=norm_layer)
        self.extractor = Extractor(**ext)
        self.extra_extractors = nn.ModuleList([Extractor(**ext) for _ in range(2)]) if extra_extractor else None

    def forward(self, x, c, blocks, terms, windowed, grid, c_shapes, refs):
        ref_vit, ref_c = refs
        x = self.injector(x, ref_vit, c, c_shapes)
        for blk, term, win in zip(blocks, terms, windowed):
            x = blk(x, pos=term, hw=grid) if win else blk(x, pos=term)
        for ext in [self.extractor, *(self.extra_extractors or [])]:
            c = ext(c, ref_c, x, [grid], c_shapes)
        return x, c


class WindowedAttention(nn.Module):
    """A timm ``Attention`` restricted to non-overlapping ``window_size`` windows of the token
    grid (ViT-Adapter's detection setting).  It takes over the wrapped module's layers under
    the same names, so checkpoints load unchanged.  As in ViT-Adapter, the grid is padded
    (bottom/right) after the qkv projection with zeros: padded keys have logit 0 and value 0."""

    def __init__(self, attn: nn.Module, window_size: int):
        super().__init__()
        if getattr(attn, "gate", None) is not None:
            raise ValueError("WindowedAttention does not support gated attention")
        self.qkv, self.q_norm, self.k_norm = attn.qkv, attn.q_norm, attn.k_norm
        self.attn_drop, self.norm, self.proj, self.proj_drop = attn.attn_drop, attn.norm, attn.proj, attn.proj_drop
        self.num_heads, self.head_dim, self.attn_dim = attn.num_heads, attn.head_dim, attn.attn_dim
        self.window_size = window_size

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        B, N, _ = x.shape
        h, w = hw
        ws = self.window_size
        hp, wp = math.ceil(h / ws) * ws, math.ceil(w / ws) * ws
        qkv = self.qkv(x).transpose(1, 2).reshape(B, 3 * self.attn_dim, h, w)
        qkv = F.pad(qkv, [0, wp - w, 0, hp - h])
        nh, nw = hp // ws, wp // ws
        # (B, 3, heads, hd, nh, ws, nw, ws) -> (3, B*nh*nw, heads, ws*ws, hd)
        qkv = qkv.view(B, 3, self.num_heads, self.head_dim, nh, ws, nw, ws)
        qkv = qkv.permute(1, 0, 4, 6, 2, 5, 7, 3).reshape(3, B * nh * nw, self.num_heads, ws * ws, self.head_dim)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        # (B*nh*nw, heads, ws*ws, hd) -> (B, heads*hd, hp, wp)
        out = out.view(B, nh, nw, self.num_heads, ws, ws, self.head_dim)
        out = out.permute(0, 3, 6, 1, 4, 2, 5).reshape(B, self.attn_dim, hp, wp)
        out = out[:, :, :h, :w].reshape(B, self.attn_dim, N).transpose(1, 2)
        return self.proj_drop(self.proj(self.norm(out)))


# --------------------------------------------------------------------------------------
# The backbone
# --------------------------------------------------------------------------------------
class ViTAdapter(nn.Module):
    """ViT-Adapter around one of the package's DeiT models (``vit``), see the module docstring.

    Args:
        vit: an ``MPVGVisionTransformer`` with the patch tokenizer (DeiT); its pretrained
            weights should already be loaded (see :func:`build_vit_adapter`).  Its class token,
            Last LN, head and Last-LN PE are removed here.
        conv_inplane, n_points, deform_num_heads, init_values, with_cffn, cffn_ratio,
        deform_ratio, interaction_indexes, add_vit_feature, use_extra_extractor: as in
            ViT-Adapter.
        drop_path: the extractors' ConvFFN drop path (ViT-Adapter passes the ViT's rate).
        vit_feature: ``"last"`` adds the final ViT tokens to every level (ViT-Adapter's
            detection code), ``"per_stage"`` adds stage ``i``'s tokens to level ``i`` (its
            segmentation code).
        window_attn, window_size: per-block windowed attention (detection config).
        layer_scale: ViT-Adapter's ViT blocks carry a trainable per-channel scale initialised
            to 1 on both branches (``layer_scale=True``); added here when the DeiT has none.
    """

    def __init__(self, vit: nn.Module, conv_inplane: int = 64, n_points: int = 4, deform_num_heads: int = 6,
                 init_values: float = 0.0, interaction_indexes: Sequence[Sequence[int]] = DEFAULT_INTERACTIONS,
                 with_cffn: bool = True, cffn_ratio: float = 0.25, deform_ratio: float = 1.0,
                 add_vit_feature: bool = True, use_extra_extractor: bool = True, drop_path: float = 0.1,
                 vit_feature: str = "last", window_attn: Optional[Sequence[bool]] = None,
                 window_size: int | Sequence[Optional[int]] = 14, layer_scale: bool = True):
        super().__init__()
        if vit_feature not in ("last", "per_stage"):
            raise ValueError(f"vit_feature must be 'last' or 'per_stage', got {vit_feature!r}")
        if getattr(vit, "tokenizer_type", "patch") != "patch":
            raise ValueError("ViTAdapter needs a patch-embedding ViT (DeiT)")
        self.depth = depth = len(vit.blocks)
        self.interaction_indexes = [tuple(int(i) for i in ix) for ix in interaction_indexes]
        if self.interaction_indexes[-1][1] != depth - 1 or self.interaction_indexes[0][0] != 0:
            raise ValueError(f"interaction_indexes {self.interaction_indexes} must cover blocks 0..{depth - 1}")
        self.embed_dim = dim = vit.embed_dim
        self.patch_size = int(vit.patch_embed.patch_size[0])
        self.add_vit_feature, self.vit_feature = add_vit_feature, vit_feature

        self._strip_classifier_parts(vit)
        self.vit = vit
        windowed = list(window_attn) if window_attn is not None else [False] * depth
        sizes = list(window_size) if isinstance(window_size, (list, tuple)) else [window_size] * depth
        if len(windowed) != depth or len(sizes) != depth:
            raise ValueError(f"window_attn/window_size need {depth} entries, got {len(windowed)}/{len(sizes)}")
        self.windowed = windowed
        for blk, win, size in zip(vit.blocks, windowed, sizes):
            if win:
                if not size:
                    raise ValueError("window_attn is set for a block whose window_size is None")
                blk.attn = WindowedAttention(blk.attn, int(size))
            if layer_scale and isinstance(blk.ls1, nn.Identity):
                blk.ls1, blk.ls2 = LayerScale(dim, init_values=1.0), LayerScale(dim, init_values=1.0)

        norm_layer = lambda d: nn.LayerNorm(d, eps=1e-6)  # noqa: E731
        self.level_embed = nn.Parameter(torch.zeros(3, dim))
        self.spm = SpatialPriorModule(conv_inplane, dim)
        n = len(self.interaction_indexes)
        self.interactions = nn.ModuleList([
            InteractionBlock(dim, deform_num_heads, n_points, init_values, drop_path, with_cffn, cffn_ratio,
                             deform_ratio, extra_extractor=use_extra_extractor and i == n - 1,
                             norm_layer=norm_layer)
            for i in range(n)])
        self.up = nn.ConvTranspose2d(dim, dim, 2, 2)
        self.norm1, self.norm2, self.norm3, self.norm4 = (nn.BatchNorm2d(dim) for _ in range(4))
        for m in (self.up, self.spm, self.interactions):
            m.apply(self._init_weights)
        for m in self.interactions.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        nn.init.normal_(self.level_embed)

    @staticmethod
    def _strip_classifier_parts(vit: nn.Module) -> None:
        """Drop what a dense backbone never uses (no Last LN, GAP, head or class token), so no
        parameter goes without a gradient (DDP) and the optimizer holds only live weights."""
        vit.cls_token = None
        vit.norm = nn.Identity()
        vit.head = nn.Identity()
        if getattr(vit.pe, "last_norm", None) is not None:
            vit.pe.last_norm = None

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @property
    def out_channels(self) -> list[int]:
        return [self.embed_dim] * 4

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``(B, 3, H, W)`` with ``H, W`` multiples of 32 and of the patch size ->
        ``[f1, f2, f3, f4]`` at strides 4, 8, 16, 32, each with ``embed_dim`` channels."""
        B, _, H, W = x.shape
        if H % 32 or W % 32 or H % self.patch_size or W % self.patch_size:
            raise ValueError(f"ViTAdapter input {H}x{W}: height and width must be multiples of 32 "
                             f"and of the patch size {self.patch_size}")
        c_shapes = [(H // 8, W // 8), (H // 16, W // 16), (H // 32, W // 32)]
        c1, c2, c3, c4 = self.spm(x)
        c = torch.cat([c2 + self.level_embed[0], c3 + self.level_embed[1], c4 + self.level_embed[2]], dim=1)

        vit = self.vit
        tokens = vit.patch_embed(x)  # (B, h, w, D)
        _, h, w, D = tokens.shape
        tokens = tokens.reshape(B, h * w, D)
        pos = vit.pos_embed_for_grid(h, w)
        terms, _ = vit.pe(pos)  # layer-wise PE terms, once per forward
        if vit.pe_cfg.add_at_input:
            tokens = tokens + pos
        tokens = vit.pos_drop(tokens)

        refs = (reference_points([(h, w)], x.device), reference_points(c_shapes, x.device))
        stage_out = []
        for layer, (s, e) in zip(self.interactions, self.interaction_indexes):
            tokens, c = layer(tokens, c, vit.blocks[s:e + 1], terms[s:e + 1], self.windowed[s:e + 1],
                              (h, w), c_shapes, refs)
            stage_out.append(tokens)

        n2, n3 = c_shapes[0][0] * c_shapes[0][1], c_shapes[1][0] * c_shapes[1][1]
        to_map = lambda t, hw: t.transpose(1, 2).reshape(B, D, *hw)  # noqa: E731
        c2 = to_map(c[:, :n2], c_shapes[0])
        c3 = to_map(c[:, n2:n2 + n3], c_shapes[1])
        c4 = to_map(c[:, n2 + n3:], c_shapes[2])
        c1 = self.up(c2) + c1
        feats = [c1, c2, c3, c4]
        if self.add_vit_feature:
            vit_maps = stage_out if self.vit_feature == "per_stage" else [stage_out[-1]] * 4
            for i, t in enumerate(vit_maps):
                m = to_map(t, (h, w))
                if m.shape[-2:] != feats[i].shape[-2:]:
                    m = F.interpolate(m, size=feats[i].shape[-2:], mode="bilinear", align_corners=False)
                feats[i] = feats[i] + m
        return [norm(f) for norm, f in zip((self.norm1, self.norm2, self.norm3, self.norm4), feats)]


# --------------------------------------------------------------------------------------
# Building with a pretrained checkpoint
# --------------------------------------------------------------------------------------
BACKBONE_KEY_PREFIXES = ("patch_embed.", "pos_embed", "blocks.", "pe.norms.")


def load_pretrained_vit(vit: nn.Module, state_dict: dict) -> dict:
    """Load a classification checkpoint into ``vit`` and prove that it loaded.

    Uses :func:`mpvg.models.checkpoint.load_checkpoint_into` (PE resizing, head dropped), then
    checks that every backbone tensor the model has (patch embedding, PE, blocks, LN' chain)
    came from the checkpoint and now equals it (the PE up to resizing).  A missing key or a
    tensor that did not change raises ``ValueError``: a silently random backbone would make
    the Table 3/4 comparison meaningless.  Returns ``{"loaded": [...], "ignored": [...]}``.
    """
    from mpvg.models.checkpoint import load_checkpoint_into, unwrap_state_dict

    state_dict = unwrap_state_dict(state_dict)
    own = vit.state_dict()
    wanted = [k for k in own if k.startswith(BACKBONE_KEY_PREFIXES)]
    missing = [k for k in wanted if k not in state_dict]
    extra = [k for k in state_dict if k.startswith(BACKBONE_KEY_PREFIXES) and k not in own]
    if missing or extra:
        raise ValueError(f"pretrained checkpoint does not fit the backbone (another PE method or model?): "
                           f"missing {missing[:8]}, unexpected {extra[:8]}")
    load_checkpoint_into(vit, state_dict, strict=False)  # the head / Last LN are not all there
    now = vit.state_dict()
    bad = []
    for k in wanted:
        src, dst = state_dict[k], now[k]
        if src.shape == dst.shape and not torch.equal(src.to(dst.dtype).cpu(), dst.cpu()):
            bad.append(k)
        elif src.shape != dst.shape and k != "pos_embed":
            bad.append(k)
    if bad:
        raise ValueError(f"pretrained weights did not load into {bad[:8]}")
    ignored = sorted(k for k in state_dict if k not in set(wanted))
    return {"loaded": wanted, "ignored": ignored}


def build_vit_adapter(method: str = "default", pe_overrides: Optional[dict] = None,
                      model_name: str = "mpvg_deit_tiny_patch16_224", arch_overrides: Optional[dict] = None,
                      pretrain_img_size: int = 224, vit_drop_path: float = 0.1,
                      pretrained: Optional[str | Path | dict] = None, **adapter_kwargs) -> ViTAdapter:
    """Create the DeiT of a PE method, load its ImageNet checkpoint, and wrap it.

    ``pretrain_img_size`` is the classification resolution the checkpoint was trained at (its
    PE grid); ``vit_drop_path`` the ViT blocks' stochastic depth (ViT-Adapter: 0.1).
    """
    import timm

    import mpvg.models  # noqa: F401  (registers the models)

    vit = timm.create_model(model_name, pe_method=method, pe_overrides=dict(pe_overrides or {}),
                            img_size=pretrain_img_size, num_classes=0, drop_path_rate=vit_drop_path,
                            **dict(arch_overrides or {}))
    if pretrained is not None:
        if not isinstance(pretrained, dict):
            from mpvg.run.checkpoint import load_checkpoint

            pretrained = load_checkpoint(pretrained)
        load_pretrained_vit(vit, pretrained)
    return ViTAdapter(vit, drop_path=adapter_kwargs.pop("drop_path", vit_drop_path), **adapter_kwargs)
