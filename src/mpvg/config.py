"""params.yaml: loading, validation, scale resolution and the grid of cells.

The one place that knows what is run and with which settings, so the training, downstream,
workflow and reporting parts never disagree.  Snakemake imports this module while it builds
the DAG, so it imports no torch/timm (only yaml and jsonschema, lazily).
"""
from __future__ import annotations

import copy
import fnmatch
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

PAPER_METHODS = ("Default", "LaPE", "PVG", "MPVG")
TASKS = ("in1k", "c100", "coco", "ade20k")
STAGES = ("train", "finetune", "detect", "segment")
STAGE_OF_TASK_KIND = {"train": "classification", "finetune": "classification",
                      "detect": "detection", "segment": "segmentation"}
# C1: the control of the mechanism (MPVG with LN'_last(sg(pos_0)); docs/claims.md), not a paper table.
TABLES = ("T1", "T2", "T3", "T4", "T5", "T6", "F1", "F5", "C1")
SCALES = ("tiny", "budget", "paper")
# Scales with a block of their own in params.yaml, merged in over the paper-scale values.
SCALE_BLOCKS = ("tiny", "budget")
DATASETS = ("imagenet", "cifar100", "coco", "ade20k")
# PEConfig fields (mpvg.models.pe) an ablation may override; mirrored here to avoid torch.
PE_OVERRIDE_TYPES = {"pool": {"enum": ["token", "avg"]}, "layerwise": {"type": "boolean"},
                     "include_layer0": {"type": "boolean"}, "hierarchical": {"type": "boolean"},
                     "add_at_input": {"type": "boolean"},
                     "last_ln_pe": {"type": ["integer", "null"], "minimum": 0},
                     "independent_merge_ln": {"type": "boolean"},
                     "last_ln_pe_detach": {"type": "boolean"}}
CLASSIFICATION_RECIPES_KIND = "classification"


class ConfigError(ValueError):
    """params.yaml is invalid; the message names the key path and what was expected."""


# --------------------------------------------------------------------------- schema

def _obj(props: dict, required: Iterable[str] = (), extra: Any = False) -> dict:
    return {"type": "object", "properties": props, "required": list(required),
            "additionalProperties": extra}


_NUM = {"type": "number"}
_NNUM = {"type": "number", "minimum": 0}
_POS_INT = {"type": "integer", "minimum": 1}
_NN_INT = {"type": "integer", "minimum": 0}
_PROB = {"type": "number", "minimum": 0, "maximum": 1}
_STR = {"type": "string"}
_BOOL = {"type": "boolean"}
_OPT_NUM = {"type": ["number", "null"], "minimum": 0}
_PAIR = {"type": "array", "items": _NUM, "minItems": 2, "maxItems": 2}
_TRIPLE = {"type": "array", "items": _NUM, "minItems": 3, "maxItems": 3}
_PE_OVERRIDES = _obj(PE_OVERRIDE_TYPES)

# Every key of a classification recipe: a typo here must fail, never be silently ignored.
CLASSIFICATION_RECIPE_PROPS = {
    "epochs": _POS_INT, "cooldown_epochs": _NN_INT, "warmup_epochs": _NN_INT,
    "lr": _NNUM, "lr_base_batch": _POS_INT, "lr_scaling": {"enum": ["linear", "none"]},
    "scale_min_warmup_lr": _BOOL, "min_lr": _NNUM, "warmup_lr": _NNUM,
    "weight_decay": _NNUM, "batch_size": _POS_INT,
    "optimizer": {"enum": ["adamw", "sgd"]}, "opt_eps": _NNUM, "momentum": _PROB,
    "sched": {"enum": ["cosine"]}, "sched_per_step": _BOOL,
    "label_smoothing": _PROB, "mixup": _NNUM, "cutmix": _NNUM, "mixup_prob": _PROB,
    "mixup_switch_prob": _PROB, "mixup_mode": {"enum": ["batch", "pair", "elem"]},
    "randaugment": {"type": ["string", "null"], "pattern": "^rand(-[a-z]+[0-9.]*)*$"},
    "color_jitter": _OPT_NUM, "reprob": _PROB, "remode": {"enum": ["pixel", "rand", "const"]},
    "recount": _POS_INT, "repeated_aug": _BOOL, "drop_path": _PROB, "clip_grad": _OPT_NUM,
    "img_size": _POS_INT, "crop_pct": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
    "scale": _PAIR, "hflip": _PROB,
    "interpolation": {"enum": ["bilinear", "bicubic", "nearest"]},
    "train_interpolation": {"enum": ["bilinear", "bicubic", "nearest", "random"]},
    "mean": {"anyOf": [_TRIPLE, {"enum": ["imagenet", "cifar100", "cifar10"]}]},
    "std": {"anyOf": [_TRIPLE, {"enum": ["imagenet", "cifar100", "cifar10"]}]},
    "transform": {"enum": ["timm", "resize_pad_crop"]},
    "backbone_lr_ratio": _NNUM, "amp": _BOOL, "workers": _NN_INT,
    # optional: the original DeiT/CeiT/T2T code keep a weight EMA (decay 0.99996) besides
    # the evaluated model; off unless set
    "model_ema": _BOOL, "model_ema_decay": {"type": "number", "minimum": 0, "maximum": 1},
}
OPTIONAL_RECIPE_KEYS = ("model_ema", "model_ema_decay")
_ADAPTER = _obj({"conv_inplane": _POS_INT, "n_points": _POS_INT, "deform_num_heads": _POS_INT,
                 "cffn_ratio": _NNUM, "deform_ratio": _NNUM,
                 "interaction_indexes": {"type": "array", "items": {
                     "type": "array", "items": _NN_INT, "minItems": 2, "maxItems": 2}}})
