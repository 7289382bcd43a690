"""params.yaml: schema errors name the key, overrides, scale resolution, the grid of cells."""
import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mpvg import config
from mpvg.config import ConfigError, expand_cells, load_params, resolve_run

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params.yaml"
METHODS = ["default", "lape", "pvg", "mpvg"]


@pytest.fixture(scope="module")
def tiny():
    return load_params(PARAMS)


@pytest.fixture(scope="module")
def paper():
    return load_params(PARAMS, ["scale=paper"])


def _error(overrides) -> str:
    with pytest.raises(ConfigError) as info:
        load_params(PARAMS, overrides)
    return str(info.value)


# --------------------------------------------------------------------------- schema errors

SET = "params.yaml (--set {})"  # where a --set typo is reported to come from


@pytest.mark.parametrize("item, message", [
    # one per typo class: the key, where it came from, the nearest valid key
    ("models.DeiT-Ti.arch.embeddim=3",
     "models.DeiT-Ti.arch: unknown key(s) ['embeddim']; nearest valid key: 'embed_dim'"),
    ("recipes.deit.lrr=1", "recipes.deit: unknown key(s) ['lrr']; nearest valid key: 'lr'"),
    ("recipes.coco_maskrcnn.lr_gama=0.5",
     "recipes.coco_maskrcnn: unknown key(s) ['lr_gama']; nearest valid key: 'lr_gamma'"),
    ("tiny.recipes.deit.epoch=3", "tiny.recipes.deit: unknown key(s) ['epoch']; nearest valid key: 'epochs'"),
    ("tiny.models.DeiT-Ti.embeddim=3",
     "tiny.models.DeiT-Ti: unknown key(s) ['embeddim']; nearest valid key: 'embed_dim'"),
    ("budget.recipes.t2t.lrr=1", "budget.recipes.t2t: unknown key(s) ['lrr']; nearest valid key: 'lr'"),
    ("scal=paper", "<top>: unknown key(s) ['scal']; nearest valid key: 'scale'"),
    # a key another model family has, a downstream key of the other task
    ("models.Swin-Ti.arch.depth=3", "models.Swin-Ti.arch: unknown key(s) ['depth']; nearest valid key: 'depths'"),
    ("tiny.recipes.ade20k_upernet.fpn_channels=3",
     "tiny.recipes.ade20k_upernet: unknown key(s) ['fpn_channels']; nearest valid key: 'channels'"),
    ("models.DeiT-Ti.arch.pe_method=mpvg", "models.DeiT-Ti.arch.pe_method: not settable in arch: the cell sets "
     "it (its method and PE overrides: grid variants, method_pe_overrides)"),
    # wrong values
    ("recipes.deit.lr=abc", "recipes.deit.lr: expected a number, got 'abc'"),
    ("scale=huge", "scale: expected one of 'tiny', 'budget', 'paper', got 'huge'; nearest valid value: 'budget'"),
    ("seeds=[a]", "seeds.0: expected an integer, got 'a'"),
    ("datasets.imagenet.root=3", "datasets.imagenet.root: expected a string, got 3"),
    ("grid.0.models=[DeiT-X]", "grid.0.models.0: unknown model 'DeiT-X'; nearest valid model: 'DeiT-S'"),
    ("grid.0.methods=[Foo]", "grid.0.methods.0: unknown method 'Foo'; valid methods: ['Default', 'LaPE', 'MPVG', 'PVG']"),
    ("grid.5.variants.x.poool=avg", "grid.5.variants.x: unknown key(s) ['poool']; nearest valid key: 'pool'"),
    ("tiny.recipes.deit.epochs=0", "tiny.recipes.deit.epochs: 0 is less than the minimum of 1"),
    ("tiny.recipes.nope.epochs=1", "tiny.recipes.nope: unknown recipe 'nope'; valid recipes: ['ade20k_upernet', "
     "'ceit', 'coco_maskrcnn', 'deit', 'swin', 't2t', 't2t_c100', 'vit_lite_c100']"),
    ("tiny.models.DeiT-X.depth=2", "tiny.models.DeiT-X: unknown model 'DeiT-X'; nearest valid model: 'DeiT-S'"),
    ("recipes.coco_maskrcnn.lr=x", "recipes.coco_maskrcnn.lr: expected a number, got 'x'"),
    ("recipes.ade20k_upernet.iters=-1", "recipes.ade20k_upernet.iters: -1 is less than the minimum of 1"),
    ("recipes.deit.randaugment=autoaug", "recipes.deit.randaugment: 'autoaug' does not match '^rand(-[a-z]+[0-9.]*)*$'"),
    ("grid.2.init_from=xx", "grid.2.init_from: expected one of 'in1k', 'c100', 'coco', 'ade20k', got 'xx'"),
    ("models.DeiT-Ti.recipe=nope", "models.DeiT-Ti.recipe: unknown recipe 'nope'; valid recipes: ['ade20k_upernet', "
     "'ceit', 'coco_maskrcnn', 'deit', 'swin', 't2t', 't2t_c100', 'vit_lite_c100']"),
    ("models.DeiT-Ti.timm=mpvg_deit_tiny", "models.DeiT-Ti.timm: expected one of 'mpvg_ceit_tiny_patch16_224', "
     "'mpvg_deit_base_patch16_224', 'mpvg_deit_small_patch16_224', 'mpvg_deit_tiny_patch16_224', "
     "'mpvg_swin_tiny_patch4_window7_224', 'mpvg_t2t_vit_7', 'mpvg_vit_lite_7_4', got 'mpvg_deit_tiny'; "
     "nearest valid value: 'mpvg_deit_tiny_patch16_224'"),
    ("recipes.swin.base=nope", "recipes.swin.base: unknown recipe 'nope'; valid recipes: ['ade20k_upernet', "
     "'ceit', 'coco_maskrcnn', 'deit', 'swin', 't2t', 't2t_c100', 'vit_lite_c100']"),
])
def test_a_bad_set_names_the_key_the_override_and_the_nearest_valid_key(item, message):
    with pytest.raises(ConfigError) as info:
        load_params("params.yaml", [item])
    assert str(info.value) == f"{SET.format(item)}: {message}"


