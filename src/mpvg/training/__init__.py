"""Training of the classification cells: the loop (:mod:`.engine`), checkpoints
(:mod:`.checkpoint`), process groups (:mod:`.distributed`) and the ``mpvg train`` /
``mpvg eval`` / ``mpvg tracking`` commands (:mod:`.commands`). See docs/training.md."""

#: Exit code of a run stopped by SIGTERM/SIGUSR1 after saving its checkpoint: requeue it and
#: the same command resumes (SLURM: ``--signal=B:USR1@120`` plus requeue on this code).
REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL (sysexits.h): temporary failure, retry
