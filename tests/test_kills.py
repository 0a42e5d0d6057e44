"""Kills, seeded and bounded: SIGKILL to trials' worker processes mid-epoch, and to the driver
(its whole process group, the local Ray included) followed by `energyat resume`.

After each study: one `epochs` row and one whole set of `samples` rows per (trial, epoch) that
ran, epochs contiguous from 0, one complete `trials` row per trial, and an Optuna journal in which
every Tune trial appears once, in the state and with the value that match Tune's
(:func:`test_study.assert_tables_consistent`, :func:`test_study.assert_journal_matches_tune`).
The kill points come from ``random.Random(KILL_SEED)``: they differ between kills, not between runs.
docs/reliability.md quotes the number of kills.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import duckdb
from conftest import EXAMPLES, ROOT, ctrl_c, energyat_cmd
from test_study import assert_journal_matches_tune, assert_tables_consistent, energyat

from analysis.errors import StoreError
from analysis.query import open_tables
from analysis.store import read_trial_rows

SMOKE = str(EXAMPLES / "smoke.yaml")
KILL_SEED = 2026
EPOCHS, SAMPLES = 4, 4  # 16 trial-epochs per study
WORKER_KILLS, DRIVER_KILLS = 2, 3  # with the S3 driver kill in test_remote_storage.py: docs/reliability.md's count
TUNE_LOST_CHECKPOINT = "Could not recover from checkpoint as it does not exist on storage anymore"  # Ray Tune's words
PROBE_ROWS = 64 + 128  # smoke.yaml's probe: 64 training and 128 test images per probed epoch


def _assert_complete(study_dir: Path) -> None:
    """The checks of the module docstring, with the exact row counts docs/reliability.md quotes."""
    trials = assert_tables_consistent(study_dir)
    assert len(trials) == SAMPLES and all(t[3] == EPOCHS for t in trials)
    con = open_tables(study_dir)
    counts = con.execute("select (select count(*) from epochs), (select count(*) from samples), (select count(*) from trials)").fetchone()
    assert counts == (SAMPLES * EPOCHS, SAMPLES * EPOCHS * PROBE_ROWS, SAMPLES)
    assert_journal_matches_tune(study_dir)


def _epoch_files(study_dir: Path) -> int:
    """Epochs written so far: running trials' files, and finished trials' rows, compacted."""
    try:
        con = open_tables(study_dir)
        try:
            return int(con.execute("select count(*) from epochs").fetchone()[0])
        finally:
            con.close()
    except (StoreError, duckdb.Error):  # no tables yet, or a file the driver's compaction just removed
        return 0


def _wait_for(condition, proc: subprocess.Popen[bytes], what: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the study ended before {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout:.0f} s"
        time.sleep(0.2)


def _trial_workers(study_dir: Path) -> dict[str, int]:
    """{trial id: pid} of this study's running trial actors: their process title is
    `ray::ImplicitFunc.train`, their working directory `.../working_dirs/<trial id>`, and the
    study has a folder `tune/<trial id>` (the other test worker may run a study meanwhile)."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:  # gone meanwhile, or not ours
            continue
        if title.startswith(b"ray::ImplicitFunc") and "working_dirs" in cwd and (study_dir / "tune" / Path(cwd).name).is_dir():
            found[Path(cwd).name] = int(pid)
    return found


def _checkpoints(study_dir: Path, trial: str) -> int:
    """How many epochs the newest checkpoint the trial handed Ray Tune covers (a trial checkpoints
    at its first epoch, then every CHECKPOINT_SECONDS; Tune keeps the newest three). One Tune is
    still copying is skipped."""
    from trainables import checkpoint

    found = sorted((study_dir / "tune" / trial).glob("checkpoint_*"), key=lambda p: int(p.name.removeprefix("checkpoint_")), reverse=True)
    for folder in found:
        try:
            return int(checkpoint.load(folder / "last.pt")["progress"]["next_epoch"])
        except (OSError, KeyError, checkpoint.DamagedCheckpointError):
            continue
    return 0


def _killable(study_dir: Path) -> dict[str, int]:
    """The running trial workers with a checkpoint to restart from and a whole epoch left after
    the one they are in. A worker in its trial's last epoch may end the trial before the kill
    lands, and Tune then records no failure for it; one without a checkpoint
    would restart from epoch 0, which is right but shows nothing."""
    epochs_dir = study_dir / "tables" / "epochs"
    return {t: pid for t, pid in _trial_workers(study_dir).items()
            if len(list((epochs_dir / f"trial={t}").glob("epoch-*.parquet"))) <= EPOCHS - 2 and _checkpoints(study_dir, t) >= 1}


def _study_args(storage: Path, name: str) -> list[str]:
    return [*energyat_cmd(), "run", SMOKE, "--storage", str(storage), "--name", name, "--set", f"epochs={EPOCHS}", "--set", f"samples={SAMPLES}"]


