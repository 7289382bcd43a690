"""The life cycle of one run folder, shared by classification and downstream training.

``runs/<stage>/<cell>/seed<k>/`` belongs to one run at a time and holds the state of one set of
settings. :func:`open_run` does, in this order, for ``mpvg train`` and ``mpvg detect|segment train``:

1. **lock**: an exclusive POSIX lock on ``<out>/.lock`` for the whole run (released by the kernel when
   the process dies, so a dead run never blocks). A second process exits at once with
   :class:`RunLockedError`, naming the holder (pid, host, SLURM job id, start time);
2. **clean up** temporary files that a killed writer left (``.checkpoint.pt.*.tmp``, ...);
3. **signature**: the run's signature inputs (:mod:`mpvg.signature`) are compared with those stored in
   ``checkpoint.pt`` and ``result.json``. Equal: resume (or, when ``result.json`` is there too, report
   the run finished). Different, or none stored: the old state is moved to
   ``<out>/previous/<UTC time>/`` (kept, never deleted), one log line says which settings differ, and
   the run starts fresh; with ``on_change="fail"`` it stops with :class:`RunChangedError` instead;
4. **checkpoint** (:meth:`RunFolder.save`) and **publish** (:meth:`RunFolder.publish`): both stamped
   with the signature; ``result.json`` is written last, with ``scores.json`` (final metrics) and
   ``history.json`` (per-epoch rows) beside it for ``dvc metrics`` / ``dvc plots``.

Stop requests (:class:`StopSignal`): SIGTERM, SIGUSR1 and SIGINT, and the parent process going away
when ``MPVG_STOP_WITH_PARENT=1`` (set by the Snakefile and by ``mpvg launch`` for its workers), end
the run at the next step boundary with a checkpoint and the requeue exit code.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import logging
import os
import shutil
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

from mpvg import runinfo
from mpvg.runinfo import read_json_object
from mpvg.run.layout import CHECKPOINT, KEPT, LOCK, LOG, PREVIOUS, REASON, RESULT, SCORES, HISTORY, STATE_FILES
from mpvg.signature import differences, digest

log = logging.getLogger("mpvg.training")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
ON_CHANGE = ("set-aside", "fail")


class RunLockedError(RuntimeError):
    """Another process is writing this run folder."""


class Preempted(RuntimeError):
    """A stop request arrived; a checkpoint was written. Exit with ``REQUEUE_EXIT_CODE``."""


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the last checkpoint on disk is untouched."""


class RunChangedError(ValueError):
    """The run folder holds state of other settings and ``on_change="fail"`` was asked for."""


class RunWriteError(OSError):
    """A file of the run folder could not be written (full disk, quota, read-only): the file that
    was there before is unchanged (writes are atomic), and the message says what to do."""


# ------------------------------------------------------------------------------ stop requests
class StopSignal:
    """Remembers a stop request so the loop can stop at the end of the current step.

    SIGTERM / SIGUSR1 / SIGINT set :attr:`signum`; a second SIGINT raises ``KeyboardInterrupt`` at
    once (the way out of a hung step). With ``MPVG_STOP_WITH_PARENT=1`` the death of the parent
    process (``os.getppid()`` changes: Snakemake or ``mpvg launch`` was killed) counts as SIGTERM, so
    no run goes on unsupervised.
    """

    def __init__(self):
        self.signum: int | None = None
        self._old: dict[int, Any] = {}
        self._parent = os.getppid() if os.environ.get("MPVG_STOP_WITH_PARENT") == "1" else None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signals need the main thread
            for sig in STOP_SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    @property
    def requested(self) -> bool:
        if self.signum is None and self._parent is not None and os.getppid() != self._parent:
            log.warning("the parent process (%d) is gone: saving a checkpoint and stopping", self._parent)
            self.signum = signal.SIGTERM
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "none"

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


