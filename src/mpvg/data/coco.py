"""COCO 2017 instance segmentation for Mask R-CNN, its training augmentation, and tiny data.

On disk (the official release, unpacked)::

    <root>/annotations/instances_train2017.json
    <root>/annotations/instances_val2017.json
    <root>/train2017/<12-digit id>.jpg
    <root>/val2017/<12-digit id>.jpg

Annotations are read with pycocotools, as MMDetection's ``CocoDataset`` does: category ids
map to contiguous labels ``1..K`` (0 is the background in torchvision's Mask R-CNN); crowd
boxes, boxes of zero overlap with the image, and boxes under 1 px are not training targets;
training skips images without a usable box and images under 32 px.  The annotation file is
checked when the dataset is built (:func:`mpvg.data.integrity.read_coco_annotations`): invalid
JSON, missing ``categories``, an unknown category or image id, or a missing image file is a
:class:`mpvg.data.DatasetError` naming the file, before any training.

The training augmentation is the ViT-Adapter Mask R-CNN 3x+MS pipeline (DETR-style):
flip 0.5, then one of two policies (multi-scale resize; or resize, random crop, multi-scale
resize), then a random crop to ``crop_size``.  Images stay float in [0, 1] (torchvision's
Mask R-CNN normalises them itself); masks are per-instance uint8 bitmaps.
"""
from __future__ import annotations

import contextlib
import io
import json
import random
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from mpvg.data import COCO_DIRS, check_dataset
from mpvg.data.integrity import bad_image, decode_errors, read_coco_annotations

SPLIT_DIRS = COCO_DIRS


def coco_paths(root: str | Path, split: str) -> tuple[Path, Path]:
    """``(annotation json, image folder)`` of a split; fails naming the path if absent."""
    check_dataset("coco", root, split)
    root = Path(root)
    return root / "annotations" / f"instances_{split}2017.json", root / SPLIT_DIRS[split]


def load_coco_api(ann_file: str | Path, img_dir: str | Path):
    """pycocotools' ``COCO`` of a checked annotation file (:func:`read_coco_annotations`),
    without its progress prints."""
    from pycocotools.coco import COCO

    api = COCO()
    api.dataset = read_coco_annotations(ann_file, img_dir)
    with contextlib.redirect_stdout(io.StringIO()):
        api.createIndex()
    return api


class CocoInstances(Dataset):
    """One COCO split as ``(image, target)`` pairs for torchvision's Mask R-CNN.

    ``image``: float ``(3, H, W)`` in ``[0, 1]``.  ``target``: ``boxes`` (N, 4) xyxy float,
    ``labels`` (N,) int64 in ``1..K``, ``masks`` (N, H, W) uint8, ``image_id`` (int).
    ``train=True`` applies MMDetection's training filters (see the module docstring).
    """

    def __init__(self, root: str | Path, split: str = "train", transform: Optional[Callable] = None,
                 train: Optional[bool] = None, min_size: int = 32):
        self.ann_file, self.img_dir = coco_paths(root, split)
        self.coco = load_coco_api(self.ann_file, self.img_dir)
        self.cat_ids = sorted(self.coco.getCatIds())
        self.cat_to_label = {c: i + 1 for i, c in enumerate(self.cat_ids)}
        self.label_to_cat = {i + 1: c for i, c in enumerate(self.cat_ids)}
        self.class_names = [self.coco.cats[c]["name"] for c in self.cat_ids]
        self.train = split == "train" if train is None else train
        ids = sorted(self.coco.imgs)
        if self.train:
            ids = [i for i in ids if min(self.coco.imgs[i]["width"], self.coco.imgs[i]["height"]) >= min_size
                   and self._valid_anns(i)]
        self.ids = ids
        self.transform = transform

    @property
    def num_classes(self) -> int:
        """Foreground classes (Mask R-CNN adds the background)."""
        return len(self.cat_ids)

    def _valid_anns(self, img_id: int) -> list[dict]:
        info = self.coco.imgs[img_id]
        out = []
        for ann in self.coco.imgToAnns.get(img_id, []):
            if ann.get("ignore", False) or ann.get("iscrowd", 0):  # unknown categories fail at start
                continue
            x, y, w, h = ann["bbox"]
            inter_w = max(0.0, min(x + w, info["width"]) - max(x, 0.0))
            inter_h = max(0.0, min(y + h, info["height"]) - max(y, 0.0))
            if inter_w * inter_h == 0 or ann.get("area", 1) <= 0 or w < 1 or h < 1:
                continue
            out.append(ann)
        return out

    def __len__(self) -> int:
        return len(self.ids)

    def load_image(self, img_id: int) -> torch.Tensor:
        info = self.coco.imgs[img_id]
        path = self.img_dir / info["file_name"]
        with decode_errors(path), open(path, "rb") as f:
            arr = np.asarray(Image.open(f).convert("RGB"), dtype=np.uint8)
        if arr.shape[:2] != (info["height"], info["width"]):  # the masks are drawn at the annotated size
            raise bad_image(path, f"decodes to {arr.shape[1]}x{arr.shape[0]} but {self.ann_file} says "
                            f"{info['width']}x{info['height']}")
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)

    def load_target(self, img_id: int) -> dict:
        info = self.coco.imgs[img_id]
        anns = self._valid_anns(img_id)
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                              for a in anns], dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor([self.cat_to_label[a["category_id"]] for a in anns], dtype=torch.int64)
        if anns:
            masks = torch.from_numpy(np.stack([self.coco.annToMask(a) for a in anns]).astype(np.uint8))
        else:
            masks = torch.zeros((0, info["height"], info["width"]), dtype=torch.uint8)
        return {"boxes": boxes, "labels": labels, "masks": masks, "image_id": int(img_id)}

    def __getitem__(self, index: int):
        img_id = self.ids[index]
        image, target = self.load_image(img_id), self.load_target(img_id)
        if self.transform is not None:
            image, target = self.transform(image, target)
        return image, target


