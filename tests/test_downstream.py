"""Downstream models: deformable attention, ViT-Adapter with each PE method, Mask R-CNN and
COCO AP, UperNet and mIoU, schedules, and the `mpvg detect|segment` commands end to end.

Everything runs on CPU with tiny shapes.  The torch thread pool is pinned to one thread in
this module: on a loaded 2-core machine OpenMP's barrier waits make these small ops ~20x
slower with two threads.
"""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

import mpvg.models  # noqa: F401
from mpvg.downstream import engine
from mpvg.downstream.adapter import (DETECTION_WINDOW_ATTN, ViTAdapter, WindowedAttention, build_vit_adapter,
                                     load_pretrained_vit)
from mpvg.downstream.deform_attn import MSDeformAttn, ms_deform_attn
from mpvg.downstream.detection import build_mask_rcnn, coco_evaluate, to_coco_results
from mpvg.downstream.segmentation import (IoUAccumulator, build_upernet, intersect_and_union, mean_iou,
                                          seg_cross_entropy)

ROOT = Path(__file__).resolve().parents[1]
DEIT = "mpvg_deit_tiny_patch16_224"
TINY_ARCH = dict(embed_dim=48, depth=12, num_heads=3, patch_size=8)  # params.yaml tiny DeiT-Ti
METHODS = ("default", "lape", "pvg", "mpvg")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_adapter(method="mpvg", pretrained=None, **kw):
    kw.setdefault("conv_inplane", 16)
    return build_vit_adapter(method, model_name=DEIT, arch_overrides=TINY_ARCH, pretrain_img_size=32,
                             vit_drop_path=0.0, drop_path=0.0, pretrained=pretrained, **kw)


def trained_deit_checkpoint(path: Path, method: str, seed: int = 0) -> dict:
    """A tiny DeiT-Ti whose every weight differs from a fresh init, saved like `mpvg train`."""
    torch.manual_seed(seed)
    model = timm.create_model(DEIT, pe_method=method, num_classes=10, img_size=32, **TINY_ARCH)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    sd = model.state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": "mpvg-train-v1", "model": sd, "model_name": DEIT}, path)
    return sd


# ------------------------------------------------------------------------------ deformable attention
def naive_ms_deform_attn(value, shapes, locations, weights):
    """Explicit bilinear sampling: pixel (x * W - 0.5, y * H - 0.5), zero outside the map."""
    B, S, M, D = value.shape
    _, Lq, _, L, P, _ = locations.shape
    out = torch.zeros(B, Lq, M, D, dtype=torch.float64)
    starts = np.cumsum([0] + [h * w for h, w in shapes])
    for b in range(B):
        for q in range(Lq):
            for m in range(M):
                for lvl, (h, w) in enumerate(shapes):
                    v = value[b, starts[lvl]:starts[lvl + 1], m].double().reshape(h, w, D)
                    for p in range(P):
                        x = locations[b, q, m, lvl, p, 0].item() * w - 0.5
                        y = locations[b, q, m, lvl, p, 1].item() * h - 0.5
                        x0, y0 = int(np.floor(x)), int(np.floor(y))
                        acc = torch.zeros(D, dtype=torch.float64)
                        for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
                            for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
                                if 0 <= yy < h and 0 <= xx < w:
                                    acc += wy * wx * v[yy, xx]
                        out[b, q, m] += weights[b, q, m, lvl, p].item() * acc
    return out.reshape(B, Lq, M * D)


def test_deform_attn_equals_naive_bilinear_loop():
    g = torch.Generator().manual_seed(0)
    shapes = [(4, 5), (2, 3)]
    B, M, D, Lq, P = 2, 2, 3, 4, 3
    value = torch.randn(B, sum(h * w for h, w in shapes), M, D, generator=g)
    # locations partly outside [0, 1] to exercise the zero padding
    loc = torch.rand(B, Lq, M, len(shapes), P, 2, generator=g) * 1.4 - 0.2
    weights = torch.rand(B, Lq, M, len(shapes), P, generator=g)
    got = ms_deform_attn(value, shapes, loc, weights)
    ref = naive_ms_deform_attn(value, shapes, loc, weights)
    assert got.shape == (B, Lq, M * D)
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)


