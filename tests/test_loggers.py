"""Experiment trackers through Ray Tune's own integrations (`loggers:`), with the real libraries
and no network: MLflow into an SQLite store, W&B in offline mode, TensorBoard event files. Every
epoch's energy columns arrive under their `epochs` table names with the table's values."""

from __future__ import annotations

import json
import struct
from collections import Counter
from pathlib import Path

import pytest
import yaml
from test_study import energyat

from analysis.query import open_tables

SPEC = {
    "name": "logged", "dataset": {"name": "digits", "train_size": 200}, "model": "small_cnn", "method": "sat", "epochs": 2,
    "batch_size": 64, "lr": 0.05, "attack": {"eps": 0.15, "steps": 2}, "eval_attack": {"steps": 3},
    "probe": {"train_size": 32, "test_size": 32}, "final_eval": {"n": 64, "pgd_steps": 3, "autoattack_n": 0}, "device": "cpu",
    "samples": 1, "max_concurrent": 1, "search": {"lr": [0.04, 0.06]},
}
COLUMNS = ("probe_train_dE", "probe_train_E", "val_robust_acc", "train_loss")


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[int, dict[str, float]]]:
    base = tmp_path_factory.mktemp("loggers")
    spec = {**SPEC, "loggers": {"tensorboard": {}, "mlflow": {}, "wandb": {"mode": "offline"}}}
    (base / "spec.yaml").write_text(yaml.safe_dump(spec))
    energyat("run", str(base / "spec.yaml"), "--storage", str(base / "studies"))
    study = base / "studies" / "logged"
    rows = open_tables(study).execute(f"select epoch, {', '.join(COLUMNS)} from epochs order by epoch").fetchall()
    return base, study, {r[0]: dict(zip(COLUMNS, r[1:], strict=True)) for r in rows}


def test_mlflow_holds_each_epoch_under_the_table_names(logged: tuple[Path, Path, dict]) -> None:
    import mlflow

    _base, study, table = logged
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{study / 'mlflow.db'}")  # the default: a store in the study
    (run,) = client.search_runs([client.get_experiment_by_name("logged").experiment_id])
    for column in COLUMNS:
        history = {m.step - 1: m.value for m in client.get_metric_history(run.info.run_id, column)}  # step = epoch + 1
        assert history == pytest.approx({e: v[column] for e, v in table.items()}), column


def _assert_same(seen: dict[int, dict[str, float]], table: dict[int, dict[str, float]], *, rel: float) -> None:
    assert sorted(seen) == sorted(table)
    for epoch, values in table.items():
        assert seen[epoch] == pytest.approx(values, rel=rel, abs=rel), epoch


def _wandb_records(path: Path):
    """The protobuf records of a W&B run file: LevelDB's log format (32 KiB blocks of records with
    a 7-byte header, large ones in pieces) after W&B's 7-byte file header."""
    data, pos, pending = path.read_bytes(), 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        payload, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            return
        if kind in (1, 4):
            yield pending + payload
            pending = b""
        else:
            pending += payload


def test_wandb_offline_run_holds_each_epoch_under_the_table_names(logged: tuple[Path, Path, dict]) -> None:
    from wandb.proto import wandb_internal_pb2

    _base, study, table = logged
    (run_file,) = study.glob("wandb/offline-run-*/run-*.wandb")  # the default dir: the study
    seen, kinds, keys = {}, Counter[str](), set()
    for raw in _wandb_records(run_file):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        kinds[str(record.WhichOneof("record_type"))] += 1
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            keys |= set(items)
            if "epoch" in items and all(c in items for c in COLUMNS):  # the epochs, not W&B's own records
                seen[items["epoch"]] = {c: items[c] for c in COLUMNS}
    # what the file held, should it hold no epoch (seen once under a loaded machine, not reproduced)
    assert seen, f"{run_file}: {run_file.stat().st_size} bytes, records {dict(kinds)}, history keys {sorted(keys)}"
    _assert_same(seen, table, rel=1e-9)


def _tfevents(path: Path):
    """Summary values of a TensorBoard event file (TFRecord: length, its CRC, data, data CRC)."""
    from tensorboardX.proto.event_pb2 import Event

    data, pos = path.read_bytes(), 0
    while pos + 12 <= len(data):
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        event = Event()
        event.ParseFromString(data[pos + 12:pos + 12 + length])
        pos += 12 + length + 4
        for value in event.summary.value:
            yield event.step, value.tag, value.simple_value


def test_tensorboard_events_hold_each_epoch_under_the_table_names(logged: tuple[Path, Path, dict]) -> None:
    _base, study, table = logged
    (trial_dir,) = [p for p in (study / "tune").iterdir() if p.is_dir()]
    seen: dict[int, dict[str, float]] = {}
    for events in trial_dir.glob("events.out.tfevents.*"):
        for step, tag, value in _tfevents(events):
            column = tag.rsplit("/", 1)[-1]
            if tag.startswith("ray/tune/") and column in COLUMNS:
                seen.setdefault(step - 1, {})[column] = value
    _assert_same(seen, table, rel=1e-6)  # TensorBoard keeps float32
