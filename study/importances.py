"""Hyperparameter importances of a study, from its Optuna journal (for ``energyat report``).

Optuna lives in ``study/``; the report (``analysis/report.py``) only draws the numbers.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import optuna

from analysis.store import is_uri, join
from study.journal import journal_copy, journal_storage
from study.layout import JOURNAL

# fewer finished trials than this and Optuna's evaluators return equal shares (and warn):
# a figure of them would say nothing
MIN_TRIALS = 2


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
