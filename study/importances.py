"""Hyperparameter importances of a study, from its Optuna journal (for ``energyat report``).

Optuna lives in ``study/``; the report (``analysis/report.py``) only draws the numbers.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from analysis.errors import StoreError, one_line
from analysis.store import is_uri, join, open_storage

JOURNAL = "optuna.journal"
# fewer finished trials than this and Optuna's evaluators return equal shares (and warn):
# a figure of them would say nothing
MIN_TRIALS = 2


def check_journal(path: Path, *, where: str) -> None:
    """Raise :class:`StoreError` when the journal at `path` (named `where` in the message) is
    truncated or holds a line that is not JSON; a missing file is fine (a new study).

    Optuna skips an incomplete last line silently, and its next append would then bury that
    line in the middle of the file, where every later read fails: a cut journal is refused
    before anything reads or appends to it.
    """
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        start = data.rfind(b"\n") + 1
        raise StoreError(
            f"{where} is truncated: its last line (from byte {start}) has no end, as after an interrupted "
            "write or copy; restore the file, or delete that line to keep the search state before it"
        )
    for number, line in enumerate(data.splitlines(), start=1):
        try:
            json.loads(line)
        except ValueError as exc:
            raise StoreError(f"{where} is corrupted: line {number} is not JSON ({one_line(exc)}); restore the file from a copy") from exc


def journal_storage(path: Path) -> Any:
    """Optuna's JournalStorage on the journal file at `path` (the one way energyat opens one),
    after :func:`check_journal`."""
    from optuna.storages import JournalStorage

    from study.journal import JournalFile

    check_journal(path, where=str(path))
    return JournalStorage(JournalFile(str(path)))


@contextmanager
def journal_copy(directory: str | os.PathLike[str]) -> Iterator[Path | None]:
    """The study's ``optuna.journal`` as a local file, or None when it has none.

    A local study's file is used in place; a study on object storage has its uploaded copy
    downloaded into a temporary folder, removed on exit (Optuna reads journals from files).
    """
    if not is_uri(directory):
        path = Path(directory).expanduser() / JOURNAL
        yield path if path.exists() else None
        return
    import pyarrow.fs as pafs

    fs, root = open_storage(directory)
    if fs.get_file_info(f"{root}/{JOURNAL}").type != pafs.FileType.File:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="energyat-journal-") as tmp:
        local = Path(tmp) / JOURNAL
        pafs.copy_files(f"{root}/{JOURNAL}", str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        check_journal(local, where=join(directory, JOURNAL))  # named as the user knows it
        yield local


def study_importances(directory: str | os.PathLike[str]) -> tuple[dict[str, float] | None, str | None]:
    """(importances, note) for the Optuna study in ``directory/optuna.journal``.

    Importances are Optuna's default evaluator over the finished trials, for the first objective
    when there are several. When they cannot be computed, importances is None and the note says
    why (no journal, not exactly one study in it, too few finished trials).
    """
    with journal_copy(directory) as path:
        if path is None:
            return None, f"no {JOURNAL} in {directory} (an `energyat train` output has none)"
        return _importances(path, where=join(directory, JOURNAL) if is_uri(directory) else str(path))


def _importances(path: Path, *, where: str) -> tuple[dict[str, float] | None, str | None]:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = journal_storage(path)
    names = optuna.study.get_all_study_names(storage)
    if len(names) != 1:
        return None, f"{where} holds {len(names)} studies ({', '.join(names) or 'none'}), expected exactly one"
    study = optuna.load_study(study_name=names[0], storage=storage)
    finished = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(finished) < MIN_TRIALS:
        return None, f"{len(finished)} finished trial(s) in the Optuna study, importances need at least {MIN_TRIALS}"
    several = len(study.directions) > 1
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "too small to compute": handled above
            found = optuna.importance.get_param_importances(study, target=(lambda t: t.values[0]) if several else None)
    except ValueError as exc:  # e.g. no parameter common to all finished trials
        return None, f"Optuna could not compute importances: {exc}"
    if not found:
        return None, "no hyperparameter was searched in the finished trials"
    return dict(found), "for the first objective" if several else None


def optuna_trial_states(path: Path) -> dict[str, int]:
    """How many trials of the journal's study are in each Optuna state (COMPLETE, RUNNING, ...);
    suggestions that repeated a configuration already run, and were not trained (user attribute
    `energyat_duplicate_of`, see study.runner.StudySearch.suggest), count as `duplicate`."""
    import optuna

    storage = journal_storage(path)
    counts: dict[str, int] = {}
    for name in optuna.study.get_all_study_names(storage):
        for trial in optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False):
            state = "duplicate" if "energyat_duplicate_of" in trial.user_attrs else trial.state.name
            counts[state] = counts.get(state, 0) + 1
    return counts
