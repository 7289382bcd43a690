"""MLflow tracking: run contents in a real SQLite store, experiments that open on the runs table,
a server that never answers or dies mid-run, `mpvg tracking sync`, store creation races, the
analysis and report runs."""
from __future__ import annotations

import contextlib
import getpass
import json
import multiprocessing
import re
import socket
import threading
import time
from pathlib import Path

import pytest

from conftest import free_port, mlflow_server
from test_training import (CELL, EPOCHS, make_spec, tiny_data, train_in_process,  # noqa: F401
                           write_params)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@contextlib.contextmanager
def silent_server(answers: int = 0, accepted: list | None = None, then: str = "hang"):
    """``http://127.0.0.1:<port>`` of a socket that accepts connections and never answers
    (after answering the first ``answers`` requests with ``200 OK``, as a server that hangs
    mid-run). ``then="refuse"``: after those answers the socket closes (a server that died), so
    that later calls fail at once. Each connection it accepts is appended to ``accepted``."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    server.settimeout(0.1)
    held: list[socket.socket] = []
    done = threading.Event()

    def accept():
        left = answers
        while not done.is_set():
            with contextlib.suppress(TimeoutError):
                conn = server.accept()[0]
                if accepted is not None:
                    accepted.append(conn.getpeername())
                if left > 0:
                    left -= 1
                    conn.settimeout(5)
                    conn.recv(65536)
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nOK")
                    conn.close()
                    if left == 0 and then == "refuse":
                        server.close()
                        return
                else:
                    held.append(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        done.set()
        thread.join(5)
        server.close()
        for conn in held:
            conn.close()


def sqlite_uri(folder: Path) -> str:
    return f"sqlite:///{folder / 'mlruns.db'}"


def test_uri_precedence_env_then_params_then_local_sqlite(tmp_path, monkeypatch):
    from mpvg.tracking import resolve_tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri({"tracking": {"uri": ""}}, tmp_path) == f"sqlite:///{tmp_path}/mlruns.db"
    assert resolve_tracking_uri({"tracking": {"uri": "http://srv:5000"}}, tmp_path) == "http://srv:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://other:5000")
    assert resolve_tracking_uri({"tracking": {"uri": "http://srv:5000"}}, tmp_path) == "http://other:5000"


def test_run_is_logged_with_tags_params_metrics_and_artifacts(tiny_data, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from mpvg.tracking import command_line, init_store

    for var in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")  # the tiny run lasts seconds
    uri = sqlite_uri(tmp_path)
    init_store(uri, "tests")
    out, params_path = tmp_path / "run", write_params(tmp_path, tiny_data)
    result = train_in_process(params_path, out, tracking_uri=uri, experiment="tests")
    recipe = make_spec(params_path).recipe

    client = MlflowClient(uri)
    run = client.get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == f"{CELL}-seed0"
    assert client.get_experiment(run.info.experiment_id).name == "tests/in1k"  # one experiment per task
    tags = run.data.tags
    expected = {"model": "DeiT-S", "method": "MPVG", "dataset": "imagenet", "seed": "0", "stage": "train",
                "cell": CELL, "scale": "tiny", "git_commit": result["git_commit"],
                # the UI's User and Source columns
                "mlflow.user": getpass.getuser(), "mlflow.source.name": command_line(), "mlflow.source.type": "LOCAL"}
    if result["git_commit"] != "unknown":
        expected["mlflow.source.git.commit"] = result["git_commit"]
    assert {k: tags.get(k) for k in expected} == expected
    # MLflow's system metrics (CPU and memory here; GPUs need nvidia-ml-py and a GPU)
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(run.data.metrics)
    assert 0 < run.data.metrics["system/system_memory_usage_megabytes"]
    params = run.data.params
    assert params["recipe.batch_size"] == "32" and float(params["recipe.lr"]) == pytest.approx(recipe["lr"])
    assert params["recipe.mean"] == str(recipe["mean"])
    assert params["model.name"] == "mpvg_deit_small_patch16_224" and params["model.pe_method"] == "mpvg"
    assert params["model.embed_dim"] == "32" and params["run.params"] == str(result["params"])
    top1 = client.get_metric_history(run.info.run_id, "val_top1")
    assert [m.step for m in top1] == list(range(1, EPOCHS + 1))
    assert top1[-1].value == pytest.approx(result["metrics"]["top1"])
    assert run.data.metrics["final_top5"] == pytest.approx(result["metrics"]["top5"])
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) == EPOCHS
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model_card.md", "result.json"} <= artifacts and "checkpoint" not in artifacts  # path only
    card = (out / "model_card.md").read_text()
    assert str(out / "checkpoint.pt") in card and "last_ln_pe" in card and "| top1 |" in card


def tracked_life(out: Path, uri: str, **opts):
    """A job's whole tracked life (start, three metrics, an artifact, the end), its tracker offline
    from the start: the tracker and the seconds it took."""
    from mpvg.tracking import RunTracker

    begin = time.monotonic()
    tracker = RunTracker(out, uri, "tests", **opts)
    assert tracker.start("job", {"cell": "c", "task": "in1k"}, {"recipe": {"lr": 0.1}}) is None
    for step in (1, 2, 3):
        tracker.log_metrics({"loss": 1.0 / step}, step)
    tracker.log_artifact(out / "metrics.jsonl")
    tracker.finish("FINISHED")
    return tracker, time.monotonic() - begin


def test_silent_server_costs_seconds_not_minutes(tmp_path, caplog):
    """A server that accepts connections and never answers: the whole tracked life of a job
    (start, metrics, artifact, end) costs one 2 s probe (one connection), then the job runs
    offline; `tracking init` and `tracking sync` fail as fast, naming the URI. The baseline: the
    same calls where the server is gone (connection refused: offline at once), timed here."""
    from mpvg.tracking import PROBE_TIMEOUT_S, TrackingError, init_store, sync

    dead = f"http://127.0.0.1:{free_port()}"
    _, base = tracked_life(tmp_path / "base", dead)
    begin = time.monotonic()
    for call in (lambda: init_store(dead, "tests"), lambda: sync(tmp_path / "base", dead, "tests")):
        with pytest.raises(TrackingError, match=re.escape(dead)):
            call()
    base_fail = time.monotonic() - begin
    out, accepted = tmp_path / "run", []
    with silent_server(accepted=accepted) as uri:
        tracker, spent = tracked_life(out, uri)
        assert len(accepted) == 1, accepted  # the probe, then nothing: it was 94 s, 3 x 30 s timeouts
        assert PROBE_TIMEOUT_S <= spent < PROBE_TIMEOUT_S + 3 * base + 1.0, (spent, base)
        assert not tracker.online and "continuing without it" in caplog.text and uri in caplog.text

        begin = time.monotonic()
        with pytest.raises(TrackingError, match=f"tracking server {uri}: no answer .* within 2 s"):
            init_store(uri, "tests")
        with pytest.raises(TrackingError, match=f"cannot open an MLflow run at {uri}"):
            sync(out, uri, "tests")
        spent = time.monotonic() - begin
        assert len(accepted) == 3, accepted  # a probe each
        assert 2 * PROBE_TIMEOUT_S <= spent < 2 * PROBE_TIMEOUT_S + 3 * base_fail + 1.0, (spent, base_fail)
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["start", "metrics", "metrics", "metrics", "artifact", "end"]


def test_server_that_hangs_after_answering_costs_one_call(tmp_path, caplog):
    """`/health` answers, then nothing does: the first MLflow call times out (5 s, one retry: two
    connections) and the job is offline for the rest; the defaults MLflow gets must parse (an int
    factor). The baseline: the same calls where the server dies after `/health` (refused at once)."""
    from mpvg.tracking import HTTP_DEFAULTS, RunTracker

    def calls(uri: str, out: Path) -> float:
        tracker = RunTracker(out, uri, "tests", system_metrics=False)
        begin = time.monotonic()
        assert tracker.start("job", {"task": "in1k"}, {}) is None
        tracker.log_metrics({"loss": 1.0}, 1)
        tracker.finish("FINISHED")
        assert not tracker.online
        return time.monotonic() - begin

    with silent_server(answers=1, then="refuse") as uri:
        base = calls(uri, tmp_path / "base")  # first: it also pays MLflow's imports
    accepted = []
    with silent_server(answers=1, accepted=accepted) as uri:
        spent = calls(uri, tmp_path / "run")
    timeout = float(HTTP_DEFAULTS["MLFLOW_HTTP_REQUEST_TIMEOUT"])
    assert len(accepted) == 3, accepted  # /health, the first call and its one retry, then nothing more
    assert 2 * timeout <= spent < 2 * timeout + 3 * base + 1.0, (spent, base)  # the first retry has no backoff
    assert "Read timed out. (read timeout=5)" in caplog.text and "Failed to convert" not in caplog.text


def test_unreachable_server_does_not_stop_training_and_sync_uploads_later(tiny_data, tmp_path, caplog):
    from mlflow import MlflowClient

    from mpvg.tracking import sync

    out = tmp_path / "run"
    with silent_server() as silent:  # MLflow's defaults as the tracker sets them: no environment here
        result = train_in_process(write_params(tmp_path, tiny_data, epochs=2), out, tracking_uri=silent,
                                  experiment="tests")
    assert result["mlflow_run_id"] is None and (out / "result.json").exists()
    assert "continuing without it" in caplog.text
    journal = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in journal if e["event"] == "metrics"] == [1, 2, 2]  # 2 epochs + final
    assert journal[0]["event"] == "start" and journal[0]["tags"]["cell"] == CELL

    uri = sqlite_uri(tmp_path)
    run_id = sync(out, uri, "tests")
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.data.tags["cell"] == CELL and run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "tests/in1k"
    assert run.data.metrics["final_top1"] == pytest.approx(result["metrics"]["top1"])
    assert json.loads((out / "result.json").read_text())["mlflow_run_id"] == run_id
    # again: the journal now names the run, so nothing is duplicated
    assert sync(out, uri, "tests") == run_id
    assert len(client.search_runs([run.info.experiment_id])) == 1
    assert [m.step for m in client.get_metric_history(run_id, "val_top1")] == [1, 2]


def test_sync_completes_a_run_cut_off_by_a_dying_store_under_its_own_id(tmp_path):
    """The store stops answering after epoch 1 (the tracker's client is pointed at a closed
    port, as when the server dies): the run stays RUNNING with one epoch; `sync` completes it
    under the same run id, twice without a duplicate; `force` makes a second run on purpose."""
    from mlflow import MlflowClient

    from mpvg.tracking import RunTracker, _client, sync

    uri, out = sqlite_uri(tmp_path), tmp_path / "run"
    (out / "card.md").parent.mkdir(parents=True)
    (out / "card.md").write_text("card")
    begin = time.monotonic()  # the baseline: calls while the store answers
    tracker = RunTracker(out, uri, "tests", system_metrics=False)
    run_id = tracker.start("c-seed0", {"cell": "c", "task": "c100", "seed": 0}, {"recipe": {"lr": 0.1}})
    tracker.log_metrics({"loss": 1.0}, 1)
    base = time.monotonic() - begin
    tracker._client = _client(f"http://127.0.0.1:{free_port()}")  # the server is gone
    begin = time.monotonic()
    for step in (2, 3):
        tracker.log_metrics({"loss": 1.0 / step, "top1": 10.0 * step}, step)
    tracker.log_artifact(out / "card.md", "docs")
    tracker.finish("FINISHED")
    spent = time.monotonic() - begin
    assert spent < 3 * base + 1.0 and not tracker.online, (spent, base)  # no retries with backoff
    (out / "result.json").write_text(json.dumps({"cell": "c", "mlflow_run_id": run_id}))

    client = MlflowClient(uri)
    assert client.get_run(run_id).info.status == "RUNNING"
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1]

    assert sync(out, uri, "tests") == run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"recipe.lr": "0.1"}
    loss = client.get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in loss] == [(1, 1.0), (2, 0.5), (3, 1 / 3)]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "top1")] == [(2, 20.0), (3, 30.0)]
    assert [a.path for a in client.list_artifacts(run_id, "docs")] == ["docs/card.md"]
    journal_end = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert run.info.end_time == int(journal_end["time"] * 1000)  # when the job ended, not when synced

    assert sync(out, uri, "tests") == run_id  # nothing new the second time
    assert len(client.get_metric_history(run_id, "loss")) == 3
    assert len(client.list_artifacts(run_id, "docs")) == 1
    exp = client.get_run(run_id).info.experiment_id
    assert len(client.search_runs([exp])) == 1
    assert json.loads((out / "result.json").read_text())["mlflow_run_id"] == run_id

    copy = sync(out, uri, "tests", force=True)
    assert copy != run_id and len(client.search_runs([exp])) == 2
    assert json.loads((out / "result.json").read_text())["mlflow_run_id"] == copy


def test_journal_with_a_torn_last_line_is_read_and_a_broken_one_is_named(tmp_path):
    from mpvg.tracking import read_journal

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"event": "start"}\n{"event": "metrics", "st')
    assert read_journal(path) == [{"event": "start"}]
    path.write_text('{"event": "start"}\nnot json\n{"event": "end"}\n')
    with pytest.raises(ValueError, match=f"{path}:2: not a JSON event"):
        read_journal(path)
    with pytest.raises(FileNotFoundError, match="no tracking journal"):
        read_journal(tmp_path / "missing.jsonl")


def test_experiments_open_on_the_runs_table(tmp_path):
    """`tracking init` makes the project experiment and one per task, in a fixed order, all of
    the kind MLflow's UI opens on the runs table; an existing experiment gets the kind too."""
    import mlflow.server
    from mlflow import MlflowClient

    from mpvg.config import TASKS
    from mpvg.tracking import EXPERIMENT_KIND_TAG, TASK_EXPERIMENTS, experiment_ids, init_store, runs_table_url

    assert TASK_EXPERIMENTS == TASKS  # one experiment per task of the grid
    uri = sqlite_uri(tmp_path)
    client = MlflowClient(uri)
    client.create_experiment("proj")  # made before this version: no kind
    assert init_store(uri, "proj") == "1"
    assert experiment_ids(uri, "proj") == {"proj": "1", "proj/in1k": "2", "proj/c100": "3", "proj/coco": "4",
                                           "proj/ade20k": "5"}
    key, kind = EXPERIMENT_KIND_TAG
    assert all(client.get_experiment(i).tags.get(key) == kind for i in "12345")
    assert init_store(uri, "proj") == "1" and len(client.search_experiments()) == 6  # + MLflow's Default
    assert runs_table_url("http://127.0.0.1:5000/", "2") == \
        "http://127.0.0.1:5000/#/experiments/2/runs?workflowType=machine_learning"
    # the installed UI reads what the URL and the tag rely on (MLflow 3.17: GenAI mode by default)
    ui = "".join(p.read_text(errors="ignore") for p in
                 (Path(mlflow.server.__file__).parent / "js" / "build" / "static" / "js").glob("main.*.js"))
    for needle in ('"workflowType"', 'MACHINE_LEARNING="machine_learning"', f'"{key}"',
                   f'CUSTOM_MODEL_DEVELOPMENT="{kind}"', '"/experiments/:experimentId/runs"'):
        assert needle in ui, needle


