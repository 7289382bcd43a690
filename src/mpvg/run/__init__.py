"""The run layer, below both training loops: the run folder's life cycle (:mod:`.folder`),
checkpoints (:mod:`.checkpoint`), process groups (:mod:`.distributed`) and one process per GPU
(:mod:`.launch`). See docs/training.md and docs/contracts.md ("Layers")."""

#: Exit code of a run stopped by a stop request (SIGTERM, SIGUSR1, SIGINT, its parent gone) after
#: saving its checkpoint: requeue it and the same command resumes. The slurm profile asks SLURM
#: for ``--signal=TERM@300`` (docs/training.md, "Preemption").
REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL (sysexits.h): temporary failure, retry
