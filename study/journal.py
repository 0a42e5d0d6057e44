"""A study's Optuna journal: where it lives, how it is opened, checked, copied and read.

Every Optuna study of energyat is a JournalStorage on one file, ``STUDY_DIR/optuna.journal``,
which plain Optuna and optuna-dashboard read as well.

Optuna's journal needs a file system with locks and appends; an object store has neither. On a
URI the journal therefore lives on the driver's disk (:func:`study.layout.journal_file`), the only process that
writes it (the searcher runs in the Tune driver), and a copy is uploaded to
``STUDY_DIR/optuna.journal`` when the study is created, whenever a trial starts or ends
(:class:`study.callbacks.JournalUpload`), before each save of the searcher's state
(:class:`study.search.StudySearch`), and at the end. `energyat resume` takes the uploaded copy
when it continues the driver's (a journal only grows by appends; :func:`reconcile_journals`),
for instance on another machine.

The user attributes energyat sets on Optuna trials are named here too: they are part of what the
journal records, and the searcher, the recovery of lost trials and `energyat status` read them.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
import pyarrow.fs as pafs
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from analysis.errors import StoreError, one_line
from analysis.store import durable_replace, filesystem, is_uri, join, open_storage
from study.layout import JOURNAL

# Optuna user attributes: the Tune trial id of an Optuna trial (after a killed driver,
# study.recovery tells from it which Optuna trials Tune never recorded), and the marks of a
# lost trial, of a retried trial's second life and of a suggestion that repeated a configuration.
TUNE_ID_ATTR = "tune_trial_id"
LOST_ATTR = "energyat_lost"
RETRY_ATTR = "energyat_retry_of"
DUPLICATE_ATTR = "energyat_duplicate_of"
# The energy outcomes each Optuna trial carries as user attributes (`energyat_<column>`, the
# `trials` table's values), so that optuna-dashboard and plain Optuna show why a trial ended and
# where its phases fell beside its objective.
OUTCOME_ATTRS = ("stop_reason", "epochs_run", "best_epoch", "alarm_epoch", "phase2_start", "phase3_start", "final_pgd_acc")


def outcome_attrs(result: Mapping[str, Any]) -> dict[str, Any]:
    """The energy outcomes of a trial's final result as Optuna user attributes (OUTCOME_ATTRS)."""
    attrs = {}
    for key in OUTCOME_ATTRS:
        value = result.get(key)
        if value is not None and not (isinstance(value, float) and not math.isfinite(value)):
            attrs[f"energyat_{key}"] = value
    return attrs


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


def journal_storage(path: Path) -> JournalStorage:
    """Optuna's JournalStorage on the journal file at `path` (the one way energyat opens one),
    after :func:`check_journal`."""
    check_journal(path, where=str(path))
    return JournalStorage(JournalFile(str(path)))


def upload_journal(local: Path, study_dir: str) -> None:
    """Copy the driver's journal to ``STUDY_DIR/optuna.journal`` (one PUT: readers see a whole file)."""
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
    fs, root = open_storage(directory)
    if fs.get_file_info(f"{root}/{JOURNAL}").type != pafs.FileType.File:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="energyat-journal-") as tmp:
        local = Path(tmp) / JOURNAL
        pafs.copy_files(f"{root}/{JOURNAL}", str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        check_journal(local, where=join(directory, JOURNAL))  # named as the user knows it
        yield local


def optuna_trial_states(path: Path) -> dict[str, int]:
    """How many trials of the journal's study are in each Optuna state (COMPLETE, RUNNING, ...);
    suggestions that repeated a configuration already run, and were not trained (user attribute
    DUPLICATE_ATTR, see study.search.StudySearch.suggest), count as `duplicate`."""
    storage = journal_storage(path)
    counts: dict[str, int] = {}
    for name in optuna.study.get_all_study_names(storage):
        for trial in optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False):
            state = "duplicate" if DUPLICATE_ATTR in trial.user_attrs else trial.state.name
            counts[state] = counts.get(state, 0) + 1
    return counts