def test_command_line_and_source_tags(monkeypatch):
    from mpvg.tracking import command_line, source_tags

    assert command_line(["/x/.venv/bin/mpvg", "train", "--cell", "a b"]) == "mpvg train --cell 'a b'"
    assert command_line(["/x/src/mpvg/__main__.py", "detect", "train"]) == "mpvg detect train"  # torchrun -m mpvg
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    tags = source_tags({"git_commit": "abc"})
    assert tags["mlflow.source.type"] == "JOB" and tags["mlflow.source.git.commit"] == "abc"
    assert "mlflow.source.git.commit" not in source_tags({"git_commit": "unknown"})


def _init(args):
    from mpvg.tracking import init_store

    return init_store(*args)


def test_store_creation_from_many_processes_at_once(tmp_path):
    uri = f"sqlite:///{tmp_path}/fresh.db"
    with multiprocessing.get_context("fork").Pool(4) as pool:
        ids = pool.map(_init, [(uri, "race")] * 8)
    assert len(set(ids)) == 1


def test_model_card_and_flatten():
    from mpvg.tracking import flatten, model_card

    assert flatten({"recipe": {"lr": 1, "scale": [0.8, 1.0]}, "x": {}}) == {"recipe.lr": 1, "recipe.scale": [0.8, 1.0],
                                                                           "x": {}}
    card = model_card({"model": "DeiT-Ti", "method": "MPVG", "cell": "c", "params": 5721640, "checkpoint": "a/b.pt",
                       "metrics": {"top1": 72.5}, "pe": {"pool": "avg"}}, {"lr": 1e-3}, "mpvg_deit", {"depth": 12})
    assert "5,721,640" in card and "`a/b.pt`" in card and "| top1 | 72.5000 |" in card and "| lr | 0.001 |" in card


