"""`scale: budget`: ImageNet-100 by a class filter, the budget cells and recipes, one GPU per job,
its plan and cost, and a run on the tiny data through the same code path (docs/claims.md)."""
from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest

from mpvg import cli
from mpvg.config import ConfigError, expand_cells, load_params, resolve_run
from mpvg.data import DatasetError, check_dataset, class_list, tiny
from mpvg.workflow import plan as wf
from mpvg.workflow.cost import cost_table, total_gpu_hours

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params.yaml"
DEIT_TI = ["default", "lape", "pvg", "mpvg", "mpvg-lastpe11", "mpvg-lastpe8", "mpvg-lastpe5", "mpvg-layer0",
           "mpvg-nonhier", "mpvg-noinput", "default-gap", "default-gap-lastpe0", "pvg-token", "mpvg-detach"]
METHODS = ["default", "lape", "pvg", "mpvg"]
BUDGET_CELLS = sorted([f"in1k-deit_ti-{v}" for v in DEIT_TI] + [f"in1k-t2t_vit_7-{m}" for m in METHODS]
                      + [f"c100-{model}-{m}" for model in ("vit_lite", "t2t_vit_7") for m in METHODS])


@pytest.fixture(scope="module")
def budget():
    return load_params(PARAMS, ["scale=budget", "seeds=[0,1,2]"])


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    assert tiny.make_tiny(out, "imagenet") == {"imagenet": "written"}
    return out


def _error(overrides) -> str:
    with pytest.raises(ConfigError) as err:
        load_params(PARAMS, overrides)
    return str(err.value)


# --------------------------------------------------------------------------- the scale

def test_budget_cells_recipes_and_imagenet100(budget):
    cells = expand_cells(budget)
    assert sorted(cells) == BUDGET_CELLS and len(cells) == 26
    assert cells["in1k-deit_ti-mpvg-detach"].tables == ["C1"]
    assert budget["datasets"]["imagenet"] == {"root": "data/imagenet", "num_classes": 100, "classes": "imagenet100"}
    spec = resolve_run(budget, "in1k-deit_ti-mpvg")
    assert spec.classes == tuple(class_list("imagenet100")) and len(spec.classes) == 100
    assert spec.model_kwargs == {"pe_method": "mpvg", "pe_overrides": {}, "num_classes": 100, "img_size": 224,
                                 "drop_path_rate": 0.1}  # the real DeiT-Ti: no tiny arch
    r = spec.recipe
    assert (r["epochs"], r["total_epochs"], r["warmup_epochs"], r["batch_size"]) == (100, 100, 5, 256)
    assert r["lr"] == pytest.approx(5e-4 * 256 / 512) and r["repeated_aug"] is False and r["mixup"] == 0.8
    t2t = resolve_run(budget, "in1k-t2t_vit_7-pvg").recipe
    assert (t2t["total_epochs"], t2t["batch_size"], t2t["lr"]) == (110, 256, 5e-4)
    paper = load_params(PARAMS, ["scale=paper"])
    # CIFAR-100: ViT-Lite keeps its full recipe; T2T-ViT-7 fine-tunes (full recipe) from its budget run
    assert resolve_run(budget, "c100-vit_lite-mpvg").recipe == resolve_run(paper, "c100-vit_lite-mpvg").recipe
    ft = resolve_run(budget, "c100-t2t_vit_7-lape")
    assert ft.recipe == resolve_run(paper, "c100-t2t_vit_7-lape").recipe and ft.classes is None
    assert ft.init_checkpoint(1) == Path("runs/train/in1k-t2t_vit_7-lape/seed1/checkpoint.pt")
    # an explicit --set still wins over the budget block
    assert load_params(PARAMS, ["scale=budget", "recipes.deit.epochs=7"])["recipes"]["deit"]["epochs"] == 7
    # the control cell exists at every scale
    for scale in ("tiny", "paper"):
        assert "in1k-deit_ti-mpvg-detach" in expand_cells(load_params(PARAMS, [f"scale={scale}"]))


