"""The uint8 input pipeline: the loader collates uint8, normalisation and random erasing run on the
device batch-wise (mpvg.data.device_transform), seeded by (seed, epoch, step, rank); a resumed run
with random erasing on ends bit-identical to an uninterrupted one."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from mpvg.data.device_transform import DeviceTransform, ToUint8HWC, batch_seed
from test_training import tiny_data  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def test_normalisation_is_timms_prefetcher_arithmetic_and_torchvisions_up_to_rounding():
    from PIL import Image
    from torchvision import transforms as T

    gen = torch.Generator().manual_seed(0)
    nhwc = torch.randint(0, 256, (4, 20, 24, 3), dtype=torch.uint8, generator=gen)
    out = DeviceTransform(MEAN, STD)(nhwc)
    assert out.shape == (4, 3, 20, 24) and out.dtype == torch.float32 and out.is_contiguous()
    # timm's PrefetchLoader: x.float().sub_(255 * mean).div_(255 * std) on NCHW, bit for bit
    mean = torch.tensor([255 * m for m in MEAN]).view(1, 3, 1, 1)
    std = torch.tensor([255 * s for s in STD]).view(1, 3, 1, 1)
    nchw = nhwc.permute(0, 3, 1, 2).contiguous()
    assert torch.equal(out, nchw.float().sub_(mean).div_(std))
    assert torch.equal(DeviceTransform(MEAN, STD)(nchw), out)  # NCHW input too
    # the per-image float path it replaces (ToTensor + Normalize): the same up to float rounding
    per_image = T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)])
    ref = torch.stack([per_image(Image.fromarray(img.numpy())) for img in nhwc])
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=0)
    with pytest.raises(TypeError, match="uint8"):
        DeviceTransform(MEAN, STD)(out)


def test_erasing_is_a_function_of_seed_epoch_step_rank_and_leaves_global_rngs_alone():
    t = DeviceTransform(MEAN, STD, reprob=0.5, remode="pixel")
    x = torch.randint(0, 256, (16, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    plain = DeviceTransform(MEAN, STD)(x)
    states = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    a = t(x, seed=3, epoch=1, step=7, rank=0)
    torch.manual_seed(123), random.seed(5)  # other consumers of the global streams change nothing
    assert torch.equal(t(x, seed=3, epoch=1, step=7, rank=0), a)
    random.setstate(states[0])
    torch.set_rng_state(states[2])
    t(x, seed=3, epoch=1, step=7, rank=0)
    assert random.getstate() == states[0] and torch.equal(torch.get_rng_state(), states[2])
    assert np.array_equal(np.random.get_state()[1], states[1])
    erased = (a != plain).flatten(1).any(1)
    assert 0 < int(erased.sum()) < 16  # some images erased, not all
    for other in ({"seed": 4, "epoch": 1, "step": 7, "rank": 0}, {"seed": 3, "epoch": 2, "step": 7, "rank": 0},
                  {"seed": 3, "epoch": 1, "step": 8, "rank": 0}, {"seed": 3, "epoch": 1, "step": 7, "rank": 1}):
        assert not torch.equal(t(x, **other), a), other
    assert len({batch_seed(0, 0, s, r) for s in range(100) for r in range(8)}) == 800


def _erased_boxes(batch: torch.Tensor) -> list[tuple[int, int]]:
    """(h, w) of the zeroed box of each erased image of a batch that was all ones before."""
    out = []
    for img in batch:
        zero = (img == 0).all(0)
        if zero.any():
            rows, cols = zero.any(1).nonzero(), zero.any(0).nonzero()
            out.append((int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)))
    return out


@pytest.mark.parametrize("recount", [1, 3])
def test_erasing_draws_timms_boxes(recount):
    """Against timm's RandomErasing (const fill on a batch of ones): the share of erased images and
    the distribution of the erased area and aspect agree within sampling error."""
    from timm.data.random_erasing import RandomErasing

    n, size = 3000, 48
    random.seed(0)
    ones = torch.ones(n, 3, size, size)
    timm_boxes = _erased_boxes(RandomErasing(0.25, mode="const", max_count=recount, device="cpu")(ones.clone()))
    ours = DeviceTransform((0, 0, 0), (1 / 255,) * 3, reprob=0.25, remode="const", recount=recount)
    our_boxes = _erased_boxes(ours(torch.ones(n, size, size, 3, dtype=torch.uint8), seed=0))
    if recount == 1:  # one box per image: the box is exactly what was drawn
        for boxes in (timm_boxes, our_boxes):
            assert abs(len(boxes) / n - 0.25) < 4 * (0.25 * 0.75 / n) ** 0.5
        for stat in (lambda h, w: h * w / size**2, lambda h, w: np.log(h / w)):  # area share, log aspect
            a, b = (np.array([stat(h, w) for h, w in boxes]) for boxes in (timm_boxes, our_boxes))
            assert abs(a.mean() - b.mean()) < 4 * (a.var() / len(a) + b.var() / len(b)) ** 0.5  # 4 sigma
        boxes = ours.boxes(n, size, size, torch.Generator().manual_seed(0))
        assert all(0 <= top <= size - h and 0 <= left <= size - w for _, top, left, h, w in boxes)
    else:  # several boxes: the share of erased images still matches
        assert abs(len(timm_boxes) - len(our_boxes)) / n < 4 * (0.25 * 0.75 / n) ** 0.5 * 1.5


def test_train_transform_ends_in_uint8_and_the_loader_collates_uint8(tmp_path):
    from mpvg.config import load_params
    from mpvg.data.classification import ShardSampler, build_train_loader, build_transform
    from PIL import Image

    recipe = dict(load_params("params.yaml")["recipes"]["deit"])
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 60, 3), dtype=np.uint8))
    out = build_transform(recipe, is_train=True)(img)
    assert isinstance(out, np.ndarray) and out.dtype == np.uint8 and out.shape == (32, 32, 3)
    assert repr(build_transform(recipe, True).transforms[-1]) == repr(ToUint8HWC())
    data = [(out, i) for i in range(6)]
    images, targets = next(iter(build_train_loader(data, ShardSampler(6, 1, 0), 4, 0, False)))
    assert images.dtype == torch.uint8 and images.shape == (4, 32, 32, 3) and targets.tolist() == [0, 1, 2, 3]
    assert DeviceTransform.from_recipe(recipe, "cpu")(images).shape == (4, 3, 32, 32)
    paper = dict(load_params("params.yaml", ["scale=paper"])["recipes"]["deit"])
    assert DeviceTransform.from_recipe(paper, "cpu").reprob == 0.25
    assert DeviceTransform.from_recipe(paper, "cpu", train=False).reprob == 0.0


def test_bad_erasing_settings_name_the_key():
    with pytest.raises(ValueError, match="remode 'noise'"):
        DeviceTransform(MEAN, STD, reprob=0.25, remode="noise")
    with pytest.raises(ValueError, match="reprob 1.5"):
        DeviceTransform(MEAN, STD, reprob=1.5)


# ------------------------------------------------------------------------------ through the engine
def test_resume_mid_epoch_with_device_erasing_ends_identical(tiny_data, tmp_path):
    """Random erasing (reprob 0.25) on the device, drawn from (seed, epoch, step, rank): a run stopped
    by SIGTERM mid-epoch and resumed ends with the uninterrupted run's weights, bit for bit."""
    import signal

    from test_training import (CELL, assert_same_weights, start_cli, train_in_process, wait_for_step, weights,
                               write_params)

    params = write_params(tmp_path / "p", tiny_data, epochs=2, reprob=0.25, remode="pixel")
    ref = tmp_path / "ref"
    train_in_process(params, ref)
    log = (ref / "log.txt").read_text()
    assert "input pipeline: uint8 batches, DeviceTransform(device=cpu, reprob=0.25, remode='pixel', recount=1)" in log
    out = tmp_path / "run"
    proc = start_cli(["train", "--params", str(params), "--cell", CELL, "--out", str(out), "--no-tracking",
                      "--log-interval", "1"], tmp_path)
    wait_for_step(out, proc, epochs=2)  # the run's own log: step 1 of epoch 1 is done
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    stopped = torch.load(out / "checkpoint.pt", weights_only=False)
    assert stopped["step"] > 0 and not (out / "result.json").exists()  # stopped inside an epoch
    train_in_process(params, out)
    assert_same_weights(weights(out / "checkpoint.pt"), weights(ref / "checkpoint.pt"))
