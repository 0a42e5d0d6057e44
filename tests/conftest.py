"""Shared fixtures: small seeded models and batches on the CPU."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

# A trial small enough for a unit test: 200 digits, 2 epochs, 2-step PGD, 48-image probes.
TINY = {
    "name": "tiny",
    "dataset": {"name": "digits", "train_size": 200},
    "model": "small_cnn",
    "epochs": 2,
    "batch_size": 64,
    "lr": 0.05,
    "attack": {"eps": 0.15, "step": 0.075, "steps": 2},
    "eval_attack": {"steps": 3},
    "probe": {"train_size": 48, "test_size": 48},
    "final_eval": {"n": 64, "pgd_steps": 3, "autoattack_n": 0},
    "device": "cpu",
}


@pytest.fixture(scope="session")
def digits_batch() -> tuple[torch.Tensor, torch.Tensor]:
    from trainables.config import DatasetConfig
    from trainables.data import load_dataset

    data = load_dataset(DatasetConfig(name="digits"))
    return data.train_x[:64].float() / 255, data.train_y[:64]


@pytest.fixture(scope="session")
def trained_cnn(digits_batch: tuple[torch.Tensor, torch.Tensor]) -> torch.nn.Module:
    """A small CNN trained for a few dozen steps, so that attacks have gradients to follow."""
    from trainables.models import build_model

    torch.manual_seed(0)
    model = build_model("small_cnn", in_channels=1, num_classes=10, image_size=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = digits_batch
    for _ in range(30):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    return model


def energyat_cmd() -> list[str]:
    """The CLI as a subprocess, from this checkout's interpreter."""
    return [sys.executable, "-m", "study.cli"]


def ctrl_c(command: Sequence[str], *, when: Callable[[], bool], what: str, timeout: float = 600) -> tuple[int, str, str]:
    """Ctrl-C as a terminal sends it: SIGINT to the command's whole process group, once `when()`
    holds. Returns its exit status, stdout and stderr; a command still running 300 s later is
    killed (the test fails on its status)."""
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while not when():
            assert proc.poll() is None, f"it ended before {what}"
            assert time.monotonic() < deadline, f"no {what} within {timeout:.0f} s"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, out.decode(), err.decode()
