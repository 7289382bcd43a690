"""ADE20K (SceneParsing, ADEChallengeData2016) for UperNet, its augmentation, and tiny data.

On disk (the official ``ADEChallengeData2016.zip``, unpacked)::

    <root>/images/training/ADE_train_00000001.jpg      <root>/annotations/training/ADE_train_00000001.png
    <root>/images/validation/ADE_val_00000001.jpg      <root>/annotations/validation/ADE_val_00000001.png

Annotations are 8-bit PNGs: 0 = "other" (not evaluated), 1..150 = the classes.  As in
MMSegmentation (``reduce_zero_label=True``) 0 becomes the ignore index 255 and 1..150
become 0..149.

Transforms follow MMSegmentation's ADE20K pipeline (``configs/_base_/datasets/ade20k.py``):
training = random rescale (ratio 0.5-2.0 of 2048x512, keep ratio), random 512 crop in which
no class covers more than 75 %, flip 0.5, photometric distortion, normalise, pad to 512
(label pad 255); testing = rescale to 2048x512 (keep ratio), then to a multiple of 32.
Images are uint8 until normalisation, as with MMCV.
"""
from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from mpvg.data import ADE20K_DIRS, ade20k_pairs, check_dataset
from mpvg.data.integrity import bad_image, decode_errors

SPLIT_DIRS = ADE20K_DIRS
MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)


