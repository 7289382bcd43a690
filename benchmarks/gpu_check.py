#!/usr/bin/env python
"""GPU acceptance run: every GPU code path of the project once, timed, in one command (``make gpu-check``).

Run it first thing on a new cluster, on one GPU (about 6-8 minutes on an H100-class GPU):

    python benchmarks/gpu_check.py --out bench_out/gpu_check          # -> gpu_check.json, gpu_check.md
    python benchmarks/gpu_check.py --smoke                            # the same code, small, on CPU (< 1 min)

Sections (``--only`` / ``--skip`` pick some):

models       every model family (DeiT-Ti/S/B, Swin-Ti, CeiT-Ti, T2T-ViT-7, ViT-Lite) x Default/PVG/MPVG:
             one bf16 training step of the engine (``mpvg.training.engine.train_step``, AdamW with the
             recipe's parameter groups) at the paper's per-GPU batch (recipe batch / planned GPUs),
             built as a real run builds it (``engine.build_model`` of the cell); images/s (median of
             interleaved rounds), FLOPs of one step (``torch.utils.flop_counter``), MFU against the
             GPU's dense bf16 peak, peak memory, PVG/Default and MPVG/Default. timm's own
             ``deit_tiny_patch16_224`` and ``swin_tiny_patch4_window7_224`` (pretrained=False, the
             same kwargs) run in the same interleaved loop: ours/timm (goal >= 1.0).
step         one optimizer step of the engine against timm's own train.py step (benchmarks/bench_step.py:
             DeiT-Ti, Swin-Ti; same model, recipe, batch, bf16), interleaved: ours/timm (goal >= 1.0). Needs
             timm's train.py at .fetched/timm_train.py (reported SKIPPED otherwise).
compile      torch.compile of every family's MPVG step (in the plan's order, within the section's budget):
             compile time (first step), speed-up over eager, first losses within 5%; ``use_compile``.
nccl         ``torchrun --nproc-per-node 1``: a process group with the engine's own arguments
             (NCCL bound to the GPU), a DDP step as the engine wraps it, then the real ``engine.train``
             for one epoch on generated JPEGs (its all-reduces, barriers and broadcasts go over NCCL).
downstream   Mask R-CNN (COCO, crop 1024) and UperNet (ADE20K, crop 512) training steps on the
             ViT-Adapter-Ti at the per-GPU batch, with the engine's model and AdamW groups: it/s, memory.
deform_attn  multi-scale deformable attention at the COCO injector's shapes, forward and backward
             under bf16 autocast against fp32: max relative error of the output and the gradients.
loader       the input pipeline (DeiT recipe, generated 500x375 JPEGs) with N workers: images/s,
             against the planned and the measured DeiT-Ti GPU speed.

Each section has a time budget (``SECTION_BUDGET_S``, 8 minutes in all): one that runs out starts no
new family and says which it left out. Writes ``speeds.json`` too: the images/s per model and method
and the GPU's name, which ``mpvg workflow plan/cost`` and the SLURM runtimes use with
``--set paths.measured_speeds=bench_out/gpu_check/speeds.json`` (docs/performance.md).

Exits 1 when any section fails (an exception, a non-finite loss, an error over its tolerance);
goals (ours/timm >= 1.0, the loader keeping up) are reported, not enforced. ``--smoke`` runs every
section at the tiny scale of params.yaml on CPU (gloo instead of NCCL, torch.compile's Dynamo capture
with the ``eager`` backend: tests/test_bf16_paths.py compiles a step with aot_eager and inductor); it is
part of the default test suite (tests/test_gpu_check.py).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

SECTIONS = ("models", "step", "compile", "nccl", "downstream", "deform_attn", "loader")
# Seconds each section may start new work in (a family, a model); with the fixed costs of the rest, the whole
# run stays under 8 minutes on one GPU. A section out of budget reports what it left out.
SECTION_BUDGET_S = {"models": 120, "step": 45, "compile": 210, "nccl": 40, "downstream": 30, "deform_attn": 10,
                    "loader": 25}
SMOKE_BUDGET_S = {"compile": 20}  # the default test suite's share: the first families (DeiT-Ti at least)
SPEEDS_FILE = "speeds.json"  # what mpvg.workflow.plan reads (paths.measured_speeds)
FAMILIES = ("DeiT-Ti", "DeiT-S", "DeiT-B", "Swin-Ti", "CeiT-Ti", "T2T-ViT-7", "ViT-Lite")
METHODS = ("Default", "PVG", "MPVG")
TIMM_REFERENCE = {"DeiT-Ti": "deit_tiny_patch16_224", "Swin-Ti": "swin_tiny_patch4_window7_224"}
# Dense bf16 tensor-core peaks (TFLOP/s, vendor data sheets, without sparsity); --peak-tflops overrides.
PEAK_BF16_TFLOPS = (("H200", 989.4), ("H100 PCIe", 756.0), ("H100", 989.4), ("A100", 312.0), ("L40S", 362.1),
                    ("L4", 121.0), ("A10", 125.0))
# Deformable attention, bf16 autocast vs fp32: ||bf16 - fp32|| / ||fp32|| allowed per tensor. bf16 rounds
# to 2^-8 = 0.4%; the output and the value-path gradients see a few roundings (3%). Gradients with
# respect to the sampling positions (query, offsets) are derivatives of bilinear interpolation, piecewise
# constant in the position: a location that bf16's rounding of the offsets (a bf16 Linear, as in
# ViT-Adapter's AMP) moves across a pixel edge changes its gradient wholly, so they get 25%. A bf16 sampling
# grid (the bug fixed in deform_attn.py) gave 8.3% on the output and 39% on the offsets at the 1024 crop.
DEFORM_TOLERANCE = {"output": 0.03, "grad_input": 0.03, "grad_value_proj_w": 0.03, "grad_query": 0.25,
                    "grad_offsets_w": 0.25}


class CheckFailed(RuntimeError):
    """A section ran but its result is wrong (non-finite, over tolerance)."""


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tf for key, tf in PEAK_BF16_TFLOPS if key in name), None)


def params_for(smoke: bool, extra=()) -> dict:
    from mpvg.config import load_params

    return load_params(REPO / "params.yaml", ["scale=tiny" if smoke else "scale=paper", *extra])


def cell_of(params: dict, model: str, method: str):
    """The from-scratch classification cell of (model, method) without a variant."""
    from mpvg.config import expand_cells

    for cell in expand_cells(params).values():
        if cell.stage == "train" and cell.model == model and cell.method == method and cell.id.count("-") == 2:
            return cell
    raise KeyError(f"no train cell for {model} {method} in params.yaml's grid")


def per_gpu_batch(params: dict, cell, smoke: bool) -> int:
    from mpvg.workflow.plan import gpus_for

    if smoke:
        return 4
    return int(params["recipes"][cell.recipe]["batch_size"]) // gpus_for(cell)


class Mem:
    """Peak memory a block adds on the device (CUDA; None elsewhere)."""

    def __init__(self, device: torch.device):
        self.device, self.base, self.peak_gib = device, 0, None

    def __enter__(self):
        if self.device.type == "cuda":
            sync(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            sync(self.device)
            self.peak_gib = (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**30


def step_fn(model, recipe: dict, device: torch.device, amp_dtype, clip_grad=None, wrapped=None):
    """``step(x, y) -> loss``: the engine's train step with the engine's AdamW groups (of the plain
    ``model``; ``wrapped``, a torch.compile or DDP wrapper of it, runs the step)."""
    import timm.optim

    from mpvg.training.engine import param_groups, train_step

    opt = timm.optim.create_optimizer_v2(param_groups(model, recipe), opt="adamw", lr=1e-4,
                                         weight_decay=recipe["weight_decay"])
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    criterion = torch.nn.CrossEntropyLoss()
    run = (model if wrapped is None else wrapped).train()
    losses = []

    def step(x, y):
        loss = train_step(run, x, y, criterion, opt, scaler, amp_dtype, clip_grad)
        losses.append(loss.detach())
        return loss

    step.losses = losses
    return step


def count_flops(fn, *args) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn(*args)
    return int(counter.get_total_flops())


def time_interleaved(steps: dict, x, y, cfg, device) -> dict[str, float]:
    """Median images/s of each ``step(x, y)`` over interleaved rounds (bench_models' timer)."""
    from bench_models import time_variants

    ns = SimpleNamespace(warmup=cfg.warmup, timer="wall", rounds=cfg.rounds, iters=cfg.iters)
    return {k: v[0] for k, v in time_variants(steps, x, y, ns, device).items()}


def check_finite(losses, what: str) -> float:
    values = torch.stack([v.float() for v in losses]).cpu()
    if not torch.isfinite(values).all():
        raise CheckFailed(f"{what}: non-finite loss {values.tolist()}")
    return float(values[-1])


# --------------------------------------------------------------------------- sections
def section_models(cfg) -> dict:
    import timm

    from mpvg.training.engine import build_model, resolve_amp

    device, params = cfg.device, params_for(cfg.smoke)
    amp = resolve_amp("bf16", {}, device)
    peak = peak_tflops(device, cfg.peak_tflops)
    rows, refs, skipped, start = [], [], [], time.perf_counter()
    for family in cfg.families:
        if time.perf_counter() - start > cfg.budget["models"]:
            skipped.append(family)
            continue
        cells = {m: cell_of(params, family, m) for m in METHODS}
        spec = _spec(params, cells["Default"])
        batch, size, classes = per_gpu_batch(params, cells["Default"], cfg.smoke), spec.recipe["img_size"], spec.num_classes
        x = torch.randn(batch, 3, size, size, device=device)
        y = torch.randint(0, classes, (batch,), device=device)
        steps, info = {}, {}
        variants = {m: (lambda m=m: build_model(_spec(params, cells[m]))) for m in METHODS}
        if family in TIMM_REFERENCE:
            kw = {k: v for k, v in spec.model_kwargs.items() if k not in ("pe_method", "pe_overrides")}
            variants["timm"] = lambda kw=kw: timm.create_model(TIMM_REFERENCE[family], pretrained=False, **kw)
        for name, build in variants.items():
            torch.manual_seed(0)
            with Mem(device) as mem:
                model = build().to(device)
                step = step_fn(model, spec.recipe, device, amp)
                flops = count_flops(step, x, y)
                for _ in range(cfg.warmup):
                    step(x, y)
            steps[name] = step
            info[name] = {"flops_per_step": flops, "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
                          "peak_memory_gib": None if mem.peak_gib is None else round(mem.peak_gib, 2)}
        rates = time_interleaved(steps, x, y, cfg, device)
        for name, rate in rates.items():
            check_finite(steps[name].losses, f"{family} {name}")
            flops = info[name]["flops_per_step"]
            mfu = flops * rate / batch / (peak * 1e12) if peak else None
            row = {"model": family, "variant": name, "batch": batch, "img_size": size, "images_per_s": round(rate, 1),
                   "gflop_per_step": round(flops / 1e9, 3), "mfu": None if mfu is None else round(mfu, 4),
                   "ratio_to_default": round(rate / rates["Default"], 3), **info[name],
                   "last_loss": round(float(steps[name].losses[-1]), 4)}
            (refs if name == "timm" else rows).append(row)
        del steps
        _free(device)
    vs_timm = [{"model": r["model"], "timm_model": TIMM_REFERENCE[r["model"]], "timm_images_per_s": r["images_per_s"],
                "ours_default_over_timm": round(1 / r["ratio_to_default"], 3),
                "ours_mpvg_over_timm": round(next(o["images_per_s"] for o in rows if o["model"] == r["model"]
                                                  and o["variant"] == "MPVG") / r["images_per_s"], 3),
                "goal_met": 1 / r["ratio_to_default"] >= 1.0} for r in refs]
    out = {"rows": rows, "vs_timm": vs_timm, "peak_tflops": peak, "amp": str(amp)}
    if skipped:
        out["skipped"] = f"section budget {cfg.budget['models']} s spent before {skipped}"
    return out


def section_compile(cfg) -> dict:
    """torch.compile of every family's MPVG training step against eager (same weights and batch):
    first losses within 5%, compile time, speed-up. Families are compiled in the plan's order until
    the section's budget is spent; ``use_compile`` is what the training default should be for it
    (compiled correctly and faster)."""
    from mpvg.training.engine import build_model

    device, params = cfg.device, params_for(cfg.smoke)
    rows, failed, start = [], [], time.perf_counter()
    for family in cfg.families:
        if time.perf_counter() - start > cfg.budget["compile"]:
            rows.append({"model": family, "variant": "MPVG", "backend": cfg.compile_backend,
                         "skipped": f"section budget {cfg.budget['compile']} s spent"})
            continue
        cell = cell_of(params, family, "MPVG")
        spec = _spec(params, cell)
        batch, size = per_gpu_batch(params, cell, cfg.smoke), spec.recipe["img_size"]
        x = torch.randn(batch, 3, size, size, device=device)
        y = torch.randint(0, spec.num_classes, (batch,), device=device)
        torch.manual_seed(0)
        eager_model = build_model(spec).to(device)
        compiled_model = copy.deepcopy(eager_model)
        eager = step_fn(eager_model, spec.recipe, device, torch.bfloat16)
        row = {"model": family, "variant": "MPVG", "backend": cfg.compile_backend, "batch": batch}
        try:
            compiled = step_fn(compiled_model, spec.recipe, device, torch.bfloat16,
                               wrapped=torch.compile(compiled_model, backend=cfg.compile_backend))
            eager(x, y)
            sync(device)
            t0 = time.perf_counter()
            compiled(x, y)
            sync(device)
            first = time.perf_counter() - t0
        except Exception as exc:  # noqa: BLE001 - a family that does not compile is reported, the rest go on
            rows.append({**row, "error": f"{type(exc).__name__}: {exc}"[:500], "use_compile": False})
            failed.append(family)
            continue
        e0, c0 = check_finite(eager.losses[:1], f"{family} eager"), check_finite(compiled.losses[:1], f"{family} compiled")
        agree = abs(c0 - e0) <= 0.05 * abs(e0)  # same weights and batch; drop-path draws differ (philox vs eager)
        rates = time_interleaved({"eager": eager, "compiled": compiled}, x, y, cfg, device)
        check_finite(compiled.losses, f"{family} compiled")
        speedup = rates["compiled"] / rates["eager"]
        rows.append({**row, "compile_s": round(first, 2), "eager_images_per_s": round(rates["eager"], 1),
                     "compiled_images_per_s": round(rates["compiled"], 1), "speedup": round(speedup, 3),
                     "first_loss_eager": round(e0, 4), "first_loss_compiled": round(c0, 4),
                     "losses_agree": agree, "use_compile": agree and speedup > 1.0})
        if not agree:
            failed.append(family)
        del eager, compiled, eager_model, compiled_model
        _free(device)
    if failed:
        raise CheckFailed(f"torch.compile failed or disagreed with eager for {failed}: {rows}")
    return {"rows": rows}


def section_step(cfg) -> dict:
    """One optimizer step of the engine against timm's own train.py step (benchmarks/bench_step.py),
    DeiT-Ti and Swin-Ti, same model, recipe, batch and precision (bf16), interleaved."""
    import bench_step

    try:
        timm_train = bench_step.load_timm_train()
    except FileNotFoundError as err:
        return {"rows": [], "skipped": str(err)}
    rows = []
    for family in [f for f in ("DeiT-Ti", "Swin-Ti") if f in cfg.families]:
        params = params_for(cfg.smoke)
        batch = per_gpu_batch(params, cell_of(params, family, "MPVG"), cfg.smoke)
        rows.append(bench_step.compare(family, cfg.device, "bf16", batch, steps=cfg.iters, rounds=cfg.rounds,
                                       warmup=cfg.warmup, timm_train=timm_train,
                                       scale="tiny" if cfg.smoke else "paper"))
        _free(cfg.device)
    return {"rows": rows}


def speeds_record(report: dict) -> dict | None:
    """The measured images/s per model and method (models: the engine's bf16 step; downstream: the
    recipe's precision) for ``mpvg.workflow.plan`` (``paths.measured_speeds``), with the GPU's name."""
    from mpvg.workflow import plan

    sec = report["sections"]
    table: dict[str, dict[str, float]] = {}
    for r in sec.get("models", {}).get("rows", []):
        table.setdefault(r["model"], {})[r["variant"]] = r["images_per_s"]
    seen = set()
    for r in sec.get("downstream", {}).get("rows", []):  # the first row of a task is the recipe's precision
        task = {"detect": "coco", "segment": "ade20k"}[r["task"]]
        if task not in seen:
            seen.add(task)
            table[task] = {"MPVG": r["images_per_s"]}  # the MPVG cell's model; the methods' backbones cost alike
    if not table:
        return None
    env = report["environment"]
    return {"format": plan.SPEEDS_FORMAT, "gpu": env["device_name"], "smoke": report["smoke"],
            "commit": env["git_commit"], "torch": env["torch"], "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "measured": "models: engine.train_step, bf16 autocast, eager, the paper's per-GPU batch; downstream: "
                        "the loop body at the recipe's precision, batch 2",
            "images_per_s_per_gpu": table,
            "compile": {r["model"]: r.get("use_compile", False) for r in sec.get("compile", {}).get("rows", [])}}


def _nccl_overrides(root: Path, cfg) -> list[str]:
    batch, workers = (8, 0) if cfg.smoke else (256, max(1, min(8, (os.cpu_count() or 2) - 1)))  # 2 steps of 512
    out = ["scale=paper", f"datasets.imagenet.root={root}", "datasets.imagenet.num_classes=4",
           f"recipes.deit.batch_size={batch}", "recipes.deit.epochs=1", "recipes.deit.warmup_epochs=0",
           f"recipes.deit.workers={workers}"]
    if cfg.smoke:
        out += ["models.DeiT-Ti.arch={embed_dim: 48, num_heads: 3, patch_size: 8}", "recipes.deit.img_size=32"]
    return out


def section_nccl(cfg) -> dict:
    root, _ = shared_jpegs(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "child.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", __file__,
               "--nccl-child", str(result), "--nccl-root", str(root), "--device", cfg.device.type]
        if cfg.smoke:
            cmd.append("--smoke")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp)
        if proc.returncode != 0 or not result.is_file():
            raise CheckFailed(f"torchrun child exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        row = json.loads(result.read_text())
    want = "nccl" if cfg.device.type == "cuda" else "gloo"
    if row["backend"] != want:
        raise CheckFailed(f"process group backend {row['backend']!r}, expected {want!r}")
    return {"rows": [row]}


def nccl_child(result: Path, root: Path, device_name: str, smoke: bool) -> int:
    """Inside ``torchrun --nproc-per-node 1``: the engine's process group, a DDP step, engine.train."""
    import torch.distributed as dist

    from mpvg.config import resolve_run
    from mpvg.run import distributed
    from mpvg.training.engine import RunOptions, build_model, resolve_amp, train

    cfg = SimpleNamespace(smoke=smoke)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dev = distributed.resolve_device(device_name, int(os.environ.get("LOCAL_RANK", 0)))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    kwargs = distributed.group_kwargs(dev, rank, world)
    dist.init_process_group(**kwargs)  # what distributed.setup() does for world_size > 1
    params = params_for(False, _nccl_overrides(root, cfg))
    spec = resolve_run(params, "in1k-deit_ti-mpvg")
    amp = resolve_amp("auto", spec.recipe, dev)
    torch.manual_seed(0)
    model = build_model(spec).to(dev)
    ddp = torch.nn.parallel.DistributedDataParallel(  # as engine._train wraps it
        model, device_ids=[dev.index] if dev.type == "cuda" else None, broadcast_buffers=False)
    step = step_fn(model, spec.recipe, dev, amp, wrapped=ddp)
    size, batch = spec.recipe["img_size"], spec.recipe["batch_size"] // world
    x = torch.randn(batch, 3, size, size).pin_memory() if dev.type == "cuda" else torch.randn(batch, 3, size, size)
    y = torch.randint(0, spec.num_classes, (batch,))
    for _ in range(3):
        step(x.to(dev, non_blocking=True), y.to(dev, non_blocking=True))
    ddp_loss = check_finite(step.losses, "DDP step")
    probe = distributed.all_reduce(torch.ones(1, device=dev))
    t0 = time.perf_counter()
    out = train(spec, RunOptions(out_dir=Path.cwd() / "run", device=device_name, amp="auto", quiet=True,
                                   eval_every=0, log_interval=5))  # the group is already up: collectives use it
    wall = time.perf_counter() - t0
    hist = out["history"][0]
    if not math.isfinite(hist["train_loss"]):
        raise CheckFailed(f"engine.train: train loss {hist['train_loss']}")
    row = {"backend": kwargs["backend"], "device_id": str(kwargs.get("device_id")), "world_size": world,
           "amp": str(amp), "ddp_last_loss": round(ddp_loss, 4), "all_reduce_ok": float(probe) == world,
           "engine_images_per_s": round(hist["images_per_s"], 1), "engine_train_loss": round(hist["train_loss"], 4),
           "engine_top1": round(out["metrics"]["top1"], 2), "engine_wall_s": round(wall, 1),
           "batch": batch, "workers": spec.recipe["workers"], "img_size": size}
    if not row["all_reduce_ok"]:
        raise CheckFailed(f"all_reduce of ones over {world} process(es) gave {float(probe)}")
    result.write_text(json.dumps(row))
    return 0


def section_downstream(cfg) -> dict:
    from bench_downstream import median_step_s, synthetic_batch

    from mpvg.config import resolve_run
    from mpvg.downstream.engine import _adapter_of, build_task_model, param_groups
    from mpvg.training.engine import resolve_amp

    device, params = cfg.device, params_for(cfg.smoke)
    rows = []
    for task, cell_id in (("detect", "coco-deit_ti-mpvg"), ("segment", "ade20k-deit_ti-mpvg")):
        spec = resolve_run(params, cell_id)
        recipe = spec.recipe
        precisions = {"recipe": resolve_amp("auto", recipe, device), "bf16": torch.bfloat16}
        for label, amp in precisions.items():
            if label == "bf16" and precisions["recipe"] == torch.bfloat16:
                continue
            torch.manual_seed(0)
            batch = 2  # per GPU: Tables 8/9's global 8 over the plan's 4 GPUs (BatchNorm needs 2)
            crop = int(recipe["crop_size"])
            with Mem(device) as mem:
                model = build_task_model(spec, task, spec.num_classes, None, 32 if cfg.smoke else 224).to(device).train()
                groups = param_groups(model, recipe, _adapter_of(model).depth)
                opt = torch.optim.AdamW(groups, lr=1e-4, weight_decay=float(recipe["weight_decay"]))
                data = synthetic_batch(task, batch, crop, spec.num_classes, device, torch.Generator().manual_seed(0))
                losses = []

                def step():  # the body of downstream.engine._train's loop
                    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                        parts = model(*data)
                    loss = sum(parts.values())
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    losses.append(loss.detach())

                med = median_step_s(step, cfg.warmup, cfg.iters, device)
            check_finite(losses, f"{task} {label}")
            rows.append({"task": task, "model": "Mask R-CNN" if task == "detect" else "UperNet", "precision": str(amp),
                         "crop": crop, "batch": batch, "iters_per_s": round(1 / med, 3),
                         "images_per_s": round(batch / med, 2),
                         "peak_memory_gib": None if mem.peak_gib is None else round(mem.peak_gib, 2),
                         "last_loss": round(float(losses[-1]), 4)})
            del model, opt
            _free(device)
    return {"rows": rows}


def section_deform_attn(cfg) -> dict:
    from mpvg.downstream.deform_attn import MSDeformAttn

    device = cfg.device
    crop = 128 if cfg.smoke else 1024
    shapes = [(crop // 8, crop // 8), (crop // 16, crop // 16), (crop // 32, crop // 32)]  # SPM c2, c3, c4
    lq = (crop // 16) ** 2  # the ViT tokens query (injector)
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)  # the projections' Xavier init
    attn = MSDeformAttn(d_model=192, n_levels=3, n_heads=6, n_points=4).to(device)
    with torch.no_grad():  # offsets and weights that depend on the query, as after training
        attn.sampling_offsets.weight.copy_(torch.randn(attn.sampling_offsets.weight.shape, generator=g) * 0.05)
        attn.attention_weights.weight.copy_(torch.randn(attn.attention_weights.weight.shape, generator=g) * 0.05)
    q = torch.randn(2, lq, 192, generator=g).to(device)
    feat = torch.randn(2, sum(h * w for h, w in shapes), 192, generator=g).to(device)
    ref = torch.rand(2, lq, 1, 2, generator=g).to(device).expand(-1, -1, 3, -1)
    upstream = torch.randn(2, lq, 192, generator=g).to(device)

    def run(amp_dtype):
        qq, ff = q.clone().requires_grad_(), feat.clone().requires_grad_()
        attn.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = attn(qq, ref, ff, shapes)
        (out.float() * upstream).sum().backward()
        return {"output": out.detach().float(), "grad_query": qq.grad.float(), "grad_input": ff.grad.float(),
                "grad_offsets_w": attn.sampling_offsets.weight.grad.float(),
                "grad_value_proj_w": attn.value_proj.weight.grad.float()}, out.dtype

    ref32, _ = run(None)
    low, out_dtype = run(torch.bfloat16)
    errors, max_errors = {}, {}
    for k, r in ref32.items():
        if not torch.isfinite(low[k]).all():
            raise CheckFailed(f"deformable attention bf16 {k}: non-finite values")
        errors[k] = float((low[k] - r).norm() / r.norm().clamp_min(1e-12))
        max_errors[k] = float((low[k] - r).abs().max() / r.abs().max().clamp_min(1e-12))
    row = {"crop": crop, "levels": [list(s) for s in shapes], "queries": lq, "bf16_output_dtype": str(out_dtype),
           **{f"rel_err_{k}": round(v, 5) for k, v in errors.items()},
           **{f"max_rel_err_{k}": round(v, 5) for k, v in max_errors.items()}, "tolerance": DEFORM_TOLERANCE}
    over = {k: v for k, v in errors.items() if v > DEFORM_TOLERANCE[k]}
    if over:
        raise CheckFailed(f"deformable attention bf16 vs fp32: relative errors {over} over the tolerances "
                          f"{DEFORM_TOLERANCE} ({row})")
    return {"rows": [row]}


def section_loader(cfg, measured: dict) -> dict:
    from bench_data import deit_recipe, ours_loader, time_pass

    from mpvg.workflow import plan

    workers = cfg.workers if cfg.workers is not None else (
        1 if cfg.smoke else max(1, min((os.cpu_count() or 2) - 1, plan.CPUS_PER_GPU - plan.MAIN_PROCESS_CPUS)))
    batch, repeat = (8, 2) if cfg.smoke else (256, 4)
    root, kb = shared_jpegs(cfg)
    loader = ours_loader(root, deit_recipe(), batch, workers, repeat=repeat, device=str(cfg.device))  # as training
    time_pass(loader, max_batches=1)  # start the workers
    res = time_pass(loader)
    rate = res["images"] / res["wall_s"]
    deit = next((r["images_per_s"] for r in measured.get("models", {}).get("rows", [])
                 if r["model"] == "DeiT-Ti" and r["variant"] == "MPVG"), None)
    return {"rows": [{"workers": workers, "images": res["images"], "jpeg_kb": round(kb, 1), "batch": batch,
                      "images_per_s": round(rate, 1), "images_per_s_per_worker": round(rate / workers, 1),
                      "planned_deit_ti_gpu_images_per_s": plan.IMAGES_PER_S_PER_GPU["DeiT-Ti"],
                      "measured_deit_ti_gpu_images_per_s": deit,
                      "keeps_up_with_plan": rate >= plan.IMAGES_PER_S_PER_GPU["DeiT-Ti"],
                      "keeps_up_with_measured": None if deit is None else rate >= deit}]}


def shared_jpegs(cfg) -> tuple[Path, float]:
    """One folder of generated JPEGs (train + a small val split) for the nccl and loader sections."""
    from bench_data import write_jpegs

    if getattr(cfg, "jpegs", None) is None:
        cfg.jpeg_dir = tempfile.TemporaryDirectory()
        root = Path(cfg.jpeg_dir.name)
        n, size = (24, (160, 120)) if cfg.smoke else (512, (500, 375))
        kb = write_jpegs(root, n, size, classes=4)
        write_jpegs(root, 8 if cfg.smoke else 64, size, classes=4, seed=1, splits=("val",))
        cfg.jpegs = (root, kb)
    return cfg.jpegs


def _spec(params, cell):
    from mpvg.config import resolve_run

    return resolve_run(params, cell.id)


def _free(device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- report
def environment(device: torch.device) -> dict:
    import timm

    from mpvg import runinfo

    env = {"torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version(),
           "device": str(device), "cpu_count": os.cpu_count(), "git_commit": runinfo.git_commit(),
           "threads": torch.get_num_threads()}
    if device.type == "cuda":
        env.update(device_name=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                   memory_gib=round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1),
                   nccl=".".join(map(str, torch.cuda.nccl.version())))
    else:
        env["device_name"] = platform.processor() or platform.machine()
    return env


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    if not rows:
        return "(no rows)\n"
    cols = columns or list(rows[0])
    fmt = lambda v: "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


MODEL_COLUMNS = ["model", "variant", "batch", "images_per_s", "ratio_to_default", "gflop_per_step", "mfu",
                 "peak_memory_gib", "params_m", "last_loss"]


def render(report: dict) -> str:
    env = report["environment"]
    out = [f"# gpu_check ({'smoke, ' if report['smoke'] else ''}{env['device_name']}, {env['device']})", "",
           f"torch {env['torch']}, timm {env['timm']}, commit {env['git_commit']}; total {report['total_s']:.0f} s; "
           f"status **{'FAILED' if report['failed'] else 'ok'}**", ""]
    for name, sec in report["sections"].items():
        out.append(f"## {name} ({sec['seconds']:.1f} s{', FAILED' if 'error' in sec else ''})\n")
        if "error" in sec:
            out.append("```\n" + sec["error"].strip()[-2000:] + "\n```\n")
            continue
        if sec.get("skipped"):
            out.append(f"SKIPPED: {sec['skipped']}\n")
        out.append(markdown_table(sec["rows"], MODEL_COLUMNS if name == "models" else None))
        if sec.get("vs_timm"):
            out.append("\nours (engine step, same loop) / timm:\n\n" + markdown_table(sec["vs_timm"]))
    return "\n".join(out)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny scale on CPU: the same code in seconds")
    ap.add_argument("--device", default=None, help="cuda (default) or cpu; --smoke: cpu")
    ap.add_argument("--out", type=Path, default=REPO / "bench_out" / "gpu_check", help="folder for gpu_check.json/.md")
    ap.add_argument("--only", nargs="+", choices=SECTIONS, default=None)
    ap.add_argument("--skip", nargs="+", choices=SECTIONS, default=[])
    ap.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    ap.add_argument("--iters", type=int, default=None, help="timed steps per round (default 10; smoke 1)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds, median counts (default 3; smoke 1)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; smoke 1)")
    ap.add_argument("--workers", type=int, default=None, help="loader workers (default: CPUs - 1, at most the plan's)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak for MFU (default: by GPU name)")
    ap.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; smoke eager)")
    ap.add_argument("--nccl-child", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--nccl-root", type=Path, default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.nccl_child:
        return nccl_child(args.nccl_child, args.nccl_root, args.device or "cuda", args.smoke)
    device = torch.device(args.device or ("cpu" if args.smoke else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible (torch.cuda.is_available() is False); run it on a GPU node, "
              "or use --smoke for the CPU version", file=sys.stderr)
        return 2
    if args.smoke:
        torch.set_num_threads(1)
    small = args.smoke
    cfg = SimpleNamespace(smoke=small, device=device, families=args.families, workers=args.workers,
                          iters=args.iters or (1 if small else 10), rounds=args.rounds or (1 if small else 3),
                          warmup=args.warmup if args.warmup is not None else (1 if small else 3),
                          peak_tflops=args.peak_tflops,
                          compile_backend=args.compile_backend or ("eager" if small else "inductor"),
                          budget={**SECTION_BUDGET_S, **(SMOKE_BUDGET_S if small else {})})
    wanted = [s for s in (args.only or SECTIONS) if s not in args.skip]
    report = {"smoke": small, "environment": environment(device), "sections": {}, "failed": []}
    start = time.perf_counter()
    for name in wanted:
        t0 = time.perf_counter()
        print(f"gpu_check: {name} ...", file=sys.stderr, flush=True)
        try:
            fn = globals()[f"section_{name}"]
            sec = fn(cfg, report["sections"]) if name == "loader" else fn(cfg)
        except Exception as exc:  # noqa: BLE001 - every failure is reported, then the exit code says so
            sec = {"error": f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"}
            report["failed"].append(name)
        sec["seconds"] = round(time.perf_counter() - t0, 1)
        report["sections"][name] = sec
        print(f"gpu_check: {name} {'FAILED' if 'error' in sec else 'ok'} in {sec['seconds']:.1f} s", file=sys.stderr,
              flush=True)
        _free(device)
    report["total_s"] = round(time.perf_counter() - start, 1)
    if getattr(cfg, "jpeg_dir", None) is not None:
        cfg.jpeg_dir.cleanup()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    speeds = speeds_record(report)
    if speeds is not None:
        (args.out / SPEEDS_FILE).write_text(json.dumps(speeds, indent=2))
        print(f"gpu_check: measured speeds in {args.out / SPEEDS_FILE}; the plan uses them with "
              f"--set paths.measured_speeds={args.out / SPEEDS_FILE}", file=sys.stderr)
    text = render(report)
    (args.out / "gpu_check.md").write_text(text)
    print(text)
    skipped = [name for name, sec in report["sections"].items() if sec.get("skipped")]
    if skipped:
        print(f"gpu_check: SKIPPED {skipped}: " + "; ".join(report["sections"][n]["skipped"] for n in skipped),
              file=sys.stderr)
    print(f"gpu_check: wrote {args.out / 'gpu_check.json'} and gpu_check.md; "
          f"{'FAILED: ' + ', '.join(report['failed']) if report['failed'] else 'all sections ok'}", file=sys.stderr)
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
