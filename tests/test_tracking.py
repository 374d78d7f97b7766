"""services/trainer/tracking.py: what each tool wrote, read back with that tool's own reader
(TensorBoard's EventAccumulator, W&B's offline run file parsed into W&B's protobuf records, MLflow's
client on its store)."""

from __future__ import annotations

import json
import math
import struct
import sys
from pathlib import Path

import pytest

from services.trainer.tracking import Tracker
from topd_client.errors import ConfigurationError

SETTINGS = {"objective": "topd", "lr": 1e-4, "window": 16, "adv_clip": None, "ot": {"solver": "exact", "eps": 0.05}}
STEPS = {
    1: {"loss": 0.9, "opd/reverse_kl": 0.5, "time/score": 0.25, "policy_version": 1, "note": "skipped: a string"},
    2: {"loss": 0.7, "opd/reverse_kl": 0.25, "time/score": 0.5, "policy_version": 2},
    3: {"loss": 0.5, "opd/reverse_kl": 0.125, "time/score": 0.125, "policy_version": 3, "eval/accuracy": 0.75},
}
FINAL = {"final/accuracy": 0.8125}


def write_run(report_to: list[str], run_dir: Path) -> None:
    with Tracker(report_to, run_dir, run_name="seed0") as tracker:
        tracker.log_settings(SETTINGS)
        for step, metrics in STEPS.items():
            tracker.log_metrics(step, metrics)
        tracker.log_final(FINAL)


def test_tensorboard_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    write_run(["tensorboard"], tmp_path)
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    kl = [(e.step, e.value) for e in events.Scalars("opd/reverse_kl")]
    assert kl == [(1, 0.5), (2, 0.25), (3, 0.125)]
    assert [(e.step, e.value) for e in events.Scalars("eval/accuracy")] == [(3, 0.75)]
    assert [(e.step, e.value) for e in events.Scalars("final/accuracy")] == [(3, 0.8125)]
    assert "note" not in events.Tags()["scalars"]
    (text,) = events.Tensors("settings/text_summary")
    logged = json.loads(text.tensor_proto.string_val[0].decode().replace("\n    ", "\n"))
    assert logged == SETTINGS


# --- W&B offline ----------------------------------------------------------------------------------

_WANDB_HEADER = struct.Struct("<4sHB")  # ":W&B", magic 0xBEE1, version
_BLOCK = 32768
_RECORD = struct.Struct("<IHB")  # crc32, length, type: 1 full, 2 first, 3 middle, 4 last


def wandb_records(path: Path) -> list:
    """The protobuf Records of an offline run file (a LevelDB-style log of wandb_internal_pb2.Record)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, _ = _WANDB_HEADER.unpack_from(data)
    assert (ident, magic) == (b":W&B", 0xBEE1), path
    records, pending, pos = [], b"", _WANDB_HEADER.size
    while pos + _RECORD.size <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _RECORD.size:  # the block's tail is padding
            pos += left
            continue
        _, length, kind = _RECORD.unpack_from(data, pos)
        if length == 0 and kind == 0:
            break
        chunk = data[pos + _RECORD.size: pos + _RECORD.size + length]
        pos += _RECORD.size + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def test_wandb_offline_run_files(tmp_path):
    pytest.importorskip("wandb")
    write_run(["wandb"], tmp_path)
    (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    history, config, summary, names = {}, {}, {}, []
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history[row["_step"]] = row
        elif kind == "run":
            names.append(record.run.display_name)
            config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "summary":
            summary.update({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.summary.update})
    assert names and set(names) == {"seed0"}
    assert sorted(history) == [1, 2, 3]
    assert [history[s]["opd/reverse_kl"] for s in (1, 2, 3)] == [0.5, 0.25, 0.125]
    assert history[3]["eval/accuracy"] == 0.75 and "note" not in history[1]
    assert {key: config[key] for key in SETTINGS} == SETTINGS
    assert summary["final/accuracy"] == 0.8125


# --- MLflow ----------------------------------------------------------------------------------------


def read_mlflow(uri: str, experiment: str = "topd"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    history = {key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
               for key in run.data.metrics}
    return run, history


def check_mlflow_run(run, history) -> None:
    assert run.info.run_name == "seed0" and run.info.status == "FINISHED"
    assert history["opd/reverse_kl"] == [(1, 0.5), (2, 0.25), (3, 0.125)]
    assert history["final/accuracy"] == [(3, 0.8125)] and "note" not in history
    params = run.data.params
    assert params["objective"] == "topd" and float(params["lr"]) == 1e-4 and params["adv_clip"] == "null"
    assert params["ot.solver"] == "exact" and float(params["ot.eps"]) == 0.05


def test_mlflow_local_store_under_the_run_dir(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    write_run(["mlflow"], tmp_path)
    check_mlflow_run(*read_mlflow(f"sqlite:///{tmp_path / 'mlflow.db'}"))


def test_mlflow_tracking_uri_from_the_environment(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses its file store otherwise
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file://{tmp_path / 'elsewhere'}")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "my-distillation")
    write_run(["mlflow"], tmp_path / "run")
    assert not (tmp_path / "run" / "mlflow.db").exists()
    check_mlflow_run(*read_mlflow(f"file://{tmp_path / 'elsewhere'}", "my-distillation"))


# --- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tensorboard", "wandb", "mlflow"])
def test_a_missing_library_names_its_extra(tmp_path, monkeypatch, name):
    monkeypatch.setitem(sys.modules, name, None)  # `import name` raises ImportError
    with pytest.raises(ConfigurationError, match=rf"pip install 'topd\[{name}\]'"):
        Tracker([name], tmp_path)
    assert not list(tmp_path.iterdir())  # nothing created before the check


def test_unknown_tool_lists_the_valid_ones_and_none_is_a_no_op(tmp_path):
    with pytest.raises(ConfigurationError, match="tensorboard, wandb, mlflow"):
        Tracker(["comet"], tmp_path)
    with Tracker([], tmp_path / "run") as tracker:
        tracker.log_metrics(1, {"loss": math.nan})
        tracker.log_final({"final/accuracy": 1.0})
    assert list((tmp_path / "run").iterdir()) == []