def _line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


@pytest.mark.parametrize("old, new, message", [
    ("    warmup_epochs: 20\n", "    warmup_epoch: 20\n",
     "recipes.swin: unknown key(s) ['warmup_epoch']; nearest valid key: 'warmup_epochs'"),
    ("    lr_gamma: 0.1\n", "    lr_gama: 0.1\n",
     "recipes.coco_maskrcnn: unknown key(s) ['lr_gama']; nearest valid key: 'lr_gamma'"),
    ("    DeiT-S: {embed_dim: 64,", "    DeiT-S: {embeddim: 64,",
     "tiny.models.DeiT-S: unknown key(s) ['embeddim']; nearest valid key: 'embed_dim'"),
    ("    t2t: {base: deit, epochs: 5}\n", "    t2t: {base: deit, epoch: 5}\n",
     "tiny.recipes.t2t: unknown key(s) ['epoch']; nearest valid key: 'epochs'"),
    ("scale: tiny\n", "scale: tiny\nsedes: [1]\n", "<top>: unknown key(s) ['sedes']; nearest valid key: 'seeds'"),
    ("    weight_decay: 0.03\n", "    weight_decay: lots\n", "recipes.t2t.weight_decay: expected a number, got 'lots'"),
])
def test_a_typo_in_the_file_names_its_line(tmp_path, old, new, message):
    text = PARAMS.read_text()
    assert text.count(old) == 1
    bad = tmp_path / "params.yaml"
    bad.write_text(text.replace(old, new))
    line = _line_of(bad.read_text(), new.strip().split("\n")[-1].split(",")[0])
    with pytest.raises(ConfigError) as info:
        load_params(bad)
    assert str(info.value) == f"{bad} (line {line}): {message}"


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"^/.*/missing\.yaml: file not found$"):
        load_params(tmp_path / "missing.yaml")


