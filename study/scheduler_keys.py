"""The study's Ray Tune scheduler: `scheduler:`.

    scheduler: {name: asha, grace_period: 5, reduction_factor: 3}   # Ray Tune's ASHA
    scheduler: {name: asha_energy, grace_period: 5, reduction_factor: 3}  # ASHA, and at its rungs the energy cut
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

`asha_energy` is ASHA with one more cut at each of its rungs: a trial whose energy alarm is
raised (the online detector's phase 3) and whose running best validation robust accuracy has not
improved since the alarm stops there, whatever its rank ("scheduler: asha_energy"). ASHA judges a
trial by where it stands; the cut adds where it is going, which a rank at one rung cannot show.

    scheduler: {name: pbt, perturbation_interval: 5, quantile_fraction: 0.25, resample_probability: 0.25}

PBT (Ray Tune's PopulationBasedTraining) is a search of its own: Tune refuses a search algorithm
beside it, so a PBT study draws its `samples` starting configurations from `search:` at random
(Tune's BasicVariantGenerator, seeded by `seed`, `points_to_evaluate` first) and every
`perturbation_interval` epochs lets the bottom quantile of trials continue from a top trial's
checkpoint with perturbed hyperparameters (x0.8 or x1.2, or redrawn, kept inside `search:`). The
AT method cannot change under a running model, so `search.method` is refused with PBT, as are a
`sampler` (there is none) and several objectives. Each trial still ends with its final
evaluation and `trials` row, and is recorded in the study's Optuna journal with its final
configuration and value (:class:`study.callbacks.OptunaRecord`), so `status`, the report and
optuna-dashboard read a PBT study like any other. A trial that exploited another continues that
trial's epochs: its `epochs` rows jump to (or re-run from) the donor's epoch, as Tune's own
`training_iteration` does, and Tune's `pbt_policy_<trial>.txt` files in `tune/` record each step.
PBT ranks each trial on the objective's value at the epoch it checkpoints (`val_robust_acc` for
`best_val_robust_acc`: :func:`ranked_metric`), not on its running best, so the checkpoint a bottom
trial clones is the model that was ranked; those epochs (0-based multiples of the interval) must be
validated ones, so the interval is a multiple of `probe.every`.

This module reads and checks the keys (no Ray: `energyat train` reads spec files too); Ray Tune's
classes are built in :mod:`study.scheduler`, which imports Ray.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from analysis.errors import SpecError, unknown_choice
from study.sampler import SamplerKeys
from study.space import Dimension

SCHEDULERS = ("none", "asha", "asha_energy", "median", "pbt")
# The constructor arguments a spec may set, each with its type and lower bound. time_attr, metric,
# mode and max_t come from the study (epochs, objective); median's hard_stop stays True (False
# pauses trials, which then hold their checkpoint without an end).
OPTIONS: dict[str, dict[str, tuple[type, float]]] = {
    "none": {},
    "asha": {"grace_period": (int, 1), "reduction_factor": (float, 1.0001), "brackets": (int, 1)},
    "asha_energy": {"grace_period": (int, 1), "reduction_factor": (float, 1.0001)},  # one bracket: the rungs the energy cut uses
    "median": {"grace_period": (int, 0), "min_samples_required": (int, 1), "min_time_slice": (int, 0)},
    "pbt": {"perturbation_interval": (int, 1), "burn_in_period": (int, 0), "quantile_fraction": (float, 0.0),
            "resample_probability": (float, 0.0)},
}
# the schedulers that stop trials (by a stop request the trial reads: study.scheduler.FinishOnStop)
STOPPING = ("asha", "asha_energy", "median")
_FRACTIONS = {"quantile_fraction": 0.5, "resample_probability": 1.0}  # upper bounds of PBT's fractions


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
    if name not in SCHEDULERS:
        raise unknown_choice("scheduler.name", name, SCHEDULERS)
    takes = OPTIONS[name]
    options = {}
    for key, option in value.items():
        if key == "name":
            continue
        if key not in takes:
            raise SpecError(
                f"scheduler.{key}", f"not an option of scheduler {name} that a spec can set; choose from {', '.join(sorted(takes)) or 'none'}"
            )
        kind, lowest = takes[key]
        number = isinstance(option, (int, float)) and not isinstance(option, bool) and (kind is float or isinstance(option, int))
        if not number or not math.isfinite(option) or option < lowest:
            noun = "an int" if kind is int else "a number"
            raise SpecError(f"scheduler.{key}", f"expected {noun} >= {lowest:g}, got {option!r}")
        if key in _FRACTIONS and option > _FRACTIONS[key]:
            raise SpecError(f"scheduler.{key}", f"expected at most {_FRACTIONS[key]:g} (Ray Tune's bound), got {option!r}")
        options[key] = option
    return SchedulerKeys(name, options)


def perturbation_interval(keys: SchedulerKeys, *, epochs: int, probe_every: int = 1) -> int:
    """PBT's perturbation interval in epochs: `scheduler.perturbation_interval`, else the largest
    multiple of `probe_every` up to a fifth of the epochs (at least one). The trials checkpoint at the epochs (0-based)
    that are multiples of it, and PBT clones those checkpoints."""
    if "perturbation_interval" in keys.options:
        return int(keys.options["perturbation_interval"])
    return probe_every * max(1, epochs // (5 * probe_every))


def ranked_metric(objective: str) -> str:
    """What PBT ranks trials on: the objective's value at the epoch it checkpoints
    (`val_robust_acc` for `best_val_robust_acc`), not its running best, so that the checkpoint
    it clones is the model it ranked."""
    return "val_" + objective.removeprefix("best_val_")


def check_scheduler_for(keys: SchedulerKeys, *, epochs: int, base_method: str, dims: Sequence[Dimension] = (),
                        objectives: int = 1, sampler: Any = None, probe_every: int = 1) -> None:
    """Refuse what the scheduler cannot do with this study: a grace period or perturbation
    interval no trial reaches; for PBT, a searched method, a sampler, several objectives, a
    perturbation interval whose epochs are not validated (not a multiple of `probe.every`)."""
    for key in ("grace_period", "perturbation_interval"):
        value = keys.options.get(key)
        if value is not None and value >= epochs:
            raise SpecError(f"scheduler.{key}", f"{value} epochs is not below the trial's epochs ({epochs}): the scheduler would never act")
    if keys.name != "pbt":
        return
    if any(d.key == "method" for d in dims):
        raise SpecError("search.method", "PBT perturbs the hyperparameters of running trials, and a model cannot change its AT method "
                                         "mid-run: fix `method`, or search it with asha, median or none")
    if not dims:
        raise SpecError("search", "PBT perturbs searched hyperparameters: give `search` at least one (e.g. lr: [0.01, 0.2, log])")
    for dim in dims:
        if not dim.used_by(base_method):
            raise SpecError(f"search.{dim.key}", f"is not used by method {base_method}, so PBT would perturb nothing")
    if objectives > 1:
        raise SpecError("objective", "PBT ranks trials by one metric; give one objective")
    interval = perturbation_interval(keys, epochs=epochs, probe_every=probe_every)
    if interval % probe_every:
        raise SpecError("scheduler.perturbation_interval",
                        f"{interval} is not a multiple of probe.every ({probe_every}): PBT ranks each trial on the validation numbers "
                        f"of the epoch it checkpoints, and only probed epochs have them; choose {probe_every * max(1, interval // probe_every)}")
    if sampler is not None and sampler != SamplerKeys():
        raise SpecError(
            "sampler", "PBT draws its starting configurations at random (Ray Tune refuses a search algorithm beside it); remove `sampler`"
        )
