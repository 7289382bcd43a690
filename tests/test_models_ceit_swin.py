"""CeiT-Ti and Swin-Ti with every PE method: #Params (Table 1), timm equivalence, forward
passes against a reference loop written from the paper's equations, and the LN' chain."""
from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from mpvg.models.ceit import CeiT
from mpvg.models.pe import PEConfig
from mpvg.models.swin import SwinTransformerPE

CEIT = "mpvg_ceit_tiny_patch16_224"
SWIN = "mpvg_swin_tiny_patch4_window7_224"
METHODS = ("default", "lape", "pvg", "mpvg")
CEIT_TINY = dict(embed_dim=24, depth=3, num_heads=2, patch_size=2, img_size=32, num_classes=5, stem_chans=8)
SWIN_TINY = dict(embed_dim=8, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4), patch_size=2, window_size=4,
                 img_size=32, num_classes=5, drop_path_rate=0.0)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def meta_model(name: str, **kwargs) -> nn.Module:
    """Shapes only (no memory, no init): enough to count parameters."""
    with torch.device("meta"):
        return timm.create_model(name, **kwargs)


def table_value(count: int) -> float:
    """How the paper prints #Params: millions, truncated to three decimals."""
    return math.floor(count / 1e3) / 1e3


def ln(norm: nn.LayerNorm, t: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(t, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def randomize_norms(model: nn.Module) -> None:
    """LN' start as identity affines; random affines make the checks below able to fail."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(1 + 0.5 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.5 * torch.randn(m.bias.shape, generator=g))
        for name, p in model.named_parameters():
            if name in ("pos_layer_embed", "absolute_pos_embed", "pos_embed"):
                p.copy_(torch.randn(p.shape, generator=g))


# --------------------------------------------------------------------------- #Params, Table 1

# exact counts (1000 classes, 224x224) and the paper's Table 1 values
CEIT_COUNTS = {"default": (6_356_904, 6.356), "lape": (6_361_512, 6.361),
               "pvg": (6_361_128, 6.361), "mpvg": (6_361_512, 6.361)}
SWIN_COUNTS = {"default": (28_589_410, 28.589), "lape": (28_599_586, 28.599),
               "pvg": (28_598_242, 28.598), "mpvg": (28_599_778, 28.599)}


@pytest.mark.parametrize("method", METHODS)
def test_ceit_params_match_table1(method):
    count, paper = CEIT_COUNTS[method]
    assert n_params(meta_model(CEIT, pe_method=method)) == count
    assert table_value(count) == paper


@pytest.mark.parametrize("method", METHODS)
def test_swin_params_match_table1(method):
    count, paper = SWIN_COUNTS[method]
    assert n_params(meta_model(SWIN, pe_method=method)) == count
    assert table_value(count) == paper


def test_swin_params_arithmetic():
    timm_swin = n_params(meta_model("swin_tiny_patch4_window7_224"))
    assert timm_swin == 28_288_354
    ape = 56 * 56 * 96
    ln_prime = 2 * (2 * 96 + 2 * 192 + 6 * 384 + 2 * 768)
    assert (ape, ln_prime) == (301_056, 8_832)
    assert SWIN_COUNTS["default"][0] == timm_swin + ape
    assert SWIN_COUNTS["pvg"][0] == timm_swin + ape + ln_prime
    assert SWIN_COUNTS["mpvg"][0] == timm_swin + ape + ln_prime + 2 * 768
    # LaPE: the PE's own LN' before each of the three patch mergings, at 96, 192 and 384
    assert SWIN_COUNTS["lape"][0] == timm_swin + ape + ln_prime + 2 * (96 + 192 + 384)
    # without them LaPE would count as PVG (28.598, not the paper's 28.599)
    shared = meta_model(SWIN, pe_method="lape", pe_overrides={"independent_merge_ln": False})
    assert n_params(shared) == SWIN_COUNTS["pvg"][0]


def test_swin_pvg_includes_layer0_unless_overridden():
    on = timm.create_model(SWIN, pe_method="pvg", **SWIN_TINY)
    off = timm.create_model(SWIN, pe_method="pvg", pe_overrides={"include_layer0": False}, **SWIN_TINY)
    assert on.pe_cfg.include_layer0 and not off.pe_cfg.include_layer0
    assert n_params(on) - n_params(off) == 2 * SWIN_TINY["embed_dim"]
    # only the network's first block loses its LN'; later stages' first blocks keep theirs
    assert off.pe.receives == [False] + [True] * (sum(SWIN_TINY["depths"]) - 1)


# --------------------------------------------------------------------------- timm equivalence

def test_swin_default_equals_timm_swin_plus_absolute_pe():
    torch.manual_seed(0)
    ref = timm.create_model("swin_tiny_patch4_window7_224").eval()
    model = timm.create_model(SWIN, pe_method="default").eval()
    missing, unexpected = model.load_state_dict(ref.state_dict(), strict=False)
    assert missing == ["absolute_pos_embed"] and unexpected == []
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        model.absolute_pos_embed.zero_()
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=1e-5)
        # with a non-zero PE: timm's Swin with the PE added after its patch embedding
        model.absolute_pos_embed.normal_(0, 0.5)
        ape = model.absolute_pos_embed.reshape(1, 56, 56, 96)
        hook = ref.patch_embed.register_forward_hook(lambda mod, inp, out: out + ape)
        try:
            torch.testing.assert_close(model(x), ref(x), rtol=0, atol=1e-5)
        finally:
            hook.remove()


# --------------------------------------------------------------------------- reference loops

def ceit_reference(m: CeiT, img: torch.Tensor, method: str, overrides: dict) -> torch.Tensor:
    """CeiT logits recomputed from the paper's equations with the model's own weights.

    PVG/MPVG (GAP): no class token unless the model keeps one (``class_token=True``, the earlier
    design); without it every layer, layer 0 included, gets its LN' term (the count's design).
    LCA attends over the per-layer summaries (class token, or GAP over the patch tokens)."""
    L = len(m.blocks)
    pos = m.pos_embed
    x = m.i2t(img)
    p = 0 if m.cls_token is None else 1
    if p:
        x = torch.cat((m.cls_token.expand(img.shape[0], -1, -1), x), dim=1)
    gap = method in ("pvg", "mpvg")
    P = [None] * L
    if method == "lape":                           # Eq. 5-7: P_l = LN'_l(pos_l), pos_{l+1} = P_l
        q = pos
        for l in range(L):
            q = ln(m.pe.norms[l], q)
            P[l] = q
    else:
        x = x + pos                                # Eq. 1 / Eq. 8
    chain = [pos]
    if gap:                                        # Eq. 9-10, layer 0 included without a class token
        first = 0 if overrides.get("include_layer0", p == 0) else 1
        q = pos
        for l in range(first, L):
            q = ln(m.pe.norms[l], q)
            P[l] = q
            chain.append(q)
    summaries = []
    for blk, q in zip(m.blocks, P):
        h = blk.norm1(x) if q is None else blk.norm1(x) + q
        x = x + blk.attn(h)
        x = x + blk.mlp(blk.norm2(x))
        summaries.append(x[:, p:].mean(1) if gap else x[:, 0])
    s = m.lca(torch.stack(summaries, 1) + m.pos_layer_embed)[:, -1]
    y = m.norm(s)
    if method == "mpvg":                           # Eq. 11, GAP of LN(x) + LN'(pos_k)
        y = y + ln(m.pe.last_norm, chain[overrides.get("last_ln_pe", 0)])[:, p:].mean(1)
    return m.head(y)


def original_concat_2x2(x: torch.Tensor) -> torch.Tensor:
    """The original Swin code's PatchMerging concatenation (even sizes): x0, x1, x2, x3."""
    return torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)


