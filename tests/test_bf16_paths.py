"""The bf16 autocast paths on CPU: what a GPU run takes, before it costs a day in the queue.

Every model family (DeiT-Ti/S/B, Swin-Ti, CeiT-Ti, T2T-ViT-7, ViT-Lite at the tiny scale of
params.yaml) and both downstream tasks (Mask R-CNN and UperNet on the ViT-Adapter, tiny settings):
a training step (the engine's ``train_step`` / the downstream loop's body) and an evaluation step
(``engine.evaluate`` / the detection and segmentation predictors) under bf16 autocast, from the same
weights and batch as an fp32 step. The losses must be finite and close to fp32's:

* tolerance: |loss_bf16 - loss_fp32| <= 1% of loss_fp32. bf16 rounds each matmul input to 2^-8
  (0.4%); the errors of the logits mostly average out in a mean cross-entropy: measured here (weights
  moved off their init, losses 2.3-3.0), at most 0.06% on the training losses, 0.5% on the
  evaluation loss (Swin-Ti), 0.1% on the downstream loss sums. 1% is twice the largest, with room
  for other seeds and CPUs, and small enough that a lost fp32 reduction or a wrong cast shows.

Plus the float32 sampling of deformable attention under autocast and one torch.compile check.
"""
from __future__ import annotations

import copy
import time
from pathlib import Path

import pytest
import torch

import mpvg.models  # noqa: F401  (registers the models)
from mpvg.config import expand_cells, load_params, resolve_run
from mpvg.training.engine import build_model, evaluate, train_step

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("DeiT-Ti", "DeiT-S", "DeiT-B", "Swin-Ti", "CeiT-Ti", "T2T-ViT-7", "ViT-Lite")
REL = 0.01

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_params():
    return load_params(ROOT / "params.yaml", ["scale=tiny"])


def perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights moved off their init (a fresh head makes every loss ln(classes), whatever the precision)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def close(bf16: float, fp32: float) -> bool:
    return abs(bf16 - fp32) <= REL * abs(fp32)


def mpvg_cell(params, model: str) -> str:
    return next(c.id for c in expand_cells(params).values()
                if c.model == model and c.method == "MPVG" and c.stage == "train" and c.id.count("-") == 2)


# ------------------------------------------------------------------------------ classification
@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_train_and_eval_steps_match_fp32(tiny_params, family):
    import timm.optim

    spec = resolve_run(tiny_params, mpvg_cell(tiny_params, family))
    torch.manual_seed(0)
    base = perturbed(build_model(spec))
    size = spec.recipe["img_size"]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, size, size, generator=g)
    y = torch.randint(0, spec.num_classes, (8,), generator=g)
    losses, evals = {}, {}
    for name, amp in (("fp32", None), ("bf16", torch.bfloat16)):
        model = copy.deepcopy(base)
        opt = timm.optim.create_optimizer_v2(model, opt="adamw", lr=1e-3, weight_decay=0.05)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        torch.manual_seed(2)  # the same drop-path draws (tiny drop_path is 0 anyway)
        loss = train_step(model.train(), x, y, torch.nn.CrossEntropyLoss(), opt, scaler, amp, clip_grad=1.0)
        assert loss.dtype == torch.float32  # cross-entropy is autocast to fp32
        losses[name] = float(loss.detach())
        second = float(train_step(model, x, y, torch.nn.CrossEntropyLoss(), opt, scaler, amp).detach())
        evals[name] = evaluate(model, [(x, y)], torch.device("cpu"), amp)
        with torch.no_grad(), torch.autocast("cpu", dtype=amp, enabled=amp is not None):
            assert model(x).dtype == (amp or torch.float32)  # autocast really ran the model in bf16
        assert all(torch.isfinite(torch.tensor(v)) for v in (losses[name], second, *evals[name].values()))
    print(f"{family}: bf16 - fp32 train loss {losses['bf16'] / losses['fp32'] - 1:+.3%}, "
          f"eval loss {evals['bf16']['loss'] / evals['fp32']['loss'] - 1:+.3%}")  # pytest -s
    assert close(losses["bf16"], losses["fp32"]), (family, losses)
    assert close(evals["bf16"]["loss"], evals["fp32"]["loss"]), (family, evals)


# ------------------------------------------------------------------------------ downstream
def _downstream(params, task: str):
    from mpvg.downstream.engine import _adapter_of, build_task_model, param_groups

    cell = {"detect": "coco-deit_ti-mpvg", "segment": "ade20k-deit_ti-mpvg"}[task]
    spec = resolve_run(params, cell)
    torch.manual_seed(0)
    model = perturbed(build_task_model(spec, task, spec.num_classes, None, 32))
    return spec, model, lambda m: param_groups(m, spec.recipe, _adapter_of(m).depth)


def _downstream_batch(task: str, crop: int, num_classes: int):
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_downstream import synthetic_batch

    return synthetic_batch(task, 2, crop, num_classes, torch.device("cpu"), torch.Generator().manual_seed(0))


