"""The fast path's choices and torch.compile with an eager fallback (mpvg.training.gpu_defaults),
on CPU: the compiled step (aot_eager: Dynamo + AOTAutograd) agrees with eager; a compiler that
fails leaves one message and a run identical to an eager one."""
from __future__ import annotations

import copy

import pytest
import torch

from mpvg.training import gpu_defaults
from mpvg.training.engine import train_step

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


def test_choices_per_device_and_switches():
    cpu = gpu_defaults.choose(CPU, None, "adamw", 0)
    assert (cpu.fused_adamw, cpu.compile, cpu.pin_memory, cpu.persistent_workers) == (False, False, False, False)
    assert cpu.describe() == ("fast path: amp none, AdamW foreach, compile off (auto: CPU), "
                              "pinned non-blocking copies off, persistent workers off")
    gpu = gpu_defaults.choose(CUDA, torch.bfloat16, "adamw", 11, compile_verdict=True)
    assert (gpu.amp, gpu.fused_adamw, gpu.compile, gpu.pin_memory, gpu.persistent_workers) == ("bf16", True, True,
                                                                                               True, True)
    assert "compile on (auto: gpu_check found it correct and faster)" in gpu.describe()
    assert not gpu_defaults.choose(CUDA, torch.bfloat16, "adamw", 4, compile_verdict=False).compile
    unmeasured = gpu_defaults.choose(CUDA, torch.bfloat16, "adamw", 4)
    assert not unmeasured.compile and "gpu_check has not measured this family" in unmeasured.why
    assert gpu_defaults.choose(CUDA, None, "adamw", 4, compile="on", fused="off").describe().startswith(
        "fast path: amp none, AdamW foreach, compile on (asked)")
    assert not gpu_defaults.choose(CUDA, None, "sgd", 4).fused_adamw  # fused is AdamW's
    with pytest.raises(ValueError, match="--fused on needs AdamW on CUDA"):
        gpu_defaults.choose(CPU, None, "adamw", 0, fused="on")
    with pytest.raises(ValueError, match="--compile 'yes'"):
        gpu_defaults.choose(CPU, None, "adamw", 0, compile="yes")
    assert gpu_defaults.compile_verdict({"compile": {"DeiT-Ti": True}}, "DeiT-Ti") is True
    assert gpu_defaults.compile_verdict({"compile": {"DeiT-Ti": True}}, "Swin-Ti") is None


def _tiny_vit():
    import timm

    import mpvg.models  # noqa: F401

    torch.manual_seed(0)  # dropout on: the fallback must keep the random streams
    return timm.create_model("mpvg_deit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2,
                             num_heads=2, num_classes=5, pe_method="mpvg", drop_rate=0.1, drop_path_rate=0.1)


def _run(model, runner_for, steps=2):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    criterion = torch.nn.CrossEntropyLoss()

    def step(m, x, y):
        return train_step(m, x, y, criterion, opt, scaler)

    run = runner_for(model, step)
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(7)
    losses = []
    for _ in range(steps):
        x, y = torch.randn(4, 3, 32, 32, generator=gen), torch.randint(0, 5, (4,), generator=gen)
        losses.append(float(run(x, y).detach()))
    return losses, model.state_dict(), run


def eager_runner(model, step):
    return lambda x, y: step(model, x, y)


@pytest.mark.slow  # ~10 s; tests/test_bf16_paths.py compiles train_step with aot_eager in the default suite
def test_compiled_step_agrees_with_eager_aot_eager():
    base = _tiny_vit()
    eager_losses, eager_state, _ = _run(copy.deepcopy(base), eager_runner)
    compiled_losses, compiled_state, run = _run(copy.deepcopy(base), lambda m, s: gpu_defaults.compile_with_fallback(
        m, s, CPU, "tiny DeiT-Ti", backend="aot_eager"))
    assert run.compiled()
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4)
    for key, value in eager_state.items():
        torch.testing.assert_close(compiled_state[key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_a_failing_compiler_falls_back_to_eager_with_one_message():
    def broken_backend(gm, example_inputs):
        raise RuntimeError("no kernels for this GPU")

    messages = []
    base = _tiny_vit()
    eager_losses, eager_state, _ = _run(copy.deepcopy(base), eager_runner)
    losses, state, run = _run(copy.deepcopy(base), lambda m, s: gpu_defaults.compile_with_fallback(
        m, s, CPU, "cell in1k-deit_ti-mpvg", backend=broken_backend, announce=messages.append))
    assert not run.compiled() and len(messages) == 1
    assert messages[0].startswith("torch.compile failed for cell in1k-deit_ti-mpvg (")
    assert "no kernels for this GPU" in messages[0] and messages[0].endswith("falling back to eager for this run")
    assert losses == eager_losses  # bit for bit: the failed attempt drew no random numbers that count
    for key, value in eager_state.items():
        assert torch.equal(state[key], value), key
