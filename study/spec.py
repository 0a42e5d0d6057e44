"""Spec files: YAML in, one parsed :class:`Study` out, before anything starts.

``load_spec(path, overrides)`` reads the YAML, applies ``--set key=value`` overrides (dotted
keys, YAML-typed values) and parses it once (:func:`parse_study`): the trial keys through
:func:`trainables.config.parse_trial`, the study keys, the search space and the objectives here.
Everything below the CLI takes the :class:`Study`; nothing reads the raw mapping again or
restates a default.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pyarrow.fs import FileType

from analysis.errors import EnergyatError, SpecError, StoreError, one_line
from analysis.stopping import StopRule, stop_rule_from_spec
from analysis.store import check_schema_version, is_uri, join, open_storage
from study.layout import journal_file
from study.loggers import check_loggers
from study.sampler import SamplerKeys, check_points, check_sampler
from study.scheduler_keys import SchedulerKeys, check_scheduler
from study.space import Dimension, parse_search
from trainables.config import TrialConfig, parse_trial, set_value, trial_spec

# What the searcher may optimise: validation numbers only. The test set's numbers (final_*,
# test_*) are reported, never searched on: a study that picked configurations by them would select
# on test, which is what the validation split exists to avoid.
OBJECTIVES = ("best_val_robust_acc", "best_val_clean_acc")
_TEST_NUMBERS = ("final_clean_acc", "final_pgd_acc", "final_autoattack_acc", "test_clean_acc", "test_robust_acc", "best_test_robust_acc")


@dataclass(frozen=True)
class StudyKeys:
    """The study-only keys of a spec (docs/design.md section 2); `energyat train` ignores them."""

    samples: int = 16  # Optuna trials
    search: dict[str, Any] = field(default_factory=dict)
    objective: str | list[str] = "best_val_robust_acc"
    early_stop: StopRule = field(default_factory=StopRule)  # the trials' stop rule (analysis.stopping)
    resources: dict[str, Any] = field(default_factory=lambda: {"cpu": 1, "gpu": 0})
    max_concurrent: int = 2
    storage: str = "./studies"
    max_failures: int = 3  # restarts of a failed trial from its last checkpoint (Ray Tune's FailureConfig)
    hang_timeout: float | None = None  # seconds without a finished epoch after which a trial is ended as hung
    sampler: SamplerKeys = field(default_factory=SamplerKeys)  # Optuna's sampler (study.sampler)
    points_to_evaluate: list[dict[str, Any]] = field(default_factory=list)  # the first trials' parameters
    loggers: dict[str, dict[str, str]] = field(default_factory=dict)  # experiment trackers (study.loggers)
    scheduler: SchedulerKeys = field(default_factory=SchedulerKeys)  # Ray Tune's scheduler (study.scheduler_keys)


def _check_study_keys(raw: Mapping[str, Any]) -> StudyKeys:
    kinds: dict[str, tuple[type, ...]] = {
        "samples": (int,), "search": (dict,), "objective": (str, list), "early_stop": (dict,),
        "resources": (dict,), "max_concurrent": (int,), "storage": (str,), "max_failures": (int,),
        "hang_timeout": (int, float, type(None)), "sampler": (dict,), "points_to_evaluate": (list,), "loggers": (list, dict),
        "scheduler": (dict, str),
    }
    values: dict[str, Any] = {}
    for key, types in kinds.items():
        if key in raw:
            value = raw[key]
            if isinstance(value, bool) or not isinstance(value, types):
                names = " or ".join(t.__name__ for t in types)
                raise SpecError(key, f"expected {names}, got {value!r}")
            values[key] = value
    for key in ("samples", "max_concurrent"):
        if key in values and values[key] < 1:
            raise SpecError(key, f"must be at least 1; got {values[key]!r}")
    if values.get("max_failures", 0) < 0:
        raise SpecError("max_failures", f"must be at least 0 (restarts of a failed trial); got {values['max_failures']!r}")
    timeout = values.get("hang_timeout")
    if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
        raise SpecError("hang_timeout", f"must be a positive number of seconds or null (off); got {timeout!r}")
    if "early_stop" in values:
        values["early_stop"] = stop_rule_from_spec(values["early_stop"])
    if "sampler" in values:
        values["sampler"] = check_sampler(values["sampler"])
    if "loggers" in values:
        values["loggers"] = check_loggers(values["loggers"])
    if "scheduler" in values:
        values["scheduler"] = check_scheduler(values["scheduler"])
    if "points_to_evaluate" in values:  # against the search space
        values["points_to_evaluate"] = check_points(values["points_to_evaluate"], parse_search(values.get("search", {}), raw), raw)
    if "resources" in values:
        values["resources"] = _check_resources(values["resources"])
    return StudyKeys(**values)


def check_placement(trial: TrialConfig, keys: StudyKeys) -> None:
    """For a study (Ray places its trials): `device: cuda` needs a GPU reserved per trial.
    `energyat train` places nothing, so a trial spec may say cuda without `resources`."""
    if trial.device == "cuda" and keys.resources.get("gpu", 0) == 0:
        raise SpecError(
            "resources.gpu", "is 0 with `device: cuda`: Ray gives such a trial no GPU; set resources.gpu (e.g. 1 or 0.25) or `device: auto`"
        )


# What one trial asks Ray for. A trial trains one model on one device, so at most one GPU; a
# fraction packs 1/gpu trials on a GPU and must divide it, or the last share sits idle.
RESOURCE_KEYS = ("cpu", "gpu")


def _check_resources(resources: Mapping[str, Any]) -> dict[str, float]:
    unknown = sorted(set(resources) - set(RESOURCE_KEYS))
    if unknown:
        raise SpecError(f"resources.{unknown[0]}", f"unknown key; a trial asks for {' and '.join(RESOURCE_KEYS)} (e.g. {{cpu: 2, gpu: 0.25}})")
    out: dict[str, float] = {}
    for key, default in (("cpu", 1.0), ("gpu", 0.0)):
        value = resources.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise SpecError(f"resources.{key}", f"expected a number, got {value!r}")
        out[key] = float(value)
    if out["cpu"] <= 0:
        raise SpecError("resources.cpu", f"must be positive (torch needs a thread); got {out['cpu']!r}")
    gpu = out["gpu"]
    if not 0 <= gpu <= 1:
        raise SpecError("resources.gpu", f"must be in [0, 1]: one trial trains on one GPU at most, a fraction packs several on one; got {gpu!r}")
    if 0 < gpu < 1 and abs(1 / gpu - round(1 / gpu)) > 1e-6:
        fits = int(1 / gpu)
        raise SpecError("resources.gpu", f"{gpu!r} of a GPU packs {fits} trials and leaves {1 - fits * gpu:.2g} idle; use 1/k, e.g. {1 / fits:.4g}")
    return out


def set_dotted(spec: dict[str, Any], assignment: str) -> None:
    """Apply one ``key=value`` override in place; the value is parsed as YAML."""
    if "=" not in assignment:
        raise EnergyatError(f"--set expects key=value (e.g. --set attack.eps=8/255), got {assignment!r}")
    key, text = assignment.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise EnergyatError(f"--set has an empty key in {assignment!r}")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as exc:
        raise EnergyatError(f"--set {key}: value {text!r} is not valid YAML ({exc.__class__.__name__})") from exc
    set_value(spec, key, value)


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise EnergyatError(f"spec file {path} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise EnergyatError(f"spec file {path} is not valid YAML{line}") from exc
    if not isinstance(data, dict):
        raise EnergyatError(f"spec file {path} must hold a mapping of keys, got {type(data).__name__}")
    return data


def objectives_of(objective: str | Sequence[str]) -> tuple[str, ...]:
    """The `objective:` key as the names of validation numbers to maximise (one, or several)."""
    names = [objective] if isinstance(objective, str) else list(objective)
    for name in names:
        if name in _TEST_NUMBERS:
            raise SpecError(
                "objective",
                f"{name!r} is a test-set number: searching on it selects configurations on test; "
                f"choose from {', '.join(OBJECTIVES)} (the validation split, dataset.val_size)",
            )
        if name not in OBJECTIVES:
            raise SpecError("objective", f"unknown objective {name!r}; choose from {', '.join(OBJECTIVES)}")
    return tuple(names)


@dataclass(frozen=True)
class Study:
    """A study spec, parsed once (:func:`parse_study`).

    `spec` is the mapping as written, overrides applied: ``spec.yaml`` keeps it, and each trial's
    configuration is it with the searcher's suggestions applied (:meth:`trial_config`). Every
    other field is typed and validated; defaults live in the dataclasses, nowhere else.
    """

    spec: Mapping[str, Any]
    trial: TrialConfig  # the base trial: `energyat train` runs it, a study's trials vary it
    keys: StudyKeys
    search: tuple[Dimension, ...]  # the method first
    objectives: tuple[str, ...]  # maximised, on the validation split

    @property
    def name(self) -> str:
        return self.trial.name

    def trial_config(self, params: Mapping[str, Any]) -> TrialConfig:
        """The configuration of one trial: the spec with `params` (flat dotted keys such as
        ``weat.power``, as the searcher suggests them) applied."""
        return parse_trial(trial_spec(self.spec, params))

    def renamed(self, name: str) -> Study:
        """The same study under another name (`energyat run --name`)."""
        return parse_study({**self.spec, "name": name})


def parse_study(spec: Mapping[str, Any]) -> Study:
    """Validate a whole spec: trial keys, study keys, search space, objectives."""
    trial = parse_trial(spec)
    keys = _check_study_keys(spec)
    return Study(spec=copy.deepcopy(dict(spec)), trial=trial, keys=keys, search=tuple(parse_search(keys.search, spec)),
                 objectives=objectives_of(keys.objective))


def load_spec(path: str | Path, overrides: Sequence[str] = ()) -> Study:
    """The spec file at `path` with `overrides` (``key=value``) applied, parsed."""
    raw = read_yaml(path)  # a new mapping per call: the overrides may change it in place
    for assignment in overrides:
        set_dotted(raw, assignment)
    return parse_study(raw)


@dataclass(frozen=True)
class LoadedStudy:
    """A study read back from its directory's ``spec.yaml`` (`resume`, `status`, `sample`)."""

    directory: str  # a resolved local path, or the study's URI
    study: Study
    study_name: str  # the Optuna study's name
    journal: Path  # the journal this machine writes (study.layout.journal_file)


def load_study(study_dir: str | Path) -> LoadedStudy:
    """A study's spec.yaml, read from a local directory or a URI, and parsed."""
    location = str(study_dir) if is_uri(study_dir) else str(Path(study_dir).expanduser().resolve())
    fs, root = open_storage(location)
    if fs.get_file_info(f"{root}/spec.yaml").type != FileType.File:
        raise EnergyatError(f"{study_dir} is not a study directory (no spec.yaml); `energyat run SPEC` creates one")
    with fs.open_input_stream(f"{root}/spec.yaml") as f:
        text = f.read()
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise StoreError(f"{join(location, 'spec.yaml')} is not valid YAML ({one_line(exc)}); restore it from a copy") from exc
    if not isinstance(document, dict) or not {"spec", "study_name"} <= set(document):
        raise StoreError(f"{join(location, 'spec.yaml')} is not an energyat study spec (no `spec` and `study_name` keys); restore it from a copy")
    check_schema_version(document.get("schema_version"), where=location)
    study_name = str(document["study_name"])
    return LoadedStudy(location, parse_study(document["spec"]), study_name, journal_file(location, study_name))
