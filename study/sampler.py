"""The study's Optuna sampler and its first points: `sampler:` and `points_to_evaluate:`.

    sampler: {name: tpe, seed: 3, n_startup_trials: 5}   # any of Optuna's own samplers
    points_to_evaluate:                                   # the first trials, e.g. the paper's settings
      - {method: weat, beta: 6.0, weat.power: 1.0}
      - {method: trades, beta: 6.0}

`name` is one of :data:`SAMPLERS` (Optuna's TPESampler, RandomSampler, CmaEsSampler,
NSGAIISampler, GPSampler, QMCSampler, GridSampler). Without a name a study gets what ``optuna.create_study``
gives: TPE for one objective, NSGA-II for several. `seed` defaults to the spec's `seed`; the
other keys are passed to the sampler's constructor: those of :data:`OPTIONS`, the constructor
arguments that take a plain value (a number, a string or a bool). Callables and objects
(`gamma`, `constraints_func`, `mutation`, ...) are not settable from a spec file. Everything is
checked before Ray starts.

`grid` enumerates every combination of the searched choices, for studies that compare fixed
arms over seeds rather than search (examples/paper_fashion_cpu.yaml):

    sampler: {name: grid}
    search: {method: [sat, trades, weat], weat.variant: [adv, nat], seed: {choices: [0, 1, 2]}}

Every searched key must then be a list of choices. A combination whose method ignores a key
(`sat` with `weat.variant: nat`) repeats a configuration already run and is skipped as any
duplicate is (study.search.StudySearch), so `samples` counts the distinct configurations.

This module checks the block; :func:`study.search.build_sampler` builds the sampler when the
study starts. The checks run for `energyat train` too, where Optuna may not be installed.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from analysis.errors import SpecError, unknown_choice
from study.space import Dimension
from trainables.config import parse_trial, trial_spec

# spec name -> Optuna's class name
SAMPLERS = {"tpe": "TPESampler", "random": "RandomSampler", "cmaes": "CmaEsSampler", "nsga2": "NSGAIISampler", "gp": "GPSampler", "qmc": "QMCSampler",
            "grid": "GridSampler"}
SINGLE_OBJECTIVE_ONLY = frozenset({"cmaes"})  # CmaEsSampler refuses multi-objective studies
# The constructor arguments of each sampler that take plain values (Optuna 5's signatures default
# most of them to None, so the signature alone cannot tell them from callables)
OPTIONS: dict[str, frozenset[str]] = {
    "tpe": frozenset({"prior_weight", "consider_magic_clip", "consider_endpoints", "n_startup_trials", "n_ei_candidates",
                      "multivariate", "group", "warn_independent_sampling", "constant_liar"}),
    "random": frozenset(),
    "cmaes": frozenset({"sigma0", "n_startup_trials", "warn_independent_sampling", "consider_pruned_trials", "restart_strategy",
                        "popsize", "inc_popsize", "use_separable_cma", "with_margin", "lr_adapt"}),
    "nsga2": frozenset({"population_size", "mutation_prob", "crossover_prob", "swapping_prob"}),
    "gp": frozenset({"n_startup_trials", "deterministic_objective", "warn_independent_sampling"}),
    "qmc": frozenset({"qmc_type", "scramble", "warn_asynchronous_seeding", "warn_independent_sampling"}),
    "grid": frozenset(),  # its one argument, the grid, is the `search:` block
}
_PLAIN = (bool, int, float, str)


@dataclass(frozen=True)
class SamplerKeys:
    name: str | None = None  # None: Optuna's default for the number of objectives
    seed: int | None = None  # None: the spec's seed
    options: dict[str, Any] = field(default_factory=dict)

    def resolved(self, objectives: int) -> str:
        """The sampler's name for a study with `objectives` objectives (Optuna's defaults)."""
        return self.name or ("tpe" if objectives == 1 else "nsga2")


def _optuna_class(name: str) -> Any:
    """Optuna's sampler class for a spec name, to read its constructor's signature. Optuna is
    imported here, not with the module: the spec checks also run for `energyat train`, where
    Optuna may not be installed (a GPU machine without a package registry)."""
    import optuna

    return getattr(optuna.samplers, SAMPLERS[name])


def check_sampler(value: Any) -> SamplerKeys:
    """The `sampler:` block, validated: a known name, an int seed, options the sampler takes."""
    if not isinstance(value, Mapping):
        raise SpecError("sampler", f"expected a mapping such as {{name: tpe, seed: 0}}, got {value!r}")
    name = value.get("name")
    if name is not None and name not in SAMPLERS:
        raise unknown_choice("sampler.name", name, SAMPLERS)
    seed = value.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise SpecError("sampler.seed", f"expected an int, got {seed!r}")
    options = {k: v for k, v in value.items() if k not in ("name", "seed")}
    if options:
        if name is None:
            raise SpecError(f"sampler.{next(iter(options))}", "sampler options need the sampler's `name` (they differ between samplers)")
        takes = OPTIONS[name] & set(inspect.signature(_optuna_class(name)).parameters)
        for key, option in options.items():
            if key not in takes:
                raise SpecError(
                    f"sampler.{key}",
                    f"not an option of Optuna's {SAMPLERS[name]} that a spec can set; choose from {', '.join(sorted(takes)) or 'none'}",
                )
            if not isinstance(option, _PLAIN) or (isinstance(option, float) and not math.isfinite(option)):
                raise SpecError(f"sampler.{key}", f"expected a number, a string or true/false, got {option!r}")
    return SamplerKeys(name, seed, options)


def check_sampler_for(keys: SamplerKeys, *, objectives: int, dims: Sequence[Dimension], points: Sequence[Any] = ()) -> None:
    """Refuse a sampler that cannot optimise this many objectives, and a grid over ranges."""
    if objectives > 1 and keys.resolved(objectives) in SINGLE_OBJECTIVE_ONLY:
        raise SpecError("sampler.name", f"{keys.name} optimises one objective; this study has {objectives}: use nsga2, tpe, gp, qmc or random")
    if keys.name != "grid":
        return
    if not dims:
        raise SpecError("sampler.name", "grid enumerates the `search:` block's choices, and this study searches nothing")
    for dim in dims:
        if dim.kind != "categorical":
            raise SpecError(f"search.{dim.key}", f"a grid needs a list of choices for every searched key, not a {dim.describe()}; "
                                                 f"write the values to try, such as {{choices: [{dim.low:g}, {dim.high:g}]}}")
    if points:
        raise SpecError("points_to_evaluate", "a grid enumerates its points itself; drop points_to_evaluate or use another sampler")


def check_points(points: Any, dims: Sequence[Dimension], base: Mapping[str, Any]) -> list[dict[str, Any]]:
    """`points_to_evaluate`, validated against the search: each point names searched keys only,
    with values inside their ranges or choices, only keys its method uses, and makes a valid
    trial. Keys a point leaves out are drawn by the sampler."""
    if not isinstance(points, list) or not all(isinstance(p, Mapping) for p in points):
        raise SpecError("points_to_evaluate", f"expected a list of mappings such as [{{method: weat, beta: 6.0}}], got {points!r}")
    by_key = {d.key: d for d in dims}
    base_method = parse_trial(base).method
    out = []
    for i, point in enumerate(points):
        where = f"points_to_evaluate[{i}]"
        method = point.get("method", base_method)
        for key, value in point.items():
            dim = by_key.get(str(key))
            if dim is None:
                raise SpecError(f"{where}.{key}", f"is not searched; a point sets keys of `search` only ({', '.join(by_key) or 'none'})")
            if key != "method" and not dim.used_by(method):
                raise SpecError(f"{where}.{key}", f"is not used by method {method}, so it would be ignored; drop it from this point")
            if not dim.contains(value):
                raise SpecError(f"{where}.{key}", f"{value!r} is outside search.{key} ({dim.describe()})")
        try:
            parse_trial(trial_spec(base, {str(k): v for k, v in point.items()}))
        except SpecError as exc:
            raise SpecError(where, f"is not a valid trial: {exc}") from exc
        out.append(dict(point))
    return out
