"""Folding the Last-LN PE, checkpoint loading with PE resizing, torch.compile / torch.export."""
from __future__ import annotations

import pytest
import timm
import torch

import mpvg.models  # noqa: F401
from mpvg.models.checkpoint import load_checkpoint_into, unwrap_state_dict
from mpvg.models.fold import fold_last_ln_pe
from mpvg.models.params import count_params

TINY = dict(embed_dim=48, depth=3, num_heads=2, img_size=32, patch_size=8)


def _randomize(model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=g))


# ----------------------------------------------------------------------------- folding
@pytest.mark.parametrize("name,kw", [
    ("mpvg_deit_tiny_patch16_224", {}),
    ("mpvg_deit_tiny_patch16_224", {"pe_overrides": {"last_ln_pe": 2}}),
    ("mpvg_deit_tiny_patch16_224", {"pe_overrides": {"pool": "token"}}),
    ("mpvg_t2t_vit_7", {"embed_dim": 48, "depth": 2, "num_heads": 2, "token_dim": 16, "img_size": 64}),
    ("mpvg_vit_lite_7_4", {}),
])
def test_fold_gives_same_logits(name, kw):
    args = dict(TINY) if name.startswith("mpvg_deit") else {}
    args.update(kw)
    model = timm.create_model(name, pe_method="mpvg", **args).eval()
    _randomize(model)
    s = model.pretrained_cfg["input_size"][-1]
    x = torch.randn(3, 3, s, s)
    folded = fold_last_ln_pe(model)
    assert folded.pe.last_norm is None and model.pe.last_norm is not None
    assert count_params(folded) == count_params(model) - 2 * model.embed_dim
    with torch.no_grad():
        ref, out = model(x), folded(x)
        assert not torch.allclose(model.forward_head(model.forward_features(x) - model.last_ln_pe_term()), ref)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match=r"^this model was folded \(fold_last_ln_pe\) at token grid \((\d+), \1\); "
                                           r"it cannot run at grid \((\d+), \2\)$"):
        folded(torch.randn(1, 3, 2 * s, 2 * s))


def test_fold_needs_last_ln_pe():
    with pytest.raises(ValueError,
                       match=r"^the model has no Last-LN PE \(pe_cfg\.last_ln_pe is None\): nothing to fold$"):
        fold_last_ln_pe(timm.create_model("mpvg_deit_tiny_patch16_224", pe_method="pvg", **TINY))


# ----------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("method", ["default", "mpvg"])
def test_load_resizes_pe_and_drops_head(method):
    src = timm.create_model("mpvg_deit_tiny_patch16_224", pe_method=method, num_classes=10, **TINY)
    _randomize(src)
    dst = timm.create_model("mpvg_deit_tiny_patch16_224", pe_method=method, num_classes=3,
                            **dict(TINY, img_size=48))
    head_before = dst.head.weight.clone()
    ckpt = {"model": {"module." + k: v for k, v in src.state_dict().items()}, "epoch": 3}
    rep = load_checkpoint_into(dst, ckpt, strict=True)
    assert rep.missing_keys == [] and rep.unexpected_keys == []
    p = dst.num_prefix_tokens
    assert rep.resized == {"pos_embed": ((1, 16 + p, 48), (1, 36 + p, 48))}
    assert set(rep.dropped) == {"head.weight", "head.bias"}
    assert torch.equal(dst.head.weight, head_before)
    expected = timm.layers.resample_abs_pos_embed(src.pos_embed.detach(), new_size=[6, 6], old_size=[4, 4],
                                                  num_prefix_tokens=p)
    torch.testing.assert_close(dst.pos_embed.detach(), expected)
    torch.testing.assert_close(dst.blocks[1].attn.qkv.weight, src.blocks[1].attn.qkv.weight)
    if method == "mpvg":
        torch.testing.assert_close(dst.pe.last_norm.weight, src.pe.last_norm.weight)


def test_load_same_shape_is_exact_and_strict():
    src = timm.create_model("mpvg_deit_tiny_patch16_224", pe_method="lape", **TINY)
    _randomize(src)
    dst = timm.create_model("mpvg_deit_tiny_patch16_224", pe_method="lape", **TINY)
    rep = load_checkpoint_into(dst, {"state_dict": src.state_dict()})
    assert rep.resized == {} and rep.dropped == [] and rep.kept == []
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(src.eval()(x), dst.eval()(x))
    # strict: a Default checkpoint lacks the LN' of MPVG
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: .*\"pe\.last_norm\.weight\""):
        load_checkpoint_into(timm.create_model("mpvg_deit_tiny_patch16_224", pe_method="mpvg", **TINY),
                             timm.create_model("mpvg_deit_tiny_patch16_224", **TINY).state_dict())