def test_msdeformattn_module_offsets_in_pixels_and_grads():
    attn = MSDeformAttn(d_model=12, n_levels=2, n_heads=2, n_points=2)
    shapes = [(4, 4), (2, 2)]
    q = torch.randn(1, 3, 12, requires_grad=True)
    feat = torch.randn(1, 20, 12, requires_grad=True)
    ref = torch.rand(1, 3, 1, 2)
    out = attn(q, ref, feat, shapes)
    assert out.shape == (1, 3, 12)
    # at init the offsets and weights ignore the query (zero weights); make them depend on it
    with torch.no_grad():
        attn.sampling_offsets.weight.normal_(std=0.1)
        attn.attention_weights.weight.normal_(std=0.1)
    attn(q, ref, feat, shapes).square().sum().backward()
    assert q.grad.abs().sum() > 0 and feat.grad.abs().sum() > 0
    # the initial offsets: head m points along angle 2 pi m / M, point p at distance p + 1 (pixels)
    bias = attn.sampling_offsets.bias.view(2, 2, 2, 2)
    torch.testing.assert_close(bias[0, 0, :, :], torch.tensor([[1.0, 0.0], [2.0, 0.0]]))
    with pytest.raises(ValueError, match="levels"):
        attn(q, ref, feat[:, :16], [(4, 4)])


# ------------------------------------------------------------------------------ adapter
@pytest.mark.parametrize("method", METHODS)
def test_adapter_pyramid_shapes_per_method(method):
    adapter = tiny_adapter(method, window_attn=DETECTION_WINDOW_ATTN, window_size=3)
    feats = adapter(torch.randn(2, 3, 64, 96))
    assert [tuple(f.shape) for f in feats] == [(2, 48, 16, 24), (2, 48, 8, 12), (2, 48, 4, 6), (2, 48, 2, 3)]
    assert all(torch.isfinite(f).all() for f in feats)
    with pytest.raises(ValueError, match="multiples of 32"):
        adapter(torch.randn(1, 3, 48, 64))


def test_adapter_paper_size_patch16_strides():
    vit = timm.create_model(DEIT, pe_method="pvg", num_classes=0, embed_dim=48, depth=4, num_heads=3)
    adapter = ViTAdapter(vit, conv_inplane=8, interaction_indexes=[[0, 1], [2, 3]], vit_feature="per_stage")
    feats = adapter(torch.randn(1, 3, 128, 64))
    assert [tuple(f.shape[-2:]) for f in feats] == [(32, 16), (16, 8), (8, 4), (4, 2)]
    assert adapter.out_channels == [48] * 4


def _last_block_tokens(adapter, x):
    box = {}
    handle = adapter.vit.blocks[-1].register_forward_hook(lambda m, i, o: box.setdefault("x", o))
    adapter(x)
    handle.remove()
    return box["x"]


@pytest.mark.parametrize("method,overrides", [("pvg", {}), ("mpvg", {}), ("lape", {"pool": "avg"}),
                                              ("default", {"pool": "avg"})])
def test_adapter_tokens_follow_the_pe_method_exactly(method, overrides):
    """With the injector's zero gate the adapter's ViT path must be the classification
    forward (same PE at the input, same layer-wise terms) up to the Last LN."""
    torch.manual_seed(0)
    vit = timm.create_model(DEIT, pe_method=method, pe_overrides=overrides, num_classes=0, img_size=32,
                            **TINY_ARCH).eval()
    with torch.no_grad():
        for p in vit.pe.parameters():  # LN' affine away from identity, so a missing term shows
            p.add_(torch.randn_like(p))
    x = torch.randn(1, 3, 32, 32)
    ref = vit.forward_analysis(x)["pre_last_ln"]
    adapter = ViTAdapter(vit, conv_inplane=8, layer_scale=False, drop_path=0.0).eval()
    with torch.no_grad():
        got = _last_block_tokens(adapter, x)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # and the layer-wise terms matter: perturbing an LN' changes the tokens for layer-wise methods
    if vit.pe_cfg.layerwise:
        with torch.no_grad():
            vit.pe.norms[5].bias.add_(1.0)
            assert not torch.allclose(_last_block_tokens(adapter, x), ref, atol=1e-3)


def test_adapter_drops_classifier_parts_and_mpvg_last_ln_pe():
    adapter = tiny_adapter("mpvg")
    names = [n for n, _ in adapter.named_parameters()]
    assert not any(n.startswith(("vit.head", "vit.norm.", "vit.cls_token", "vit.pe.last_norm")) for n in names)
    sum(f.sum() for f in adapter(torch.randn(1, 3, 64, 64))).backward()
    no_grad = [n for n, p in adapter.named_parameters() if p.grad is None]
    assert no_grad == []  # every parameter is used (DDP needs no find_unused_parameters)


