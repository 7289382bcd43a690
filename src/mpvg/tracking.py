"""Experiment tracking in MLflow: the only module of mpvg that imports ``mlflow``.

One MLflow run per training job (a requeued job continues the same run). The run is tagged
with model, method, dataset, seed, stage, cell, scale, git commit and SLURM job id, with who
and what started it (``mlflow.user``, ``mlflow.source.*``), holds all parameters (the
flattened recipe and model kwargs), per-epoch metrics, the machine's CPU/GPU utilisation and
memory (MLflow's system metrics, ``system/...``), and as artifacts the final ``result.json``
and a Markdown model card (the checkpoint's path, not the checkpoint, unless asked).

Experiments: ``<experiment>/<task>`` (``mpvg/in1k``, ``mpvg/c100``, ``mpvg/coco``,
``mpvg/ade20k``) hold the training runs of a task, ``<experiment>`` the ``mpvg analyze`` and
``mpvg report`` runs; the seeds of a cell share its ``cell`` tag (group by it in the UI).
Every experiment is tagged as a model-training experiment, so the UI opens it on its runs
table rather than on the GenAI overview.

Where runs go (one setting): ``$MLFLOW_TRACKING_URI`` if set, else ``tracking.uri`` of
params.yaml if not empty, else ``sqlite:///<project root>/mlruns.db`` (artifacts in
``<project root>/mlruns/``). Create a SQLite store once before starting parallel jobs
(``mpvg tracking init``): MLflow migrates a new store's schema when it first opens it, and
several jobs doing that at once race. Store access is also serialised by a lock file.

A tracking store that fails never stops or stalls training: a server is first asked for
``/health`` with a 2 s timeout, MLflow's HTTP calls get a 5 s timeout and one retry, and the
first failure logs a warning and takes the job offline for good. Everything the tracker would
have sent is in ``<run dir>/metrics.jsonl`` anyway; ``mpvg tracking sync <run dir>`` completes
the job's MLflow run from it later (the same run id; only what is missing is sent).
"""
from __future__ import annotations

import contextlib
import getpass
import json
import logging
import os
import shlex
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from mpvg.runinfo import project_root, slurm_job_id, write_json_atomic

log = logging.getLogger("mpvg.tracking")

DEFAULT_EXPERIMENT = "mpvg"
from mpvg.run.layout import JOURNAL as JOURNAL_NAME  # noqa: E402
#: The tasks of config.TASKS: one experiment each, created in this order by `mpvg tracking init`
#: (so a fresh store numbers them 2..5 after the project experiment, 1; the README's links).
TASK_EXPERIMENTS = ("in1k", "c100", "coco", "ade20k")
#: MLflow's UI opens an experiment of this kind on its runs table, without asking for its type.
EXPERIMENT_KIND_TAG = ("mlflow.experimentKind", "custom_model_development")
#: A training job must not wait for a server that does not answer (MLflow's own defaults are a
#: 120 s timeout and 7 retries with backoff 2, minutes per call). Environment values win.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
#: Seconds a tracking server has to answer ``GET /health`` before a run goes offline at once.
PROBE_TIMEOUT_S = 2.0
#: Seconds the end of a run waits for the system-metrics thread's last upload.
SYSTEM_METRICS_STOP_S = 5.0


class TrackingError(RuntimeError):
    """The tracking store cannot be used (server silent or down, store refused); the message
    names the URI."""


def resolve_tracking_uri(params: Mapping[str, Any] | None = None, root: str | os.PathLike | None = None) -> str:
    """``$MLFLOW_TRACKING_URI`` > ``params['tracking']['uri']`` > the local SQLite store."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    uri = ((params or {}).get("tracking") or {}).get("uri") or ""
    if uri:
        return uri
    return f"sqlite:///{Path(root or project_root()).resolve() / 'mlruns.db'}"


def experiment_name(params: Mapping[str, Any] | None = None) -> str:
    """The project's experiment (``tracking.experiment``): the analysis and report runs."""
    return ((params or {}).get("tracking") or {}).get("experiment") or DEFAULT_EXPERIMENT


