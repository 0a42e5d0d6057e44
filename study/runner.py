"""Studies: a Ray Tune Tuner over the trial adapter, searched by Optuna, stopped on divergence.

    STUDY_DIR = <storage>/<name>/
      spec.yaml         the spec as run (resolved), schema_version, study_name
      optuna.journal    Optuna JournalStorage (plain optuna and optuna-dashboard read it)
      tune/             the Ray Tune experiment: trial dirs named by trial id, checkpoints
      tables/           epochs, samples, trials (written by the trials themselves)

``<storage>`` is a local path or a pyarrow filesystem URI (s3://bucket/prefix?endpoint_override=...).
A study directory is passed around as a string: a resolved local path, or the URI of the study,
query included (:func:`analysis.store.join`), which every process opens with
:func:`analysis.store.filesystem`.

Optuna's journal needs a file system with locks and appends; an object store has neither. On a
URI the journal therefore lives on the driver's disk (:func:`journal_dir`), the only process that
writes it (OptunaSearch runs in the Tune driver), and a copy is uploaded to
``STUDY_DIR/optuna.journal`` when the study is created, whenever a trial starts or ends
(:class:`JournalUpload`), before each save of the searcher's state (:class:`StudySearch`), and
at the end. `energyat resume` takes the uploaded copy when it continues the driver's (a journal
only grows by appends; :func:`reconcile_journals`), for instance on another machine.
"""

from __future__ import annotations

import math
import os
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, NamedTuple

import yaml
from pyarrow.fs import FileSelector, FileSystem, FileType
from ray import tune
from ray.tune.search import ConcurrencyLimiter, Searcher
from ray.tune.search.optuna import OptunaSearch

from analysis.errors import EnergyatError, SpecError, StoreError, one_line
from analysis.phases import DETECTOR_COLUMNS, OnlineDetector, should_stop
from analysis.schema import SCHEMA_VERSION
from analysis.store import SHIPPED_SHA, STOPS, check_name, check_schema_version, durable_replace, filesystem, git_sha, is_uri, join, open_storage
from study.importances import JOURNAL, check_journal, journal_storage
from study.live import Board
from study.loggers import logger_callbacks
from study.sampler import build_sampler, check_sampler_for
from study.scheduler import check_scheduler_for, perturbation_interval
from study.tune_scheduler import build_scheduler
from study.space import SearchSpace, parse_search
from study.spec import StudyKeys, check_placement

# What the searcher may optimise: validation numbers only. The test set's numbers (final_*,
# test_*) are reported, never searched on: a study that picked configurations by them would select
# on test, which is what the validation split exists to avoid.
OBJECTIVES = ("best_val_robust_acc", "best_val_clean_acc")
_TEST_NUMBERS = ("final_clean_acc", "final_pgd_acc", "final_autoattack_acc", "test_clean_acc", "test_robust_acc", "best_test_robust_acc")


def objectives_of(study: StudyKeys) -> list[str]:
    names = [study.objective] if isinstance(study.objective, str) else list(study.objective)
    for name in names:
        if name in _TEST_NUMBERS:
            raise SpecError(
                "objective",
                f"{name!r} is a test-set number: searching on it selects configurations on test; "
                f"choose from {', '.join(OBJECTIVES)} (the validation split, dataset.val_size)",
            )
        if name not in OBJECTIVES:
            raise SpecError("objective", f"unknown objective {name!r}; choose from {', '.join(OBJECTIVES)}")
    return names


def journal_dir() -> Path:
    """Where a driver keeps the journals of its studies on object storage: ``ENERGYAT_JOURNAL_DIR``,
    else ``~/.energyat/journals``."""
    return Path(os.environ.get("ENERGYAT_JOURNAL_DIR") or "~/.energyat/journals").expanduser().resolve()


