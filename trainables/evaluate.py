"""Test-set evaluation with the numbers a reviewer compares against published tables.

- ``clean`` and ``pgd``: one pass of :func:`trainables.probe.probe` (fp32, eval mode, seeded):
  untargeted PGD with a uniform random start, `attack.step`, and `final_eval.pgd_steps` (a trial's
  final evaluation) or `--pgd-steps` (`energyat eval`) steps.
- ``autoattack``: Croce and Hein's original AutoAttack (``pyautoattack``, the code RobustBench
  runs), version ``standard``: APGD-CE (100 iterations, 1 restart), APGD-T (100 iterations, 9
  target classes), FAB-T (100 iterations, 9 targets) and Square (5,000 queries), each run on the
  images still classified correctly, in fp32 and eval mode.

Images are the *first* n of the test split, as RobustBench evaluates. Each result is one row of
the `evals` table (:data:`analysis.schema.EVALS`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn

from analysis.errors import EnergyatError
from analysis.store import git_sha, provenance, write_eval_rows
from trainables.attacks import eval_mode, pgd
from trainables.config import TrialConfig
from trainables.data import ImageData, to_float
from trainables.probe import eval_seed, fp32, probe
from trainables.subjects import Subject

EVAL_ATTACKS = ("clean", "pgd", "autoattack")
AUTOATTACK_NORMS = {"linf": "Linf", "l2": "L2"}


@dataclass(frozen=True)
class EvalResult:
    attack: str  # clean | pgd | autoattack
    n: int
    correct: int
    steps: int | None  # PGD steps; None for clean and autoattack
    seconds: float

    @property
    def accuracy(self) -> float:
        return self.correct / self.n


def parse_attacks(text: str) -> list[str]:
    """`--attacks clean,pgd,autoattack` as a list, refused in one line when a name is unknown."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in EVAL_ATTACKS]
    if unknown or not names:
        raise EnergyatError(f"--attacks {text!r}: choose from {', '.join(EVAL_ATTACKS)} (comma-separated)")
    return list(dict.fromkeys(names))


# A long evaluation's progress: (what runs, e.g. "PGD-20 on 10,000 test images", done, total).
StageCallback = Callable[[str, int, int], None]


class _AutoAttackProgress(logging.Handler):
    """AutoAttack's own per-batch log lines (logger `auto-attack`, DEBUG: "apgd-ce - 3/40 - ...")
    turned into :data:`StageCallback` calls: which of its attacks runs, and its batches done. Reading
    its log, not re-batching its input, keeps its numbers those of one standard run."""

    LINE = re.compile(r"^(?P<attack>[a-z-]+) - (?P<done>\d+)/(?P<total>\d+) - ")
    START = re.compile(r"^running (?P<attack>[a-z-]+)$")

    def __init__(self, progress: StageCallback, images: int) -> None:
        super().__init__(logging.DEBUG)
        self.progress = progress
        self.images = images

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        started, batch = self.START.match(message), self.LINE.match(message)
        if started is not None:  # no count yet: how many batches it takes is logged with its first
            self.progress(self._what(started["attack"]), 0, 0)
        elif batch is not None:
            self.progress(self._what(batch["attack"]), int(batch["done"]), int(batch["total"]))

    def _what(self, attack: str) -> str:
        return f"AutoAttack on {self.images:,} test images: {attack} on the images still robust"


def autoattack_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, norm: str, eps: float, seed: int,
                       progress: StageCallback | None = None) -> np.ndarray:
    """Per image, whether the original AutoAttack (standard) leaves it classified correctly.

    Args:
        model: logits in fp32; run in eval mode here.
        x: (N, C, H, W) float in [0, 1], on the model's device; y: (N,) labels.
        norm: ``linf`` or ``l2``; eps: the threat radius; seed: AutoAttack's ``seed``.
        progress: told which attack runs and its batches done, from AutoAttack's own log.

    Equals ``AutoAttack(model, norm=..., eps=eps, version="standard", seed=seed).run_standard_evaluation(x, y)``
    with its default batch size (250): its second output are the predictions on the returned
    images, which are the adversarial ones where an attack succeeded.
    """
    adversary = autoattack_adversary(model, norm=norm, eps=eps, seed=seed)
    # AutoAttack seeds torch's global generators (torch.random.manual_seed(seed), and CUDA's) at
    # the start of each of its attacks: in a fork, so that evaluating never moves the caller's
    # random stream (a trial, a study's next draw) to a state that depends on the evaluation
    devices = [x.device] if x.device.type == "cuda" else []
    logger = logging.getLogger("auto-attack")
    handler = _AutoAttackProgress(progress, len(y)) if progress is not None else None
    level = logger.level
    if handler is not None:
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
    try:
        with torch.random.fork_rng(devices=devices), fp32(), eval_mode(model):
            _x_adv, y_adv = adversary.run_standard_evaluation(x, y)
    finally:
        if handler is not None:
            logger.removeHandler(handler)
            logger.setLevel(level)
    return (y_adv == y).cpu().numpy()


