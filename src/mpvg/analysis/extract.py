"""From a trained checkpoint to the arrays the figures draw (:class:`CellData`).

:func:`summarize` is pure numpy on the dict that ``model.forward_analysis`` returns (so it is
tested on constructed inputs); :func:`load_model` and :func:`analyze_model` hold the torch
parts. The batch means are taken here once; figures never see the full batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

from mpvg.analysis import stats


@dataclass
class CellData:
    """Batch-averaged analysis arrays of one trained model (patch tokens unless noted)."""

    cell: str
    num_prefix: int
    tokens: list                    # per layer: (N, D) batch-mean LN_l(x_l)
    pos: list                       # per layer: (N, D) PE term LN'_l(pos) or None
    layer_corr: list                # per layer: r(tokens, pos) or None
    pre: np.ndarray                 # (N_all, D) x_{L+1}, prefix tokens included
    post: np.ndarray                # (N_all, D) LN(x_{L+1}) without the PE term
    last_pe: Optional[np.ndarray]   # (N, D) LN'_last(pos_k) or None
    gamma: np.ndarray               # (D,) Last LN weight
    beta: np.ndarray                # (D,) Last LN bias
    last_ln: dict                   # stats.last_ln_summary
    images: np.ndarray              # (S, H, W, 3) in [0, 1], S images spread over the batch
    pre_norms: Optional[np.ndarray]   # (S, h, w) per-token norms before the Last LN (None: 1 token)
    post_norms: Optional[np.ndarray]  # (S, h, w) per-token norms after it (PE term included)
    meta: dict = field(default_factory=dict)

    @property
    def output(self) -> np.ndarray:
        """``(N_all, D)`` what the head pools: ``LN(x_{L+1})`` plus the Last-LN PE term if any."""
        if self.last_pe is None:
            return self.post
        return stats.add_last_pe(self.post, self.last_pe, self.num_prefix)

    def numbers(self) -> dict:
        """The JSON-ready numbers of this cell (analysis.json)."""
        return {
            "num_prefix_tokens": self.num_prefix,
            "layers": len(self.tokens),
            "layer_correlations": self.layer_corr,
            "last_ln": self.last_ln,
            "token_norms": None if self.pre_norms is None else {
                "pre_mean": float(self.pre_norms.mean()), "post_mean": float(self.post_norms.mean())},
            **self.meta,
        }


def display_images(images) -> np.ndarray:
    """``(S, 3, H, W)`` normalized tensors -> ``(S, H, W, 3)`` in [0, 1], each min-max scaled.

    Min-max per image shows the picture whatever mean/std the recipe normalized with.
    """
    a = stats.as_array(images)
    a = np.transpose(a, (0, 2, 3, 1))
    lo = a.min(axis=(1, 2, 3), keepdims=True)
    hi = a.max(axis=(1, 2, 3), keepdims=True)
    return (a - lo) / np.where(hi > lo, hi - lo, 1.0)


def summarize(cell: str, out: Mapping[str, Any], gamma, beta, images, samples: int = 4) -> CellData:
    """Batch means, correlations, Last-LN numbers and token-norm maps of one forward_analysis."""
    prefix = int(out["num_prefix_tokens"])
    pre_b = stats.as_array(out["pre_last_ln"])
    n_patch = stats.as_array(out["layer_tokens"][0]).shape[-2] - prefix
    tokens = [stats.patch_tokens(stats.batch_mean(t), n_patch) for t in out["layer_tokens"]]
    pos = [None if p is None else stats.patch_tokens(stats.batch_mean(p), n_patch) for p in out["layer_pos"]]
    last_pe = out.get("last_ln_pe")
    last_pe = None if last_pe is None else stats.patch_tokens(stats.batch_mean(last_pe), n_patch)
    post_b = stats.as_array(out["post_last_ln"])
    pick = np.unique(np.linspace(0, pre_b.shape[0] - 1, num=min(samples, pre_b.shape[0])).round().astype(int))
    after = post_b[pick] if last_pe is None else stats.add_last_pe(post_b[pick], last_pe, prefix)
    every_token = pre_b.shape[1] == prefix + n_patch
    return CellData(
        cell=cell,
        num_prefix=prefix,
        tokens=tokens,
        pos=pos,
        layer_corr=stats.layer_correlations(tokens, pos, n_patch),
        pre=pre_b.mean(axis=0),
        post=post_b.mean(axis=0),
        last_pe=last_pe,
        gamma=stats.as_array(gamma),
        beta=stats.as_array(beta),
        last_ln=stats.last_ln_summary(pre_b, post_b, gamma, beta, prefix, last_pe),
        images=display_images(stats.as_array(images)[pick]),
        pre_norms=stats.norm_grid(pre_b[pick], n_patch) if every_token else None,
        post_norms=stats.norm_grid(after, n_patch) if every_token else None,
    )


def load_model(checkpoint: Path | str, fallback_name: Optional[str] = None, fallback_kwargs: Optional[dict] = None):
    """The trained network of a checkpoint, in eval mode.

    The checkpoint names the timm model and its kwargs (mpvg.run.checkpoint); the cell's
    resolved run is the fallback for checkpoints that do not.
    """
    import timm

    import mpvg.models  # noqa: F401  (registers the models with timm)
    from mpvg.models.checkpoint import unwrap_state_dict
    from mpvg.run.checkpoint import load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    name = ckpt.get("model_name") or fallback_name
    kwargs = ckpt.get("model_kwargs") or fallback_kwargs or {}
    if not name:
        raise ValueError(f"{checkpoint}: no 'model_name' in the checkpoint and no fallback model given")
    model = timm.create_model(name, **kwargs)
    model.load_state_dict(unwrap_state_dict(ckpt))
    return model.eval()


def analyze_model(cell: str, model, images, samples: int = 4) -> CellData:
    """Run ``forward_analysis`` on ``images`` and summarize; needs a ViT-family model."""
    import torch

    if not hasattr(model, "forward_analysis"):
        raise ValueError(f"{cell}: {type(model).__name__} has no forward_analysis (ViT family only)")
    with torch.no_grad():
        out = model.forward_analysis(images)
    return summarize(cell, out, model.norm.weight, model.norm.bias, images, samples)


def fixed_batch(spec, n: int):
    """``n`` validation images of the cell's dataset, evenly spaced over the split (eval transform).

    Deterministic (same indices every time); spacing them, rather than taking the first
    ``n``, spreads the batch over classes (ImageNet's val folders are sorted by class).
    """
    import torch

    from mpvg.data.classification import build_dataset, build_transform

    ds = build_dataset(spec.dataset, spec.dataset_root, "val", build_transform(spec.recipe, is_train=False),
                       spec.num_classes, spec.classes)
    idx = np.unique(np.linspace(0, len(ds) - 1, num=min(n, len(ds))).round().astype(int))
    return torch.stack([ds[int(i)][0] for i in idx])


def checkpoint_analyzer(params: Mapping, batch_size: int, samples: int):
    """``f(cell id, checkpoint path) -> CellData`` that rebuilds, loads and analyzes a model."""
    from mpvg.config import resolve_run

    batches: dict = {}

    def analyze(cid: str, path: Path) -> CellData:
        spec = resolve_run(params, cid)
        model = load_model(path, spec.model_name, spec.model_kwargs)
        key = (spec.dataset, str(spec.dataset_root), spec.recipe.get("img_size"))
        if key not in batches:
            batches[key] = fixed_batch(spec, batch_size)
        data = analyze_model(cid, model, batches[key], samples)
        data.meta["batch_size"] = int(batches[key].shape[0])
        return data

    return analyze