def upload_journal(local: Path, study_dir: str) -> None:
    """Copy the driver's journal to ``STUDY_DIR/optuna.journal`` (one PUT: readers see a whole file)."""
    import pyarrow.fs as pafs

    fs, root = filesystem(study_dir)
    try:
        pafs.copy_files(str(local), f"{root}/{JOURNAL}", source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    except OSError as exc:
        raise StoreError(f"cannot upload the Optuna journal {local} to {study_dir}: {one_line(exc)}") from exc


def reconcile_journals(study_dir: str, local: Path) -> str:
    """Before a resume of a study on object storage: make the driver's journal the newest of the
    two copies. A journal only grows by appends, so one copy must be a prefix of the other: the
    longer one is kept, and the bucket's replaces this machine's only then. Copies that disagree
    (a journal of another study, or one edited in the bucket) are refused in one line, and
    neither is changed. Returns which copy won: "local", "uploaded" or "same"."""
    import pyarrow.fs as pafs

    fs, root = open_storage(study_dir)
    info = fs.get_file_info(f"{root}/{JOURNAL}")
    if info.type != pafs.FileType.File:
        return "local"
    with fs.open_input_stream(f"{root}/{JOURNAL}") as f:
        uploaded = f.read()
    have = local.read_bytes() if local.exists() else b""
    if uploaded == have:
        return "same"
    if have.startswith(uploaded):
        return "local"  # the uploads lag the driver: its own copy is newer
    if not uploaded.startswith(have):
        raise StoreError(
            f"the Optuna journal {join(study_dir, JOURNAL)} and this machine's copy {local} disagree (neither continues the "
            "other): they are not the same study's; move the local copy aside to resume from the bucket's, or restore the bucket's"
        )
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f".{local.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_bytes(uploaded)
    durable_replace(tmp, local)
    return "uploaded"


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
        return _journal_file(self.study_dir, self.study_name)

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


class StudySearch(OptunaSearch):
    """Tune's OptunaSearch which, for a study on object storage, uploads the journal before each
    save of its state.

    Tune pickles the searcher (the Optuna study, its trials' numbers) into the experiment
    checkpoint, and a resume elsewhere restores that state against the journal downloaded from the
    study. Trials are created and epochs reported between two :class:`JournalUpload` uploads, so
    a checkpoint taken in between would refer to records the uploaded journal lacks. Uploading
    here, before the state that refers to them, keeps the study's journal at least as new as its
    checkpoint. A failed upload warns, as JournalUpload's do: the study goes on.
    """

    def __init__(self, *, upload: JournalUpload | None, study_dir: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.upload = upload
        self.study_dir = study_dir

    def restore(self, checkpoint_path: str) -> None:
        """OptunaSearch's restore, then the Optuna study reopened on this machine's journal.

        The saved state holds the journal storage of the driver that saved it, its file path
        included: on another machine (another ENERGYAT_JOURNAL_DIR, another home) that path is
        not where this driver keeps the journal (:func:`_journal_file`, from local settings)."""
        import optuna

        super().restore(checkpoint_path)
        study_dir = getattr(self, "study_dir", None)
        if study_dir is None:  # saved by an energyat that kept the journal's path in spec.yaml
            return
        storage = journal_storage(_journal_file(study_dir, self._study_name))
        self._storage = storage
        study = optuna.load_study(study_name=self._study_name, storage=storage, sampler=self._study().sampler)
        # OptunaSearch declares the attribute None until set up
        self._ot_study = study  # type: ignore[assignment]
        self._ot_trials = {tid: optuna.Trial(study, t._trial_id) for tid, t in self._ot_trials.items()}

    def _study(self) -> Any:
        """The Optuna study (an optuna.Study; OptunaSearch declares the attribute None until set up)."""
        if self._ot_study is None:
            raise RuntimeError("StudySearch used before Tune set it up")
        return self._ot_study

    def suggest(self, trial_id: str) -> dict | None:
        """OptunaSearch's suggestion, never a configuration already run, with the Tune trial id
        kept on the Optuna trial (user attribute `tune_trial_id`: after a killed driver,
        :func:`reconcile_lost_trials` tells from it which Optuna trials Tune never recorded).

        A suggestion equal to an earlier trial's parameters (a `sat` trial searches `method`
        only, so every one is the same configuration with the same seed, and trains to the same
        numbers) is not trained again. Following Optuna's own advice for duplicates, its Optuna
        trial is told the earlier trial's values (FAIL while that one still runs), marked
        `energyat_duplicate_of`, and the sampler is asked again. When DUPLICATE_ASKS asks in a
        row give nothing new, the space is taken as exhausted and the study ends early."""
        for _ask in range(DUPLICATE_ASKS):
            params = super().suggest(trial_id)
            trial = self._ot_trials[trial_id]
            twin = self._twin(trial)
            if twin is None:
                if trial.user_attrs.get(TUNE_ID_ATTR) != trial_id:
                    trial.set_user_attr(TUNE_ID_ATTR, trial_id)
                return params
            import optuna

            del self._ot_trials[trial_id]
            trial.set_user_attr(DUPLICATE_ATTR, twin.number)
            if twin.state == optuna.trial.TrialState.COMPLETE:
                self._study().tell(trial, twin.values)
            else:
                self._study().tell(trial, state=optuna.trial.TrialState.FAIL)
        print(f"energyat: {DUPLICATE_ASKS} suggestions in a row repeated configurations already run: the search space "
              "looks exhausted, so the study ends here (raise `samples` only with a larger `search`)", file=sys.stderr, flush=True)
        # how Tune's searchers end a study (the annotation OptunaSearch declares lacks it)
        return Searcher.FINISHED  # type: ignore[return-value]

    def _twin(self, trial: Any) -> Any:
        """An earlier trial (COMPLETE or RUNNING, not lost, not itself a duplicate) with `trial`'s parameters."""
        import optuna

        alive = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING)
        for other in self._study().get_trials(deepcopy=False, states=alive):
            if (other.number != trial.number and other.params == trial.params
                    and LOST_ATTR not in other.user_attrs and DUPLICATE_ATTR not in other.user_attrs):
                return other
        return None

    def save(self, checkpoint_path: str) -> None:
        if self.upload is not None:
            self.upload.send()
        super().save(checkpoint_path)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self._second_life(trial_id, result)
        if trial_id in self._ot_trials:
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self._second_life(trial_id, result)
        if trial_id not in self._ot_trials:  # a retried trial that failed before its first result
            print(f"energyat: warning: trial {trial_id} failed before its first result; Optuna has no trial for it",
                  file=sys.stderr, flush=True)
            return
        trial = self._ot_trials[trial_id]
        # before the value: a dashboard watching the study sees both at once. A trial the journal
        # already has finished (its end reached the journal before a killed driver's last
        # searcher checkpoint) got them then; Optuna refuses to update it
        import optuna

        running = self._study()._storage.get_trial(trial._trial_id).state == optuna.trial.TrialState.RUNNING
        if result and running:
            for key, value in _outcome_attrs(result).items():
                trial.set_user_attr(key, value)
        super().on_trial_complete(trial_id, result, error)

    def _second_life(self, trial_id: str, result: Mapping[str, Any] | None) -> None:
        """A trial Ray Tune runs again after it ended as ERROR (`resume --retry-errored`) gets a
        new Optuna trial with the same parameters (user attribute `energyat_retry_of`: the failed
        trial's number), which its results then go to. OptunaSearch alone would drop them, or fail:
        Tune restarts such a trial under a new id, which the searcher never suggested.

        Also re-attaches a trial the searcher's saved state predates (Tune saves it every few
        seconds; the journal, written at once, knows the trial by its Tune id, see `suggest`)."""
        import optuna

        if trial_id in self._ot_trials:
            return
        study = self._study()
        trials = study.get_trials(deepcopy=False)
        mine = [t for t in trials if t.user_attrs.get(TUNE_ID_ATTR) == trial_id]
        if mine:
            if mine[-1].state == optuna.trial.TrialState.RUNNING:
                self._ot_trials[trial_id] = optuna.Trial(study, mine[-1]._trial_id)
            return
        # Tune's restart: the failed trial is the one with these parameters no retry has taken yet
        params = {k.removeprefix("config/"): v for k, v in (result or {}).items() if k.startswith("config/")}
        taken = {t.user_attrs.get(RETRY_ATTR) for t in trials}
        failed = next((t for t in trials if t.state == optuna.trial.TrialState.FAIL and LOST_ATTR not in t.user_attrs
                       and DUPLICATE_ATTR not in t.user_attrs and t.number not in taken and params and t.params == params), None)
        if failed is None:
            return
        study.enqueue_trial(failed.params, user_attrs={TUNE_ID_ATTR: trial_id, RETRY_ATTR: failed.number}, skip_if_exists=False)
        self._ot_trials[trial_id] = study.ask(fixed_distributions=failed.distributions)


class StudyLimiter(ConcurrencyLimiter):
    """Tune's ConcurrencyLimiter, which also counts and completes the trials it did not suggest.

    Tune restarts a trial under a new id (`resume --retry-errored`), and restores trials its
    saved limiter state may predate. ConcurrencyLimiter drops the completion of a trial it does
    not know, so its Optuna trial would stay RUNNING for ever, and does not count it against
    `max_concurrent`. Such a trial is adopted at its first result or completion.
    """

    def _adopt(self, trial_id: str) -> None:
        if self._limit_concurrency and trial_id not in self.live_trials:
            self.live_trials.add(trial_id)
            self.num_unfinished_live_trials += 1

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self._adopt(trial_id)
        super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self._adopt(trial_id)
        super().on_trial_complete(trial_id, result, error)


# The energy outcomes each Optuna trial carries as user attributes (`energyat_<column>`, the
# `trials` table's values), so that optuna-dashboard and plain Optuna show why a trial ended and
# where its phases fell beside its objective.
OUTCOME_ATTRS = ("stop_reason", "epochs_run", "best_epoch", "alarm_epoch", "phase2_start", "phase3_start", "final_pgd_acc")
TUNE_ID_ATTR = "tune_trial_id"
LOST_ATTR = "energyat_lost"
RETRY_ATTR = "energyat_retry_of"
DUPLICATE_ATTR = "energyat_duplicate_of"
DUPLICATE_ASKS = 20  # suggestions in a row that repeat a configuration before the space counts as exhausted
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
    import optuna
    from ray.tune import ExperimentAnalysis

    known = {t.trial_id for t in ExperimentAnalysis(tune_dir, storage_filesystem=storage_fs).trials}
    fs, root = filesystem(location)
    lost: set[str] = set()

    def listing(folder: str) -> list[Any]:
        return fs.get_file_info(FileSelector(f"{root}/{folder}", recursive=False, allow_not_found=True))

    for folder in (*_TRIAL_TABLES, "tables/trials"):
        for info in listing(folder):  # trial=<id>/ folders, and tables/trials/trial=<id>.parquet
            lost.add(info.base_name.removeprefix("trial=").removesuffix(".parquet"))
    for info in listing("tune"):  # a trial's folder holds params.json; Tune's own files stay
        if info.type == FileType.Directory and fs.get_file_info(f"{info.path}/params.json").type == FileType.File:
            lost.add(info.base_name)
    lost -= known
    for trial in lost:
        _move_trial(fs, root, trial, f"{root}/{LOST}")
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


# A trial's places in a study, besides its Tune folder: one folder per table of per-epoch or
# per-evaluation rows, and its `trials` row
_TRIAL_TABLES = ("tables/epochs", "tables/samples", "tables/evals")


def _move_trial(fs: FileSystem, root: str, trial: str, target: str) -> None:
    """Move every file of `trial` in the study at `root` (its table files and its Tune folder)
    under `target`, keeping their paths inside the study (`lost/` or `retried/...`)."""
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


# What the stopper reads of each epoch: the detector's training-side columns, and the running
# best validation robust accuracy for the patience part of the stop rule (analysis.phases.should_stop).
_STOPPER_COLUMNS = (*DETECTOR_COLUMNS, "best_val_robust_acc")


class _TrialWatch:
    """One trial's :class:`OnlineDetector` and the epoch of its best validation robust accuracy."""

    def __init__(self, patience: int) -> None:
        self.detector = OnlineDetector()
        self.patience = patience
        self.best = -math.inf
        self.best_epoch: int | None = None
        self.stop = False

    def feed(self, row: Mapping[str, Any]) -> bool:
        epoch = int(row["epoch"])
        _phase, alarm = self.detector.update({k: row.get(k) for k in DETECTOR_COLUMNS})
        best = row.get("best_val_robust_acc")
        if isinstance(best, (int, float)) and math.isfinite(best) and best > self.best:
            self.best, self.best_epoch = float(best), epoch
        self.stop = should_stop(alarm=alarm, epoch=epoch, best_epoch=self.best_epoch, patience=self.patience)
        return self.stop


class EnergyDivergenceStopper(tune.Stopper):
    """A ``ray.tune.Stopper`` with one :class:`OnlineDetector` per trial.

    A trial stops once its detector alarms (training-side columns only) and its validation robust
    accuracy has not improved for ``patience`` epochs (:func:`analysis.phases.should_stop`, the
    rule the trial itself applies). After a driver restart, a trial's state is rebuilt by
    replaying its stored `epochs` rows before the reported one (the rule is deterministic).
    """

    def __init__(self, study_dir: str, *, patience: int | None) -> None:
        self.study_dir = study_dir
        self.patience = patience  # None: stopping is off
        self.watches: dict[str, _TrialWatch] = {}

    def _watch(self, trial_id: str, epoch: int, patience: int) -> _TrialWatch:
        if trial_id not in self.watches:
            watch = _TrialWatch(patience)
            for row in _stored_epochs(self.study_dir, trial_id, before=epoch):
                watch.feed(row)
            self.watches[trial_id] = watch
        return self.watches[trial_id]

    def __call__(self, trial_id: str, result: Mapping[str, Any]) -> bool:
        if self.patience is None or "epoch" not in result:
            return False
        watch = self._watch(trial_id, int(result["epoch"]), self.patience)
        if int(result["epoch"]) <= watch.detector.last_epoch:  # a re-run epoch after a restore: already seen
            return watch.stop
        return watch.feed(result)

    def stop_all(self) -> bool:
        return False


def _stored_epochs(study_dir: str, trial_id: str, *, before: int) -> list[dict[str, Any]]:
    from analysis.query import open_tables

    try:
        con = open_tables(study_dir, trial=trial_id)
    except EnergyatError:
        return []
    columns = ", ".join(_STOPPER_COLUMNS)
    table = con.sql(
        f"select {columns} from epochs where trial_id = $t and epoch < $e order by epoch", params={"t": trial_id, "e": before}
    ).to_arrow_table()
    con.close()
    return table.to_pylist()


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
        from analysis.store import read_trial_outcome
        from trainables.config import parse_trial, trial_spec
        from trainables.engine import write_error_row

        trial_id = _trial_id(trial)
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
    `verbose=0`)."""

    def __init__(self, board: Board, base_method: str) -> None:
        self.board = board
        self.base_method = base_method

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.board.started(_trial_id(trial), str(trial.config.get("method", self.base_method)))

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self.board.result(_trial_id(trial), result)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.board.finished(_trial_id(trial), trial.last_result)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.board.finished(_trial_id(trial), trial.last_result, error=f"error: {_last_line(trial)}")

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        self.board.tick()

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.board.close()


def _trial_id(trial: Any) -> str:
    """Trial directories and names are the trial id, the key of every table row."""
    return str(trial.trial_id)


def study_dir_for(storage: str, name: str) -> str:
    """``<storage>/<name>``: a resolved local path, or a URI that keeps its query."""
    return join(storage if is_uri(storage) else Path(storage).expanduser().resolve(), name)


def check_dashboard(address: str | None, dashboard_port: int | None) -> None:
    """`--dashboard` starts a local Ray's dashboard; a cluster has its head node's (refused before Ray starts)."""
    if dashboard_port is None:
        return
    if address or os.environ.get("RAY_ADDRESS"):
        raise EnergyatError("--dashboard starts the dashboard of a local Ray; a cluster's is its head node's "
                            "(`ray start --head --include-dashboard=true --dashboard-host=127.0.0.1`, then an SSH tunnel)")
    if not 1024 <= dashboard_port <= 65535:
        raise EnergyatError(f"--dashboard-port must be in 1024-65535, got {dashboard_port}")
    import importlib.util

    if importlib.util.find_spec("aiohttp") is None:  # Ray's dashboard server, in ray[default]
        raise EnergyatError("--dashboard needs Ray's dashboard packages: pip install 'energyat[dashboard]'")


def _init_ray(address: str | None, dashboard_port: int | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        # The driver's own energyat travels to every worker with the study (Ray's py_modules),
        # so a node installed from another revision days earlier still runs exactly this code;
        # the nodes need only energyat's dependencies. Its revision goes along for provenance.
        import analysis
        import study
        import trainables

        runtime_env = {"py_modules": [analysis, study, trainables], "env_vars": {SHIPPED_SHA: git_sha()}}
        try:
            ray.init(address=address, log_to_driver=False, runtime_env=runtime_env)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            hint = "" if os.environ.get("RAY_AUTH_MODE") == "token" else (
                "; a cluster with token authentication (energyat's cluster.yaml) also needs RAY_AUTH_MODE=token and its token "
                "in ~/.ray/auth_token or RAY_AUTH_TOKEN")
            raise EnergyatError(f"cannot join the Ray cluster at {address}: {' '.join(str(exc).split())[:200]}{hint}") from exc
    else:
        # A local Ray without the dashboard unless asked for (`--dashboard`), and then on loopback
        # only: it is a web UI that runs jobs for whoever reaches it. Ray 2.60's gRPC servers still
        # listen on every interface, whatever the node address (ray-project/ray#59852 moves them
        # to the node's): docs/reliability.md says what to do.
        if dashboard_port is None:
            ray.init(include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
            return
        context = ray.init(include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=dashboard_port, log_to_driver=False,
                           _node_ip_address="127.0.0.1")
        print(f"energyat: Ray dashboard at http://{context.dashboard_url} (this machine only; it stops with the study)", file=sys.stderr, flush=True)


def _tune_storage(study_dir: str) -> tuple[str, FileSystem | None]:
    """(storage_path, storage_filesystem) for Ray Tune, new or restored: on a URI, Tune writes
    tune/ through the same pyarrow filesystem as the tables; locally, Tune's default (None)."""
    if not is_uri(study_dir):
        return study_dir, None
    fs, root = filesystem(study_dir)
    return root, fs


