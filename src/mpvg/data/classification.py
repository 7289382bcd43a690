"""Classification data: ImageNet class folders, CIFAR-100 pickles, transforms and loaders.

Datasets are read from local files only.  Transforms are timm's own factories with the
recipe's settings (the same code the DeiT/Swin/T2T/Compact-Transformers recipes ran), except
the T2T CIFAR transfer transform, which is torchvision's resize + padded crop.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Callable, Mapping, Optional

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from mpvg.data import DatasetError, check_dataset, imagefolder_samples, load_cifar100
from mpvg.data.integrity import decode_errors

CLASSIFICATION_DATASETS = ("imagenet", "cifar100")


class ImageFolderDataset(Dataset):
    """``<root>/<split>/<class>/<image>``: labels are the sorted class-folder indices.

    ``classes`` keeps only those class folders (a published subset such as ImageNet-100, read
    from the full ImageNet folders); labels are then the indices in the sorted subset.
    A plain file list (``os.scandir``) and PIL decoding: no per-item ``stat`` calls, so
    listing ImageNet's 1.28M files takes seconds.  An image that cannot be read is a
    :class:`DatasetError` naming its path (:func:`mpvg.data.integrity.decode_errors`).
    """

    def __init__(self, root: str | Path, split: str = "train", transform: Optional[Callable] = None,
                 classes: Optional[list] = None):
        check_dataset("imagenet", root, split, classes=classes)
        self.root = Path(root)
        self.split_dir = self.root / split
        self.classes, self.samples = imagefolder_samples(self.split_dir, classes)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.targets = [t for _, t in self.samples]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        lazy = getattr(self.transform, "decodes_lazily", False)
        with decode_errors(path):  # a lazily opened JPEG is decoded inside the transform
            img = decode_image(path, lazy=lazy)
            if lazy:
                return self.transform(img), target
        return (self.transform(img) if self.transform else img), target


def decode_image(path: str, lazy: bool = False) -> Image.Image:
    """The image at ``path`` as RGB (decoded), or with ``lazy`` a JPEG opened but not decoded,
    for a transform that decodes it itself (:class:`DraftRandomResizedCrop`); other formats are
    always decoded here."""
    img = Image.open(path)
    if lazy and img.format == "JPEG":
        return img
    img.load()  # decodes, and closes the file
    return img if img.mode == "RGB" else img.convert("RGB")


class Cifar100Dataset(Dataset):
    """The torchvision ``cifar-100-python`` pickles (``train``/``test``, ``meta``), fine labels."""

    def __init__(self, root: str | Path, split: str = "train", transform: Optional[Callable] = None):
        check_dataset("cifar100", root, split)
        self.root = Path(root)
        self.data, self.targets, self.classes = load_cifar100(self.root, split)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        img = Image.fromarray(self.data[index])
        return (self.transform(img) if self.transform else img), self.targets[index]


def build_dataset(name: str, root: str | Path, split: str, transform: Optional[Callable] = None,
                  num_classes: int | None = None, classes: Optional[list] = None) -> Dataset:
    """The dataset ``name`` (imagenet | cifar100) at ``root``; checks ``num_classes`` if given;
    ``classes``: an ImageNet class subset (:class:`ImageFolderDataset`)."""
    if name == "imagenet":
        ds = ImageFolderDataset(root, split, transform, classes)
    elif classes is not None:
        raise DatasetError(f"{root}: a class subset applies to ImageNet class folders only, not to {name}")
    elif name == "cifar100":
        ds = Cifar100Dataset(root, split, transform)
    else:
        raise DatasetError(f"{name!r} is not a classification dataset; expected one of {list(CLASSIFICATION_DATASETS)}")
    if num_classes is not None and len(ds.classes) != num_classes:
        raise DatasetError(f"{root}: {len(ds.classes)} classes in {split!r} but params.yaml says "
                           f"num_classes: {num_classes} for {name}")
    return ds


# --------------------------------------------------------------------------- transforms

def _posterize_compat(img, bits_to_keep, **_):
    """timm's posterize with Pillow < 13 semantics: 0 bits kept gives a black image.

    RandAugment ``inc1`` at magnitude 9 +- 0.5 reaches level 10, i.e. 0 bits; Pillow 13
    raises ``ValueError`` there, which would kill a paper-scale run at a random step.
    """
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    from PIL import ImageOps

    return ImageOps.posterize(img, bits_to_keep)


def _patch_timm_posterize() -> None:
    from timm.data import auto_augment

    for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
        if name in auto_augment.NAME_TO_OP:
            auto_augment.NAME_TO_OP[name] = _posterize_compat


class DraftRandomResizedCrop:
    """timm's ``RandomResizedCropAndInterpolation`` that decodes a JPEG at reduced size when the crop allows it.

    The crop box and the interpolation are drawn exactly as timm draws them (its own
    ``get_params``, then ``random.choice`` for ``random``), from the image's full size, which an
    undecoded JPEG knows. If the box is at least twice the output size in both directions,
    libjpeg decodes the image at 1/2, 1/4 or 1/8 (DCT scaling, PIL's ``draft``), never further
    than the box still covering the output size, and the box is resized from there, so the crop
    is still a downsampling of the same region (docs/performance.md: mean pixel difference to
    the full-size decode). Otherwise (and for decoded images) the output is bit-identical to
    timm's: ``crop``, then ``resize``.
    """

    def __init__(self, rrc):
        self.rrc = rrc

    def __call__(self, img: Image.Image) -> Image.Image:
        rrc = self.rrc
        top, left, h, w = rrc.get_params(img, rrc.scale, rrc.ratio)
        interp = rrc.interpolation
        if isinstance(interp, (tuple, list)):
            interp = random.choice(interp)
        out_h, out_w = rrc.size
        full_w, full_h = img.size
        factor = min(w // out_w, h // out_h)
        if factor >= 2 and getattr(img, "format", None) == "JPEG" and not getattr(img, "_im", None):
            # PIL picks the largest of 8, 4, 2 that is <= min(W // req_w, H // req_h) <= factor
            img.draft("RGB", (-(-full_w // factor), -(-full_h // factor)))
        img.load()
        if img.mode != "RGB":
            img = img.convert("RGB")
        from torchvision.transforms.functional import pil_modes_mapping

        resample = pil_modes_mapping[interp]
        if img.size == (full_w, full_h):  # full size: exactly torchvision's resized_crop
            return img.crop((left, top, left + w, top + h)).resize((out_w, out_h), resample)
        sx, sy = img.size[0] / full_w, img.size[1] / full_h
        return img.resize((out_w, out_h), resample, box=(left * sx, top * sy, (left + w) * sx, (top + h) * sy))

    def __repr__(self) -> str:
        return f"Draft{self.rrc!r}"


def _with_draft_decode(transform):
    """Swap the train transform's RandomResizedCrop for :class:`DraftRandomResizedCrop` and mark
    the transform as taking undecoded JPEGs (``decodes_lazily``)."""
    from timm.data.transforms import RandomResizedCropAndInterpolation

    ops = getattr(transform, "transforms", [])
    if ops and isinstance(ops[0], RandomResizedCropAndInterpolation):
        ops[0] = DraftRandomResizedCrop(ops[0])
        transform.decodes_lazily = True
    return transform


def build_transform(recipe: Mapping, is_train: bool):
    """The recipe's train or eval transform.

    ``transform: timm`` -> ``timm.data.create_transform`` (RandomResizedCrop with ``scale``,
    flip, RandAugment, color jitter (timm ignores it when RandAugment is on); eval: resize to
    ``img_size / crop_pct`` and center crop).  ``resize_pad_crop`` -> the T2T transfer script:
    resize, ``RandomCrop(size, padding=size // 8)``, flip; eval: resize.

    The train transform ends in a uint8 ``HWC`` array (:class:`ToUint8HWC`; the loader collates
    uint8): normalisation and random erasing (``reprob``/``remode``/``recount``) run batch-wise on
    the training device (:class:`mpvg.data.device_transform.DeviceTransform`), as in timm
    train.py's prefetcher path. The eval transform returns normalised float32 ``CHW`` tensors.
    """
    from mpvg.data.device_transform import ToUint8HWC

    size = int(recipe["img_size"])
    mean, std = tuple(recipe["mean"]), tuple(recipe["std"])
    if recipe["transform"] == "resize_pad_crop":
        from torchvision import transforms as T

        interp = T.InterpolationMode(recipe["interpolation"])
        ops = [T.Resize((size, size), interpolation=interp)]
        if is_train:
            return T.Compose(ops + [T.RandomCrop(size, padding=size // 8), T.RandomHorizontalFlip(recipe["hflip"]),
                                    ToUint8HWC()])
        return T.Compose(ops + [T.ToTensor(), T.Normalize(mean, std)])
    from timm.data import create_transform

    _patch_timm_posterize()
    if not is_train:
        return create_transform(size, is_training=False, interpolation=recipe["interpolation"],
                                mean=mean, std=std, crop_pct=recipe["crop_pct"])
    transform = create_transform(
        size, is_training=True, scale=tuple(recipe["scale"]), hflip=recipe["hflip"],
        color_jitter=recipe["color_jitter"], auto_augment=recipe["randaugment"],
        interpolation=recipe["train_interpolation"], use_prefetcher=True)
    transform.transforms[-1] = ToUint8HWC()  # timm's MaybePILToTensor (CHW): HWC is one copy less
    return _with_draft_decode(transform)


def mixup_kwargs(recipe: Mapping, num_classes: int) -> dict | None:
    """Keyword arguments for ``timm.data.Mixup``, or None when mixup and cutmix are off.

    Label smoothing is folded into the mixed targets (as DeiT does), so the loss is then
    ``SoftTargetCrossEntropy``.
    """
    if not (recipe.get("mixup", 0) > 0 or recipe.get("cutmix", 0) > 0):
        return None
    return {"mixup_alpha": recipe["mixup"], "cutmix_alpha": recipe["cutmix"],
            "prob": recipe["mixup_prob"], "switch_prob": recipe["mixup_switch_prob"],
            "mode": recipe["mixup_mode"], "label_smoothing": recipe["label_smoothing"],
            "num_classes": num_classes}


# --------------------------------------------------------------------------- loaders

class ShardSampler(Sampler):
    """Rank ``r`` of ``w`` gets indices ``r, r+w, ...`` with no padding (exact distributed eval)."""

    def __init__(self, length: int, num_replicas: int, rank: int):
        self.indices = list(range(rank, length, num_replicas))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def build_train_loader(dataset, sampler: Sampler, batch_size: int, workers: int, pin_memory: bool,
                       collate=None) -> DataLoader:
    """The training DataLoader: ``sampler`` orders ``dataset`` (whose train transform ends in
    uint8 ``HWC`` arrays, :func:`build_transform`), batches are collated uint8 ``(N, H, W, C)``
    and finished on the training device by :class:`mpvg.data.device_transform.DeviceTransform`.
    Workers persist across epochs; ``pin_memory`` (on CUDA) makes the copy asynchronous.
    A private generator: creating the iterator draws nothing from the global torch RNG."""
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, pin_memory=pin_memory,
                      collate_fn=collate, persistent_workers=workers > 0, generator=torch.Generator())