def test_windowed_attention_is_local_and_matches_global_on_one_window():
    torch.manual_seed(0)
    block = timm.create_model(DEIT, pe_method="default", num_classes=0, img_size=32, **TINY_ARCH).blocks[0]
    attn = block.attn
    x = torch.randn(2, 6 * 6, 48)
    win = WindowedAttention(attn, window_size=6)
    torch.testing.assert_close(win(x, hw=(6, 6)), attn(x), atol=1e-5, rtol=1e-5)
    win3 = WindowedAttention(attn, window_size=4)  # 6x6 grid padded to 8x8: 4 windows
    y = win3(x, hw=(6, 6))
    x2 = x.clone().view(2, 6, 6, 48)
    x2[:, 5, 5] += 10.0  # a token in the bottom-right window
    y2 = win3(x2.view(2, 36, 48), hw=(6, 6)).view(2, 6, 6, 48)
    torch.testing.assert_close(y2[:, :4, :4], y.view(2, 6, 6, 48)[:, :4, :4])  # top-left window untouched
    assert not torch.allclose(y2[:, 4:, 4:], y.view(2, 6, 6, 48)[:, 4:, 4:])
    # padded keys: logit 0 and value 0 (ViT-Adapter's zero padding after the qkv projection)
    qkv = attn.qkv(x.view(2, 6, 6, 48)[:, 4:, 4:].reshape(2, 4, 48)).view(2, 4, 3, 3, 16).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    logits = torch.cat([q @ k.transpose(-2, -1) * 16 ** -0.5, torch.zeros(2, 3, 4, 12)], dim=-1)
    out = logits.softmax(-1)[..., :4] @ v
    ref = attn.proj(out.transpose(1, 2).reshape(2, 4, 48))
    torch.testing.assert_close(y.view(2, 6, 6, 48)[:, 4:, 4:].reshape(2, 4, 48), ref, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ pretrained loading
BACKBONE = ("patch_embed.", "pos_embed", "blocks.", "pe.norms.")


@pytest.mark.parametrize("method", METHODS)
def test_pretrained_pe_and_block_weights_really_load(tmp_path, method):
    path = tmp_path / "train" / "seed0" / "checkpoint.pt"
    sd = trained_deit_checkpoint(path, method)
    adapter = tiny_adapter(method, pretrained=path)
    own = adapter.vit.state_dict()
    keys = [k for k in sd if k.startswith(BACKBONE)]
    assert any(k.startswith("blocks.11.") for k in keys) and "pos_embed" in keys
    if method != "default":
        assert any(k.startswith("pe.norms.") for k in keys)
    for k in keys:
        torch.testing.assert_close(own[k], sd[k], msg=f"{k} did not load")
    fresh = tiny_adapter(method).vit.state_dict()
    assert not torch.equal(fresh["blocks.3.attn.qkv.weight"], own["blocks.3.attn.qkv.weight"])


def test_pretrained_load_fails_loudly(tmp_path, monkeypatch):
    sd = trained_deit_checkpoint(tmp_path / "mpvg.pt", "mpvg")
    # a checkpoint of another PE method (no LN' chain) does not fit a PVG/MPVG backbone
    default_sd = trained_deit_checkpoint(tmp_path / "default.pt", "default")
    with pytest.raises(ValueError, match="pe.norms"):
        tiny_adapter("mpvg", pretrained=default_sd)
    # a loader that silently skips weights is caught
    import mpvg.models.checkpoint as ckpt_mod

    monkeypatch.setattr(ckpt_mod, "load_checkpoint_into", lambda model, state_dict, strict=True: None)
    vit = timm.create_model(DEIT, pe_method="mpvg", num_classes=0, img_size=32, **TINY_ARCH)
    with pytest.raises(ValueError, match="did not load"):
        load_pretrained_vit(vit, sd)


# ------------------------------------------------------------------------------ detection
def _target_as_output(target):
    n = len(target["labels"])
    return {"boxes": target["boxes"], "labels": target["labels"], "scores": torch.ones(n),
            "masks": target["masks"].float()[:, None]}


def test_coco_eval_ground_truth_gives_ap_100(tmp_path):
    from mpvg.data.coco import CocoInstances, make_tiny

    make_tiny(tmp_path / "coco")
    val = CocoInstances(tmp_path / "coco", "val", train=False)
    results = []
    for i in range(len(val)):
        img_id = val.ids[i]
        results += to_coco_results(img_id, _target_as_output(val.load_target(img_id)), val.label_to_cat)
    metrics = coco_evaluate(val.coco, results, val.ids)
    assert metrics == {"bbox_ap": pytest.approx(100.0), "segm_ap": pytest.approx(100.0)}
    # the same with boxes shifted by a third of their size: AP drops (the check can fail)
    shifted = [dict(r, bbox=[r["bbox"][0] + r["bbox"][2] / 3, *r["bbox"][1:]]) for r in results]
    assert coco_evaluate(val.coco, shifted, val.ids, ("bbox",))["bbox_ap"] < 60.0
    assert coco_evaluate(val.coco, [], val.ids) == {"bbox_ap": 0.0, "segm_ap": 0.0}


def test_mask_rcnn_train_step_and_inference():
    torch.manual_seed(0)
    model = build_mask_rcnn(tiny_adapter("pvg", window_attn=DETECTION_WINDOW_ATTN, window_size=4), num_classes=3,
                            min_size=64, max_size=96, fpn_channels=32, box_fc_dim=32, mask_head_dim=16)
    images = [torch.rand(3, 64, 80), torch.rand(3, 72, 64)]
    masks = torch.zeros(1, 64, 80, dtype=torch.uint8)
    masks[0, 10:40, 20:50] = 1
    targets = [{"boxes": torch.tensor([[20.0, 10.0, 50.0, 40.0]]), "labels": torch.tensor([2]), "masks": masks},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                "masks": torch.zeros(0, 72, 64, dtype=torch.uint8)}]  # an image without objects
    model.train()
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        out = model([torch.rand(3, 50, 70)])[0]
    assert out["masks"].shape[-2:] == (50, 70) and out["boxes"].shape[1] == 4


