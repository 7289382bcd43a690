"""The CUDA-only branches, as far as they run without a GPU: device ids, NCCL init arguments,
pinned memory, the autocast choice. torch.cuda is faked where a branch only asks it questions;
what needs a real GPU (the NCCL communicator, pinned copies with non_blocking, DDP on a device)
runs in benchmarks/gpu_check.py (its nccl section)."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from mpvg.run import distributed
from mpvg.training.engine import eval_loader, resolve_amp

RANK_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_STEP_NUM_TASKS", "SLURM_PROCID",
             "SLURM_LOCALID", "SLURM_JOB_ID")


@pytest.fixture
def fake_gpus(monkeypatch):
    """torch sees ``n`` GPUs; set_device and init_process_group are recorded, not run."""
    monkeypatch.setattr(os, "environ", dict(os.environ))  # _env_ranks may write MASTER_*: keep it local
    for key in RANK_VARS:
        monkeypatch.delenv(key, raising=False)
    calls = {"set_device": [], "init": []}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls["set_device"].append(torch.device(d)))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: calls["init"].append(kw))
    return calls


def test_torchrun_on_gpus_binds_each_rank_to_its_local_gpu_and_starts_nccl_there(fake_gpus, monkeypatch):
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "8")
    info = distributed.setup("auto")
    assert info.device == torch.device("cuda", 1) and fake_gpus["set_device"] == [torch.device("cuda", 1)]
    assert fake_gpus["init"] == [{"backend": "nccl", "init_method": "env://", "rank": 5, "world_size": 8,
                                  "device_id": torch.device("cuda", 1)}]
    assert (info.rank, info.local_rank, info.world_size, info.backend, info.distributed) == (5, 1, 8, "nccl", True)


def test_local_rank_wraps_around_the_visible_gpus(fake_gpus, monkeypatch):
    # srun with 8 tasks on a node whose job sees 4 GPUs: local id 6 -> cuda:2
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "8")
    monkeypatch.setenv("SLURM_PROCID", "6")
    monkeypatch.setenv("SLURM_LOCALID", "6")
    info = distributed.setup("cuda")
    assert info.device == torch.device("cuda", 2) and fake_gpus["init"][0]["device_id"] == torch.device("cuda", 2)
    assert fake_gpus["init"][0]["rank"] == 6 and os.environ["MASTER_PORT"] == "29500"


def test_one_gpu_process_starts_no_group(fake_gpus):
    info = distributed.setup("cuda")
    assert info.device == torch.device("cuda", 0) and fake_gpus["set_device"] == [torch.device("cuda", 0)]
    assert fake_gpus["init"] == [] and info.backend is None and not info.distributed


def test_group_arguments_cpu_and_a_missing_gpu(monkeypatch):
    assert distributed.group_kwargs(torch.device("cpu"), 1, 2) == {"backend": "gloo", "init_method": "env://",
                                                                   "rank": 1, "world_size": 2}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="--device cuda was asked for, but torch sees no CUDA device"):
        distributed.resolve_device("cuda")
    assert distributed.resolve_device("auto") == torch.device("cpu")


def test_autocast_choice_per_device():
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert resolve_amp("auto", {"amp": True}, cuda) is torch.bfloat16   # the paper recipes on a GPU
    assert resolve_amp("auto", {"amp": False}, cuda) is None            # coco_maskrcnn: amp false
    assert resolve_amp("auto", {"amp": True}, cpu) is None
    assert resolve_amp("fp16", {}, cuda) is torch.float16
    with pytest.raises(ValueError, match="fp16 needs CUDA"):
        resolve_amp("fp16", {}, cpu)


def test_loaders_pin_memory_exactly_on_cuda(monkeypatch):
    from mpvg.data.classification import ShardSampler, build_train_loader

    data = [(torch.zeros(3), 0)] * 8
    on_gpu = distributed.DistInfo(device=torch.device("cuda", 0))
    assert eval_loader(data, 4, on_gpu, 0).pin_memory is True
    assert eval_loader(data, 4, distributed.DistInfo(), 0).pin_memory is False
    sampler = ShardSampler(8, 1, 0)
    assert build_train_loader(data, sampler, 4, 2, pin_memory=True).pin_memory is True  # the engine: on CUDA
    assert build_train_loader(data, sampler, 4, 2, pin_memory=True).persistent_workers is True
    assert build_train_loader(data, sampler, 4, 0, pin_memory=False).pin_memory is False