@pytest.mark.parametrize("task", ["detect", "segment"])
def test_bf16_downstream_train_and_eval_steps_match_fp32(tiny_params, task):
    spec, base, groups = _downstream(tiny_params, task)
    crop = int(spec.recipe["crop_size"])
    batch = _downstream_batch(task, crop, spec.num_classes)
    losses, outs = {}, {}
    for name, amp in (("fp32", None), ("bf16", torch.bfloat16)):
        model = copy.deepcopy(base).train()
        opt = torch.optim.AdamW(groups(model), lr=1e-4, weight_decay=0.05)
        torch.manual_seed(3)  # the same proposal / point sampling in both
        with torch.autocast("cpu", dtype=amp, enabled=amp is not None):  # downstream.engine._train's step
            parts = model(*batch)
        loss = sum(parts.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses[name] = {k: float(v.detach()) for k, v in parts.items()}
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        model.eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=amp, enabled=amp is not None):
            if task == "detect":
                from mpvg.downstream.detection import to_coco_results

                out = model([im for im in batch[0]])
                assert all(torch.isfinite(o["scores"]).all() and torch.isfinite(o["boxes"]).all() for o in out)
                to_coco_results(1, out[0], {i: i for i in range(spec.num_classes + 1)})  # eval's conversion
                outs[name] = out
            else:
                from mpvg.downstream.segmentation import predict_label

                label = predict_label(model, batch[0][:1], batch[1].shape[1:], crop, crop * 2 // 3)
                assert label.shape == (1, crop, crop) and label.dtype == torch.int64
                outs[name] = label
    total = {k: sum(v.values()) for k, v in losses.items()}
    print(f"{task}: bf16 - fp32 loss sum {total['bf16'] / total['fp32'] - 1:+.3%}")  # pytest -s
    assert close(total["bf16"], total["fp32"]), (task, losses)
    if task == "segment":  # the same prediction nearly everywhere
        agree = (outs["bf16"] == outs["fp32"]).float().mean().item()
        assert agree > 0.95, agree


def test_deform_attn_samples_in_float32_under_bf16_autocast():
    """A bf16 grid has 8 bits: on a 256-pixel-wide level it snaps locations to ~1/2 pixel."""
    from mpvg.downstream.deform_attn import ms_deform_attn

    h, w = 2, 256
    ramp = torch.arange(w, dtype=torch.float32).repeat(h)           # value at pixel x is x
    value = ramp.view(1, h * w, 1, 1).to(torch.bfloat16)             # integers < 256: exact in bf16
    xs = torch.tensor([200.0, 200.25, 200.5, 200.75])
    loc = torch.stack([(xs + 0.5) / w, torch.full_like(xs, 0.5)], -1).view(1, 4, 1, 1, 1, 2)
    weights = torch.ones(1, 4, 1, 1, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ms_deform_attn(value, [(h, w)], loc, weights)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.view(4), xs, atol=1e-3, rtol=0)


# ------------------------------------------------------------------------------ torch.compile
@pytest.mark.parametrize("backend", [
    "aot_eager",  # Dynamo's graph capture + AOTAutograd's forward/backward graphs, without code generation
    pytest.param("inductor", marks=pytest.mark.slow),  # what --compile uses; ~45 s of C++ builds on this CPU
])
def test_compiled_train_step_matches_eager(tiny_params, backend):
    """torch.compile of a DeiT-Ti MPVG training step (the engine's train_step): the same losses and updates."""
    spec = resolve_run(tiny_params, "in1k-deit_ti-mpvg")
    torch.manual_seed(0)
    eager = perturbed(build_model(spec))
    compiled_model = copy.deepcopy(eager)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    y = torch.arange(4)
    crit = torch.nn.CrossEntropyLoss()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    # SGD: an update proportional to the gradient, so equal weights after it mean equal gradients
    # (Adam's m / sqrt(v) blows a 1e-9 gradient difference up to a full lr step)
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.1)
    opt_c = torch.optim.SGD(compiled_model.parameters(), lr=0.1)
    compiled = torch.compile(compiled_model, backend=backend)
    t0 = time.perf_counter()
    lc = [float(train_step(compiled.train(), x, y, crit, opt_c, scaler).detach()) for _ in range(2)]
    elapsed = time.perf_counter() - t0
    le = [float(train_step(eager.train(), x, y, crit, opt_e, scaler).detach()) for _ in range(2)]
    assert lc == pytest.approx(le, rel=1e-4, abs=1e-5)  # step 2 runs on the compiled step's update
    for (name, pc), pe in zip(compiled_model.named_parameters(), eager.parameters()):  # the same updates
        torch.testing.assert_close(pc, pe, rtol=1e-4, atol=1e-5, msg=name)
    print(f"torch.compile({backend}) + 2 steps: {elapsed:.1f} s")