_DOWNSTREAM_COMMON = {
    "framework": _STR, "backbone": {"enum": ["vit_adapter"]}, "optimizer": {"enum": ["adamw", "sgd"]},
    "lr": _NNUM, "weight_decay": _NNUM, "batch_size": _POS_INT, "warmup_iters": _NN_INT,
    "warmup_ratio": _NNUM, "crop_size": _POS_INT, "drop_path": _PROB, "clip_grad": _OPT_NUM,
    "layer_decay": {"type": ["number", "null"], "exclusiveMinimum": 0, "maximum": 1},
    "amp": _BOOL, "workers": _NN_INT, "adapter": _ADAPTER,
    # the keys below take their ViT-Adapter / MMDetection / MMSegmentation value when absent
    # (mpvg.downstream.engine DETECTION_DEFAULTS, SEGMENTATION_DEFAULTS; a test checks the lists)
    "betas": _PAIR, "window_size": _POS_INT, "layer_scale": _BOOL,
    "window_attn": {"type": ["array", "null"], "items": _BOOL}, "checkpoint_interval": _NN_INT,
}
_OPT_POS_INTS = {"type": ["array", "null"], "items": _POS_INT}
_OPT_POS_INT = {"type": ["integer", "null"], "minimum": 1}
# Every key of a downstream recipe, typed: a typo is an error, never a silently unused value.
DETECTION_RECIPE_PROPS = {
    **_DOWNSTREAM_COMMON, "framework": {"enum": ["mask_rcnn"]}, "epochs": _POS_INT,
    "lr_steps": {"type": "array", "items": _POS_INT}, "lr_gamma": _NNUM,
    "no_decay_keys": {"type": "array", "items": _STR},
    "train_short_sides": {"type": "array", "items": _POS_INT, "minItems": 1},
    "max_size": _POS_INT, "test_short_side": _POS_INT,
    "crop_branch_sides": _OPT_POS_INTS, "crop_branch_range": _OPT_POS_INTS,
    "fpn_channels": _POS_INT, "box_fc_dim": _POS_INT, "mask_head_dim": _POS_INT, "eval_interval_epochs": _NN_INT,
}
SEGMENTATION_RECIPE_PROPS = {
    **_DOWNSTREAM_COMMON, "framework": {"enum": ["upernet"]}, "iters": _POS_INT,
    "sched": {"enum": ["poly"]}, "poly_power": _NNUM, "min_lr": _NNUM,
    "img_scale": _PAIR, "ratio_range": _PAIR, "cat_max_ratio": _PROB,
    "test_mode": {"enum": ["slide"]},  # the one inference implemented: sliding windows (test_crop, test_stride)
    "test_crop": _OPT_POS_INT, "test_stride": _OPT_POS_INT,
    "channels": _POS_INT, "aux_channels": _POS_INT, "aux_weight": _NNUM, "photometric": _BOOL,
    "eval_interval": _NN_INT,
}
RECIPE_PROPS = {"classification": CLASSIFICATION_RECIPE_PROPS, "detection": DETECTION_RECIPE_PROPS,
                "segmentation": SEGMENTATION_RECIPE_PROPS}
# The keys every resolved recipe of a kind has (after `base` and RECIPE_DEFAULTS).
RECIPE_REQUIRED = {
    "classification": tuple(k for k in CLASSIFICATION_RECIPE_PROPS if k not in OPTIONAL_RECIPE_KEYS),
    "detection": ("framework", "lr", "weight_decay", "batch_size", "epochs"),
    "segmentation": ("framework", "lr", "weight_decay", "batch_size", "iters"),
}
# Optional keys: the value a recipe gets when neither it nor its base chain sets the key.
# Classification: what all six paper recipes share, each timm train.py's default too (AdamW eps,
# SGD momentum, cosine schedule, Mixup/CutMix switching, random erasing, flip), and no gradient
# clipping. Downstream: the ViT-Adapter-Ti adapter and no-decay parameters of both ViT-Adapter
# configs (AdamW, its betas, the no-decay parameters, poly schedule for UperNet), no clipping, no
# layer-wise lr decay. docs/config.md lists them.
_ADAPTER_TI = {"conv_inplane": 64, "n_points": 4, "deform_num_heads": 6, "cffn_ratio": 0.25, "deform_ratio": 1.0,
               "interaction_indexes": [[0, 2], [3, 5], [6, 8], [9, 11]]}
RECIPE_DEFAULTS = {
    "classification": {"opt_eps": 1.0e-8, "momentum": 0.9, "sched": "cosine", "mixup_prob": 1.0,
                       "mixup_switch_prob": 0.5, "mixup_mode": "batch", "remode": "pixel", "recount": 1,
                       "hflip": 0.5, "clip_grad": None, "scale": [0.08, 1.0], "mean": "imagenet", "std": "imagenet",
                       # features off unless a recipe turns them on
                       "transform": "timm", "backbone_lr_ratio": 1.0, "scale_min_warmup_lr": False,
                       "sched_per_step": False},
    "detection": {"backbone": "vit_adapter", "optimizer": "adamw", "clip_grad": None, "layer_decay": None,
                  "adapter": _ADAPTER_TI, "no_decay_keys": ["level_embed", "pos_embed", "norm", "bias"]},
    "segmentation": {"backbone": "vit_adapter", "optimizer": "adamw", "clip_grad": None, "layer_decay": None,
                     "adapter": _ADAPTER_TI, "betas": [0.9, 0.999], "sched": "poly",
                     "poly_power": 1.0, "test_mode": "slide"},
}
# Image normalisation by name (a recipe's mean/std may name one): ImageNet's (timm), CIFAR-100's
# (Compact-Transformers) and CIFAR-10's (T2T-ViT's transfer_learning.py uses these on CIFAR-100).
NORMALIZATION = {
    "imagenet": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
    "cifar100": {"mean": [0.5071, 0.4867, 0.4408], "std": [0.2675, 0.2565, 0.2761]},
    "cifar10": {"mean": [0.4914, 0.4822, 0.4465], "std": [0.2023, 0.1994, 0.2010]},
}
# A grid group's dataset when it names none: its task's.
TASK_DATASET = {"in1k": "imagenet", "c100": "cifar100", "coco": "coco", "ade20k": "ade20k"}
# Grid group keys that take one name or a list of names.
_GROUP_LISTS = ("tables", "models", "methods")
#: A recipe names the recipe it starts from (``base: deit``); a scale block's recipe entry names
#: the entry of the same block it starts from (docs/config.md, "Recipe inheritance").
BASE = "base"

# create_model keyword arguments of each registered mpvg model: the model class's __init__ (Swin:
# timm's SwinTransformer, to which SwinTransformerPE passes **kwargs). A checked list, so that
# loading params.yaml imports no torch: tests/test_config.py proves each equals the signature of
# the class its factory builds.
_VIT_KWARGS = ("attn_drop_rate", "block", "depth", "drop_path_rate", "drop_rate", "embed_dim", "global_pool",
               "img_size", "in_chans", "init_style", "mlp_ratio", "norm_layer", "num_classes", "num_heads",
               "patch_size", "pe_method", "pe_overrides", "pos_drop_rate", "pos_embed_type", "proj_drop_rate",
               "qk_scale", "qkv_bias", "t2t_drop", "t2t_kernel_ratio", "token_dim", "tokenizer")
