"""Issue 14's hardening that needs no study: the alarm on non-finite probe energies."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from analysis.phases import OnlineDetector, detect
from analysis.stopping import StopRule


def _rows(epochs: int, *, nan_at: int | None, probed_nan: bool) -> list[dict]:
    """A settled |dE| of about 1 and, at `nan_at`, energies that are NaN (probed or not)."""
    rows = []
    for e in range(epochs):
        d_e, energy = -1.0 + 0.01 * math.sin(e), -6.0
        probed = True
        if e == nan_at:
            d_e, energy, probed = math.nan, (math.inf if probed_nan else math.nan), probed_nan
        rows.append({"epoch": e, "lr": 0.1, "probe_train_dE": d_e, "probe_train_E": energy, "probed": probed})
    return rows


def test_probed_non_finite_energies_raise_the_alarm_at_once_whatever_the_lr() -> None:
    # lr 0.1 throughout: the gate would hold a |dE| alarm back, never this one
    det = OnlineDetector()
    seen = [det.update(r) for r in _rows(12, nan_at=7, probed_nan=True)]
    assert [a for _p, a in seen] == [False] * 7 + [True] * 5
    assert seen[7][0] == 3 and det.alarm_epoch == 7 and det.nonfinite_epoch == 7
    assert det.alarm_reason == "non-finite probe energies at epoch 7"


def test_an_epoch_without_a_probe_is_not_an_alarm() -> None:
    det = OnlineDetector()
    seen = [det.update(r) for r in _rows(12, nan_at=7, probed_nan=False)]
    assert not any(a for _p, a in seen) and det.alarm_epoch is None and det.alarm_reason is None


def test_offline_phases_place_the_onset_at_the_first_non_finite_probe() -> None:
    rows = _rows(12, nan_at=7, probed_nan=True)
    result = detect({k: np.array([r[k] for r in rows]) for k in rows[0]})
    assert result.alarm_epoch == 7 and result.phase3_start == 7
    assert list(result.labels[7:]) == [3] * 5 and 3 not in result.labels[:7]


def test_the_stop_rule_stops_a_trial_whose_energies_went_non_finite() -> None:
    # patience 0: stop at the alarm
    detector, rule = OnlineDetector(), StopRule(energy_patience=0)
    decisions = [rule.decide(epoch=r["epoch"], alarm=detector.update(r)[1], best_epoch=0) for r in _rows(10, nan_at=4, probed_nan=True)]
    assert decisions.index("energy_divergence") == 4


# -- damaged checkpoints and durable writes (issue 14, item 5) ------------------------------------

import os  # noqa: E402
import shutil  # noqa: E402

import pytest  # noqa: E402
import yaml  # noqa: E402
from conftest import TINY  # noqa: E402

from analysis.store import read_trial_rows  # noqa: E402
from study.cli import main  # noqa: E402
from study.spec import load_spec  # noqa: E402
from trainables import checkpoint  # noqa: E402
from trainables.engine import run_trial  # noqa: E402


class _Crash(Exception):
    pass


def _crash_after_epoch_1(row: dict, _ckpt: Path) -> None:
    if row["epoch"] == 1:
        raise _Crash  # after epoch 1's rows and checkpoints: a process that died there
    return None


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An `energyat train` output of 4 epochs, probed at 0, 2 and 3, that died after epoch 1:
    best.pt holds epoch 0, last.pt epoch 1."""
    from study.spec import load_spec
    from trainables.engine import run_trial

    base = tmp_path_factory.mktemp("finished")
    (base / "spec.yaml").write_text(yaml.safe_dump({**TINY, "epochs": 4, "probe": {**TINY["probe"], "every": 2}}))
    cfg = load_spec(str(base / "spec.yaml"), []).trial
    with pytest.raises(_Crash):
        run_trial(cfg, out=base / "out", on_epoch=_crash_after_epoch_1, spec_file=base / "out" / "spec.yaml")
    return base


