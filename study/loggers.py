"""Experiment trackers through Ray Tune's own logger integrations: the `loggers:` study key.

    loggers: [tensorboard, mlflow, wandb]                        # defaults for each
    loggers: {mlflow: {tracking_uri: "file:/data/mlruns"}, wandb: {project: at, mode: offline}}

Every reported epoch reaches each tracker with the `epochs` table's column names
(`probe_train_dE`, `val_robust_acc`, ...; TensorBoard files them under `ray/tune/`), one run per
trial, its step the epoch + 1 (Tune's `training_iteration`).

- `tensorboard`: Ray Tune's TBXLoggerCallback, which Tune also adds by itself: event files in
  each trial's folder, `tensorboard --logdir STUDY_DIR/tune`.
- `mlflow`: MLflowLoggerCallback. `tracking_uri` defaults to an SQLite store in the study
  (`sqlite:///STUDY_DIR/mlflow.db`; for a study on object storage, `~/.energyat/mlflow.db` on the
  driver; MLflow 3 refuses its old file store), `experiment_name` to the study's name.
- `wandb`: WandbLoggerCallback. `project` defaults to the study's name; `mode: offline` writes
  runs under `dir` (default: the study directory, or `~/.energyat` for a study on object
  storage) for `wandb sync` later; other keys (`group`, `entity`) go to `wandb.init`.

MLflow and W&B are the `loggers` extra (`pip install 'energyat[loggers]'`); a study that names
one that is not installed is refused before Ray starts.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from analysis.errors import SpecError, unknown_choice
from analysis.store import is_uri
from study.layout import journal_dir

# logger -> the options a spec may give it (plain strings, passed on)
OPTIONS: dict[str, frozenset[str]] = {
    "tensorboard": frozenset(),
    "mlflow": frozenset({"tracking_uri", "experiment_name"}),
    "wandb": frozenset({"project", "group", "entity", "mode", "dir"}),
}
_PACKAGE = {"mlflow": "mlflow", "wandb": "wandb"}
_WANDB_MODES = ("online", "offline", "disabled")


def check_loggers(value: Any) -> dict[str, dict[str, str]]:
    """`loggers:` as {name: options}: known names, known options with string values, and the
    tracker's package installed."""
    if isinstance(value, list):
        if not all(isinstance(v, str) for v in value):
            raise SpecError("loggers", f"expected names such as [tensorboard, mlflow], got {value!r}")
        value = {name: {} for name in value}
    if not isinstance(value, Mapping):
        raise SpecError("loggers", f"expected a list of names or a mapping of name to options, got {value!r}")
    out: dict[str, dict[str, str]] = {}
    for name, options in value.items():
        if name not in OPTIONS:
            raise unknown_choice("loggers", name, OPTIONS)
        options = options or {}
        if not isinstance(options, Mapping):
            raise SpecError(f"loggers.{name}", f"expected a mapping of options, got {options!r}")
        for key, option in options.items():
            if key not in OPTIONS[name]:
                raise SpecError(f"loggers.{name}.{key}", f"unknown option; {name} takes {', '.join(sorted(OPTIONS[name])) or 'none'}")
            if not isinstance(option, str):
                raise SpecError(f"loggers.{name}.{key}", f"expected a string, got {option!r}")
        if name == "wandb" and options.get("mode", "online") not in _WANDB_MODES:
            raise unknown_choice(f"loggers.{name}.mode", options["mode"], _WANDB_MODES)
        package = _PACKAGE.get(name)
        if package is not None and importlib.util.find_spec(package) is None:
            raise SpecError(f"loggers.{name}", f"needs the `{package}` package: pip install 'energyat[loggers]'")
        out[name] = dict(options)
    return out


def _home(study_dir: str) -> Path:
    """Where a tracker's local files go: the study itself, or the driver's ~/.energyat for a
    study on object storage (the trackers write local files)."""
    return journal_dir().parent if is_uri(study_dir) else Path(study_dir)


def logger_callbacks(loggers: Mapping[str, Mapping[str, str]], *, study_dir: str, name: str) -> list[Any]:
    """Ray Tune's callbacks for `loggers` (see the module docstring for the defaults).

    Each integration is imported only when named: this module is also the spec's checker (no Ray
    there), and Ray's MLflow and W&B integrations import mlflow and wandb themselves (5 s)."""
    callbacks: list[Any] = []
    if "tensorboard" in loggers:
        from ray.tune.logger import TBXLoggerCallback

        callbacks.append(TBXLoggerCallback())
    if "mlflow" in loggers:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        options = loggers["mlflow"]
        callbacks.append(MLflowLoggerCallback(
            tracking_uri=options.get("tracking_uri") or f"sqlite:///{_home(study_dir) / 'mlflow.db'}",
            experiment_name=options.get("experiment_name") or name,
        ))
    if "wandb" in loggers:
        from ray.air.integrations.wandb import WandbLoggerCallback

        wandb: dict[str, Any] = dict(loggers["wandb"])  # what is not Ray's goes to wandb.init
        if wandb.get("mode") in ("offline", "disabled"):
            # Ray's callback asks for an API key unless WANDB_MODE (W&B's own variable) says
            # offline, so the driver, which runs this study only, takes the spec's mode
            os.environ["WANDB_MODE"] = wandb["mode"]
        callbacks.append(WandbLoggerCallback(project=wandb.pop("project", name), dir=wandb.pop("dir", str(_home(study_dir))), **wandb))
    return callbacks