# ------------------------------------------------------------------------------ logging
@contextlib.contextmanager
def run_logging(out_dir: Path | None, is_main: bool):
    """INFO to stderr and ``<out_dir>/log.txt`` on rank 0; warnings only elsewhere."""
    root = logging.getLogger("mpvg")
    handlers: list[logging.Handler] = []
    if is_main:
        fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
        handlers.append(logging.StreamHandler(sys.stderr))
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            handlers.append(logging.FileHandler(out_dir / LOG))
        for h in handlers:
            h.setFormatter(fmt)
            root.addHandler(h)
    old_level = root.level
    root.setLevel(logging.INFO if is_main else logging.WARNING)
    try:
        yield
    finally:
        root.setLevel(old_level)
        for h in handlers:
            root.removeHandler(h)
            h.close()


# ------------------------------------------------------------------------------ lock
#: How a lock holder records when it started (UTC), in ``.lock``.
STARTED_FORMAT = "%Y-%m-%d %H:%M:%S UTC"


def holder_text(info: Mapping[str, Any]) -> str:
    """Who holds a run folder's lock, for a message: pid and host, SLURM job, since when."""
    parts = [f"pid {info.get('pid')} on {info.get('host')}"]
    if info.get("slurm_job_id"):
        parts.append(f"SLURM job {info['slurm_job_id']}")
    if info.get("started"):
        parts.append(f"since {info['started']}")
    return ", ".join(parts)