@pytest.mark.parametrize("overrides, needle", [
    (["scale=budget", "budget.cells=[nope-*]"], "cells: pattern 'nope-*' (scale 'budget') matches no cell"),
    (["scale=budget", "budget.cells=[c100-*]"],
     "selects c100-t2t_vit_7-default but not in1k-t2t_vit_7-default, the cell it starts from"),
    (["scale=budget", "budget.datasets.imagenet.num_classes=99"],
     "datasets.imagenet: classes 'imagenet100' names 100 classes but num_classes is 99"),
    (["budget.datasets.imagenet.classes=imagenet101"], "budget.datasets.imagenet.classes: unknown class list 'imagenet101'"),
    (["datasets.cifar100.classes=[a]"], "datasets.cifar100.classes: a class subset applies to the ImageNet folders only"),
    (["datasets.imagenet.classes=[a, a]", "datasets.imagenet.num_classes=2"], "a class is listed twice"),
    (["budget.recipes.deit.epochz=1"], "budget.recipes.deit: unknown key(s) ['epochz']"),
    (["scale=budget", "cells=[zzz]"], "cells: pattern 'zzz'"),
])
def test_budget_errors_name_the_key(overrides, needle):
    assert needle in _error(overrides)


def test_packaged_imagenet100_is_the_published_list(tmp_path, monkeypatch):
    import mpvg.data as data

    names = class_list("imagenet100")
    assert len(names) == len(set(names)) == 100 and all(re.fullmatch(r"n\d{8}", n) for n in names)
    raw = (ROOT / "src/mpvg/data/imagenet100.txt").read_bytes()
    assert raw == ("\n".join(names) + "\n").encode()
    assert hashlib.sha256(raw).hexdigest() == "79f3f1552ccc478ce24bd934b4573625db584ddc1f4643ae23c994a94cb11397"
    assert names[:3] == ["n02869837", "n01749939", "n02488291"] and names[-1] == "n02090622"
    # an edited copy is refused
    for f in ("class_lists.yaml", "imagenet100.txt"):
        shutil.copy(ROOT / "src/mpvg/data" / f, tmp_path / f)
    (tmp_path / "imagenet100.txt").write_bytes(raw.replace(b"n02869837", b"n02869838"))
    monkeypatch.setattr(data, "CLASS_LISTS_FILE", tmp_path / "class_lists.yaml")
    with pytest.raises(DatasetError, match="sha256 differs"):
        data.class_list("imagenet100")


# --------------------------------------------------------------------------- class filter on tiny data

def test_class_subset_filter_on_tiny_data(tiny_root):
    from mpvg.data.classification import ImageFolderDataset, build_dataset

    root = tiny_root / "imagenet"
    full = ImageFolderDataset(root, "train")
    sub = ImageFolderDataset(root, "train", classes=["digit_7", "digit_2", "digit_5"])
    assert sub.classes == ["digit_2", "digit_5", "digit_7"]          # sorted, as a folder of only these
    assert len(sub) == 300 and len(full) == 1000 and sorted(set(sub.targets)) == [0, 1, 2]
    for path, label in sub.samples:
        assert Path(path).parent.name == sub.classes[label]
    # the same images as the full set's, relabelled
    assert {p for p, _ in sub.samples} == {p for p, t in full.samples if full.classes[t] in sub.classes}
    assert check_dataset("imagenet", root, "val", 3, ["digit_7", "digit_2", "digit_5"])["num_classes"] == 3
    with pytest.raises(DatasetError, match=r"1 of the 2 classes of the subset are not class folders there: \['n01749939'\]"):
        ImageFolderDataset(root, "val", classes=["digit_1", "n01749939"])
    with pytest.raises(DatasetError, match="3 classes in 'train' but params.yaml says num_classes: 4"):
        build_dataset("imagenet", root, "train", None, 4, ["digit_1", "digit_2", "digit_3"])
    with pytest.raises(DatasetError, match="ImageNet class folders only"):
        build_dataset("cifar100", root, "train", None, None, ["digit_1"])


def budget_on_tiny(tiny_root: Path, *extra: str) -> dict:
    """The budget scale with the tiny data in place of ImageNet: 3 digit classes, DeiT-Ti shrunk."""
    return load_params(PARAMS, [
        "scale=budget", f"datasets.imagenet.root={tiny_root / 'imagenet'}", "datasets.imagenet.num_classes=3",
        "datasets.imagenet.classes=[digit_1, digit_4, digit_7]",
        "models.DeiT-Ti.arch={embed_dim: 32, depth: 12, num_heads: 2, patch_size: 8}",
        "recipes.deit.img_size=32", "recipes.deit.epochs=1", "recipes.deit.warmup_epochs=0",
        "recipes.deit.batch_size=32", "recipes.deit.workers=0", *extra])