def collate_detection(batch):
    """Lists of images and targets (Mask R-CNN batches images of different sizes itself)."""
    images, targets = zip(*batch)
    return list(images), list(targets)


# --------------------------------------------------------------------------------------
# Training augmentation (MMDetection semantics)
# --------------------------------------------------------------------------------------
def rescale_size(h: int, w: int, short: int, long: int) -> tuple[int, int]:
    """MMCV ``rescale`` with keep_ratio: the largest scale that fits ``short x long``."""
    scale = min(long / max(h, w), short / min(h, w))
    return int(h * scale + 0.5), int(w * scale + 0.5)


def resize(image: torch.Tensor, target: dict, size: tuple[int, int]) -> tuple[torch.Tensor, dict]:
    """Image bilinear, masks nearest, boxes scaled (as MMDetection's ``Resize``)."""
    h, w = image.shape[-2:]
    nh, nw = size
    if (nh, nw) == (h, w):
        return image, target
    image = F.interpolate(image[None], size=(nh, nw), mode="bilinear", align_corners=False)[0].clamp_(0, 1)
    target = dict(target)
    target["boxes"] = target["boxes"] * torch.tensor([nw / w, nh / h, nw / w, nh / h])
    masks = target["masks"]
    target["masks"] = (F.interpolate(masks[:, None], size=(nh, nw), mode="nearest")[:, 0] if len(masks)
                       else masks.new_zeros((0, nh, nw)))
    return image, target


def hflip(image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
    w = image.shape[-1]
    target = dict(target)
    b = target["boxes"]
    target["boxes"] = torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], dim=1) if len(b) else b
    target["masks"] = target["masks"].flip(-1)
    return image.flip(-1), target


def crop(image: torch.Tensor, target: dict, top: int, left: int, ch: int, cw: int) -> tuple[torch.Tensor, dict]:
    """Crop; boxes shifted and clipped, those left empty dropped with their masks/labels."""
    target = dict(target)
    b = target["boxes"] - torch.tensor([left, top, left, top], dtype=torch.float32)
    b[:, 0::2] = b[:, 0::2].clamp(0, cw)
    b[:, 1::2] = b[:, 1::2].clamp(0, ch)
    keep = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
    target["boxes"], target["labels"] = b[keep], target["labels"][keep]
    target["masks"] = target["masks"][keep][:, top:top + ch, left:left + cw]
    return image[:, top:top + ch, left:left + cw], target


def random_crop(image: torch.Tensor, target: dict, h_range: Sequence[int], w_range: Sequence[int],
                rng=random) -> tuple[torch.Tensor, dict]:
    """MMDetection ``RandomCrop(crop_type='absolute_range', allow_negative_crop=True)``."""
    h, w = image.shape[-2:]
    ch = rng.randint(min(h, h_range[0]), min(h, h_range[1]))
    cw = rng.randint(min(w, w_range[0]), min(w, w_range[1]))
    top, left = rng.randint(0, max(h - ch, 0)), rng.randint(0, max(w - cw, 0))
    return crop(image, target, top, left, ch, cw)


class DetectionTrainTransform:
    """ViT-Adapter's Mask R-CNN 3x+MS training pipeline (``mask_rcnn_deit_adapter_tiny_fpn_3x_coco.py``).

    Args:
        short_sides: multi-scale short sides (480..800 step 32), one chosen per image.
        max_size: the long-side limit (1333).
        crop_size: final random crop (1024).
        crop_branch_sides, crop_branch_range: the second AutoAugment policy's first resize
            (400, 500, 600) and crop range (384..600).
        flip_prob: horizontal flip probability (0.5).
    """

    def __init__(self, short_sides: Sequence[int], max_size: int, crop_size: int,
                 crop_branch_sides: Sequence[int] = (400, 500, 600), crop_branch_range: Sequence[int] = (384, 600),
                 flip_prob: float = 0.5, seed: Optional[int] = None):
        self.short_sides, self.max_size, self.crop_size = list(short_sides), int(max_size), int(crop_size)
        self.crop_branch_sides, self.crop_branch_range = list(crop_branch_sides), list(crop_branch_range)
        self.flip_prob = flip_prob
        # the module-level generator by default: DataLoader seeds it per worker
        self.rng = random.Random(seed) if seed is not None else random

    def _resize(self, image, target, sides):
        h, w = image.shape[-2:]
        return resize(image, target, rescale_size(h, w, self.rng.choice(sides), self.max_size))

    def __call__(self, image: torch.Tensor, target: dict):
        rng = self.rng
        if rng.random() < self.flip_prob:
            image, target = hflip(image, target)
        if rng.random() < 0.5:  # AutoAugment policy 1: multi-scale resize
            image, target = self._resize(image, target, self.short_sides)
        else:                   # policy 2: resize, crop, multi-scale resize
            image, target = self._resize(image, target, self.crop_branch_sides)
            image, target = random_crop(image, target, self.crop_branch_range, self.crop_branch_range, rng)
            image, target = self._resize(image, target, self.short_sides)
        cs = (self.crop_size, self.crop_size)
        return random_crop(image, target, cs, cs, rng)