def task_experiment(base: str, task: str | None) -> str:
    """Where a run of ``task`` goes: ``<base>/<task>``; ``base`` for runs of no task."""
    return f"{base}/{task}" if task else base


def project_experiments(base: str = DEFAULT_EXPERIMENT) -> list[str]:
    """Every experiment of the project, in the order `mpvg tracking init` creates them."""
    return [base, *(task_experiment(base, t) for t in TASK_EXPERIMENTS)]


def runs_table_url(server: str, experiment_id: str) -> str:
    """The MLflow UI page of an experiment's runs table (MLflow 3's UI otherwise starts in its
    GenAI mode, which shows traces and hides the runs)."""
    return f"{server.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def server_problem(uri: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why the tracking server at ``uri`` cannot be used (no answer to ``GET /health`` within
    ``timeout`` seconds), or None when it answers or ``uri`` is not a server (a SQLite store)."""
    if not uri.startswith(("http://", "https://")):
        return None
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout):
            return None
    except urllib.error.HTTPError:  # it answered, if only with an error status
        return None
    except (OSError, ValueError) as err:  # refused, timed out, unknown host, bad URL
        reason = getattr(err, "reason", err)
        return f"no answer from {uri} within {timeout:g} s ({reason})"


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


_HELD_LOCKS: set[str] = set()


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """An exclusive ``flock`` on ``<db>.lock`` for a SQLite store (re-entrant within this
    process); nothing for a server."""
    db = _sqlite_path(uri)
    if db is None or str(db) in _HELD_LOCKS:
        yield
        return
    import fcntl

    db.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{db}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        _HELD_LOCKS.add(str(db))
        try:
            yield
        finally:
            _HELD_LOCKS.discard(str(db))
            fcntl.flock(handle, fcntl.LOCK_UN)


def _client(uri: str):
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _retry(fn, what: str, attempts: int = 5):
    """Call ``fn`` again after short sleeps when a SQLite store is busy; HTTP retries are MLflow's."""
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as err:  # MlflowException, sqlalchemy OperationalError, ...
            busy = any(s in str(err).lower() for s in ("locked", "already exists", "unique constraint", "busy"))
            if not busy or attempt == attempts - 1:
                raise
            log.debug("%s: store busy (%s), retrying", what, err)
            time.sleep(0.2 * 2 ** attempt)


def _experiment_id(client, uri: str, name: str) -> str:
    """The id of experiment ``name``, created (artifacts beside a SQLite store) if missing and
    tagged as a model-training experiment either way."""
    db = _sqlite_path(uri)
    location = (db.parent / "mlruns").resolve().as_uri() if db else None
    key, kind = EXPERIMENT_KIND_TAG

    def get_or_create() -> str:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            return client.create_experiment(name, artifact_location=location, tags={key: kind})
        if exp.tags.get(key) != kind:
            client.set_experiment_tag(exp.experiment_id, key, kind)
        return exp.experiment_id

    return _retry(get_or_create, f"experiment {name}")


def init_store(uri: str, experiment: str = DEFAULT_EXPERIMENT) -> str:
    """Create the store (and its schema) and the project's experiments (``experiment`` and
    ``experiment/<task>`` for every task) where missing; return the id of ``experiment``.

    Safe to call from many processes: a lock file serialises SQLite schema creation. Raises
    :class:`TrackingError` (naming the URI) when a server does not answer."""
    problem = server_problem(uri)
    if problem:
        raise TrackingError(f"tracking server {uri}: {problem}; start it, or point $MLFLOW_TRACKING_URI "
                            "(or tracking.uri in params.yaml) at one that runs")
    with _store_lock(uri):
        client = _retry(lambda: _client(uri), "open store")
        ids = [_experiment_id(client, uri, name) for name in project_experiments(experiment)]
        return ids[0]