_SWIN_KWARGS = ("always_partition", "attn_drop_rate", "depths", "device", "drop_path_rate", "drop_rate", "dtype",
                "dynamic_img_size", "embed_dim", "embed_layer", "global_pool", "head_dim", "img_size", "in_chans",
                "mlp_ratio", "norm_layer", "num_classes", "num_heads", "patch_size", "pe_method", "pe_overrides",
                "proj_drop_rate", "qkv_bias", "strict_img_size", "weight_init", "window_size")
_CEIT_KWARGS = ("attn_drop_rate", "class_token", "depth", "drop_path_rate", "drop_rate", "embed_dim", "global_pool",
                "img_size", "in_chans", "leff_kernel_size", "mlp_ratio", "norm_layer", "num_classes", "num_heads",
                "patch_size", "pe_method", "pe_overrides", "pos_drop_rate", "proj_drop_rate", "qkv_bias",
                "stem_chans")
MODEL_FACTORY_KWARGS: dict[str, tuple] = {
    "mpvg_deit_tiny_patch16_224": _VIT_KWARGS, "mpvg_deit_small_patch16_224": _VIT_KWARGS,
    "mpvg_deit_base_patch16_224": _VIT_KWARGS, "mpvg_t2t_vit_7": _VIT_KWARGS, "mpvg_vit_lite_7_4": _VIT_KWARGS,
    "mpvg_swin_tiny_patch4_window7_224": _SWIN_KWARGS, "mpvg_ceit_tiny_patch16_224": _CEIT_KWARGS,
}
# Factory kwargs an arch block may not set: the cell sets the PE (method and overrides), and a
# layer class or a device is no setting (YAML cannot hold one).
ARCH_NOT_SETTABLE = frozenset({"pe_method", "pe_overrides", "norm_layer", "embed_layer", "device", "dtype"})
_INTS = {"type": ["integer", "array"], "minimum": 1, "items": _POS_INT}
_ARCH_TYPES = {
    "embed_dim": _POS_INT, "depth": _POS_INT, "num_heads": _INTS, "patch_size": _POS_INT, "window_size": _INTS,
    "depths": {"type": "array", "items": _POS_INT, "minItems": 1}, "token_dim": _POS_INT, "img_size": _INTS,
    "in_chans": _POS_INT, "num_classes": _NN_INT, "stem_chans": _POS_INT, "leff_kernel_size": _POS_INT,
    "head_dim": _OPT_POS_INT, "mlp_ratio": _NNUM, "qkv_bias": _BOOL, "class_token": _BOOL, "global_pool": _STR,
    "attn_drop_rate": _PROB, "drop_path_rate": _PROB, "drop_rate": _PROB, "pos_drop_rate": _PROB,
    "proj_drop_rate": _PROB, "t2t_drop": _PROB, "t2t_kernel_ratio": _NNUM, "qk_scale": {"type": ["number", "null"]},
}
_ANY = {"type": ["number", "string", "boolean", "null", "array", "object"]}


def arch_keys(timm_name: str) -> list[str]:
    """The ``arch`` keys (create_model kwargs) model ``timm_name`` accepts, sorted."""
    return sorted(set(MODEL_FACTORY_KWARGS[timm_name]) - ARCH_NOT_SETTABLE)


def _arch_schema(timm_name: str) -> dict:
    return _obj({k: _ARCH_TYPES.get(k, _ANY) for k in arch_keys(timm_name)})


def _recipe_kind(recipe: Mapping) -> str:
    """Which recipe family a (resolved) recipe belongs to, from its framework key."""
    return {"mask_rcnn": "detection", "upernet": "segmentation"}.get(recipe.get("framework"),
                                                                    CLASSIFICATION_RECIPES_KIND)


def _recipe_schema(kind: str, full: bool) -> dict:
    """A recipe of ``kind``: every key typed, none other; ``full``: resolved, the required keys
    present; else a raw entry (params.yaml's own keys, a scale block's overrides) that may name a base."""
    if full:
        return _obj(RECIPE_PROPS[kind], RECIPE_REQUIRED[kind])
    return _obj({**RECIPE_PROPS[kind], BASE: _STR})


# classes: an ImageNet class subset read from the full folders (a packaged list's name, e.g.
# imagenet100, or the folder names themselves); null or absent: every class folder.
_CLASSES = {"type": ["string", "array", "null"], "items": _STR, "minItems": 1}
_DATASET = _obj({"root": _STR, "num_classes": _POS_INT, "classes": _CLASSES}, ["root", "num_classes"])
# cells: glob patterns over cell ids (`in1k-deit_ti-*`); only matching cells of the grid run.
_CELL_PATTERNS = {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1}
_SCALE_BLOCK = _obj({
    "datasets": _obj({d: _obj({"root": _STR, "num_classes": _POS_INT, "classes": _CLASSES}) for d in DATASETS}),
    "recipes": {"type": "object", "additionalProperties": {"type": "object"}},  # checked per recipe
    "models": {"type": "object", "additionalProperties": {"type": "object"}},   # arch keys, checked per model
    "cells": _CELL_PATTERNS,
})
_MODEL = _obj({"timm": {"enum": sorted(MODEL_FACTORY_KWARGS)}, "depth": _POS_INT,
               "recipe": _STR, "arch": {"type": "object"},
               "method_pe_overrides": _obj({m: _PE_OVERRIDES for m in PAPER_METHODS})},
              ["timm", "depth", "recipe"])
_SLUG = {"type": "string", "pattern": "^[a-z0-9_-]*$"}
_GROUP = _obj({
    "tables": {"type": "array", "items": {"enum": list(TABLES)}, "minItems": 1},
    "task": {"enum": list(TASKS)}, "stage": {"enum": list(STAGES)},
    "dataset": {"enum": list(DATASETS)},
    "models": {"type": "array", "items": _STR, "minItems": 1},
    "methods": {"type": "array", "items": _STR, "minItems": 1},
    "recipe": _STR, "init_from": {"enum": list(TASKS)},
    "variants": {"type": "object", "propertyNames": _SLUG, "additionalProperties": _PE_OVERRIDES},
}, ["tables", "task", "stage", "dataset", "models", "methods"])

