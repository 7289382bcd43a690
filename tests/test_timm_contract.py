"""The timm model contract, for every registered mpvg_* model and every PE method.

Written here, modelled on what timm's tests/test_models.py checks of a model (forward and
grad checkpointing, backward, default cfg / classifier reset, ``features_only`` through
``FeatureGetterNet``, ``forward_intermediates``, ``prune_intermediate_layers``), plus what the
PE methods add: intermediates must be the block outputs of ``forward`` itself (the layer-wise
PE applied exactly as there), and pruning must leave no unused LN'.  Small architectures
through the same code path; TorchScript is not part of the contract.
"""
from __future__ import annotations

import math

import pytest
import timm
import torch
from torch import nn

import mpvg.models  # noqa: F401  (registers the models)
from mpvg.models.fold import fold_last_ln_pe
from test_models_ceit_swin import randomize_norms as randomize  # LN affines and PE: a misplaced LN' shows

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Small versions of each model (dropout off, so train-mode passes are deterministic).
TINY = {
    "mpvg_deit_tiny_patch16_224": dict(embed_dim=24, depth=3, num_heads=2, img_size=32, patch_size=8),
    "mpvg_deit_small_patch16_224": dict(embed_dim=24, depth=3, num_heads=2, img_size=32, patch_size=8),
    "mpvg_deit_base_patch16_224": dict(embed_dim=24, depth=3, num_heads=2, img_size=32, patch_size=8),
    "mpvg_t2t_vit_7": dict(embed_dim=24, depth=3, num_heads=2, token_dim=8, img_size=64, t2t_drop=0.0),
    "mpvg_vit_lite_7_4": dict(embed_dim=24, depth=3, num_heads=2, img_size=16, attn_drop_rate=0.0,
                              drop_path_rate=0.0),
    "mpvg_ceit_tiny_patch16_224": dict(embed_dim=24, depth=3, num_heads=2, patch_size=2, img_size=32,
                                       stem_chans=8),
    "mpvg_swin_tiny_patch4_window7_224": dict(embed_dim=8, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4),
                                              patch_size=2, window_size=4, img_size=32, drop_path_rate=0.0),
}
NAMES = tuple(TINY)
METHODS = ("default", "lape", "pvg", "mpvg")
SWIN, CEIT = "mpvg_swin_tiny_patch4_window7_224", "mpvg_ceit_tiny_patch16_224"
CASES = [(n, m) for n in NAMES for m in METHODS]

# What each original code base evaluates with (pretrained cfg), and its first conv / classifier.
EXPECTED_CFG = {
    "mpvg_deit_tiny_patch16_224": dict(input_size=(3, 224, 224), crop_pct=0.875, first_conv="patch_embed.proj",
                                       classifier="head", fixed_input_size=False, num_classes=1000),
    "mpvg_t2t_vit_7": dict(input_size=(3, 224, 224), crop_pct=0.9, first_conv="patch_embed.attention1.kqv",
                           classifier="head", fixed_input_size=False, num_classes=1000),
    "mpvg_vit_lite_7_4": dict(input_size=(3, 32, 32), crop_pct=1.0, first_conv="patch_embed.proj",
                              classifier="head", fixed_input_size=False, num_classes=100,
                              mean=(0.5071, 0.4867, 0.4408), std=(0.2675, 0.2565, 0.2761)),
    CEIT: dict(input_size=(3, 224, 224), crop_pct=0.875, first_conv="i2t.conv", classifier="head",
               fixed_input_size=True, num_classes=1000),
    SWIN: dict(input_size=(3, 224, 224), crop_pct=0.875, first_conv="patch_embed.proj", classifier="head.fc",
               fixed_input_size=True, num_classes=1000, pool_size=(7, 7)),
}
EXPECTED_CFG["mpvg_deit_small_patch16_224"] = EXPECTED_CFG["mpvg_deit_base_patch16_224"] = \
    EXPECTED_CFG["mpvg_deit_tiny_patch16_224"]
IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), interpolation="bicubic")