class TunerParts(NamedTuple):
    trainable: Any  # the adapter with its parameters and resources
    tune_config: Any
    run_config: Any
    param_space: dict[str, Any]  # PBT's starting distributions; empty under Optuna (its searcher suggests)


def _tuner_parts(raw: dict[str, Any], study: StudyKeys, study_dir: str, study_name: str, journal: Path) -> TunerParts:
    """The trainable, tune_config, run_config and param_space of a new or restored study."""
    from trainables.config import parse_trial
    from trainables.tune_adapter import energyat_trial

    dims = tuple(parse_search(study.search, raw))
    objectives = objectives_of(study)
    base_method = str(raw.get("method", "sat"))
    epochs = parse_trial(raw).epochs
    pbt = study.scheduler.name == "pbt"
    scheduler = build_scheduler(study.scheduler, study_dir=study_dir, metric=objectives[0], epochs=epochs, dims=dims)
    cpus = float(study.resources.get("cpu", 1))
    gpus = float(study.resources.get("gpu", 0))
    trainable = tune.with_resources(
        tune.with_parameters(energyat_trial, base_spec=raw, study_dir=study_dir, objectives=objectives, cpus=max(1, int(cpus)),
                             stop_patience=study.stop_patience, hang_timeout=study.hang_timeout, val_patience=study.val_patience,
                             scheduled=study.scheduler.name in ("asha", "median"),
                             # PBT clones a top trial's checkpoint at each perturbation: one must exist there
                             checkpoint_every=perturbation_interval(study.scheduler, epochs=epochs) if pbt else None),
        {"cpu": cpus, "gpu": gpus},
    )
    upload = JournalUpload(study_name, study_dir) if is_uri(study_dir) else None
    search_alg: Any
    param_space: dict[str, Any] = {}
    if pbt:  # Tune refuses a searcher beside PBT: random starting points, recorded in Optuna by OptunaRecord
        from ray.tune.search.basic_variant import BasicVariantGenerator

        from study.tune_scheduler import domain

        param_space = {d.key: domain(d) for d in dims}
        search_alg = BasicVariantGenerator(points_to_evaluate=study.points_to_evaluate or None, max_concurrent=study.max_concurrent,
                                           random_state=int(raw.get("seed", 0)))
    else:
        searcher = StudySearch(
            upload=upload,
            study_dir=study_dir,
            space=SearchSpace(dims, base_method),
            metric=objectives if len(objectives) > 1 else objectives[0],
            mode=["max"] * len(objectives) if len(objectives) > 1 else "max",
            storage=journal_storage(journal),
            study_name=study_name,
            sampler=build_sampler(study.sampler, objectives=len(objectives), seed=int(raw.get("seed", 0)), dims=dims),
            points_to_evaluate=study.points_to_evaluate or None,
        )
        search_alg = StudyLimiter(searcher, max_concurrent=study.max_concurrent)
    tune_config = tune.TuneConfig(
        search_alg=search_alg,
        scheduler=scheduler,
        num_samples=study.samples,
        trial_dirname_creator=_trial_id,
        trial_name_creator=_trial_id,
    )
    board = Board(name=str(raw.get("name", study_name)), total=study.samples, epochs=epochs)
    callbacks: list[tune.Callback] = [LiveView(board, base_method), TrialErrors(raw, study_dir)]
    if pbt:
        callbacks.append(OptunaRecord(study_dir, study_name, objectives[0], dims))
    if upload is not None:
        callbacks.append(upload)  # after OptunaRecord: it uploads what that wrote
    callbacks += logger_callbacks(study.loggers, study_dir=study_dir, name=str(raw.get("name", study_name)))
    storage_path, storage_fs = _tune_storage(study_dir)
    run_config = tune.RunConfig(
        name="tune",
        storage_path=storage_path,
        storage_filesystem=storage_fs,
        stop=EnergyDivergenceStopper(study_dir, patience=study.stop_patience),
        failure_config=tune.FailureConfig(max_failures=study.max_failures),
        # PBT restores a bottom trial from a top trial's checkpoint of some epochs ago, which a
        # num_to_keep would have deleted meanwhile: under PBT a trial keeps its checkpoints, one per
        # perturbation_interval epochs (CI saw "Could not recover from checkpoint" with 2)
        # otherwise three: see trainables.tune_adapter.CHECKPOINT_SECONDS for why not two
        checkpoint_config=tune.CheckpointConfig(num_to_keep=None if pbt else 3),
        callbacks=callbacks,
        verbose=0,
    )
    return TunerParts(trainable, tune_config, run_config, param_space)