# ------------------------------------------------------------------------------ segmentation
def test_miou_known_answer():
    label = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 3]])
    inter, union, area_pred, area_label = intersect_and_union(pred, label, num_classes=4)
    # ignored pixels (255) are dropped from both maps before counting
    assert inter.tolist() == [1, 2, 1, 0]
    assert area_label.tolist() == [2, 2, 2, 0]
    assert area_pred.tolist() == [2, 3, 1, 0]
    assert union.tolist() == [3, 3, 2, 0]
    # class 3 appears nowhere once 255 is ignored: left out of the mean (NaN-mean)
    expected = 100 * np.mean([1 / 3, 2 / 3, 1 / 2])
    assert mean_iou([pred], [label], 4) == pytest.approx(expected)
    # accumulated over images, not averaged per image
    acc = IoUAccumulator(2)
    acc.update(torch.tensor([0, 0, 0, 0]), torch.tensor([0, 0, 0, 1]))
    acc.update(torch.tensor([1]), torch.tensor([1]))
    assert acc.compute()["miou"] == pytest.approx(100 * (3 / 4 + 1 / 2) / 2)
    assert acc.compute()["aacc"] == pytest.approx(100 * 4 / 5)


def test_seg_loss_ignores_255_but_averages_over_all_pixels():
    logits = torch.zeros(1, 3, 2, 2)
    labels = torch.tensor([[[0, 1], [255, 255]]])
    # two valid pixels at CE log(3), divided by all 4 pixels (MMSegmentation 0.20)
    assert seg_cross_entropy(logits, labels).item() == pytest.approx(2 * np.log(3) / 4)


def test_upernet_training_step_and_slide_inference():
    torch.manual_seed(0)
    model = build_upernet(tiny_adapter("lape", vit_feature="per_stage"), num_classes=5, channels=16, aux_channels=8)
    x = torch.randn(2, 3, 64, 64)
    losses = model(x, torch.randint(0, 5, (2, 64, 64)))
    assert set(losses) == {"loss_decode", "loss_aux"}
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2, 5, 16, 16)
        whole = F.interpolate(model(x[:1]), size=(64, 64), mode="bilinear", align_corners=False)
        torch.testing.assert_close(model.slide_inference(x[:1], crop=64, stride=42), whole)
        slid = model.slide_inference(torch.randn(1, 3, 64, 128), crop=64, stride=32)
    assert slid.shape == (1, 5, 64, 128) and torch.isfinite(slid).all()