def lock_holder(out: str | os.PathLike) -> dict | None:
    """Who holds ``<out>/.lock`` now (the JSON the holder wrote), or None if nobody does.

    Tests the lock without taking it for long: the planner uses this to find runs still going."""
    import fcntl

    path = Path(out) / LOCK
    if not path.is_file():
        return None
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return None
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
            except ValueError:
                return {"pid": "?", "host": "?"}
        fcntl.lockf(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class FolderLock:
    """An exclusive ``lockf`` on ``<out>/.lock``, holding who took it (JSON) while held."""

    def __init__(self, out: Path):
        self.path = out / LOCK
        self.fd: int | None = None

    def acquire(self) -> None:
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
            except ValueError:
                info = {}
            os.close(fd)
            raise RunLockedError(
                f"{self.path.parent} is being written by another run ({holder_text(info)}); one writer per "
                "run folder: wait for it to end, or stop it (kill / scancel), then run the same command again"
            ) from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "slurm_job_id": runinfo.slurm_job_id(),
                "started": _dt.datetime.now(_dt.timezone.utc).strftime(STARTED_FORMAT),
                "argv": sys.argv}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            import fcntl

            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, 0)
                fcntl.lockf(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


# ------------------------------------------------------------------------------ the run folder
def remove_stale_temp_files(out: Path) -> list[Path]:
    """Temporary files of atomic writes (``.<name>.<random>.tmp``) that a killed writer left behind."""
    removed = []
    for path in out.glob(".*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path)
    return removed



def set_aside(out: Path, reason: str, names: tuple[str, ...] = STATE_FILES) -> Path | None:
    """Move the run's state files (or only ``names``) to ``<out>/previous/<UTC time>/``; return that
    folder (None if there was nothing to move)."""
    present = [name for name in names if (out / name).exists()]
    if not present:
        return None
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    dest = out / PREVIOUS / stamp
    dest.mkdir(parents=True, exist_ok=False)
    for name in present:
        # a result.json a workflow tool deleted before the rerun lives on in its kept copy
        target = RESULT if name == KEPT and RESULT not in present else name
        os.replace(out / name, dest / target)
    (dest / REASON).write_text(reason + "\n")
    return dest


@dataclasses.dataclass
class RunFolder:
    """What :func:`open_run` hands the training loop: where to write, what to resume, how to save."""

    out: Path
    inputs: dict
    signature: str
    dist: Any                                   # mpvg.run.distributed.DistInfo
    stop: StopSignal
    job_start: float
    resume: dict | None = None                  # the checkpoint to continue (same signature), or None
    finished: dict | None = None                # result.json of a finished run of these settings
    init_state: dict | None = None              # the checkpoint the run starts from, loaded once
    set_aside_to: Path | None = None

    @property
    def checkpoint_path(self) -> Path:
        return self.out / CHECKPOINT

    def save(self, state: Mapping[str, Any]) -> None:
        """Write ``checkpoint.pt`` (rank 0; every rank waits) stamped with the signature."""
        from mpvg.run import distributed
        from mpvg.run.checkpoint import save_checkpoint

        problem = None
        if self.dist.is_main:
            try:
                save_checkpoint(self.checkpoint_path, {**state, "signature": self.signature,
                                                       "signature_inputs": self.inputs})
            except (OSError, RuntimeError) as err:  # torch reports a failed write as a RuntimeError
                problem = str(err).splitlines()[0] if str(err) else type(err).__name__
        problem = distributed.broadcast_object(problem)  # every rank waits, and stops together on a failure
        if problem:
            before = (f"the previous {CHECKPOINT} there is unchanged" if self.checkpoint_path.exists()
                      else f"no {CHECKPOINT} was written yet")
            raise RunWriteError(f"cannot write {self.checkpoint_path} ({problem}); {before}. Free space on that disk "
                                "(or point --out elsewhere) and run the same command again: it continues from the "
                                "last checkpoint")

    def write_file(self, name: str, text: str) -> Path:
        """``<out>/<name>`` with ``text``, written atomically (a full disk is a :class:`RunWriteError`)."""
        path = self.out / name
        try:
            with runinfo.atomic_open(path, "w") as handle:
                handle.write(text)
        except OSError as err:
            raise RunWriteError(self._unwritten(path, err)) from None
        return path

    def _unwritten(self, path: Path, err: OSError) -> str:
        return (f"cannot write {path} ({err.strerror or err}); the run's last checkpoint {self.checkpoint_path} is "
                "complete. Free space on that disk and run the same command again: it writes the results "
                "without training again")

    def publish(self, tracker, result: dict, final_metrics: Mapping[str, float], step: int,
                history: list | None = None) -> dict:
        """Main process, end of a run: ``final_*`` metrics to MLflow, ``scores.json`` and
        ``history.json`` (for DVC), then ``result.json`` (written atomically and last: its presence
        means the run finished) and its MLflow copy. Returns the result as written."""
        result = {**result, "signature": self.signature, "signature_inputs": self.inputs}
        tracker.log_metrics({f"final_{k}": v for k, v in final_metrics.items()}, step=step)
        rows = list(history if history is not None else result.get("history", []))
        for name, obj in ((SCORES, dict(final_metrics)), (HISTORY, rows), (RESULT, result)):
            try:
                runinfo.write_json_atomic(self.out / name, obj)
            except OSError as err:
                raise RunWriteError(self._unwritten(self.out / name, err)) from None
        keep_result(self.out)
        tracker.log_artifact(self.out / RESULT)
        return result


def keep_result(out: Path) -> None:
    """``.result.kept.json``: a hard link to result.json (a copy where links are not possible)."""
    kept = out / KEPT
    with contextlib.suppress(FileNotFoundError):
        kept.unlink()
    try:
        os.link(out / RESULT, kept)
    except OSError:
        shutil.copy2(out / RESULT, kept)


def _decide(out: Path, inputs: dict, resume: bool, notes: list[str], retrain: bool = False
            ) -> tuple[str, list[str], dict | None]:
    """``(decision, reasons, checkpoint)`` for what ``out`` holds (rank 0): decision is ``resume``,
    ``finished``, ``fresh`` or ``set-aside``; the checkpoint is returned loaded when resuming.
    ``retrain``: whatever ``out`` holds is set aside, also a finished run of these settings."""
    from mpvg.run.checkpoint import load_checkpoint

    if retrain:
        present = [name for name in STATE_FILES if (out / name).exists()]
        return ("set-aside", ["--retrain was given (e.g. by Snakemake's --forceall / -R / --forcerun)"], None) \
            if present else ("fresh", [], None)

    ckpt_path, result_path = out / CHECKPOINT, out / RESULT
    damaged = [name for name in (RESULT, KEPT) if (out / name).exists() and read_json_object(out / name) is None]
    if damaged:  # empty or cut short (a copy that failed, a full disk outside mpvg): keep it, continue without it
        dest = set_aside(out, f"{' and '.join(damaged)} unreadable (empty, cut short or not a JSON object)", tuple(damaged))
        notes.append(f"{out / damaged[0]} was unreadable (empty, cut short or not a JSON object): moved it to {dest}; "
                     f"the run continues from {CHECKPOINT} when that matches its settings")
    kept = read_json_object(out / KEPT) if not result_path.exists() and (out / KEPT).exists() else None
    if kept is not None and ckpt_path.exists() and not differences(kept.get("signature_inputs"), inputs):
        shutil.copy2(out / KEPT, result_path)  # result.json was deleted after the run had finished
        notes.append(f"{result_path}: restored from {KEPT} (the run had finished with these settings)")
    result = read_json_object(result_path) if result_path.exists() else None
    ckpt = None
    if ckpt_path.exists():
        if not resume:
            raise FileExistsError(f"{ckpt_path} exists and --no-resume was given; remove it or drop --no-resume")
        try:
            ckpt = load_checkpoint(ckpt_path, map_location="cpu")
        except ValueError as err:  # unreadable: keep it aside, never lose it
            return "set-aside", [f"{CHECKPOINT} is unreadable ({str(err).splitlines()[0]})"], None
    reasons: list[str] = []
    if ckpt_path.exists():
        reasons += [f"checkpoint: {d}" for d in differences(ckpt.get("signature_inputs"), inputs)]
    if result_path.exists():
        if result is not None:
            reasons += [f"result: {d}" for d in differences(result.get("signature_inputs"), inputs)]
            if not ckpt_path.exists():
                reasons.append(f"{RESULT} is there but its {CHECKPOINT} is gone (the run cannot be continued "
                               "or fine-tuned from)")
    if reasons:
        return "set-aside", reasons, None
    if result is not None:
        return "finished", [], None
    return ("resume", [], ckpt) if ckpt is not None else ("fresh", [], None)


@contextlib.contextmanager
def open_run(out: str | os.PathLike, inputs: dict, device: str = "auto", resume: bool = True,
             on_change: str = "set-aside", init_state: dict | None = None, retrain: bool = False
             ) -> Iterator[RunFolder]:
    """Set up the process group, lock ``out``, log, catch stop signals, and look at what ``out``
    holds (see the module doc). Yields the :class:`RunFolder`; tears everything down after."""
    from mpvg.run import distributed
    from mpvg.run.checkpoint import load_checkpoint

    if on_change not in ON_CHANGE:
        raise ValueError(f"unknown on_change {on_change!r}; expected one of {ON_CHANGE}")
    job_start = time.time()
    out = Path(out)
    dist = distributed.setup(device)
    lock = FolderLock(out)
    try:
        problem = None
        if dist.is_main:
            try:
                _make_dir(out)
                lock.acquire()
            except (RunLockedError, OSError) as err:
                problem = err
        problem = distributed.broadcast_object(str(problem) if problem else None)
        if problem:
            raise RunLockedError(problem) if "being written" in problem else FileExistsError(problem)
        # what the folder holds is decided (and old state moved aside) before log.txt is opened,
        # so the new run's log starts in a folder of its own
        decision, reasons, ckpt, notes, moved = "fresh", [], None, [], None
        if dist.is_main:
            notes = [f"removed {p.name}, left by a writer that was killed" for p in remove_stale_temp_files(out)]
            try:
                decision, reasons, ckpt = _decide(out, inputs, resume, notes, retrain)
            except FileExistsError as err:
                decision, reasons = "error", [str(err)]
            if decision == "set-aside" and on_change == "set-aside":
                moved = set_aside(out, f"settings differ from signature {digest(inputs)}: {'; '.join(reasons)}")
        decision, reasons, moved = distributed.broadcast_object((decision, reasons, moved))
        if decision == "error":
            raise FileExistsError(reasons[0])
        if decision == "set-aside" and on_change == "fail":
            raise RunChangedError(f"{out} holds a run of other settings ({'; '.join(reasons)}); move it away, "
                                  "or drop --on-change fail to set it aside automatically")
        with run_logging(out, dist.is_main), StopSignal() as stop:
            for note in notes:
                log.info("%s", note)
            run = RunFolder(out=out, inputs=inputs, signature=digest(inputs), dist=dist, stop=stop,
                            job_start=job_start, init_state=init_state, set_aside_to=moved)
            if decision == "set-aside":
                what = "a run of other settings" if any(r.startswith(("checkpoint: ", "result: ")) for r in reasons) \
                    else "a run it is asked to train again" if retrain else "state it cannot continue"
                log.warning("%s held %s (%s); moved it to %s and starting fresh", out, what, "; ".join(reasons), moved)
            elif decision == "resume":
                run.resume = ckpt if ckpt is not None else load_checkpoint(run.checkpoint_path, map_location="cpu")
            elif decision == "finished":
                run.finished = read_json_object(out / RESULT)
                log.info("%s: already finished with these settings (signature %s); nothing to do",
                         out / RESULT, run.signature)
            yield run
    finally:
        lock.release()
        distributed.cleanup()


def load_start_point(path: str | os.PathLike | None, expected: Mapping[str, Any] | None = None
                     ) -> tuple[dict | None, str | None]:
    """Load the checkpoint a run starts from (fine-tuning, detection, segmentation) once; return it
    with the signature it contributes to the run's own: the signature stored in it (a run of mpvg),
    or ``file:<sha256>`` of the file (official weights, any other state dict).

    ``expected``: the signature inputs the start point's cell has under the current params. A
    checkpoint of mpvg trained with other settings, or not trained to its end, is refused with a
    message that names the differences: a run never silently starts from a stale start point."""
    if path is None:
        return None, None
    from mpvg.signature import differences, file_signature
    from mpvg.run.checkpoint import load_checkpoint

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"the checkpoint to start from, {path}, does not exist")
    state = load_checkpoint(path, map_location="cpu")
    stored = state.get("signature_inputs") if isinstance(state, dict) else None
    if stored is None:
        return state, file_signature(path)
    if expected is not None:
        diffs = differences(stored, expected)
        if diffs:
            raise ValueError(f"{path} was trained with other settings than cell {expected.get('cell')} has now "
                             f"({'; '.join(diffs)}); rerun that cell first (`snakemake` / `dvc repro` do it "
                             "in order)")
    total = state.get("total_epochs")
    if total is not None and state.get("epoch", total) < total:
        raise ValueError(f"{path} is from epoch {state.get('epoch')} of {total}, not a finished run; "
                         f"let cell {stored.get('cell')} finish first")
    return state, state["signature"]


def _make_dir(out: Path) -> None:
    """``mkdir -p`` with a message that names the path when something in the way is a file."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in [out, *out.parents] if p.exists() and not p.is_dir()), out)
        raise FileExistsError(f"cannot create the run folder {out}: {blocker} is a file, not a folder") from None


# ------------------------------------------------------------------------------ tracking
@contextlib.contextmanager
def ending_run(tracker):
    """Close the tracker's run when the block ends: FINISHED, KILLED (``Preempted``, to be
    resumed) or FAILED (any other error, which propagates)."""
    status = "FAILED"
    try:
        yield
        status = "FINISHED"
    except Preempted:
        status = "KILLED"
        raise
    finally:
        try:
            tracker.finish(status)
        except OSError as err:  # e.g. the disk is full: the error that ended the run is the one to report
            if status != "FAILED":
                raise
            log.warning("could not record the end of the run in %s: %s", getattr(tracker, "journal", "its journal"), err)