def experiment_ids(uri: str, experiment: str = DEFAULT_EXPERIMENT) -> dict[str, str]:
    """``{name: id}`` of the project's experiments that exist in the store at ``uri``."""
    client = _client(uri)
    found = {name: client.get_experiment_by_name(name) for name in project_experiments(experiment)}
    return {name: exp.experiment_id for name, exp in found.items() if exp is not None}


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"recipe": {"lr": 1}}`` -> ``{"recipe.lr": 1}`` (lists stay values)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command that started this process, as a user would type it (``mpvg train ...``)."""
    argv = list(sys.argv if argv is None else argv) or ["python"]
    prog = Path(argv[0])
    name = "mpvg" if (prog.name == "__main__.py" and prog.parent.name == "mpvg") else prog.name
    return shlex.join([name, *argv[1:]])[:500]


def source_tags(tags: Mapping[str, str]) -> dict[str, str]:
    """MLflow's own tags for who ran what (the UI's "User" and "Source" columns)."""
    try:
        user = getpass.getuser()
    except Exception:  # no $USER/$LOGNAME and no passwd entry (some containers)
        user = str(os.getuid())
    out = {"mlflow.user": user, "mlflow.source.name": command_line(),
           "mlflow.source.type": "JOB" if slurm_job_id() else "LOCAL"}
    commit = tags.get("git_commit")
    if commit and commit != "unknown":
        out["mlflow.source.git.commit"] = commit
    return out


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v


class RunTracker:
    """Tracks one job in MLflow and in ``<out_dir>/metrics.jsonl``.

    ``experiment`` is the project's experiment: a run whose tags name a ``task`` goes to
    ``<experiment>/<task>``. ``enabled=False`` (ranks other than 0) makes every method a no-op.
    ``system_metrics`` samples the machine's CPU, memory, disk, network and (with
    ``nvidia-ml-py``) GPUs into the run every 10 s (``$MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL``)
    while it is open. Every MLflow call is guarded: a server that does not answer ``/health``
    at the start, or the first failing call, logs a warning and turns MLflow off for the rest
    of the job.
    """

    def __init__(self, out_dir: str | os.PathLike, uri: str, experiment: str = DEFAULT_EXPERIMENT,
                 enabled: bool = True, use_mlflow: bool = True, system_metrics: bool = True):
        self.out_dir = Path(out_dir)
        self.uri = uri
        self.experiment = experiment
        self.enabled = enabled
        self.online = enabled and use_mlflow
        self.system_metrics = system_metrics
        self.run_id: str | None = None
        self._client = None
        self._monitor = None
        self.journal = self.out_dir / JOURNAL_NAME

    # -- local journal -------------------------------------------------------------------
    def _write(self, event: str, **fields) -> None:
        if not self.enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.journal, "a") as handle:
            handle.write(json.dumps({"event": event, "time": time.time(), **fields}, default=str) + "\n")

    def _offline(self, what: str, err: Any) -> None:
        self.online = False
        self._stop_monitor(timeout=0)
        kept = (f"Metrics are kept in {self.journal} (upload them later with `mpvg tracking sync {self.out_dir}`)"
                if self.journal != Path(os.devnull) else "The files on disk hold everything")
        log.warning("MLflow tracking at %s failed (%s: %s); continuing without it. %s.", self.uri, what, err, kept)

    def _mlflow(self, what: str, fn) -> Any:
        if not self.online:
            return None
        try:
            with _store_lock(self.uri):
                return _retry(fn, what)
        except Exception as err:
            self._offline(what, err)
            return None

    # -- run lifecycle -------------------------------------------------------------------
    def start(self, run_name: str, tags: Mapping[str, Any], params: Mapping[str, Any], run_id: str | None = None,
              parent_run_id: str | None = None) -> str | None:
        """Open (or, with ``run_id`` from a checkpoint, reopen) the MLflow run; log tags and
        params. ``parent_run_id`` nests the run under another one of the same experiment."""
        if not self.enabled:
            return None
        tags = {k: str(v) for k, v in tags.items() if v is not None}
        tags = {**source_tags(tags), **tags}
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        params = flatten(params)
        self._write("start", run_name=run_name, tags=tags, params=params, resumed_run_id=run_id, uri=self.uri)
        problem = server_problem(self.uri) if self.online else None
        if problem:
            self._offline("start run", problem)

        logged: dict[str, str] = {}
        reopened = False

        def open_run() -> str:
            nonlocal reopened
            self._client = _client(self.uri)
            if run_id:
                try:
                    logged.update(self._client.get_run(run_id).data.params)
                    self._client.update_run(run_id, status="RUNNING")
                    reopened = True
                    return run_id
                except Exception as err:  # deleted run or another store: start a new one
                    log.warning("cannot reopen MLflow run %s (%s); starting a new one", run_id, err)
            exp_id = _experiment_id(self._client, self.uri, task_experiment(self.experiment, tags.get("task")))
            return self._client.create_run(exp_id, tags=tags, run_name=run_name).info.run_id

        self.run_id = self._mlflow("start run", open_run)
        if self.run_id:
            # a resumed run keeps its first parameter values (MLflow refuses to change one)
            self._log_batch(params={k: v for k, v in params.items() if k not in logged}, tags=tags)
            self._write("mlflow_run", run_id=self.run_id)
            if self.system_metrics and self.online:
                self._start_monitor(resume=reopened, gpus_expected=tags.get("device") == "cuda")
        return self.run_id

    def _start_monitor(self, resume: bool, gpus_expected: bool = False) -> None:
        """MLflow's system-metrics thread on this run (steps continue a resumed run's)."""
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            with _store_lock(self.uri):
                monitor = SystemMetricsMonitor(self.run_id, resume_logging=resume, tracking_uri=self.uri)
            monitor.start()
            self._monitor = monitor
        except Exception as err:  # psutil missing, store refused: the run goes on without them
            log.warning("no system metrics for MLflow run %s (%s: %s)", self.run_id, type(err).__name__, err)
            return
        if gpus_expected and not any(type(m).__name__ in ("GPUMonitor", "ROCMMonitor") for m in monitor.monitors):
            log.warning("MLflow run %s: no GPU metrics (MLflow reads them with nvidia-ml-py, which is not "
                        "installed or finds no GPU)", self.run_id)

    def _stop_monitor(self, timeout: float) -> None:
        """Stop the system-metrics thread; wait at most ``timeout`` s for its last upload."""
        monitor, self._monitor = self._monitor, None
        if monitor is None:
            return
        stopper = threading.Thread(target=monitor.finish, name="mpvg-system-metrics-stop", daemon=True)
        stopper.start()
        stopper.join(timeout)
        if timeout and stopper.is_alive():
            log.warning("system metrics of MLflow run %s: the last samples did not reach %s within %g s",
                        self.run_id, self.uri, timeout)

    def _log_batch(self, metrics: Mapping[str, float] | None = None, step: int = 0,
                   params: Mapping[str, Any] | None = None, tags: Mapping[str, str] | None = None,
                   timestamp_ms: int | None = None) -> None:
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000) if timestamp_ms is None else int(timestamp_ms)
        ms = [Metric(k, float(v), now, int(step)) for k, v in (metrics or {}).items()]
        ps = [Param(k, str(v)[:6000]) for k, v in (params or {}).items()]
        ts = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
        for i in range(0, max(len(ms), len(ps), len(ts), 1), 100):  # MLflow takes <= 100 params per call
            chunk = dict(metrics=ms[i:i + 100], params=ps[i:i + 100], tags=ts[i:i + 100])
            self._mlflow("log batch", lambda: self._client.log_batch(self.run_id, **chunk))

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if not self.enabled:
            return
        self._write("metrics", step=step, metrics=dict(metrics))
        if self.run_id:
            self._log_batch(metrics=metrics, step=step)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Upload a local file (e.g. the model card, result.json, a checkpoint)."""
        if not self.enabled:
            return
        self._write("artifact", path=str(Path(path).resolve()), artifact_path=artifact_path)
        if self.run_id:
            self._mlflow("log artifact", lambda: self._client.log_artifact(self.run_id, str(path), artifact_path))

    def finish(self, status: str = "FINISHED", end_time_ms: int | None = None) -> None:
        """``FINISHED``, ``FAILED`` or ``KILLED`` (preempted, to be resumed)."""
        if not self.enabled:
            return
        self._stop_monitor(SYSTEM_METRICS_STOP_S)
        self._write("end", status=status)
        if self.run_id:
            self._mlflow("end run", lambda: self._client.set_terminated(self.run_id, status=status,
                                                                        end_time=end_time_ms))