def create(name: str, method: str, seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    args = dict(TINY[name])
    args.update(kw)
    return timm.create_model(name, pe_method=method, **args)


def inputs(name: str, batch: int = 2) -> torch.Tensor:
    s = TINY[name]["img_size"]
    return torch.randn(batch, 3, s, s, generator=torch.Generator().manual_seed(7))


def block_outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """What each block (ViT family, CeiT) or each stage's last block (Swin) outputs in ``forward``."""
    mods = [stage.blocks[-1] for stage in model.layers] if hasattr(model, "layers") else list(model.blocks)
    out = []
    handles = [m.register_forward_hook(lambda mod, inp, o: out.append(o)) for m in mods]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return out


def as_nchw(name: str, model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """A block output as timm's NCHW intermediate."""
    if name == SWIN:
        return tokens.permute(0, 3, 1, 2)
    h, w = model.grid_size
    t = tokens[:, model.num_prefix_tokens:]
    return t.reshape(t.shape[0], h, w, -1).permute(0, 3, 1, 2)


def trainable_without_grad(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]


# --------------------------------------------------------------------------- pretrained cfg
@pytest.mark.parametrize("name", NAMES)
def test_registered_pretrained_cfg(name):
    assert name in timm.list_models("mpvg_*", name_matches_cfg=True)
    cfg = timm.get_pretrained_cfg(name)
    expected = {**IMAGENET, **EXPECTED_CFG[name]}
    assert {k: getattr(cfg, k) for k in expected} == expected
    assert (cfg.url, cfg.hf_hub_id, cfg.file, cfg.has_weights) == (None, None, None, None)
    with torch.device("meta"):
        model = timm.create_model(name)
    sd = model.state_dict()
    for key in (cfg.first_conv, cfg.classifier):  # timm's tests/test_models.py: both name layers with weights
        assert f"{key}.weight" in sd, key
    if name == "mpvg_t2t_vit_7":  # no conv stem: the Performer over unfolded 7x7 patches comes first
        assert not any(isinstance(m, nn.Conv2d) for m in model.modules())
    # the instance's cfg: the registered one, with the built input size and classes
    small = create(name, "default", num_classes=5)
    s = TINY[name]["img_size"]
    assert small.pretrained_cfg["input_size"] == (3, s, s) and small.pretrained_cfg["num_classes"] == 5
    assert small.pretrained_cfg["crop_pct"] == expected["crop_pct"]
    data = timm.data.resolve_data_config(model=small)
    assert data["input_size"] == (3, s, s) and data["crop_pct"] == expected["crop_pct"]
    with pytest.raises(ValueError, match="pretrained"):
        timm.create_model(name, pretrained=True)


# --------------------------------------------------------------------------- forward / backward
@pytest.mark.parametrize("name,method", CASES)
def test_forward_and_grad_checkpointing(name, method):
    model = create(name, method).train()
    randomize(model)
    x = inputs(name)
    out = model(x)
    assert out.shape == (2, model.num_classes) and torch.isfinite(out).all()
    out.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    model.set_grad_checkpointing(True)
    out2 = model(x)
    out2.square().sum().backward()
    torch.testing.assert_close(out2, out, rtol=1e-5, atol=1e-6)
    assert set(grads) == {n for n, p in model.named_parameters() if p.grad is not None}
    for n, p in model.named_parameters():
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name,method", CASES)
def test_backward_every_trainable_parameter(name, method):
    model = create(name, method, num_classes=42).train()
    out = model(inputs(name))
    assert out.shape == (2, 42)
    out.mean().backward()
    assert trainable_without_grad(model) == []
    frozen = sorted(n for n, p in model.named_parameters() if not p.requires_grad)
    # T2T-ViT's fixed sinusoid PE and its Performer random features are non-trainable parameters,
    # as in the original code; nothing else is frozen
    expected = ["patch_embed.attention1.w", "patch_embed.attention2.w", "pos_embed"] \
        if name == "mpvg_t2t_vit_7" else []
    assert frozen == expected


# --------------------------------------------------------------------------- heads and pooling
@pytest.mark.parametrize("name,method", CASES)
def test_reset_classifier_and_global_pool(name, method):
    model = create(name, method).eval()
    x = inputs(name)
    with torch.no_grad():
        feats = model.forward_features(x)
        pre = model.forward_head(feats, pre_logits=True)
        assert pre.shape == (2, model.head_hidden_size) and model.num_features > 0
        if name == SWIN:
            gh, gw = model.patch_embed.grid_size
            assert feats.shape == (2, gh // 8, gw // 8, model.num_features)  # NHWC after the last stage
            unpooled = feats.shape
        elif name == CEIT:  # pools every layer before LCA: its features are pooled already
            assert feats.shape == (2, model.num_features)
            unpooled = feats.shape
        else:
            n = model.grid_size[0] * model.grid_size[1] + model.num_prefix_tokens
            assert feats.shape == (2, n, model.num_features)
            unpooled = feats.shape
        model.reset_classifier(0)
        assert model.num_classes == 0
        torch.testing.assert_close(model(x), pre)
        model.reset_classifier(0, "")
        assert model(x).shape == unpooled
        torch.testing.assert_close(model(x), feats)
        model.reset_classifier(3, "")
        assert model(x).shape == unpooled[:-1] + (3,)
        again = create(name, method, num_classes=0, global_pool="").eval()
        own = model.state_dict()
        again.load_state_dict({k: own[k] for k in again.state_dict()})  # same weights, no head
        assert again(x).shape == unpooled
        torch.testing.assert_close(again(x), feats)
    has_token = getattr(model, "num_prefix_tokens", 0) == 1
    if not has_token:
        with pytest.raises(ValueError, match="token"):
            model.reset_classifier(0, "token")
        with pytest.raises(ValueError, match="token"):
            create(name, method, global_pool="token")
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(0, "max")
    if name not in (CEIT, SWIN):
        # timm's ViT: the readout can change; 'avg' is GAP over the patch tokens
        model.reset_classifier(0, "avg")
        with torch.no_grad():
            torch.testing.assert_close(model(x), feats[:, model.num_prefix_tokens:].mean(1))


# --------------------------------------------------------------------------- intermediates
@pytest.mark.parametrize("name,method", CASES)
def test_forward_intermediates_are_the_forward_block_outputs(name, method):
    model = create(name, method).eval()
    randomize(model)
    x = inputs(name)
    info = timm.models.FeatureInfo(model.feature_info, len(model.feature_info))
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        seen = block_outputs(model, x)
        assert len(inter) == len(seen) == len(model.feature_info)
        for o, ref, c, r in zip(inter, seen, info.channels(), info.reduction()):
            torch.testing.assert_close(o, as_nchw(name, model, ref))
            assert o.shape[:2] == (2, c)
            assert o.shape[2] == math.ceil(x.shape[2] / r) and o.shape[3] == math.ceil(x.shape[3] / r)
        # a subset, stopping early, and the Last LN stage on the last intermediate
        some = model.forward_intermediates(x, indices=[0, -1], intermediates_only=True, stop_early=True)
        torch.testing.assert_close(some[0], inter[0])
        torch.testing.assert_close(some[1], inter[-1])
        normed = model.forward_intermediates(x, indices=1, norm=True, intermediates_only=True)[0]
        if name == SWIN:
            torch.testing.assert_close(normed, final.permute(0, 3, 1, 2))
        elif name == CEIT:
            last = model.last_ln_pe_term()
            ref = model.norm(seen[-1]) + (0 if last is None else last)
            torch.testing.assert_close(normed, as_nchw(name, model, ref))
        else:
            torch.testing.assert_close(normed, as_nchw(name, model, final))
        if name != SWIN:
            nlc = model.forward_intermediates(x, indices=1, output_fmt="NLC", intermediates_only=True)[0]
            torch.testing.assert_close(nlc, seen[-1][:, model.num_prefix_tokens:])
            pairs = model.forward_intermediates(x, indices=1, return_prefix_tokens=True, intermediates_only=True)
            if model.num_prefix_tokens:
                torch.testing.assert_close(pairs[0][1], seen[-1][:, :1])
            d = model.forward_intermediates(x, indices=1, output_dict=True)
            torch.testing.assert_close(d["image_features"], final)
    model.set_grad_checkpointing(True)
    final2, _ = model.forward_intermediates(x)
    torch.testing.assert_close(final2, final, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(x, output_fmt="NHWC")


def _out_indices(name: str, model: nn.Module) -> tuple:
    return (1, 3) if name == SWIN else (0, len(model.blocks) - 1)


@pytest.mark.parametrize("name,method", CASES)
@pytest.mark.parametrize("feature_cls", [None, "getter"])
def test_features_only(name, method, feature_cls):
    full = create(name, method).eval()
    n_levels = len(full.feature_info)
    for out_indices in (None, _out_indices(name, full), (0,)):
        kw = {} if out_indices is None else {"out_indices": out_indices}
        if feature_cls is not None:
            kw["feature_cls"] = feature_cls
        feats = create(name, method, features_only=True, **kw).eval()
        # same seed, same weights: the wrapper's features are the full model's intermediates
        take = out_indices if out_indices is not None else (list(range(n_levels)) if name == SWIN else 3)
        x = inputs(name)
        with torch.no_grad():
            ref = full.forward_intermediates(x, indices=take, intermediates_only=True)
            outs = feats(x)
        assert len(outs) == len(ref) == len(feats.feature_info.channels())
        for o, r, c, red in zip(outs, ref, feats.feature_info.channels(), feats.feature_info.reduction()):
            torch.testing.assert_close(o, r)
            assert o.shape[1] == c and o.shape[2] == math.ceil(x.shape[2] / red)
        # pruned to what the features need: every remaining trainable parameter is used
        feats.train()
        sum(o.square().mean() for o in feats(x)).backward()
        assert trainable_without_grad(feats) == []
        if out_indices == (0,) and name != SWIN:
            assert len(feats.model.blocks) == 1


@pytest.mark.parametrize("name", NAMES)
def test_features_only_refuses_module_rebuilding_wrappers(name):
    for feature_cls in ("list", "dict", "hook", "fx"):
        with pytest.raises(ValueError, match="getter"):
            create(name, "mpvg", features_only=True, feature_cls=feature_cls)
    with pytest.raises(ValueError, match="features_only"):
        create(name, "mpvg", feature_cls="getter")


@pytest.mark.parametrize("name,method", CASES)
def test_prune_intermediate_layers(name, method):
    full = create(name, method).eval()
    randomize(full)
    x = inputs(name)
    keep = [0, 1] if name == SWIN else [0]
    with torch.no_grad():
        ref = full.forward_intermediates(x, indices=keep, intermediates_only=True)
    pruned = create(name, method).eval()
    randomize(pruned)
    assert pruned.prune_intermediate_layers(keep, prune_norm=True) == keep
    with torch.no_grad():
        got = pruned.forward_intermediates(x, indices=keep, intermediates_only=True)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r)
    if name == SWIN:
        assert len(pruned.layers) == 2 and len(pruned.pe.receives) == sum(len(s.blocks) for s in pruned.layers)
    else:
        assert len(pruned.blocks) == 1 and len(pruned.pe.receives) == 1
    assert pruned.pe.last_norm is None  # the Last-LN PE goes with the Last LN
    pruned.train()
    sum(o.square().mean() for o in pruned.forward_intermediates(x, indices=keep, intermediates_only=True)).backward()
    assert trainable_without_grad(pruned) == []


@pytest.mark.parametrize("name", [n for n in NAMES if n not in (CEIT, SWIN)])
def test_prune_keeps_the_chain_a_kept_last_ln_pe_needs(name):
    """MPVG with LN'_last(pos_2) pruned to block 0 but keeping the Last LN: the LN' that make
    pos_1, pos_2 stay, and the output is LN(x_1) + LN'_last(pos_2)."""
    model = create(name, "mpvg", pe_overrides={"last_ln_pe": 2}).eval()
    randomize(model)
    x = inputs(name)
    model.prune_intermediate_layers([0], prune_norm=False, prune_head=False)
    assert len(model.blocks) == 1 and len(model.pe.norms) == 3 and model.pe.last_norm is not None
    with torch.no_grad():
        y = model.forward_features(x)
        x0, pos, _ = model._embed(x)
        p2 = model.pe.norms[2](model.pe.norms[1](pos))
        ref = model.norm(model.blocks[0](x0)) + model.pe.last_norm(p2)
    torch.testing.assert_close(y, ref)


def test_ceit_pruning_blocks_needs_the_readout_gone():
    model = create(CEIT, "mpvg")
    with pytest.raises(ValueError, match="LCA"):
        model.prune_intermediate_layers([0], prune_head=False)
    model.prune_intermediate_layers([0], prune_norm=True)
    assert model.lca is None and model.pos_layer_embed is None
    with pytest.raises(RuntimeError, match="intermediates_only"):
        model(inputs(CEIT))


# --------------------------------------------------------------------------- folding guards
@pytest.mark.parametrize("name", NAMES)
def test_folding_guards(name):
    model = create(name, "mpvg").eval()
    randomize(model)
    folded = fold_last_ln_pe(model)
    x = inputs(name)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="folded"):
        folded.reset_classifier(3)
    with pytest.raises(RuntimeError, match="folded"):
        folded.prune_intermediate_layers(1)
    with pytest.raises(ValueError, match="already folded"):
        fold_last_ln_pe(folded)
    if name != CEIT:  # CeiT's head always sees one pooled token; the others can stop pooling
        per_position = create(name, "mpvg", global_pool="").eval()
        with pytest.raises(ValueError, match="does not pool"):
            fold_last_ln_pe(per_position)
        model.reset_classifier(model.num_classes, "")
        with pytest.raises(ValueError, match="does not pool"):
            fold_last_ln_pe(model)
