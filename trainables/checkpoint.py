"""Checkpoints: plain dicts of tensors and Python scalars, saved atomically.

Loading uses ``torch.load(weights_only=True)``, which unpickles only tensors and plain
containers, so a checkpoint from an untrusted source cannot run code. Everything saved must
therefore be tensors, numbers, strings, lists, dicts or None (the detector state is).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import torch


def save(path: Path, state: dict[str, Any]) -> None:
    """Write `state` to `path` through a temporary file and a rename: never half a checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)