# ------------------------------------------------------------------------------ sync

def read_journal(path: str | os.PathLike) -> list[dict]:
    """The events of a ``metrics.jsonl`` journal. A torn last line (the job was killed while
    writing it) is left out; a broken line elsewhere is an error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no tracking journal at {path}")
    lines = path.read_text().splitlines()
    events = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number == len(lines):
                log.warning("%s: line %d is incomplete (the job was killed while writing it); left out", path, number)
                continue
            raise ValueError(f"{path}:{number}: not a JSON event ({err})") from None
    return events


def _missing_metrics(events: list[dict], have: Mapping[str, set[int]]) -> list[tuple[int, int, dict[str, float]]]:
    """``(time_ms, step, {key: value})`` of the journal's metrics that are not in ``have``
    (the steps the run has of each key): a value counts as present when the run has one for
    the same key and step."""
    out = []
    for e in events:
        if e["event"] != "metrics":
            continue
        todo = {k: v for k, v in e["metrics"].items() if _is_number(v) and int(e["step"]) not in have.get(k, ())}
        if todo:
            out.append((int(e["time"] * 1000), int(e["step"]), todo))
    return out


def sync(run_dir: str | os.PathLike, uri: str, experiment: str = DEFAULT_EXPERIMENT, force: bool = False) -> str:
    """Complete a run folder's MLflow run from its ``metrics.jsonl`` journal; return the run id.

    The run is the one the job opened (the journal's last ``mlflow_run`` event, else
    ``result.json``'s ``mlflow_run_id``) when the store at ``uri`` has it: it gets the tags,
    parameters, metric values (by key and step) and artifacts it lacks and the job's last status,
    so a run cut off by a dying server (left RUNNING) is completed under its own id. Otherwise,
    or with ``force``, a new run is created from the journal. Running it again sends nothing
    new. The run id is written into ``result.json`` (when it exists) and the journal."""
    run_dir = Path(run_dir)
    events = read_journal(run_dir / JOURNAL_NAME)
    starts = [e for e in events if e["event"] == "start"]
    if not starts:
        raise ValueError(f"{run_dir / JOURNAL_NAME} has no 'start' event")
    from mpvg.run.layout import RESULT

    result = run_dir / RESULT
    data = json.loads(result.read_text()) if result.is_file() else None
    known = [e["run_id"] for e in events if e["event"] == "mlflow_run"] or [(data or {}).get("mlflow_run_id")]
    tags = {k: v for e in starts for k, v in e["tags"].items()}  # the latest value of each tag
    params = {k: v for e in reversed(starts) for k, v in e["params"].items()}  # the first value

    tracker = RunTracker(run_dir, uri, experiment, system_metrics=False)
    tracker.journal = Path(os.devnull)  # the journal is the source here, not the record
    run_id = tracker.start(starts[-1]["run_name"], tags, params, run_id=None if force else known[-1])
    if run_id is None:
        raise TrackingError(f"cannot open an MLflow run at {uri}; see the warning above")
    reopened = run_id == known[-1]
    have: dict[str, set[int]] = {}
    if reopened:
        keys = sorted({k for e in events if e["event"] == "metrics" for k in e["metrics"]})
        have = tracker._mlflow("read metrics", lambda: {
            k: {m.step for m in tracker._client.get_metric_history(run_id, k)} for k in keys}) or {}
    for time_ms, step, metrics in _missing_metrics(events, have):
        tracker._log_batch(metrics=metrics, step=step, timestamp_ms=time_ms)
    uploaded: set[tuple[str | None, str]] = set()
    if reopened:
        for folder in {e.get("artifact_path") for e in events if e["event"] == "artifact"}:
            listed = tracker._mlflow("list artifacts", lambda: tracker._client.list_artifacts(run_id, folder)) or []
            uploaded |= {(folder, Path(a.path).name) for a in listed}
    for e in events:
        if e["event"] != "artifact" or (e.get("artifact_path"), Path(e["path"]).name) in uploaded:
            continue
        if Path(e["path"]).is_file():
            tracker.log_artifact(e["path"], e.get("artifact_path"))
            uploaded.add((e.get("artifact_path"), Path(e["path"]).name))
        else:
            log.warning("%s: artifact %s no longer exists; not uploaded", run_dir, e["path"])
    ends = [e for e in events if e["event"] == "end"]
    status = ends[-1]["status"] if ends else ("FINISHED" if data is not None else "FAILED")
    tracker.finish(status, end_time_ms=int(ends[-1]["time"] * 1000) if ends else None)
    if not tracker.online:
        raise TrackingError(f"upload to {uri} failed part way; see the warning above (run it again to finish)")
    if run_id != known[-1]:
        with open(run_dir / JOURNAL_NAME, "a") as handle:  # so that a later sync finds this run
            handle.write(json.dumps({"event": "mlflow_run", "time": time.time(), "run_id": run_id, "uri": uri,
                                     "synced": True}) + "\n")
    if data is not None and data.get("mlflow_run_id") != run_id:
        write_json_atomic(result, {**data, "mlflow_run_id": run_id})
    return run_id


# ----------------------------------------------------------------- analysis and report runs

def _project_tracker(params: Mapping[str, Any] | None) -> RunTracker:
    """A tracker for a run of the whole project (analysis, report): the project's experiment,
    no journal (the output folder is the record), no system metrics."""
    tracker = RunTracker(project_root(), resolve_tracking_uri(params), experiment_name(params), system_metrics=False)
    tracker.journal = Path(os.devnull)
    return tracker


def _split_numbers(tree: Mapping[str, Any]) -> tuple[dict[int, dict[str, float]], dict[str, Any]]:
    """Flattened ``tree`` as metrics by step (floats; a list of numbers is one value per step)
    and params (ints, strings, booleans, None: what describes the run, not a measurement)."""
    by_step: dict[int, dict[str, float]] = {}
    params: dict[str, Any] = {}
    for key, value in flatten(tree).items():
        if isinstance(value, float) or (isinstance(value, list) and value and all(
                v is None or _is_number(v) for v in value) and any(isinstance(v, float) for v in value)):
            for step, v in enumerate(value if isinstance(value, list) else [value]):
                if _is_number(v):
                    by_step.setdefault(step, {})[key] = v
        else:
            params[key] = value
    return by_step, params


def log_analysis(params: Mapping[str, Any], result: Mapping[str, Any], files: list[str]) -> str | None:
    """``mpvg analyze`` in MLflow: a run ``analysis`` with the files (figures, analysis.json) as
    artifacts and the figures' states as params, and under it one run per cell (named by the
    cell) with that cell's numbers as short metrics (``last_ln.beta_var``; a per-layer list as
    steps) and its descriptors (layers, seed, ...) as params. Never raises: a failing store is
    a warning. Returns the parent run's id (None when tracking failed)."""
    scale = (params or {}).get("scale")
    parent = _project_tracker(params)
    figures = {name: fig.get("status") for name, fig in (result.get("figures") or {}).items()}
    run_id = parent.start("analysis", {"stage": "analysis", "scale": scale}, {"figures": figures})
    if run_id is None:
        return None
    for cid, numbers in sorted((result.get("cells") or {}).items()):
        by_step, descriptors = _split_numbers(numbers)
        child = _project_tracker(params)
        if child.start(cid, {"stage": "analysis", "cell": cid, "scale": scale}, descriptors,
                       parent_run_id=run_id) is None:
            break
        for step, metrics in sorted(by_step.items()):
            child.log_metrics(metrics, step)
        child.finish("FINISHED")
    for path in files:
        parent.log_artifact(path)
    parent.finish("FINISHED")
    return run_id


