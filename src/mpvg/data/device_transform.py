"""The batch-wise end of the training input pipeline, run on the training device.

The loader's workers stop at uint8 (``HWC`` arrays, collated to an ``(N, H, W, C)`` uint8
batch: a quarter of float32's bytes through shared memory, pinning and the host-to-device copy).
:class:`DeviceTransform` then does on the device what timm's ``PrefetchLoader`` does there
(timm train.py's default path): ``(x - 255 * mean) / (255 * std)`` in float32, and random erasing
with timm's ``RandomErasing`` semantics (probability per image, area 2%-1/3 split over the
count, log-uniform aspect 0.3-3.3, ten attempts per box, ``const``/``rand``/``pixel`` fill).

Unlike timm's (python ``random`` and the device's global generator), every draw comes from
generators seeded by ``(seed, epoch, step, rank)`` (:func:`batch_seed`): the batch at a given
step of a given epoch is erased the same way whether the run was interrupted and resumed or
not, whatever else consumed random numbers in between. Box geometry is drawn on the CPU (no
device synchronisation), fill values on the device.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import torch

# timm's RandomErasing defaults (DeiT, Swin, CeiT and T2T use them unchanged)
ERASE_MIN_AREA, ERASE_MAX_AREA, ERASE_MIN_ASPECT, ERASE_ATTEMPTS = 0.02, 1 / 3, 0.3, 10


def batch_seed(seed: int, epoch: int, step: int, rank: int) -> int:
    """A 63-bit seed that is a fixed function of ``(seed, epoch, step, rank)``."""
    state = np.random.SeedSequence([int(seed), int(epoch), int(step), int(rank), 0x6D707667]).generate_state(2)
    return int(state[0]) << 31 ^ int(state[1])


class ToUint8HWC:
    """The last per-image step of a uint8 pipeline: a PIL image as a contiguous ``HWC`` uint8
    array (one copy; the default collate stacks these into ``(N, H, W, C)``)."""

    def __call__(self, img) -> np.ndarray:
        return np.array(img.convert("RGB") if img.mode != "RGB" else img, dtype=np.uint8)  # writable: the collate makes it a tensor

    def __repr__(self) -> str:
        return "ToUint8HWC()"


class DeviceTransform:
    """uint8 ``(N, H, W, C)`` (or ``(N, C, H, W)``) batch -> normalised, erased float32 ``NCHW``
    on ``device``.

    ``reprob``/``remode``/``recount``: timm's ``re_prob``/``re_mode``/``re_count``. Call as
    ``transform(images, seed=, epoch=, step=, rank=)``; the same arguments give the same
    output bit for bit on the same device.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: torch.device | str = "cpu",
                 reprob: float = 0.0, remode: str = "pixel", recount: int = 1):
        self.device = torch.device(device)
        self.mean = torch.tensor([255.0 * m for m in mean], device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor([255.0 * s for s in std], device=self.device).view(1, -1, 1, 1)
        remode = (remode or "const").lower()
        if remode not in ("const", "rand", "pixel"):
            raise ValueError(f"remode {remode!r}: expected const, rand or pixel (timm's re_mode)")
        if not 0.0 <= float(reprob) <= 1.0:
            raise ValueError(f"reprob {reprob}: expected a probability in [0, 1]")
        if int(recount) < 1:
            raise ValueError(f"recount {recount}: expected at least 1")
        self.reprob, self.remode, self.recount = float(reprob), remode, int(recount)

    @classmethod
    def from_recipe(cls, recipe: Mapping, device: torch.device | str, train: bool = True) -> "DeviceTransform":
        """The recipe's normalisation, and its random erasing for training batches."""
        erase = train and recipe.get("transform", "timm") == "timm"
        return cls(recipe["mean"], recipe["std"], device, reprob=recipe.get("reprob", 0.0) if erase else 0.0,
                   remode=recipe.get("remode", "pixel"), recount=recipe.get("recount", 1))

    # ---------------------------------------------------------------- the batch
    def __call__(self, images: torch.Tensor, seed: int = 0, epoch: int = 0, step: int = 0, rank: int = 0) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise TypeError(f"DeviceTransform takes uint8 batches, got {images.dtype}")
        if images.ndim != 4:
            raise ValueError(f"DeviceTransform takes (N, H, W, C) or (N, C, H, W) batches, got {tuple(images.shape)}")
        images = images.to(self.device, non_blocking=True)
        if images.shape[-1] == self.mean.shape[1] and images.shape[1] != self.mean.shape[1]:
            images = images.permute(0, 3, 1, 2)  # NHWC -> NCHW (a view)
        x = images.contiguous().float()  # uint8 reordering first: the cheapest way to a contiguous float NCHW
        x.sub_(self.mean).div_(self.std)  # timm PrefetchLoader's arithmetic, bit for bit
        if self.reprob > 0:
            self.erase_(x, batch_seed(seed, epoch, step, rank))
        return x

    def boxes(self, n: int, height: int, width: int, gen: torch.Generator) -> list[tuple[int, int, int, int, int]]:
        """The erased boxes ``(image, top, left, h, w)`` of a batch of ``n``, drawn from ``gen`` (CPU).

        Per image, as timm's ``RandomErasing._erase``: erase with probability ``reprob``; a count
        uniform in ``[1, recount]``; per box, up to ten attempts of (area uniform in
        [2%, 1/3] of the image / count, aspect log-uniform in [0.3, 1/0.3]) until it fits, then a
        uniform position. All draws are made for every image (fixed shapes), so the draws of one
        image never shift another's.
        """
        c, a = self.recount, ERASE_ATTEMPTS
        apply = torch.rand(n, generator=gen, dtype=torch.float64) < self.reprob
        count = torch.randint(1, c + 1, (n,), generator=gen)
        area = torch.rand((n, c, a), generator=gen, dtype=torch.float64)
        log_aspect = torch.rand((n, c, a), generator=gen, dtype=torch.float64)
        pos = torch.rand((n, c, 2), generator=gen, dtype=torch.float64)
        lo, hi = math.log(ERASE_MIN_ASPECT), math.log(1 / ERASE_MIN_ASPECT)
        target = (ERASE_MIN_AREA + area * (ERASE_MAX_AREA - ERASE_MIN_AREA)) * (height * width) / count[:, None, None]
        aspect = torch.exp(lo + log_aspect * (hi - lo))
        h = torch.round(torch.sqrt(target * aspect)).long()
        w = torch.round(torch.sqrt(target / aspect)).long()
        fits = (h < height) & (w < width)
        out = []
        for i in apply.nonzero().flatten().tolist():
            for b in range(int(count[i])):
                ok = fits[i, b].nonzero()
                if not len(ok):
                    continue
                j = int(ok[0])
                bh, bw = int(h[i, b, j]), int(w[i, b, j])
                top = min(int(pos[i, b, 0] * (height - bh + 1)), height - bh)
                left = min(int(pos[i, b, 1] * (width - bw + 1)), width - bw)
                out.append((i, top, left, bh, bw))
        return out

    def erase_(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        """Random erasing of the normalised batch ``x`` in place, every draw from ``seed``."""
        n, chans, height, width = x.shape
        gen = torch.Generator().manual_seed(seed)
        boxes = self.boxes(n, height, width, gen)
        if not boxes:
            return x
        fill_gen = torch.Generator(device=x.device).manual_seed(seed ^ 0x5EED)
        for i, top, left, bh, bw in boxes:
            region = x[i, :, top:top + bh, left:left + bw]
            if self.remode == "pixel":
                region.copy_(torch.randn((chans, bh, bw), generator=fill_gen, device=x.device, dtype=x.dtype))
            elif self.remode == "rand":
                region.copy_(torch.randn((chans, 1, 1), generator=fill_gen, device=x.device, dtype=x.dtype)
                             .expand_as(region))
            else:
                region.zero_()
        return x

    def __repr__(self) -> str:
        return (f"DeviceTransform(device={self.device}, reprob={self.reprob}, remode={self.remode!r}, "
                f"recount={self.recount})")