def test_arch_keys_are_the_kwargs_the_model_factories_accept():
    """config.MODEL_FACTORY_KWARGS (kept torch-free) equals the __init__ signature of the class each
    registered factory builds (Swin: timm's SwinTransformer, which SwinTransformerPE passes **kwargs to)."""
    import inspect

    import timm
    from timm.models.swin_transformer import SwinTransformer

    from mpvg.models.registry import PAPER_MODELS

    tiny = load_params(PARAMS)
    assert set(config.MODEL_FACTORY_KWARGS) == set(PAPER_MODELS.values())
    for paper_name, timm_name in PAPER_MODELS.items():
        model = timm.create_model(timm_name, pe_method="default", **tiny["models"][paper_name]["arch"])
        params = dict(inspect.signature(type(model).__init__).parameters)
        params.pop("self")
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            assert type(model).__bases__[0] is SwinTransformer, timm_name
            params = {**{k: v for k, v in params.items() if k != "kwargs"},
                      **{k: v for k, v in inspect.signature(SwinTransformer.__init__).parameters.items() if k != "self"}}
        assert sorted(config.MODEL_FACTORY_KWARGS[timm_name]) == sorted(params), timm_name


def test_downstream_defaults_are_recipe_keys():
    """Every key the downstream engine reads with a default is a typed recipe key (a typo of one of
    them is an error, the key itself is accepted)."""
    from mpvg.downstream.engine import DETECTION_DEFAULTS, SEGMENTATION_DEFAULTS

    assert set(DETECTION_DEFAULTS) <= set(config.DETECTION_RECIPE_PROPS)
    assert set(SEGMENTATION_DEFAULTS) <= set(config.SEGMENTATION_RECIPE_PROPS)


def test_last_ln_pe_deeper_than_model_is_rejected():
    assert _error(["grid.5.variants.lastpe11.last_ln_pe=12"]) == (
        f"{PARAMS}: cell in1k-deit_ti-mpvg-lastpe11: last_ln_pe=12 needs more than the 12 blocks of DeiT-Ti "
        "at scale 'tiny'")
    # a tiny arch too shallow for Table 5 is caught at load time, not at training time
    assert _error(["tiny.models.DeiT-Ti.depth=4"]) == (
        f"{PARAMS}: cell in1k-deit_ti-mpvg-lastpe11: last_ln_pe=11 needs more than the 4 blocks of DeiT-Ti "
        "at scale 'tiny'")


def test_downstream_recipe_keys_are_closed_and_typed():
    p = load_params(PARAMS, ["recipes.coco_maskrcnn.fpn_channels=128", "recipes.ade20k_upernet.aux_weight=0.2"])
    assert p["recipes"]["coco_maskrcnn"]["fpn_channels"] == 128 and p["recipes"]["ade20k_upernet"]["aux_weight"] == 0.2
    with pytest.raises(ConfigError, match=r"^params\.yaml \(--set recipes\.coco_maskrcnn\.my_new_knob=3\): "
                                          r"recipes\.coco_maskrcnn: unknown key\(s\) \['my_new_knob'\]"):
        load_params("params.yaml", ["recipes.coco_maskrcnn.my_new_knob=3"])


def test_override_forms(tmp_path):
    p = load_params(PARAMS, {"scale": "paper", "seeds": [0, 1], "recipes.deit.epochs": 5})
    assert p["scale"] == "paper" and p["seeds"] == [0, 1] and p["recipes"]["deit"]["epochs"] == 5
    p = load_params(PARAMS, ["scale=paper", "seeds=[0,1,2]", "tracking.uri=http://x:5000",
                             "grid.0.models=[DeiT-Ti, T2T-ViT-7]"])
    assert p["seeds"] == [0, 1, 2] and p["tracking"]["uri"] == "http://x:5000"
    assert not any(c.startswith("in1k-deit_s") for c in expand_cells(p))
    assert _error(["scale"]) == "override 'scale': expected KEY=VALUE (e.g. scale=paper)"
    assert _error(["grid.99.models=[DeiT-Ti]"]) == ("override grid.99.models: grid is a list of 11 items; "
                                                     "'99' is not an index into it")


