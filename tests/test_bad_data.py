"""Data that lies is found before work: mismatched class folders, undecodable images (also in
DataLoader workers and through `mpvg train`), COCO annotation faults, ADE20K pairs, and
`mpvg data check [--deep]`.  docs/reliability.md ("Bad data") lists each case with its test."""
from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mpvg import cli
from mpvg.data import DatasetError, check_dataset, imagefolder_samples
from mpvg.data import ade20k, coco, integrity
from mpvg.data.classification import ImageFolderDataset, build_dataset

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params.yaml"
IMAGENET_GRID = "grid=[{tables: [T1], task: in1k, stage: train, dataset: imagenet, models: [DeiT-Ti], methods: [MPVG]}]"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def imagenet_folder(root: Path, train=tuple(f"c{k}" for k in range(10)), val=None, per_class=2) -> Path:
    """``root/{train,val}/<class>/<k>.JPEG``, 16x16 images; ``val`` defaults to the train classes."""
    for split, classes in (("train", train), ("val", train if val is None else val)):
        for ci, cls in enumerate(classes):
            d = root / split / cls
            d.mkdir(parents=True)
            for k in range(per_class):
                Image.fromarray(np.full((16, 16, 3), 20 * ci + k, dtype=np.uint8)).save(d / f"{k}.JPEG")
    return root


def corrupt(path: Path, how: str) -> Path:
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "text": b"not an image"}[how])
    return path


# ------------------------------------------------------------------------------ class folders
def test_val_class_names_must_match_train(tmp_path):
    root = imagenet_folder(tmp_path / "in", train=["apple", "bus", "cat"], val=["apple", "bus", "dog"])
    expected = (f"the class folders of {root / 'train'} (3) and {root / 'val'} (3) differ: 1 only in {root / 'train'}, "
                f"e.g. 'cat'; 1 only in {root / 'val'}, e.g. 'dog'; a label is the index of its sorted class name, "
                "so both splits need the same class folders")
    for split in ("train", "val"):
        with pytest.raises(DatasetError) as err:
            check_dataset("imagenet", root, split, 3)
        assert str(err.value) == expected
    with pytest.raises(DatasetError, match=re.escape(expected)):
        build_dataset("imagenet", root, "val")
    shutil.rmtree(root / "val" / "dog")
    (root / "val" / "cat").mkdir()  # same names again, but an empty class folder
    with pytest.raises(DatasetError, match=rf"{root / 'val'}: 1 of 3 class folders hold no images \('cat'\)"):
        imagefolder_samples(root / "val")