def test_load_class_token_prefix_vs_none():
    cls_model = timm.create_model("mpvg_deit_tiny_patch16_224", pe_method="lape", **TINY)
    _randomize(cls_model)
    gap = timm.create_model("mpvg_deit_tiny_patch16_224", pe_method="lape", pe_overrides={"pool": "avg"},
                            **dict(TINY, img_size=40))
    rep = load_checkpoint_into(gap, cls_model.state_dict())
    assert "cls_token" in rep.dropped and rep.resized["pos_embed"] == ((1, 17, 48), (1, 25, 48))
    expected = timm.layers.resample_abs_pos_embed(cls_model.pos_embed.detach()[:, 1:], new_size=[5, 5],
                                                  old_size=[4, 4], num_prefix_tokens=0)
    torch.testing.assert_close(gap.pos_embed.detach(), expected)
    # and back: a GAP checkpoint into a class-token model keeps the model's class-token row
    back = timm.create_model("mpvg_deit_tiny_patch16_224", pe_method="lape", **TINY)
    own_cls, own_row = back.cls_token.detach().clone(), back.pos_embed.detach()[:, :1].clone()
    rep = load_checkpoint_into(back, gap.state_dict())
    assert "cls_token" in rep.kept
    assert torch.equal(back.cls_token.detach(), own_cls) and torch.equal(back.pos_embed.detach()[:, :1], own_row)
    expected = timm.layers.resample_abs_pos_embed(gap.pos_embed.detach(), new_size=[4, 4], old_size=[5, 5],
                                                  num_prefix_tokens=0)
    torch.testing.assert_close(back.pos_embed.detach()[:, 1:], expected)


def test_load_t2t_keeps_fixed_sinusoid_and_original_names():
    kw = dict(embed_dim=48, depth=2, num_heads=2, token_dim=16)
    src = timm.create_model("mpvg_t2t_vit_7", img_size=64, **kw)
    dst = timm.create_model("mpvg_t2t_vit_7", img_size=96, num_classes=100, **kw)
    sd = {k.replace("patch_embed.", "tokens_to_token."): v for k, v in src.state_dict().items()}
    own_pe = dst.pos_embed.detach().clone()
    rep = load_checkpoint_into(dst, sd)
    assert "pos_embed" in rep.kept and torch.equal(dst.pos_embed.detach(), own_pe)
    torch.testing.assert_close(dst.patch_embed.attention1.w, src.patch_embed.attention1.w)
    assert unwrap_state_dict({"model": {"_orig_mod.a": torch.zeros(1)}}) == {"a": torch.zeros(1)}


# ----------------------------------------------------------------------------- export / compile
def test_torch_export_deit_tiny_mpvg():
    model = timm.create_model("mpvg_deit_tiny_patch16_224", pe_method="mpvg").eval()
    x = torch.randn(2, 3, 224, 224)
    ep = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), model(x), rtol=1e-4, atol=1e-4)
    folded = fold_last_ln_pe(model)
    ep2 = torch.export.export(folded, (x,))
    with torch.no_grad():
        torch.testing.assert_close(ep2.module()(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # inductor compiles for ~20 s; the default suite compiles with aot_eager (test_gpu_defaults)
def test_torch_compile_deit_tiny_mpvg_inference():
    """Quick check (~40 s on 2 CPU cores): the compiled forward equals eager."""
    model = timm.create_model("mpvg_deit_tiny_patch16_224", pe_method="mpvg").eval()
    x = torch.randn(2, 3, 224, 224)
    compiled = torch.compile(model)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_torch_compile_deit_tiny_mpvg_train_step():
    """A compiled training step (forward + backward, ~2 min on 2 CPU cores)."""
    model = timm.create_model("mpvg_deit_tiny_patch16_224", pe_method="mpvg").train()
    x = torch.randn(2, 3, 224, 224)
    torch.manual_seed(0)
    ref = model(x)
    ref.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model)
    torch.manual_seed(0)
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    for n, g in grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[n].grad, g, rtol=1e-3, atol=1e-4)
