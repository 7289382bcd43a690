"""Experiment tracking in MLflow: the only module of mpvg that imports ``mlflow``.

One MLflow run per training job (a requeued job continues the same run). The run is tagged
with model, method, dataset, seed, stage, cell, scale, git commit and SLURM job id, holds all
parameters (the flattened recipe and model kwargs), per-epoch metrics, and as artifacts the
final ``result.json`` and a Markdown model card (the checkpoint's path, not the checkpoint,
unless asked).

Where runs go (one setting): ``$MLFLOW_TRACKING_URI`` if set, else ``tracking.uri`` of
params.yaml if not empty, else ``sqlite:///<project root>/mlruns.db`` (artifacts in
``<project root>/mlruns/``). Create a SQLite store once before starting parallel jobs
(``mpvg tracking init``): MLflow migrates a new store's schema when it first opens it, and
several jobs doing that at once race. Store access is also serialised by a lock file.

A tracking store that fails (server down, locked database) never stops training: the
tracker logs a warning, goes offline for the rest of the job, and everything it would have
sent is in ``<run dir>/metrics.jsonl`` anyway; ``mpvg tracking sync <run dir>`` uploads it later.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

from mpvg.runinfo import project_root, write_json_atomic

log = logging.getLogger("mpvg.tracking")

DEFAULT_EXPERIMENT = "mpvg"
JOURNAL_NAME = "metrics.jsonl"
# A training job must not wait minutes for a server that is down (MLflow's own default is
# 7 retries with backoff 2, about 4 minutes per call). Environment values win.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


def resolve_tracking_uri(params: Mapping[str, Any] | None = None, root: str | os.PathLike | None = None) -> str:
    """``$MLFLOW_TRACKING_URI`` > ``params['tracking']['uri']`` > the local SQLite store."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    uri = ((params or {}).get("tracking") or {}).get("uri") or ""
    if uri:
        return uri
    return f"sqlite:///{Path(root or project_root()).resolve() / 'mlruns.db'}"


def experiment_name(params: Mapping[str, Any] | None = None) -> str:
    return ((params or {}).get("tracking") or {}).get("experiment") or DEFAULT_EXPERIMENT


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


def init_store(uri: str, experiment: str = DEFAULT_EXPERIMENT) -> str:
    """Create the store (and its schema) and the experiment if missing; return the experiment id.

    Safe to call from many processes: a lock file serialises SQLite schema creation."""
    with _store_lock(uri):
        client = _retry(lambda: _client(uri), "open store")
        db = _sqlite_path(uri)
        location = (db.parent / "mlruns").resolve().as_uri() if db else None

        def get_or_create() -> str:
            exp = client.get_experiment_by_name(experiment)
            if exp is not None:
                return exp.experiment_id
            return client.create_experiment(experiment, artifact_location=location)

        return _retry(get_or_create, "create experiment")


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


class RunTracker:
    """Tracks one job in MLflow and in ``<out_dir>/metrics.jsonl``.

    ``enabled=False`` (ranks other than 0) makes every method a no-op. Every MLflow call is
    guarded: the first failure logs a warning and turns MLflow off for the rest of the job.
    """

    def __init__(self, out_dir: str | os.PathLike, uri: str, experiment: str = DEFAULT_EXPERIMENT,
                 enabled: bool = True, use_mlflow: bool = True):
        self.out_dir = Path(out_dir)
        self.uri = uri
        self.experiment = experiment
        self.enabled = enabled
        self.online = enabled and use_mlflow
        self.run_id: str | None = None
        self._client = None
        self.journal = self.out_dir / JOURNAL_NAME

    # -- local journal -------------------------------------------------------------------
    def _write(self, event: str, **fields) -> None:
        if not self.enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.journal, "a") as handle:
            handle.write(json.dumps({"event": event, "time": time.time(), **fields}, default=str) + "\n")

    def _mlflow(self, what: str, fn) -> Any:
        if not self.online:
            return None
        try:
            with _store_lock(self.uri):
                return _retry(fn, what)
        except Exception as err:
            self.online = False
            log.warning("MLflow tracking at %s failed (%s: %s); continuing without it. Metrics are kept in %s "
                        "(upload later with `mpvg tracking sync %s`).", self.uri, what, err, self.journal, self.out_dir)
            return None

    # -- run lifecycle -------------------------------------------------------------------
    def start(self, run_name: str, tags: Mapping[str, Any], params: Mapping[str, Any], run_id: str | None = None) -> str | None:
        """Open (or, with ``run_id`` from a checkpoint, reopen) the MLflow run; log tags and params."""
        if not self.enabled:
            return None
        tags = {k: str(v) for k, v in tags.items() if v is not None}
        params = flatten(params)
        self._write("start", run_name=run_name, tags=tags, params=params, resumed_run_id=run_id, uri=self.uri)

        logged: dict[str, str] = {}

        def open_run() -> str:
            self._client = _client(self.uri)
            if run_id:
                try:
                    logged.update(self._client.get_run(run_id).data.params)
                    self._client.update_run(run_id, status="RUNNING")
                    return run_id
                except Exception as err:  # deleted run or another store: start a new one
                    log.warning("cannot reopen MLflow run %s (%s); starting a new one", run_id, err)
            exp_id = init_store(self.uri, self.experiment)
            return self._client.create_run(exp_id, tags=tags, run_name=run_name).info.run_id

        self.run_id = self._mlflow("start run", open_run)
        if self.run_id:
            # a resumed run keeps its first parameter values (MLflow refuses to change one)
            self._log_batch(params={k: v for k, v in params.items() if k not in logged}, tags=tags)
            self._write("mlflow_run", run_id=self.run_id)
        return self.run_id

    def _log_batch(self, metrics: Mapping[str, float] | None = None, step: int = 0,
                   params: Mapping[str, Any] | None = None, tags: Mapping[str, str] | None = None) -> None:
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
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

    def finish(self, status: str = "FINISHED") -> None:
        """``FINISHED``, ``FAILED`` or ``KILLED`` (preempted, to be resumed)."""
        if not self.enabled:
            return
        self._write("end", status=status)
        if self.run_id:
            self._mlflow("end run", lambda: self._client.set_terminated(self.run_id, status=status))