def test_mpvg_train_stops_before_training_on_mismatched_classes(tmp_path, capsys):
    from test_training import write_params

    root = imagenet_folder(tmp_path / "data" / "imagenet", val=[f"c{k}" for k in range(9)] + ["x9"])
    params = write_params(tmp_path, tmp_path / "data", epochs=1, batch_size=10)
    out = tmp_path / "run"
    assert cli.main(["train", "--params", str(params), "--cell", "in1k-deit_s-mpvg", "--out", str(out),
                     "--no-tracking", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"mpvg train: error: the class folders of {root / 'train'} (10) and {root / 'val'} (10) differ" in err
    assert "'c9'" in err and "'x9'" in err and "Traceback" not in err
    assert not (out / "checkpoint.pt").exists()


# ------------------------------------------------------------------------------ undecodable images
@pytest.mark.parametrize("how, pil_error", [("truncated", "OSError: Truncated File Read"),
                                            ("empty", "UnidentifiedImageError: cannot identify image file"),
                                            ("text", "UnidentifiedImageError: cannot identify image file")])
def test_undecodable_image_is_an_error_naming_it(tmp_path, how, pil_error):
    root = imagenet_folder(tmp_path / "in", per_class=1)
    bad = corrupt(root / "train" / "c3" / "0.JPEG", how)
    ds = ImageFolderDataset(root, "train")
    assert ds[2][1] == 2  # the others still load
    with pytest.raises(DatasetError) as err:
        ds[3]
    msg = str(err.value)
    assert msg == f"{bad}: cannot read this image ({pil_error}); `mpvg data check --deep` lists every bad file of the dataset"


def test_undecodable_image_in_a_dataloader_worker_is_one_line(tmp_path):
    root = imagenet_folder(tmp_path / "in", per_class=1)
    bad = corrupt(root / "train" / "c0" / "0.JPEG", "text")
    loader = torch.utils.data.DataLoader(ImageFolderDataset(root, "train"), num_workers=1, collate_fn=list)
    with pytest.raises(DatasetError) as err:
        next(iter(loader))
    assert str(err.value) == (f"{bad}: cannot read this image (UnidentifiedImageError: cannot identify image file); "
                              "`mpvg data check --deep` lists every bad file of the dataset (in DataLoader worker process 0)")


def test_worker_message_unwrapping_keeps_other_messages():
    wrapped = ("Caught DatasetError in DataLoader worker process 3.\nOriginal Traceback (most recent call last):\n"
               '  File "x.py", line 1, in f\nmpvg.data.DatasetError: /d/x.jpg: bad\n')
    assert str(DatasetError(wrapped)) == "/d/x.jpg: bad (in DataLoader worker process 3)"
    assert str(DatasetError("Caught DatasetError somewhere")) == "Caught DatasetError somewhere"
    assert str(DatasetError("plain: message")) == "plain: message"


def test_mpvg_train_with_a_corrupt_jpeg_exits_2_with_one_line(tmp_path, capsys):
    """Every train image is drawn in the first epoch (20 images, 2 steps of 10), in a worker process."""
    from test_training import write_params

    root = imagenet_folder(tmp_path / "data" / "imagenet")
    bad = corrupt(root / "train" / "c7" / "1.JPEG", "truncated")
    params = write_params(tmp_path, tmp_path / "data", epochs=1, batch_size=10)
    assert cli.main(["train", "--params", str(params), "--cell", "in1k-deit_s-mpvg", "--out", str(tmp_path / "run"),
                     "--workers", "1", "--no-tracking", "--quiet"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("mpvg train:")]
    assert lines == [f"mpvg train: error: {bad}: cannot read this image (OSError: Truncated File Read); "
                     "`mpvg data check --deep` lists every bad file of the dataset (in DataLoader worker process 0)"]
    assert "Traceback" not in err


# ------------------------------------------------------------------------------ deep check
def test_verify_files_lists_every_bad_file_with_any_worker_count(tmp_path):
    root = imagenet_folder(tmp_path / "in", per_class=3)
    bad = sorted([str(corrupt(root / "train" / "c1" / "2.JPEG", "empty")),
                  str(corrupt(root / "train" / "c8" / "0.JPEG", "truncated"))])
    jobs = integrity.file_jobs("imagenet", root, "train")
    assert len(jobs) == 30
    found = integrity.verify_files(jobs, workers=1, progress=False)
    assert [p for p, _ in found] == bad
    assert [problem for _, problem in found] == ["cannot read this image (UnidentifiedImageError: cannot identify image file)",
                                                 "cannot read this image (OSError: Truncated File Read)"]
    assert integrity.verify_files(jobs, workers=2, progress=False) == found
    with pytest.raises(ValueError, match="--workers 0: expected at least 1"):
        integrity.verify_files(jobs, workers=0)


def test_data_check_deep_lists_bad_files_and_exits_1(tmp_path, capsys):
    root = imagenet_folder(tmp_path / "in", per_class=2)
    args = ["data", "check", "--params", str(PARAMS), "--set", IMAGENET_GRID,
            "--set", f"datasets.imagenet.root={root}", "--deep", "--workers", "2"]
    assert cli.main(args) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [
        f"ok       imagenet: {root} (train, val, 10 classes)",
        "deep     imagenet train: 20 images decoded with 2 processes, 0 bad",
        "deep     imagenet val: 20 images decoded with 2 processes, 0 bad",
        "all 1 datasets present at scale 'tiny', every file decodes"]
    assert "imagenet train: 100%" in captured.err and "20/20" in captured.err  # the progress bar
    bad = corrupt(root / "val" / "c5" / "1.JPEG", "text")
    assert cli.main(args + ["--no-progress"]) == 1
    captured = capsys.readouterr()
    assert captured.out.splitlines()[2:] == [
        f"BAD      {bad}: cannot read this image (UnidentifiedImageError: cannot identify image file)",
        "deep     imagenet val: 20 images decoded with 2 processes, 1 bad",
        "0 of 1 datasets missing or malformed, 1 bad files at scale 'tiny'"]
    assert captured.err == ""
    assert cli.main(args[:-3]) == 0  # the cheap check does not open images
    assert cli.main(args + ["--workers", "0"]) == 2


# ------------------------------------------------------------------------------ `mpvg data check` lines
def test_data_check_one_line_per_dataset_with_the_right_advice(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative roots (data/tiny/...) must not find the checkout's demo data
    grid = ("grid=[{tables: [T1], task: in1k, stage: train, dataset: imagenet, models: [DeiT-Ti], methods: [MPVG]},"
            " {tables: [T2], task: c100, stage: train, dataset: cifar100, models: [ViT-Lite], methods: [MPVG]}]")
    base = ["data", "check", "--params", str(PARAMS), "--set", grid]
    cifar = tmp_path / "mine" / "cifar"
    assert cli.main(base + ["--set", "scale=paper", "--set", f"datasets.cifar100.root={cifar}"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        f"MISSING  cifar100 (used by 1 cells): {cifar} does not exist; expected {cifar}/{{train,test,meta}} (the python "
        "pickles of cifar-100-python.tar.gz); get cifar-100-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html, "
        f"unpacked; put it at {cifar}, or set datasets.cifar100.root in params.yaml (or --set datasets.cifar100.root=PATH)",
        "MISSING  imagenet (used by 1 cells): data/imagenet does not exist; expected data/imagenet/{train,val}/<class>/"
        "<image>.JPEG; get ImageNet-1K (ILSVRC 2012) train and val images from https://image-net.org/download.php, val "
        "sorted into the train's class folders; put it at data/imagenet, or set datasets.imagenet.root in params.yaml "
        "(or --set datasets.imagenet.root=PATH)",
        "2 of 2 datasets missing or malformed, 0 bad files (files not decoded; --deep does) at scale 'paper'"]
    assert all("mpvg data tiny" not in line for line in lines)
    # tiny scale: the default tiny roots get the generator; a real root named otherwise does not
    assert cli.main(base + ["--set", f"datasets.cifar100.root={cifar}"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("MISSING  cifar100") and "get cifar-100-python.tar.gz" in lines[0]
    assert lines[1].endswith("<image>.JPEG; run `mpvg data tiny`")
    elsewhere = tmp_path / "t" / "imagenet"
    assert cli.main(base + ["--set", f"datasets.imagenet.root={elsewhere}"]) == 1
    assert f"run `mpvg data tiny --out {elsewhere.parent}`" in capsys.readouterr().out
    # a broken dataset: BAD, every problem on its one line
    root = imagenet_folder(elsewhere, train=["a", "b"], val=["a", "c"])
    assert cli.main(base + ["--set", f"datasets.imagenet.root={root}"]) == 1
    line = capsys.readouterr().out.splitlines()[1]
    assert line.startswith(f"BAD      imagenet (used by 1 cells): the class folders of {root / 'train'} (2) and ")
    assert line.endswith(f"need the same class folders; run `mpvg data tiny --out {elsewhere.parent}` (after removing "
                         f"{root})")


# ------------------------------------------------------------------------------ COCO
def fresh_copy(module, tmp_path_factory, tmp_path: Path) -> Path:
    """A copy (in ``tmp_path``) of the tiny dataset that ``module.make_tiny`` writes once per session."""
    name = module.__name__.rsplit(".", 1)[-1]
    cache = tmp_path_factory.getbasetemp() / f"{name}-pristine"
    if not cache.exists():
        module.make_tiny(cache, seed=0)
    return Path(shutil.copytree(cache, tmp_path / name))


@pytest.fixture
def coco_copy(tmp_path_factory, tmp_path):
    return fresh_copy(coco, tmp_path_factory, tmp_path)


def _edit(root: Path, edit, split: str = "val") -> Path:
    path = root / "annotations" / f"instances_{split}2017.json"
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))
    return path


def test_coco_unknown_category_is_an_error_not_a_drop(coco_copy):
    def edit(doc):
        doc["annotations"][1]["category_id"] = 99
    ann = _edit(coco_copy, edit, "train")
    aid = json.loads(ann.read_text())["annotations"][1]["id"]
    with pytest.raises(DatasetError) as err:
        coco.CocoInstances(coco_copy, "train")
    assert str(err.value) == (f"{ann}: 1 annotations have a category_id not in 'categories', e.g. annotation {aid} "
                              "with category_id 99 (known: [1, 3, 7])")


def test_coco_truncated_and_malformed_json_name_the_file(coco_copy):
    ann = coco_copy / "annotations" / "instances_val2017.json"
    text = ann.read_text()
    ann.write_text(text[: len(text) // 2])
    with pytest.raises(DatasetError, match=rf"^{re.escape(str(ann))}: not a complete JSON object \({len(text) // 2} "
                                           r"bytes, starts b'\{\"info\": \{\"descr', ends .*; truncated\?"):
        check_dataset("coco", coco_copy, "val")
    ann.write_bytes(b"\xef\xbb\xbf" + text.encode() + b"\n")  # a BOM and a newline: still complete JSON
    check_dataset("coco", coco_copy, "val")
    assert len(coco.CocoInstances(coco_copy, "val")) == 6
    ann.write_text(text.replace('"images": [', '"images": [,', 1))  # complete-looking but invalid
    check_dataset("coco", coco_copy, "val")  # the cheap check reads only the ends
    with pytest.raises(DatasetError, match=rf"^{re.escape(str(ann))}: not valid JSON \(Expecting value at line 1 "
                                           rf"column \d+, byte \d+ of {len(text) + 1}; truncated\?\)$"):
        coco.CocoInstances(coco_copy, "val")
    ann.write_text("")
    with pytest.raises(DatasetError, match=r"not a complete JSON object \(0 bytes"):
        coco.CocoInstances(coco_copy, "val")


def test_coco_missing_keys_and_ids(coco_copy):
    ann = _edit(coco_copy, lambda doc: doc.pop("categories"))
    with pytest.raises(DatasetError) as err:
        coco.CocoInstances(coco_copy, "val")
    assert str(err.value) == (f"{ann}: 'categories' is missing; expected a COCO instances file with the lists "
                              "['images', 'annotations', 'categories'] (found keys ['annotations', 'images', 'info', "
                              "'licenses'])")
    _edit(coco_copy, lambda doc: doc.update(categories=coco.TINY_CATEGORIES))
    _edit(coco_copy, lambda doc: doc["annotations"][0].pop("bbox"))
    with pytest.raises(DatasetError, match=re.escape(f"{ann}: annotations[0] has no ['bbox']; expected every entry "
                                                     "to have ['id', 'image_id', 'category_id', 'bbox'")):
        coco.CocoInstances(coco_copy, "val")
    _edit(coco_copy, lambda doc: doc["annotations"][0].update(bbox=[0, 0, 5, 5], image_id=4242))
    with pytest.raises(DatasetError, match=re.escape(f"{ann}: 1 annotations have an image_id not in 'images', e.g. "
                                                     "annotation ") + r"\d+ with image_id 4242$"):
        coco.CocoInstances(coco_copy, "val")
    _edit(coco_copy, lambda doc: doc["annotations"].pop(0))
    _edit(coco_copy, lambda doc: doc["categories"].append(dict(doc["categories"][0])))
    with pytest.raises(DatasetError, match=re.escape(f"{ann}: categories id 1 occurs more than once")):
        coco.CocoInstances(coco_copy, "val")
    _edit(coco_copy, lambda doc: doc["categories"].pop())
    assert len(coco.CocoInstances(coco_copy, "val")) == 6


def test_coco_missing_and_mis_sized_images(coco_copy):
    (coco_copy / "val2017" / "000000001002.jpg").unlink()
    (coco_copy / "val2017" / "000000001005.jpg").unlink()
    with pytest.raises(DatasetError) as err:
        coco.CocoInstances(coco_copy, "val")
    assert str(err.value) == (f"{coco_copy / 'val2017'}: 2 of 6 images named in "
                              f"{coco_copy / 'annotations' / 'instances_val2017.json'} are missing, e.g. "
                              "'000000001002.jpg', '000000001005.jpg'")
    shutil.copy(coco_copy / "val2017" / "000000001001.jpg", coco_copy / "val2017" / "000000001002.jpg")
    shutil.copy(coco_copy / "val2017" / "000000001001.jpg", coco_copy / "val2017" / "000000001005.jpg")
    ds = coco.CocoInstances(coco_copy, "val")
    info = {i["id"]: i for i in json.loads((coco_copy / "annotations" / "instances_val2017.json").read_text())["images"]}
    w, h = Image.open(coco_copy / "val2017" / "000000001001.jpg").size
    for img_id in (1002, 1005):
        if (info[img_id]["width"], info[img_id]["height"]) != (w, h):
            with pytest.raises(DatasetError, match=rf"{img_id:012d}.jpg: decodes to {w}x{h} but .* says "
                                                   f"{info[img_id]['width']}x{info[img_id]['height']}"):
                ds.load_image(img_id)
            jobs = integrity.file_jobs("coco", coco_copy, "val")
            assert (str(coco_copy / "val2017" / f"{img_id:012d}.jpg"),
                    f"decodes to {w}x{h} but the annotations say {info[img_id]['width']}x{info[img_id]['height']}"
                    ) in integrity.verify_files(jobs, workers=1, progress=False)
            break
    else:
        pytest.fail("the tiny COCO images should not all have one size")
    corrupt(coco_copy / "val2017" / "000000001003.jpg", "truncated")
    with pytest.raises(DatasetError, match=r"000000001003\.jpg: cannot read this image \(OSError: image file is truncated"):
        ds.load_image(1003)


# ------------------------------------------------------------------------------ ADE20K
@pytest.fixture
def ade_copy(tmp_path_factory, tmp_path):
    return fresh_copy(ade20k, tmp_path_factory, tmp_path)


def test_ade20k_faults(ade_copy, capsys):
    lab_dir = ade_copy / "annotations" / "validation"
    (lab_dir / "ADE_val_00000004.png").unlink()
    expected = (f"{lab_dir}: no annotation for 1 of 6 images, e.g. 'ADE_val_00000004'; expected <name>.png next to "
                f"each {ade_copy / 'images' / 'validation'}/<name>.jpg")
    with pytest.raises(DatasetError) as err:
        check_dataset("ade20k", ade_copy, "val")  # the cheap check (and so `mpvg data check`) finds it
    assert str(err.value) == expected
    with pytest.raises(DatasetError, match=re.escape(expected)):
        ade20k.ADE20KDataset(ade_copy, "val")
    Image.new("L", (7, 5)).save(lab_dir / "ADE_val_00000004.png")  # wrong size
    Image.new("RGB", (7, 5)).save(lab_dir / "ADE_val_00000005.png")  # not single-channel
    corrupt(ade_copy / "images" / "validation" / "ADE_val_00000006.jpg", "empty")
    ds = ade20k.ADE20KDataset(ade_copy, "val")
    with pytest.raises(DatasetError, match=r"ADE_val_00000004\.png: label is 7x5 but its image .*ADE_val_00000004"
                                           r"\.jpg is \d+x\d+; `mpvg data check --deep`"):
        ds[3]
    with pytest.raises(DatasetError, match=r"ADE_val_00000005\.png: expected a single-channel label PNG, got shape "
                                           r"\(5, 7, 3\)"):
        ds[4]
    with pytest.raises(DatasetError, match=r"ADE_val_00000006\.jpg: cannot read this image \(UnidentifiedImageError"):
        ds[5]
    found = integrity.verify_files(integrity.file_jobs("ade20k", ade_copy, "val"), workers=2, progress=False)
    img4 = ade_copy / "images" / "validation" / "ADE_val_00000004.jpg"
    w, h = Image.open(img4).size
    assert found == [(str(lab_dir / "ADE_val_00000004.png"), f"label is 7x5 but its image {img4} is {w}x{h}"),
                     (str(lab_dir / "ADE_val_00000005.png"), "a RGB image; expected a single-channel label PNG"),
                     (str(ade_copy / "images" / "validation" / "ADE_val_00000006.jpg"),
                      "cannot read this image (UnidentifiedImageError: cannot identify image file)")]


def test_data_check_deep_over_all_four_datasets(tmp_path_factory, tmp_path, capsys):
    from test_data_classification import _cifar_pickles

    roots = {"imagenet": imagenet_folder(tmp_path / "in", per_class=1), "cifar100": tmp_path / "cifar",
             "coco": fresh_copy(coco, tmp_path_factory, tmp_path), "ade20k": fresh_copy(ade20k, tmp_path_factory, tmp_path)}
    _cifar_pickles(roots["cifar100"], n=20, classes=[f"k{i}" for i in range(10)])
    args = ["data", "check", "--params", str(PARAMS), "--deep", "--workers", "2", "--no-progress",
            *(f"--set=datasets.{name}.root={root}" for name, root in roots.items())]
    assert cli.main(args) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"ok       ade20k: {roots['ade20k']} (train, val)",
        "deep     ade20k train: 12 image/label pairs decoded with 2 processes, 0 bad",
        "deep     ade20k val: 6 image/label pairs decoded with 2 processes, 0 bad",
        f"ok       cifar100: {roots['cifar100']} (train, val, 10 classes)",
        "deep     cifar100 train: arrays and labels read, nothing to decode",
        "deep     cifar100 val: arrays and labels read, nothing to decode",
        f"ok       coco: {roots['coco']} (train, val)",
        "deep     coco train: 12 images decoded with 2 processes, 0 bad",
        "deep     coco val: 6 images decoded with 2 processes, 0 bad",
        f"ok       imagenet: {roots['imagenet']} (train, val, 10 classes)",
        "deep     imagenet train: 10 images decoded with 2 processes, 0 bad",
        "deep     imagenet val: 10 images decoded with 2 processes, 0 bad",
        "all 4 datasets present at scale 'tiny', every file decodes"]
    # faults only the deep check sees: a COCO image gone, CIFAR labels beyond meta's names
    (roots["coco"] / "train2017" / "000000000004.jpg").unlink()
    with open(roots["cifar100"] / "test", "wb") as f:
        pickle.dump({"data": np.zeros((20, 3072), np.uint8), "fine_labels": [12] * 20}, f)
    assert cli.main(args) == 1
    out = capsys.readouterr().out.splitlines()
    assert f"BAD      cifar100 val: {roots['cifar100'] / 'test'}: labels 12..12 but meta names 10 classes" in out
    assert (f"BAD      coco train: {roots['coco'] / 'train2017'}: 1 of 12 images named in "
            f"{roots['coco'] / 'annotations' / 'instances_train2017.json'} are missing, e.g. '000000000004.jpg'") in out
    assert out[-1] == "2 of 4 datasets missing or malformed, 0 bad files at scale 'tiny'"
