"""Models of the paper, registered with timm on import (see docs/models.md).

``timm.create_model(name, pe_method=..., pe_overrides=..., num_classes=..., img_size=...,
**arch_overrides)`` builds any of them; :mod:`mpvg.models.registry` has the paper names.
"""
from . import blocks, pe, vit  # noqa: F401  (vit registers the DeiT / T2T-ViT / ViT-Lite models)
from .pe import PE_METHODS, PEConfig, LayerwisePE, pe_config  # noqa: F401
from .registry import METHODS, PAPER_MODELS, create, list_model_methods  # noqa: F401
from .vit import MPVGVisionTransformer  # noqa: F401

# CeiT and Swin live in their own modules; import those that exist in this checkout.
import importlib as _importlib

for _name in ("ceit", "swin"):
    try:
        _importlib.import_module(f"{__name__}.{_name}")
    except ModuleNotFoundError as _err:
        if _err.name != f"{__name__}.{_name}":
            raise
del _importlib, _name