def test_trial_workers_killed_mid_epoch_restart_from_their_checkpoints(tmp_path: Path) -> None:
    # two workers are SIGKILLed while they train; Tune (FailureConfig) restarts each trial from its
    # last reported checkpoint and the re-run epoch overwrites its own rows
    rng = random.Random(KILL_SEED)
    study_dir = tmp_path / "studies" / "workers"
    proc = subprocess.Popen(
        _study_args(tmp_path / "studies", "workers"), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    killed: dict[str, dict[int, float]] = {}  # trial id -> {epoch: its seconds} of the epochs its checkpoint covered when killed
    try:
        for point in sorted(rng.sample(range(1, 10), WORKER_KILLS)):
            _wait_for(lambda point=point: _epoch_files(study_dir) >= point and len(_killable(study_dir)) > 0, proc, f"{point} epochs")
            time.sleep(rng.uniform(0.0, 1.0))  # somewhere inside the next epoch
            workers = _killable(study_dir)
            if not workers:  # between two trials, or only last epochs running: wait for the next trial
                _wait_for(lambda: len(_killable(study_dir)) > 0, proc, "a running trial with an epoch left")
                workers = _killable(study_dir)
            trial = rng.choice(sorted(workers))
            covered = _checkpoints(study_dir, trial)
            killed[trial] = _epoch_seconds(study_dir, trial, covered)
            os.kill(workers[trial], signal.SIGKILL)
        _, err = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, err.decode()[-4000:]
    _assert_complete(study_dir)
    from ray.tune import ExperimentAnalysis

    failures = {t.trial_id: t.run_metadata.num_failures for t in ExperimentAnalysis(str(study_dir / "tune")).trials}
    for trial, covered in killed.items():  # Tune saw each kill and restarted the trial (not a fresh one)
        assert failures[trial] >= 1 and covered, (failures, killed)
        # from its checkpoint, not from epoch 0: the rows of the epochs its checkpoint covered were
        # never written again (a restart from scratch rewrites them, with other timings). Tune's own
        # log of the trial's reports (result.json) cannot show it: it can lose a line across the restart
        assert _epoch_seconds(study_dir, trial, len(covered)) == covered, trial


def _epoch_seconds(study_dir: Path, trial: str, epochs: int) -> dict[int, float]:
    """{epoch: epoch_seconds} of the trial's first `epochs` epochs: a rewritten row has its own timing."""
    rows = read_trial_rows(str(study_dir), table="epochs", trial_id=trial, columns=["epoch", "epoch_seconds"])
    return {e: s for e, s in zip(rows["epoch"], rows["epoch_seconds"], strict=True) if e < epochs}


def test_driver_killed_three_times_then_resumed_completes_every_trial_once(tmp_path: Path) -> None:
    # SIGKILL to the driver's process group (Ray's local processes with it) at three seeded points,
    # each followed by `energyat resume`, which the next kill interrupts in turn
    rng = random.Random(KILL_SEED + 1)
    storage = tmp_path / "studies"
    study_dir = storage / "driver"
    command = _study_args(storage, "driver")
    for point in sorted(rng.sample(range(2, 14), DRIVER_KILLS)):
        proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        target = max(point, _epoch_files(study_dir) + 1) if study_dir.exists() else point  # progress before each kill
        try:
            _wait_for(lambda target=target: study_dir.exists() and _epoch_files(study_dir) >= target, proc, f"{target} epochs")
            time.sleep(rng.uniform(0.0, 1.0))
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        command = [*energyat_cmd(), "resume", str(study_dir)]
    final = energyat("resume", str(study_dir), check=False)
    if final.returncode == 1 and TUNE_LOST_CHECKPOINT in final.stderr:
        # Tune's last snapshot named a checkpoint its num_to_keep had already deleted (the driver
        # died between the two; docs/reliability.md, "What is not guaranteed", seen once in CI):
        # the trial ends as ERROR, and the command exits 1 telling the user to do this
        energyat("resume", str(study_dir), "--retry-errored")
    else:
        assert final.returncode == 0, final.stderr[-4000:]
        # the last resume's progress counts the whole study, the trials the runs before it finished too
        assert f"trials {SAMPLES}/{SAMPLES} done, 0 running, {SAMPLES * EPOCHS} trial-epochs" in final.stderr, final.stderr[-2000:]
    _assert_complete(study_dir)



def test_ctrl_c_exits_130_naming_resume_and_resume_completes_every_trial_once(tmp_path: Path) -> None:
    # Ctrl-C: SIGINT to the driver's process group. Ray Tune saves the experiment and returns from
    # fit() as if it had finished; the command must say so and exit non-zero, or a script goes on
    # to what needs the study finished
    storage = tmp_path / "studies"
    study_dir = storage / "interrupted"
    code, out, err = ctrl_c(_study_args(storage, "interrupted"), when=lambda: study_dir.exists() and _epoch_files(study_dir) >= 2,
                            what="2 epochs")
    assert code == 130, err[-4000:]
    last = err.strip().splitlines()[-1]
    assert last == f"energyat: {study_dir} was interrupted before it finished; `energyat resume {study_dir}` continues it"
    assert "RUNNING" in out or "PENDING" in out  # the status as the interruption left it
    energyat("resume", str(study_dir))
    _assert_complete(study_dir)
