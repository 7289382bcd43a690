"""ViT family (DeiT, T2T-ViT-7, ViT-Lite-7/4) with every PE method.

The reference computations below are written from the paper's equations (Eq. 1-11), using
the modules' own weights but none of the model's forward code.
"""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import mpvg.models  # noqa: F401  (registers the models)
from mpvg.models.pe import PEConfig
from mpvg.models.registry import METHODS, PAPER_MODELS, list_model_methods, method_key
from mpvg.models.vit import MPVGVisionTransformer, TokenPerformer, sinusoid_table

MY_MODELS = ("DeiT-Ti", "DeiT-S", "DeiT-B", "T2T-ViT-7", "ViT-Lite")

# Small architectures through the same code path (tiny scale).
TINY = {
    "DeiT-Ti": dict(embed_dim=48, depth=3, num_heads=2, img_size=32, patch_size=8),
    "DeiT-S": dict(embed_dim=48, depth=3, num_heads=2, img_size=32, patch_size=8),
    "DeiT-B": dict(embed_dim=48, depth=3, num_heads=2, img_size=32, patch_size=8),
    "T2T-ViT-7": dict(embed_dim=48, depth=3, num_heads=2, token_dim=16, img_size=64),
    "ViT-Lite": dict(embed_dim=48, depth=3, num_heads=2, img_size=16),
}


def img_size(model) -> int:
    return model.pretrained_cfg["input_size"][-1]


def build(model: str, method, tiny=True, **kw):
    args = dict(TINY[model]) if tiny else {}
    args.update(kw)
    return timm.create_model(PAPER_MODELS[model], pe_method=method, **args)


