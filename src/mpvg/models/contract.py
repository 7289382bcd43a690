"""What every mpvg model shares as a timm model (docs/models.md, "The timm model contract").

* :func:`build` is the one factory path: timm's ``build_model_with_cfg`` with the pretrained
  cfg registered for the variant (``default_cfgs`` in each model module, no weights, no URLs),
  the built input size and class count in the instance's ``pretrained_cfg``, and
  ``features_only=True`` through timm's ``FeatureGetterNet``, i.e. through the model's own
  ``forward_intermediates``, which applies the layer-wise PE exactly as ``forward`` does.  The
  other feature wrappers (``list``, ``dict``, ``hook``, ``fx``) rebuild the network from its
  modules and would skip the PE path, so they are refused.
* :func:`check_pool` is the one rule for ``global_pool`` (at create time and in
  ``reset_classifier``): ``''`` (no pooling), ``'avg'`` (GAP over the patch tokens) or ``'token'``
  (the class token, only where there is one).
* :func:`check_not_folded` guards a model whose head bias holds the folded Last-LN PE term.
* :class:`TokenModel` holds what the token-sequence models (the ViT family and CeiT) share:
  grad checkpointing of the PE blocks, the classifier, and timm's ``forward_intermediates``
  return formats.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

POOLS = ("", "avg", "token")


def _size2(size: Any) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    size = tuple(int(s) for s in size)
    if len(size) != 2:
        raise ValueError(f"img_size must be an int or (height, width), got {size!r}")
    return size


def build(model_cls, variant: str, pretrained: bool, model_args: dict, kwargs: dict, *,
          default_img_size: int | Sequence[int] = 224, default_out_indices: Any = 3) -> nn.Module:
    """``model_cls(**model_args, **kwargs)`` through timm's ``build_model_with_cfg``.

    ``kwargs`` are the factory's keyword arguments as ``timm.create_model`` passes them
    (``pretrained_cfg``, ``pretrained_cfg_overlay``, ``cache_dir``, ``features_only``,
    ``out_indices``, ``feature_cls`` and the model's own).
    """
    from timm.models import build_model_with_cfg

    if pretrained:
        raise ValueError(f"{variant}: no pretrained weights are registered (nothing is downloaded); expected "
                         "pretrained=False. Official checkpoints of the Default models load with "
                         "mpvg.models.checkpoint.load_official_weights (or `mpvg eval --weights FILE`)")
    kwargs = dict(kwargs)
    features = bool(kwargs.get("features_only", False))
    feature_cls = kwargs.pop("feature_cls", None)
    if feature_cls is not None:
        if not features:
            raise ValueError(f"{variant}: feature_cls={feature_cls!r} is only used with features_only=True")
        if not _is_getter(feature_cls):
            raise ValueError(f"{variant}: feature_cls={feature_cls!r} is not supported; expected 'getter' "
                             "(features come from forward_intermediates, which applies the layer-wise PE; the "
                             "other wrappers rebuild the network from its modules without the PE path)")
    out_indices = kwargs.pop("out_indices", default_out_indices)
    pretrained_cfg = kwargs.pop("pretrained_cfg", None)
    user_overlay = kwargs.pop("pretrained_cfg_overlay", None) or {}
    cache_dir = kwargs.pop("cache_dir", None)

    args = dict(model_args)
    args.update(kwargs)
    h, w = _size2(args.get("img_size", default_img_size))
    overlay = {"input_size": (int(args.get("in_chans", 3)), h, w),
               "num_classes": int(args.get("num_classes", 1000))}
    overlay.update(user_overlay)
    return build_model_with_cfg(model_cls, variant, False, pretrained_cfg=pretrained_cfg,
                                pretrained_cfg_overlay=overlay, cache_dir=cache_dir,
                                feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), **args)


def _is_getter(feature_cls) -> bool:
    if isinstance(feature_cls, str):
        return feature_cls.lower() == "getter"
    from timm.models._features import FeatureGetterNet

    return isinstance(feature_cls, type) and issubclass(feature_cls, FeatureGetterNet)


def check_pool(global_pool: Optional[str], has_class_token: bool, where: str) -> None:
    """Raise ``ValueError`` unless ``global_pool`` is ``None`` (keep) or one of :data:`POOLS`
    that the model can do."""
    if global_pool is None:
        return
    if global_pool not in POOLS:
        raise ValueError(f"{where}: global_pool={global_pool!r}; expected one of {list(POOLS)}")
    if global_pool == "token" and not has_class_token:
        raise ValueError(f"{where}: global_pool='token' needs the class token, which this PE method removes "
                         "(GAP); expected '' or 'avg'")


def check_not_folded(model: nn.Module, action: str) -> None:
    """Refuse ``action`` on a copy made by :func:`mpvg.models.fold.fold_last_ln_pe`."""
    if getattr(model, "last_ln_pe_folded", False):
        raise RuntimeError(f"{action} on a folded model: its head bias holds W @ pool(LN'_last(pos_k)), which a new "
                           "or changed head would lose; do it on the unfolded model and fold again")


def tokens_out(x: torch.Tensor, prefix: int, grid: tuple[int, int], output_fmt: str):
    """``(B, P + N, D)`` -> (spatial part as ``NCHW`` ``(B, D, h, w)`` or ``NLC`` ``(B, N, D)``,
    prefix tokens ``(B, P, D)``)."""
    pre, x = x[:, :prefix], x[:, prefix:]
    if output_fmt == "NCHW":
        x = x.reshape(x.shape[0], grid[0], grid[1], -1).permute(0, 3, 1, 2).contiguous()
    return x, pre


def check_output_fmt(output_fmt: str, allowed: Sequence[str] = ("NCHW", "NLC")) -> None:
    if output_fmt not in allowed:
        raise ValueError(f"output_fmt={output_fmt!r}; expected one of {list(allowed)}")


class TokenModel:
    """Mixin of the token-sequence models (``blocks`` of PE blocks, ``head``, ``num_prefix_tokens``)."""

    grad_checkpointing: bool = False

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def _block(self, blk: nn.Module, x: torch.Tensor, pos: Optional[torch.Tensor]) -> torch.Tensor:
        """``blk(x, pos)``, recomputed in the backward pass when grad checkpointing is on."""
        if self.grad_checkpointing and x.requires_grad and not torch.jit.is_scripting():
            return checkpoint(blk, x, pos, use_reentrant=False)
        return blk(x, pos)

    def _intermediates_out(self, taken: list, grid: tuple[int, int], output_fmt: str, final,
                           return_prefix_tokens: bool, intermediates_only: bool, output_dict: bool):
        """timm's ViT ``forward_intermediates`` return value from the taken block outputs."""
        pairs = [tokens_out(t, self.num_prefix_tokens, grid, output_fmt) for t in taken]
        inter = [t for t, _ in pairs]
        prefix = [p for _, p in pairs] if self.num_prefix_tokens else None
        if output_dict:
            out = {"image_intermediates": inter}
            if prefix is not None and return_prefix_tokens:
                out["image_intermediates_prefix"] = prefix
            if not intermediates_only:
                out["image_features"] = final
            return out
        if return_prefix_tokens and prefix is not None:
            inter = list(zip(inter, prefix))
        return inter if intermediates_only else (final, inter)