SCHEMA = _obj({
    "scale": {"enum": list(SCALES)},
    "seeds": {"type": "array", "items": _NN_INT, "minItems": 1, "uniqueItems": True},
    # optional: {cell id or glob: [seeds]} overriding `seeds` for the cells it matches (cell_seeds)
    "seeds_per_cell": {"type": "object", "additionalProperties": {
        "type": "array", "items": _NN_INT, "minItems": 1, "uniqueItems": True}},
    "paths": _obj({"runs": _STR, "reports": _STR, "data": _STR, "measured_speeds": _STR},  # speeds: workflow.plan
                  ["runs", "reports", "data"]),
    "tracking": _obj({"uri": _STR, "experiment": {"type": "string", "minLength": 1}},
                     ["uri", "experiment"]),
    "datasets": _obj({d: _DATASET for d in DATASETS}, DATASETS),
    "models": {"type": "object", "minProperties": 1, "additionalProperties": _MODEL},
    "recipes": {"type": "object", "minProperties": 1, "additionalProperties": {"type": "object"}},
    "grid": {"type": "array", "items": _GROUP, "minItems": 1},
    "cells": _CELL_PATTERNS,
    **{block: _SCALE_BLOCK for block in SCALE_BLOCKS},
}, ["scale", "seeds", "paths", "tracking", "datasets", "models", "recipes", "grid"])


def _describe(schema: dict) -> str:
    if "enum" in schema:
        return "one of " + ", ".join(repr(v) for v in schema["enum"])
    t = schema.get("type")
    names = {"number": "a number", "integer": "an integer", "string": "a string",
             "boolean": "true or false", "array": "a list", "object": "a mapping", "null": "null"}
    if isinstance(t, list):
        return " or ".join(names.get(x, x) for x in t)
    return names.get(t, "a valid value")


def nearest(word: str, choices: Iterable[str], what: str = "key") -> str:
    """``"; nearest valid key: 'lr_gamma'"`` (difflib), or the valid ones when none is close."""
    import difflib

    choices = sorted(str(c) for c in choices)
    close = difflib.get_close_matches(str(word), choices, n=1, cutoff=0.6)
    if close:
        return f"; nearest valid {what}: {close[0]!r}"
    return f"; valid {what}s: {choices}" if choices else ""


def _unknown(what: str, name: str, choices: Iterable[str]) -> str:
    return f"unknown {what} {name!r}" + nearest(name, choices, what)


class _Origin:
    """Where a key of the (overridden) params came from: a ``--set`` override, or a line of the
    file (found by composing the YAML again, only when there is an error to report)."""

    def __init__(self, where: str, text: str = "", overrides: Mapping[str, str] | None = None):
        self.where, self.text, self.overrides = where, text, dict(overrides or {})

    def __call__(self, path: tuple) -> str:
        path = tuple(str(p) for p in path)
        for key in sorted(self.overrides, key=lambda k: -len(k.split("."))):
            parts = tuple(key.split("."))
            if path[:len(parts)] == parts:
                return f"{self.where} ({self.overrides[key]})"
        line, found = self._line(path)
        if not found:  # not in the file: an override that made it (``--set tiny.recipes.nope.epochs=1``)
            for key in self.overrides:
                if tuple(key.split("."))[:len(path)] == path:
                    return f"{self.where} ({self.overrides[key]})"
        return f"{self.where} (line {line})" if line else self.where

    def _line(self, path: tuple) -> tuple[int | None, bool]:
        """The line of the deepest key of ``path`` in the file, and whether all of it is there."""
        import yaml

        try:
            node = yaml.compose(self.text)
        except yaml.YAMLError:
            return None, False
        line = None
        for part in path:
            if isinstance(node, yaml.MappingNode):
                match = next(((k, v) for k, v in node.value if str(k.value) == part), None)
                if match is None:
                    return line, False
                line, node = match[0].start_mark.line + 1, match[1]
            elif isinstance(node, yaml.SequenceNode) and part.isdigit() and int(part) < len(node.value):
                node = node.value[int(part)]
                line = node.start_mark.line + 1
            else:
                return line, False
        return line, True

    def error(self, path: tuple, text: str) -> ConfigError:
        dotted = ".".join(str(p) for p in path) or "<top>"
        return ConfigError(f"{self(path)}: {dotted}: {text}")


def _validate(instance, schema: dict, origin: _Origin, prefix: tuple = ()) -> None:
    import jsonschema  # lazy: keeps `import mpvg.config` light

    errors = list(jsonschema.Draft202012Validator(schema).iter_errors(instance))
    if not errors:
        return
    # the deepest error is the most specific one for the user
    err = max(errors, key=lambda e: (len(e.absolute_path), [str(p) for p in e.absolute_path]))
    path = (*prefix, *err.absolute_path)
    v = err.validator
    if v == "additionalProperties":
        allowed = sorted(err.schema.get("properties", {}))
        extra = sorted(set(err.instance) - set(allowed))
        raise ConfigError(f"{origin((*path, extra[0]))}: {'.'.join(map(str, path)) or '<top>'}: "
                          f"unknown key(s) {extra}{nearest(extra[0], allowed)}")
    if v == "required":
        text = err.message
    elif v == "enum":
        text = f"expected {_describe(err.schema)}, got {err.instance!r}"
        if isinstance(err.instance, str):
            close = nearest(err.instance, map(str, err.schema["enum"]))
            text += close.replace("valid key", "valid value") if "nearest" in close else ""
    elif v == "type":
        text = f"expected {_describe(err.schema)}, got {err.instance!r}"
    elif v == "propertyNames":
        text = f"bad name {err.instance!r}: {err.message}"
    else:
        text = err.message
    raise origin.error(path, text)


# --------------------------------------------------------------------------- loading

def _parse_value(text: str):
    import yaml

    try:
        value = yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"cannot parse override value {text!r}: {exc}") from None
    if isinstance(value, str) and _FLOAT.fullmatch(value):
        return float(value)  # YAML 1.1 reads "1e-3" (no dot) as a string
    return value


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _normalize_overrides(overrides) -> tuple[dict, dict]:
    """``({dotted key: value}, {dotted key: how it was given})`` of ``--set`` strings or a dict."""
    if overrides is None:
        return {}, {}
    if isinstance(overrides, Mapping):
        return dict(overrides), {k: f"override {k}={v!r}" for k, v in overrides.items()}
    out, shown = {}, {}
    for item in overrides:
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected KEY=VALUE (e.g. scale=paper)")
        out[key.strip()] = _parse_value(value.strip())
        shown[key.strip()] = f"--set {item}"
    return out, shown