def test_cli_arguments():
    parser = argparse.ArgumentParser()
    config.add_params_arguments(parser)
    args = parser.parse_args(["--params", str(PARAMS), "--set", "scale=paper", "--set", "seeds=[3]"])
    p = config.params_from_args(args)
    assert p["scale"] == "paper" and p["seeds"] == [3]
    assert parser.parse_args([]).params == "params.yaml"


# --------------------------------------------------------------------------- scales

def test_tiny_scale_merges_overrides(tiny, paper):
    assert "tiny" not in tiny and "tiny" not in paper
    assert tiny["datasets"]["imagenet"] == {"root": "data/tiny/imagenet", "num_classes": 10}
    assert paper["datasets"]["imagenet"] == {"root": "data/imagenet", "num_classes": 1000}
    assert tiny["recipes"]["deit"]["img_size"] == 32 and paper["recipes"]["deit"]["img_size"] == 224
    # untouched keys survive the merge
    assert tiny["recipes"]["deit"]["optimizer"] == "adamw" and tiny["recipes"]["deit"]["sched"] == "cosine"
    assert tiny["models"]["DeiT-Ti"]["arch"]["embed_dim"] == 48
    assert paper["models"]["DeiT-Ti"]["arch"] == {}


def test_paper_recipes_match_table7(paper):
    """Effective lr/wd/batch/epochs/warmup equal paper Table 7 after the lr rule."""
    table7 = {  # recipe: (lr, wd, batch, trained epochs, warmup)
        "deit": (1e-3, 0.05, 1024, 300, 5),       # 5e-4 per 512 (DeiT's rule), x 1024/512
        "swin": (1e-3, 0.05, 1024, 300, 20),
        "ceit": (1e-3, 0.05, 1024, 300, 5),
        "t2t": (1e-3, 0.03, 512, 310, 10),
        "vit_lite_c100": (6e-4, 0.06, 128, 310, 10),
        "t2t_c100": (5e-2, 5e-4, 128, 60, 0),
    }
    for name, (lr, wd, batch, epochs, warmup) in table7.items():
        r = config.scaled_recipe(paper["recipes"][name])
        assert r["lr"] == pytest.approx(lr), name
        assert (r["weight_decay"], r["batch_size"], r["total_epochs"], r["warmup_epochs"]) == (wd, batch, epochs, warmup), name
    assert paper["recipes"]["t2t_c100"]["optimizer"] == "sgd"
    coco, ade = paper["recipes"]["coco_maskrcnn"], paper["recipes"]["ade20k_upernet"]
    assert (coco["lr"], coco["weight_decay"], coco["batch_size"], coco["epochs"], coco["lr_steps"]) == (1e-4, 0.05, 8, 36, [27, 33])
    assert coco["crop_size"] == 1024 and coco["train_short_sides"][0] == 480 and coco["train_short_sides"][-1] == 800
    assert (ade["lr"], ade["weight_decay"], ade["batch_size"], ade["iters"], ade["crop_size"]) == (12e-5, 0.01, 8, 160000, 512)


def test_swin_scales_min_and_warmup_lr():
    r = config.scaled_recipe({"lr": 5e-4, "batch_size": 2048, "lr_base_batch": 512, "lr_scaling": "linear",
                              "scale_min_warmup_lr": True, "min_lr": 1e-6, "warmup_lr": 1e-7,
                              "epochs": 3, "cooldown_epochs": 1})
    assert r["lr"] == pytest.approx(2e-3) and r["base_lr"] == 5e-4
    assert r["min_lr"] == pytest.approx(4e-6) and r["warmup_lr"] == pytest.approx(4e-7)
    assert r["total_epochs"] == 4


