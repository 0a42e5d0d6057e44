"""Studies: a Ray Tune Tuner over the trial adapter, searched by Optuna, stopped on divergence.

    STUDY_DIR = <storage>/<name>/
      spec.yaml         the spec as run (resolved), schema_version, study_name
      optuna.journal    Optuna JournalStorage (plain optuna and optuna-dashboard read it)
      tune/             the Ray Tune experiment: trial dirs named by trial id, checkpoints
      tables/           epochs, samples, trials (written by the trials themselves)
"""

from __future__ import annotations

import math
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Mapping

import yaml
from ray import tune

from analysis.errors import EnergyatError, SpecError
from analysis.phases import DETECTOR_COLUMNS, OnlineDetector
from analysis.schema import SCHEMA_VERSION
from study.space import SearchSpace, parse_search
from study.spec import StudyKeys

OBJECTIVES = ("best_test_robust_acc", "test_clean_acc", "final_clean_acc", "final_pgd_acc", "final_autoattack_acc")


def objectives_of(study: StudyKeys) -> list[str]:
    names = [study.objective] if isinstance(study.objective, str) else list(study.objective)
    for name in names:
        if name not in OBJECTIVES:
            raise SpecError("objective", f"unknown objective {name!r}; choose from {', '.join(OBJECTIVES)}")
    return names


def _journal(study_dir: Path) -> Any:
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(str(study_dir / "optuna.journal")))


class EnergyDivergenceStopper(tune.Stopper):
    """A ``ray.tune.Stopper`` with one :class:`OnlineDetector` per trial.

    It reads only the training-side columns of each reported epoch. After a driver restart,
    a trial's detector is rebuilt by replaying that trial's stored `epochs` rows before the
    reported one, so its state is the one it had (the rule is deterministic).
    """

    def __init__(self, study_dir: str, *, enabled: bool) -> None:
        self.study_dir = study_dir
        self.enabled = enabled
        self.detectors: dict[str, OnlineDetector] = {}

    def _detector(self, trial_id: str, epoch: int) -> OnlineDetector:
        if trial_id not in self.detectors:
            det = OnlineDetector()
            for row in _stored_epochs(self.study_dir, trial_id, before=epoch):
                det.update(row)
            self.detectors[trial_id] = det
        return self.detectors[trial_id]

    def __call__(self, trial_id: str, result: Mapping[str, Any]) -> bool:
        if not self.enabled or "epoch" not in result:
            return False
        det = self._detector(trial_id, int(result["epoch"]))
        if int(result["epoch"]) <= det.last_epoch:  # a re-run epoch after a restore: already seen
            return det.alarm_epoch is not None
        _phase, alarm = det.update({k: result.get(k) for k in DETECTOR_COLUMNS})
        return alarm

    def stop_all(self) -> bool:
        return False


def _stored_epochs(study_dir: str, trial_id: str, *, before: int) -> list[dict[str, Any]]:
    from analysis.query import open_tables

    try:
        con = open_tables(study_dir)
    except EnergyatError:
        return []
    columns = ", ".join(DETECTOR_COLUMNS)
    table = con.sql(
        f"select {columns} from epochs where trial_id = $t and epoch < $e order by epoch", params={"t": trial_id, "e": before}
    ).to_arrow_table()
    con.close()
    return table.to_pylist()


class Progress:
    """A ``ray.tune.Callback`` printing one line per reported epoch: trials done / running."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done: set[str] = set()
        self.running: set[str] = set()
        self.epochs = 0

    def line(self, trial_id: str, result: Mapping[str, Any]) -> str:
        acc = result.get("best_test_robust_acc")
        acc_text = f"{acc:.3f}" if isinstance(acc, float) and math.isfinite(acc) else "-"
        return (
            f"[{time.strftime('%H:%M:%S')}] trials {len(self.done)}/{self.total} done, {len(self.running)} running, "
            f"{self.epochs} epochs | {trial_id} epoch {result.get('epoch')} {result.get('method')} "
            f"best robust {acc_text} phase {result.get('phase')}{' ALARM' if result.get('alarm') else ''}"
        )


class ProgressCallback(tune.Callback):
    """Prints :class:`Progress` lines as Tune reports results."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self.progress.running.add(trial.trial_id)
        self.progress.epochs += 1
        print(self.progress.line(trial.trial_id, result), file=sys.stderr, flush=True)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.progress.running.discard(trial.trial_id)
        self.progress.done.add(trial.trial_id)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.progress.running.discard(trial.trial_id)
        self.progress.done.add(trial.trial_id)
        print(f"trial {trial.trial_id} failed: {trial.error_file}", file=sys.stderr, flush=True)


def _trial_id(trial: Any) -> str:
    """Trial directories and names are the trial id, the key of every table row."""
    return str(trial.trial_id)


