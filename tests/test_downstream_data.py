"""COCO and ADE20K: the tiny datasets are written in the official layouts and read back by
the real loaders; the training transforms keep images, boxes, masks and labels aligned."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from mpvg.data import DatasetError, check_dataset
from mpvg.data import ade20k, coco


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "coco"
    coco.make_tiny(root, seed=0)
    return root


@pytest.fixture(scope="module")
def ade_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "ADEChallengeData2016"
    ade20k.make_tiny(root, seed=0)
    return root


# ------------------------------------------------------------------------------ COCO
def test_tiny_coco_is_in_the_official_layout(coco_root):
    for split in ("train", "val"):
        check_dataset("coco", coco_root, split)
        doc = json.loads((coco_root / "annotations" / f"instances_{split}2017.json").read_text())
        assert set(doc) >= {"images", "annotations", "categories", "info", "licenses"}
        for img in doc["images"]:
            path = coco_root / f"{split}2017" / img["file_name"]
            assert path.is_file() and img["file_name"] == f"{img['id']:012d}.jpg"
            with Image.open(path) as im:
                assert im.size == (img["width"], img["height"])
        for ann in doc["annotations"]:
            assert set(ann) >= {"id", "image_id", "category_id", "segmentation", "area", "bbox", "iscrowd"}
    assert [c["id"] for c in doc["categories"]] == [1, 3, 7]  # non-contiguous, as COCO's


def test_coco_loader_round_trip(coco_root):
    train = coco.CocoInstances(coco_root, "train")
    val = coco.CocoInstances(coco_root, "val")
    assert train.num_classes == 3 and train.label_to_cat == {1: 1, 2: 3, 3: 7}
    doc = json.loads((coco_root / "annotations" / "instances_train2017.json").read_text())
    crowd = [a for a in doc["annotations"] if a["iscrowd"]]
    assert crowd, "the tiny data has a crowd region"
    n_plain = sum(1 for a in doc["annotations"] if not a["iscrowd"])
    assert sum(len(train.load_target(i)["labels"]) for i in train.ids) == n_plain  # crowd is not a target
    assert len(val) == 6 and len(train) == 12
    image, target = val[0]
    assert image.dtype == torch.float32 and image.shape[0] == 3 and 0 <= image.min() and image.max() <= 1
    ann = val.coco.imgToAnns[val.ids[0]][0]
    x, y, w, h = ann["bbox"]
    torch.testing.assert_close(target["boxes"][0], torch.tensor([x, y, x + w, y + h]))
    assert target["masks"].shape[1:] == image.shape[1:]
    assert target["masks"][0].sum().item() == pytest.approx(ann["area"], rel=0.02)
    # each instance is drawn in its category's colour: the mask reads that colour back
    mask = target["masks"][0].bool()
    colour = coco.TINY_COLORS[ann["category_id"]]
    mean = image[:, mask].mean(1) * 255
    assert torch.allclose(mean, torch.tensor(colour, dtype=torch.float32), atol=25)


def test_coco_missing_files_are_named(tmp_path):
    (tmp_path / "coco" / "annotations").mkdir(parents=True)
    with pytest.raises(DatasetError, match="instances_train2017.json"):
        coco.CocoInstances(tmp_path / "coco", "train")


def _mask_box(mask):
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)


def test_detection_train_transform_keeps_boxes_and_masks_aligned(coco_root):
    ds = coco.CocoInstances(coco_root, "train")
    transform = coco.DetectionTrainTransform([64, 96], max_size=128, crop_size=80, crop_branch_sides=[48, 60, 72],
                                             crop_branch_range=[46, 72], seed=0)
    seen = 0
    for k in range(3 * len(ds)):
        img_id = ds.ids[k % len(ds)]
        image, target = transform(ds.load_image(img_id), ds.load_target(img_id))
        h, w = image.shape[-2:]
        assert h <= 80 and w <= 80 and target["masks"].shape[1:] == (h, w)
        assert len(target["boxes"]) == len(target["labels"]) == len(target["masks"])
        for box, mask in zip(target["boxes"], target["masks"]):
            assert (box[2:] > box[:2]).all() and box[0] >= 0 and box[1] >= 0 and box[2] <= w and box[3] <= h
            if mask.sum() > 0:  # the mask lies in its box, to nearest-resize rounding (a cut shape
                # need not fill its clipped box)
                mb = _mask_box(mask)
                assert (mb[:2] >= box[:2] - 4).all() and (mb[2:] <= box[2:] + 4).all(), (mb, box)  # 2 resizes
                seen += 1
    assert seen > 10


def test_hflip_and_resize_semantics():
    image = torch.zeros(3, 10, 20)
    masks = torch.zeros(1, 10, 20, dtype=torch.uint8)
    masks[0, 2:5, 1:4] = 1
    target = {"boxes": torch.tensor([[1.0, 2.0, 4.0, 5.0]]), "labels": torch.tensor([1]), "masks": masks}
    _, flipped = coco.hflip(image, target)
    torch.testing.assert_close(flipped["boxes"], torch.tensor([[16.0, 2.0, 19.0, 5.0]]))
    torch.testing.assert_close(_mask_box(flipped["masks"][0]), flipped["boxes"][0])
    assert coco.rescale_size(480, 640, 800, 1333) == (800, 1067)     # short side to 800
    assert coco.rescale_size(400, 1600, 800, 1333) == (333, 1333)    # long side capped
    _, resized = coco.resize(image, target, (20, 40))
    torch.testing.assert_close(resized["boxes"], torch.tensor([[2.0, 4.0, 8.0, 10.0]]))
    torch.testing.assert_close(_mask_box(resized["masks"][0]), resized["boxes"][0])


def test_random_crop_drops_boxes_outside():
    image = torch.zeros(3, 50, 50)
    masks = torch.zeros(2, 50, 50, dtype=torch.uint8)
    target = {"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0], [30.0, 30.0, 45.0, 45.0]]),
              "labels": torch.tensor([1, 2]), "masks": masks}
    img, out = coco.crop(image, target, top=20, left=20, ch=30, cw=30)
    assert img.shape[-2:] == (30, 30)
    assert out["labels"].tolist() == [2] and out["masks"].shape == (1, 30, 30)
    torch.testing.assert_close(out["boxes"], torch.tensor([[10.0, 10.0, 25.0, 25.0]]))


# ------------------------------------------------------------------------------ ADE20K
def test_tiny_ade20k_is_in_the_official_layout(ade_root):
    for split, sub, prefix, n in (("train", "training", "ADE_train", 12), ("val", "validation", "ADE_val", 6)):
        check_dataset("ade20k", ade_root, split)
        imgs = sorted((ade_root / "images" / sub).iterdir())
        anns = sorted((ade_root / "annotations" / sub).iterdir())
        assert [p.name for p in imgs] == [f"{prefix}_{i:08d}.jpg" for i in range(1, n + 1)]
        assert [p.stem for p in anns] == [p.stem for p in imgs]
        with Image.open(anns[0]) as lab, Image.open(imgs[0]) as im:
            assert lab.mode == "L" and lab.size == im.size
            values = set(np.unique(np.asarray(lab)).tolist())
    assert 0 in values and values <= {0, 1, 3, 5, 13, 21}


def test_ade20k_loader_reduces_zero_label(ade_root):
    ds = ade20k.ADE20KDataset(ade_root, "val")
    image, label, meta = ds[0]
    with Image.open(ds.labels[0]) as im:
        raw = torch.from_numpy(np.asarray(im).astype(np.int64))
    assert image.dtype == torch.uint8 and image.shape[1:] == label.shape == raw.shape
    assert (label[raw == 0] == 255).all()
    torch.testing.assert_close(label[raw > 0], raw[raw > 0] - 1)
    assert meta == {"stem": "ADE_val_00000001", "ori_size": tuple(raw.shape)}


def test_ade20k_missing_annotation_is_named(tmp_path, ade_root):
    import shutil

    root = tmp_path / "ade"
    shutil.copytree(ade_root, root)
    (root / "annotations" / "validation" / "ADE_val_00000002.png").unlink()
    with pytest.raises(DatasetError, match="ADE_val_00000002"):
        ade20k.ADE20KDataset(root, "val")


def test_seg_train_and_test_transforms(ade_root):
    random.seed(0)
    train = ade20k.ADE20KDataset(ade_root, "train", ade20k.SegTrainTransform((128, 64), (0.5, 2.0), 64, seed=0))
    for i in range(len(train)):
        image, label, _ = train[i]
        assert image.shape == (3, 64, 64) and label.shape == (64, 64) and image.dtype == torch.float32
        values = set(label.unique().tolist())
        assert values <= {255, 0, 2, 4, 12, 20}
    # a small image is padded: label 255 where the image is padding (0 after normalisation)
    small = ade20k.SegTrainTransform((40, 20), (1.0, 1.0), 64, photometric=False, seed=0)
    img, lab = small(torch.full((3, 30, 50), 128, dtype=torch.uint8), torch.zeros(30, 50, dtype=torch.int64))
    assert img.shape == (3, 64, 64) and (lab[24:] == 255).all() and (img[:, 24:] == 0).all()
    test = ade20k.ADE20KDataset(ade_root, "val", ade20k.SegTestTransform((128, 64)))
    image, label, meta = test[0]
    assert image.shape[1] % 32 == 0 and image.shape[2] % 32 == 0
    assert tuple(label.shape) == meta["ori_size"]


def test_cat_max_ratio_avoids_single_class_crops():
    # left half class 0, right half class 1: an 8-wide crop of the 16-wide map has both classes
    # under 75 % at 3 of its 9 offsets; with 10 tries that is almost sure, without ~1/3
    label = torch.zeros(8, 16, dtype=torch.int64)
    label[:, 8:] = 1

    def mixed_fraction(ratio):
        t = ade20k.SegTrainTransform((16, 8), (1.0, 1.0), 8, cat_max_ratio=ratio, flip_prob=0.0, photometric=False,
                                     seed=0)
        ok = 0
        for _ in range(30):
            _, lab = t(torch.zeros(3, 8, 16, dtype=torch.uint8), label)
            counts = torch.bincount(lab.flatten(), minlength=2)
            ok += bool(counts.max() < 0.75 * counts.sum())
        return ok / 30

    assert mixed_fraction(0.75) >= 0.9
    assert mixed_fraction(1.0) <= 0.6


def test_photometric_distortion_stays_uint8_and_changes_colours():
    rng = random.Random(0)
    img = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    pmd = ade20k.PhotoMetricDistortion(rng=rng)
    outs = [pmd(img) for _ in range(8)]
    assert all(o.dtype == torch.uint8 and o.shape == img.shape for o in outs)
    assert any(not torch.equal(o, img) for o in outs)


# ------------------------------------------------------------------------------ `mpvg data tiny`
def test_data_tiny_writes_both_downstream_datasets(tmp_path):
    from mpvg.data.tiny import make_tiny

    status = make_tiny(tmp_path, what="coco")
    status.update(make_tiny(tmp_path, what="ade20k"))
    assert status == {"coco": "written", "ade20k": "written"}
    assert len(coco.CocoInstances(tmp_path / "coco", "val")) == 6
    assert len(ade20k.ADE20KDataset(tmp_path / "ADEChallengeData2016", "train")) == 12