def _outcome_attrs(result: Mapping[str, Any]) -> dict[str, Any]:
    """The energy outcomes of a trial's final result as Optuna user attributes (OUTCOME_ATTRS)."""
    attrs = {}
    for key in OUTCOME_ATTRS:
        value = result.get(key)
        if value is not None and not (isinstance(value, float) and not math.isfinite(value)):
            attrs[f"energyat_{key}"] = value
    return attrs


class OptunaRecord(tune.Callback):
    """For a PBT study, which has no Optuna searcher: each trial that ends is added to the study's
    Optuna journal with its final configuration (PBT's perturbations included), its objective and
    the energy outcomes, so that `status`, the report's importances and optuna-dashboard read it
    like any study's. A trial already recorded (a resumed driver sees its end again) is skipped."""

    def __init__(self, study_dir: str, study_name: str, objective: str, dims: tuple[Any, ...]) -> None:
        self.study_dir = study_dir
        self.study_name = study_name
        self.objective = objective
        self.dims = dims

    def _record(self, trial: Any, *, failed: bool) -> None:
        import optuna

        storage = journal_storage(_journal_file(self.study_dir, self.study_name))  # this machine's (a resume elsewhere)
        study = optuna.create_study(study_name=self.study_name, storage=storage, direction="maximize", load_if_exists=True)
        trial_id = _trial_id(trial)
        if any(t.user_attrs.get(TUNE_ID_ATTR) == trial_id for t in study.get_trials(deepcopy=False)):
            return
        result = trial.last_result or {}
        value = result.get(self.objective)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            value = 0.0  # as the adapter reports it (tune_adapter.OBJECTIVE_FALLBACK)
        dists = {d.key: _distribution(d) for d in self.dims}
        study.add_trial(optuna.trial.create_trial(
            params={k: trial.config[k] for k in dists if k in trial.config}, distributions=dists,
            value=None if failed else float(value),
            state=optuna.trial.TrialState.FAIL if failed else optuna.trial.TrialState.COMPLETE,
            user_attrs={TUNE_ID_ATTR: trial_id, **_outcome_attrs(result)},
        ))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._record(trial, failed=False)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._record(trial, failed=True)