def autoattack_adversary(model: nn.Module, *, norm: str, eps: float, seed: int) -> Any:
    """The original AutoAttack, standard version, on the model's device.

    Its progress goes to the logger `auto-attack` at DEBUG; its sanity checks (a randomised
    defense, probabilities instead of logits, Square beating the gradient attacks) at WARNING.
    """
    from pyautoattack import AutoAttack  # deferred: only test-set evaluation needs it

    device = next(model.parameters()).device
    return AutoAttack(model, norm=AUTOATTACK_NORMS[norm], eps=eps, version="standard", seed=seed, device=device)


def evaluate(
    model: nn.Module,
    data: ImageData,
    cfg: TrialConfig,
    *,
    attacks: Sequence[str],
    n: int | None,
    autoattack_n: int | None,
    pgd_steps: int,
    seed: int,
    progress: StageCallback | None = None,
    autoattack_start: int = 0,
) -> list[EvalResult]:
    """Accuracy of `model` on the first `n` test images (clean, PGD) and the first
    `autoattack_n` (AutoAttack); None takes the whole test set, 0 skips AutoAttack. `progress`
    is told what runs and how far it is, per batch. `autoattack_start` > 0 runs AutoAttack on
    test images [autoattack_start, autoattack_n) only: the rest of a sample whose first part was
    evaluated before, so the two counts add up to AutoAttack on the first `autoattack_n`.

    Threat model from `cfg.attack` (eps, step, norm); `seed` seeds PGD's random starts and
    AutoAttack. All in fp32 and eval mode, whatever the model was trained in.
    """
    results: list[EvalResult] = []
    total = len(data.test_y)
    count = total if n is None else min(n, total)
    a = cfg.attack
    assert a.step is not None
    wants = [x for x in ("clean", "pgd") if x in attacks]
    if wants:
        started = time.perf_counter()
        attack = partial(pgd, eps=a.eps, step_size=a.step, steps=pgd_steps, norm=a.norm) if "pgd" in wants else _identity
        what = f"{f'PGD-{pgd_steps}' if 'pgd' in wants else 'clean accuracy'} on {count:,} test images"
        on_batch = None if progress is None else (lambda done: progress(what, done, count))
        values = probe(model, data.test_x[:count], data.test_y[:count], attack=attack, batch_size=cfg.batch_size,
                       seed=eval_seed(seed, -1, "final"), on_batch=on_batch)
        seconds = time.perf_counter() - started
        if "clean" in wants:
            results.append(EvalResult("clean", count, int(values["correct"].sum()), None, seconds))
        if "pgd" in wants:
            results.append(EvalResult("pgd", count, int(values["correct_adv"].sum()), pgd_steps, seconds))
    m = total if autoattack_n is None else min(autoattack_n, total)
    if "autoattack" in attacks and m > 0:
        if not 0 <= autoattack_start < m:
            raise EnergyatError(f"AutoAttack from test image {autoattack_start}: give a start from 0 to {m - 1} (it ends at image {m})")
        started = time.perf_counter()
        device = next(model.parameters()).device
        x = to_float(data.test_x[autoattack_start:m].to(device))
        correct = autoattack_correct(model, x, data.test_y[autoattack_start:m].to(device), norm=a.norm, eps=a.eps, seed=seed,
                                     progress=progress)
        results.append(EvalResult("autoattack", m - autoattack_start, int(correct.sum()), None, time.perf_counter() - started))
    return results


def _identity(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return x


def write_evals(root: str, subject: Subject, results: Sequence[EvalResult], *, seed: int, evaluated_by: str, device: str) -> None:
    """One `evals` file per result, keyed by what defines it (same evaluation again: same file)."""
    when = datetime.now(timezone.utc).isoformat(timespec="seconds")
    cfg = subject.cfg
    prov = provenance(cfg.to_dict())
    for r in results:
        row: dict[str, Any] = {
            "study": subject.study, "trial_id": subject.name, "source": subject.source, "checkpoint": subject.weights,
            "method": subject.method, "model": subject.architecture, "dataset": cfg.dataset.name, "attack": r.attack, "steps": r.steps,
            "norm": cfg.attack.norm, "eps": cfg.attack.eps, "n": r.n, "correct": r.correct, "accuracy": r.accuracy,
            "seed": seed, "evaluated_by": evaluated_by, "evaluated_at": when, "seconds": r.seconds, "device": device,
            "git_sha": git_sha(),
        }
        defining = {k: row[k] for k in ("source", "checkpoint", "dataset", "attack", "steps", "norm", "eps", "n", "seed")}
        defining["step"] = cfg.attack.step
        key = hashlib.sha256(json.dumps(defining, sort_keys=True).encode()).hexdigest()[:16]
        write_eval_rows(root, trial_id=subject.name, key=key, columns={k: [v] for k, v in row.items()}, provenance=prov)