def sync(run_dir: str | os.PathLike, uri: str, experiment: str = DEFAULT_EXPERIMENT, force: bool = False) -> str | None:
    """Upload a run's ``metrics.jsonl`` journal to MLflow as a new run (after a job ran offline).

    Writes the new run id into ``result.json`` when that file exists; returns the run id.
    A run whose result.json already names an MLflow run is refused unless ``force``."""
    run_dir = Path(run_dir)
    journal = run_dir / JOURNAL_NAME
    if not journal.is_file():
        raise FileNotFoundError(f"no tracking journal at {journal}")
    result = run_dir / "result.json"
    if not force and result.is_file() and json.loads(result.read_text()).get("mlflow_run_id"):
        raise FileExistsError(f"{result} already names MLflow run {json.loads(result.read_text())['mlflow_run_id']}; "
                              "pass force to upload it again")
    events = [json.loads(line) for line in journal.read_text().splitlines() if line.strip()]
    start = next((e for e in events if e["event"] == "start"), None)
    if start is None:
        raise ValueError(f"{journal} has no 'start' event")
    tracker = RunTracker(run_dir, uri, experiment)
    tracker.journal = run_dir / f".{JOURNAL_NAME}.sync"  # keep the original journal as it is
    if tracker.start(start["run_name"], start["tags"], start["params"]) is None:
        raise RuntimeError(f"cannot open an MLflow run at {uri}")
    for e in events:
        if e["event"] == "metrics":
            tracker.log_metrics(e["metrics"], e["step"])
        elif e["event"] == "artifact" and Path(e["path"]).is_file():
            tracker.log_artifact(e["path"], e.get("artifact_path"))
    ends = [e for e in events if e["event"] == "end"]
    tracker.finish(ends[-1]["status"] if ends else "FAILED")
    tracker.journal.unlink(missing_ok=True)
    if not tracker.online:
        raise RuntimeError(f"upload to {uri} failed part way; see the warnings above")
    if result.is_file():
        data = json.loads(result.read_text())
        data["mlflow_run_id"] = tracker.run_id
        write_json_atomic(result, data)
    return tracker.run_id


def log_analysis(params: Mapping[str, Any], result: Mapping[str, Any], files: list[str]) -> str | None:
    """One MLflow run for ``mpvg analyze``: its numbers (``cells.<cell>.<name>``; lists of numbers
    as steps) as metrics and its files (figures, analysis.json) as artifacts. Never raises:
    a failing store is a warning. Returns the run id (None when tracking failed)."""
    uri = resolve_tracking_uri(params)
    tracker = RunTracker(project_root(), uri, experiment_name(params))
    tracker.journal = Path(os.devnull)  # the figures folder is the record; no journal
    run_id = tracker.start("analysis", {"stage": "analysis", "scale": (params or {}).get("scale")}, {})
    if run_id is None:
        return None
    by_step: dict[int, dict[str, float]] = {}
    for key, value in flatten({"cells": result.get("cells", {})}).items():
        for step, v in enumerate(value if isinstance(value, list) else [value]):
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v:
                by_step.setdefault(step, {})[key] = v
    for step, metrics in sorted(by_step.items()):
        tracker.log_metrics(metrics, step)
    for path in files:
        tracker.log_artifact(path)
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