def set_dotted(data: dict, dotted: str, value) -> None:
    """Set ``a.b.c`` (list items by index, ``grid.0.methods``) in nested dicts, creating maps."""
    parts = dotted.split(".")
    cur = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(cur, list):
            if not part.isdigit() or int(part) >= len(cur):
                raise ConfigError(f"override {dotted}: {'.'.join(parts[:i]) or '<top>'} is a list of "
                                  f"{len(cur)} items; {part!r} is not an index into it")
            idx = int(part)
            if last:
                cur[idx] = value
            else:
                cur = cur[idx]
            continue
        if not isinstance(cur, dict):
            raise ConfigError(f"override {dotted}: {'.'.join(parts[:i])} is not a mapping")
        if last:
            cur[part] = value
        else:
            cur = cur.setdefault(part, {})


def deep_merge(base: dict, update: Mapping) -> dict:
    """A copy of ``base`` with ``update`` merged in (maps merged recursively, rest replaced)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _unshared(value: Any) -> Any:
    """A copy of nested dicts/lists in which no two places share an object (``copy.deepcopy``
    keeps aliases shared)."""
    if isinstance(value, dict):
        return {k: _unshared(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unshared(v) for v in value]
    return value


def load_params(path: str | Path = "params.yaml", overrides: dict | list[str] | None = None) -> dict:
    """Read, override, validate and resolve params.yaml into a plain dict.

    ``overrides``: a dict of dotted keys (``{"recipes.deit.lr": 1e-3}``) or ``KEY=VALUE``
    strings whose values are parsed as YAML (``["scale=paper", "seeds=[0,1]"]``).  Every key is
    checked (a typo names the key, its params.yaml line or ``--set``, and the nearest valid key).
    The returned dict has each recipe's ``base`` chain and the scale's block (``tiny`` or
    ``budget``) resolved (docs/config.md): both blocks and every ``base`` key are removed.
    """
    import yaml

    path = Path(path)
    where = str(path)
    try:
        text = path.read_text()
        raw = yaml.safe_load(text)
    except FileNotFoundError:
        raise ConfigError(f"{where}: file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping at the top, got {type(raw).__name__}")
    # YAML aliases (``*tiny_cls``) load as one shared dict: copy so that an override of one
    # recipe does not change every recipe that shares the anchor.
    raw = _unshared(raw)
    overrides, shown = _normalize_overrides(overrides)
    for key, value in overrides.items():
        set_dotted(raw, key, value)
    return validate_params(raw, where, _Origin(where, text, shown), overrides)


def validate_params(raw: dict, where: str = "params.yaml", origin: _Origin | None = None,
                    overrides: Mapping[str, Any] | None = None) -> dict:
    """Validate an unresolved params dict (``overrides`` already applied) and return it resolved
    (see :func:`load_params`)."""
    origin = origin or _Origin(where)
    _complete_grid(raw)
    _check_raw(raw, origin)
    block = raw.get(raw["scale"], {}) if raw["scale"] in SCALE_BLOCKS else {}
    params = copy.deepcopy(raw)
    for name in SCALE_BLOCKS:
        params.pop(name, None)
    params["datasets"] = deep_merge(params["datasets"], block.get("datasets", {}))
    params["recipes"] = {name: resolve_recipe(raw, name) for name in raw["recipes"]}
    for name, arch in block.get("models", {}).items():
        params["models"][name]["arch"] = deep_merge(params["models"][name].get("arch", {}), arch)
    if "cells" in block:
        params["cells"] = copy.deepcopy(block["cells"])
    for model in params["models"].values():
        model.setdefault("arch", {})
        model.setdefault("method_pe_overrides", {})
    # An explicit override wins over the scale's value (``--set recipes.deit.epochs=2`` at scale
    # tiny means 2, not the tiny block's value, for deit and every recipe that inherits deit's
    # epochs), so it is applied again after resolution.
    late = {k: v for k, v in (overrides or {}).items() if k != "scale" and k.split(".")[0] not in SCALE_BLOCKS}
    if late and block:
        for key, value in late.items():
            for target in _late_targets(raw, key):
                set_dotted(params, target, copy.deepcopy(value))
    _check_resolved(params, origin)
    return params


def _complete_grid(raw: dict) -> None:
    """A grid group's one name where a list is expected becomes a list; a group without a stage
    trains, one without a dataset reads its task's (TASK_DATASET), one without methods runs all four."""
    for group in raw.get("grid") or []:
        if not isinstance(group, dict):
            continue
        for key in _GROUP_LISTS:
            if isinstance(group.get(key), str):
                group[key] = [group[key]]
        group.setdefault("stage", "train")
        group.setdefault("methods", list(PAPER_METHODS))
        if "dataset" not in group and group.get("task") in TASK_DATASET:
            group["dataset"] = TASK_DATASET[group["task"]]


def recipe_chain(recipes: Mapping[str, Mapping], name: str, section: str = "recipes",
                 origin: _Origin | None = None) -> list[str]:
    """``[root, ..., name]``: the ``base`` chain of entry ``name`` of ``recipes`` (params.yaml's
    recipes, or a scale block's recipe entries, ``section`` naming which)."""
    origin = origin or _Origin("params.yaml")
    chain = [name]
    while BASE in recipes[chain[-1]]:
        base = recipes[chain[-1]][BASE]
        if base not in recipes:
            raise origin.error((*section.split("."), chain[-1], BASE), _unknown("recipe", base, recipes))
        if base in chain:
            raise origin.error((*section.split("."), chain[-1], BASE),
                               "the base chain loops: " + " -> ".join([*chain, base]))
        chain.append(base)
    return chain[::-1]


def _inherit(recipes: Mapping[str, Mapping], name: str, section: str, origin: _Origin | None = None) -> dict:
    out: dict = {}
    for entry in recipe_chain(recipes, name, section, origin):
        out = deep_merge(out, {k: v for k, v in recipes[entry].items() if k != BASE})
    return out


def resolve_recipe(raw: Mapping, name: str, origin: _Origin | None = None) -> dict:
    """Recipe ``name`` of the unresolved params ``raw``: its kind's defaults, then its ``base``
    chain root first, then the scale block's entry for it (with that entry's own ``base`` chain)."""
    recipe = _inherit(raw["recipes"], name, "recipes", origin)
    block = raw.get(raw["scale"], {}) if raw["scale"] in SCALE_BLOCKS else {}
    if name in block.get("recipes", {}):
        recipe = deep_merge(recipe, _inherit(block["recipes"], name, f"{raw['scale']}.recipes", origin))
    recipe = deep_merge(RECIPE_DEFAULTS[_recipe_kind(recipe)], recipe)
    for key in ("mean", "std"):
        if isinstance(recipe.get(key), str) and recipe[key] in NORMALIZATION:
            recipe[key] = list(NORMALIZATION[recipe[key]][key])
    return recipe


