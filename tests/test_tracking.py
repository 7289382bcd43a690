"""MLflow tracking: run contents in a real SQLite store, an unreachable server, store creation races."""
from __future__ import annotations

import json
import multiprocessing
import socket

import pytest

from test_training import (CELL, EPOCHS, make_spec, tiny_data, train_in_process,  # noqa: F401
                           write_params)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


def test_uri_precedence_env_then_params_then_local_sqlite(tmp_path, monkeypatch):
    from mpvg.tracking import resolve_tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri({"tracking": {"uri": ""}}, tmp_path) == f"sqlite:///{tmp_path}/mlruns.db"
    assert resolve_tracking_uri({"tracking": {"uri": "http://srv:5000"}}, tmp_path) == "http://srv:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://other:5000")
    assert resolve_tracking_uri({"tracking": {"uri": "http://srv:5000"}}, tmp_path) == "http://other:5000"


def test_run_is_logged_with_tags_params_metrics_and_artifacts(tiny_data, tmp_path):
    from mlflow import MlflowClient

    from mpvg.tracking import init_store

    uri = f"sqlite:///{tmp_path}/mlruns.db"
    init_store(uri, "tests")
    out, params_path = tmp_path / "run", write_params(tmp_path, tiny_data)
    result = train_in_process(params_path, out, tracking_uri=uri, experiment="tests")
    recipe = make_spec(params_path).recipe

    client = MlflowClient(uri)
    run = client.get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == f"{CELL}-seed0"
    assert client.get_experiment(run.info.experiment_id).name == "tests"
    tags = run.data.tags
    expected = {"model": "DeiT-S", "method": "MPVG", "dataset": "imagenet", "seed": "0", "stage": "train",
                "cell": CELL, "scale": "tiny", "git_commit": result["git_commit"]}
    assert {k: tags.get(k) for k in expected} == expected
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


def test_unreachable_server_does_not_stop_training_and_sync_uploads_later(tiny_data, tmp_path, monkeypatch, caplog):
    from mlflow import MlflowClient

    from mpvg.tracking import sync

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    out = tmp_path / "run"
    result = train_in_process(write_params(tmp_path, tiny_data, epochs=2), out,
                              tracking_uri=f"http://127.0.0.1:{closed_port()}", experiment="tests")
    assert result["mlflow_run_id"] is None and (out / "result.json").exists()
    assert "continuing without it" in caplog.text
    journal = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in journal if e["event"] == "metrics"] == [1, 2, 2]  # 2 epochs + final
    assert journal[0]["event"] == "start" and journal[0]["tags"]["cell"] == CELL

    uri = f"sqlite:///{tmp_path}/mlruns.db"
    run_id = sync(out, uri, "tests")
    run = MlflowClient(uri).get_run(run_id)
    assert run.data.tags["cell"] == CELL and run.info.status == "FINISHED"
    assert run.data.metrics["final_top1"] == pytest.approx(result["metrics"]["top1"])
    assert json.loads((out / "result.json").read_text())["mlflow_run_id"] == run_id


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
    (first,) = client.search_runs(client.get_experiment_by_name("tests").experiment_id)
    assert first.info.status == "KILLED"
    result = train_in_process(params, out, tracking_uri=uri, experiment="tests")
    assert result["mlflow_run_id"] == first.info.run_id
    run = client.get_run(first.info.run_id)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_top1")] == list(range(1, EPOCHS + 1))


def test_log_analysis_records_numbers_and_files(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from mpvg.tracking import log_analysis

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    figure = tmp_path / "figure6.png"
    figure.write_bytes(b"png")
    run_id = log_analysis({"scale": "tiny", "tracking": {"uri": uri, "experiment": "tests"}},
                          {"cells": {"in1k-deit_ti-mpvg": {"beta_var": 0.5, "corr": [0.1, None, 0.3], "note": "x"}}},
                          [str(figure)])
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.data.tags["stage"] == "analysis" and run.data.metrics["cells.in1k-deit_ti-mpvg.beta_var"] == 0.5
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "cells.in1k-deit_ti-mpvg.corr")] == [
        (0, 0.1), (2, 0.3)]
    assert [a.path for a in client.list_artifacts(run_id)] == ["figure6.png"]
