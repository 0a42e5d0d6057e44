"""The Ray Tune trainable: a thin adapter from a Tune trial to :func:`run_trial`.

config (Optuna's suggestions) -> spec overrides -> :class:`TrialConfig` -> engine, reporting
every epoch with ``ray.tune.report(metrics, checkpoint=...)`` and resuming through
``ray.tune.get_checkpoint()``, like Ray's own ``train_cifar(config)`` example. This is the only
module of trainables/ that imports ray.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import ray
import ray.tune as tune

from trainables.config import parse_trial, trial_spec
from trainables.engine import run_trial

# Reported values the searcher may optimise: never NaN, or Optuna drops the trial's result.
OBJECTIVE_FALLBACK = 0.0


def _finite_metrics(row: Mapping[str, Any], objectives: list[str]) -> dict[str, Any]:
    metrics = {k: v for k, v in row.items() if isinstance(v, (int, float, str, bool)) or v is None}
    for name in objectives:
        value = metrics.get(name)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            metrics[name] = OBJECTIVE_FALLBACK
    return metrics


def energyat_trial(
    config: dict[str, Any], *, base_spec: dict[str, Any], study_dir: str, objectives: list[str], cpus: int, stop_patience: int | None
) -> None:
    """Run one trial of a study under Ray Tune (see ``tune.with_parameters``)."""
    spec = trial_spec(base_spec, config)  # Optuna's flat suggestions: {"weat.power": 1.5}
    if spec.get("threads") is None:
        spec["threads"] = max(1, cpus)  # one torch thread per reserved CPU: no oversubscription
    cfg = parse_trial(spec)
    trial_id = tune.get_context().get_trial_id()
    work = Path(tempfile.mkdtemp(prefix=f"energyat-{trial_id}-"))
    restored = tune.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as folder:
            shutil.copytree(folder, work, dirs_exist_ok=True)

    node_id = ray.get_runtime_context().get_node_id()  # which cluster node ran the trial

    def report(row: dict[str, Any], ckpt_dir: Path) -> None:
        metrics = _finite_metrics(row, objectives) | {"ray_node_id": node_id}
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(ckpt_dir)))
        return None

    try:
        run_trial(cfg, out=study_dir, trial_id=trial_id, checkpoint_dir=work, on_epoch=report, stop_patience=stop_patience)
    finally:
        shutil.rmtree(work, ignore_errors=True)