def swin_reference(m: SwinTransformerPE, img: torch.Tensor, method: str, overrides: dict) -> torch.Tensor:
    """Swin logits recomputed with the model's own weights: one LN' per block (layer 0 included),
    LN'_last at the last stage, the PE carried across stages by each stage's PatchMerging (PVG,
    MPVG) or, for LaPE, by an LN' of its own then the merge's concatenation and reduction."""
    hierarchical = overrides.get("hierarchical", True)

    def cross(s: int, q: torch.Tensor) -> torch.Tensor:
        merge = m.layers[s].downsample
        if method != "lape":
            return merge(q)
        return merge.reduction(original_concat_2x2(ln(m.pe.merge_norms[s - 1], q)))

    x = m.patch_embed(img)
    B, H, W, C = x.shape
    pos0 = m.absolute_pos_embed.reshape(1, H, W, C)
    if method != "lape":
        x = x + pos0
    p, base = pos0, pos0
    chain = [(pos0, 0)]
    for s, stage in enumerate(m.layers):
        x = stage.downsample(x)
        if s > 0:
            p, base = cross(s, p), cross(s, base)
        for j, blk in enumerate(stage.blocks):
            if method == "default":
                h = blk.norm1(x)
            else:
                p = ln(m.pe.stages[s].norms[j], p if hierarchical else base)
                chain.append((p, s))
                h = blk.norm1(x) + p
            Bx, Hx, Wx, Cx = x.shape
            x = x + blk._attn(h)
            x = (x.reshape(Bx, -1, Cx) + blk.mlp(blk.norm2(x.reshape(Bx, -1, Cx)))).reshape(Bx, Hx, Wx, Cx)
    y = m.norm(x)
    if method == "mpvg":
        q, s = chain[overrides.get("last_ln_pe", 0)]
        for t in range(s + 1, len(m.layers)):
            q = cross(t, q)
        y = y + ln(m.pe.last_norm, q)
    return m.head.fc(y.mean(dim=(1, 2)))