# --------------------------------------------------------------------------- cells

def test_cell_counts_and_sharing(tiny):
    cells = expand_cells(tiny)
    by_table = {t: [c for c in cells.values() if t in c.tables] for t in config.TABLES}
    assert len(by_table["T1"]) == 24
    assert {c.model for c in by_table["T1"]} == {"DeiT-Ti", "DeiT-S", "DeiT-B", "Swin-Ti", "CeiT-Ti", "T2T-ViT-7"}
    assert len(by_table["T2"]) == 8 and len(by_table["T3"]) == 4 and len(by_table["T4"]) == 4
    assert len(by_table["T5"]) == 4 and len(by_table["T6"]) == 4
    assert len(by_table["F5"]) == 2 and len(by_table["F1"]) == 4
    assert [c.id for c in by_table["C1"]] == ["in1k-deit_ti-mpvg-detach"]  # the control, at every scale
    # shared cells are trained once and list every table that uses them
    assert cells["in1k-deit_ti-mpvg"].tables == ["T1", "T5", "T6"]
    assert cells["in1k-deit_ti-default"].tables == ["T1", "F1"]
    assert cells["in1k-deit_ti-pvg"].tables == ["T1", "F1"]
    assert cells["in1k-deit_ti-default-gap"].tables == ["F5", "F1"]
    # 24 + 8 + 8 downstream + 3 (T5) + 3 (T6) + 2 (F5) + 1 (F1 class token + layer-wise) + 1 (C1 control)
    assert len(cells) == 50
    assert all(c.id == config.cell_id(c.task, c.model, c.method) or c.pe_overrides for c in cells.values())


def test_ablation_cells(tiny):
    cells = expand_cells(tiny)
    assert {cells[f"in1k-deit_ti-mpvg-lastpe{k}"].pe_overrides["last_ln_pe"] for k in (11, 8, 5)} == {11, 8, 5}
    assert cells["in1k-deit_ti-mpvg-layer0"].pe_overrides == {"include_layer0": True}
    assert cells["in1k-deit_ti-mpvg-nonhier"].pe_overrides == {"hierarchical": False}
    assert cells["in1k-deit_ti-mpvg-noinput"].pe_overrides == {"add_at_input": False}
    assert cells["in1k-deit_ti-default-gap"].pe_overrides == {"pool": "avg"}
    assert cells["in1k-deit_ti-default-gap-lastpe0"].pe_overrides == {"pool": "avg", "last_ln_pe": 0}
    assert cells["in1k-deit_ti-pvg-token"].pe_overrides == {"pool": "token"}
    # Swin: PVG/MPVG include layer 0 (paper, Experiments)
    assert cells["in1k-swin_ti-mpvg"].pe_overrides == {"include_layer0": True}
    assert cells["in1k-swin_ti-lape"].pe_overrides == {}


def test_finetune_and_downstream_edges(tiny):
    cells = expand_cells(tiny)
    for m in METHODS:
        ft = cells[f"c100-t2t_vit_7-{m}"]
        assert (ft.stage, ft.recipe, ft.init_from) == ("finetune", "t2t_c100", f"in1k-t2t_vit_7-{m}")
        vl = cells[f"c100-vit_lite-{m}"]
        assert (vl.stage, vl.init_from, vl.dataset) == ("train", None, "cifar100")
        for task, stage in (("coco", "detect"), ("ade20k", "segment")):
            c = cells[f"{task}-deit_ti-{m}"]
            assert (c.stage, c.dataset, c.init_from) == (stage, task, f"in1k-deit_ti-{m}")
    assert _error(["grid.0.models=[DeiT-S]"]) == ("params.yaml: cell c100-t2t_vit_7-default starts from "
                                                  "in1k-t2t_vit_7-default, which no grid group trains")


