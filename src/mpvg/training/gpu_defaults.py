"""The fastest correct settings of a training job on its device, each with a switch, chosen once and
logged in one line.

* autocast: bf16 on CUDA when the recipe says ``amp`` (:func:`mpvg.training.engine.resolve_amp`);
* AdamW ``fused=True`` on CUDA (one kernel for the whole update instead of the ``foreach`` form);
* ``torch.compile`` on CUDA for the families ``make gpu-check`` found correct (first losses within
  5% of eager) and faster, falling back to eager, with a message, when compilation fails;
* pinned host memory and ``non_blocking`` copies on CUDA, persistent loader workers.

:func:`compile_with_fallback` keeps one compiled step from costing a run: the first compiled step
runs with the random-number states saved; if compiling raises, the states are put back and the
same step runs eager, so the run continues exactly as an eager run from there.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Mapping

import torch

log = logging.getLogger("mpvg.training")

SWITCHES = ("auto", "on", "off")


@dataclasses.dataclass(frozen=True)
class FastPath:
    """What a job runs with (see the module docstring); ``why`` says how compile was decided."""

    amp: str
    fused_adamw: bool
    compile: bool
    pin_memory: bool
    persistent_workers: bool
    why: str

    def describe(self) -> str:
        return (f"fast path: amp {self.amp}, AdamW {'fused' if self.fused_adamw else 'foreach'}, "
                f"compile {'on' if self.compile else 'off'} ({self.why}), "
                f"pinned non-blocking copies {'on' if self.pin_memory else 'off'}, "
                f"persistent workers {'on' if self.persistent_workers else 'off'}")


def _switch(name: str, value: str) -> str:
    if value not in SWITCHES:
        raise ValueError(f"{name} {value!r}: expected one of {list(SWITCHES)}")
    return value


def choose(device: torch.device, amp_dtype, optimizer: str, workers: int, compile: str = "auto",
           fused: str = "auto", compile_verdict: bool | None = None) -> FastPath:
    """The settings for a job on ``device``. ``compile``/``fused``: ``auto`` (the default for the
    device), ``on`` or ``off``. ``compile_verdict``: gpu_check's ``use_compile`` for the model's family
    (None: not measured; ``auto`` then stays eager, since nothing showed compile correct there)."""
    cuda = device.type == "cuda"
    compile, fused = _switch("--compile", compile), _switch("--fused", fused)
    if fused == "on" and not (cuda and optimizer == "adamw"):
        raise ValueError("--fused on needs AdamW on CUDA")
    if compile == "on":
        use_compile, why = True, "asked"
    elif compile == "off":
        use_compile, why = False, "asked"
    elif not cuda:
        use_compile, why = False, "auto: CPU"
    elif compile_verdict is None:
        use_compile, why = False, "auto: gpu_check has not measured this family"
    else:
        use_compile = bool(compile_verdict)
        why = f"auto: gpu_check found it {'correct and faster' if use_compile else 'incorrect or slower'}"
    use_fused = fused == "on" or (fused == "auto" and cuda and optimizer == "adamw")
    amp = {None: "none", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype]
    return FastPath(amp=amp, fused_adamw=use_fused, compile=use_compile, pin_memory=cuda,
                    persistent_workers=workers > 0, why=why)


def compile_verdict(speeds: Mapping | None, family: str) -> bool | None:
    """gpu_check's verdict for ``family`` from a measured-speeds record (``speeds.json``), or None."""
    value = ((speeds or {}).get("compile") or {}).get(family)
    return None if value is None else bool(value)


def _rng_states(device: torch.device):
    cuda = device.type == "cuda" and torch.cuda.is_available()
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if cuda else None


def _set_rng_states(device: torch.device, states) -> None:
    torch.set_rng_state(states[0])
    if states[1] is not None:
        torch.cuda.set_rng_state(states[1], device)


def compile_with_fallback(model: torch.nn.Module, step: Callable, device: torch.device, what: str,
                          backend: str = "inductor", announce: Callable[[str], None] | None = None) -> Callable:
    """``run(images, targets) -> loss``: ``step(model_or_compiled, images, targets)`` with
    ``torch.compile(model)``; when the first compiled step raises, one message (``announce``, default
    the log) and every step from that one runs eager. The first step runs with the RNG states saved,
    so the eager retry draws what an eager run would have drawn."""
    announce = announce or log.warning
    state = {"model": torch.compile(model, backend=backend), "first": True}

    def run(images, targets):
        if not state["first"]:
            return step(state["model"], images, targets)
        saved = _rng_states(device)
        try:
            loss = step(state["model"], images, targets)
        except Exception as exc:  # noqa: BLE001 - any compile failure: eager is always correct
            _set_rng_states(device, saved)
            announce(f"torch.compile failed for {what} ({type(exc).__name__}: {' '.join(str(exc).split())[:300]}); "
                     "falling back to eager for this run")
            state["model"] = model
            loss = step(model, images, targets)
        state["first"] = False
        return loss

    run.compiled = lambda: state["model"] is not model
    return run
