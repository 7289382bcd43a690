"""Training of the classification cells: the loop (:mod:`.engine`) and the ``mpvg train`` /
``mpvg eval`` / ``mpvg launch`` / ``mpvg tracking`` commands (:mod:`.commands`); the run folder,
checkpoints, process groups and the launcher are the run layer's (:mod:`mpvg.run`). See
docs/training.md."""
