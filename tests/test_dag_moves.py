"""The researcher's moves after a finished tiny DAG: the exact plan of `snakemake -n` per move, the
same plan from DVC, and nothing rerun by file times (docs/workflow.md, "The rerun rule").

A finished DAG is made in seconds instead of trained: every run's result.json is stamped with the
signature the current params give it (computed here from the definition in mpvg.signature, so the
planner is checked, not reused), checkpoints are placeholders, analyze/report carry their records.
The real rerun of one move through to the report is test_a_changed_recipe_reruns_to_the_report.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from conftest import run, wait_until_no_process_in
from mpvg.config import load_params, resolve_run
from mpvg.signature import cell_inputs, digest
from mpvg.workflow import plan as wf

pytestmark = pytest.mark.usefixtures("tiny_datasets")


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    from mpvg.data.tiny import make_tiny

    root = tmp_path_factory.mktemp("dagdata") / "tiny"
    make_tiny(root)
    return root


@pytest.fixture
def tiny_datasets(workdir, tiny_data_dir):
    shutil.copytree(tiny_data_dir, workdir / "data" / "tiny")


def git_commit_all(repo: Path) -> None:
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True, capture_output=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "state", "--allow-empty"],
                   cwd=repo, check=True, capture_output=True)


def fabricate_finished(repo: Path, overrides: list[str] | None = None) -> list:
    """Every output of the DAG as a finished run of the current params would leave it."""
    cwd = os.getcwd()
    os.chdir(repo)  # dataset roots and run folders are relative to the project
    try:
        params = load_params("params.yaml", overrides)
        jobs = wf.build_plan(params)
        by_out = {o: j for j in jobs for o in j.outs}
        signature: dict = {}
        for job in jobs:
            if job.cell:
                parent = next((by_out[d] for d in job.deps if d in by_out and by_out[d].cell), None)
                inputs = cell_inputs(resolve_run(params, job.cell), job.seed,
                                     signature[parent.outs[0]] if parent else None)
                signature[job.outs[0]] = digest(inputs)
                folder = Path(job.outs[0]).parent
                folder.mkdir(parents=True, exist_ok=True)
                (folder / "checkpoint.pt").write_bytes(b"placeholder")
                (folder / "scores.json").write_text('{"top1": 50.0}\n')
                (folder / "history.json").write_text('[{"epoch": 1, "train_loss": 1.0}]\n')
                result = {"cell": job.cell, "stage": job.rule, "seed": job.seed, "scale": params["scale"],
                          "metrics": {"top1": 50.0, "top5": 90.0, "loss": 1.0, "bbox_ap": 1.0, "segm_ap": 1.0,
                                      "miou": 1.0},
                          "signature": signature[job.outs[0]], "signature_inputs": inputs, "git_commit": "f00"}
                Path(job.outs[0]).write_text(json.dumps(result))
        from mpvg.workflow.state import seen_record

        figures = Path(params["paths"]["reports"]) / "figures"
        figures.mkdir(parents=True, exist_ok=True)
        (figures / "analysis.json").write_text(json.dumps({"figures": {}, **seen_record(params, "analyze")}))
        reports = Path(params["paths"]["reports"])
        for name in wf.REPORT_FILES:
            (reports / name).write_text("made\n")
        for metrics in next(j for j in jobs if j.rule == "report").metrics:  # DVC's metrics, one per table
            Path(metrics).parent.mkdir(parents=True, exist_ok=True)
            Path(metrics).write_text("{}\n")
        (reports / "build.json").write_text(json.dumps(seen_record(params, "report")))
        return jobs
    finally:
        os.chdir(cwd)


def planned(repo: Path, *args: str) -> dict[str, set]:
    """``{rule: {first output of each job}}`` of `snakemake -n` (the final `all` and the stale markers'
    jobs left out: rule `stale` makes an input that tells Snakemake a job must run)."""
    res = run(["snakemake", "-n", *args], repo, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:]
    jobs: dict[str, set] = {}
    rule = None
    for line in res.stdout.splitlines():
        m = re.match(r"^(?:local)?rule (\w+):$", line)
        if m:
            rule = m.group(1)
        elif rule and line.strip().startswith("output: "):
            jobs.setdefault(rule, set()).add(sorted(line.strip()[len("output: "):].split(", "))[0])
            rule = None
        elif rule and not line.strip():
            if rule != "all":
                jobs.setdefault(rule, set())
            rule = None
    jobs.pop("all", None)
    jobs.pop("stale", None)
    return jobs


def counts(plan: dict[str, set]) -> dict[str, int]:
    return {rule: len(outs) for rule, outs in plan.items() if outs}


def dvc_plan(repo: Path) -> dict[str, set]:
    """What DVC reruns, asked of DVC: once the settings stage has written each run's settings file,
    the stages `dvc status` finds changed and every stage downstream of them in DVC's own graph
    (`dvc dag --full --dot`; a rerun run writes a new result.json; data_tiny's rerun makes the same
    data), as ``{rule: {first output}}``; the plan only names each stage's output. (`dvc repro --dry`
    cannot be asked here: it stops at the first dependency that a stage before it would make, such
    as a result.json that the Snakemake plan before set aside.)"""
    res = run(["dvc", "repro", "--single-item", "signatures"], repo, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:]
    status = run(["dvc", "status", "--json"], repo, timeout=300)
    assert status.returncode == 0, status.stdout[-3000:]
    todo = set(json.loads(status.stdout or "{}")) - {"signatures"}
    dag = run(["dvc", "dag", "--full", "--dot"], repo, timeout=300)
    assert dag.returncode == 0, dag.stdout[-3000:]
    edges = re.findall(r'"([^"]+)" -> "([^"]+)"', dag.stdout)
    assert edges, dag.stdout[-2000:]
    grew = True
    while grew:
        grew = False
        for a, b in edges:
            if a in todo and a != "data_tiny" and b not in todo:
                todo.add(b)
                grew = True
    by_name = {j.stage_name: j for j in wf.build_plan(load_params(repo / "params.yaml"))}
    assert todo <= set(by_name), todo - set(by_name)
    plan: dict[str, set] = {}
    for name in todo:
        job = by_name[name]
        if not job.target:
            plan.setdefault(job.rule, set()).add(sorted(job.outs)[0])
    return plan


def commit_dvc_state(repo: Path) -> None:
    res = run(["mpvg", "workflow", "signatures"], repo)
    assert res.returncode == 0, res.stdout
    res = run(["dvc", "commit", "--force", "--quiet"], repo, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:]
    git_commit_all(repo)


@pytest.fixture(scope="module")
def committed_dag(tmp_path_factory, tiny_data_dir) -> Path:
    """A finished tiny DAG (:func:`fabricate_finished`) with its DVC state committed, made once per
    module: `dvc commit` of the whole DAG is ~10 s, and the moves that compare with DVC each start
    from a copy of it (:func:`finished_and_committed`)."""
    from conftest import copy_workflow

    repo = copy_workflow(tmp_path_factory.mktemp("committed") / "repo")
    shutil.copytree(tiny_data_dir, repo / "data" / "tiny")
    fabricate_finished(repo)
    commit_dvc_state(repo)
    return repo


def finished_and_committed(workdir: Path, committed: Path) -> None:
    """``workdir`` becomes a copy of :func:`committed_dag` (files, git and DVC state; new inodes,
    so DVC hashes the files again, as after a clone)."""
    shutil.rmtree(workdir)
    shutil.copytree(committed, workdir, symlinks=True)


def edit_params(repo: Path, edit) -> None:
    """Change params.yaml as a researcher would (and regenerate dvc.yaml when the grid changes)."""
    data = yaml.safe_load((repo / "params.yaml").read_text())
    edit(data)
    (repo / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


# ------------------------------------------------------------------------------ the moves
def test_a_finished_dag_has_nothing_to_do_whatever_the_file_times(workdir):
    fabricate_finished(workdir)
    res = run(["snakemake", "-n"], workdir)
    assert res.returncode == 0 and "Nothing to be done" in res.stdout, res.stdout[-2000:]
    assert "jobs must run" not in res.stdout
    # touch every file, in an order that makes inputs newer than what depends on them
    files = sorted(p for p in workdir.rglob("*") if p.is_file() and ".git" not in p.parts)
    now = time.time()
    for i, path in enumerate(reversed(files)):
        os.utime(path, (now + i, now + i))
    res = run(["snakemake", "-n"], workdir)
    assert "Nothing to be done" in res.stdout, res.stdout[-2000:]


def test_a_restore_with_fresh_files_reruns_nothing(workdir, tmp_path):
    """As `dvc checkout` / `dvc pull` do: the outputs come back as new files."""
    fabricate_finished(workdir)
    for folder in ("runs", "reports"):
        shutil.copytree(workdir / folder, tmp_path / folder)
        shutil.rmtree(workdir / folder)
        shutil.copytree(tmp_path / folder, workdir / folder, copy_function=shutil.copy)  # new mtimes
    res = run(["snakemake", "-n"], workdir)
    assert res.returncode == 0 and "Nothing to be done" in res.stdout, res.stdout[-2000:]


T2T = ["default", "lape", "pvg", "mpvg"]


@pytest.mark.parametrize("move, expected", [
    # one recipe value: the 4 T2T-ViT-7 ImageNet runs, the CIFAR-100 runs that start from them,
    # the figures (they read ImageNet checkpoints) and the report
    (lambda p: p["tiny"]["recipes"]["t2t"].__setitem__("epochs", 4),
     {"train": 4, "finetune": 4, "analyze": 1, "report": 1}),
    # one model's PE override: only that cell (Swin-Ti PVG), the figures and the report
    (lambda p: p["models"]["Swin-Ti"]["method_pe_overrides"]["PVG"].__setitem__("include_layer0", False),
     {"train": 1, "analyze": 1, "report": 1}),
])
def test_a_changed_setting_reruns_exactly_its_runs_and_everything_downstream(workdir, committed_dag, move, expected):
    finished_and_committed(workdir, committed_dag)
    edit_params(workdir, move)
    smk = planned(workdir)
    assert counts(smk) == expected
    assert smk == dvc_plan(workdir)  # the same rerun rule in DVC


def test_a_deleted_result_reruns_that_run_and_what_starts_from_it(workdir, committed_dag):
    finished_and_committed(workdir, committed_dag)
    gone = workdir / "runs/train/in1k-deit_ti-mpvg/seed0/result.json"
    gone.unlink()
    smk = planned(workdir)
    assert counts(smk) == {"train": 1, "detect": 1, "segment": 1, "analyze": 1, "report": 1}
    assert "runs/detect/coco-deit_ti-mpvg/seed0/result.json" in smk["detect"]
    assert smk == dvc_plan(workdir)


def test_a_deleted_report_folder_reruns_the_figures_and_the_report_only(workdir):
    fabricate_finished(workdir)
    shutil.rmtree(workdir / "reports")
    assert counts(planned(workdir)) == {"analyze": 1, "report": 1}


def test_a_new_seed_adds_its_runs_and_the_report(workdir):
    fabricate_finished(workdir)
    plan = planned(workdir, "--config", 'set=["seeds=[0,1]"]')
    cells = wf.expand_cells(load_params(workdir / "params.yaml"))
    new = {c.stage: 0 for c in cells.values()}
    for c in cells.values():
        new[c.stage] += 1
    assert counts(plan) == {**new, "analyze": 1, "report": 1}
    assert all("/seed1/" in out for rule in wf.CELL_STAGES for out in plan.get(rule, ()))


def test_a_target_table_plans_only_its_runs_and_their_start_points(workdir):
    fabricate_finished(workdir)
    edit_params(workdir, lambda p: p["tiny"]["recipes"]["t2t"].__setitem__("epochs", 4))
    edit_params(workdir, lambda p: p["tiny"]["recipes"]["deit"].__setitem__("epochs", 4))  # not in Table 2
    plan = planned(workdir, "table2")
    assert counts(plan) == {"train": 4, "finetune": 4}
    assert all("t2t_vit_7" in out for out in plan["train"])
    res = run(["snakemake", "-n", "table2"], workdir)
    assert "rule table2:" in res.stdout or "localrule table2:" in res.stdout


def test_dvc_exp_run_applies_the_override_reruns_the_stage_and_keeps_params_byte_stable(workdir):
    """`dvc exp run -S` on one stage: its settings changed, so that run (alone) trains again with
    the new value; params.yaml differs from before only in the changed line. `dvc exp show` with
    the README's per-table view (TABLES_VIEW) shows one column per table cell and metric, and
    nothing else (DVC drops the file prefix of a name that only one metrics file has)."""
    fabricate_finished(workdir)
    (workdir / "reports/metrics/table2.json").write_text(json.dumps(
        {"c100-vit_lite-mpvg": {"top1": 65.5}, "c100-vit_lite-pvg": {"top1": 73.0}}))
    for table in ("table1", "table6"):
        (workdir / f"reports/metrics/{table}.json").write_text(json.dumps({"in1k-deit_ti-mpvg": {"top1": 76.5}}))
    commit_dvc_state(workdir)
    before = (workdir / "params.yaml").read_text().splitlines()
    stage = "train@c100-vit_lite-mpvg-seed0"
    res = run(["dvc", "exp", "run", stage, "-S", "tiny.recipes.vit_lite_c100.epochs=1"], workdir, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:]
    after = (workdir / "params.yaml").read_text().splitlines()
    changed = [(a, b) for a, b in zip(before, after) if a != b]
    assert len(before) == len(after) and len(changed) == 1, changed
    assert changed[0][1].strip().startswith("epochs: 1")
    assert f"Running stage '{stage}'" in res.stdout, res.stdout[-3000:]
    assert res.stdout.count("Running stage 'train@") == 1  # no other run
    result = json.loads((workdir / "runs/train/c100-vit_lite-mpvg/seed0/result.json").read_text())
    assert result["signature_inputs"]["recipe"]["epochs"] == 1 and len(result["history"]) == 1
    show = run(["dvc", "exp", "show", "--no-pager", "--json"], workdir)
    assert show.returncode == 0 and "scores.json" in show.stdout
    show = run(["dvc", "exp", "show", "--no-pager", "--csv", *TABLES_VIEW], workdir)
    assert show.returncode == 0, show.stdout[-3000:]
    header, *rows = show.stdout.splitlines()
    assert sorted(header.split(",")) == ["Experiment", "c100-vit_lite-mpvg.top1", "c100-vit_lite-pvg.top1",
                                         "reports/metrics/table1.json:in1k-deit_ti-mpvg.top1",
                                         "reports/metrics/table6.json:in1k-deit_ti-mpvg.top1"], header
    assert sorted(rows[0].split(",")[1:]) == ["65.5", "73.0", "76.5", "76.5"], rows


TABLES_VIEW = ["--drop", ".*", "--keep", "^(Experiment|reports/metrics/.*|(in1k|c100|coco|ade20k)-.*)$"]


def test_seeds_changed_under_dvc_stop_with_what_to_run(workdir, committed_dag):
    finished_and_committed(workdir, committed_dag)
    edit_params(workdir, lambda p: p.__setitem__("seeds", [0, 1]))
    res = run(["dvc", "repro", "--single-item", "signatures"], workdir, timeout=300)
    assert res.returncode != 0
    assert "params.yaml now plans stages that dvc.yaml lacks (train@in1k-deit_ti-default-seed1" in res.stdout
    assert "run `mpvg workflow dvc-yaml`" in res.stdout


# ------------------------------------------------------------------------------ real runs
def small_grid(repo: Path) -> None:
    """Only Table 2's ViT-Lite cells, one epoch each: a real DAG of a minute."""
    data = yaml.safe_load((repo / "params.yaml").read_text())
    data["grid"] = [g for g in data["grid"] if g["task"] == "c100" and g["stage"] == "train"]
    data["tiny"]["recipes"]["vit_lite_c100"]["epochs"] = 1
    (repo / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    res = run(["mpvg", "workflow", "dvc-yaml"], repo)
    assert res.returncode == 0, res.stdout


def results(repo: Path) -> dict[str, bytes]:
    return {str(p.relative_to(repo)): p.read_bytes() for p in sorted((repo / "runs").glob("*/*/seed*/result.json"))}


@pytest.mark.slow  # about 2 minutes: the one real rerun of the suite
def test_a_changed_recipe_reruns_to_the_report(workdir):
    """The real thing for one move: a finished small DAG, one recipe value changed, the same
    command: those runs train again from scratch (old state kept aside) and the report shows
    the new numbers, none stale."""
    small_grid(workdir)
    first = run(["snakemake", "--cores", "2"], workdir, timeout=900)
    assert first.returncode == 0, first.stdout[-4000:]
    before = results(workdir)
    assert len(before) == 4
    edit_params(workdir, lambda p: p["tiny"]["recipes"]["vit_lite_c100"].__setitem__("epochs", 2))
    assert counts(planned(workdir)) == {"train": 4, "report": 1}
    second = run(["snakemake", "--cores", "2"], workdir, timeout=900)
    assert second.returncode == 0, second.stdout[-4000:]
    after = results(workdir)
    for path, data in after.items():
        result = json.loads(data)
        assert data != before[path] and len(result["history"]) == 2  # trained again, 2 epochs
        kept = list((workdir / path).parent.glob("previous/*/result.json"))
        assert len(kept) == 1 and kept[0].read_bytes() == before[path]
    table2 = (workdir / "reports/table2.md").read_text()
    assert "stale" not in table2.split("Paper: the paper's value")[0]
    build = json.loads((workdir / "reports/build.json").read_text())
    assert build["stale"] == {} and build["finished"] == 4
    assert "Nothing to be done" in run(["snakemake", "-n"], workdir).stdout
    status = run(["mpvg", "status"], workdir)
    assert status.returncode == 0 and "T2: 4 finished" in status.stdout, status.stdout


def interrupt_dag(repo: Path, sig: int) -> subprocess.CompletedProcess:
    """Start the small DAG and, once the first run has finished, stop it as a user does: Ctrl-C
    (SIGINT to the terminal's foreground process group: Snakemake and the jobs it started), or
    `kill -9` of Snakemake alone."""
    import signal

    from conftest import tool_env

    proc = subprocess.Popen(["snakemake", "--cores", "2"], cwd=repo, env=tool_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 600
    while not list((repo / "runs/train").glob("*/seed0/result.json")):
        assert proc.poll() is None and time.monotonic() < deadline, "no run finished"
        time.sleep(0.2)
    if sig == signal.SIGINT:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    out = proc.communicate(timeout=300)[0]
    return subprocess.CompletedProcess(proc.args, proc.returncode, out)


@pytest.mark.slow
@pytest.mark.parametrize("sig_name", ["SIGINT", "SIGKILL"])
def test_the_same_command_completes_an_interrupted_dag(workdir, sig_name):
    """Ctrl-C or a kill of Snakemake mid-run: the same command completes the DAG, keeps every
    result that had finished and trains none of them again. After SIGKILL the start-up check
    names the exact unlock command; the jobs saw their parent die and stopped."""
    import signal

    small_grid(workdir)
    stopped = interrupt_dag(workdir, getattr(signal, sig_name))
    assert stopped.returncode != 0, stopped.stdout[-4000:]
    wait_until_no_process_in(workdir)  # jobs of a killed Snakemake notice their parent is gone at their next step
    done = {p: d for p, d in results(workdir).items()}
    assert done
    again = run(["snakemake", "--cores", "2"], workdir, timeout=900)
    if sig_name == "SIGKILL" and again.returncode != 0:
        assert "Remove it with\n    snakemake --unlock --cores 2" in again.stdout, again.stdout[-3000:]
        unlock = run(["snakemake", "--unlock", "--cores", "2"], workdir)
        assert unlock.returncode == 0, unlock.stdout[-2000:]
        again = run(["snakemake", "--cores", "2"], workdir, timeout=900)
    assert again.returncode == 0, again.stdout[-4000:]
    final = results(workdir)
    assert len(final) == 4
    for path, data in done.items():  # finished before the interruption: byte for byte the same
        assert final[path] == data, path
        assert (workdir / path).parent.joinpath("log.txt").read_text().count(" INFO training ") == 1  # trained once
    assert "Nothing to be done" in run(["snakemake", "-n"], workdir).stdout
