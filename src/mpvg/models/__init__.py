"""Models of the paper, registered with timm on import (see docs/models.md).

``timm.create_model(name, pe_method=..., pe_overrides=..., num_classes=..., img_size=...,
**arch_overrides)`` builds any of them; :mod:`mpvg.models.registry` has the paper names.
"""
# importing the modules registers their models with timm: vit (DeiT, T2T-ViT, ViT-Lite), ceit, swin
from . import blocks, ceit, pe, swin, vit  # noqa: F401
from .pe import PE_METHODS, PEConfig, LayerwisePE, pe_config  # noqa: F401
from .registry import METHODS, PAPER_MODELS, create, list_model_methods  # noqa: F401
from .vit import MPVGVisionTransformer  # noqa: F401
