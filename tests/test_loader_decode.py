"""Reduced-size JPEG decoding in the train transform (DraftRandomResizedCrop): the same random
draws as timm's RandomResizedCrop, bit-identical output where no reduction applies, a small
resampling difference where it does; and the benchmark's --vs-timm ratio line."""
from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from timm.data.transforms import RandomResizedCropAndInterpolation

from mpvg.config import load_params
from mpvg.data.classification import DraftRandomResizedCrop, ImageFolderDataset, build_transform, decode_image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _jpeg(path: Path, size: tuple[int, int], mode: str = "RGB") -> Path:
    from bench_data import photo_like

    img = photo_like(np.random.default_rng(size[0]), size)
    img.convert(mode).save(path, quality=90)
    return path


@pytest.mark.parametrize("interp", ["bicubic", "random"])
def test_draft_crop_draws_like_timm_and_is_identical_without_reduction(tmp_path, interp):
    small = _jpeg(tmp_path / "small.jpg", (120, 90))  # no crop is >= 2 x 64 both ways: full-size decode
    rrc = RandomResizedCropAndInterpolation(64, interpolation=interp)
    draft = DraftRandomResizedCrop(rrc)
    for seed in range(12):
        random.seed(seed)
        ref = rrc(decode_image(str(small)))
        after_ref = random.random()
        random.seed(seed)
        img = decode_image(str(small), lazy=True)
        assert img.format == "JPEG" and getattr(img, "_im", None) is None  # not decoded yet
        got = draft(img)
        assert random.random() == after_ref  # the same number of draws: the augmentation stream is unchanged
        assert img.size == (120, 90) and np.array_equal(np.asarray(got), np.asarray(ref))


def test_draft_crop_reduces_large_jpegs_with_a_small_pixel_difference(tmp_path):
    big = _jpeg(tmp_path / "big.jpg", (1200, 900))
    gray = _jpeg(tmp_path / "gray.jpg", (1200, 900), mode="L")
    rrc = RandomResizedCropAndInterpolation(224, interpolation="bicubic")
    draft = DraftRandomResizedCrop(rrc)
    diffs, scales = [], set()
    for path in (big, gray):
        for seed in range(8):
            random.seed(seed)
            ref = np.asarray(rrc(decode_image(str(path))), np.float32)
            random.seed(seed)
            img = decode_image(str(path), lazy=True)
            out = draft(img)
            assert out.mode == "RGB" and out.size == (224, 224)
            scales.add(1200 // img.size[0])
            diffs.append(np.abs(np.asarray(out, np.float32) - ref).mean())
    assert scales >= {1, 2}  # both branches ran
    assert max(diffs) < 4.0 and np.mean(diffs) < 2.0  # levels of 255 (docs/performance.md)


def test_dataset_hands_undecoded_jpegs_only_to_the_draft_transform(tmp_path):
    recipe = load_params(ROOT / "params.yaml", ["scale=paper"])["recipes"]["deit"]
    train_tf, eval_tf = build_transform(recipe, True), build_transform(recipe, False)
    assert train_tf.decodes_lazily and isinstance(train_tf.transforms[0], DraftRandomResizedCrop)
    assert not getattr(eval_tf, "decodes_lazily", False)  # eval: the exact timm transform, full decode
    d = tmp_path / "in" / "train" / "c0"
    d.mkdir(parents=True)
    _jpeg(d / "a.JPEG", (300, 200))
    Image.new("RGB", (300, 200), (10, 200, 30)).save(d / "b.png")  # other formats: decoded first
    ds = ImageFolderDataset(tmp_path / "in", "train", train_tf)
    for i in range(2):
        x, y = ds[i]
        assert tuple(x.shape) == (224, 224, 3) and x.dtype == np.uint8 and y == 0
    plain = ImageFolderDataset(tmp_path / "in", "train")
    assert all(plain[i][0].mode == "RGB" and plain[i][0].size == (300, 200) for i in range(2))


def test_stage_report_times_each_stage_and_every_randaugment_op_of_the_recipe(tmp_path):
    """bench_data.py --stage-report (docs/performance.md: where a loader's time goes): every op of
    the recipe's RandAugment is timed, and the expected cost per image is num_layers draws, each
    applied with its probability."""
    from bench_data import deit_recipe, stage_report, write_jpegs

    write_jpegs(tmp_path, 4, (120, 90), classes=2)
    report = stage_report(tmp_path, deit_recipe())
    ops = {k[3:]: v for k, v in report.items() if k.startswith("op:")}
    assert set(ops) == {  # rand-m9-mstd0.5-inc1: timm's increasing-magnitude op list
        "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
        "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing",
        "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"}
    assert report["images"] == 4
    assert all(report[k] > 0 for k in ("decode", "random_resized_crop", "uint8_array"))
    assert report["randaugment_expected_ms"] == pytest.approx(2 * 0.5 * np.mean(list(ops.values())), abs=2e-3)
