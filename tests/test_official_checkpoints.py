"""Official checkpoints of the Default models in their original code bases' layouts.

The state dicts are built here from the original code's parameter names and shapes
(facebookresearch/deit = timm's VisionTransformer, yitu-opensource/T2T-ViT models/t2t_vit.py +
token_performer.py, coeusguo/ceit ceit_model.py, microsoft/Swin-Transformer
models/swin_transformer.py), filled with random numbers: nothing is downloaded.  Each loads
strictly; where the original forward differs from timm's code (T2T-ViT's qk_scale, CeiT's LCA)
the logits are checked against a forward written here from the original code.
`mpvg eval --weights` runs on the tiny data, and its result feeds the calibration table.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
import yaml
from torch import nn

import mpvg.models  # noqa: F401
from mpvg.models.checkpoint import convert_official_state_dict, load_official_weights

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")

Shapes = dict  # name -> shape (tuple) or ("long", shape) for integer buffers


# --------------------------------------------------------------------------- original layouts
def _linear(name: str, out_f: int, in_f: int, bias: bool = True) -> Shapes:
    return {f"{name}.weight": (out_f, in_f), **({f"{name}.bias": (out_f,)} if bias else {})}


def _ln(name: str, d: int) -> Shapes:
    return {f"{name}.weight": (d,), f"{name}.bias": (d,)}


def _bn(name: str, c: int) -> Shapes:
    return {f"{name}.weight": (c,), f"{name}.bias": (c,), f"{name}.running_mean": (c,),
            f"{name}.running_var": (c,), f"{name}.num_batches_tracked": ("long", ())}


def _vit_block(p: str, d: int, mlp: float, qkv_bias: bool) -> Shapes:
    h = int(d * mlp)
    return {**_ln(f"{p}.norm1", d), **_linear(f"{p}.attn.qkv", 3 * d, d, qkv_bias), **_linear(f"{p}.attn.proj", d, d),
            **_ln(f"{p}.norm2", d), **_linear(f"{p}.mlp.fc1", h, d), **_linear(f"{p}.mlp.fc2", d, h)}


def deit_layout(d=192, depth=12, patch=16, img=224, classes=1000) -> Shapes:
    """facebookresearch/deit models.py: timm 0.3's VisionTransformer (class token, qkv bias)."""
    n = (img // patch) ** 2
    s = {"cls_token": (1, 1, d), "pos_embed": (1, n + 1, d), "patch_embed.proj.weight": (d, 3, patch, patch),
         "patch_embed.proj.bias": (d,)}
    for i in range(depth):
        s.update(_vit_block(f"blocks.{i}", d, 4.0, True))
    return {**s, **_ln("norm", d), **_linear("head", classes, d)}


def t2t_layout(d=256, depth=7, token_dim=64, img=224, classes=1000) -> Shapes:
    """T2T-ViT t2t_vit_7: T2T_module('performer') + Block(qkv_bias=False, mlp_ratio=2)."""
    s: Shapes = {}
    for name, dim in (("attention1", 3 * 7 * 7), ("attention2", token_dim * 3 * 3)):
        p = f"tokens_to_token.{name}"
        s.update({**_linear(f"{p}.kqv", 3 * token_dim, dim), **_linear(f"{p}.proj", token_dim, token_dim),
                  **_ln(f"{p}.norm1", dim), **_ln(f"{p}.norm2", token_dim),
                  **_linear(f"{p}.mlp.0", token_dim, token_dim), **_linear(f"{p}.mlp.2", token_dim, token_dim),
                  f"{p}.w": (token_dim // 2, token_dim)})
    s.update(_linear("tokens_to_token.project", d, token_dim * 9))
    n = (img // 16) ** 2
    s.update({"cls_token": (1, 1, d), "pos_embed": (1, n + 1, d)})
    for i in range(depth):
        s.update(_vit_block(f"blocks.{i}", d, 2.0, False))
    return {**s, **_ln("norm", d), **_linear("head", classes, d)}


def ceit_layout(d=192, depth=12, patch=4, stem=64, img=224, classes=1000) -> Shapes:
    """coeusguo/ceit ceit_tiny_patch16_224: HybridEmbed(Image2Tokens) + LeFF blocks + LCA."""
    h = 4 * d
    side = ((img - 1) // 2 + 1 - 1) // 2 + 1
    n = (side // patch) ** 2
    s = {"i2t.backbone.conv.weight": (stem, 3, 7, 7), **_bn("i2t.backbone.bn", stem),
         "i2t.proj.weight": (d, stem, patch, patch), "i2t.proj.bias": (d,),
         "cls_token": (1, 1, d), "pos_embed": (1, n + 1, d)}
    for i in range(depth):
        p = f"blocks.{i}"
        s.update({**_ln(f"{p}.norm2", d), **_ln(f"{p}.norm1", d), **_linear(f"{p}.attn.qkv", 3 * d, d),
                  **_linear(f"{p}.attn.proj", d, d),
                  f"{p}.leff.conv1.weight": (h, d, 1, 1), f"{p}.leff.conv1.bias": (h,),
                  f"{p}.leff.conv2.weight": (h, 1, 3, 3), f"{p}.leff.conv2.bias": (h,),
                  f"{p}.leff.conv3.weight": (d, h, 1, 1), f"{p}.leff.conv3.bias": (d,),
                  **_bn(f"{p}.leff.bn1", h), **_bn(f"{p}.leff.bn2", h), **_bn(f"{p}.leff.bn3", d)})
    s.update({**_ln("lca.norm2", d), **_ln("lca.norm1", d), **_linear("lca.attn.qkv", 3 * d, d),
              **_linear("lca.attn.proj", d, d), **_linear("lca.feedforward.fc1", h, d),
              **_linear("lca.feedforward.fc2", d, h), "pos_layer_embed": (1, depth, d)})
    return {**s, **_ln("norm", d), **_linear("head", classes, d)}


def swin_layout(c=96, depths=(2, 2, 6, 2), heads=(3, 6, 12, 24), window=7, patch=4, img=224,
                classes=1000) -> Shapes:
    """microsoft/Swin-Transformer SwinTransformer(ape=False): PatchMerging at the END of stages
    0..2, persistent relative_position_index and attn_mask buffers, head = nn.Linear."""
    s = {"patch_embed.proj.weight": (c, 3, patch, patch), "patch_embed.proj.bias": (c,), **_ln("patch_embed.norm", c)}
    res = img // patch
    for i, (depth, nh) in enumerate(zip(depths, heads)):
        dim = c * 2 ** i
        win = min(window, res)
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}"
            s.update({**_ln(f"{p}.norm1", dim), f"{p}.attn.relative_position_bias_table": ((2 * win - 1) ** 2, nh),
                      f"{p}.attn.relative_position_index": ("long", (win * win, win * win)),
                      **_linear(f"{p}.attn.qkv", 3 * dim, dim), **_linear(f"{p}.attn.proj", dim, dim),
                      **_ln(f"{p}.norm2", dim), **_linear(f"{p}.mlp.fc1", 4 * dim, dim),
                      **_linear(f"{p}.mlp.fc2", dim, 4 * dim)})
            if j % 2 == 1 and res > window:  # shifted windows: the mask buffer
                s[f"{p}.attn_mask"] = ((res // win) ** 2, win * win, win * win)
        if i < len(depths) - 1:
            s.update({f"layers.{i}.downsample.reduction.weight": (2 * dim, 4 * dim),
                      **_ln(f"layers.{i}.downsample.norm", 4 * dim)})
            res //= 2
    last = c * 2 ** (len(depths) - 1)
    return {**s, **_ln("norm", last), **_linear("head", classes, last)}


def random_state_dict(shapes: Shapes, seed: int = 0, device: str = "cpu") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in shapes.items():
        if device == "meta":
            sd[k] = torch.empty(shape[1] if shape[0] == "long" else shape, device="meta",
                                dtype=torch.long if shape[0] == "long" else torch.float32)
        elif shape[0] == "long":
            sd[k] = torch.randint(0, 10, shape[1], generator=g)
        elif k.endswith("running_var"):
            sd[k] = 0.5 + torch.rand(shape, generator=g)
        else:
            sd[k] = 0.2 * torch.randn(shape, generator=g)
    return sd


def n_float(shapes: Shapes) -> int:
    return sum(math.prod(s) for k, s in shapes.items() if s[0] != "long" and "running_" not in k
               and not k.endswith("attn_mask"))


# --------------------------------------------------------------------------- strict loads
@pytest.mark.parametrize("name,layout,count", [
    ("mpvg_deit_small_patch16_224", deit_layout(d=384), 22_050_664),
    ("mpvg_deit_base_patch16_224", deit_layout(d=768), 86_567_656),
    ("mpvg_swin_tiny_patch4_window7_224", swin_layout(), 28_288_354),
])
def test_full_size_layouts_load_strictly(name, layout, count):
    """Names and shapes of the full-size models, on the meta device (no memory)."""
    with torch.device("meta"):
        model = timm.create_model(name)
    sd = random_state_dict(layout, device="meta")
    report = load_official_weights(model, {"model": sd})
    assert n_float(layout) == count  # the original model's parameter count
    assert report.layout == ("swin" if "swin" in name else "deit")


def test_deit_tiny_official_equals_timm_deit():
    sd = random_state_dict(deit_layout())
    model = timm.create_model("mpvg_deit_tiny_patch16_224").eval()
    report = load_official_weights(model, {"model": sd})
    assert (report.layout, report.renamed, report.dropped, report.filled) == ("deit", 0, [], {})
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())
    ref = timm.create_model("deit_tiny_patch16_224").eval()
    ref.load_state_dict(sd, strict=True)  # the original code base's model is timm's ViT
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))
    with pytest.raises(ValueError, match=r"^a distilled DeiT checkpoint \(dist_token\): "
                                         r"the paper's DeiT is the non-distilled model"):
        load_official_weights(model, {**sd, "dist_token": torch.zeros(1, 1, 192)})


def original_t2t_logits(model, x: torch.Tensor, scale: float) -> torch.Tensor:
    """T2T-ViT's forward (transformer_block.py: attn = (q @ k^T) * scale), on the model's weights."""
    t = model.patch_embed(x).flatten(1, 2)
    t = torch.cat([model.cls_token.expand(x.shape[0], -1, -1), t], 1) + model.pos_embed
    for blk in model.blocks:
        B, N, C = t.shape
        H = blk.attn.num_heads
        qkv = blk.attn.qkv(blk.norm1(t)).reshape(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4)
        attn = ((qkv[0] @ qkv[1].transpose(-2, -1)) * scale).softmax(-1)
        t = t + blk.attn.proj((attn @ qkv[2]).transpose(1, 2).reshape(B, N, C))
        h = blk.norm2(t)
        t = t + blk.mlp.fc2(F.gelu(blk.mlp.fc1(h)))
    return model.head(model.norm(t)[:, 0])


def test_t2t_official_layout_and_qk_scale():
    layout = t2t_layout()
    assert n_float(layout) == 4_310_222  # the original's count, fixed PE and random features included
    sd = random_state_dict(layout)
    ckpt = {"state_dict": sd, "epoch": 309, "arch": "t2t_vit_7"}  # timm train.py's checkpoint
    model = timm.create_model("mpvg_t2t_vit_7").eval()
    report = load_official_weights(model, ckpt)
    assert report.layout == "t2t" and report.renamed == sum(k.startswith("tokens_to_token.") for k in sd)
    assert report.unstored == {"qk_scale": 64 ** -0.5}  # what the outputs depend on, stated in the result
    assert torch.equal(model.patch_embed.attention1.w, sd["tokens_to_token.attention1.w"])
    assert torch.equal(model.pos_embed, sd["pos_embed"])  # the checkpoint's table, loaded as it is
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        out = model(x)
        # the released weights need the default scale head_dim ** -0.5 (docs/models.md)
        torch.testing.assert_close(out, original_t2t_logits(model, x, 64 ** -0.5), rtol=1e-4, atol=1e-4)
        other = timm.create_model("mpvg_t2t_vit_7", qk_scale=256 ** -0.5).eval()
        assert load_official_weights(other, ckpt).unstored == {"qk_scale": 256 ** -0.5}
        out2 = other(x)
        torch.testing.assert_close(out2, original_t2t_logits(other, x, 256 ** -0.5), rtol=1e-4, atol=1e-4)
        assert not torch.allclose(out, out2, atol=1e-3)  # a wrong scale changes the outputs
    assert other.state_dict().keys() == model.state_dict().keys()


def original_ceit_logits(model, sd: dict, x: torch.Tensor) -> torch.Tensor:
    """coeusguo/ceit's forward written from ceit_model.py, on the ORIGINAL state dict's names."""
    def lin(name, t):
        return F.linear(t, sd[f"{name}.weight"], sd.get(f"{name}.bias"))

    def ln(name, t):
        return F.layer_norm(t, t.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], 1e-6)

    def bn(name, t):
        return F.batch_norm(t, sd[f"{name}.running_mean"], sd[f"{name}.running_var"], sd[f"{name}.weight"],
                            sd[f"{name}.bias"], False, 0.0, 1e-5)

    def attention(p, t, query_last=False):
        B, N, C = t.shape
        H = 3
        qkv = lin(f"{p}.qkv", t).reshape(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4)
        q = qkv[0][:, :, -1:] if query_last else qkv[0]
        a = ((q @ qkv[1].transpose(-2, -1)) * (C // H) ** -0.5).softmax(-1)
        return lin(f"{p}.proj", (a @ qkv[2]).transpose(1, 2).reshape(B, q.shape[2], C))

    B = x.shape[0]
    f = F.max_pool2d(bn("i2t.backbone.bn", F.conv2d(x, sd["i2t.backbone.conv.weight"], stride=2, padding=3)), 3, 2, 1)
    t = F.conv2d(f, sd["i2t.proj.weight"], sd["i2t.proj.bias"], stride=4).flatten(2).transpose(1, 2)
    t = torch.cat([sd["cls_token"].expand(B, -1, -1), t], 1) + sd["pos_embed"]
    cls = []
    for i in range(len(model.blocks)):
        p = f"blocks.{i}"
        t = t + attention(f"{p}.attn", ln(f"{p}.norm1", t))
        h = ln(f"{p}.norm2", t)
        c, g = h[:, :1], h[:, 1:]
        s = int(math.sqrt(g.shape[1]))
        g = g.reshape(B, s, s, -1).permute(0, 3, 1, 2)
        g = F.gelu(bn(f"{p}.leff.bn1", F.conv2d(g, sd[f"{p}.leff.conv1.weight"], sd[f"{p}.leff.conv1.bias"])))
        g = F.gelu(bn(f"{p}.leff.bn2", F.conv2d(g, sd[f"{p}.leff.conv2.weight"], sd[f"{p}.leff.conv2.bias"],
                                                padding=1, groups=g.shape[1])))
        g = bn(f"{p}.leff.bn3", F.conv2d(g, sd[f"{p}.leff.conv3.weight"], sd[f"{p}.leff.conv3.bias"]))
        t = t + torch.cat([c, g.flatten(2).transpose(1, 2)], 1)
        cls.append(t[:, 0])
    z = torch.stack(cls, 1) + sd["pos_layer_embed"]
    z = z[:, -1:] + attention("lca.attn", ln("lca.norm1", z), query_last=True)   # AttentionLCA
    z = z + lin("lca.feedforward.fc2", F.gelu(lin("lca.feedforward.fc1", ln("lca.norm2", z))))
    return lin("head", ln("norm", z).reshape(B, -1))


def test_ceit_official_layout_equals_the_original_forward():
    layout = ceit_layout()
    assert n_float(layout) == 6_356_904
    sd = random_state_dict(layout)
    model = timm.create_model("mpvg_ceit_tiny_patch16_224").eval()
    report = load_official_weights(model, {"model": sd})
    renamed = [k for k in sd if k.startswith("i2t.backbone.") or ".leff." in k or k.startswith("lca.feedforward.")]
    assert report.layout == "ceit" and report.renamed == len(renamed)
    assert torch.equal(model.blocks[3].mlp.conv2.weight, sd["blocks.3.leff.conv2.weight"])
    assert torch.equal(model.i2t.bn.running_var, sd["i2t.backbone.bn.running_var"])
    assert torch.equal(model.lca.mlp.fc1.weight, sd["lca.feedforward.fc1.weight"])
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x), original_ceit_logits(model, sd, x), rtol=1e-4, atol=1e-4)


def test_swin_microsoft_layout():
    sd = random_state_dict(swin_layout())
    model = timm.create_model("mpvg_swin_tiny_patch4_window7_224").eval()
    report = load_official_weights(model, {"model": sd})
    assert report.layout == "swin"
    assert report.dropped == sorted(k for k in sd if k.endswith(("relative_position_index", "attn_mask")))
    assert len(report.dropped) == 12 + 1 + 1 + 3  # 12 index buffers; masks of the shifted blocks of stages 0-2
    assert report.renamed == 3 * 3 + 2  # three PatchMergings (reduction, norm w/b), head w/b
    assert set(report.filled) == {"absolute_pos_embed"} and not model.absolute_pos_embed.any()
    # the original merges at the end of stage i, timm (and we) at the start of stage i + 1
    assert torch.equal(model.layers[1].downsample.reduction.weight, sd["layers.0.downsample.reduction.weight"])
    assert torch.equal(model.layers[3].downsample.norm.bias, sd["layers.2.downsample.norm.bias"])
    assert torch.equal(model.head.fc.weight, sd["head.weight"])
    assert torch.equal(model.layers[2].blocks[5].attn.relative_position_bias_table,
                       sd["layers.2.blocks.5.attn.relative_position_bias_table"])
    # the released model (no absolute PE): timm's Swin-T with the same weights, bit for bit
    ref = timm.create_model("swin_tiny_patch4_window7_224").eval()
    ref.load_state_dict({k: v for k, v in model.state_dict().items() if k != "absolute_pos_embed"}, strict=True)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=1e-5)


def test_official_loads_refuse_what_does_not_fit():
    sd = random_state_dict(deit_layout(d=48, depth=2, patch=8, img=32, classes=10))
    kw = dict(embed_dim=48, depth=2, num_heads=2, patch_size=8, img_size=32, num_classes=10)
    with pytest.raises(ValueError, match=r"^official deit checkpoints are Default models \(no layer-wise PE\); this "
                                         r"model has PEConfig\(.*last_ln_pe=0.*\); expected pe_method='default' "
                                         r"without pe_overrides$"):
        load_official_weights(timm.create_model("mpvg_deit_tiny_patch16_224", pe_method="mpvg", **kw), sd)
    with pytest.raises(ValueError, match=r"^not a facebookresearch/deit .* checkpoint of this model: "
                                         r"missing \['blocks\.1\.norm1\.weight'\], unexpected \[\], shapes"):
        load_official_weights(timm.create_model("mpvg_deit_tiny_patch16_224", **kw),
                              {k: v for k, v in sd.items() if k != "blocks.1.norm1.weight"})
    with pytest.raises(ValueError, match=r"^not a facebookresearch/deit .* checkpoint of this model: missing \[\], "
                                         r"unexpected \[\], shapes \(checkpoint vs model\) "
                                         r"\['pos_embed: \(1, 17, 48\) vs \(1, 37, 48\)'\]$"):
        load_official_weights(timm.create_model("mpvg_deit_tiny_patch16_224", **dict(kw, img_size=48)), sd)
    with pytest.raises(ValueError, match=r"^no official checkpoint layout for MPVGVisionTransformer "
                                         r"\(tokenizer='conv'\); expected DeiT, T2T-ViT, CeiT or Swin$"):
        load_official_weights(timm.create_model("mpvg_vit_lite_7_4"), sd)
    swin = random_state_dict(swin_layout(c=8, depths=(1, 1, 2, 1), heads=(1, 2, 2, 4), window=4, patch=2, img=32))
    kw = dict(embed_dim=8, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4), patch_size=2, img_size=32)
    # window 2 is not the checkpoint's 4
    with pytest.raises(ValueError, match=r"^layers\.0\.blocks\.0\.attn\.relative_position_bias_table: checkpoint "
                                         r"shape \(49, 1\), model \(9, 1\); .*nothing is resampled$"):
        load_official_weights(timm.create_model("mpvg_swin_tiny_patch4_window7_224", window_size=2, **kw), swin)
    sd_swin, report = convert_official_state_dict(
        timm.create_model("mpvg_swin_tiny_patch4_window7_224", window_size=4, **kw), swin)
    assert "layers.1.downsample.reduction.weight" in sd_swin and "head.fc.weight" in sd_swin


# --------------------------------------------------------------------------- mpvg eval --weights
TINY_LAYOUTS = {  # the tiny scale's architectures (params.yaml: tiny.models), 10 classes, 32x32
    "deit_ti": lambda: deit_layout(d=48, depth=12, patch=8, img=32, classes=10),
    "t2t_vit_7": lambda: t2t_layout(d=48, depth=4, token_dim=16, img=32, classes=10),
    "ceit_ti": lambda: ceit_layout(d=48, depth=4, patch=2, img=32, classes=10),
    "swin_ti": lambda: swin_layout(c=24, depths=(1, 1, 2, 1), heads=(1, 2, 4, 8), window=4, patch=2, img=32,
                                   classes=10),
}
WRAPPER = {"deit_ti": "model", "t2t_vit_7": "state_dict", "ceit_ti": "model", "swin_ti": "model"}


@pytest.fixture(scope="module")
def tiny_params(tmp_path_factory) -> Path:
    from mpvg.data.tiny import make_tiny

    root = tmp_path_factory.mktemp("official")
    make_tiny(root / "data", "imagenet")
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["tiny"]["datasets"]["imagenet"]["root"] = str(root / "data" / "imagenet")
    raw["paths"]["runs"] = str(root / "runs")
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return root / "params.yaml"


@pytest.mark.parametrize("slug", sorted(TINY_LAYOUTS))
def test_eval_weights_on_the_tiny_data(slug, tiny_params, capsys):
    from mpvg.cli import main
    from mpvg.config import load_params, resolve_run
    from mpvg.run import distributed
    from mpvg.training.engine import build_datasets, build_model, eval_loader, evaluate

    cell = f"in1k-{slug}-default"
    sd = random_state_dict(TINY_LAYOUTS[slug]())
    weights = tiny_params.parent / f"{slug}.pth"
    torch.save({WRAPPER[slug]: sd, "epoch": 299}, weights)
    assert main(["eval", "--params", str(tiny_params), "--cell", cell, "--weights", str(weights),
                 "--workers", "0", "--device", "cpu"]) == 0
    printed = json.loads(capsys.readouterr().out)
    runs = Path(load_params(tiny_params)["paths"]["runs"])
    saved = json.loads((runs / "calibration" / cell / "result.json").read_text())
    assert saved == printed
    assert saved["stage"] == "calibration" and saved["method"] == "Default" and saved["scale"] == "tiny"
    assert saved["weights"]["path"] == str(weights) and len(saved["weights"]["sha256"]) == 64
    assert saved["num_samples"] == 200
    # the same numbers as loading the file by hand and evaluating the validation set
    spec = resolve_run(load_params(tiny_params), cell)
    model = build_model(spec)
    load_official_weights(model, torch.load(weights, weights_only=False))
    dist = distributed.setup("cpu")
    try:
        loader = eval_loader(build_datasets(spec)[1], spec.recipe["batch_size"], dist, 0)
        expected = evaluate(model, loader, dist.device)
    finally:
        distributed.cleanup()
    assert saved["metrics"] == pytest.approx(expected, abs=1e-9)


def test_eval_weights_refuses_other_cells_and_the_calibration_table(tiny_params, capsys):
    from mpvg.cli import main
    from mpvg.config import expand_cells, load_params
    from mpvg.reporting.calibration import PUBLISHED, build_calibration_table

    weights = tiny_params.parent / "deit.pth"
    torch.save({"model": random_state_dict(TINY_LAYOUTS["deit_ti"]())}, weights)
    assert main(["eval", "--params", str(tiny_params), "--cell", "in1k-deit_ti-mpvg", "--weights", str(weights),
                 "--workers", "0"]) == 2
    assert "Default" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="^2$"):  # --checkpoint and --weights exclude each other
        main(["eval", "--params", str(tiny_params), "--cell", "in1k-deit_ti-default", "--checkpoint", str(weights),
              "--weights", str(weights)])
    assert "argument --weights: not allowed with argument --checkpoint" in capsys.readouterr().err
    params = load_params(tiny_params)
    runs = Path(params["paths"]["runs"])
    empty = build_calibration_table(expand_cells(params), tiny_params.parent / "nothing", params)
    assert empty is None  # no table before any `mpvg eval --weights`
    assert main(["eval", "--params", str(tiny_params), "--cell", "in1k-deit_ti-default", "--weights", str(weights),
                 "--workers", "0"]) == 0
    capsys.readouterr()
    table = build_calibration_table(expand_cells(params), runs, params)
    rows = {r[0].text: [e.text for e in r] for r in table.rows}
    assert list(rows) == list(PUBLISHED)
    result = json.loads((runs / "calibration" / "in1k-deit_ti-default" / "result.json").read_text())
    ours = result["metrics"]["top1"]
    assert rows["DeiT-Ti"][3:6] == ["72.2", f"{ours:.2f}", f"{ours - 72.2:+.2f}"]
    assert rows["DeiT-Ti"][2].startswith("deit.pth (sha256 ")
    assert rows["T2T-ViT-7"][3] == "71.7" and rows["CeiT-Ti"][3] == "76.4"
    assert "Scale: tiny" in table.caption
    # and `mpvg report` writes it beside the paper's tables
    from mpvg.reporting.commands import report_inputs
    from mpvg.reporting.report import build_reports

    written = build_reports(params, expand_cells(params), runs, tiny_params.parent / "reports", commit="0123abc",
                            **report_inputs(params, expand_cells(params), runs))
    assert tiny_params.parent / "reports" / "calibration.md" in written
    assert "[calibration.md](calibration.md)" in (tiny_params.parent / "reports" / "README.md").read_text()