def _distribution(dim: Any) -> Any:
    import optuna

    if dim.kind == "categorical":
        return optuna.distributions.CategoricalDistribution(list(dim.choices))
    if dim.kind == "int":
        return optuna.distributions.IntDistribution(int(dim.low), int(dim.high), log=dim.log)
    return optuna.distributions.FloatDistribution(dim.low, dim.high, log=dim.log)


@contextmanager
def _tune_output_off() -> Iterator[None]:
    """Ray Tune's console output off while a study runs (energyat's own is study.live's Board).

    At `verbose=0` Tune's newer output engine still prints its start and end blocks on stdout,
    among them "To visualize your results with TensorBoard, run: tensorboard --logdir
    /tmp/ray/session_.../driver_artifacts", a folder that is not the study's (its event files are
    in STUDY_DIR/tune/<trial>/). RAY_AIR_NEW_OUTPUT=0 selects Tune's older engine, which prints
    nothing at verbose 0; the variable is restored afterwards."""
    before = os.environ.get("RAY_AIR_NEW_OUTPUT")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = before


def _journal_file(study_dir: str, study_name: str) -> Path:
    """The journal the driver writes: ``STUDY_DIR/optuna.journal`` on a local study; on a URI
    ``<journal_dir()>/<study name>.journal`` on this machine. The path derives from local settings
    and a name checked to be one path component: nothing read from a bucket chooses where the
    driver writes (spec.yaml once named the path, and a resume wrote wherever it said)."""
    if not is_uri(study_dir):
        return Path(study_dir) / JOURNAL
    name = check_name(study_name, "the Optuna study name in " + join(study_dir, "spec.yaml"))
    return journal_dir() / f"{name}.journal"


