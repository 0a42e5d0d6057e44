"""Ray Tune callbacks of a study: what the driver does when a trial starts, reports, ends or fails.

- :class:`LiveView` feeds the live view (:class:`study.live.Board`).
- :class:`TrialErrors` ends the `trials` row of a trial Tune gave up on as ERROR, with its reason.
- :class:`JournalUpload` uploads the journal of a study on object storage at each trial event.
- :class:`Compaction` compacts each trial's table files once it has finished (analysis.compaction).
- :class:`OptunaRecord` adds each finished trial of a PBT study (which has no Optuna searcher) to
  the study's Optuna journal.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pyarrow as pa
from ray import tune

from analysis.compaction import compact
from analysis.errors import EnergyatError, StoreError, one_line
from analysis.store import read_stage, read_trial_outcome
from study.journal import TUNE_ID_ATTR, journal_storage, outcome_attrs, upload_journal
from study.layout import journal_file
from study.live import Board
from study.space import Dimension
from trainables.config import parse_trial, trial_spec
from trainables.engine import write_error_row

STAGE_POLL_SECONDS = 5.0  # how often the live view reads the running trials' stage files


def id_of(trial: Any) -> str:
    """Trial directories and names are the trial id, the key of every table row."""
    return str(trial.trial_id)


class JournalUpload(tune.Callback):
    """For a study on object storage: upload the driver's journal whenever a trial starts, ends or
    fails, so that `energyat status`, the report and a resume elsewhere read the search state
    from the study. Tune calls the searcher (which writes the journal) before the callbacks.

    A failed upload prints one warning line and is tried again at the next trial event or
    checkpoint (:class:`StudySearch`); the upload at the end of the study (:func:`run_study`)
    fails the command instead.
    """

    def __init__(self, study_name: str, study_dir: str) -> None:
        self.study_name = study_name
        self.study_dir = study_dir

    @property
    def local(self) -> Path:
        """The journal on the machine this runs on (a resume elsewhere unpickles this callback
        from the study's Tune experiment, written by the driver that started it)."""
        return journal_file(self.study_dir, self.study_name)

    def send(self) -> None:
        try:
            upload_journal(self.local, self.study_dir)
        except StoreError as exc:
            print(f"energyat: warning: {exc}; tried again at the next trial event", file=sys.stderr, flush=True)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.send()  # the new trial's RUNNING record: a resumed searcher tells it its value

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.send()

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.send()



class Compaction(tune.Callback):
    """Rewrites a finished trial's per-epoch files as one part per table, so that a study of many
    trials stays a few files per table to read. The driver is its only writer of parts while the
    study runs; a compaction that fails leaves the loose files, which still count, and says so in
    one line (the study goes on; `energyat compact` finishes the job)."""

    def __init__(self, study_dir: str) -> None:
        self.study_dir = study_dir

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        compact_or_warn(self.study_dir, trials=[id_of(trial)])


def compact_or_warn(study_dir: str, *, trials: list[str] | None = None, merge: bool | None = None) -> None:
    """:func:`analysis.compaction.compact`, a failure reported in one warning line: the loose
    files it would have replaced still hold every row."""
    try:
        compact(study_dir, trials=trials, merge=merge)
    except (EnergyatError, OSError, pa.ArrowException) as exc:
        print(f"energyat: warning: compacting {study_dir} failed ({one_line(exc)}); its rows are intact; "
              f"run `energyat compact {study_dir}` to try again", file=sys.stderr, flush=True)


class TrialErrors(tune.Callback):
    """Ends the `trials` row of a trial Ray Tune gave up on (its restarts spent) as ERROR, with
    the reason: the last line of the trial's error, or the reason a hung trial's watchdog wrote.

    Without it the row a trial writes each epoch would say RUNNING for ever. A row that cannot be
    written (the storage is what failed) is reported in one warning line; the study goes on.
    """

    def __init__(self, base_spec: dict[str, Any], study_dir: str) -> None:
        self.base_spec = base_spec
        self.study_dir = study_dir

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        trial_id = id_of(trial)
        recorded = read_trial_outcome(self.study_dir, trial_id) or {}
        if str(recorded.get("stop_reason") or "").startswith("error: hung"):
            reason = str(recorded["stop_reason"])  # the watchdog's: the lost worker says less
        else:
            reason = f"error: {_last_line(trial)} (after {trial.run_metadata.num_failures} failures, max_failures)"
        try:
            write_error_row(parse_trial(trial_spec(self.base_spec, trial.config)), out=self.study_dir, trial_id=trial_id, reason=reason)
        except (EnergyatError, OSError) as exc:
            print(f"energyat: warning: cannot record trial {trial_id} as ERROR: {one_line(exc)}", file=sys.stderr, flush=True)


def _last_line(trial: Any) -> str:
    """The last line of a failed trial's error (its exception), at most 200 characters."""
    # Tune appends each failure's traceback to the trial's local error file, and copies it to the
    # storage only later (Trial.get_error reads that copy, still missing when this runs)
    try:
        error = Path(trial.error_file).read_text() if trial.error_file else ""
    except OSError as exc:
        return f"unknown (its error file could not be read: {one_line(exc)[:100]})"
    lines = [line.strip() for line in error.splitlines() if line.strip()]
    return (lines[-1] if lines else "unknown")[:200]


class LiveView(tune.Callback):
    """Feeds Ray Tune's trial events to a :class:`study.live.Board` (Tune's own status table is off:
    `verbose=0`), and every STAGE_POLL_SECONDS the running trials' stage files (their final
    evaluation's progress, which reaches Tune by no report)."""

    def __init__(self, board: Board, base_method: str, study_dir: str) -> None:
        self.board = board
        self.base_method = base_method
        self.study_dir = study_dir
        self._seen_restored = False
        self._polled = -math.inf

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        # a resumed study's trials arrive here with the state and last result of the run before,
        # and a finished one sends no event again: the board counts them once, at the first step
        if self._seen_restored:
            return
        self._seen_restored = True
        for trial in trials:
            result = trial.last_result or {}
            epochs = int(result.get("training_iteration", 0) or 0)
            if epochs or trial.status in ("TERMINATED", "ERROR"):
                state = trial.status if trial.status in ("TERMINATED", "ERROR") else "RUNNING"
                self.board.restored(id_of(trial), str(trial.config.get("method", self.base_method)), row=result, state=state, epochs=epochs)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.board.started(id_of(trial), str(trial.config.get("method", self.base_method)))

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self.board.result(id_of(trial), result)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.board.finished(id_of(trial), trial.last_result)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.board.finished(id_of(trial), trial.last_result, error=f"error: {_last_line(trial)}")

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if time.monotonic() - self._polled >= STAGE_POLL_SECONDS:
            self._polled = time.monotonic()
            for trial_id in self.board.running():
                stage = read_stage(self.study_dir, trial_id)
                if stage is not None:
                    self.board.staged(trial_id, stage)
        self.board.tick()

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.board.close()



class OptunaRecord(tune.Callback):
    """For a PBT study, which has no Optuna searcher: each trial that ends is added to the study's
    Optuna journal with its final configuration (PBT's perturbations included), its objective and
    the energy outcomes, so that `status`, the report's importances and optuna-dashboard read it
    like any study's. A trial already recorded (a resumed driver sees its end again) is skipped."""

    def __init__(self, study_dir: str, study_name: str, objective: str, dims: tuple[Dimension, ...]) -> None:
        self.study_dir = study_dir
        self.study_name = study_name
        self.objective = objective
        self.dims = dims

    def _record(self, trial: Any, *, failed: bool) -> None:
        storage = journal_storage(journal_file(self.study_dir, self.study_name))  # this machine's (a resume elsewhere)
        study = optuna.create_study(study_name=self.study_name, storage=storage, direction="maximize", load_if_exists=True)
        trial_id = id_of(trial)
        if any(t.user_attrs.get(TUNE_ID_ATTR) == trial_id for t in study.get_trials(deepcopy=False)):
            return
        result = trial.last_result or {}
        value = result.get(self.objective)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            value = 0.0  # as the adapter reports it (tune_adapter.OBJECTIVE_FALLBACK)
        dists = {d.key: optuna_distribution(d) for d in self.dims}
        study.add_trial(optuna.trial.create_trial(
            params={k: trial.config[k] for k in dists if k in trial.config}, distributions=dists,
            value=None if failed else float(value),
            state=optuna.trial.TrialState.FAIL if failed else optuna.trial.TrialState.COMPLETE,
            user_attrs={TUNE_ID_ATTR: trial_id, **outcome_attrs(result)},
        ))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._record(trial, failed=False)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._record(trial, failed=True)


def optuna_distribution(dim: Dimension) -> optuna.distributions.BaseDistribution:
    """A search dimension as Optuna's distribution (a trial added to the journal by hand needs one per parameter)."""
    if dim.kind == "categorical":
        return optuna.distributions.CategoricalDistribution(list(dim.choices))
    if dim.kind == "int":
        return optuna.distributions.IntDistribution(int(dim.low), int(dim.high), log=dim.log)
    return optuna.distributions.FloatDistribution(dim.low, dim.high, log=dim.log)
