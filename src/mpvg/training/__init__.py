"""Training of the classification cells: the loop (:mod:`.engine`), the run folder's life cycle
shared with downstream training (:mod:`.runfolder`), one process per GPU (:mod:`.launch`),
checkpoints (:mod:`.checkpoint`), process groups (:mod:`.distributed`) and the ``mpvg train`` /
``mpvg eval`` / ``mpvg launch`` / ``mpvg tracking`` commands (:mod:`.commands`). See docs/training.md."""

#: Exit code of a run stopped by a stop request (SIGTERM, SIGUSR1, SIGINT, its parent gone) after
#: saving its checkpoint: requeue it and the same command resumes. The slurm profile asks SLURM
#: for ``--signal=TERM@300`` (docs/training.md, "Preemption").
REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL (sysexits.h): temporary failure, retry
