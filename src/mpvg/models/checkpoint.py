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
