"""Ray Tune's schedulers for a study (`scheduler:`, checked without Ray by :mod:`study.scheduler_keys`).

Each is Tune's own class. ASHA and the median rule get one change (:class:`FinishOnStop`): a STOP
becomes a stop request the trial finishes on, with its final evaluation and `trials` row. PBT is
Tune's PopulationBasedTraining with its perturbations kept inside `search:` (:class:`KeepInSearch`).
:class:`AshaEnergy` is Tune's ASHA with the energy cut at its rungs.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ray import tune
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, MedianStoppingRule, PopulationBasedTraining, TrialScheduler

from analysis.errors import EnergyatError
from analysis.store import request_stop
from study.scheduler_keys import SchedulerKeys, perturbation_interval, ranked_metric
from study.space import Dimension


def domain(dim: Dimension) -> Any:
    """A search dimension as a Ray Tune domain (PBT's starting draws and its resamples)."""
    if dim.kind == "categorical":
        return tune.choice(list(dim.choices))
    if dim.kind == "int":
        return (tune.lograndint if dim.log else tune.randint)(int(dim.low), int(dim.high) + 1)
    return (tune.loguniform if dim.log else tune.uniform)(dim.low, dim.high)


@dataclass(frozen=True)
class KeepInSearch:
    """PBT's custom_explore_fn: a perturbed value (x1.2 of the top of a range) is brought back
    inside its `search:` range, where every value was checked to make a valid trial. A plain
    object, not a closure: Tune pickles the scheduler into its experiment state."""

    dims: tuple[Dimension, ...]

    def __call__(self, config: dict[str, Any]) -> dict[str, Any]:
        for dim in self.dims:
            value = config.get(dim.key)
            if dim.kind != "categorical" and isinstance(value, (int, float)):
                clipped = min(max(value, dim.low), dim.high)
                config[dim.key] = int(round(clipped)) if dim.kind == "int" else float(clipped)
        return config


class FinishOnStop:
    """Mixed into a Tune scheduler: its STOP becomes a stop request the trial finishes on.

    The trial reads the request after the epoch whose result the decision was about (Tune's
    function trainables report synchronously: the trial waits in ``tune.report`` until the driver
    has decided), so it stops at the same epoch Tune would have stopped it. The trial's later
    results (its final one) are not shown to the scheduler: it has already decided about it,
    and Tune's median rule asserts it never sees a stopped trial again.
    """

    reason: str  # the trial's stop_reason

    def __init__(self, *, study_dir: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)  # Tune's scheduler, next in the MRO
        self.study_dir = study_dir
        self.asked: set[str] = set()  # trials asked to stop: their later results are not shown

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        if trial.trial_id in self.asked:
            return TrialScheduler.CONTINUE
        decision = super().on_trial_result(tune_controller, trial, result)  # type: ignore[misc]
        if decision != TrialScheduler.STOP or result.get("done"):
            return decision
        return self._ask(trial.trial_id, self.reason)

    def _ask(self, trial_id: str, reason: str) -> str:
        """Ask the trial to finish after this epoch; Tune's own STOP if the request cannot be written."""
        try:
            request_stop(self.study_dir, trial_id, reason)
        except OSError as exc:  # the storage failed: Tune's own stop still ends the trial
            print(f"energyat: warning: cannot ask trial {trial_id} to stop ({exc}); Ray Tune ends it without its final "
                  "evaluation", file=sys.stderr, flush=True)
            return TrialScheduler.STOP
        self.asked.add(trial_id)
        return TrialScheduler.CONTINUE


class Asha(FinishOnStop, AsyncHyperBandScheduler):
    reason = "scheduler: asha"


def asha_rungs(*, grace_period: int, reduction_factor: float, max_t: int) -> tuple[float, ...]:
    """The epochs at which one-bracket ASHA judges a trial, ascending (Tune's ``_Bracket`` with s = 0:
    grace_period * reduction_factor**k for k below log(max_t / grace_period) / log(reduction_factor) + 1)."""
    count = int(math.log(max_t / grace_period) / math.log(reduction_factor) + 1)
    return tuple(grace_period * reduction_factor**k for k in range(count))


class AshaEnergy(Asha):
    """ASHA, and at each of its rungs the energy cut: a trial whose energy alarm was raised at an
    earlier epoch and whose running best validation robust accuracy (`best_val_robust_acc`, as
    its rows report it) has not risen since then stops there, whatever its rank.

    ASHA compares a trial with the others where it stands; the alarm says a trial's robustness is
    past its peak (phase 3), and a best that has not moved since shows it. The cut acts only at
    the rungs, where ASHA decides anyway, so it never stops a trial ASHA would have judged later
    in between. The state is two dicts keyed by trial id, pickled with Tune's experiment state.
    """

    energy_reason = "scheduler: asha_energy"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rungs = asha_rungs(grace_period=kwargs["grace_period"], reduction_factor=kwargs["reduction_factor"], max_t=kwargs["max_t"])
        self.alarmed: dict[str, tuple[float, float]] = {}  # trial -> (time of its alarm, best_val_robust_acc then)
        self.passed: dict[str, int] = {}  # trial -> rungs it has reached

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        tid, t = trial.trial_id, result.get(self._time_attr)
        if tid in self.asked or decision == TrialScheduler.STOP or result.get("done") or t is None:
            return decision
        best = result.get("best_val_robust_acc", math.nan)
        if result.get("alarm") and tid not in self.alarmed:
            self.alarmed[tid] = (t, best)
        reached = sum(t >= rung for rung in self.rungs)
        at_rung, self.passed[tid] = reached > self.passed.get(tid, 0), reached
        if at_rung and tid in self.alarmed:
            since, best_then = self.alarmed[tid]
            if since < t and not best > best_then:
                return self._ask(tid, self.energy_reason)
        return decision


class Median(FinishOnStop, MedianStoppingRule):
    reason = "scheduler: median"


def build_scheduler(keys: SchedulerKeys, *, study_dir: str, metric: str, epochs: int, dims: Sequence[Dimension] = (),
                    probe_every: int = 1) -> TrialScheduler:
    """Tune's scheduler for the study; FIFO (every trial runs to its end) for `none`."""
    common: dict[str, Any] = {"study_dir": study_dir, "time_attr": "training_iteration", "metric": metric, "mode": "max"}
    if keys.name == "none":
        return FIFOScheduler()
    if keys.name in ("asha", "asha_energy"):
        options = {"grace_period": 1, "reduction_factor": 4, **keys.options}
        return (Asha if keys.name == "asha" else AshaEnergy)(max_t=epochs, **common, **options)
    if keys.name == "median":
        # Tune's default grace period is 60 *seconds* of its default time_attr; in epochs, 1
        return Median(**{"grace_period": 1, **keys.options}, **common)
    if keys.name == "pbt":  # never stops a trial: it pauses and restarts it from another's checkpoint
        common.pop("study_dir")
        # ranked on the epoch's own validation value at the epoch it checkpoints: the model it clones
        common |= {"time_attr": "epoch", "metric": ranked_metric(metric)}
        options = {**keys.options, "perturbation_interval": perturbation_interval(keys, epochs=epochs, probe_every=probe_every)}
        return PopulationBasedTraining(**common, **options, hyperparam_mutations={d.key: domain(d) for d in dims},
                                       custom_explore_fn=KeepInSearch(tuple(dims)))
    raise EnergyatError(f"unknown scheduler {keys.name!r}")  # check_scheduler refused it already