REFERENCE_CASES = [
    (CEIT, "default", {}), (CEIT, "lape", {}), (CEIT, "pvg", {}), (CEIT, "mpvg", {}),
    (CEIT, "mpvg", {"last_ln_pe": 2}), (CEIT, "mpvg", {"include_layer0": False}),
    (SWIN, "default", {}), (SWIN, "lape", {}), (SWIN, "lape", {"hierarchical": False}),
    (SWIN, "pvg", {}), (SWIN, "mpvg", {}),
    (SWIN, "mpvg", {"last_ln_pe": 3}), (SWIN, "mpvg", {"hierarchical": False, "last_ln_pe": 4}),
]


@pytest.mark.parametrize("name,method,overrides", REFERENCE_CASES)
def test_forward_equals_reference(name, method, overrides):
    tiny, reference = {CEIT: (CEIT_TINY, ceit_reference), SWIN: (SWIN_TINY, swin_reference)}[name]
    torch.manual_seed(0)
    m = timm.create_model(name, pe_method=method, pe_overrides=overrides, **tiny).eval()
    randomize_norms(m)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = m(x)
        ref = reference(m, x, method, overrides)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        if method != "default" and getattr(m, "cls_token", 0) is not None:  # the PE really changes the output
            assert not torch.allclose(reference(m, x, "default", {}), out, atol=1e-4)
        if name == CEIT and m.cls_token is None and m.pe_cfg.include_layer0:  # and so does CeiT's layer-0 term
            flipped = {**overrides, "include_layer0": False}
            assert not torch.allclose(reference(m, x, method, flipped), out, atol=1e-4)


# --------------------------------------------------------------------------- training, chain

@pytest.mark.parametrize("name,tiny", [(CEIT, CEIT_TINY), (SWIN, SWIN_TINY)])
@pytest.mark.parametrize("method", METHODS)
def test_forward_backward_every_parameter_gets_a_gradient(name, tiny, method):
    torch.manual_seed(0)
    m = timm.create_model(name, pe_method=method, **tiny).train()
    out = m(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, tiny["num_classes"])
    F.cross_entropy(out, torch.tensor([0, 1])).backward()
    no_grad = [n for n, p in m.named_parameters() if p.grad is None]
    assert no_grad == []  # all parameters are used (DDP without find_unused_parameters)