def randomize_norms(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial LayerNorm affine parameters, so a misplaced LN' shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))
        if model.cls_token is not None:
            model.cls_token.copy_(torch.randn(model.cls_token.shape, generator=g))


def ln(x, norm):
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def reference_logits(model, img, cfg: PEConfig):
    """Eq. 1-11 written out, with ablation knobs, looping over the blocks by hand."""
    B = img.shape[0]
    p = model.patch_embed(img).flatten(1, 2)                  # patch tokens p^1..p^N
    pos = model.pos_embed                                     # pos (= pos_0)
    if cfg.pool == "token":
        p = torch.cat([model.cls_token.expand(B, -1, -1), p], dim=1)   # [x_cls; p^1; ...]
    x = p + pos if cfg.add_at_input else p                    # Eq. 1 / Eq. 8  vs  Eq. 5
    L = len(model.blocks)
    norms = model.pe.norms

    # The PE term of each layer (Eq. 6-7 for LaPE, Eq. 9-10 for PVG/MPVG).
    terms = [None] * L
    chain = [pos]                                             # pos_0, pos_1, ...
    if cfg.layerwise:
        first = 0 if cfg.include_layer0 else 1
        if first == 0 and cfg.hierarchical:
            # LaPE, Eq. 6-7: layer l adds LN'_l(pos_l), pos_0 = pos, pos_l = LN'_{l-1}(pos_{l-1})
            pos_l = pos
            for l in range(L):
                terms[l] = ln(pos_l, norms[l])
                pos_l = terms[l]
                chain.append(pos_l)
        elif cfg.hierarchical:
            # PVG, Eq. 9-10: layer l >= 1 adds LN'_l(pos_{l-1}) = pos_l, pos_l = LN'_l(pos_{l-1})
            for l in range(first, L):
                chain.append(ln(chain[-1], norms[l]))
                terms[l] = chain[-1]
        else:
            # Table 6 non-hierarchical: layer l adds LN'_l(pos_0)
            for l in range(first, L):
                terms[l] = ln(pos, norms[l])
                chain.append(terms[l])

    for l, blk in enumerate(model.blocks):                     # Eq. 2-3 / 6 / 9
        h = blk.norm1(x)
        if terms[l] is not None:
            h = h + terms[l]
        if model.block_type == "vit_lite":
            x = x + blk.attn(h)
            x = blk.norm2(x)
            x = x + blk.mlp(x)
        else:
            x = x + blk.attn(h)
            x = x + blk.mlp(blk.norm2(x))

    y = model.norm(x)                                         # Eq. 4
    if cfg.last_ln_pe is not None:                            # Eq. 11: y = LN(x_{L+1}) + LN'(pos_k)
        y = y + ln(chain[cfg.last_ln_pe], model.pe.last_norm)
    feat = y[:, 0] if cfg.pool == "token" else y.mean(dim=1)  # class token or GAP
    return model.head(feat)


# ----------------------------------------------------------------------------- registry
def test_registry_lists_every_model_and_method():
    assert set(PAPER_MODELS) == {"DeiT-Ti", "DeiT-S", "DeiT-B", "Swin-Ti", "CeiT-Ti", "T2T-ViT-7", "ViT-Lite"}
    assert METHODS == ("Default", "LaPE", "PVG", "MPVG")
    pairs = list_model_methods()
    assert len(pairs) == 7 * 4
    assert pairs[3].model == "DeiT-Ti" and pairs[3].method == "MPVG" and pairs[3].pe_method == "mpvg"
    assert method_key("LaPE") == "lape"
    names = set(timm.list_models("mpvg_*"))
    for m in MY_MODELS:
        assert PAPER_MODELS[m] in names


# ----------------------------------------------------------------------------- DeiT == timm
def test_default_deit_tiny_equals_timm():
    torch.manual_seed(0)
    ref = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
    ours = timm.create_model("mpvg_deit_tiny_patch16_224").eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert set(ours.state_dict()) == set(ref.state_dict())
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(ours(x), ref(x))
        assert torch.equal(ours.forward_features(x), ref.forward_features(x))


@pytest.mark.parametrize("size,ref_name", [("small", "deit_small_patch16_224"), ("base", "deit_base_patch16_224")])
def test_deit_state_dict_layout_matches_timm(size, ref_name):
    with torch.device("meta"):
        ref = timm.create_model(ref_name)
        ours = timm.create_model(f"mpvg_deit_{size}_patch16_224")
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == \
           {k: tuple(v.shape) for k, v in ref.state_dict().items()}


# ----------------------------------------------------------------------------- equations
CASES = [
    ("lape", {}), ("pvg", {}), ("mpvg", {}), ("default", {}),
    ("mpvg", {"last_ln_pe": 2}), ("mpvg", {"hierarchical": False}), ("mpvg", {"include_layer0": True}),
    ("mpvg", {"add_at_input": False}), ("pvg", {"pool": "token"}), ("default", {"pool": "avg"}),
    ("default", {"pool": "avg", "last_ln_pe": 0}),  # Fig. 5(b): GAP + Last-LN PE, not layer-wise
]


@pytest.mark.parametrize("model_name", ["DeiT-Ti", "T2T-ViT-7", "ViT-Lite"])
@pytest.mark.parametrize("method,overrides", CASES)
def test_forward_equals_paper_equations(model_name, method, overrides):
    torch.manual_seed(1)
    model = build(model_name, method, pe_overrides=overrides).eval()
    randomize_norms(model)
    cfg = model.pe_cfg
    x = torch.randn(2, 3, img_size(model), img_size(model))
    with torch.no_grad():
        ours = model(x)
        ref = reference_logits(model, x, cfg)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_method_configs():
    m = build("DeiT-Ti", "mpvg")
    cfg = m.pe_cfg
    assert (cfg.pool, cfg.layerwise, cfg.include_layer0, cfg.hierarchical, cfg.add_at_input, cfg.last_ln_pe) == \
           ("avg", True, False, True, True, 0)
    n = m.grid_size[0] * m.grid_size[1]
    assert m.cls_token is None and m.num_prefix_tokens == 0 and m.pos_embed.shape[1] == n
    assert isinstance(m.pe.norms[0], nn.Identity) and all(isinstance(x, nn.LayerNorm) for x in m.pe.norms[1:])
    assert m.pe.last_norm is not None
    lape = build("DeiT-Ti", "LaPE")
    assert lape.cls_token is not None and lape.pos_embed.shape[1] == n + 1
    assert all(isinstance(x, nn.LayerNorm) for x in lape.pe.norms) and not lape.pe_cfg.add_at_input
    d = build("DeiT-Ti", "default")
    assert all(isinstance(x, nn.Identity) for x in d.pe.norms) and d.pe.last_norm is None
    cfg_obj = PEConfig(pool="avg", layerwise=True, last_ln_pe=1)
    assert build("DeiT-Ti", cfg_obj).pe_cfg == cfg_obj


@pytest.mark.parametrize("model_name", ["DeiT-Ti", "T2T-ViT-7"])
def test_ln_prime_chain_runs_once_per_forward_on_one_pe(model_name):
    model = build(model_name, "mpvg").eval()
    calls = []
    norms = [n for n in model.pe.norms if isinstance(n, nn.LayerNorm)] + [model.pe.last_norm]
    for norm in norms:
        norm.register_forward_hook(lambda mod, inp, out: calls.append(tuple(inp[0].shape)))
    x = torch.randn(4, 3, img_size(model), img_size(model))
    model(x)
    n = model.pos_embed.shape[1]
    assert calls == [(1, n, model.embed_dim)] * len(norms)


# ----------------------------------------------------------------------------- forward/backward
@pytest.mark.parametrize("model_name", MY_MODELS)
@pytest.mark.parametrize("method", METHODS)
def test_forward_backward_tiny(model_name, method):
    torch.manual_seed(0)
    model = build(model_name, method.lower(), num_classes=7, drop_path_rate=0.1).train()
    x = torch.randn(2, 3, img_size(model), img_size(model))
    out = model(x)
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    out.logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    if method in ("LaPE", "PVG", "MPVG"):
        assert model.pe.norms[-1].weight.grad.abs().sum() > 0
    if method == "MPVG":
        assert model.pe.last_norm.weight.grad.abs().sum() > 0
    if model.pos_embed.requires_grad:
        assert model.pos_embed.grad.abs().sum() > 0


@pytest.mark.parametrize("model_name,method", [("DeiT-Ti", "mpvg"), ("T2T-ViT-7", "mpvg"), ("ViT-Lite", "default"),
                                               ("ViT-Lite", "lape"), ("ViT-Lite", "pvg"), ("ViT-Lite", "mpvg")])
def test_forward_backward_full_size(model_name, method):
    torch.manual_seed(0)
    model = build(model_name, method, tiny=False).train()
    s = img_size(model)
    out = model(torch.randn(2, 3, s, s))
    assert out.shape == (2, model.num_classes)
    out.sum().backward()
    assert model.blocks[0].attn.qkv.weight.grad is not None


# ----------------------------------------------------------------------------- architectures
def test_full_size_architectures():
    with torch.device("meta"):
        t2t = timm.create_model("mpvg_t2t_vit_7")
        lite = timm.create_model("mpvg_vit_lite_7_4")
        deit = timm.create_model("mpvg_deit_tiny_patch16_224")
    assert (t2t.embed_dim, len(t2t.blocks), t2t.blocks[0].attn.num_heads) == (256, 7, 4)
    assert t2t.blocks[0].mlp.fc1.out_features == 512 and t2t.blocks[0].attn.qkv.bias is None
    assert t2t.grid_size == (14, 14) and t2t.pos_embed.shape == (1, 197, 256)
    assert not t2t.pos_embed.requires_grad
    perf = t2t.patch_embed.attention1
    assert perf.emb == 64 and perf.m == 32 and not perf.w.requires_grad
    assert t2t.patch_embed.attention2.kqv.in_features == 64 * 9 and t2t.patch_embed.project.in_features == 576
    assert (lite.embed_dim, len(lite.blocks), lite.num_classes, lite.grid_size) == (256, 7, 100, (8, 8))
    assert lite.patch_embed.proj.kernel_size == (4, 4) and lite.patch_embed.proj.bias is not None
    assert lite.blocks[0].attn.qkv.bias is None and lite.pos_embed.shape == (1, 65, 256)
    assert lite.blocks[0].attn.attn_drop.p == 0.1
    assert deit.norm.eps == 1e-6 and t2t.norm.eps == 1e-5 and lite.norm.eps == 1e-5


def test_t2t_sinusoid_and_performer():
    # T2T-ViT's get_sinusoid_encoding
    tab = sinusoid_table(5, 8)
    pos = torch.arange(5, dtype=torch.float64)[:, None]
    ang = pos / torch.pow(torch.tensor(10000.0, dtype=torch.float64), 2 * (torch.arange(8) // 2) / 8)
    ref = torch.where(torch.arange(8) % 2 == 0, torch.sin(ang), torch.cos(ang)).float()
    torch.testing.assert_close(tab[0], ref)
    m = build("T2T-ViT-7", "pvg")
    torch.testing.assert_close(m.pos_embed.data, sinusoid_table(m.pos_embed.shape[1], m.embed_dim))
    # Token_performer with the original's einsum formulation
    torch.manual_seed(0)
    perf = TokenPerformer(dim=27, in_dim=16).eval()
    x = torch.randn(2, 10, 27)
    with torch.no_grad():
        h = perf.norm1(x)
        k, q, v = torch.split(perf.kqv(h), perf.emb, dim=-1)

        def prm(t):
            xd = (t * t).sum(-1, keepdim=True).repeat(1, 1, perf.m) / 2
            return torch.exp(torch.einsum("bti,mi->btm", t, perf.w) - xd) / perf.m ** 0.5

        kp, qp = prm(k), prm(q)
        D = torch.einsum("bti,bi->bt", qp, kp.sum(dim=1)).unsqueeze(2)
        kptv = torch.einsum("bin,bim->bnm", v, kp)
        y = torch.einsum("bti,bni->btn", qp, kptv) / (D.repeat(1, 1, perf.emb) + 1e-8)
        y = v + perf.proj(y)
        ref = y + perf.mlp(perf.norm2(y))
        torch.testing.assert_close(perf(x), ref, rtol=1e-5, atol=1e-6)


def test_arch_overrides_and_other_resolution():
    m = timm.create_model("mpvg_deit_tiny_patch16_224", pe_method="MPVG", embed_dim=32, depth=2, num_heads=2,
                          img_size=48, patch_size=16, mlp_ratio=2.0, num_classes=5)
    assert m.grid_size == (3, 3) and m.pos_embed.shape == (1, 9, 32) and len(m.blocks) == 2
    assert m.pretrained_cfg["input_size"] == (3, 48, 48) and m.pretrained_cfg["num_classes"] == 5
    # a forward at another resolution resamples pos_0 (and the LN' chain follows it)
    with torch.no_grad():
        assert m(torch.randn(1, 3, 64, 64)).shape == (1, 5)
    with pytest.raises(ValueError, match=r"^mpvg_deit_tiny_patch16_224: no pretrained weights are registered "
                                         r"\(nothing is downloaded\); expected pretrained=False\."):
        timm.create_model("mpvg_deit_tiny_patch16_224", pretrained=True)
    with pytest.raises(ValueError,
                       match=r"^unknown PE method 'nope'; expected one of \['default', 'lape', 'pvg', 'mpvg'\]$"):
        timm.create_model("mpvg_deit_tiny_patch16_224", pe_method="nope")


# ----------------------------------------------------------------------------- analysis API
@pytest.mark.parametrize("model_name", ["DeiT-Ti", "T2T-ViT-7", "ViT-Lite"])
@pytest.mark.parametrize("method", ["default", "lape", "mpvg"])
def test_forward_analysis_contract(model_name, method):
    model = build(model_name, method).eval()
    randomize_norms(model)
    x = torch.randn(2, 3, img_size(model), img_size(model))
    out = model.forward_analysis(x)
    assert set(out) == {"layer_inputs", "layer_tokens", "layer_pos", "pre_last_ln", "post_last_ln",
                        "last_ln_pe", "num_prefix_tokens"}
    L, N, D = len(model.blocks), model.pos_embed.shape[1], model.embed_dim
    assert len(out["layer_inputs"]) == len(out["layer_tokens"]) == len(out["layer_pos"]) == L
    assert all(t.shape == (2, N, D) for t in out["layer_inputs"] + out["layer_tokens"])
    for l, (xi, tok, pe) in enumerate(zip(out["layer_inputs"], out["layer_tokens"], out["layer_pos"])):
        torch.testing.assert_close(tok, model.blocks[l].norm1(xi))
        if pe is not None:
            assert pe.shape == (1, N, D)
    if method == "default":
        assert all(p is None for p in out["layer_pos"]) and out["last_ln_pe"] is None
    if method == "lape":
        assert all(p is not None for p in out["layer_pos"])
    if method == "mpvg":
        assert out["layer_pos"][0] is None and all(p is not None for p in out["layer_pos"][1:])
        assert out["last_ln_pe"].shape == (1, N, D)
    assert out["num_prefix_tokens"] == model.num_prefix_tokens == (0 if method == "mpvg" else 1)
    torch.testing.assert_close(out["post_last_ln"], model.norm(out["pre_last_ln"]))
    feats = out["post_last_ln"] + (out["last_ln_pe"] if out["last_ln_pe"] is not None else 0)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_head(feats), model(x))
        torch.testing.assert_close(feats, model.forward_features(x))


def test_deit_adapter_api():
    m = build("DeiT-Ti", "mpvg", img_size=64, patch_size=16)
    assert isinstance(m, MPVGVisionTransformer)
    assert m.grid_size == (4, 4) and m.pos_embed.shape == (1, 16, 48)
    torch.testing.assert_close(m.pos_embed_for_grid(4, 4), m.pos_embed)
    g = m.pos_embed_for_grid(6, 5)
    assert g.shape == (1, 30, 48)
    ref = F.interpolate(m.pos_embed.reshape(1, 4, 4, 48).permute(0, 3, 1, 2), size=(6, 5), mode="bicubic",
                        antialias=True).permute(0, 2, 3, 1).reshape(1, 30, 48)
    torch.testing.assert_close(g, ref)
    lape = build("DeiT-Ti", "lape", img_size=64, patch_size=16)
    assert lape.pos_embed_for_grid(4, 4).shape == (1, 16, 48)
    torch.testing.assert_close(lape.pos_embed_for_grid(4, 4), lape.pos_embed[:, 1:])
    terms, last = m.pe(m.pos_embed_for_grid(6, 5))
    assert terms[0] is None and terms[1].shape == (1, 30, 48) and last.shape == (1, 30, 48)
    x = torch.randn(1, 16, 48)
    assert m.blocks[1](x, pos=terms[1][:, :16]).shape == x.shape and m.blocks[0](x).shape == x.shape
    assert m.patch_embed(torch.randn(1, 3, 96, 80)).shape == (1, 6, 5, 48)
    assert m.no_weight_decay() == {"pos_embed", "cls_token"}


def test_grad_checkpointing_same_result():
    torch.manual_seed(0)
    model = build("DeiT-Ti", "mpvg").eval()
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)
    ref.sum().backward()
    g = model.pe.norms[1].weight.grad.clone()
    model.zero_grad()
    model.set_grad_checkpointing(True)
    out = model(x)
    out.sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(model.pe.norms[1].weight.grad, g)