def _late_targets(raw: Mapping, key: str) -> list[str]:
    """Where an explicit override ``key`` applies in the resolved params: a recipe key also in
    every recipe that inherits it (no recipe between them in the chain sets it)."""
    parts = key.split(".")
    if parts[0] != "recipes":
        return [key]
    if len(parts) < 3 or parts[1] not in raw["recipes"]:
        return []  # a whole recipe (or all of them) set: resolved from the overridden file as written
    if parts[2] == BASE:
        return []  # the chain itself: already resolved
    name, leaf, rest = parts[1], parts[2], parts[3:]
    recipes = raw["recipes"]
    out = []
    for other in recipes:
        chain = recipe_chain(recipes, other)
        if name in chain and not any(leaf in recipes[c] for c in chain[chain.index(name) + 1:]):
            out.append(".".join(["recipes", other, leaf, *rest]))
    return out


def _check_raw(raw: dict, origin: _Origin) -> None:
    """Every key of the unresolved params, where it is written (so an error names its line)."""
    _validate(raw, SCHEMA, origin)
    recipes, models = raw["recipes"], raw["models"]
    kinds = {name: _recipe_kind(_inherit(recipes, name, "recipes", origin)) for name in recipes}
    for name in recipes:
        _same_kind(recipe_chain(recipes, name), kinds, origin, ("recipes", name, BASE))
        _validate(recipes[name], _recipe_schema(kinds[name], full=False), origin, ("recipes", name))
    for name, model in models.items():
        _check_arch(model.get("arch", {}), model["timm"], origin, ("models", name, "arch"))
        if model["recipe"] not in recipes:
            raise origin.error(("models", name, "recipe"), _unknown("recipe", model["recipe"], recipes))
    for scale in SCALE_BLOCKS:
        block = raw.get(scale, {})
        entries = block.get("recipes", {})
        for name, entry in entries.items():
            if name not in recipes:
                raise origin.error((scale, "recipes", name), _unknown("recipe", name, recipes))
            _validate(entry, _recipe_schema(kinds[name], full=False), origin, (scale, "recipes", name))
        for name in entries:
            _same_kind(recipe_chain(entries, name, f"{scale}.recipes", origin), kinds, origin,
                       (scale, "recipes", name, BASE))
        for name, arch in block.get("models", {}).items():
            if name not in models:
                raise origin.error((scale, "models", name), _unknown("model", name, models))
            _check_arch(arch, models[name]["timm"], origin, (scale, "models", name))
        for name, ds in block.get("datasets", {}).items():  # a block's subset, with the values it inherits
            if ds.get("classes") is not None:
                _check_classes({**raw["datasets"][name], **ds}, f"{origin.where}: {scale}.datasets.{name}", name)
    for name in recipes:
        _validate(resolve_recipe(raw, name, origin), _recipe_schema(kinds[name], full=True), origin,
                  ("recipes", name))
    for i, group in enumerate(raw["grid"]):
        _check_group(raw, group, origin, ("grid", i))


def _same_kind(chain: list, kinds: Mapping[str, str], origin: _Origin, path: tuple) -> None:
    """A base chain stays within one kind (classification, detection, segmentation)."""
    for base, name in zip(chain, chain[1:]):
        if kinds[base] != kinds[name]:
            raise origin.error(path, f"{base!r} is a {kinds[base]} recipe and {name!r} a {kinds[name]} one: "
                                     "a recipe's base must be of its own kind")


def _check_arch(arch: Mapping, timm_name: str, origin: _Origin, path: tuple) -> None:
    """An arch block: create_model kwargs the model's factory accepts, typed."""
    for key in arch:
        if key in ARCH_NOT_SETTABLE:
            why = ("the cell sets it (its method and PE overrides: grid variants, method_pe_overrides)"
                   if key.startswith("pe_") else "a Python object, not a setting")
            raise origin.error((*path, key), f"not settable in arch: {why}")
    _validate(arch, _arch_schema(timm_name), origin, path)


def _check_resolved(params: dict, origin: _Origin) -> None:
    """The resolved params: the schema again (a late override lands here), dataset classes,
    the whole grid (id clashes, init_from edges) and, for the cells that run, the PE depth."""
    where = origin.where
    _validate(params, SCHEMA, origin)
    for name, recipe in params["recipes"].items():
        _validate(recipe, _recipe_schema(_recipe_kind(recipe), full=True), origin, ("recipes", name))
    for name, model in params["models"].items():
        _check_arch(model["arch"], model["timm"], origin, ("models", name, "arch"))
    for name, ds in params["datasets"].items():
        _check_classes(ds, f"{where}: datasets.{name}", name)
    for i, group in enumerate(params["grid"]):
        _check_group(params, group, origin, ("grid", i))
    expand_cells({**params, "cells": None})  # id clashes, init_from edges of the whole grid
    for cell in expand_cells(params).values():
        _check_depth(params, cell, where)


def model_depth(model_cfg: Mapping) -> int:
    """Number of blocks after the scale's arch overrides (Swin: sum of ``depths``)."""
    arch = model_cfg.get("arch", {})
    if "depths" in arch:
        return int(sum(arch["depths"]))
    return int(arch.get("depth", model_cfg["depth"]))


def _check_depth(params: Mapping, cell: "Cell", where: str) -> None:
    last = cell.pe_overrides.get("last_ln_pe")
    depth = model_depth(params["models"][cell.model])
    if last is not None and last >= depth:
        raise ConfigError(f"{where}: cell {cell.id}: last_ln_pe={last} needs more than the {depth} "
                          f"blocks of {cell.model} at scale {params['scale']!r}")


def _check_classes(ds: Mapping, where: str, dataset: str) -> None:
    """A class subset: ImageNet folders only, a known list (or folder names), ``num_classes`` of them."""
    if ds.get("classes") is None:
        return
    if dataset != "imagenet":
        raise ConfigError(f"{where}.classes: a class subset applies to the ImageNet folders only, not {dataset}")
    try:
        classes = dataset_classes(ds)
    except ValueError as err:  # an unknown list, an edited list file
        raise ConfigError(f"{where}.classes: {err}") from None
    if len(set(classes)) != len(classes):
        raise ConfigError(f"{where}.classes: a class is listed twice")
    if len(classes) != ds["num_classes"]:
        raise ConfigError(f"{where}: classes {ds['classes']!r} names {len(classes)} classes but num_classes "
                          f"is {ds['num_classes']}")