class ADE20KDataset(Dataset):
    """One split as ``(image, label, meta)``: after ``transform`` (default: none) the image is
    uint8 ``(3, H, W)`` and the label int64 ``(H, W)`` with 255 = ignore; ``meta`` has the
    file stem and the label's original size.  An image without its label PNG fails when the
    dataset is built; an unreadable file, a label that is not single-channel or not the image's
    size fails when read, naming the file."""

    def __init__(self, root: str | Path, split: str = "train", transform: Optional[Callable] = None,
                 reduce_zero_label: bool = True):
        check_dataset("ade20k", root, split)
        root = Path(root)
        sub = SPLIT_DIRS[split]
        self.img_dir, self.ann_dir = root / "images" / sub, root / "annotations" / sub
        self.stems, self.images, self.labels = ade20k_pairs(root, split)
        self.transform = transform
        self.reduce_zero_label = reduce_zero_label

    def __len__(self) -> int:
        return len(self.stems)

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        with decode_errors(self.images[index]), open(self.images[index], "rb") as f:
            img = torch.from_numpy(np.asarray(Image.open(f).convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)
        with decode_errors(self.labels[index]), open(self.labels[index], "rb") as f:
            lab = np.asarray(Image.open(f), dtype=np.uint8)
        if lab.ndim != 2:
            raise bad_image(self.labels[index], f"expected a single-channel label PNG, got shape {lab.shape}")
        if lab.shape != tuple(img.shape[1:]):
            raise bad_image(self.labels[index], f"label is {lab.shape[1]}x{lab.shape[0]} but its image "
                            f"{self.images[index]} is {img.shape[2]}x{img.shape[1]}")
        lab = torch.from_numpy(lab.astype(np.int64))
        if self.reduce_zero_label:
            lab = torch.where(lab == 0, torch.full_like(lab, 255), lab - 1)
        return img, lab

    def __getitem__(self, index: int):
        img, lab = self.load(index)
        meta = {"stem": self.stems[index], "ori_size": tuple(lab.shape)}
        if self.transform is not None:
            img, lab = self.transform(img, lab)
        return img, lab, meta


def collate_segmentation(batch):
    images, labels, metas = zip(*batch)
    return torch.stack(images), torch.stack(labels), list(metas)


# --------------------------------------------------------------------------------------
# Transforms (MMSegmentation semantics)
# --------------------------------------------------------------------------------------
def rescale_size(h: int, w: int, scale: Sequence[float]) -> tuple[int, int]:
    """MMCV keep-ratio rescale into ``scale = (long, short)`` limits, rounded like MMCV."""
    long_edge, short_edge = max(scale), min(scale)
    f = min(long_edge / max(h, w), short_edge / min(h, w))
    return int(h * f + 0.5), int(w * f + 0.5)


def resize_image(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 bilinear resize (OpenCV ``INTER_LINEAR`` arithmetic, rounded back to uint8)."""
    if tuple(img.shape[-2:]) == tuple(size):
        return img
    out = F.interpolate(img[None].float(), size=size, mode="bilinear", align_corners=False)[0]
    return out.round_().clamp_(0, 255).to(torch.uint8)


def resize_label(lab: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(lab.shape[-2:]) == tuple(size):
        return lab
    return F.interpolate(lab[None, None].float(), size=size, mode="nearest")[0, 0].long()


def normalize(img: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    return (img.float() - mean) / std


class PhotoMetricDistortion:
    """MMSegmentation's ``PhotoMetricDistortion``: each with p=0.5, brightness +-32, contrast
    x[0.5, 1.5] (before or after the HSV part), saturation x[0.5, 1.5], hue +-18 (OpenCV's
    0-180 hue units); every step clips to uint8.  HSV via PIL (OpenCV's conversion rounds
    slightly differently)."""

    def __init__(self, brightness_delta: int = 32, contrast_range=(0.5, 1.5), saturation_range=(0.5, 1.5),
                 hue_delta: int = 18, rng=random):
        self.brightness_delta, self.contrast_range = brightness_delta, contrast_range
        self.saturation_range, self.hue_delta = saturation_range, hue_delta
        self.rng = rng

    @staticmethod
    def _convert(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
        return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        rng = self.rng
        x = img.permute(1, 2, 0).numpy()
        if rng.randint(0, 1):
            x = self._convert(x, beta=rng.uniform(-self.brightness_delta, self.brightness_delta))
        contrast_first = rng.randint(0, 1) == 1
        if contrast_first and rng.randint(0, 1):
            x = self._convert(x, alpha=rng.uniform(*self.contrast_range))
        sat = rng.uniform(*self.saturation_range) if rng.randint(0, 1) else None
        hue = rng.randint(-self.hue_delta, self.hue_delta) if rng.randint(0, 1) else None
        if sat is not None or hue is not None:
            hsv = np.asarray(Image.fromarray(x).convert("HSV")).copy()
            if sat is not None:
                hsv[..., 1] = self._convert(hsv[..., 1], alpha=sat)
            if hue is not None:  # OpenCV hue is 0..179; PIL's is 0..255
                hsv[..., 0] = ((hsv[..., 0].astype(np.int64) + round(hue * 256 / 180)) % 256).astype(np.uint8)
            x = np.asarray(Image.fromarray(hsv, mode="HSV").convert("RGB"))
        if not contrast_first and rng.randint(0, 1):
            x = self._convert(x, alpha=rng.uniform(*self.contrast_range))
        return torch.from_numpy(np.array(x, dtype=np.uint8)).permute(2, 0, 1)


class SegTrainTransform:
    """Random rescale, cat-max-ratio crop, flip, photometric distortion, normalise, pad."""

    def __init__(self, img_scale: Sequence[int] = (2048, 512), ratio_range: Sequence[float] = (0.5, 2.0),
                 crop_size: int = 512, cat_max_ratio: float = 0.75, flip_prob: float = 0.5,
                 photometric: bool = True, seed: Optional[int] = None):
        self.img_scale, self.ratio_range = tuple(img_scale), tuple(ratio_range)
        self.crop_size, self.cat_max_ratio, self.flip_prob = int(crop_size), cat_max_ratio, flip_prob
        self.rng = random.Random(seed) if seed is not None else random  # DataLoader seeds `random` per worker
        self.photometric = PhotoMetricDistortion(rng=self.rng) if photometric else None

    def _crop_box(self, h: int, w: int) -> tuple[int, int, int, int]:
        cs = self.crop_size
        top = self.rng.randint(0, max(h - cs, 0))
        left = self.rng.randint(0, max(w - cs, 0))
        return top, min(top + cs, h), left, min(left + cs, w)

    def __call__(self, img: torch.Tensor, lab: torch.Tensor):
        rng = self.rng
        ratio = rng.uniform(*self.ratio_range)
        h, w = img.shape[-2:]
        size = rescale_size(h, w, (int(self.img_scale[0] * ratio), int(self.img_scale[1] * ratio)))
        img, lab = resize_image(img, size), resize_label(lab, size)
        box = self._crop_box(*size)
        if self.cat_max_ratio < 1.0:
            for _ in range(10):
                crop = lab[box[0]:box[1], box[2]:box[3]]
                _, cnt = torch.unique(crop[crop != 255], return_counts=True)
                if len(cnt) > 1 and cnt.max().item() / cnt.sum().item() < self.cat_max_ratio:
                    break
                box = self._crop_box(*size)
        img, lab = img[:, box[0]:box[1], box[2]:box[3]], lab[box[0]:box[1], box[2]:box[3]]
        if rng.random() < self.flip_prob:
            img, lab = img.flip(-1), lab.flip(-1)
        if self.photometric is not None:
            img = self.photometric(img)
        img = normalize(img)
        ph, pw = self.crop_size - img.shape[-2], self.crop_size - img.shape[-1]
        if ph > 0 or pw > 0:
            img = F.pad(img, (0, max(pw, 0), 0, max(ph, 0)), value=0.0)
            lab = F.pad(lab, (0, max(pw, 0), 0, max(ph, 0)), value=255)
        return img.contiguous(), lab.contiguous()


class SegTestTransform:
    """Keep-ratio rescale into ``img_scale`` and up to a multiple of ``size_divisor``; the
    label keeps its original size (predictions are resized back to it)."""

    def __init__(self, img_scale: Sequence[int] = (2048, 512), size_divisor: int = 32):
        self.img_scale, self.size_divisor = tuple(img_scale), size_divisor

    def __call__(self, img: torch.Tensor, lab: torch.Tensor):
        h, w = img.shape[-2:]
        nh, nw = rescale_size(h, w, self.img_scale)
        d = self.size_divisor
        nh, nw = math.ceil(nh / d) * d, math.ceil(nw / d) * d
        return normalize(resize_image(img, (nh, nw))), lab


# --------------------------------------------------------------------------------------
# Tiny dataset in the real layout
# --------------------------------------------------------------------------------------
TINY_CLASSES = {1: (120, 120, 120), 3: (80, 50, 50), 5: (4, 200, 3), 13: (150, 5, 61), 21: (204, 70, 3)}


def _tiny_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    from PIL import ImageDraw

    h, w = int(rng.choice([80, 96, 112])), int(rng.choice([96, 128, 144]))
    label = Image.new("L", (w, h), 1)  # "wall" everywhere
    draw = ImageDraw.Draw(label)
    horizon = int(rng.integers(h // 3, 2 * h // 3))
    draw.rectangle([0, horizon, w, h], fill=3)  # "floor"
    for _ in range(int(rng.integers(1, 4))):
        cls = int(rng.choice([5, 13, 21]))
        x0, y0 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
        x1, y1 = x0 + int(rng.integers(12, 40)), y0 + int(rng.integers(12, 40))
        (draw.ellipse if cls == 13 else draw.rectangle)([x0, y0, x1, y1], fill=cls)
    draw.rectangle([0, 0, w - 1, 2], fill=0)  # an unlabelled strip ("other")
    lab = np.asarray(label, dtype=np.uint8)
    img = np.zeros((h, w, 3), dtype=np.float32)
    for cls, color in TINY_CLASSES.items():
        img[lab == cls] = color
    img[lab == 0] = (250, 250, 250)
    img += rng.normal(0, 10, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), lab


def make_tiny(root: Path, seed: int = 0) -> None:
    """Write a tiny ADEChallengeData2016-format dataset (synthetic scenes of ADE20K labels:
    wall, floor, tree, person, painting, plus unlabelled 0) under ``root``."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    for split, prefix, n in (("train", "ADE_train", 12), ("val", "ADE_val", 6)):
        sub = SPLIT_DIRS[split]
        (root / "images" / sub).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / sub).mkdir(parents=True, exist_ok=True)
        for i in range(1, n + 1):
            img, lab = _tiny_pair(rng)
            name = f"{prefix}_{i:08d}"
            Image.fromarray(img).save(root / "images" / sub / f"{name}.jpg", quality=95)
            Image.fromarray(lab, mode="L").save(root / "annotations" / sub / f"{name}.png")
