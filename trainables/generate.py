"""`energyat sample`: images generated from a model by SGLD on its joint energy.

The model is a :class:`trainables.subjects.Subject`: a trial's best checkpoint, a state-dict
file or a RobustBench model. SGLD chains start per class (:mod:`trainables.sgld`); the
result goes to ``OUT/samples/<name>-<init>.png`` (rows = classes) and ``.npz`` (starts,
samples, labels, scores), judged by an independent classifier (:mod:`trainables.judge`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from analysis.errors import EnergyatError
from analysis.plots import sample_grid
from trainables.config import SgldConfig
from trainables.data import load_dataset
from trainables.judge import inception_scores, judge_scores, load_or_train_judge
from trainables.sgld import Init, class_starts, sgld
from trainables.subjects import Subject


def generate(
    subject: Subject,
    *,
    out: str | Path,
    classes: Sequence[int] | None = None,
    n: int = 8,
    init: Init = "pca",
    sgld_cfg: SgldConfig = SgldConfig(),
    seed: int = 0,
    inception_weights: Path | None = None,
    device: torch.device = torch.device("cpu"),
) -> dict[str, Any]:
    """Generate `n` images per class from `subject`'s model on `device` and judge them (on the
    CPU); files go to ``out/samples``.

    Returns ``{"png", "npz", "scores", "start_scores", "judge_test_acc", ...}``: ``scores`` for the
    samples, ``start_scores`` for the chains' starting images (what SGLD added is the difference).
    """
    if n < 1:
        raise EnergyatError(f"--n must be at least 1, got {n}")
    if sgld_cfg.steps < 0:
        raise EnergyatError(f"--steps must be >= 0, got {sgld_cfg.steps}")
    data = load_dataset(subject.cfg.dataset)
    wanted = list(range(data.num_classes)) if classes is None else list(classes)
    bad = [c for c in wanted if not 0 <= c < data.num_classes]
    if bad:
        raise EnergyatError(f"--classes {bad} are not classes of {subject.cfg.dataset.name} (0..{data.num_classes - 1})")
    model = subject.model(data, device)
    gen = torch.Generator().manual_seed(seed)  # on the CPU: the same samples on any device, up to arithmetic
    train_x = data.train_x.float() / 255
    x0, y = class_starts(train_x, data.train_y, classes=wanted, n=n, init=init, cfg=sgld_cfg, generator=gen)
    samples = sgld(model, x0.to(device), y.to(device), cfg=sgld_cfg, generator=gen).cpu()

    folder = Path(out).expanduser() / "samples"
    judge, judge_acc = load_or_train_judge(data, folder / "judge.pt")
    keep = torch.isin(data.test_y, torch.tensor(wanted))
    real = data.test_x[keep].float() / 255
    scores = judge_scores(judge, samples, y, real)
    start_scores = judge_scores(judge, x0, y, real)
    if inception_weights is not None:
        if not Path(inception_weights).is_file():
            raise EnergyatError(f"--inception-weights {inception_weights} is not a file")
        scores |= inception_scores(samples, real, Path(inception_weights))

    stem = f"{subject.name}-{init}"
    png = sample_grid(
        samples.numpy(), y.numpy(), path=folder / f"{stem}.png",
        title=f"{subject.name} ({subject.label}), SGLD {sgld_cfg.steps} steps from {init}: judge acc {scores['judge_acc']:.3f}",
    )
    record = {"trial_id": subject.name, "method": subject.label, "init": init, "seed": seed, "checkpoint": subject.weights,
              "sgld": asdict(sgld_cfg), "scores": scores, "start_scores": start_scores, "judge_test_acc": judge_acc}
    npz = folder / f"{stem}.npz"
    np.savez_compressed(npz, x0=x0.numpy(), samples=samples.numpy(), labels=y.numpy(), record=json.dumps(record))
    return {**record, "png": str(png), "npz": str(npz)}
