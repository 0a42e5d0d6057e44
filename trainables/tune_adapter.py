"""The Ray Tune trainable: a thin adapter from a Tune trial to :func:`run_trial`.

config (Optuna's suggestions) -> spec overrides -> :class:`TrialConfig` -> engine, reporting
every epoch with ``ray.tune.report(metrics, checkpoint=...)`` and resuming through
``ray.tune.get_checkpoint()``, like Ray's own ``train_cifar(config)`` example. This is the only
module of trainables/ that imports ray.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import ray
import ray.tune as tune
import torch

from analysis.errors import EnergyatError
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


def ray_device(requested: str) -> torch.device:
    """The device Ray assigned to this trial: its GPU when it reserved one (`resources.gpu` > 0),
    the CPU when it reserved none, whatever torch can see.

    Ray 2.60 no longer hides the GPUs from an actor that asked for none, so `device: auto` read
    as "any visible GPU" would put every zero-GPU trial of a GPU node on cuda:0, which Ray does
    not count. For a trial with a GPU, Ray sets CUDA_VISIBLE_DEVICES to the one it assigned, so
    torch numbers it 0; where that variable is not set (RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES),
    the assigned id is the physical index.
    """
    gpu_ids = [str(g) for g in ray.get_runtime_context().get_accelerator_ids().get("GPU", [])]
    if not gpu_ids:
        if requested == "cuda":  # the study spec refuses this pairing; a direct caller may not
            raise EnergyatError("`device: cuda` but Ray assigned this trial no GPU; set resources.gpu")
        return torch.device("cpu")
    if requested == "cpu":
        return torch.device("cpu")
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    index = visible.index(gpu_ids[0]) if gpu_ids[0] in visible else (0 if visible else int(gpu_ids[0]))
    return torch.device("cuda", index)


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
        run_trial(cfg, out=study_dir, trial_id=trial_id, checkpoint_dir=work, on_epoch=report, stop_patience=stop_patience,
                  device=ray_device(cfg.device))
    finally:
        shutil.rmtree(work, ignore_errors=True)