def study_dir_for(storage: str, name: str) -> Path:
    if "://" in storage:
        raise EnergyatError(f"storage {storage!r}: remote storage URIs come with the reliability issue; use a local path")
    return Path(storage).expanduser().resolve() / name


def _init_ray(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        try:
            ray.init(address=address, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise EnergyatError(f"cannot join the Ray cluster at {address}: {' '.join(str(exc).split())[:200]}") from exc
    else:  # a local Ray; no dashboard (it would listen on a port), nothing bound beyond 127.0.0.1
        ray.init(include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")


def _tuner_parts(raw: dict[str, Any], study: StudyKeys, study_dir: Path, study_name: str) -> tuple[Any, Any, Any]:
    """(trainable with resources, tune_config, run_config) for a new or restored study."""
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    from trainables.tune_adapter import energyat_trial

    dims = tuple(parse_search(study.search, raw))
    objectives = objectives_of(study)
    base_method = str(raw.get("method", "sat"))
    cpus = float(study.resources.get("cpu", 1))
    gpus = float(study.resources.get("gpu", 0))
    trainable = tune.with_resources(
        tune.with_parameters(energyat_trial, base_spec=raw, study_dir=str(study_dir), objectives=objectives, cpus=max(1, int(cpus))),
        {"cpu": cpus, "gpu": gpus},
    )
    searcher = OptunaSearch(
        space=SearchSpace(dims, base_method),
        metric=objectives if len(objectives) > 1 else objectives[0],
        mode=["max"] * len(objectives) if len(objectives) > 1 else "max",
        storage=_journal(study_dir),
        study_name=study_name,
        seed=int(raw.get("seed", 0)),
    )
    tune_config = tune.TuneConfig(
        search_alg=ConcurrencyLimiter(searcher, max_concurrent=study.max_concurrent),
        num_samples=study.samples,
        trial_dirname_creator=_trial_id,
        trial_name_creator=_trial_id,
    )
    run_config = tune.RunConfig(
        name="tune",
        storage_path=str(study_dir),
        stop=EnergyDivergenceStopper(str(study_dir), enabled=bool(study.early_stop.get("energy_divergence", False))),
        failure_config=tune.FailureConfig(max_failures=3),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
        callbacks=[ProgressCallback(Progress(study.samples))],
        verbose=0,
    )
    return trainable, tune_config, run_config


def run_study(raw: dict[str, Any], study: StudyKeys, *, address: str | None, storage: str | None, name: str | None) -> Path:
    """Launch a study; returns its directory. Validation happens before Ray starts."""
    from trainables.config import parse_trial

    if name is not None:
        raw = {**raw, "name": name}
    cfg = parse_trial(raw)
    parse_search(study.search, raw)
    objectives_of(study)
    study_dir = study_dir_for(storage or study.storage, cfg.name)
    if (study_dir / "spec.yaml").exists():
        raise EnergyatError(f"{study_dir} already holds a study; continue it with `energyat resume {study_dir}` or choose another --name")
    study_name = f"{cfg.name}-{uuid.uuid4().hex[:8]}"
    study_dir.mkdir(parents=True, exist_ok=True)
    document = {"schema_version": SCHEMA_VERSION, "study_name": study_name, "spec": raw, "resolved": cfg.to_dict()}
    (study_dir / "spec.yaml").write_text(yaml.safe_dump(document, sort_keys=False))
    _init_ray(address)
    trainable, tune_config, run_config = _tuner_parts(raw, study, study_dir, study_name)
    tuner = tune.Tuner(trainable, tune_config=tune_config, run_config=run_config)
    tuner.fit()
    return study_dir


def load_study(study_dir: str | Path) -> tuple[Path, dict[str, Any], StudyKeys, str]:
    from study.spec import _check_study_keys

    path = Path(study_dir).expanduser().resolve()
    spec_file = path / "spec.yaml"
    if not spec_file.is_file():
        raise EnergyatError(f"{study_dir} is not a study directory (no spec.yaml); `energyat run SPEC` creates one")
    document = yaml.safe_load(spec_file.read_text())
    raw = document["spec"]
    return path, raw, _check_study_keys(raw), document["study_name"]


def resume_study(study_dir: str | Path, *, address: str | None) -> Path:
    """Continue an interrupted study: Tuner.restore with the same trainable and searcher."""
    path, raw, study, study_name = load_study(study_dir)
    tune_dir = path / "tune"
    _init_ray(address)
    if not tune.Tuner.can_restore(str(tune_dir)):
        raise EnergyatError(f"{study_dir} has no restorable Ray Tune experiment under tune/")
    trainable, _tune_config, _run_config = _tuner_parts(raw, study, path, study_name)
    tuner = tune.Tuner.restore(str(tune_dir), trainable=trainable, resume_unfinished=True, resume_errored=True)
    tuner.fit()
    return path
