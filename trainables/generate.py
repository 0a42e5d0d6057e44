"""`energyat sample`: images generated from a trial's best checkpoint (PAPER.md section 5).

Finds the trial's spec and best checkpoint in a study directory (the trial's latest Tune
checkpoint) or an ``energyat train --out`` directory, starts SGLD chains per class
(:mod:`trainables.sampling`), and writes ``DIR/samples/<trial>-<init>.png`` (rows = classes) and
``.npz`` (starts, samples, labels, scores), judged by an independent classifier
(:mod:`trainables.judge`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import yaml
from torch import nn

from analysis.errors import EnergyatError, StoreError, one_line
from analysis.plots import sample_grid
from analysis.store import is_uri
from trainables import checkpoint
from trainables.config import SgldConfig, TrialConfig, parse_trial, trial_spec
from trainables.data import ImageData, load_dataset
from trainables.judge import inception_scores, judge_scores, load_or_train_judge
from trainables.models import build_model
from trainables.sampling import Init, class_starts, sgld


@dataclass(frozen=True)
class TrialModel:
    trial_id: str  # resolved: never `best`
    cfg: TrialConfig
    best: Path  # the best checkpoint (highest test robust accuracy)


def best_trial(directory: str | Path) -> str:
    """The id of the trial with the highest best test robust accuracy (the `trials` table)."""
    from analysis.query import open_tables

    con = open_tables(directory)
    try:
        found = con.execute(
            "select trial_id from trials where best_test_robust_acc = best_test_robust_acc "
            "order by best_test_robust_acc desc, trial_id limit 1"
        ).fetchall()
    finally:
        con.close()
    if not found:
        raise StoreError(f"{directory} has no trial with a test robust accuracy yet; name one with --trial ID")
    return str(found[0][0])


def find_trial(directory: str | Path, trial_id: str) -> TrialModel:
    """The spec and best checkpoint of `trial_id` in a local study or train-output directory
    (``best``: the trial with the highest best test robust accuracy)."""
    if trial_id == "best":
        trial_id = best_trial(directory)
    if is_uri(directory):
        raise EnergyatError(f"{directory}: sampling reads checkpoints from a local directory; copy the study (spec.yaml, tune/<trial>) to disk first")
    root = Path(directory).expanduser()
    spec_file = root / "spec.yaml"
    if not spec_file.is_file():
        raise StoreError(f"{directory} holds no spec.yaml; give a study directory or an `energyat train --out` directory")
    try:
        document = yaml.safe_load(spec_file.read_text())
    except yaml.YAMLError as exc:
        raise StoreError(f"{spec_file} is not valid YAML ({one_line(exc)}); restore it from a copy") from exc
    if not isinstance(document, dict):
        raise StoreError(f"{spec_file} is not an energyat spec (not a mapping); restore it from a copy")
    if "study_name" in document:  # a study: the trial's own parameters live in its Tune folder
        folder = root / "tune" / trial_id
        if not (folder / "params.json").is_file():
            known = sorted(p.parent.name for p in (root / "tune").glob("*/params.json"))
            raise StoreError(f"no trial `{trial_id}` in {directory}; known trial ids: {', '.join(known) or 'none yet'}")
        raw = trial_spec(document["spec"], json.loads((folder / "params.json").read_text()))
        candidates = sorted(folder.glob("checkpoint_*/best.pt"))  # Tune numbers them in order
    else:  # an `energyat train` output: the resolved spec, checkpoints under checkpoints/<trial>
        raw = {k: v for k, v in document.items() if k != "schema_version"}
        candidates = [root / "checkpoints" / trial_id / "best.pt"]
        if not candidates[0].parent.is_dir():
            known = sorted(p.name for p in (root / "checkpoints").glob("*"))
            raise StoreError(f"no trial `{trial_id}` in {directory}; known trial ids: {', '.join(known) or 'none'}")
    found = [c for c in candidates if c.is_file()]
    if not found:
        raise StoreError(f"trial `{trial_id}` in {directory} has no best checkpoint yet (it is written at the first probed epoch)")
    return TrialModel(trial_id, parse_trial(raw), found[-1])


def trial_ids(directory: str | Path) -> list[str]:
    """The trials of a study or train-output directory that have a best checkpoint."""
    root = Path(directory).expanduser()
    found = {p.parent.parent.name for p in root.glob("tune/*/checkpoint_*/best.pt")}
    found |= {p.parent.name for p in root.glob("checkpoints/*/best.pt")}
    return sorted(found)


def load_model(trial: TrialModel, data: ImageData) -> nn.Module:
    cfg = trial.cfg
    model = build_model(cfg.model, in_channels=data.train_x.shape[1], num_classes=data.num_classes,
                        image_size=data.train_x.shape[-1], width=cfg.width)
    model.load_state_dict(checkpoint.load(trial.best)["model"])
    return model.eval()


def generate(
    directory: str | Path,
    trial_id: str,
    *,
    classes: Sequence[int] | None = None,
    n: int = 8,
    init: Init = "pca",
    sgld_cfg: SgldConfig = SgldConfig(),
    seed: int = 0,
    inception_weights: Path | None = None,
) -> dict[str, Any]:
    """Generate `n` images per class from the trial's best checkpoint and judge them.

    Returns ``{"png", "npz", "scores", "start_scores", "judge_test_acc", ...}``: ``scores`` for the
    samples, ``start_scores`` for the chains' starting images (what SGLD added is the difference).
    """
    if n < 1:
        raise EnergyatError(f"--n must be at least 1, got {n}")
    if sgld_cfg.steps < 0:
        raise EnergyatError(f"--steps must be >= 0, got {sgld_cfg.steps}")
    trial = find_trial(directory, trial_id)
    trial_id = trial.trial_id
    data = load_dataset(trial.cfg.dataset)
    wanted = list(range(data.num_classes)) if classes is None else list(classes)
    bad = [c for c in wanted if not 0 <= c < data.num_classes]
    if bad:
        raise EnergyatError(f"--classes {bad} are not classes of {trial.cfg.dataset.name} (0..{data.num_classes - 1})")
    model = load_model(trial, data)
    gen = torch.Generator().manual_seed(seed)
    train_x = data.train_x.float() / 255
    x0, y = class_starts(train_x, data.train_y, classes=wanted, n=n, init=init, cfg=sgld_cfg, generator=gen)
    samples = sgld(model, x0, y, cfg=sgld_cfg, generator=gen)

    out = Path(directory).expanduser() / "samples"
    judge, judge_acc = load_or_train_judge(data, out / "judge.pt")
    keep = torch.isin(data.test_y, torch.tensor(wanted))
    real = data.test_x[keep].float() / 255
    scores = judge_scores(judge, samples, y, real)
    start_scores = judge_scores(judge, x0, y, real)
    if inception_weights is not None:
        if not Path(inception_weights).is_file():
            raise EnergyatError(f"--inception-weights {inception_weights} is not a file")
        scores |= inception_scores(samples, real, Path(inception_weights))

    stem = f"{trial_id}-{init}"
    png = sample_grid(
        samples.numpy(), y.numpy(), path=out / f"{stem}.png",
        title=f"{trial_id} ({trial.cfg.method}), SGLD {sgld_cfg.steps} steps from {init}: judge acc {scores['judge_acc']:.2f}",
    )
    record = {"trial_id": trial_id, "method": trial.cfg.method, "init": init, "seed": seed, "checkpoint": str(trial.best),
              "sgld": asdict(sgld_cfg), "scores": scores, "start_scores": start_scores, "judge_test_acc": judge_acc}
    npz = out / f"{stem}.npz"
    np.savez_compressed(npz, x0=x0.numpy(), samples=samples.numpy(), labels=y.numpy(), record=json.dumps(record))
    return {**record, "png": str(png), "npz": str(npz)}