def log_report(params: Mapping[str, Any], metrics: Mapping[str, Any], files: Sequence[str | os.PathLike],
               children: Mapping[str, Mapping[str, Any]] | None = None) -> str | None:
    """``mpvg report`` in MLflow: one run ``report`` of the project's experiment with
    ``metrics`` (flattened; numbers only, e.g. the counts of the claims' verdicts) at step 0 and
    the written files (tables, index) as artifacts, in the folders they have under their common
    folder. ``children``: one nested run per entry (e.g. per paper claim: its difference, CI and
    verdict), so the runs table keeps a few short columns. Never raises: a failing store is a
    warning. Returns the run id (None when tracking failed)."""
    tracker = _project_tracker(params)
    run_id = tracker.start("report", {"stage": "report", "scale": (params or {}).get("scale")}, {})
    if run_id is None:
        return None
    numbers = {k: v for k, v in flatten(dict(metrics)).items() if _is_number(v)}
    if numbers:
        tracker.log_metrics(numbers, 0)
    for name, values in (children or {}).items():
        child = _project_tracker(params)
        if child.start(name, {"stage": "report", "claim": name, "scale": (params or {}).get("scale")}, {},
                       parent_run_id=run_id) is None:
            break
        child_numbers = {k: v for k, v in values.items() if _is_number(v)}
        if child_numbers:
            child.log_metrics(child_numbers, 0)
        child.finish("FINISHED")
    paths = [Path(f).resolve() for f in files]
    root = Path(os.path.commonpath([p.parent for p in paths])) if paths else None
    for path in paths:
        folder = path.parent.relative_to(root).as_posix()
        tracker.log_artifact(path, None if folder == "." else folder)
    tracker.finish("FINISHED")
    return run_id


