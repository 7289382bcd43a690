"""The control of the mechanism: MPVG with LN'_last(sg(pos_k)) (PEConfig.last_ln_pe_detach).

Same values and parameters as MPVG; the only difference is the gradient that MPVG sends from
the Last LN back into pos_0. The tests compute that gradient by hand (autograd on the term
alone) and check that it is exactly what the control removes, for the ViT family, CeiT and
Swin (docs/models.md, "The control of the mechanism").
"""
from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

import mpvg.models  # noqa: F401  (registers the models)
from mpvg.models.fold import fold_last_ln_pe
from mpvg.models.pe import PEConfig, pe_config

DEIT = ("mpvg_deit_tiny_patch16_224", dict(embed_dim=32, depth=3, num_heads=2, img_size=32, patch_size=8,
                                            num_classes=5, drop_path_rate=0.0), "pos_embed")
CEIT = ("mpvg_ceit_tiny_patch16_224", dict(embed_dim=24, depth=3, num_heads=2, patch_size=2, img_size=32,
                                            num_classes=5, stem_chans=8), "pos_embed")
SWIN = ("mpvg_swin_tiny_patch4_window7_224", dict(embed_dim=8, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4),
                                                   patch_size=2, window_size=4, img_size=32, num_classes=5,
                                                   drop_path_rate=0.0), "absolute_pos_embed")


def pair(name: str, kwargs: dict, seed: int = 0):
    """MPVG and its control with the same weights (random LN affines, so every path counts)."""
    torch.manual_seed(seed)
    mpvg = timm.create_model(name, pe_method="mpvg", **kwargs).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in mpvg.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))
    control = timm.create_model(name, pe_method="mpvg", pe_overrides={"last_ln_pe_detach": True}, **kwargs).eval()
    control.load_state_dict(mpvg.state_dict())  # no parameter added or removed
    return mpvg, control


def grads(model, x, r) -> dict[str, torch.Tensor]:
    model.zero_grad()
    (model(x) * r).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name, kwargs, pos", [DEIT, CEIT, SWIN], ids=["deit", "ceit", "swin"])
def test_control_removes_exactly_the_gradient_through_the_last_ln(one_torch_thread, name, kwargs, pos):
    mpvg, control = pair(name, kwargs)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    r = torch.randn(3, 5, generator=torch.Generator().manual_seed(3))  # loss = sum(logits * r)
    with torch.no_grad():
        assert torch.equal(mpvg(x), control(x))  # the stop-gradient changes no value
    gm, gc = grads(mpvg, x, r), grads(control, x, r)
    assert gm.keys() == gc.keys()
    # LN'_last is still learned: its gradient is the same
    for n in gm:
        if n.startswith("pe.last_norm"):
            assert torch.allclose(gm[n], gc[n], atol=1e-6), n
    # the extra gradient of MPVG: d/dpos of sum_b r_b . W pool(LN'_last(pos_0)), by autograd on the term alone
    term_model = mpvg
    term_model.zero_grad()
    head = term_model.get_classifier()
    term = term_model.last_ln_pe_term()                               # (1, N, D), a function of pos_0
    pooled = term_model.pool(term)                                    # what the head adds: (1, D)
    (r.sum(0) @ (head.weight @ pooled[0])).backward()
    extra = getattr(term_model, pos).grad.clone()
    assert extra.abs().max() > 1e-4                                  # there is such a gradient
    assert torch.allclose(gm[pos] - gc[pos], extra, atol=1e-5)
    if name != SWIN[0]:  # ViT family and CeiT: pos_0 reaches LN'_last directly; nothing else differs
        for n in gm:
            if n != pos:
                assert torch.allclose(gm[n], gc[n], atol=1e-6), n


def test_swin_control_also_cuts_the_mergings_gradient_from_the_last_ln(one_torch_thread):
    """Swin carries pos_0 to the last stage through its patch mergings; the control detaches the
    carried PE, so the mergings' gradient differs from MPVG's only by that path."""
    name, kwargs, _ = SWIN
    mpvg, control = pair(name, kwargs)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    r = torch.randn(2, 5, generator=torch.Generator().manual_seed(5))
    gm, gc = grads(mpvg, x, r), grads(control, x, r)
    merging = [n for n in gm if "downsample" in n and not torch.allclose(gm[n], gc[n], atol=1e-7)]
    assert merging, "the mergings get gradient from the Last-LN path in MPVG, not in the control"
    blocks = [n for n in gm if ".blocks." in n]
    assert blocks and all(torch.allclose(gm[n], gc[n], atol=1e-6) for n in blocks)


def test_control_config_validation_and_folding(one_torch_thread):
    cfg = pe_config("mpvg", last_ln_pe_detach=True)
    assert (cfg.pool, cfg.layerwise, cfg.last_ln_pe, cfg.last_ln_pe_detach) == ("avg", True, 0, True)
    with pytest.raises(ValueError, match="needs a Last-LN PE"):
        PEConfig(last_ln_pe_detach=True)
    with pytest.raises(ValueError, match="needs a Last-LN PE"):
        pe_config("pvg", last_ln_pe_detach=True)
    # at inference the control is MPVG: it folds the same way, logits unchanged
    name, kwargs, _ = DEIT
    _, control = pair(name, kwargs)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(fold_last_ln_pe(control)(x), control(x), atol=1e-5)