# --------------------------------------------------------------------------------------
# Tiny dataset in the real layout
# --------------------------------------------------------------------------------------
TINY_CATEGORIES = [  # non-contiguous ids, as in COCO
    {"id": 1, "name": "square", "supercategory": "shape"},
    {"id": 3, "name": "disc", "supercategory": "shape"},
    {"id": 7, "name": "triangle", "supercategory": "shape"},
]
TINY_COLORS = {1: (230, 60, 50), 3: (60, 200, 70), 7: (70, 90, 240)}


def _shape_polygon(cat: int, cx: float, cy: float, r: float) -> list[float]:
    if cat == 1:
        pts = [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    elif cat == 3:
        pts = [(cx + r * np.cos(t), cy + r * np.sin(t)) for t in np.linspace(0, 2 * np.pi, 16, endpoint=False)]
    else:
        pts = [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    return [round(float(v), 2) for p in pts for v in p]


def _tiny_split(root: Path, split: str, n_images: int, rng: np.random.Generator, first_id: int,
                crowd: bool) -> None:
    from PIL import ImageDraw
    from pycocotools import mask as mask_utils

    img_dir = root / SPLIT_DIRS[split]
    img_dir.mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    ann_id = first_id * 100
    for k in range(n_images):
        img_id = first_id + k
        h, w = int(rng.choice([96, 112, 128])), int(rng.choice([96, 128, 160]))
        bg = tuple(int(v) for v in rng.integers(0, 70, size=3))
        im = Image.new("RGB", (w, h), bg)
        draw = ImageDraw.Draw(im)
        for _ in range(int(rng.integers(1, 4))):
            cat = int(rng.choice([c["id"] for c in TINY_CATEGORIES]))
            r = float(rng.uniform(10, 22))
            cx, cy = float(rng.uniform(r, w - r)), float(rng.uniform(r, h - r))
            poly = _shape_polygon(cat, cx, cy, r)
            draw.polygon(poly, fill=TINY_COLORS[cat])
            rle = mask_utils.merge(mask_utils.frPyObjects([poly], h, w))
            x0, y0, bw, bh = (float(v) for v in mask_utils.toBbox(rle))
            ann_id += 1
            anns.append({"id": ann_id, "image_id": img_id, "category_id": cat, "segmentation": [poly],
                         "area": float(mask_utils.area(rle)), "bbox": [round(v, 2) for v in (x0, y0, bw, bh)],
                         "iscrowd": 0})
        if crowd and k == 0:  # one crowd region (uncompressed RLE), as COCO has for groups
            m = np.zeros((h, w), dtype=np.uint8)
            m[h - 20:h - 4, 4:40] = 1
            draw.rectangle([4, h - 20, 39, h - 5], fill=TINY_COLORS[1])
            counts, prev, run = [], 0, 0
            for v in m.flatten(order="F"):
                if v != prev:
                    counts.append(run)
                    prev, run = v, 0
                run += 1
            counts.append(run)
            ann_id += 1
            anns.append({"id": ann_id, "image_id": img_id, "category_id": 1,
                         "segmentation": {"counts": counts, "size": [h, w]}, "area": float(m.sum()),
                         "bbox": [4.0, float(h - 20), 36.0, 16.0], "iscrowd": 1})
        name = f"{img_id:012d}.jpg"
        im.save(img_dir / name, quality=95)
        images.append({"id": img_id, "file_name": name, "width": w, "height": h, "license": 1,
                       "date_captured": "2025-01-01 00:00:00"})
    doc = {"info": {"description": "mpvg tiny COCO-format data", "version": "1.0", "year": 2025},
           "licenses": [{"id": 1, "name": "CC0", "url": ""}],
           "images": images, "annotations": anns, "categories": TINY_CATEGORIES}
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(doc))


def make_tiny(root: Path, seed: int = 0) -> None:
    """Write a tiny COCO-format dataset (coloured squares, discs, triangles with polygon
    masks; one crowd RLE) under ``root`` in the official layout."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    _tiny_split(root, "train", 12, rng, first_id=1, crowd=True)
    _tiny_split(root, "val", 6, rng, first_id=1001, crowd=False)
