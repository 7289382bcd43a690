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
    "mean": _TRIPLE, "std": _TRIPLE,
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
    "framework": _STR, "backbone": _STR, "optimizer": {"enum": ["adamw", "sgd"]},
    "lr": _NNUM, "weight_decay": _NNUM, "batch_size": _POS_INT, "warmup_iters": _NN_INT,
    "warmup_ratio": _NNUM, "crop_size": _POS_INT, "drop_path": _PROB, "clip_grad": _OPT_NUM,
    "layer_decay": {"type": ["number", "null"], "exclusiveMinimum": 0, "maximum": 1},
    "amp": _BOOL, "workers": _NN_INT, "adapter": _ADAPTER,
}
# Downstream recipes: the keys used here are typed; the downstream code may add its own
# (free-form), but they must still be plain scalars/lists/maps.
DETECTION_RECIPE_PROPS = {
    **_DOWNSTREAM_COMMON, "framework": {"enum": ["mask_rcnn"]}, "epochs": _POS_INT,
    "lr_steps": {"type": "array", "items": _POS_INT}, "lr_gamma": _NNUM,
    "no_decay_keys": {"type": "array", "items": _STR},
    "train_short_sides": {"type": "array", "items": _POS_INT, "minItems": 1},
    "max_size": _POS_INT, "test_short_side": _POS_INT,
}
SEGMENTATION_RECIPE_PROPS = {
    **_DOWNSTREAM_COMMON, "framework": {"enum": ["upernet"]}, "iters": _POS_INT,
    "sched": {"enum": ["poly"]}, "poly_power": _NNUM, "min_lr": _NNUM, "betas": _PAIR,
    "img_scale": _PAIR, "ratio_range": _PAIR, "cat_max_ratio": _PROB,
}
_FREE = {"type": ["number", "string", "boolean", "null", "array", "object"]}


def _recipe_schema(props: dict, partial: bool, free: bool) -> dict:
    required = () if partial else [k for k in props if k not in OPTIONAL_RECIPE_KEYS]
    return _obj(props, required, _FREE if free else False)


def _recipe_kind(recipe: Mapping) -> str:
    """Which recipe family a block belongs to, from its framework key."""
    fw = recipe.get("framework")
    if fw == "mask_rcnn":
        return "detection"
    if fw == "upernet":
        return "segmentation"
    return CLASSIFICATION_RECIPES_KIND


def _recipe_schema_for(recipe: Mapping, partial: bool) -> dict:
    kind = _recipe_kind(recipe)
    if kind == "detection":
        return _recipe_schema(DETECTION_RECIPE_PROPS, partial=True, free=True) | (
            {} if partial else {"required": ["framework", "lr", "weight_decay", "batch_size", "epochs"]})
    if kind == "segmentation":
        return _recipe_schema(SEGMENTATION_RECIPE_PROPS, partial=True, free=True) | (
            {} if partial else {"required": ["framework", "lr", "weight_decay", "batch_size", "iters"]})
    return _recipe_schema(CLASSIFICATION_RECIPE_PROPS, partial, free=False)


