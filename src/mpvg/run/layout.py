"""The names of what a run folder ``runs/<stage>/<cell>/seed<k>/`` holds, defined once.

The run layer writes them, the workflow plans with them (a job's outputs), status and the reports
read them (docs/contracts.md, "Run outputs"). Plain strings: Snakemake imports this while it plans.
"""
from __future__ import annotations

CHECKPOINT = "checkpoint.pt"    # everything needed to continue exactly (mpvg.run.checkpoint)
RESULT = "result.json"          # written last: its presence means the run finished
SCORES = "scores.json"          # final metrics, for `dvc metrics`
HISTORY = "history.json"        # per-epoch (per-evaluation) rows, for `dvc plots`
JOURNAL = "metrics.jsonl"       # every tracked event, also without MLflow (mpvg.tracking)
MODEL_CARD = "model_card.md"
LOG = "log.txt"
JOB_LOG = "job.log"             # what the job printed (the workflow's log of the job)
LOCK = ".lock"                  # one writer per folder (mpvg.run.folder.FolderLock)
# A second link to result.json: when a workflow tool deletes result.json before running a job again
# (Snakemake's --rerun-incomplete after it was interrupted, DVC's repro), a run that had finished
# gets it back as it was, instead of being evaluated (or trained) again.
KEPT = ".result.kept.json"
PREVIOUS = "previous"           # previous/<UTC time>/: state of other settings, set aside, never deleted
REASON = "REASON.txt"           # in each previous/<UTC time>/: why it was set aside
#: What a run folder holds besides the lock; moved aside together when the settings changed.
STATE_FILES = (CHECKPOINT, RESULT, KEPT, SCORES, HISTORY, JOURNAL, MODEL_CARD, LOG)
