"""Classification data: layout checks, the real loaders, transforms, samplers, tiny data."""
import pickle
import sys
import types
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mpvg import cli
from mpvg.config import load_params, resolve_run
from mpvg.data import DatasetError, check_dataset
from mpvg.data import tiny
from mpvg.data.classification import (Cifar100Dataset, ImageFolderDataset, ShardSampler, build_dataset,
                                      build_train_loader, build_transform, mixup_kwargs)

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params.yaml"


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    status = tiny.make_tiny(out, "imagenet")
    status.update(tiny.make_tiny(out, "cifar100"))
    assert status == {"imagenet": "written", "cifar100": "written"}
    return out


def _tiny_params(tiny_root, *extra):
    return load_params(PARAMS, [f"datasets.imagenet.root={tiny_root / 'imagenet'}",
                                f"datasets.cifar100.root={tiny_root / 'cifar-100-python'}", *extra])


def _jpeg_folder(root: Path, classes=("b_cls", "a_cls", "c_cls"), per_class=2):
    for split in ("train", "val"):
        for ci, cls in enumerate(classes):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(per_class):
                arr = np.full((40 + 10 * i, 50, 3), 40 * ci, dtype=np.uint8)
                Image.fromarray(arr).save(d / f"img{i}.JPEG")
    (root / "train" / "a_cls" / "notes.txt").write_text("not an image")
    return root


def _cifar_pickles(root: Path, n=6, classes=("apple", "bus", "cat")):
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = [i % len(classes) for i in range(n)]
    for name in ("train", "test"):
        with open(root / name, "wb") as f:
            pickle.dump({"data": data, "fine_labels": labels, "coarse_labels": [0] * n}, f)
    with open(root / "meta", "wb") as f:
        pickle.dump({"fine_label_names": list(classes)}, f)
    return data, labels


# --------------------------------------------------------------------------- layout checks

def test_missing_root_names_the_path(tmp_path):
    with pytest.raises(DatasetError, match=rf"{tmp_path / 'nope'}: folder does not exist.*expected .*/{{train,val}}/<class>/<image>\.JPEG"):
        check_dataset("imagenet", tmp_path / "nope", "train")


def test_missing_split_and_empty_class(tmp_path):
    (tmp_path / "train" / "cls").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"no 'val' folder \(found \['train'\]\); expected .*\{train,val\}"):
        check_dataset("imagenet", tmp_path, "val")
    with pytest.raises(DatasetError, match=r"cls holds no images \(found nothing\)"):
        check_dataset("imagenet", tmp_path, "train")


def test_cifar_and_downstream_layout_errors(tmp_path):
    (tmp_path / "train").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"no 'meta' file .*expected .*\{train,test,meta\}"):
        check_dataset("cifar100", tmp_path, "train")
    with pytest.raises(DatasetError, match=r"no 'test' file"):
        check_dataset("cifar100", tmp_path, "val")
    with pytest.raises(DatasetError, match=r"no annotations/instances_val2017\.json"):
        check_dataset("coco", tmp_path, "val")
    with pytest.raises(DatasetError, match=r"no 'images/training' folder"):
        check_dataset("ade20k", tmp_path, "train")
    with pytest.raises(DatasetError, match="unknown dataset 'mnist'"):
        check_dataset("mnist", tmp_path)


def test_class_count_mismatch(tmp_path):
    root = _jpeg_folder(tmp_path / "in")
    assert check_dataset("imagenet", root, "train", 3)["num_classes"] == 3
    with pytest.raises(DatasetError, match="3 classes in 'train' but params.yaml says num_classes: 1000"):
        check_dataset("imagenet", root, "train", 1000)


# --------------------------------------------------------------------------- loaders

def test_imagefolder_loader(tmp_path):
    root = _jpeg_folder(tmp_path / "in")
    ds = ImageFolderDataset(root, "train")
    assert ds.classes == ["a_cls", "b_cls", "c_cls"]  # sorted: the label is the sorted index
    assert len(ds) == 6 and ds.targets == [0, 0, 1, 1, 2, 2]  # notes.txt ignored
    img, label = ds[2]
    assert label == 1 and img.mode == "RGB" and img.size == (50, 40)
    assert np.asarray(img).mean() == pytest.approx(0, abs=3)  # class index 1 of b_cls was drawn with 0
    recipe = load_params(PARAMS, ["scale=paper"])["recipes"]["deit"] | {"img_size": 64}
    x, _ = ImageFolderDataset(root, "val", build_transform(recipe, is_train=True))[0]
    assert x.shape == (64, 64, 3) and x.dtype == np.uint8  # uint8 HWC: normalised and erased on the device
    x, _ = ImageFolderDataset(root, "val", build_transform(recipe, is_train=False))[5]
    assert x.shape == (3, 64, 64)


