"""Optuna objects as energyat hands them to Ray Tune, which pickles them into its experiment: the
journal file backend, the NSGA-II and grid samplers. A module of its own because it imports optuna at
import time, which the CLI's light commands never need."""

from __future__ import annotations

import threading
from typing import Any

from optuna.samplers import GridSampler, NSGAIISampler
from optuna.storages.journal import JournalFileBackend


class JournalFile(JournalFileBackend):
    """A JournalFileBackend that forgets its byte offsets when unpickled.

    Ray Tune pickles the searcher, and with it this backend, into its experiment checkpoint. The
    backend caches where each log line starts; a resume restores that cache against the journal
    it finds then, which on object storage is a copy downloaded from the study. Were that copy
    shorter than the file the cache describes, Optuna would seek into the middle of a line and
    every later read would fail with a JSON error. The cache is rebuilt on the first read instead.
    """

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._log_number_offset = {0: 0}


class PicklableNSGAII(NSGAIISampler):
    """Optuna's NSGAIISampler, which pickles: Optuna 5.1's holds a threading.Lock, so Ray Tune
    could not save a study that uses it (`TypeError: cannot pickle '_thread.lock'`). The lock
    is left out of the pickle and made anew when unpickled."""

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_thread_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._thread_lock = threading.Lock()


class StudyGrid(GridSampler):
    """Optuna's GridSampler for a study that asks and tells, as Ray Tune's searcher does.

    GridSampler ends a study by calling ``study.stop()`` once its last point is told, which
    Optuna allows only inside ``study.optimize``: under Ray Tune it raises in the middle of the
    trial's completion. An energyat study ends its own way, after `samples` trials or when every
    suggestion repeats a configuration already run (study.runner.StudySearch)."""

    def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
        return None
