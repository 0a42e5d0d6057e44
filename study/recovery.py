"""Trials a study must set right before it goes on: lost, errored and failed ones.

- A trial started by a driver killed before Ray Tune's next snapshot is *lost*: Tune will never
  resume it. :func:`reconcile_lost_trials` moves its files to ``STUDY_DIR/lost/`` and marks its
  Optuna trial FAIL.
- A trial Tune ended as ERROR, retried with `resume --retry-errored`, starts again from epoch 0
  under a new id: :func:`set_aside_errored` moves its first life to ``STUDY_DIR/retried/``.
- :func:`failed_trials` lists the trials of a finished fit that failed, with their reasons.
- :class:`Interrupted`: a fit that SIGINT stopped.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import optuna
from pyarrow.fs import FileSelector, FileSystem, FileType
from ray.tune import ExperimentAnalysis

from analysis.compaction import set_aside
from analysis.errors import one_line
from analysis.schema import TABLES
from analysis.store import STOPS, filesystem, join, read_rows, read_trial_outcome, table_files
from study.journal import LOST_ATTR, TUNE_ID_ATTR, journal_storage

RETRIED = "retried"  # STUDY_DIR/retried/: the rows of a trial's failed life, before its retry
LOST = "lost"  # STUDY_DIR/lost/: what trials Tune never recorded left in the study


def reconcile_lost_trials(location: str, journal: Path, tune_dir: str, storage_fs: FileSystem | None) -> list[str]:
    """Before a resume: the trials a killed driver started after Ray Tune's last snapshot of the
    experiment, which Tune will never resume (it restores that snapshot, and its searcher
    suggests their places anew). Their table files and Tune folder move to ``STUDY_DIR/lost/``
    (out of every view, kept for inspection) and their Optuna trials, still RUNNING, become FAIL
    with the user attribute `energyat_lost`. Returns their trial ids.

    Without this, each such trial would stay RUNNING in `trials` and in Optuna forever, beside the
    trial the searcher suggests in its place.
    """
    known = {t.trial_id for t in ExperimentAnalysis(tune_dir, storage_filesystem=storage_fs).trials}
    fs, root = filesystem(location)
    lost: set[str] = set()

    def listing(folder: str) -> list[Any]:
        return fs.get_file_info(FileSelector(f"{root}/{folder}", recursive=False, allow_not_found=True))

    for folder in (*_TRIAL_TABLES, "tables/trials"):
        for info in listing(folder):  # trial=<id>/ folders, and tables/trials/trial=<id>.parquet
            if info.base_name.startswith("trial="):
                lost.add(info.base_name.removeprefix("trial=").removesuffix(".parquet"))
    in_parts = {t for table in TABLES for part in table_files(fs, root, table).parts for t in part.trials - part.superseded}
    # a compaction put these trials' rows in parts; one set aside before holds none any more
    lost |= {t for t in in_parts - known if read_rows(location, table="trials", trial=t).num_rows}
    for info in listing("tune"):  # a trial's folder holds params.json; Tune's own files stay
        if info.type == FileType.Directory and fs.get_file_info(f"{info.path}/params.json").type == FileType.File:
            lost.add(info.base_name)
    lost -= known
    for trial in lost:
        _move_trial(location, fs, root, trial, f"{root}/{LOST}")
    storage = journal_storage(journal)
    for name in optuna.study.get_all_study_names(storage):
        for t in optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False):
            tune_id = t.user_attrs.get(TUNE_ID_ATTR)
            if t.state == optuna.trial.TrialState.RUNNING and tune_id is not None and tune_id not in known:
                storage.set_trial_user_attr(t._trial_id, LOST_ATTR, "started by a driver killed before Ray Tune recorded the trial")
                storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
                lost.add(tune_id)
    for trial in sorted(lost):
        print(f"energyat: trial {trial} was started by a driver killed before Ray Tune recorded it: Tune will not resume it; "
              f"its files moved to {join(location, LOST)}, its Optuna trial marked FAIL", file=sys.stderr, flush=True)
    return sorted(lost)


# A trial's places in a study, besides its Tune folder: its folder in every table of many rows
# per trial (every table the schema declares, so a new table moves with its trial), and its
# `trials` row, one file
_TRIAL_TABLES = tuple(f"tables/{table}" for table in TABLES if table != "trials")


def _move_trial(location: str, fs: FileSystem, root: str, trial: str, target: str) -> None:
    """Move every file of `trial` in the study at `root` (its table files and its Tune folder)
    under `target`, keeping their paths inside the study (`lost/` or `retried/...`); its rows in
    compacted parts are copied there and taken out of the views (analysis.compaction.set_aside)."""
    set_aside(location, trial, target)
    places = [f"{folder}/trial={trial}" for folder in _TRIAL_TABLES] + [f"tables/trials/trial={trial}.parquet", f"tune/{trial}", f"{STOPS}/{trial}"]
    for place in places:
        info = fs.get_file_info(f"{root}/{place}")
        if info.type != FileType.NotFound:
            _move_tree(fs, info, f"{target}/{place}")


def _move_tree(fs: FileSystem, info: Any, target: str) -> None:
    """Move a file, or every file of a folder, to `target` (object stores move files only)."""
    if info.type == FileType.File:
        fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        fs.move(info.path, target)
        return
    for f in fs.get_file_info(FileSelector(info.path, recursive=True)):
        if f.type == FileType.File:
            dest = f"{target}/{f.path[len(info.path) + 1:]}"
            fs.create_dir(dest.rsplit("/", 1)[0], recursive=True)
            fs.move(f.path, dest)
    fs.delete_dir(info.path)




def set_aside_errored(location: str, tune_dir: str, storage_fs: FileSystem | None) -> list[str]:
    """Before `resume --retry-errored`: move the table files and the Tune folder of every trial
    Tune ended as ERROR to ``STUDY_DIR/retried/<trial>/<time>/`` (kept for inspection, out of
    every view). Tune restarts such a trial from epoch 0 under a new trial id, so nothing of the
    failed life may stay among the study's rows. Returns their ids."""
    errored = sorted(t.trial_id for t in ExperimentAnalysis(tune_dir, storage_filesystem=storage_fs).trials if t.status == "ERROR")
    fs, root = filesystem(location)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    for trial in errored:
        # its Tune folder too, or the next resume would take it for a lost trial's
        _move_trial(location, fs, root, trial, f"{root}/{RETRIED}/{trial}/{stamp}")
        print(f"energyat: retrying trial {trial} from epoch 0 under a new trial id; its failed run moved to {join(location, RETRIED, trial, stamp)}",
              file=sys.stderr, flush=True)
    return errored



class Interrupted(Exception):
    """A Tune fit stopped by SIGINT (Ctrl-C): Ray Tune saves the experiment and returns from
    `fit()` as if it had finished. Raised so that no caller takes the study for done and goes on
    to what needs it finished; `energyat resume` continues it."""

    def __init__(self, study_dir: str) -> None:
        self.study_dir = study_dir
        super().__init__(f"{study_dir} was interrupted before it finished; `energyat resume {study_dir}` continues it")


class Failed(NamedTuple):
    """A trial Ray Tune ended as ERROR, its restarts spent, and the reason in its `trials` row."""

    trial_id: str
    reason: str


def failed_trials(results: Any, study_dir: str) -> list[Failed]:
    """The trials of a finished Tune fit that ended as ERROR, with the reason their `trials` row gives."""
    failed = []
    for result in results:
        if result.error is not None:
            trial_id = result.path.rstrip("/").rsplit("/", 1)[-1]
            recorded = read_trial_outcome(study_dir, trial_id) or {}
            failed.append(Failed(trial_id, str(recorded.get("stop_reason") or f"error: {one_line(result.error)[:200]}")))
    return sorted(failed)
