"""Experiment trackers through Accelerate: the same global figures in metrics.jsonl, tensorboard and MLflow
(a file store in the run folder, offline); quiet output unless --verbose."""
from __future__ import annotations

import pytest
from accelerate.state import AcceleratorState, GradientState

from tests.test_loop import records, run
from trainer.config import ConfigError, load_config
from trainer.metrics import missing_trackers
from trainer.objectives import causal_lm_objective


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.mark.slow
@pytest.mark.skipif(bool(missing_trackers(["mlflow"])), reason="mlflow is not installed (the trackers extra)")
def test_mlflow_and_tensorboard_get_the_figures_of_metrics_jsonl(tmp_path, monkeypatch):
    import mlflow
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    run(tmp_path, causal_lm_objective, *["train.max_steps=6", "train.eval_every=3", "logging.tensorboard=true",
                    "train.report_to=[tensorboard, mlflow]"])
    train_rows, val_rows = records(tmp_path), records(tmp_path, "val")

    client = mlflow.MlflowClient(tracking_uri=(tmp_path / "mlruns").resolve().as_uri())
    (experiment,) = [e for e in client.search_experiments() if e.name == tmp_path.name]
    (mlflow_run,) = client.search_runs([experiment.experiment_id])
    assert mlflow_run.data.params["optim.lr"] == "0.01" and mlflow_run.info.status == "FINISHED"
    for split, rows in (("train", train_rows), ("val", val_rows)):
        for key in ("loss", "lr") if split == "train" else ("loss",):
            logged = [(m.step, m.value) for m in client.get_metric_history(mlflow_run.info.run_id, f"{split}/{key}")]
            assert sorted(logged) == [(r["step"], pytest.approx(r[key])) for r in rows]

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, pytest.approx(e.value)) for e in events.Scalars("train/loss")] == [
        (r["step"], r["loss"]) for r in train_rows]


def test_unknown_or_missing_trackers_are_config_errors(monkeypatch):
    with pytest.raises(ConfigError, match="train.report_to"):
        load_config(None, ["train.report_to=[neptune]"])
    monkeypatch.setattr("trainer.metrics.missing_trackers", lambda names: [n for n in names if n == "aim"])
    with pytest.raises(ConfigError, match="aim is not installed"):
        load_config(None, ["train.report_to=[tensorboard, aim]"])
    assert load_config(None, ["logging.tensorboard=false"]).trackers() == []


@pytest.mark.parametrize("verbose", [False, True])
def test_quiet_by_default_and_verbose_shows_warnings(monkeypatch, verbose):
    import os
    import warnings

    import torch
    import transformers

    from trainer.quiet import set_verbosity

    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    before = transformers.logging.get_verbosity()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        set_verbosity(verbose)
        warnings.warn("deprecated soon", FutureWarning)
    transformers.logging.set_verbosity(before)
    assert [str(w.message) for w in caught] == ([] if not verbose else ["deprecated soon"])
    assert ("DS_ACCELERATOR" in os.environ) == (not verbose and not torch.cuda.is_available())
