"""Checkpoints: plain dicts of tensors and Python scalars, saved atomically and durably.

Loading uses ``torch.load(weights_only=True)``, which unpickles only tensors and plain
containers, so a checkpoint from an untrusted source cannot run code. Everything saved must
therefore be tensors, numbers, strings, lists, dicts or None (the detector state is).

Two ways a checkpoint can fail to load, told apart because they call for different actions:
- damaged (:class:`DamagedCheckpointError`): empty, truncated or not a torch file at all, as a
  full disk, a lost node or a bad copy leaves it. The engine then falls back to an earlier state.
- refused (:class:`~analysis.errors.StoreError`): a well-formed torch file holding objects that
  could run code. energyat never writes one; nothing falls back past it silently.
"""

from __future__ import annotations

import os
import pickle
import shutil
import uuid
import zipfile
from pathlib import Path
from typing import Any

import torch

from analysis.errors import StoreError, one_line
from analysis.store import durable_replace


class DamagedCheckpointError(StoreError):
    """A checkpoint file that is empty, truncated or not a torch checkpoint."""


def save(path: Path, state: dict[str, Any]) -> None:
    """Write `state` to `path` through a temporary file, fsynced before the rename: after a
    crash or power loss the file is the old checkpoint or the new one, never half of one."""
    tmp = _temporary(path)
    torch.save(state, tmp)
    durable_replace(tmp, path)


def copy(source: Path, path: Path) -> None:
    """`source`'s bytes at `path`, as durably as :func:`save` (a second checkpoint of a state
    already saved costs a file copy, not a second serialisation and device-to-host transfer)."""
    tmp = _temporary(path)
    shutil.copyfile(source, tmp)
    durable_replace(tmp, path)


def _temporary(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")


def load(path: Path) -> dict[str, Any]:
    """The state saved at `path`.

    Raises:
        DamagedCheckpointError: the file is empty, truncated or not a torch checkpoint.
        StoreError: it holds objects other than tensors and plain values (refused before any runs).
    """
    # torch.save writes a zip archive; a file cut short loses the archive's directory at its end
    if not zipfile.is_zipfile(path):
        size = os.path.getsize(path)
        raise DamagedCheckpointError(f"checkpoint {path} is damaged ({size} bytes, not a whole torch checkpoint)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise StoreError(
            f"checkpoint {path} holds objects other than tensors and plain values, so it was not loaded "
            "(torch.load weights_only=True); energyat did not write it: delete it, or restore the trial's own"
        ) from exc
    except (EOFError, OSError, RuntimeError, zipfile.BadZipFile) as exc:  # an archive whose entries are damaged
        raise DamagedCheckpointError(f"checkpoint {path} is damaged ({one_line(exc)[:160]})") from exc