#: The packaged ImageNet class subsets (name -> file, class count, sha256, source); the files sit
#: beside it in mpvg/data (package data, read here so that mpvg.config imports nothing of mpvg).
CLASS_LISTS_FILE = Path(__file__).with_name("data") / "class_lists.yaml"


def read_class_list(name: str, lists_file: str | Path = CLASS_LISTS_FILE) -> list[str]:
    """The folder names (WordNet ids) of the packaged class subset ``name``, in file order.

    The file is checked against the sha256 and the class count recorded in ``lists_file``, so an
    edited list can never pass for the published one (ValueError naming the file)."""
    import hashlib

    import yaml

    lists_file = Path(lists_file)
    lists = yaml.safe_load(lists_file.read_text(encoding="utf-8"))
    if name not in lists:
        raise ValueError(f"unknown class list {name!r}; expected one of {sorted(lists)} ({lists_file})")
    entry = lists[name]
    path = lists_file.with_name(entry["file"])
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise ValueError(f"{path}: sha256 differs from the one in {lists_file.name}; "
                         f"it is not the published list ({entry['source']})")
    names = data.decode("ascii").split()
    if len(names) != entry["classes"] or len(set(names)) != len(names):
        raise ValueError(f"{path}: {len(names)} names ({len(set(names))} distinct), expected "
                         f"{entry['classes']} distinct class folders")
    return names


def dataset_classes(ds: Mapping) -> tuple | None:
    """The class folders a dataset entry keeps: ``None`` (all), or its ``classes`` as folder
    names (a packaged list such as ``imagenet100`` is read from mpvg/data, docs/claims.md)."""
    classes = ds.get("classes")
    if classes is None:
        return None
    if isinstance(classes, str):
        return tuple(read_class_list(classes))
    return tuple(str(c) for c in classes)


def _check_group(raw: dict, group: dict, origin: _Origin, path: tuple) -> None:
    for i, model in enumerate(group["models"]):
        if model not in raw["models"]:
            raise origin.error((*path, "models", i), _unknown("model", model, raw["models"]))
    for i, method in enumerate(group["methods"]):
        if method not in PAPER_METHODS:
            raise origin.error((*path, "methods", i), _unknown("method", method, PAPER_METHODS))
    if "recipe" in group and group["recipe"] not in raw["recipes"]:
        raise origin.error((*path, "recipe"), _unknown("recipe", group["recipe"], raw["recipes"]))
    needs_init = group["stage"] != "train"
    if needs_init != ("init_from" in group):
        raise origin.error(path, f"stage {group['stage']!r} "
                           + ("needs init_from (the task of the pretraining cell)" if needs_init
                              else "trains from scratch and takes no init_from"))


# --------------------------------------------------------------------------- cells