def test_cifar_pickle_loader(tmp_path):
    data, labels = _cifar_pickles(tmp_path / "c")
    ds = Cifar100Dataset(tmp_path / "c", "val")
    assert len(ds) == 6 and ds.classes == ["apple", "bus", "cat"] and ds.targets == labels
    img, label = ds[4]
    # rows are CHW: pixel (row 3, col 5) of the red channel is element 3*32+5
    assert label == labels[4] and np.asarray(img)[3, 5, 0] == data[4, 3 * 32 + 5]
    assert np.asarray(img)[3, 5, 2] == data[4, 2 * 1024 + 3 * 32 + 5]
    with open(tmp_path / "c" / "train", "wb") as f:
        pickle.dump({"data": data[:, :100], "fine_labels": labels}, f)
    with pytest.raises(DatasetError, match=r"'data' has shape \(6, 100\)"):
        Cifar100Dataset(tmp_path / "c", "train")


def test_t2t_transfer_transform():
    recipe = load_params(PARAMS, ["scale=paper"])["recipes"]["t2t_c100"] | {"img_size": 64}
    img = Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8))
    assert build_transform(recipe, True)(img).shape == (64, 64, 3)
    assert build_transform(recipe, False)(img).shape == (3, 64, 64)


def test_mixup_kwargs():
    paper = load_params(PARAMS, ["scale=paper"])
    kw = mixup_kwargs(paper["recipes"]["deit"], 1000)
    assert kw == {"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "prob": 1.0, "switch_prob": 0.5,
                  "mode": "batch", "label_smoothing": 0.1, "num_classes": 1000}
    from timm.data import Mixup
    Mixup(**kw)  # accepted by timm as is
    assert mixup_kwargs(paper["recipes"]["t2t_c100"], 100) is None


def test_samplers():
    ds = list(range(10))
    shards = [list(ShardSampler(len(ds), 3, r)) for r in range(3)]
    assert sorted(sum(shards, [])) == ds  # exact cover, no padding


# --------------------------------------------------------------------------- tiny data

