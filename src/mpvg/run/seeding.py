"""Seeding and sampling, shared by both loops: data order is a function of ``(seed, epoch)`` only
(:class:`EpochSampler`), every sample's augmentation of ``(seed, epoch, position in the epoch)``
(:class:`SeededSamples`), whatever the number of workers or processes, and the main process's
generators are reseeded from ``(seed, epoch, rank, step)`` at each epoch start (:func:`seed_epoch`),
or continue the states a checkpoint saved."""
from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from mpvg.run.checkpoint import set_rng_state


def derive_seed(*parts: int) -> int:
    """A 32-bit seed that is a fixed function of integers (``seed, epoch, rank, ...``)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def seed_everything(seed: int, cuda: bool = True) -> None:
    """Seed python, numpy and torch (CPU, and every CUDA device unless ``cuda=False``)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    if cuda:
        torch.manual_seed(seed)
    else:
        torch.default_generator.manual_seed(seed)


class EpochSampler(Sampler):
    """Training order as a function of ``(seed, epoch)``.

    The epoch's order is a permutation of the dataset (each index repeated ``repeats`` times
    in a row for DeiT's repeated augmentation, cut back to the dataset length), truncated to
    whole global batches. Rank ``r`` of ``w`` takes positions ``r, r + w, ...``, so the ranks'
    ``k``-th local batches together are exactly the ``k``-th global batch. Yields
    ``(index, sample_seed)`` pairs for :class:`SeededSamples`; ``start_step`` skips the
    global batches already trained in a resumed epoch.
    """

    def __init__(self, length: int, global_batch: int, seed: int, rank: int = 0, world_size: int = 1,
                 repeats: int = 1):
        if global_batch % world_size:
            raise ValueError(f"batch_size {global_batch} (global) is not divisible by the world size {world_size}")
        if length < global_batch:
            raise ValueError(f"the training set has {length} samples, fewer than one batch of {global_batch}")
        self.length, self.global_batch, self.seed = length, global_batch, seed
        self.rank, self.world_size, self.repeats = rank, world_size, repeats
        self.steps_per_epoch = length // global_batch
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def __iter__(self):
        gen = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
        order = torch.randperm(self.length, generator=gen)
        if self.repeats > 1:
            order = order.repeat_interleave(self.repeats)[: self.length]
        order = order.tolist()
        base = derive_seed(self.seed, self.epoch, 1)
        end = self.steps_per_epoch * self.global_batch
        for pos in range(self.start_step * self.global_batch + self.rank, end, self.world_size):
            yield order[pos], (base + pos) % 2**32

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.global_batch // self.world_size


class SeededSamples(Dataset):
    """Wraps a dataset so item ``(index, sample_seed)`` is transformed with the python, numpy
    and torch generators seeded by ``sample_seed`` (restored afterwards in the main process)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item):
        index, seed = item
        in_main = torch.utils.data.get_worker_info() is None
        saved = (random.getstate(), np.random.get_state(), torch.get_rng_state()) if in_main else None
        seed_everything(seed, cuda=False)  # never touch the CUDA streams of dropout / drop-path
        try:
            return self.dataset[index]
        finally:
            if saved:
                random.setstate(saved[0])
                np.random.set_state(saved[1])
                torch.set_rng_state(saved[2])


def seed_epoch(seed: int, epoch: int, rank: int, step: int, saved: dict | None = None) -> None:
    """The main process's generators at the start of (the rest of) an epoch: the states a
    mid-epoch checkpoint saved when resuming inside the epoch, else seeded by ``(seed, epoch,
    rank, step)``."""
    if saved is not None:
        set_rng_state(saved)
    else:
        seed_everything(derive_seed(seed, epoch, rank, step))


def train_loader(dataset: Dataset, global_batch: int, seed: int, dist, workers: int, repeats: int = 1,
                 collate=None) -> tuple[EpochSampler, DataLoader]:
    """The training sampler and loader of one process (``global_batch / world_size`` per step).

    The loader gets a private generator: creating its iterator must not draw from the global
    torch RNG."""
    from mpvg.data.classification import build_train_loader

    sampler = EpochSampler(len(dataset), global_batch, seed, dist.rank, dist.world_size, repeats=repeats)
    loader = build_train_loader(SeededSamples(dataset), sampler, global_batch // dist.world_size, workers,
                                dist.device.type == "cuda", collate)
    return sampler, loader
