"""Issue 14's hardening that needs no study: the alarm on non-finite probe energies."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from analysis.phases import OnlineDetector, detect
from study.runner import EnergyDivergenceStopper


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


def test_the_study_stopper_stops_a_trial_whose_energies_went_non_finite(tmp_path: Path) -> None:
    # patience 0: stop at the alarm; the stopper reads no stored rows in an empty study folder
    stopper = EnergyDivergenceStopper(str(tmp_path), patience=0)
    decisions = [stopper("t1", {**r, "best_val_robust_acc": 0.5}) for r in _rows(10, nan_at=4, probed_nan=True)]
    assert decisions.index(True) == 4
