"""Classification data: ImageNet class folders, CIFAR-100 pickles, transforms and loaders.

Datasets are read from local files only.  Transforms are timm's own factories with the
recipe's settings (the same code the DeiT/Swin/T2T/Compact-Transformers recipes ran), except
the T2T CIFAR transfer transform, which is torchvision's resize + padded crop.
"""
from __future__ import annotations

from dataclasses import dataclass
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
        with decode_errors(path), open(path, "rb") as f:
            img = Image.open(f).convert("RGB")
        return (self.transform(img) if self.transform else img), target


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


def build_transform(recipe: Mapping, is_train: bool):
    """The recipe's train or eval transform.

    ``transform: timm`` -> ``timm.data.create_transform`` (RandomResizedCrop with ``scale``,
    flip, RandAugment, color jitter (timm ignores it when RandAugment is on), random erasing;
    eval: resize to ``img_size / crop_pct`` and center crop).  ``resize_pad_crop`` -> the T2T
    transfer script: resize, ``RandomCrop(size, padding=size // 8)``, flip; eval: resize.
    """
    size = int(recipe["img_size"])
    mean, std = tuple(recipe["mean"]), tuple(recipe["std"])
    if recipe["transform"] == "resize_pad_crop":
        from torchvision import transforms as T

        interp = T.InterpolationMode(recipe["interpolation"])
        ops = [T.Resize((size, size), interpolation=interp)]
        if is_train:
            ops += [T.RandomCrop(size, padding=size // 8), T.RandomHorizontalFlip(recipe["hflip"])]
        return T.Compose(ops + [T.ToTensor(), T.Normalize(mean, std)])
    from timm.data import create_transform

    _patch_timm_posterize()
    if not is_train:
        return create_transform(size, is_training=False, interpolation=recipe["interpolation"],
                                mean=mean, std=std, crop_pct=recipe["crop_pct"])
    return create_transform(
        size, is_training=True, scale=tuple(recipe["scale"]), hflip=recipe["hflip"],
        color_jitter=recipe["color_jitter"], auto_augment=recipe["randaugment"],
        interpolation=recipe["train_interpolation"], mean=mean, std=std,
        re_prob=recipe["reprob"], re_mode=recipe["remode"], re_count=recipe["recount"])


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


def build_sampler(dataset, is_train: bool, seed: int, world_size: int = 1, rank: int = 0,
                  repeated_aug: bool = False) -> Sampler:
    """Train: shuffled (``DistributedSampler``, or timm's ``RepeatAugSampler`` when
    ``repeated_aug`` under DDP, as DeiT/CeiT); eval: sequential shards.  Call
    ``sampler.set_epoch(e)`` each epoch when it has one."""
    from torch.utils.data import DistributedSampler, RandomSampler

    if not is_train:
        return ShardSampler(len(dataset), world_size, rank)
    if world_size > 1:
        if repeated_aug:
            from timm.data.distributed_sampler import RepeatAugSampler

            return RepeatAugSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True)
        return DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    gen = torch.Generator()
    gen.manual_seed(seed)
    return RandomSampler(dataset, generator=gen)


def build_loader(dataset, batch_size: int, is_train: bool, seed: int = 0, num_workers: int = 0,
                 world_size: int = 1, rank: int = 0, repeated_aug: bool = False,
                 pin_memory: bool | None = None) -> DataLoader:
    """A DataLoader with the right sampler, per-process ``batch_size``, seeded workers.

    Worker RNGs (torch, ``random`` and numpy, which RandAugment uses) derive from the loader's
    seeded generator, so a run's augmentations depend only on (seed, rank).
    """
    gen = torch.Generator()
    gen.manual_seed(seed * 1000 + rank)
    sampler = build_sampler(dataset, is_train, seed, world_size, rank, repeated_aug)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
                      drop_last=is_train and len(sampler) >= batch_size,
                      persistent_workers=num_workers > 0, generator=gen)


@dataclass
class ClassificationData:
    """What the training engine needs from the data side."""

    train: DataLoader
    eval: DataLoader
    num_classes: int
    classes: list
    mixup: dict | None          # kwargs for timm.data.Mixup, None when off
    per_process_batch: int

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle distributed samplers (no-op for single-process runs)."""
        if hasattr(self.train.sampler, "set_epoch"):
            self.train.sampler.set_epoch(epoch)


def per_process_batch(global_batch: int, world_size: int) -> int:
    if global_batch % world_size:
        raise ValueError(f"batch_size {global_batch} (global) is not divisible by world size {world_size}")
    return global_batch // world_size


def build_classification_data(spec, seed: int = 0, world_size: int = 1, rank: int = 0,
                              num_workers: int | None = None) -> ClassificationData:
    """Train/eval loaders for a :class:`mpvg.config.RunSpec` of a classification cell."""
    recipe = spec.recipe
    for split in ("train", "val"):
        check_dataset(spec.dataset, spec.dataset_root, split, spec.num_classes, spec.classes)
    train_ds = build_dataset(spec.dataset, spec.dataset_root, "train", build_transform(recipe, True), spec.num_classes,
                             spec.classes)
    eval_ds = build_dataset(spec.dataset, spec.dataset_root, "val", build_transform(recipe, False), spec.num_classes,
                            spec.classes)
    batch = per_process_batch(recipe["batch_size"], world_size)
    workers = recipe["workers"] if num_workers is None else num_workers
    return ClassificationData(
        train=build_loader(train_ds, batch, True, seed, workers, world_size, rank, recipe["repeated_aug"]),
        eval=build_loader(eval_ds, batch, False, seed, workers, world_size, rank),
        num_classes=spec.num_classes, classes=list(train_ds.classes),
        mixup=mixup_kwargs(recipe, spec.num_classes), per_process_batch=batch)