def test_data_check_reads_the_subset(tiny_root, tmp_path, capsys):
    common = ["data", "check", "--params", str(PARAMS), "--set", "scale=budget", "--set", "cells=[in1k-deit_ti-mpvg]",
              "--set", f"datasets.imagenet.root={tiny_root / 'imagenet'}", "--set", "datasets.imagenet.num_classes=2"]
    assert cli.main(common + ["--set", "datasets.imagenet.classes=[digit_3, digit_8]"]) == 0
    assert f"ok       imagenet: {tiny_root / 'imagenet'} (train, val, 2 classes)" in capsys.readouterr().out
    assert cli.main(common + ["--set", "datasets.imagenet.classes=[digit_3, n01749939]"]) == 1
    assert "BAD      imagenet (used by 1 cells)" in capsys.readouterr().out
    assert cli.main(common[:-2]) == 1  # ImageNet-100 itself: its classes are not in the tiny folders
    assert "100 of the 100 classes of the subset are not class folders there: ['n01558993'" in capsys.readouterr().out


def test_budget_scale_trains_on_tiny_data_through_the_same_code_path(tiny_root, tmp_path, one_torch_thread):
    from mpvg.training.engine import RunOptions, train

    params = budget_on_tiny(tiny_root)
    spec = resolve_run(params, "in1k-deit_ti-mpvg-detach")
    assert spec.scale == "budget" and spec.classes == ("digit_1", "digit_4", "digit_7")
    assert spec.recipe["randaugment"] == "rand-m9-mstd0.5-inc1" and spec.recipe["mixup"] == 0.8  # DeiT's recipe
    train(spec, RunOptions(out_dir=tmp_path / "run", quiet=True, device="cpu"))
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert (result["scale"], result["cell"], result["epochs"]) == ("budget", "in1k-deit_ti-mpvg-detach", 1)
    assert result["pe"]["last_ln_pe_detach"] is True and result["pe"]["last_ln_pe"] == 0
    assert 0 <= result["metrics"]["top1"] <= 100
    import torch

    state = torch.load(tmp_path / "run" / "checkpoint.pt", map_location="cpu", weights_only=False)["model"]
    assert state["head.weight"].shape == (3, 32)  # three classes of the subset


# --------------------------------------------------------------------------- plan and cost

def test_budget_plan_one_gpu_per_job(budget, tmp_path):
    jobs = wf.build_plan(budget, str(PARAMS), ["scale=budget", "seeds=[0,1,2]"])
    cell_jobs = [j for j in jobs if j.cell]
    assert sorted({j.cell for j in cell_jobs}) == BUDGET_CELLS and len(cell_jobs) == 26 * 3
    assert "data_tiny" not in {j.rule for j in jobs}
    for j in cell_jobs:
        assert j.resources["gpu"] == 1 and j.argv()[0] == "mpvg"
        assert j.resources["cpus_per_task"] == wf.CPUS_PER_GPU and j.resources["mem_mb"] == 48_000
        assert "--set" in j.args and "scale=budget" in j.args
    by_key = {j.key: j for j in cell_jobs}
    # runtime: GPU-hours x 1.3, rounded up to 10 min; e.g. DeiT-Ti 100 x 130,000 / 2500 / 3600 = 1.44 h -> 1.88 h
    runtime = {c: by_key[f"{c}-seed0"].resources["runtime"] for c in
               ("in1k-deit_ti-mpvg", "in1k-t2t_vit_7-mpvg", "c100-vit_lite-mpvg", "c100-t2t_vit_7-mpvg")}
    assert runtime == {"in1k-deit_ti-mpvg": 120, "in1k-t2t_vit_7-mpvg": 180, "c100-vit_lite-mpvg": 60,
                       "c100-t2t_vit_7-mpvg": 40}
    ft = by_key["c100-t2t_vit_7-mpvg-seed2"]
    assert "runs/train/in1k-t2t_vit_7-mpvg/seed2/result.json" in ft.deps
    # the DVC params of a budget cell include the budget block's keys, not the tiny block's
    assert by_key["in1k-deit_ti-pvg-seed0"].params == [
        "scale", "models.DeiT-Ti", "recipes.deit", "datasets.imagenet", "budget.recipes.deit", "budget.datasets.imagenet"]
    assert wf.external_datasets(budget) == {"cifar100": "data/cifar-100-python", "imagenet": "data/imagenet"}
    # the run signature holds the class list
    from mpvg.config import resolve_run
    from mpvg.signature import cell_inputs

    sig = cell_inputs(resolve_run(budget, "in1k-deit_ti-mpvg"), 0, fingerprint=False)
    assert sig["dataset"]["classes"] == list(class_list("imagenet100"))
    assert cell_inputs(resolve_run(budget, "c100-vit_lite-mpvg"), 0, fingerprint=False)["dataset"]["classes"] is None


