"""Arithmetic precision: bf16 autocast for training, IEEE fp32 for everything that measures.

Training may run under bf16 autocast (:func:`autocast`); every evaluation and every energy runs in
fp32 (:func:`fp32`), and so does the one TRADES attack step that bf16 would turn into rounding noise.
"fp32" means IEEE fp32: torch lets cuDNN convolutions use TF32 (10 mantissa bits) by default on
Ampere and later GPUs, so :func:`fp32` turns TF32 off inside and restores the settings on exit.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from analysis.errors import EnergyatError

# Forces what `precision: auto` trains in, whatever the machine (see :func:`training_precision`).
AUTO_PRECISION_ENV = "ENERGYAT_AUTO_PRECISION"
AUTO_PRECISION_VALUES = ("fp32", "bf16")


@lru_cache(maxsize=1)
def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware: Intel's AMX (`amx_bf16`, Xeon 4th
    generation and later), read from Linux's /proc/cpuinfo (False where there is none)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    return any(line.startswith("flags") and "amx_bf16" in line.split() for line in cpuinfo.splitlines())


def training_precision(device: torch.device, precision: str) -> str:
    """What `precision` trains in on `device`: ``bf16`` or ``fp32``.

    ``auto`` is bf16 on CUDA and on CPUs with AMX, fp32 elsewhere. On this project's AMX CPU bf16
    trains SAT 2.8x and TRADES 4.2x as fast as the usual fp32 code, fp32 1.3x and 2.8x
    (BENCHMARKS.md), within the fast path's tolerances (tests/test_fast_path.py), and every number
    energyat reports is evaluated in fp32 anyway (:func:`fp32`).

    The environment variable ``ENERGYAT_AUTO_PRECISION`` (``fp32`` or ``bf16``) overrides that
    rule for ``auto``, on any device: it reproduces on one machine what ``auto`` does on another
    (an AMD CPU without AMX trains ``auto`` in fp32, an Intel CPU with AMX and a GPU in bf16), e.g.
    ``ENERGYAT_AUTO_PRECISION=fp32 make test`` on an AMX machine. Unset, the rule above holds;
    any other value (the empty string included) is an :class:`EnergyatError`. An explicit
    ``fp32`` or ``bf16`` in the spec is never overridden. It is read at every call, so set it
    before a trial starts, and a study's workers must see it too.
    """
    if precision == "auto":
        forced = os.environ.get(AUTO_PRECISION_ENV)
        if forced is not None:
            if forced not in AUTO_PRECISION_VALUES:
                raise EnergyatError(
                    f"{AUTO_PRECISION_ENV}={forced!r}: expected fp32 or bf16 (what `precision: auto` trains in), "
                    f"or leave it unset for the machine's rule"
                )
            return forced
        return "bf16" if device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16()) else "fp32"
    return precision


def autocast(device: torch.device, precision: str) -> AbstractContextManager[Any]:
    """bf16 autocast for *training* when :func:`training_precision` says bf16. Evaluation never
    runs under it (:func:`fp32`).

    bf16 keeps fp32's exponent range, so energies (logsumexp of logits) do not overflow; the
    engine turns logits to fp32 before any energy or loss reduction it reports.
    """
    if training_precision(device, precision) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def _set_tf32(on: bool) -> dict[str, Any]:
    """Allow (or forbid) TF32 in CUDA convolutions and matmuls; returns the previous settings."""
    backends = torch.backends
    if hasattr(backends.cudnn, "conv") and hasattr(backends.cudnn.conv, "fp32_precision"):  # torch >= 2.9
        before = {"conv": backends.cudnn.conv.fp32_precision, "matmul": backends.cuda.matmul.fp32_precision}
        backends.cudnn.conv.fp32_precision = "tf32" if on else "ieee"
        backends.cuda.matmul.fp32_precision = "tf32" if on else "ieee"
    else:
        before = {"conv": backends.cudnn.allow_tf32, "matmul": backends.cuda.matmul.allow_tf32}
        backends.cudnn.allow_tf32 = on
        backends.cuda.matmul.allow_tf32 = on
    return before


def _restore_tf32(before: dict[str, Any]) -> None:
    backends = torch.backends
    if hasattr(backends.cudnn, "conv") and hasattr(backends.cudnn.conv, "fp32_precision"):
        backends.cudnn.conv.fp32_precision = before["conv"]
        backends.cuda.matmul.fp32_precision = before["matmul"]
    else:
        backends.cudnn.allow_tf32 = before["conv"]
        backends.cuda.matmul.allow_tf32 = before["matmul"]


@contextmanager
def fp32() -> Iterator[None]:
    """IEEE fp32 inside, whatever surrounds it: autocast off (CPU and CUDA) and TF32 off.

    torch lets cuDNN convolutions use TF32 by default on Ampere and later GPUs (10 mantissa
    bits): "fp32" evaluation would not be fp32 there. The settings come back on exit.
    """
    before = _set_tf32(False)
    try:
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            yield
    finally:
        _restore_tf32(before)