def test_preempted_job_continues_the_same_mlflow_run(tiny_data, tmp_path, monkeypatch):
    import os
    import signal

    from mlflow import MlflowClient

    from mpvg.training import engine

    evaluate, calls = engine.evaluate, []

    def evaluate_then_preempt(*args, **kwargs):  # SIGTERM arrives during the first evaluation
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(engine, "evaluate", evaluate_then_preempt)
    uri, out, params = f"sqlite:///{tmp_path}/mlruns.db", tmp_path / "run", write_params(tmp_path, tiny_data)
    with pytest.raises(engine.Preempted, match="end of epoch 1"):
        train_in_process(params, out, tracking_uri=uri, experiment="tests")
    client = MlflowClient(uri)
    (first,) = client.search_runs(client.get_experiment_by_name("tests/in1k").experiment_id)
    assert first.info.status == "KILLED"
    result = train_in_process(params, out, tracking_uri=uri, experiment="tests")
    assert result["mlflow_run_id"] == first.info.run_id
    run = client.get_run(first.info.run_id)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_top1")] == list(range(1, EPOCHS + 1))


def test_log_analysis_nests_one_run_per_cell_with_short_metric_names(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from mpvg.tracking import log_analysis

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = sqlite_uri(tmp_path)
    figure = tmp_path / "figure6.png"
    figure.write_bytes(b"png")
    cells = {"in1k-deit_ti-mpvg": {"layers": 3, "layer_correlations": [0.1, None, 0.3], "seed": 0,
                                   "last_ln": {"beta_var": 0.5, "pooling": "GAP"}, "token_norms": None,
                                   "checkpoint": "runs/x/checkpoint.pt"},
             "in1k-deit_ti-pvg": {"layers": 2, "layer_correlations": [0.2, 0.4], "last_ln": {"beta_var": 0.25}}}
    run_id = log_analysis({"scale": "tiny", "tracking": {"uri": uri, "experiment": "tests"}},
                          {"figures": {"figure6": {"status": "partial"}}, "cells": cells}, [str(figure)])
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert client.get_experiment(run.info.experiment_id).name == "tests"
    assert run.info.run_name == "analysis" and run.data.tags["stage"] == "analysis"
    assert run.data.params == {"figures.figure6": "partial"} and run.data.metrics == {}
    assert [a.path for a in client.list_artifacts(run_id)] == ["figure6.png"]
    children = {r.info.run_name: r for r in client.search_runs(
        [run.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")}
    assert sorted(children) == ["in1k-deit_ti-mpvg", "in1k-deit_ti-pvg"]
    mpvg = children["in1k-deit_ti-mpvg"]
    assert mpvg.data.tags["cell"] == "in1k-deit_ti-mpvg" and mpvg.info.status == "FINISHED"
    assert mpvg.data.metrics == {"layer_correlations": 0.3, "last_ln.beta_var": 0.5}
    assert mpvg.data.params == {"layers": "3", "seed": "0", "last_ln.pooling": "GAP", "token_norms": "None",
                                "checkpoint": "runs/x/checkpoint.pt"}
    history = client.get_metric_history(mpvg.info.run_id, "layer_correlations")
    assert [(m.step, m.value) for m in history] == [(0, 0.1), (2, 0.3)]  # one step per layer


def test_report_command_logs_one_run_with_the_tables(tmp_path, monkeypatch):
    """`mpvg report` calls log_report: one run in the project experiment, the written files as
    artifacts (sub-folders kept), the given metrics."""
    from mlflow import MlflowClient

    from mpvg.cli import main
    from mpvg.tracking import log_report

    uri = sqlite_uri(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "reports"
    assert main(["report", "--params", str(repo / "params.yaml"), "--runs", str(tmp_path / "runs"),
                 "--out", str(out)]) == 0
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("mpvg")
    runs = client.search_runs([exp.experiment_id])
    (run,) = [r for r in runs if r.info.run_name == "report"]
    assert run.data.tags["stage"] == "report" and run.info.status == "FINISHED"
    # the claims' verdicts: their counts on the report run, one nested run per claim
    from mpvg.reporting.claims import load_claims

    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == run.info.run_id]
    assert len(children) == len(load_claims().claims) == len(runs) - 1
    assert run.data.metrics["claims_n_pending"] == len(children)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"README.md", "table1.md", "table1.tex", "tables.md"} <= artifacts
    assert artifacts == {p.name for p in out.iterdir()}  # the files and the per-table metrics/ folder

    (out / "sub").mkdir()
    (out / "sub" / "x.md").write_text("x")
    run_id = log_report({"tracking": {"uri": uri, "experiment": "tests"}},
                        {"claims": {"T1": 1, "T2": 0.0}, "note": "text"}, [out / "README.md", out / "sub" / "x.md"])
    run = client.get_run(run_id)
    assert run.data.metrics == {"claims.T1": 1.0, "claims.T2": 0.0}
    assert {a.path for a in client.list_artifacts(run_id)} == {"README.md", "sub"}
    assert [a.path for a in client.list_artifacts(run_id, "sub")] == ["sub/x.md"]


@pytest.mark.slow
def test_a_real_server_killed_mid_run_then_sync_completes_the_run(tmp_path):
    """A real server dies (SIGKILL) after epoch 1: the job finishes offline within seconds; once
    the server is back, `sync` completes the RUNNING run under its own id, artifacts included."""
    import os
    import signal

    from mlflow import MlflowClient

    from mpvg.tracking import RunTracker, sync

    port, out = free_port(), tmp_path / "run"
    uri = f"http://127.0.0.1:{port}"
    out.mkdir()
    (out / "card.md").write_text("card")
    with mlflow_server(tmp_path, port) as (_, server):
        begin = time.monotonic()  # the baseline: calls while the server answers
        tracker = RunTracker(out, uri, "tests", system_metrics=False)
        run_id = tracker.start("c-seed0", {"cell": "c", "task": "coco"}, {"recipe": {"lr": 0.1}})
        tracker.log_metrics({"loss": 1.0}, 1)
        base = time.monotonic() - begin
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)
        begin = time.monotonic()
        for step in (2, 3):
            tracker.log_metrics({"loss": 1.0 / step}, step)
        tracker.log_artifact(out / "card.md")
        tracker.finish("FINISHED")
        spent = time.monotonic() - begin
        assert spent < 3 * base + 1.0 and not tracker.online, (spent, base)  # no retries with backoff
    with mlflow_server(tmp_path, port):
        client = MlflowClient(uri)
        assert client.get_run(run_id).info.status == "RUNNING"
        assert sync(out, uri, "tests") == run_id
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2, 3]
        assert [a.path for a in client.list_artifacts(run_id)] == ["card.md"]
        assert client.get_experiment(run.info.experiment_id).name == "tests/coco"
        assert len(client.search_runs([run.info.experiment_id])) == 1
