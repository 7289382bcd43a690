"""The rerun rule as Snakemake runs it (docs/workflow.md, "The rerun rule in Snakemake's terms"): a dry
run changes no file (after a params change on a finished tiny DAG it leaves every file as it was,
contents and modification times, plans the same jobs every time, and `dvc repro --dry` still works
after it); the start-of-run checks read the project's own plan; Snakemake's force verbs retrain."""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from conftest import run
from test_dag_moves import (committed_dag, counts, edit_params, fabricate_finished,  # noqa: F401
                            finished_and_committed, planned, tiny_data_dir, tiny_datasets)

pytestmark = pytest.mark.usefixtures("tiny_datasets")


def tree(repo: Path) -> dict[str, tuple]:
    """``{path: (sha256, mtime_ns)}`` of every file outside .git, .snakemake (Snakemake's own cache,
    which any dry run writes) and .dvc/tmp (DVC's)."""
    out = {}
    for path in sorted(repo.rglob("*")):
        rel = path.relative_to(repo)
        if rel.parts[0] in (".git", ".snakemake") or rel.parts[:2] == (".dvc", "tmp") or not path.is_file():
            continue
        out[str(rel)] = (hashlib.sha256(path.read_bytes()).hexdigest(), os.stat(path).st_mtime_ns)
    return out


@pytest.mark.slow  # about a minute and a half on 2 busy cores: a DVC commit of the DAG and four dry runs
def test_a_dry_run_after_a_change_changes_no_file_and_dvc_repro_dry_works_after_it(workdir, committed_dag):
    finished_and_committed(workdir, committed_dag)
    edit_params(workdir, lambda p: p["tiny"]["recipes"]["t2t"].__setitem__("epochs", 4))
    before = tree(workdir)
    first = planned(workdir)
    assert tree(workdir) == before  # nothing moved, written or touched
    assert counts(first) == {"train": 4, "finetune": 4, "analyze": 1, "report": 1}
    assert planned(workdir) == first  # the same plan again: the dry run left the files as they were
    res = run(["snakemake", "-n"], workdir)
    assert "rule stale:" in res.stdout and "runs/.stale/train@in1k-t2t_vit_7-mpvg-seed0.0" in res.stdout
    assert tree(workdir) == before
    dry = run(["dvc", "repro", "--dry"], workdir, timeout=300)
    assert dry.returncode == 0, dry.stdout[-3000:]
    # (DVC's dry run does not run the settings stage, so it cannot see which runs that stage would
    # change; it names the stage: `dvc repro signatures && dvc status` names the runs)
    assert "Running stage 'signatures'" in dry.stdout and "ERROR" not in dry.stdout, dry.stdout[-3000:]


@pytest.mark.slow  # a real Snakemake start (it stops in onstart): 15-40 s on 2 busy cores
def test_a_run_folder_still_written_stops_a_real_run_before_any_job(workdir):
    """onstart checks the lock of every run folder of the plan (not Snakemake's internal job list)."""
    from mpvg.run.folder import FolderLock

    fabricate_finished(workdir)
    shutil.rmtree(workdir / "reports")  # something to do: the figures and the report
    folder = workdir / "runs/train/c100-vit_lite-mpvg/seed0"
    lock = FolderLock(folder)
    lock.acquire()  # as a run of an earlier Snakemake still going would
    try:
        res = run(["snakemake", "--cores", "1"], workdir, timeout=300)
    finally:
        lock.release()
    assert res.returncode != 0
    assert "these run folders are still being written by earlier jobs" in res.stdout, res.stdout[-3000:]
    assert f"runs/train/c100-vit_lite-mpvg/seed0: pid {os.getpid()} on " in res.stdout, res.stdout[-3000:]
    assert not (workdir / "reports").exists()  # no job ran


def test_force_verbs_pass_retrain_to_the_runs_they_rerun_and_only_to_those(workdir):
    """`-R finetune` on a fresh DAG (one dry run): every run is planned (none made yet), and only the
    4 fine-tuning runs it forces get `--retrain` (the figures and the report are not runs)."""
    out = run(["snakemake", "-n", "-R", "finetune"], workdir).stdout
    commands = [line for line in out.splitlines() if line.startswith("Shell command: exec mpvg train ")
                or line.startswith("Shell command: exec mpvg detect train ") or " segment train " in line]
    assert len(commands) == 50, out[-3000:]
    retrain = [line for line in commands if " --retrain >> " in line]
    assert len(retrain) == 4 and all("--out runs/finetune/" in line for line in retrain)


@pytest.mark.slow  # two real runs of one tiny cell: about a minute
def test_forceall_trains_a_finished_run_of_unchanged_settings_again(workdir):
    """Snakemake deletes result.json before a forced job; the run must train again, not put its kept
    result back (which it does, cheaply, for a result.json deleted by hand)."""
    from test_dag_moves import small_grid

    small_grid(workdir)
    target = "runs/train/c100-vit_lite-mpvg/seed0/result.json"
    first = run(["snakemake", "--cores", "2", target], workdir, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:]
    folder = workdir / target.rsplit("/", 1)[0]
    before = (folder / "result.json").read_bytes()
    forced = run(["snakemake", "--cores", "2", "--forceall", target], workdir, timeout=900)
    assert forced.returncode == 0, forced.stdout[-3000:]
    assert "and those downstream, train again from scratch (--retrain" in forced.stdout, forced.stdout[-3000:]
    log = (folder / "log.txt").read_text()
    assert log.count(" INFO training ") == 1 and "restored from" not in log, log[-3000:]
    assert "moved it to" in (folder / "job.log").read_text() or "previous" in log
    kept = list(folder.glob("previous/*/result.json"))
    assert len(kept) == 1 and kept[0].read_bytes() == before  # the old result kept aside
    assert (folder / "result.json").read_bytes() != before  # a new result (its own timings)
