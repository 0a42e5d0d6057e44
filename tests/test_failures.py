"""Trials that fail for good end consistently (issue 14, items 4 and 8), on a real local Ray.

A fault that persists through every restart ends the trial as ERROR in `trials` with its reason,
FAIL in Optuna, and `run` and `resume` exit 1 with one line naming it; `resume --retry-errored`
gives it a second life from epoch 0 whose results Optuna records. A trial that hangs (no epoch
within `hang_timeout`) is ended the same way, and the study goes on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import optuna
import pyarrow.parquet as pq
import yaml
from sklearn.datasets import load_digits
from test_study import assert_tables_consistent, energyat, journal_trials

from analysis.query import open_tables
from study.journal import RETRY_ATTR, TUNE_ID_ATTR

STUDY = {
    "name": "f", "model": "small_cnn", "method": "sat", "epochs": 2, "batch_size": 64, "lr": 0.05,
    "attack": {"eps": 0.15, "steps": 2}, "eval_attack": {"steps": 3}, "probe": {"train_size": 32, "test_size": 32},
    "final_eval": {"n": 64, "pgd_steps": 3, "autoattack_n": 0}, "device": "cpu", "seed": 0,
    "samples": 1, "max_concurrent": 1, "resources": {"cpu": 1}, "search": {"lr": [0.04, 0.06]},
}


def _write_digits_npz(path: Path) -> None:
    digits = load_digits()
    np.savez(path, image=np.clip(digits.images * 16, 0, 255).astype(np.uint8), label=digits.target.astype(np.int64))


def _summary(stderr: str) -> str:
    return stderr.strip().splitlines()[-1]


def test_a_trial_failing_for_good_is_error_everywhere_and_retry_errored_gives_it_a_second_life(tmp_path: Path) -> None:
    data = tmp_path / "data.npz"
    data.write_bytes(b"not an npz: the file a worker reads is damaged, on every restart")
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({**STUDY, "dataset": {"name": "npz", "root": str(data)}, "max_failures": 1}))
    study_dir = tmp_path / "studies" / "f"

    first = energyat("run", str(spec), "--storage", str(tmp_path / "studies"), check=False)
    assert first.returncode == 1, first.stderr[-3000:]
    con = open_tables(study_dir)
    (row,) = con.execute("select trial_id, status, stop_reason, epochs_run from trials").fetchall()
    trial_id, status, reason, epochs_run = row
    assert status == "ERROR" and epochs_run == 0
    assert reason.startswith("error: ") and "is not a readable .npz file" in reason and "after 2 failures" in reason, reason
    line = _summary(first.stderr)
    assert line.startswith("energyat: 1 trial failed: ") and trial_id in line and "--retry-errored" in line, line
    (failed,) = journal_trials(study_dir)
    assert failed.state == optuna.trial.TrialState.FAIL and failed.user_attrs[TUNE_ID_ATTR] == trial_id

    # a plain resume does not rerun it, and still says so
    again = energyat("resume", str(study_dir), check=False)
    assert again.returncode == 1 and _summary(again.stderr) == line.replace(str(tmp_path / "studies" / "f"), str(study_dir))
    assert len(journal_trials(study_dir)) == 1

    _write_digits_npz(data)  # the fault repaired
    retried = energyat("resume", str(study_dir), "--retry-errored")
    # Tune restarts it under a new trial id; only the new one's rows are in the views
    trials = assert_tables_consistent(study_dir)
    (new_id, status, _reason, epochs_run, _method, best), = trials
    assert new_id != trial_id and (status, epochs_run) == ("TERMINATED", 2), trials
    first_life, second_life = journal_trials(study_dir)
    assert first_life.state == optuna.trial.TrialState.FAIL
    assert second_life.state == optuna.trial.TrialState.COMPLETE and second_life.values == [best]
    assert second_life.params == first_life.params and {k: second_life.user_attrs.get(k) for k in (TUNE_ID_ATTR, RETRY_ATTR)} == {
        TUNE_ID_ATTR: new_id,
        RETRY_ATTR: first_life.number,
    }
    assert second_life.user_attrs["energyat_stop_reason"] == "completed"  # the energy outcomes of its second life
    # the failed life's row and Tune folder are kept aside, out of the views
    (kept,) = (study_dir / "retried" / trial_id).glob("*/tables/trials/*.parquet")
    assert pq.read_table(kept).column("status").to_pylist() == ["ERROR"]
    assert list((study_dir / "retried" / trial_id).glob("*/tune/" + trial_id))
    assert f"retrying trial {trial_id}" in retried.stderr
    # and a later resume finds nothing lost and nothing to do
    later = energyat("resume", str(study_dir))
    assert "lost" not in later.stderr and len(journal_trials(study_dir)) == 2


def test_a_trial_with_no_epoch_within_hang_timeout_ends_as_error_and_the_study_goes_on(tmp_path: Path) -> None:
    # 20,000 attack steps make one epoch last minutes: from outside, a hung trial looks the same.
    # The sampler seed (the spec's, 0) draws 20000 then 2.
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({
        **STUDY, "dataset": {"name": "digits", "train_size": 200}, "samples": 2, "max_concurrent": 2, "max_failures": 0,
        "attack": {"eps": 0.15, "steps": 2, "step": 0.075}, "hang_timeout": 20, "search": {"attack.steps": {"choices": [2, 20000]}},
    }))
    study_dir = tmp_path / "studies" / "f"
    proc = energyat("run", str(spec), "--storage", str(tmp_path / "studies"), check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    con = open_tables(study_dir)
    rows = con.execute("select attack_steps, status, stop_reason from trials order by 1").fetchall()
    assert [(r[0], r[1]) for r in rows] == [(2, "TERMINATED"), (20000, "ERROR")], rows
    assert rows[1][2] == "error: hung: no epoch finished within 20 s (hang_timeout)"
    hung_id = con.execute("select trial_id from trials where status = 'ERROR'").fetchone()[0]
    assert _summary(proc.stderr).startswith(f"energyat: 1 trial failed: {hung_id} (error: hung")
    states = sorted(t.state.name for t in journal_trials(study_dir))
    assert states == ["COMPLETE", "FAIL"]
