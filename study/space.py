"""The search space: a spec's `search:` block as an Optuna define-by-run function.

Each entry names a spec key (dotted) and its range:

    search:
      method: [sat, trades, weat]          # anything but two numbers: a categorical choice
      beta: [1.0, 12.0, log]               # two numbers (+ "log"): a float range
      weat.power: [0.0, 2.0]
      attack.steps: [3, 10]                # two whole numbers: an integer range
      weat.normalize: {choices: [true, false]}   # explicit categorical

Parameters exist only for the methods that use them (docs/design.md section 5), as each
method's record names them (:attr:`trainables.methods.Method.spec_keys`): `beta` for trades, weat,
der and mart; `weat.*` for weat; `der.*` for der. A trial of `sat` therefore carries no `beta` in
Optuna, and TPE models each method's parameters separately.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from analysis.errors import SpecError
from trainables.config import parse_trial, trial_spec
from trainables.methods import METHODS


def _names(key: str, spec_key: str) -> bool:
    """Whether `spec_key` (a key, or a block with a trailing dot: "weat.") names `key`."""
    return key == spec_key or (spec_key.endswith(".") and key.startswith(spec_key))


@dataclass(frozen=True)
class Dimension:
    key: str
    kind: str  # "float" | "int" | "categorical"
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    choices: tuple[Any, ...] = ()

    def contains(self, value: Any) -> bool:
        """Whether `value` is one this dimension can suggest."""
        if self.kind == "categorical":
            return any(value == c and type(value) is type(c) for c in self.choices)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (self.kind == "int" and not isinstance(value, int)):
            return False
        return self.low <= value <= self.high

    def describe(self) -> str:
        if self.kind == "categorical":
            return f"choices {list(self.choices)}"
        return f"{self.kind} in [{self.low:g}, {self.high:g}]{' log' if self.log else ''}"

    def used_by(self, method: str) -> bool:
        """Whether a trial of `method` reads this key: a key some method claims (`Method.spec_keys`)
        is read by the methods that claim it only; any other key by every method."""
        if not any(_names(self.key, k) for m in METHODS.values() for k in m.spec_keys):
            return True
        claimed = METHODS[method].spec_keys if method in METHODS else ()
        return any(_names(self.key, k) for k in claimed)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def parse_dimension(key: str, value: Any) -> Dimension:
    where = f"search.{key}"
    if isinstance(value, Mapping):
        if set(value) != {"choices"} or not isinstance(value["choices"], list):
            raise SpecError(where, "a mapping must be {choices: [...]}")
        choices = tuple(value["choices"])
        if len(choices) < 1:
            raise SpecError(where, "needs at least one choice")
        return Dimension(key, "categorical", choices=choices)
    if not isinstance(value, list) or not value:
        raise SpecError(where, f"expected a list: [low, high], [low, high, log] or choices; got {value!r}")
    log = len(value) == 3 and value[2] == "log"
    bounds = value[:2] if log else value
    if len(bounds) == 2 and all(_is_number(v) for v in bounds):
        low, high = bounds
        if not low < high:
            raise SpecError(where, f"empty range: low {low!r} must be below high {high!r}")
        if log and low <= 0:
            raise SpecError(where, f"a log range needs a positive low bound; got {low!r}")
        kind = "int" if all(isinstance(v, int) for v in bounds) else "float"
        return Dimension(key, kind, float(low), float(high), log)
    if log:
        raise SpecError(where, f"a log range needs two numbers before `log`; got {value!r}")
    if len(set(map(repr, value))) != len(value):
        raise SpecError(where, f"repeated choices in {value!r}")
    return Dimension(key, "categorical", choices=tuple(value))


def parse_search(search: Mapping[str, Any], base: Mapping[str, Any]) -> list[Dimension]:
    """Validate a `search:` block against the spec it searches; the method comes first."""
    dims = [parse_dimension(str(k), v) for k, v in search.items()]
    dims.sort(key=lambda d: d.key != "method")
    # every value of every dimension must make a valid trial on its own
    for dim in dims:
        probes = dim.choices if dim.kind == "categorical" else (dim.low, dim.high)
        for value in probes:
            try:
                parse_trial(trial_spec(base, {dim.key: int(value) if dim.kind == "int" else value}))
            except SpecError as exc:
                raise SpecError(f"search.{dim.key}", f"value {value!r} is not valid: {exc}") from exc
    return dims


@dataclass(frozen=True)
class SearchSpace:
    """The Optuna define-by-run function: suggests only the parameters the method uses.

    A plain object rather than a closure, so the searcher (and with it this space) pickles
    into Ray Tune's experiment checkpoint and comes back on `energyat resume`.
    """

    dims: tuple[Dimension, ...]
    base_method: str

    def __call__(self, trial: Any) -> None:
        method = self.base_method
        for dim in self.dims:
            if dim.key != "method" and not dim.used_by(method):
                continue
            if dim.kind == "categorical":
                value = trial.suggest_categorical(dim.key, list(dim.choices))
            elif dim.kind == "int":
                value = trial.suggest_int(dim.key, int(dim.low), int(dim.high), log=dim.log)
            else:
                value = trial.suggest_float(dim.key, dim.low, dim.high, log=dim.log)
            if dim.key == "method":
                method = value
        return None