# ------------------------------------------------------------------------------ optimisation
def test_lr_schedules_follow_mmcv():
    det = {"lr": 1e-4, "lr_steps": [27, 33], "lr_gamma": 0.1, "warmup_iters": 500, "warmup_ratio": 0.001}
    f = lambda it: engine.lr_factor(it, det, total_iters=36 * 100, iters_per_epoch=100)  # noqa: E731
    assert f(0) == pytest.approx(0.001)
    assert f(250) == pytest.approx(1 - 0.5 * 0.999)
    assert f(500) == 1.0 and f(2699) == 1.0
    assert f(2700) == pytest.approx(0.1) and f(3300) == pytest.approx(0.01)
    seg = {"lr": 1.2e-4, "poly_power": 1.0, "min_lr": 0.0, "warmup_iters": 1500, "warmup_ratio": 1e-6}
    g = lambda it: engine.lr_factor(it, seg, total_iters=160000, iters_per_epoch=100)  # noqa: E731
    assert g(80000) == pytest.approx(0.5)
    assert g(0) == pytest.approx(1e-6)
    assert g(1500) == pytest.approx(1 - 1500 / 160000)


def test_param_groups_layer_decay_and_no_decay_keys():
    model = build_upernet(tiny_adapter("pvg"), num_classes=3, channels=8, aux_channels=8)
    recipe = {"weight_decay": 0.01, "layer_decay": 0.5}
    groups = engine.param_groups(model, recipe, num_layers=12)
    by_param = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())

    def group(name):
        return by_param[id(named[name])]

    assert group("backbone.vit.blocks.11.attn.qkv.weight")["lr_scale"] == pytest.approx(0.5)
    assert group("backbone.vit.blocks.0.attn.qkv.weight")["lr_scale"] == pytest.approx(0.5 ** 12)
    assert group("backbone.vit.pos_embed")["lr_scale"] == pytest.approx(0.5 ** 13)
    assert group("backbone.vit.pe.norms.4.weight")["lr_scale"] == group("backbone.vit.blocks.4.mlp.fc1.weight")["lr_scale"]
    assert group("decode_head.conv_seg.weight")["lr_scale"] == 1.0
    assert group("backbone.vit.blocks.0.attn.qkv.bias")["weight_decay"] == 0.0
    assert group("backbone.vit.pos_embed")["weight_decay"] == 0.01  # as ViT-Adapter's constructor does
    det = engine.param_groups(model, {"weight_decay": 0.05, "no_decay_keys": ["level_embed", "pos_embed", "norm",
                                                                            "bias"]}, 12)
    by_param = {id(p): g for g in det for p in g["params"]}
    assert by_param[id(named["backbone.level_embed"])]["weight_decay"] == 0.0
    assert by_param[id(named["backbone.vit.pe.norms.4.weight"])]["weight_decay"] == 0.0
    assert by_param[id(named["backbone.vit.blocks.0.attn.qkv.weight"])]["weight_decay"] == 0.05


# ------------------------------------------------------------------------------ commands end to end
SMALL = {
    "detect": ["recipes.coco_maskrcnn.fpn_channels=16", "recipes.coco_maskrcnn.box_fc_dim=16",
               "recipes.coco_maskrcnn.mask_head_dim=8", "recipes.coco_maskrcnn.adapter.conv_inplane=8",
               "recipes.coco_maskrcnn.window_size=4", "recipes.coco_maskrcnn.epochs=1"],
    "segment": ["recipes.ade20k_upernet.channels=16", "recipes.ade20k_upernet.aux_channels=8",
                "recipes.ade20k_upernet.adapter.conv_inplane=8", "recipes.ade20k_upernet.iters=4"],
}


def _cli(args: list[str]) -> int:
    from mpvg.cli import main

    return main(args)


def _setup_task(tmp_path: Path, task: str, method: str) -> tuple[list[str], Path]:
    from mpvg.data import ade20k, coco

    ds, mod = ("coco", coco) if task == "detect" else ("ade20k", ade20k)
    mod.make_tiny(tmp_path / ds)
    ckpt = tmp_path / "in1k" / "checkpoint.pt"
    trained_deit_checkpoint(ckpt, method)
    sets = [f"tiny.datasets.{ds}.root={tmp_path / ds}", "scale=tiny", *SMALL[task]]
    common = ["--params", str(ROOT / "params.yaml")] + [a for s in sets for a in ("--set", s)]
    return common, ckpt