def test_full_size_ceit_forward():  # full-size Swin runs in the timm-equivalence test
    with torch.no_grad():
        assert timm.create_model(CEIT, pe_method="mpvg").eval()(torch.randn(1, 3, 224, 224)).shape == (1, 1000)


@pytest.mark.parametrize("name,tiny", [(CEIT, CEIT_TINY), (SWIN, SWIN_TINY)])
@pytest.mark.parametrize("method", ("lape", "pvg", "mpvg"))
def test_ln_prime_chain_runs_once_per_forward(name, tiny, method):
    m = timm.create_model(name, pe_method=method, **tiny).eval()
    norms = [mod for mod in m.pe.modules() if isinstance(mod, nn.LayerNorm)]
    calls, batch_dims = [], []

    def hook(mod, inp, out):
        calls.append(mod)
        batch_dims.append(out.shape[0])

    handles = [mod.register_forward_hook(hook) for mod in norms]
    counts = []
    with torch.no_grad():
        for batch in (1, 4):
            calls.clear()
            m(torch.randn(batch, 3, 32, 32))
            counts.append(len(calls))
            assert sorted(map(id, calls)) == sorted(map(id, norms))  # each LN' exactly once
    for h in handles:
        h.remove()
    assert counts[0] == counts[1] == len(norms) > 0
    assert set(batch_dims) == {1}  # computed on (1, ...) tensors and broadcast


# --------------------------------------------------------------------------- analysis, folding

@pytest.mark.parametrize("name,tiny", [(CEIT, CEIT_TINY), (SWIN, SWIN_TINY)])
def test_forward_analysis_and_last_ln_term(name, tiny):
    torch.manual_seed(0)
    m = timm.create_model(name, pe_method="mpvg", **tiny).eval()
    randomize_norms(m)
    x = torch.randn(2, 3, 32, 32)
    a = m.forward_analysis(x)
    assert len(a["layer_inputs"]) == len(a["layer_tokens"]) == len(a["layer_pos"]) == len(m.pe.receives)
    assert a["layer_pos"][0] is not None  # Swin's PVG/MPVG include layer 0, and CeiT's without a class token
    for xin, tok, pos in zip(a["layer_inputs"], a["layer_tokens"], a["layer_pos"]):
        assert xin.shape == tok.shape and xin.shape[0] == 2
        assert pos is None or pos.shape == (1,) + tok.shape[1:]
    assert a["pre_last_ln"].shape == a["post_last_ln"].shape
    term = m.last_ln_pe_term()
    torch.testing.assert_close(term, a["last_ln_pe"])
    # logits = W (pooled post-Last-LN + pool(LN'_last(pos_0))) + b: the constant a fold absorbs.
    # CeiT's Last LN sees the single LCA token, Swin's every token (GAP, no prefix tokens).
    head = m.get_classifier()
    with torch.no_grad():
        expected = head(a["post_last_ln"].mean(1)) + m.pool(term) @ head.weight.T
        torch.testing.assert_close(m(x), expected, rtol=1e-5, atol=1e-5)
        # GAP over the patch tokens only: CeiT's class token row is left out
        torch.testing.assert_close(m.pool(term), term[:, a["num_prefix_tokens"]:].mean(1))
    assert timm.create_model(name, pe_method="pvg", **tiny).last_ln_pe_term() is None


@pytest.mark.parametrize("name,tiny", [(CEIT, CEIT_TINY), (SWIN, SWIN_TINY)])
def test_mpvg_folds_into_the_head_bias(name, tiny):
    from mpvg.models.fold import fold_last_ln_pe

    torch.manual_seed(0)
    m = timm.create_model(name, pe_method="mpvg", **tiny).eval()
    randomize_norms(m)
    folded = fold_last_ln_pe(m)
    assert folded.pe.last_norm is None and m.pe.last_norm is not None
    assert not torch.equal(folded.get_classifier().bias, m.get_classifier().bias)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), m(x), rtol=1e-5, atol=1e-5)


