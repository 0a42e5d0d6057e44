"""Optuna's journal file backend as energyat opens it (a module of its own because it imports
optuna at import time, which the CLI's light commands never need)."""

from __future__ import annotations

from typing import Any

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
