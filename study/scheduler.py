"""The study's Ray Tune scheduler: `scheduler:`.

    scheduler: {name: asha, grace_period: 5, reduction_factor: 3}   # Ray Tune's ASHA
    scheduler: {name: median, grace_period: 5}                      # Ray Tune's median stopping rule
    scheduler: none                                                 # every trial runs its epochs (default)

`name` is one of :data:`SCHEDULERS`, each Ray Tune's own class; the other keys are passed to its
constructor, those of :data:`OPTIONS` only. Time is counted in epochs (Tune's
`training_iteration`: one report per epoch) and the metric is the study's (first) objective, the
running best validation robust accuracy by default, which every epoch reports as a finite number.

Tune stops a trial by ending its worker: the trial would never evaluate its best checkpoint on
the test set nor write its final `trials` row, and Optuna would get its last epoch's value
without knowing why it ended. So each scheduler here is Tune's class with one change: a STOP
decision becomes a stop request (:func:`analysis.store.request_stop`) and the trial goes on to
read it after that epoch, then finishes as any stopped trial does: final evaluation, `trials`
row with `stop_reason` "scheduler: asha" (or "scheduler: median"), and its value to Optuna.
The energy stopper (`early_stop`) works beside any of them; whichever rule fires first names
the stop.

PBT is not offered: Ray Tune refuses a search algorithm alongside it ("Search algorithms cannot
be used with PopulationBasedTraining schedulers"), and an energyat study is an Optuna search.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Any, Mapping

from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, MedianStoppingRule, TrialScheduler

from analysis.errors import EnergyatError, SpecError, unknown_choice
from analysis.store import request_stop

SCHEDULERS = ("none", "asha", "median")
# The constructor arguments a spec may set, each with its type and lower bound. time_attr, metric,
# mode and max_t come from the study (epochs, objective); median's hard_stop stays True (False
# pauses trials, which then hold their checkpoint without an end).
OPTIONS: dict[str, dict[str, tuple[type, float]]] = {
    "none": {},
    "asha": {"grace_period": (int, 1), "reduction_factor": (float, 1.0001), "brackets": (int, 1)},
    "median": {"grace_period": (int, 0), "min_samples_required": (int, 1), "min_time_slice": (int, 0)},
}
REFUSED = {
    "pbt": "Ray Tune refuses a search algorithm beside PopulationBasedTraining, and an energyat study is an Optuna "
           "search; choose asha or median, or search with Optuna's samplers (`sampler:`)",
}


@dataclass(frozen=True)
class SchedulerKeys:
    name: str = "none"
    options: dict[str, Any] = field(default_factory=dict)


def check_scheduler(value: Any) -> SchedulerKeys:
    """The `scheduler:` block (or a bare name), validated before Ray starts."""
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, Mapping):
        raise SpecError("scheduler", f"expected a mapping such as {{name: asha, grace_period: 5}} or a name, got {value!r}")
    name = value.get("name", "none")
    if name is None:
        name = "none"
    if name in REFUSED:
        raise SpecError("scheduler.name", f"{name}: {REFUSED[name]}")
    if name not in SCHEDULERS:
        raise unknown_choice("scheduler.name", name, SCHEDULERS)
    takes = OPTIONS[name]
    options = {}
    for key, option in value.items():
        if key == "name":
            continue
        if key not in takes:
            raise SpecError(f"scheduler.{key}", f"not an option of scheduler {name} that a spec can set; choose from {', '.join(sorted(takes)) or 'none'}")
        kind, lowest = takes[key]
        number = isinstance(option, (int, float)) and not isinstance(option, bool) and (kind is float or isinstance(option, int))
        if not number or not math.isfinite(option) or option < lowest:
            noun = "an int" if kind is int else "a number"
            raise SpecError(f"scheduler.{key}", f"expected {noun} >= {lowest:g}, got {option!r}")
        options[key] = option
    return SchedulerKeys(name, options)


def check_scheduler_for(keys: SchedulerKeys, *, epochs: int) -> None:
    """Refuse a grace period no trial reaches: the scheduler would never act."""
    grace = keys.options.get("grace_period")
    if keys.name != "none" and grace is not None and grace >= epochs:
        raise SpecError("scheduler.grace_period", f"{grace} epochs is not below the trial's epochs ({epochs}): the scheduler would never stop a trial")


class FinishOnStop:
    """Mixed into a Tune scheduler: its STOP becomes a stop request the trial finishes on.

    The trial reads the request after the epoch whose result the decision was about (Tune's
    function trainables report synchronously: the trial waits in ``tune.report`` until the driver
    has decided), so it stops at the same epoch Tune would have stopped it. The trial's later
    results (its final one) are not shown to the scheduler: it has already decided about it,
    and Tune's median rule asserts it never sees a stopped trial again.
    """

    reason: str  # the trial's stop_reason
    study_dir: str

    def _asked(self) -> set[str]:
        if not hasattr(self, "_asked_ids"):  # not in __init__: Tune's own __init__ runs through super()
            self._asked_ids: set[str] = set()
        return self._asked_ids

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        if trial.trial_id in self._asked():
            return TrialScheduler.CONTINUE
        decision = super().on_trial_result(tune_controller, trial, result)  # type: ignore[misc]
        if decision != TrialScheduler.STOP or result.get("done"):
            return decision
        try:
            request_stop(self.study_dir, trial.trial_id, self.reason)
        except OSError as exc:  # the storage failed: Tune's own stop still ends the trial
            print(f"energyat: warning: cannot ask trial {trial.trial_id} to stop ({exc}); Ray Tune ends it without its final "
                  "evaluation", file=sys.stderr, flush=True)
            return decision
        self._asked().add(trial.trial_id)
        return TrialScheduler.CONTINUE


class Asha(FinishOnStop, AsyncHyperBandScheduler):
    reason = "scheduler: asha"

    def __init__(self, *, study_dir: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.study_dir = study_dir


class Median(FinishOnStop, MedianStoppingRule):
    reason = "scheduler: median"

    def __init__(self, *, study_dir: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.study_dir = study_dir


def build_scheduler(keys: SchedulerKeys, *, study_dir: str, metric: str, epochs: int) -> TrialScheduler:
    """Tune's scheduler for the study; FIFO (every trial runs to its end) for `none`."""
    common = {"study_dir": study_dir, "time_attr": "training_iteration", "metric": metric, "mode": "max"}
    if keys.name == "none":
        return FIFOScheduler()
    if keys.name == "asha":
        options = {"grace_period": 1, "reduction_factor": 4, **keys.options}
        return Asha(max_t=epochs, **common, **options)
    if keys.name == "median":
        # Tune's default grace period is 60 *seconds* of its default time_attr; in epochs, 1
        return Median(**{"grace_period": 1, **keys.options}, **common)
    raise EnergyatError(f"unknown scheduler {keys.name!r}")  # check_scheduler refused it already