# classes: an ImageNet class subset read from the full folders (a packaged list's name, e.g.
# imagenet100, or the folder names themselves); null or absent: every class folder.
_CLASSES = {"type": ["string", "array", "null"], "items": _STR, "minItems": 1}
_DATASET = _obj({"root": _STR, "num_classes": _POS_INT, "classes": _CLASSES}, ["root", "num_classes"])
# cells: glob patterns over cell ids (`in1k-deit_ti-*`); only matching cells of the grid run.
_CELL_PATTERNS = {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1}
_SCALE_BLOCK = _obj({
    "datasets": _obj({d: _obj({"root": _STR, "num_classes": _POS_INT, "classes": _CLASSES}) for d in DATASETS}),
    "recipes": {"type": "object", "additionalProperties": {"type": "object"}},
    "models": {"type": "object", "additionalProperties": {"type": "object"}},
    "cells": _CELL_PATTERNS,
})
_MODEL = _obj({"timm": {"type": "string", "pattern": "^[a-z0-9_]+$"}, "depth": _POS_INT,
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


def _format_error(err, where: str, prefix: tuple = ()) -> str:
    path = ".".join(str(p) for p in (*prefix, *err.absolute_path)) or "<top>"
    v = err.validator
    if v == "additionalProperties":
        allowed = sorted(err.schema.get("properties", {}))
        extra = sorted(set(err.instance) - set(allowed)) if isinstance(err.instance, dict) else []
        return (f"{where}: {path}: unknown key(s) {extra}; "
                f"expected some of {allowed}" if allowed else f"{where}: {path}: unknown key(s) {extra}")
    if v == "required":
        return f"{where}: {path}: {err.message}"
    if v in ("type", "enum"):
        return f"{where}: {path}: expected {_describe(err.schema)}, got {err.instance!r}"
    if v == "propertyNames":
        return f"{where}: {path}: bad name {err.instance!r}: {err.message}"
    return f"{where}: {path}: {err.message}"


def _validate(instance, schema: dict, where: str, prefix: tuple = ()) -> None:
    import jsonschema  # lazy: keeps `import mpvg.config` light

    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(instance), key=lambda e: (len(e.absolute_path), list(map(str, e.absolute_path))))
    if errors:
        # the deepest error is the most specific one for the user
        err = max(errors, key=lambda e: len(e.absolute_path))
        raise ConfigError(_format_error(err, where, prefix))


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


def _normalize_overrides(overrides) -> dict:
    if overrides is None:
        return {}
    if isinstance(overrides, Mapping):
        return dict(overrides)
    out = {}
    for item in overrides:
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected KEY=VALUE (e.g. scale=paper)")
        out[key.strip()] = _parse_value(value.strip())
    return out


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
    strings whose values are parsed as YAML (``["scale=paper", "seeds=[0,1]"]``).  The
    returned dict has the scale's block (``tiny`` or ``budget``) merged in when ``scale`` is
    one of those (both blocks are removed).
    """
    import yaml

    path = Path(path)
    where = str(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{where}: file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping at the top, got {type(raw).__name__}")
    # YAML aliases (``*tiny_cls``) load as one shared dict: copy so that an override of one
    # recipe does not change every recipe that shares the anchor.
    raw = _unshared(raw)
    overrides = _normalize_overrides(overrides)
    for key, value in overrides.items():
        set_dotted(raw, key, value)
    params = validate_params(raw, where)
    # An explicit override wins over the scale's value (``--set recipes.deit.epochs=2`` at
    # scale tiny means 2, not the tiny block's value), so re-apply it after resolution.
    late = {k: v for k, v in overrides.items()
            if k != "scale" and k.split(".")[0] not in SCALE_BLOCKS}
    if late and raw["scale"] in SCALE_BLOCKS:
        for key, value in late.items():
            set_dotted(params, key, copy.deepcopy(value))
        _check(params, where)
    return params


def validate_params(raw: dict, where: str = "params.yaml") -> dict:
    """Validate an unresolved params dict and return it resolved (see :func:`load_params`)."""
    _check(raw, where)
    block = raw.get(raw["scale"], {}) if raw["scale"] in SCALE_BLOCKS else {}
    params = copy.deepcopy(raw)
    for name in SCALE_BLOCKS:
        params.pop(name, None)
    params["datasets"] = deep_merge(params["datasets"], block.get("datasets", {}))
    params["recipes"] = deep_merge(params["recipes"], block.get("recipes", {}))
    for name, arch in block.get("models", {}).items():
        params["models"][name]["arch"] = deep_merge(params["models"][name].get("arch", {}), arch)
    if "cells" in block:
        params["cells"] = copy.deepcopy(block["cells"])
    for model in params["models"].values():
        model.setdefault("arch", {})
        model.setdefault("method_pe_overrides", {})
    _check(params, where)
    return params


def _check(raw: dict, where: str) -> None:
    """Schema, cross-references and the cells of a params dict (resolved or not)."""
    _validate(raw, SCHEMA, where)
    for name, recipe in raw["recipes"].items():
        _validate(recipe, _recipe_schema_for(recipe, partial=False), where, ("recipes", name))
    for scale in SCALE_BLOCKS:
        block = raw.get(scale, {})
        for name, recipe in block.get("recipes", {}).items():
            if name not in raw["recipes"]:
                raise ConfigError(f"{where}: {scale}.recipes.{name}: unknown recipe; expected one of "
                                  f"{sorted(raw['recipes'])}")
            _validate(recipe, _recipe_schema_for(raw["recipes"][name], partial=True), where,
                      (scale, "recipes", name))
        for name in block.get("models", {}):
            if name not in raw["models"]:
                raise ConfigError(f"{where}: {scale}.models.{name}: unknown model; expected one of "
                                  f"{sorted(raw['models'])}")
        for name, ds in block.get("datasets", {}).items():  # a block's subset, with the values it inherits
            if ds.get("classes") is not None:
                _check_classes({**raw["datasets"][name], **ds}, f"{where}: {scale}.datasets.{name}", name)
    for name, ds in raw["datasets"].items():
        _check_classes(ds, f"{where}: datasets.{name}", name)
    for name, model in raw["models"].items():
        if model["recipe"] not in raw["recipes"]:
            raise ConfigError(f"{where}: models.{name}.recipe: unknown recipe {model['recipe']!r}; "
                              f"expected one of {sorted(raw['recipes'])}")
    for i, group in enumerate(raw["grid"]):
        _check_group(raw, group, f"{where}: grid.{i}")
    expand_cells({**raw, "cells": None})  # id clashes, init_from edges of the whole grid
    # the cells that run (the active scale's `cells` patterns are checked once merged in): PE depth
    for cell in expand_cells(raw).values():
        _check_depth(raw, cell, where)


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


def dataset_classes(ds: Mapping) -> tuple | None:
    """The class folders a dataset entry keeps: ``None`` (all), or its ``classes`` as folder
    names (a packaged list such as ``imagenet100`` is read from mpvg/data, docs/claims.md)."""
    classes = ds.get("classes")
    if classes is None:
        return None
    if isinstance(classes, str):
        from mpvg.data import DatasetError, class_list  # torch-free

        try:
            return tuple(class_list(classes))
        except DatasetError as err:
            raise ValueError(str(err)) from None
    return tuple(str(c) for c in classes)


def _check_group(raw: dict, group: dict, where: str) -> None:
    for model in group["models"]:
        if model not in raw["models"]:
            raise ConfigError(f"{where}.models: unknown model {model!r}; expected one of "
                              f"{sorted(raw['models'])}")
    for method in group["methods"]:
        if method not in PAPER_METHODS:
            raise ConfigError(f"{where}.methods: unknown method {method!r}; expected one of "
                              f"{list(PAPER_METHODS)}")
    if "recipe" in group and group["recipe"] not in raw["recipes"]:
        raise ConfigError(f"{where}.recipe: unknown recipe {group['recipe']!r}; expected one of "
                          f"{sorted(raw['recipes'])}")
    needs_init = group["stage"] != "train"
    if needs_init != ("init_from" in group):
        raise ConfigError(f"{where}: stage {group['stage']!r} "
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
    """:func:`load_params` from the arguments added by :func:`add_params_arguments`.

    Under DVC (a stage's command), also checks that dvc.yaml still matches params.yaml: a stage
    run from a stale dvc.yaml stops with what to run instead (mpvg.workflow.dvcyaml)."""
    path, overrides = getattr(args, "params", "params.yaml"), getattr(args, "overrides", None) or []
    params = load_params(path, overrides or None)
    import os

    if os.environ.get("DVC_STAGE"):
        from mpvg.workflow.dvcyaml import stale_under_dvc

        problem = stale_under_dvc(path, list(overrides), params)
        if problem:
            raise ConfigError(problem)
    return params