def slug(name: str) -> str:
    """``DeiT-Ti`` -> ``deit_ti``; ``MPVG`` -> ``mpvg`` (the pieces of a cell id)."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def cell_id(task: str, model: str, method: str, variant: str = "") -> str:
    return f"{task}-{slug(model)}-{slug(method)}" + (f"-{variant}" if variant else "")


@dataclass(frozen=True)
class Cell:
    """One trained/fine-tuned/evaluated configuration of the grid (seed-independent)."""

    id: str
    stage: str
    task: str
    model: str
    method: str
    pe_overrides: dict
    recipe: str
    dataset: str
    init_from: str | None
    tables: list

    def __hash__(self):
        return hash(self.id)


def expand_cells(params: Mapping) -> dict[str, Cell]:
    """Every cell of the grid, by id, in grid order; shared cells listed once with all tables."""
    cells: dict[str, Cell] = {}
    for gi, group in enumerate(params["grid"]):
        variants = group.get("variants") or {"": {}}
        for model in group["models"]:
            mcfg = params["models"][model]
            recipe = group.get("recipe", mcfg["recipe"])
            for method in group["methods"]:
                for variant, over in variants.items():
                    pe = {**mcfg.get("method_pe_overrides", {}).get(method, {}), **over}
                    cid = cell_id(group["task"], model, method, variant)
                    init = cell_id(group["init_from"], model, method) if group.get("init_from") else None
                    cell = Cell(cid, group["stage"], group["task"], model, method, pe, recipe,
                                group["dataset"], init, list(group["tables"]))
                    if cid in cells:
                        old = cells[cid]
                        same = (old.stage, old.recipe, old.dataset, old.init_from, old.pe_overrides) == (
                            cell.stage, cell.recipe, cell.dataset, cell.init_from, cell.pe_overrides)
                        if not same:
                            raise ConfigError(f"params.yaml: grid.{gi}: cell {cid} is defined twice "
                                              "with different settings")
                        tables = old.tables + [t for t in cell.tables if t not in old.tables]
                        cells[cid] = Cell(**{**old.__dict__, "tables": tables})
                    else:
                        cells[cid] = cell
    for cell in cells.values():
        if cell.init_from is not None and cell.init_from not in cells:
            raise ConfigError(f"params.yaml: cell {cell.id} starts from {cell.init_from}, "
                              "which no grid group trains")
    if params.get("cells") is not None:
        cells = select_cells(cells, params["cells"], params.get("scale", "?"))
    return cells


def select_cells(cells: Mapping[str, Cell], patterns: list, scale: str = "?") -> dict[str, Cell]:
    """The cells whose id matches one of the glob ``patterns`` (params ``cells``, e.g. the
    ``budget`` block's), in grid order.  A pattern that matches nothing, or a selected cell
    whose start point is not selected, is an error (never a silently smaller grid)."""
    for pat in patterns:
        if not any(fnmatch.fnmatchcase(cid, pat) for cid in cells):
            raise ConfigError(f"params.yaml: cells: pattern {pat!r} (scale {scale!r}) matches no cell of the "
                              f"grid; cell ids look like {list(cells)[:3]} (`mpvg cells` lists them)")
    kept = {cid: c for cid, c in cells.items() if any(fnmatch.fnmatchcase(cid, p) for p in patterns)}
    for cell in kept.values():
        if cell.init_from is not None and cell.init_from not in kept:
            raise ConfigError(f"params.yaml: cells (scale {scale!r}) selects {cell.id} but not {cell.init_from}, "
                              "the cell it starts from; add a pattern for it")
    return kept


def cell_seeds(params: Mapping, cells: Mapping[str, Cell]) -> dict[str, list[int]]:
    """The seeds each cell runs: ``seeds``, or the list of the one ``seeds_per_cell`` pattern
    (a cell id or a glob over ids) that matches it. A pattern matching no cell of the grid at this
    scale, a cell two patterns match, or a cell with a seed its start cell does not run, is an
    error (never a silently different set of runs)."""
    per = params.get("seeds_per_cell") or {}
    scale = params.get("scale", "?")
    for pat in per:
        if not any(fnmatch.fnmatchcase(cid, pat) for cid in cells):
            raise ConfigError(f"params.yaml: seeds_per_cell: pattern {pat!r} (scale {scale!r}) matches no cell "
                              f"of the grid; cell ids look like {list(cells)[:3]} (`mpvg cells` lists them)")
    out: dict[str, list[int]] = {}
    for cid in cells:
        hits = [pat for pat in per if fnmatch.fnmatchcase(cid, pat)]
        if len(hits) > 1:
            raise ConfigError(f"params.yaml: seeds_per_cell: patterns {hits[0]!r} and {hits[1]!r} both match cell "
                              f"{cid}; give each cell one list")
        out[cid] = list(per[hits[0]]) if hits else list(params["seeds"])
    for cid, cell in cells.items():
        if cell.init_from is not None and cell.init_from in out:
            lacking = [s for s in out[cid] if s not in out[cell.init_from]]
            if lacking:
                raise ConfigError(f"params.yaml: seeds_per_cell: cell {cid} runs seed(s) {lacking}, which "
                                  f"{cell.init_from}, the cell it starts from, does not run; give it those seeds too")
    return out


# --------------------------------------------------------------------------- runs

@dataclass(frozen=True)
class RunSpec:
    """Everything one job needs, resolved for the current scale."""

    cell: Cell
    scale: str
    seeds: list
    model_name: str                 # timm name
    model_kwargs: dict              # for timm.create_model(model_name, **model_kwargs)
    recipe: dict                    # the recipe with scale applied and lr scaled (see lr_note)
    dataset: str
    dataset_root: Path
    num_classes: int
    runs_root: Path
    tracking: dict = field(default_factory=dict)
    classes: tuple | None = None    # ImageNet class subset (folder names), None: every class

    @property
    def kind(self) -> str:
        """classification | detection | segmentation."""
        return STAGE_OF_TASK_KIND[self.cell.stage]

    def run_dir(self, seed: int) -> Path:
        """``runs/<stage>/<cell>/seed<k>`` (docs/contracts.md)."""
        return run_dir(self.runs_root, self.cell.stage, self.cell.id, seed)

    def init_checkpoint(self, seed: int, init_stage: str = "train") -> Path | None:
        """The checkpoint this cell starts from (same seed), or None for a from-scratch run."""
        from mpvg.run.layout import CHECKPOINT

        if self.cell.init_from is None:
            return None
        return run_dir(self.runs_root, init_stage, self.cell.init_from, seed) / CHECKPOINT


def run_dir(runs_root: str | Path, stage: str, cell: str, seed: int) -> Path:
    return Path(runs_root) / stage / cell / f"seed{seed}"


def scaled_recipe(recipe: Mapping) -> dict:
    """The recipe with the batch-size lr rule applied.

    Keeps the configured value as ``base_lr`` and writes the value the optimizer uses into
    ``lr`` (linear: ``lr * batch_size / lr_base_batch``, as DeiT, CeiT and Swin do).
    """
    out = dict(recipe)
    if "lr_scaling" not in out:  # downstream recipes: lr used as given
        return out
    factor = out["batch_size"] / out["lr_base_batch"] if out["lr_scaling"] == "linear" else 1.0
    out["base_lr"] = out["lr"]
    out["lr"] = out["lr"] * factor
    if out.get("scale_min_warmup_lr"):
        out["min_lr"] = out["min_lr"] * factor
        out["warmup_lr"] = out["warmup_lr"] * factor
    out["total_epochs"] = out["epochs"] + out["cooldown_epochs"]
    return out


def resolve_run(params: Mapping, cell_id: str) -> RunSpec:
    """The job description of one cell: model kwargs, recipe, dataset root."""
    cells = expand_cells(params)
    if cell_id not in cells:
        close = [c for c in cells if c.split("-")[:2] == cell_id.split("-")[:2]] or list(cells)[:8]
        raise ConfigError(f"unknown cell {cell_id!r}; expected one of e.g. {close} "
                          f"({len(cells)} cells: `mpvg cells` lists them)")
    cell = cells[cell_id]
    mcfg = params["models"][cell.model]
    recipe = scaled_recipe(params["recipes"][cell.recipe])
    ds = params["datasets"][cell.dataset]
    kwargs: dict[str, Any] = {"pe_method": cell.method.lower(), "pe_overrides": dict(cell.pe_overrides)}
    if STAGE_OF_TASK_KIND[cell.stage] == "classification":
        kwargs["num_classes"] = ds["num_classes"]
        kwargs["img_size"] = recipe["img_size"]
    if "drop_path" in recipe:
        kwargs["drop_path_rate"] = recipe["drop_path"]
    kwargs.update(copy.deepcopy(mcfg.get("arch", {})))
    _check_depth(params, cell, "params")
    return RunSpec(cell=cell, scale=params["scale"], seeds=list(params["seeds"]),
                   model_name=mcfg["timm"], model_kwargs=kwargs, recipe=recipe,
                   dataset=cell.dataset, dataset_root=Path(ds["root"]),
                   num_classes=ds["num_classes"], runs_root=Path(params["paths"]["runs"]),
                   tracking=dict(params["tracking"]), classes=dataset_classes(ds))


# --------------------------------------------------------------------------- CLI glue

def add_params_arguments(parser) -> None:
    """``--params PATH`` and repeatable ``--set KEY=VALUE``, shared by every command."""
    parser.add_argument("--params", default="params.yaml", metavar="PATH",
                        help="the params file (default: params.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a params key, value parsed as YAML "
                             "(e.g. --set scale=paper --set seeds=[0,1]); repeatable")


def params_from_args(args) -> dict:
    """:func:`load_params` from the arguments added by :func:`add_params_arguments`."""
    return load_params(getattr(args, "params", "params.yaml"), getattr(args, "overrides", None) or None)
