"""Process-group setup for one process, ``torchrun`` and ``srun``.

* one process: nothing to set up (``world_size == 1``);
* ``torchrun --nproc-per-node=G [--nnodes=N --rdzv-endpoint=HOST:PORT] -m mpvg train ...``:
  ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` come from
  torchrun and the group starts with ``init_method="env://"``;
* ``srun --nodes=K --ntasks-per-node=G --gpus-per-task=1 mpvg train ...`` (one task per GPU over
  K nodes, what the plan runs for a job larger than a node; no torchrun): ``SLURM_PROCID``,
  ``SLURM_LOCALID`` and ``SLURM_STEP_NUM_TASKS`` give the ranks; the rendezvous is on the node srun
  was started from, the batch node, which is the allocation's first node: ``MASTER_ADDR`` is
  ``SLURM_LAUNCH_NODE_IPADDR`` (the address SLURM itself reports for it, unless the job exported
  one) and ``MASTER_PORT`` defaults to ``29500 + SLURM_JOB_ID % 1000`` (the same after a requeue).

Each process says where it runs (its rank, node, ``CUDA_VISIBLE_DEVICES`` and device) on stderr,
which the job log keeps: how to check the placement of a job.

The backend is NCCL on CUDA and gloo on CPU.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_ranks() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's or SLURM's environment."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"])
    if int(env.get("SLURM_STEP_NUM_TASKS", "1")) > 1 and "SLURM_PROCID" in env:  # inside `srun`
        env.setdefault("MASTER_ADDR", env.get("SLURM_LAUNCH_NODE_IPADDR", "127.0.0.1"))
        env.setdefault("MASTER_PORT", str(29500 + int(env.get("SLURM_JOB_ID", "0")) % 1000))
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_STEP_NUM_TASKS"])
        env["RANK"], env["WORLD_SIZE"] = str(rank), str(world)
        return rank, int(env.get("SLURM_LOCALID", 0)), world
    return 0, 0, 1


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for, but torch sees no CUDA device on this host "
                             f"({os.uname().nodename}); use --device cpu or auto, or run it on a GPU node")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if name == "cpu":
        return torch.device("cpu")
    raise ValueError(f"unknown device {name!r}; expected auto, cpu or cuda")


def setup(device: str = "auto") -> DistInfo:
    """Start the process group if the environment asks for several processes."""
    rank, local_rank, world_size = _env_ranks()
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    env = os.environ
    if "OMP_NUM_THREADS" not in env and env.get("SLURM_CPUS_PER_TASK") and "SLURM_PROCID" in env and world_size > 1:
        torch.set_num_threads(int(env["SLURM_CPUS_PER_TASK"]))  # an srun task: its own CPUs, not the node's
    where = f", rendezvous {env.get('MASTER_ADDR')}:{env.get('MASTER_PORT')}" if world_size > 1 else ""
    print(f"mpvg: process rank {rank} of {world_size} (local rank {local_rank}) on node "
          f"{env.get('SLURMD_NODENAME') or os.uname().nodename}, CUDA_VISIBLE_DEVICES="
          f"{env.get('CUDA_VISIBLE_DEVICES', '(unset)')}, device {dev}{where}", file=sys.stderr, flush=True)
    if world_size == 1:
        return DistInfo(device=dev)
    kwargs = group_kwargs(dev, rank, world_size)
    if not dist.is_initialized():
        dist.init_process_group(**kwargs)
    return DistInfo(rank, local_rank, world_size, dev, kwargs["backend"])


def group_kwargs(dev: torch.device, rank: int, world_size: int) -> dict:
    """``init_process_group`` arguments: NCCL bound to this process's GPU (``device_id``, so the
    communicator is created eagerly on the right device) on CUDA, gloo on CPU."""
    kwargs = {"backend": "nccl" if dev.type == "cuda" else "gloo", "init_method": "env://", "rank": rank,
              "world_size": world_size}
    if dev.type == "cuda":
        kwargs["device_id"] = dev
    return kwargs


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (``sum`` or ``max``); a no-op in one process."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """rank ``src``'s ``obj`` on every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def sync_buffers(model: torch.nn.Module, src: int = 0) -> None:
    """Rank ``src``'s buffers (BatchNorm statistics) on every rank; a no-op in one process.

    Each rank updates its running statistics from its own batches; before an evaluation (sharded
    over the ranks) and a checkpoint (rank 0's state) every rank takes rank 0's, so the numbers a
    run reports are those of the model it saves, and a resumed run starts every rank from the
    buffers the uninterrupted one had."""
    if dist.is_available() and dist.is_initialized():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=src)