class Failed(NamedTuple):
    """A trial Ray Tune ended as ERROR, its restarts spent, and the reason in its `trials` row."""

    trial_id: str
    reason: str


def _failed(results: Any, study_dir: str) -> list[Failed]:
    from analysis.store import read_trial_outcome

    failed = []
    for result in results:
        if result.error is not None:
            trial_id = result.path.rstrip("/").rsplit("/", 1)[-1]
            recorded = read_trial_outcome(study_dir, trial_id) or {}
            failed.append(Failed(trial_id, str(recorded.get("stop_reason") or f"error: {one_line(result.error)[:200]}")))
    return sorted(failed)


def run_study(raw: dict[str, Any], study: StudyKeys, *, address: str | None, storage: str | None, name: str | None,
              dashboard_port: int | None = None) -> tuple[str, list[Failed]]:
    """Launch a study; returns its directory (a local path or a URI) and the trials that failed
    (their restarts spent). Validation happens before Ray starts."""
    from trainables.config import parse_trial

    if name is not None:
        raw = {**raw, "name": name}
    cfg = parse_trial(raw)
    dims = parse_search(study.search, raw)
    objectives = len(objectives_of(study))
    check_sampler_for(study.sampler, objectives=objectives, dims=dims, points=study.points_to_evaluate or ())
    check_scheduler_for(study.scheduler, epochs=cfg.epochs, dims=dims, base_method=cfg.method, objectives=objectives, sampler=study.sampler)
    check_placement(raw, study)
    check_dashboard(address, dashboard_port)
    study_dir = study_dir_for(storage or study.storage, cfg.name)
    fs, root = open_storage(study_dir)  # a bad scheme, endpoint or bucket: one line, before Ray
    if fs.get_file_info(f"{root}/spec.yaml").type != FileType.NotFound:
        raise EnergyatError(f"{study_dir} already holds a study; continue it with `energyat resume {study_dir}` or choose another --name")
    study_name = f"{cfg.name}-{uuid.uuid4().hex[:8]}"
    document = {"schema_version": SCHEMA_VERSION, "study_name": study_name, "spec": raw, "resolved": cfg.to_dict()}
    if is_uri(study_dir):
        try:
            journal_dir().mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise EnergyatError(f"cannot create the journal folder {journal_dir()}: {one_line(exc)}; set ENERGYAT_JOURNAL_DIR") from exc
    journal = _journal_file(study_dir, study_name)
    try:
        fs.create_dir(root, recursive=True)
        with fs.open_output_stream(f"{root}/spec.yaml") as f:
            f.write(yaml.safe_dump(document, sort_keys=False).encode())
    except OSError as exc:
        raise StoreError(f"cannot create the study directory {study_dir}: {one_line(exc)}; choose a writable --storage") from exc
    _init_ray(address, dashboard_port)
    parts = _tuner_parts(raw, study, study_dir, study_name, journal)
    if parts.param_space:  # PBT: no searcher creates the Optuna study, so it is created here
        import optuna

        optuna.create_study(study_name=study_name, storage=journal_storage(journal), direction="maximize")
    if is_uri(study_dir):
        upload_journal(journal, study_dir)  # the empty study: a resume anywhere finds a journal
    tuner = tune.Tuner(parts.trainable, param_space=parts.param_space, tune_config=parts.tune_config, run_config=parts.run_config)
    with _tune_output_off():
        results = tuner.fit()
    if is_uri(study_dir):
        upload_journal(journal, study_dir)  # the final state; JournalUpload sent the ones before
    return study_dir, _failed(results, study_dir)


