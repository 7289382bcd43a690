"""Paper names of the models and PE methods, and the model x method grid.

``PAPER_MODELS`` maps each paper model name to its timm name (registered when
:mod:`mpvg.models` is imported).  Methods are the paper's column names (``Default``, ``LaPE``,
``PVG``, ``MPVG``); :func:`method_key` turns one into the ``pe_method`` argument of the
models (``default``, ``lape``, ``pvg``, ``mpvg``).
"""
from __future__ import annotations

import importlib

from typing import NamedTuple

from .pe import PAPER_METHOD_NAMES, PE_METHODS

PAPER_MODELS: dict[str, str] = {
    "DeiT-Ti": "mpvg_deit_tiny_patch16_224",
    "DeiT-S": "mpvg_deit_small_patch16_224",
    "DeiT-B": "mpvg_deit_base_patch16_224",
    "Swin-Ti": "mpvg_swin_tiny_patch4_window7_224",
    "CeiT-Ti": "mpvg_ceit_tiny_patch16_224",
    "T2T-ViT-7": "mpvg_t2t_vit_7",
    "ViT-Lite": "mpvg_vit_lite_7_4",
}

#: Paper method names, in the tables' order.
METHODS: tuple[str, ...] = tuple(PAPER_METHOD_NAMES[k] for k in PE_METHODS)  # Default, LaPE, PVG, MPVG
METHOD_KEYS: dict[str, str] = {PAPER_METHOD_NAMES[k]: k for k in PE_METHODS}


class ModelMethod(NamedTuple):
    model: str       # paper model name, e.g. "DeiT-Ti"
    method: str      # paper method name, e.g. "MPVG"
    timm_name: str   # e.g. "mpvg_deit_tiny_patch16_224"
    pe_method: str   # e.g. "mpvg"


def method_key(method: str) -> str:
    """``"MPVG"``/``"mpvg"`` -> ``"mpvg"``; raises ``ValueError`` for an unknown method."""
    key = str(method).lower()
    if key not in PE_METHODS:
        raise ValueError(f"unknown PE method {method!r}; expected one of {list(METHODS)}")
    return key


def method_name(method: str) -> str:
    """``"mpvg"``/``"MPVG"`` -> ``"MPVG"`` (the paper's spelling)."""
    return PAPER_METHOD_NAMES[method_key(method)]


def timm_name(model: str) -> str:
    """Paper name (``"DeiT-Ti"``) or timm name -> timm name."""
    if model in PAPER_MODELS:
        return PAPER_MODELS[model]
    if model in PAPER_MODELS.values():
        return model
    raise ValueError(f"unknown model {model!r}; expected one of {list(PAPER_MODELS)}")


def paper_name(model: str) -> str:
    """timm name or paper name -> paper name."""
    if model in PAPER_MODELS:
        return model
    for paper, name in PAPER_MODELS.items():
        if name == model:
            return paper
    raise ValueError(f"unknown model {model!r}; expected one of {list(PAPER_MODELS.values())}")


def registered_models() -> list[str]:
    """timm names of the mpvg models registered in this process (sorted)."""
    import timm

    importlib.import_module(__package__)  # importing mpvg.models registers the models

    return sorted(timm.list_models("mpvg_*"))


def list_model_methods(models=None, methods=None) -> list[ModelMethod]:
    """Every (model, method) pair, models in ``PAPER_MODELS`` order and methods in table order."""
    models = list(PAPER_MODELS) if models is None else [paper_name(m) for m in models]
    methods = list(METHODS) if methods is None else [method_name(m) for m in methods]
    out = []
    for model in models:
        name = PAPER_MODELS[model]
        for method in methods:
            out.append(ModelMethod(model, method, name, METHOD_KEYS[method]))
    return out


def create(model: str, method: str = "default", **kwargs):
    """``timm.create_model`` by paper (or timm) model name and paper (or key) method name."""
    import timm

    importlib.import_module(__package__)  # importing mpvg.models registers the models

    return timm.create_model(timm_name(model), pe_method=method_key(method), **kwargs)