DAMAGE = {
    "truncated": lambda b: b[: len(b) // 2],
    "empty": lambda b: b"",
    "garbage": lambda b: os.urandom(len(b)),
}


@pytest.mark.parametrize("kind", DAMAGE)
def test_a_damaged_last_checkpoint_is_named_and_the_trial_continues_from_best(kind: str, finished: Path, tmp_path: Path, capfd) -> None:
    case = tmp_path / "case"
    shutil.copytree(finished, case)
    ckpt = case / "out" / "checkpoints" / "train"
    assert checkpoint.load(ckpt / "best.pt")["epoch"] == 0 and checkpoint.load(ckpt / "last.pt")["progress"]["next_epoch"] == 2
    last = ckpt / "last.pt"
    last.write_bytes(DAMAGE[kind](last.read_bytes()))
    rows = case / "out" / "tables" / "epochs" / "trial=train"
    before = {p.name: p.stat().st_mtime_ns for p in rows.iterdir()}
    capfd.readouterr()
    # the engine itself: `energyat train` would then compact the files this test compares
    run_trial(load_spec(str(case / "spec.yaml"), []).trial, out=case / "out", spec_file=case / "out" / "spec.yaml")
    err = capfd.readouterr().err
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and str(last) in warnings[0] and "damaged" in warnings[0] and "best.pt" in warnings[0], err
    # the epochs after the best one ran again and rewrote their own files; the ones up to it were kept
    after = {p.name: p.stat().st_mtime_ns for p in rows.iterdir()}
    assert sorted(before) == ["epoch-0000.parquet", "epoch-0001.parquet"]
    assert sorted(after) == [f"epoch-{e:04d}.parquet" for e in range(4)]
    assert after["epoch-0000.parquet"] == before["epoch-0000.parquet"] and after["epoch-0001.parquet"] != before["epoch-0001.parquet"]
    epochs = read_trial_rows(str(case / "out"), table="epochs", trial_id="train", columns=["epoch"])["epoch"]
    assert epochs == [0, 1, 2, 3]
    state = checkpoint.load(last)  # whole again
    assert state["progress"]["next_epoch"] == 4 and state["progress"]["stop_reason"] == "completed"


def test_with_both_checkpoints_damaged_the_trial_starts_afresh(finished: Path, tmp_path: Path, capfd) -> None:
    case = tmp_path / "case"
    shutil.copytree(finished, case)
    ckpt = case / "out" / "checkpoints" / "train"
    for name in ("last.pt", "best.pt"):
        (ckpt / name).write_bytes(b"")
    capfd.readouterr()
    assert main(["train", str(case / "spec.yaml"), "--out", str(case / "out")]) == 0
    warnings = [line for line in capfd.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 2 and "last.pt" in warnings[0] and "best.pt" in warnings[1] and "epoch 0" in warnings[1]
    assert checkpoint.load(ckpt / "last.pt")["progress"]["next_epoch"] == 4
    assert read_trial_rows(str(case / "out"), table="epochs", trial_id="train", columns=["epoch"])["epoch"] == [0, 1, 2, 3]


def test_checkpoints_and_table_files_reach_the_disk_before_their_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # os.fsync still syncs; it also records what it synced, and os.replace when it renamed
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: str, dst: str) -> None:
        events.append(("replace", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    import torch

    from analysis.schema import EPOCHS
    from analysis.store import write_epoch_rows

    checkpoint.save(tmp_path / "ck" / "last.pt", {"w": torch.zeros(3)})
    write_epoch_rows(str(tmp_path), table="epochs", trial_id="t", epoch=0,
                     columns={name: [None] for name in EPOCHS.names}, provenance={})
    for target in (tmp_path / "ck" / "last.pt", tmp_path / "tables/epochs/trial=t/epoch-0000.parquet"):
        i = events.index(("replace", str(target)))
        assert events[i - 1][0] == "fsync" and events[i - 1][1].startswith(str(target.parent / f".{target.name}.")), events
        assert events[i + 1] == ("fsync", str(target.parent)), events


def test_energyat_errors_survive_the_pickling_that_carries_them_from_a_ray_worker() -> None:
    # Ray pickles a trial's exception to the driver; SpecError once arrived as a TypeError about its
    # constructor, and the trial's ERROR row said that instead of what was wrong
    import pickle

    from analysis.errors import DataNotFoundError, SpecError

    for error in (SpecError("dataset.root", "x.npz is not a readable .npz file"), DataNotFoundError("npz", "/d", "an .npz file")):
        back = pickle.loads(pickle.dumps(error))
        assert type(back) is type(error) and str(back) == str(error) and back.__dict__ == error.__dict__


def test_an_attempt_removes_the_scratch_folders_of_dead_attempts_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a SIGKILLed worker leaves its folder; a worker still winding down (its node lost) keeps it
    import subprocess
    import tempfile

    from trainables.tune_adapter import scratch_folder

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen(["true"])
    dead.wait()
    alive = subprocess.Popen(["sleep", "30"])
    try:
        (tmp_path / f"energyat-t1-{dead.pid}").mkdir()
        (tmp_path / f"energyat-t1-{alive.pid}" / "last.pt").parent.mkdir()
        (tmp_path / f"energyat-t1-{alive.pid}" / "last.pt").write_bytes(b"x")
        (tmp_path / f"energyat-t10-{dead.pid}").mkdir()  # another trial's
        work = scratch_folder("t1")
        assert work == tmp_path / f"energyat-t1-{os.getpid()}" and work.is_dir()
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            [work.name, f"energyat-t1-{alive.pid}", f"energyat-t10-{dead.pid}"])
    finally:
        alive.kill()
        alive.wait()