def test_conflicting_duplicate_cell_is_an_error():
    msg = _error({"grid.6.variants": {"": {"hierarchical": False}}})
    assert msg == "params.yaml: grid.6: cell in1k-deit_ti-mpvg is defined twice with different settings"


def test_resolve_run(tiny, paper):
    r = resolve_run(tiny, "in1k-deit_ti-mpvg-lastpe5")
    assert r.model_name == "mpvg_deit_tiny_patch16_224"
    assert r.model_kwargs == {"pe_method": "mpvg", "pe_overrides": {"last_ln_pe": 5}, "num_classes": 10,
                              "img_size": 32, "drop_path_rate": 0.0, "embed_dim": 48, "depth": 12,
                              "num_heads": 3, "patch_size": 8}
    assert r.dataset_root == Path("data/tiny/imagenet") and r.kind == "classification"
    assert r.run_dir(1) == Path("runs/train/in1k-deit_ti-mpvg-lastpe5/seed1")
    assert r.init_checkpoint(0) is None
    r = resolve_run(paper, "c100-t2t_vit_7-lape")
    assert r.model_kwargs["num_classes"] == 100 and r.model_kwargs["img_size"] == 224
    assert r.init_checkpoint(2) == Path("runs/train/in1k-t2t_vit_7-lape/seed2/checkpoint.pt")
    r = resolve_run(paper, "coco-deit_ti-mpvg")
    assert r.kind == "detection" and "num_classes" not in r.model_kwargs and r.recipe["lr"] == 1e-4
    with pytest.raises(ConfigError, match="unknown cell 'in1k-deit_ti-foo'"):
        resolve_run(tiny, "in1k-deit_ti-foo")


def test_shipped_params_roundtrip(tmp_path):
    """A params file written back from the parsed YAML loads the same."""
    copy = tmp_path / "params.yaml"
    copy.write_text(yaml.safe_dump(yaml.safe_load(PARAMS.read_text())))
    assert load_params(copy) == load_params(PARAMS)


def test_import_is_light():
    code = "import sys, mpvg.config as c; c.load_params(%r); print('torch' in sys.modules, 'timm' in sys.modules)" % str(PARAMS)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_explicit_override_wins_over_the_tiny_block(tiny):
    p = load_params(PARAMS, ["recipes.deit.epochs=2", "datasets.imagenet.root=/elsewhere",
                             "models.DeiT-S.arch.depth=2"])
    assert p["recipes"]["deit"]["epochs"] == 2 and tiny["recipes"]["deit"]["epochs"] != 2
    assert p["datasets"]["imagenet"] == {"root": "/elsewhere", "num_classes": 10}
    assert p["models"]["DeiT-S"]["arch"]["depth"] == 2 and p["models"]["DeiT-S"]["arch"]["embed_dim"] == 64
    # tiny.* overrides act through the merge; a late override is validated too
    assert load_params(PARAMS, ["tiny.recipes.deit.epochs=1"])["recipes"]["deit"]["epochs"] == 1
    assert _error(["recipes.deit.epochs=zero"]) == (f"{PARAMS} (--set recipes.deit.epochs=zero): "
                                                    "recipes.deit.epochs: expected an integer, got 'zero'")


def test_pe_override_keys_mirror_peconfig():
    """config.py mirrors PEConfig's fields (to stay torch-free); they must not drift apart."""
    from dataclasses import fields

    from mpvg.models.pe import PEConfig

    assert set(config.PE_OVERRIDE_TYPES) == {f.name for f in fields(PEConfig)}


def test_override_of_one_recipe_leaves_recipes_sharing_its_yaml_anchor_alone():
    from mpvg.config import load_params

    params = load_params(ROOT / "params.yaml", ["tiny.recipes.deit.epochs=2"])
    assert params["recipes"]["deit"]["epochs"] == 2
    assert params["recipes"]["swin"]["epochs"] != 2


# --------------------------------------------------------------------------- inheritance