@pytest.mark.parametrize("task,method,metrics", [("detect", "mpvg", {"bbox_ap", "segm_ap"}),
                                                 ("segment", "lape", {"miou"})])
def test_cli_train_resume_and_eval(tmp_path, capsys, task, method, metrics):
    common, ckpt = _setup_task(tmp_path, task, method)
    cell = f"{'coco' if task == 'detect' else 'ade20k'}-deit_ti-{method}"
    out = tmp_path / "run"
    args = [task, "train", *common, "--cell", cell, "--seed", "0", "--out", str(out), "--pretrained", str(ckpt),
            "--no-tracking", "--quiet"]
    assert _cli(args) == 0
    result = json.loads((out / "result.json").read_text())
    assert set(result["metrics"]) == metrics and all(0 <= v <= 100 for v in result["metrics"].values())
    assert result["stage"] == task and result["cell"] == cell and result["seed"] == 0
    assert result["pe"]["layerwise"] is True and result["iters"] > 0
    saved = torch.load(out / "checkpoint.pt", weights_only=False)
    assert saved["iter"] == result["iters"]
    # a second call resumes at the end: no training, same metrics
    mtime = (out / "checkpoint.pt").stat().st_mtime_ns
    assert _cli(args) == 0
    assert json.loads((out / "result.json").read_text())["metrics"] == result["metrics"]
    assert (out / "checkpoint.pt").stat().st_mtime_ns == mtime
    capsys.readouterr()
    assert _cli([task, "eval", *common, "--cell", cell, "--checkpoint", str(out / "checkpoint.pt"), "--quiet"]) == 0
    printed = json.loads(capsys.readouterr().out)
    for k in metrics:
        assert printed["metrics"][k] == pytest.approx(result["metrics"][k], abs=1e-6)


def test_cli_errors_name_the_problem(tmp_path, capsys):
    common, ckpt = _setup_task(tmp_path, "segment", "lape")
    base = ["segment", "train", *common, "--cell", "ade20k-deit_ti-lape", "--out", str(tmp_path / "r"), "--no-tracking"]
    assert _cli(base + ["--pretrained", str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt" in capsys.readouterr().err
    assert _cli(["detect", "train", *common, "--cell", "ade20k-deit_ti-lape", "--no-tracking"]) == 2
    assert "segment cell" in capsys.readouterr().err
    wrong = tmp_path / "pvg.pt"
    trained_deit_checkpoint(wrong, "default")  # Default has no LN' chain: does not fit LaPE
    assert _cli(base + ["--pretrained", str(wrong)]) == 2
    assert "pe.norms" in capsys.readouterr().err


def test_preempted_run_resumes_bit_identical(tmp_path, monkeypatch):
    from mpvg.config import load_params, resolve_run
    from mpvg.run.folder import Preempted

    common, ckpt = _setup_task(tmp_path, "segment", "pvg")
    sets = [common[i + 1] for i in range(len(common)) if common[i] == "--set"]
    spec = resolve_run(load_params(ROOT / "params.yaml", sets + ["recipes.ade20k_upernet.iters=5"]),
                       "ade20k-deit_ti-pvg")

    def run(out, stop_at=None):
        opts = engine.RunOptions(out_dir=out, init_from=ckpt, quiet=True, eval_every=0, log_interval=1)
        real = engine.segmentation_task
        calls = {"n": 0}

        def task_with_signal(spec, train=True):
            t = real(spec, train)
            loss = t.loss

            def loss_and_signal(model, batch, device):
                calls["n"] += 1
                if calls["n"] == stop_at:
                    os.kill(os.getpid(), signal.SIGUSR1)
                return loss(model, batch, device)
            t.loss = loss_and_signal
            return t

        monkeypatch.setattr(engine, "segmentation_task", task_with_signal)
        return engine.train(spec, "segment", opts)

    straight = run(tmp_path / "a")
    with pytest.raises(Preempted, match="iteration 3"):
        run(tmp_path / "b", stop_at=3)
    assert not (tmp_path / "b" / "result.json").exists()
    resumed = run(tmp_path / "b")
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed["metrics"] == straight["metrics"]
