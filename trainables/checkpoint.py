"""Checkpoints: plain dicts of tensors and Python scalars, saved atomically.

Loading uses ``torch.load(weights_only=True)``, which unpickles only tensors and plain
containers, so a checkpoint from an untrusted source cannot run code. Everything saved must
therefore be tensors, numbers, strings, lists, dicts or None (the detector state is).
"""

from __future__ import annotations

import os
import pickle
import uuid
from pathlib import Path
from typing import Any

import torch

from analysis.errors import StoreError


def save(path: Path, state: dict[str, Any]) -> None:
    """Write `state` to `path` through a temporary file and a rename: never half a checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load(path: Path) -> dict[str, Any]:
    """The state saved at `path`; a file holding anything but the types above is refused
    (:class:`StoreError`) before any of it runs."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise StoreError(
            f"checkpoint {path} holds objects other than tensors and plain values, so it was not loaded "
            "(torch.load weights_only=True); energyat did not write it: delete it, or restore the trial's own"
        ) from exc