def test_budget_cost_three_seeds_under_five_percent_of_one_paper_seed(budget, capsys):
    paper = load_params(PARAMS, ["scale=paper"])
    deit = wf.paper_gpu_hours(budget, expand_cells(budget)["in1k-deit_ti-mpvg"])
    assert deit == pytest.approx(100 * 100 * 1300 / 2500 / 3600)       # 100 epochs x 100 classes x <= 1300 images
    t2t = wf.paper_gpu_hours(budget, expand_cells(budget)["in1k-t2t_vit_7-mpvg"])
    assert t2t == pytest.approx(110 * 100 * 1300 / 1800 / 3600)
    three = total_gpu_hours(budget, seeds=3)
    assert three == pytest.approx(3 * total_gpu_hours(budget, seeds=1))
    assert three < 0.05 * total_gpu_hours(paper, seeds=1)
    assert total_gpu_hours(paper, seeds=3) == pytest.approx(3 * total_gpu_hours(paper))
    # `mpvg workflow cost --set scale=budget --seeds 3 --by-model` is the README's budget table
    assert cli.main(["workflow", "cost", "--params", str(PARAMS), "--set", "scale=budget", "--seeds", "3",
                     "--by-model"]) == 0
    out = capsys.readouterr().out.strip()
    assert out == cost_table(budget, by_model=True, seeds=3, reference=total_gpu_hours(paper, seeds=1))
    assert out in (ROOT / "README.md").read_text()
    assert re.search(r"\*\*total\*\* \(26 cells x 3 seed\(s\)\) \| \| \| \| \| \*\*\d+\*\* = [0-4]\.\d % of one", out)
    # cells at the budget scale: one GPU each
    assert cli.main(["cells", "--params", str(PARAMS), "--set", "scale=budget"]) == 0
    rows = capsys.readouterr().out.strip().splitlines()[1:]
    assert sorted(r.split()[0] for r in rows) == BUDGET_CELLS and {r.split()[4] for r in rows} == {"1"}
    assert cli.main(["workflow", "cost", "--params", str(PARAMS), "--set", "scale=tiny"]) == 2


def test_report_plans_the_gpu_hours_of_its_seeds(budget, tmp_path):
    from mpvg.reporting.commands import report_inputs
    from mpvg.reporting.planned import build_planned_cost_table
    from mpvg.reporting.report import build_reports

    inputs = report_inputs(budget, expand_cells(budget), tmp_path / "runs")
    t = build_planned_cost_table(budget, inputs["planned"])
    rows = {r[0].text: [e.text for e in r] for r in t.rows}
    assert rows["in1k-deit_ti-* (14 cells)"][2:] == ["1", "1.4", f"{14 * 3 * 100 * 130_000 / 2500 / 3600:.1f}"]
    assert rows["Total"][4] == f"{total_gpu_hours(budget, seeds=3):.0f}" == "101"
    tiny = load_params(PARAMS)
    assert build_planned_cost_table(tiny, report_inputs(tiny, expand_cells(tiny), tmp_path / "runs")["planned"]) \
        is None                                                           # tiny: nothing planned
    build_reports(budget, expand_cells(budget), tmp_path / "runs", tmp_path / "reports", **inputs)
    assert "Planned GPU-hours for 3 seed(s)" in (tmp_path / "reports" / "cost-plan.md").read_text()
    claims = (tmp_path / "reports" / "claims.md").read_text()
    assert "Scale: budget (ImageNet-100" in claims and "pending: not in grid" in claims