def test_tiny_round_trip_through_real_loaders(tiny_root):
    from torch.utils.data import DataLoader

    params = _tiny_params(tiny_root)
    for cell, n_train in (("in1k-deit_ti-mpvg", 1000), ("c100-vit_lite-pvg", 1000), ("c100-t2t_vit_7-mpvg", 1000)):
        spec = resolve_run(params, cell)
        train, val = (build_dataset(spec.dataset, spec.dataset_root, split, build_transform(spec.recipe, split == "train"),
                                    spec.num_classes) for split in ("train", "val"))
        assert len(train.classes) == 10 and mixup_kwargs(spec.recipe, spec.num_classes) is None
        assert len(train) == n_train and len(val) == 200
        assert Counter(val.targets) == {k: 20 for k in range(10)}
        batch = spec.recipe["batch_size"]
        x, y = next(iter(build_train_loader(train, ShardSampler(len(train), 1, 0), batch, 0, False)))
        assert x.shape == (batch, 32, 32, 3) and x.dtype == torch.uint8  # collated uint8
        assert y.dtype == torch.int64 and 0 <= y.min() and y.max() < 10
        x, y = next(iter(DataLoader(val, batch_size=batch, sampler=ShardSampler(len(val), 2, 1))))
        assert x.shape == (batch, 3, 32, 32) and x.dtype == torch.float32
        assert y.tolist() == [(2 * i + 1) // 20 for i in range(batch)]  # rank 1 of 2: every second sample


def test_tiny_images_are_learnable(tiny_root):
    """Digits stay separable after the JPEG/pickle round trip: a linear probe beats chance."""
    from sklearn.linear_model import LogisticRegression

    for ds_cls, sub in ((ImageFolderDataset, "imagenet"), (Cifar100Dataset, "cifar-100-python")):
        tr, va = ds_cls(tiny_root / sub, "train"), ds_cls(tiny_root / sub, "val")
        xs = [np.stack([np.asarray(d[i][0].convert("L").resize((8, 8)), np.float32).ravel() / 255 for i in range(len(d))])
              for d in (tr, va)]
        acc = LogisticRegression(max_iter=300).fit(xs[0], tr.targets).score(xs[1], va.targets)
        assert acc > 0.5, (sub, acc)


def test_make_tiny_is_idempotent_and_atomic(tiny_root, tmp_path, monkeypatch):
    stamp = (tiny_root / "imagenet" / tiny.MARKER).stat().st_mtime_ns
    assert tiny.make_tiny(tiny_root, "imagenet") == {"imagenet": "exists"}
    assert (tiny_root / "imagenet" / tiny.MARKER).stat().st_mtime_ns == stamp

    def crash(root, seed):
        (root / "half.txt").write_text("partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(tiny, "write_cifar_layout", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        tiny.make_tiny(tmp_path, "cifar100")
    assert list(tmp_path.iterdir()) == []  # nothing half-written left behind
    (tmp_path / "cifar-100-python").mkdir()
    with pytest.raises(FileExistsError, match="not completed by `mpvg data tiny`"):
        tiny.make_tiny(tmp_path, "cifar100")


def test_make_tiny_delegates_downstream_datasets(tmp_path, monkeypatch):
    calls = []

    def fake_make_tiny(root: Path, seed: int = 0) -> None:
        calls.append(seed)
        (root / "annotations").mkdir()

    monkeypatch.setitem(sys.modules, "mpvg.data.coco", types.SimpleNamespace(make_tiny=fake_make_tiny))
    assert tiny.make_tiny(tmp_path, "coco", seed=3) == {"coco": "written"}
    assert calls == [3] and (tmp_path / "coco" / "annotations").is_dir()
    with pytest.raises(ValueError, match="unknown tiny dataset 'mnist'"):
        tiny.make_tiny(tmp_path, "mnist")


def test_data_commands(tiny_root, tmp_path, capsys):
    grid = ("grid=[{tables: [T1], task: in1k, stage: train, dataset: imagenet, models: [DeiT-Ti], methods: [MPVG]},"
            " {tables: [T2], task: c100, stage: train, dataset: cifar100, models: [ViT-Lite], methods: [MPVG]}]")
    args = ["data", "check", "--params", str(PARAMS), "--set", grid]
    assert cli.main(args + ["--set", f"datasets.imagenet.root={tmp_path / 'none'}",
                            "--set", f"datasets.cifar100.root={tiny_root / 'cifar-100-python'}"]) == 1
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"ok       cifar100: {tiny_root / 'cifar-100-python'} (train, val, 10 classes)"
    assert out.splitlines()[1].startswith(f"MISSING  imagenet (used by 1 cells): {tmp_path / 'none'} does not exist; ")
    assert len(out.splitlines()) == 3  # one line per dataset, then the summary
    assert cli.main(args + ["--set", f"datasets.imagenet.root={tiny_root / 'imagenet'}",
                            "--set", f"datasets.cifar100.root={tiny_root / 'cifar-100-python'}"]) == 0
    assert "all 2 datasets present at scale 'tiny'" in capsys.readouterr().out
    assert cli.main(["data", "tiny", "--out", str(tiny_root), "--what", "imagenet"]) == 0
    assert "already complete" in capsys.readouterr().out


def test_randaugment_posterize_zero_bits_does_not_crash():
    """Pillow 13 rejects posterize(bits=0), which timm's RandAugment inc1 produces at level 10."""
    from timm.data.auto_augment import rand_augment_transform

    recipe = load_params(PARAMS, ["scale=paper"])["recipes"]["deit"] | {"img_size": 32}
    build_transform(recipe, is_train=True)  # installs the compat op
    ra = rand_augment_transform("rand-n1-m10-inc1", {})
    ra.ops = [op for op in ra.ops if op.name == "PosterizeIncreasing"]
    ra.ops[0].prob = 1.0
    img = Image.fromarray(np.full((8, 8, 3), 200, dtype=np.uint8))
    assert np.asarray(ra(img)).max() == 0  # 0 bits kept: black, as with Pillow < 13
