"""Load a state dict into an mpvg model with PE resizing and head dropping.

:func:`load_checkpoint_into` accepts a plain state dict or a training checkpoint holding one
(``{"model": ...}``, ``{"state_dict": ...}``, ``{"model_ema": ...}``), strips ``module.``
(DDP) and ``_orig_mod.`` (``torch.compile``) prefixes, renames the original T2T-ViT's
``tokens_to_token.`` to ``patch_embed.``, and then

* resizes each 3-D ``*pos_embed`` of another length to the model's token grid with timm's
  :func:`~timm.layers.resample_abs_pos_embed` (bicubic), handling a class-token position in
  the checkpoint and/or the model: a checkpoint's class-token row is dropped for a model
  without class token (GAP); a model with class token whose checkpoint has none keeps its
  own row.  A fixed (non-trainable) PE such as T2T-ViT's sinusoid table is not interpolated:
  the model keeps its own table for its length;
* drops a ``cls_token`` the model does not have, and keeps the model's own when the
  checkpoint has none;
* drops head weights of another shape (fine-tuning to another number of classes): the
  model keeps its freshly initialised head.

Everything else goes through ``model.load_state_dict(..., strict=strict)``.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple, Optional

import torch
from torch import nn
from timm.layers import resample_abs_pos_embed

_WRAPPER_KEYS = ("model", "state_dict", "model_state", "model_ema", "state_dict_ema")
_PREFIXES = ("module.", "_orig_mod.")


class LoadReport(NamedTuple):
    missing_keys: list[str]
    unexpected_keys: list[str]
    resized: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]  # key -> (checkpoint shape, model shape)
    dropped: list[str]     # checkpoint keys not loaded on purpose (other-size head, cls_token)
    kept: list[str]        # model keys kept from the model on purpose (new head, cls_token, fixed PE)


def unwrap_state_dict(obj: Mapping) -> dict[str, torch.Tensor]:
    """The state dict inside a checkpoint, with DDP / compile prefixes removed."""
    sd = obj
    for key in _WRAPPER_KEYS:
        inner = sd.get(key) if isinstance(sd, Mapping) else None
        if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            sd = inner
            break
    out = {}
    for k, v in sd.items():
        changed = True
        while changed:
            changed = False
            for p in _PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        out[k] = v
    return out


def _square_grid(n: int) -> Optional[tuple[int, int]]:
    g = math.isqrt(n)
    return (g, g) if g * g == n and n > 0 else None


def _split_prefix(pos: torch.Tensor, prefer: int) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """Split ``(1, P + N, D)`` into prefix rows and a square grid, preferring ``P = prefer``."""
    n = pos.shape[1]
    for p in (prefer, 1 - prefer):
        grid = _square_grid(n - p)
        if grid is not None:
            return pos[:, :p], pos[:, p:], grid
    raise ValueError(f"cannot resize a position embedding of length {n}: neither {n} nor {n - 1} is a square")


def _model_grid(model: nn.Module, key: str, n_model: int, prefix: int) -> tuple[int, int]:
    owner = model
    for part in key.split(".")[:-1]:
        owner = getattr(owner, part)
    grid = getattr(owner, "grid_size", None) or getattr(model, "grid_size", None)
    if grid is not None and grid[0] * grid[1] == n_model - prefix:
        return int(grid[0]), int(grid[1])
    sq = _square_grid(n_model - prefix)
    if sq is None:
        raise ValueError(f"cannot tell the token grid of {key} ({n_model} positions)")
    return sq


def load_checkpoint_into(model: nn.Module, state_dict: Mapping, strict: bool = True) -> LoadReport:
    """Load ``state_dict`` (or a checkpoint holding one) into ``model``; see the module doc."""
    sd = unwrap_state_dict(state_dict)
    own = model.state_dict()
    resized, dropped, kept = {}, [], []

    if any(k.startswith("tokens_to_token.") for k in sd) and not any(k.startswith("tokens_to_token.") for k in own):
        sd = {("patch_embed." + k[len("tokens_to_token."):] if k.startswith("tokens_to_token.") else k): v
              for k, v in sd.items()}

    ckpt_has_cls = "cls_token" in sd
    model_prefix = int(getattr(model, "num_prefix_tokens", 1 if "cls_token" in own else 0))

    # class token
    if ckpt_has_cls and "cls_token" not in own:
        sd.pop("cls_token")
        dropped.append("cls_token")
    elif "cls_token" in own and not ckpt_has_cls:
        sd["cls_token"] = own["cls_token"]
        kept.append("cls_token")

    # position embeddings
    params = dict(model.named_parameters())
    for key, target in own.items():
        if not key.endswith("pos_embed") or key not in sd or target.ndim != 3:
            continue
        src = sd[key]
        if tuple(src.shape) == tuple(target.shape):
            continue
        if src.ndim != 3 or src.shape[-1] != target.shape[-1]:
            continue  # leave it to load_state_dict to report
        param = params.get(key)
        if param is not None and not param.requires_grad:  # fixed table (T2T-ViT sinusoid)
            sd[key] = target
            kept.append(key)
            continue
        prefix, grid_part, old_grid = _split_prefix(src, 1 if ckpt_has_cls else 0)
        new_grid = _model_grid(model, key, target.shape[1], model_prefix)
        grid_part = resample_abs_pos_embed(grid_part.float(), new_size=list(new_grid), old_size=list(old_grid),
                                           num_prefix_tokens=0).to(src.dtype)
        if model_prefix == 0:
            new = grid_part
        elif prefix.shape[1] == model_prefix:
            new = torch.cat([prefix, grid_part], dim=1)
        else:
            new = torch.cat([target[:, :model_prefix].to(grid_part), grid_part], dim=1)
        sd[key] = new
        resized[key] = (tuple(src.shape), tuple(new.shape))

    # classifier head of another size
    head_name = None
    cfg = getattr(model, "pretrained_cfg", None) or {}
    for cand in ([cfg.get("classifier")] if cfg.get("classifier") else []) + ["head", "head.fc", "fc"]:
        if f"{cand}.weight" in own:
            head_name = cand
            break
    if head_name is not None:
        for suffix in (".weight", ".bias"):
            k = head_name + suffix
            if k in sd and k in own and tuple(sd[k].shape) != tuple(own[k].shape):
                sd.pop(k)
                dropped.append(k)
                sd[k] = own[k]
                kept.append(k)
            elif k in sd and k not in own:
                sd.pop(k)
                dropped.append(k)

    result = model.load_state_dict(sd, strict=strict)
    return LoadReport(list(result.missing_keys), list(result.unexpected_keys), resized, dropped, kept)


# --------------------------------------------------------------------------------------
# Official checkpoints of the Default models, in their original code bases' layouts
# --------------------------------------------------------------------------------------
#: layout -> the code base whose parameter names the checkpoint uses.
OFFICIAL_LAYOUTS: dict[str, str] = {
    "deit": "facebookresearch/deit (timm's VisionTransformer names; {'model': state_dict})",
    "t2t": "yitu-opensource/T2T-ViT models/t2t_vit.py (tokens_to_token.*; {'state_dict': state_dict})",
    "ceit": "coeusguo/ceit ceit_model.py (i2t.backbone.*, blocks.N.leff.*, lca.feedforward.*; {'model': ...})",
    "swin": "microsoft/Swin-Transformer models/swin_transformer.py (downsample at the end of a stage, head.*, "
            "relative_position_index / attn_mask buffers; {'model': ...})",
}

#: CeiT's original names -> ours (the only differences; everything else is named alike).
CEIT_RENAMES = ((r"^i2t\.backbone\.(conv|bn)\.", r"i2t.\1."),
                (r"^blocks\.(\d+)\.leff\.", r"blocks.\1.mlp."),
                (r"^lca\.feedforward\.", r"lca.mlp."))


class OfficialLoadReport(NamedTuple):
    layout: str                  # a key of OFFICIAL_LAYOUTS
    renamed: int                 # checkpoint keys whose name changed
    dropped: list[str]           # checkpoint entries not loaded on purpose (recomputed buffers)
    filled: dict[str, str]       # model keys the checkpoint lacks, set on purpose, and why
    unstored: dict[str, float]   # settings the outputs depend on that no checkpoint stores (T2T's qk scale)


def official_layout(model: nn.Module) -> str:
    """The original code base whose checkpoints ``model`` (a Default mpvg model) takes."""
    from .ceit import CeiT
    from .swin import SwinTransformerPE
    from .vit import MPVGVisionTransformer

    if isinstance(model, SwinTransformerPE):
        return "swin"
    if isinstance(model, CeiT):
        return "ceit"
    if isinstance(model, MPVGVisionTransformer):
        if model.tokenizer_type == "patch" and model.block_type == "pre":
            return "deit"
        if model.tokenizer_type == "t2t":
            return "t2t"
    raise ValueError(f"no official checkpoint layout for {type(model).__name__} "
                     f"(tokenizer={getattr(model, 'tokenizer_type', None)!r}); expected DeiT, T2T-ViT, CeiT or Swin")


def _check_default(model: nn.Module, layout: str) -> None:
    from .pe import pe_config

    expected = pe_config("default", default_pool="avg" if layout == "swin" else "token")
    if getattr(model, "pe_cfg", None) != expected:
        raise ValueError(f"official {layout} checkpoints are Default models (no layer-wise PE); this model has "
                         f"{getattr(model, 'pe_cfg', None)}; expected pe_method='default' without pe_overrides")


def convert_official_state_dict(model: nn.Module, checkpoint: Mapping) -> tuple[dict, OfficialLoadReport]:
    """The state dict of an official checkpoint, renamed to ``model``'s names (see
    :data:`OFFICIAL_LAYOUTS`), and what was changed on the way."""
    import re

    layout = official_layout(model)
    _check_default(model, layout)
    sd = unwrap_state_dict(checkpoint)
    dropped: list[str] = []
    filled: dict[str, str] = {}
    renamed = 0
    if layout == "deit":
        extra = [k for k in ("dist_token", "head_dist.weight") if k in sd]
        if extra:
            raise ValueError(f"a distilled DeiT checkpoint ({', '.join(extra)}): the paper's DeiT is the "
                             "non-distilled model; expected deit_*_patch16_224 without 'distilled'")
    elif layout == "t2t":
        out = {}
        for k, v in sd.items():
            new = "patch_embed." + k[len("tokens_to_token."):] if k.startswith("tokens_to_token.") else k
            renamed += new != k
            out[new] = v
        sd = out
    elif layout == "ceit":
        out = {}
        for k, v in sd.items():
            new = k
            for pattern, repl in CEIT_RENAMES:
                new = re.sub(pattern, repl, new)
            renamed += new != k
            out[new] = v
        sd = out
    elif layout == "swin":
        from timm.models.swin_transformer import checkpoint_filter_fn

        own = model.state_dict()
        resampled = sorted(k for k, v in sd.items() if (k.endswith("relative_position_bias_table")
                                                         or k == "patch_embed.proj.weight")
                           and k in own and tuple(v.shape) != tuple(own[k].shape))
        if resampled:
            raise ValueError(f"{resampled[0]}: checkpoint shape {tuple(sd[resampled[0]].shape)}, model "
                             f"{tuple(own[resampled[0]].shape)}; an official checkpoint loads only into the model it "
                             "was trained as (same patch and window size), nothing is resampled")
        dropped = sorted(k for k in sd if "relative_position_index" in k or k.endswith("attn_mask"))
        if "layers.0.downsample.reduction.weight" in sd:  # the original layout, not timm's
            renamed = sum(1 for k in sd if ".downsample." in k or k.startswith("head."))
        sd = checkpoint_filter_fn(sd, model)  # timm's map of the original layout (downsample index, head.fc)
        if "absolute_pos_embed" not in sd:
            sd["absolute_pos_embed"] = torch.zeros_like(model.absolute_pos_embed)
            filled["absolute_pos_embed"] = ("zeros: the checkpoint was trained without the absolute PE (the "
                                            "original code's ape=False), which the paper's Default adds")
    unstored = {"qk_scale": float(model.blocks[0].attn.scale)} if layout == "t2t" else {}
    return sd, OfficialLoadReport(layout, renamed, dropped, filled, unstored)


def load_official_weights(model: nn.Module, checkpoint: Mapping) -> OfficialLoadReport:
    """Load an official checkpoint into a Default mpvg model, strictly (every key, every
    shape).  Raises ``ValueError`` naming the layout and the keys that do not fit."""
    sd, report = convert_official_state_dict(model, checkpoint)
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = sorted(f"{k}: {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in set(sd) & set(own)
                    if tuple(sd[k].shape) != tuple(own[k].shape))
    if missing or unexpected or shapes:
        raise ValueError(f"not a {OFFICIAL_LAYOUTS[report.layout]} checkpoint of this model: "
                         f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, unexpected "
                         f"{unexpected[:8]}{'...' if len(unexpected) > 8 else ''}, shapes (checkpoint vs model) "
                         f"{shapes[:8]}")
    model.load_state_dict(sd, strict=True)
    return report
