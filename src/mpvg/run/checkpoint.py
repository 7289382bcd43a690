"""Training checkpoints: atomic save, load, RNG states, resume.

``checkpoint.pt`` is a ``dict`` (``torch.save``) with

* ``format``: ``"mpvg-train-v1"``;
* ``model``: the unwrapped model's ``state_dict`` (no ``module.`` / ``_orig_mod.`` prefixes),
  the weights other areas load (``torch.load(path)["model"]``);
* ``model_ema``: the EMA weights when the recipe uses EMA, else absent;
* ``model_name`` / ``model_kwargs``: what ``timm.create_model`` was called with (after
  ``import mpvg.models``), so analysis can rebuild the network;
* ``optimizer``, ``scheduler``, ``scaler``: their ``state_dict``s;
* ``epoch``: epochs finished; ``step``: steps of epoch ``epoch`` already done (0 at an epoch
  boundary, > 0 after a preemption in the middle of an epoch); ``num_updates``;
* ``rng``: python / numpy / torch / cuda generator states of rank 0 at the save;
* ``data``: ``seed``, ``global_batch`` (data order is a function of seed and epoch: see
  :mod:`mpvg.training.engine`);
* ``elapsed_s``, ``history`` (per-epoch metrics), ``mlflow_run_id``, ``cell``, ``seed``.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mpvg.runinfo import atomic_open

FORMAT = "mpvg-train-v1"


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """``torch.save`` ``state`` (plus ``format``) to ``path`` atomically."""
    with atomic_open(path, "wb") as handle:
        torch.save({"format": FORMAT, **state}, handle)
    return Path(path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (or any dict checkpoint).

    Raises ``FileNotFoundError`` naming the path, or ``ValueError`` when the file is not a
    readable torch checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # truncated or foreign file
        raise ValueError(f"cannot read checkpoint {path}: {err}") from err


def rng_state() -> dict[str, Any]:
    """Every generator's state: python ``random``, numpy, torch CPU and (if present) CUDA."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned (CUDA states only where the devices match)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