class LoadedStudy(NamedTuple):
    directory: str
    raw: dict[str, Any]
    keys: StudyKeys
    study_name: str
    journal: Path


def load_study(study_dir: str | Path) -> LoadedStudy:
    """A study's spec.yaml, read from a local directory or a URI."""
    from study.spec import _check_study_keys

    location = str(study_dir) if is_uri(study_dir) else str(Path(study_dir).expanduser().resolve())
    fs, root = open_storage(location)
    if fs.get_file_info(f"{root}/spec.yaml").type != FileType.File:
        raise EnergyatError(f"{study_dir} is not a study directory (no spec.yaml); `energyat run SPEC` creates one")
    with fs.open_input_stream(f"{root}/spec.yaml") as f:
        text = f.read()
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise StoreError(f"{join(location, 'spec.yaml')} is not valid YAML ({one_line(exc)}); restore it from a copy") from exc
    if not isinstance(document, dict) or not {"spec", "study_name"} <= set(document):
        raise StoreError(f"{join(location, 'spec.yaml')} is not an energyat study spec (no `spec` and `study_name` keys); restore it from a copy")
    check_schema_version(document.get("schema_version"), where=location)
    raw = document["spec"]
    return LoadedStudy(location, raw, _check_study_keys(raw), document["study_name"], _journal_file(location, str(document["study_name"])))


