"""Where a study's files are: its directory, and the Optuna journal its driver writes.

    STUDY_DIR = <storage>/<name>/          (:func:`study_dir_for`)
      spec.yaml, optuna.journal, tune/, tables/, lost/, retried/, stops/, report/

Paths only, no Optuna and no Ray: `energyat train` and the spec checks read this module where
neither is installed (a GPU machine that reaches no package registry).
"""

from __future__ import annotations

import os
from pathlib import Path

from analysis.store import check_name, is_uri, join

JOURNAL = "optuna.journal"


def study_dir_for(storage: str, name: str) -> str:
    """``<storage>/<name>``: a resolved local path, or a URI that keeps its query."""
    return join(storage if is_uri(storage) else Path(storage).expanduser().resolve(), name)


def journal_dir() -> Path:
    """Where a driver keeps the journals of its studies on object storage: ``ENERGYAT_JOURNAL_DIR``,
    else ``~/.energyat/journals``."""
    return Path(os.environ.get("ENERGYAT_JOURNAL_DIR") or "~/.energyat/journals").expanduser().resolve()


def journal_file(study_dir: str, study_name: str) -> Path:
    """The journal the driver writes: ``STUDY_DIR/optuna.journal`` on a local study; on a URI
    ``<journal_dir()>/<study name>.journal`` on this machine (an object store has no appends, see
    :mod:`study.journal`). The path derives from local settings and a name checked to be one path
    component: nothing read from a bucket chooses where the driver writes."""
    if not is_uri(study_dir):
        return Path(study_dir) / JOURNAL
    name = check_name(study_name, "the Optuna study name in " + join(study_dir, "spec.yaml"))
    return journal_dir() / f"{name}.journal"