def model_card(result: Mapping[str, Any], recipe: Mapping[str, Any], model_name: str,
               model_kwargs: Mapping[str, Any]) -> str:
    """A Markdown summary of a trained model: what it is, how it was trained, how it scores."""
    metrics = result.get("metrics", {})
    lines = [
        f"# {result.get('model')} / {result.get('method')} — {result.get('cell')} (seed {result.get('seed')})",
        "",
        f"- timm model: `{model_name}` (`import mpvg.models` registers it)",
        f"- stage: {result.get('stage')}, task: {result.get('task')}, dataset: {result.get('dataset')}, "
        f"scale: {result.get('scale')}",
        f"- parameters: {result.get('params'):,}" if isinstance(result.get("params"), int) else "- parameters: ?",
        f"- checkpoint: `{result.get('checkpoint')}`",
        f"- git commit: `{result.get('git_commit')}`",
        f"- trained: {result.get('epochs')} epochs, {result.get('wall_time_s')} s on "
        f"{result.get('world_size')} x {result.get('device')}",
        "",
        "## Metrics (validation)",
        "",
        "| metric | value |",
        "|---|---|",
        *(f"| {k} | {v:.4f} |" if isinstance(v, (int, float)) else f"| {k} | {v} |" for k, v in metrics.items()),
        "",
        "## Position embedding (PEConfig)",
        "",
        "```json",
        json.dumps(result.get("pe"), indent=2, default=str),
        "```",
        "",
        "## create_model kwargs",
        "",
        "```json",
        json.dumps(dict(model_kwargs), indent=2, default=str),
        "```",
        "",
        "## Recipe",
        "",
        "| key | value |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in sorted(flatten(recipe).items())),
        "",
    ]
    return "\n".join(lines)