def test_a_recipe_is_its_base_with_its_own_keys(paper, tiny):
    raw = yaml.safe_load(PARAMS.read_text())
    assert raw["recipes"]["ceit"] == {"base": "deit", "color_jitter": 0.4}
    deit, ceit = paper["recipes"]["deit"], paper["recipes"]["ceit"]
    assert {k: v for k, v in ceit.items() if deit[k] != v} == {"color_jitter": 0.4} and set(ceit) == set(deit)
    assert "base" not in ceit and "base" not in tiny["recipes"]["swin"]
    # defaults fill what no recipe in the chain sets; a recipe's own value wins
    assert deit["clip_grad"] is None and paper["recipes"]["swin"]["clip_grad"] == 5.0
    assert deit["mean"] == [0.485, 0.456, 0.406] and paper["recipes"]["vit_lite_c100"]["mean"] == [0.5071, 0.4867, 0.4408]
    # the tiny override is written once: swin at tiny is tiny deit's values over paper swin
    assert tiny["recipes"]["swin"]["warmup_epochs"] == 1 and tiny["recipes"]["swin"]["sched_per_step"] is True
    # a value set on the base reaches what inherits it, not what sets its own
    p = load_params(PARAMS, ["scale=paper", "recipes.deit.weight_decay=0.1"])
    assert p["recipes"]["ceit"]["weight_decay"] == 0.1 and p["recipes"]["t2t"]["weight_decay"] == 0.03


def test_an_explicit_override_of_a_base_key_wins_over_the_tiny_block_where_it_is_inherited():
    p = load_params(PARAMS, ["recipes.deit.warmup_epochs=3"])
    assert p["recipes"]["deit"]["warmup_epochs"] == 3 and p["recipes"]["ceit"]["warmup_epochs"] == 3
    assert p["recipes"]["swin"]["warmup_epochs"] == 1  # swin sets its own (20), the tiny block's wins over it
    assert load_params(PARAMS, ["recipes.swin.lr=0.002"])["recipes"]["swin"]["lr"] == 0.002  # inherited key, --set


@pytest.mark.parametrize("item, message", [
    ("recipes.deit.base=swin", "params.yaml (line {swin_base}): recipes.swin.base: the base chain loops: deit -> swin -> deit"),
    ("recipes.coco_maskrcnn.base=deit", "params.yaml (--set recipes.coco_maskrcnn.base=deit): "
     "recipes.coco_maskrcnn.base: 'deit' is a classification recipe and 'coco_maskrcnn' a detection one: "
     "a recipe's base must be of its own kind"),
    ("tiny.recipes.swin.base=nope", "params.yaml (--set tiny.recipes.swin.base=nope): tiny.recipes.swin.base: "
     "unknown recipe 'nope'; valid recipes: ['ade20k_upernet', 'ceit', 'coco_maskrcnn', 'deit', 'swin', 't2t', "
     "'t2t_c100', 'vit_lite_c100']"),
])
def test_bad_base_chains(item, message):
    swin_base = _line_of(PARAMS.read_text(), "  swin:") + 1
    with pytest.raises(ConfigError) as info:
        load_params("params.yaml", [item])
    assert str(info.value) == message.format(swin_base=swin_base)


def test_a_typo_stops_the_command_line_before_planning():
    res = subprocess.run([sys.executable, "-m", "mpvg", "workflow", "plan", "--set", "models.DeiT-Ti.arch.embeddim=3"],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr == ("mpvg: params.yaml (--set models.DeiT-Ti.arch.embeddim=3): models.DeiT-Ti.arch: "
                          "unknown key(s) ['embeddim']; nearest valid key: 'embed_dim'\n")


def test_config_imports_nothing_above_it():
    code = ("import sys, mpvg.config as c; c.load_params(%r, ['scale=budget']); "
            "print(sorted(m for m in sys.modules if m.startswith('mpvg')))" % str(PARAMS))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["['mpvg',", "'mpvg.config']"]