def resume_study(study_dir: str | Path, *, address: str | None, retry_errored: bool = False,
                 dashboard_port: int | None = None) -> tuple[str, list[Failed]]:
    """Continue an interrupted study: Tuner.restore with the same trainable and searcher. Trials
    that ended as ERROR stay so, unless `retry_errored`: then each starts again from epoch 0
    (a fresh second life: the rows of the failed one move to ``STUDY_DIR/retried/``, its Optuna
    trial stays FAIL and a new one with the same parameters receives its results). Returns the
    study directory and the trials that failed."""
    check_dashboard(address, dashboard_port)
    loaded = load_study(study_dir)
    location = loaded.directory
    remote = is_uri(location)
    if remote:
        reconcile_journals(location, loaded.journal)
    check_journal(loaded.journal, where=join(location, JOURNAL))
    storage_path, storage_fs = _tune_storage(location)
    tune_dir = f"{storage_path}/tune"
    if not tune.Tuner.can_restore(tune_dir, storage_filesystem=storage_fs):
        raise EnergyatError(f"{study_dir} has no restorable Ray Tune experiment under tune/")
    reconcile_lost_trials(location, loaded.journal, tune_dir, storage_fs)
    if retry_errored:
        set_aside_errored(location, tune_dir, storage_fs)
    _init_ray(address, dashboard_port)
    trainable = _tuner_parts(loaded.raw, loaded.keys, location, loaded.study_name, loaded.journal).trainable
    tuner = tune.Tuner.restore(tune_dir, trainable=trainable, resume_unfinished=True, resume_errored=False, restart_errored=retry_errored,
                               storage_filesystem=storage_fs)
    with _tune_output_off():
        results = tuner.fit()
    if remote:
        upload_journal(loaded.journal, location)
    return location, _failed(results, location)


def set_aside_errored(location: str, tune_dir: str, storage_fs: FileSystem | None) -> list[str]:
    """Before `resume --retry-errored`: move the table files and the Tune folder of every trial
    Tune ended as ERROR to ``STUDY_DIR/retried/<trial>/<time>/`` (kept for inspection, out of
    every view). Tune restarts such a trial from epoch 0 under a new trial id, so nothing of the
    failed life may stay among the study's rows. Returns their ids."""
    from ray.tune import ExperimentAnalysis

    errored = sorted(t.trial_id for t in ExperimentAnalysis(tune_dir, storage_filesystem=storage_fs).trials if t.status == "ERROR")
    fs, root = filesystem(location)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    for trial in errored:
        # its Tune folder too, or the next resume would take it for a lost trial's
        _move_trial(fs, root, trial, f"{root}/{RETRIED}/{trial}/{stamp}")
        print(f"energyat: retrying trial {trial} from epoch 0 under a new trial id; its failed run moved to {join(location, RETRIED, trial, stamp)}",
              file=sys.stderr, flush=True)
    return errored