def test_ceit_layer_tokens_are_ln_of_inputs_and_pvg_adds_pe_at_input():
    torch.manual_seed(0)
    m = timm.create_model(CEIT, pe_method="pvg", **CEIT_TINY).eval()
    x = torch.randn(2, 3, 32, 32)
    a = m.forward_analysis(x)
    with torch.no_grad():
        x0 = m.i2t(x) + m.pos_embed  # no class token with GAP
    torch.testing.assert_close(a["layer_inputs"][0], x0)
    torch.testing.assert_close(a["layer_tokens"][1], m.blocks[1].norm1(a["layer_inputs"][1]))
    assert a["num_prefix_tokens"] == 0


# --------------------------------------------------------------------------- CeiT with GAP

def test_ceit_gap_has_no_class_token_and_the_earlier_design_is_a_knob():
    d = CEIT_TINY["embed_dim"]
    n = CEIT_TINY["img_size"] // 4 // CEIT_TINY["patch_size"]
    for method in ("pvg", "mpvg"):
        paper = timm.create_model(CEIT, pe_method=method, **CEIT_TINY)
        assert paper.cls_token is None and paper.num_prefix_tokens == 0 and paper.pos_embed.shape == (1, n * n, d)
        assert paper.pe_cfg.include_layer0 and all(paper.pe.receives)
        kept = timm.create_model(CEIT, pe_method=method, class_token=True, **CEIT_TINY)
        assert kept.cls_token is not None and kept.pos_embed.shape == (1, n * n + 1, d)
        assert not kept.pe_cfg.include_layer0 and kept.pe.receives == [False] + [True] * (CEIT_TINY["depth"] - 1)
        # the counts cannot tell the two apart: class token (d) + its PE row (d) = one LN' (2d)
        assert n_params(paper) == n_params(kept)
        no_layer0 = timm.create_model(CEIT, pe_method=method, pe_overrides={"include_layer0": False}, **CEIT_TINY)
        assert n_params(paper) - n_params(no_layer0) == 2 * d
    with pytest.raises(ValueError, match="class_token"):
        timm.create_model(CEIT, pe_method="default", class_token=False, **CEIT_TINY)
    with torch.device("meta"):  # Table 1 either way
        for method, count in (("pvg", 6_361_128), ("mpvg", 6_361_512)):
            assert n_params(timm.create_model(CEIT, pe_method=method, class_token=True)) == count
            assert n_params(timm.create_model(CEIT, pe_method=method, pe_overrides={"include_layer0": False})) \
                == count - 384


@pytest.mark.parametrize("method", ("pvg", "mpvg"))
def test_ceit_with_class_token_kept_equals_reference(method):
    torch.manual_seed(0)
    m = timm.create_model(CEIT, pe_method=method, class_token=True, **CEIT_TINY).eval()
    randomize_norms(m)
    with torch.no_grad():
        m.cls_token.normal_()
        x = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(m(x), ceit_reference(m, x, method, {}), rtol=1e-5, atol=1e-5)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="pool"):
        timm.create_model(SWIN, pe_method="lape", pe_overrides={"pool": "token"}, **SWIN_TINY)
    with pytest.raises(ValueError, match="last_ln_pe"):
        timm.create_model(SWIN, pe_method="mpvg", pe_overrides={"last_ln_pe": 6}, **SWIN_TINY)
    with pytest.raises(ValueError, match="pretrained"):
        timm.create_model(CEIT, pretrained=True)
    with pytest.raises(ValueError, match="img_size"):
        timm.create_model(CEIT, img_size=8)
    with pytest.raises(ValueError, match="unknown PE method"):
        timm.create_model(SWIN, pe_method="rope", **SWIN_TINY)
    cfg = PEConfig(pool="avg", layerwise=True, include_layer0=True, last_ln_pe=0)
    assert timm.create_model(SWIN, pe_method=cfg, **SWIN_TINY).pe_cfg == cfg
