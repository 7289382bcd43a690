"""The plan's set-aside of a stale run (mpvg.workflow.state.set_aside_not_current) on the files as
the run layer leaves them: result.json and its kept copy are two hard links to one file."""
import json
import os

from mpvg.run.layout import KEPT, RESULT
from mpvg.workflow.plan import Job
from mpvg.workflow.state import JobState, set_aside_not_current


def _finished_run(folder):
    folder.mkdir(parents=True)
    result = folder / RESULT
    result.write_text(json.dumps({"signature": "old"}))
    os.link(result, folder / KEPT)  # what the run layer does when it publishes
    return result


def test_a_stale_result_that_is_already_kept_becomes_a_missing_output(tmp_path):
    result = _finished_run(tmp_path / "runs/train/c100-vit_lite-mpvg/seed0")
    job = Job(rule="train", key="c100-vit_lite-mpvg-seed0", args=[], deps=[], outs=[str(result)],
              cell="c100-vit_lite-mpvg", seed=0)
    state = JobState("train", job.key, "stale", ["recipe.epochs: 1 -> 2"], needs_run=True)
    moved = set_aside_not_current([job], {(job.rule, job.key): state})
    assert moved == [f"{result} -> {KEPT}"]
    assert not result.exists()  # rename(2) between two links to one file would have left it
    assert json.loads((result.parent / KEPT).read_text()) == {"signature": "old"}


def test_a_current_result_stays(tmp_path):
    result = _finished_run(tmp_path / "runs/train/c100-vit_lite-mpvg/seed0")
    job = Job(rule="train", key="k", args=[], deps=[], outs=[str(result)], cell="c100-vit_lite-mpvg", seed=0)
    assert set_aside_not_current([job], {("train", "k"): JobState("train", "k", "current")}) == []
    assert result.is_file() and os.path.samefile(result, result.parent / KEPT)
