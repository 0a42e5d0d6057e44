"""Arms over seeds: how sure a comparison of methods can be.

A study that runs each configuration (an *arm*: a method and its settings) under several
seeds, as `sampler: {name: grid}` with `seed: {choices: [...]}` does, answers "is WEAT_adv
better than TRADES?" only with an interval. Per arm, the mean over seeds and a 95% Student t
interval; per pair of arms, the difference seed by seed (the same seed gives the same data
order and the same initial draw, so pairing removes what the arms share), its mean and interval,
and how many seeds a paired t-test would need to tell a difference of the measured size from
zero (power 0.8 at the 5% level).

Works on the `trials` table's rows (dicts); no torch, no Ray.

Example::

    rows = trials_rows("studies/paper_fashion_cpu")
    for arm in summarize(rows, metrics=FINAL_METRICS):
        print(arm["arm"], arm["final_pgd_acc"])            # Interval(mean, low, high, n)
    print(paired(rows, a="trades", b="sat", metric="final_pgd_acc"))
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from scipy import integrate, stats

from analysis.errors import EnergyatError
from analysis.schema import TRIAL_OUTCOME

FINAL_METRICS = ("final_clean_acc", "final_pgd_acc", "final_autoattack_acc")
SEED = "seed"
_NOT_CONFIG = frozenset(TRIAL_OUTCOME.names)  # the trials table's outcome columns; the rest are config
CONFIDENCE = 0.95
POWER = 0.8


@dataclass(frozen=True)
class Interval:
    """A mean over seeds with its two-sided 95% Student t interval (NaN bounds for one seed)."""

    mean: float
    low: float
    high: float
    n: int
    sd: float

    def __str__(self) -> str:
        if self.n < 2:
            return f"{self.mean:.4f} (1 seed)"
        return f"{self.mean:.4f} [{self.low:.4f}, {self.high:.4f}]"

    def percent(self, *, signed: bool = False) -> str:
        """In points, for tables: `71.23 [68.93, 73.54]`, the mean alone for one seed, `-` for none;
        `signed` writes the sign (a difference: `+2.47 [+1.71, +3.23]`)."""
        fmt = "+.2f" if signed else ".2f"
        if self.n == 0:
            return "-"
        if self.n < 2:
            return f"{100 * self.mean:{fmt}}"
        return f"{100 * self.mean:{fmt}} [{100 * self.low:{fmt}}, {100 * self.high:{fmt}}]"


def interval(values: Sequence[float | None]) -> Interval:
    """Mean and 95% t interval of `values` (NaNs, runs without the number, are left out)."""
    xs = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not xs:
        return Interval(math.nan, math.nan, math.nan, 0, math.nan)
    n = len(xs)
    mean = sum(xs) / n
    if n < 2:
        return Interval(mean, math.nan, math.nan, 1, math.nan)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1)) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, sd)


def paired_t_power(d: float, n: int) -> float:
    """Power of a two-sided paired t-test at the 5% level with n pairs, when the mean difference
    is d standard deviations: P(|T| > t_crit), T noncentral t with n - 1 degrees of freedom and
    noncentrality d sqrt(n).

    SciPy's noncentral t returns NaN in its far tails (``nct.cdf(-4.3, 2, 13.98)``), and a NaN
    power compares False with every target, so a number of seeds that suffices would be skipped.
    The tail on the other side of the effect is treated as 0 when it is not finite (it is below
    1e-12 wherever SciPy fails); the tail in the effect's direction, when not finite, is
    integrated over the chi-square of the sample variance: P(T > c) = E_V[P(Z > c sqrt(V/df) - nc)].
    """
    df = n - 1
    crit = float(stats.t.ppf(0.5 + CONFIDENCE / 2, df))
    nc = abs(d) * math.sqrt(n)
    toward = float(stats.nct.sf(crit, df, nc))
    if not math.isfinite(toward):
        toward = upper_tail_by_integration(crit, df, nc)
    away = float(stats.nct.cdf(-crit, df, nc))
    if not math.isfinite(away):
        away = 0.0
    return min(1.0, toward + away)


def upper_tail_by_integration(crit: float, df: int, nc: float) -> float:
    """P(T > crit) for T noncentral t (df, nc), as an integral over V ~ chi-square(df):
    T = (Z + nc) / sqrt(V / df), so P(T > c) = E_V[P(Z > c sqrt(V / df) - nc)]."""
    value, _ = integrate.quad(lambda v: stats.chi2.pdf(v, df) * stats.norm.sf(crit * math.sqrt(v / df) - nc), 0, math.inf)
    return float(value)


def seeds_needed(effect: float, sd: float, *, power: float = POWER, limit: int = 100_000) -> int | None:
    """Seeds a two-sided paired t-test at the 5% level needs to detect a mean difference
    `effect` with power `power`, when differences spread with standard deviation `sd`
    (the noncentral t, not the normal shortcut, which undercounts for few seeds:
    :func:`paired_t_power`). None when no number of seeds up to `limit` would (a zero effect)."""
    if not math.isfinite(effect) or not math.isfinite(sd) or effect == 0:
        return None
    if sd == 0:
        return 2
    d = abs(effect) / sd
    for n in range(2, limit + 1):
        if paired_t_power(d, n) >= power:
            return n
    return None


def sd_bounds(sd: float, n: int) -> tuple[float, float]:
    """The 95% interval of a standard deviation estimated from `n` values, from the chi-square
    of (n - 1) s^2 / sigma^2: three values give 0.52x to 6.3x the estimate. Seeds counted at
    the upper bound say how many a skeptic would plan for."""
    if n < 2 or not math.isfinite(sd):
        return math.nan, math.nan
    tail = (1 - CONFIDENCE) / 2
    return (sd * math.sqrt((n - 1) / float(stats.chi2.ppf(1 - tail, n - 1))),
            sd * math.sqrt((n - 1) / float(stats.chi2.ppf(tail, n - 1))))


def config_columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The configuration columns that differ between trials, the seed excluded."""
    keys = sorted({k for r in rows for k in r})
    varying = []
    for key in keys:
        if key == SEED or key in _NOT_CONFIG:
            continue
        if len({repr(r.get(key)) for r in rows}) > 1:
            varying.append(key)
    return varying


def arm_of(row: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> str:
    """How a trial's arm is named: its method, and each varying setting that varies among the
    trials of that method (`weat (weat_variant=nat)`; `sat`, whose weat_variant never varies)."""
    method = str(row.get("method"))
    same = [r for r in rows if str(r.get("method")) == method]
    extra = [f"{k}={row.get(k)}" for k in config_columns(same) if k != "method"]
    return f"{method} ({', '.join(extra)})" if extra else method


def arms(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """Trials by arm, arms in the order they first appear, each arm's trials by seed."""
    out: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        out.setdefault(arm_of(row, rows), []).append(row)
    for label, members in out.items():
        seeds = [m.get(SEED) for m in members]
        if len(set(seeds)) != len(seeds):
            raise EnergyatError(f"arm {label} has two trials with the same seed {seeds}: its configurations differ in a "
                                "column energyat does not know as configuration; compare them by hand")
        members.sort(key=lambda m: -1.0 if m.get(SEED) is None else float(m[SEED]))
    return out


def summarize(rows: Sequence[Mapping[str, Any]], *, metrics: Sequence[str] = FINAL_METRICS) -> list[dict[str, Any]]:
    """Per arm: `arm`, `seeds` and an :class:`Interval` per metric."""
    return [{"arm": label, "seeds": [m.get(SEED) for m in members], **{k: interval([m.get(k) for m in members]) for k in metrics}}
            for label, members in arms(rows).items()]


def paired(rows: Sequence[Mapping[str, Any]], *, a: str, b: str, metric: str) -> dict[str, Any]:
    """Arm `a` minus arm `b` on `metric`, seed by seed (seeds both arms ran, with the number).

    Returns `by_seed` ({seed: difference}), `difference` (an :class:`Interval`), `wins` (seeds
    where a > b), `seeds_needed` for the measured mean difference and spread, and
    `seeds_needed_sd_high` for the same difference at the upper 95% bound of the spread
    (:func:`sd_bounds`)."""
    by_arm = arms(rows)
    for label in (a, b):
        if label not in by_arm:
            raise EnergyatError(f"no arm {label!r} in these trials; arms: {', '.join(by_arm)}")

    def values(label: str) -> dict[Any, float]:
        return {m.get(SEED): float(m[metric]) for m in by_arm[label]
                if m.get(metric) is not None and not math.isnan(float(m[metric]))}

    va, vb = values(a), values(b)
    seeds = sorted(set(va) & set(vb), key=lambda s: -1 if s is None else s)
    diffs = {s: va[s] - vb[s] for s in seeds}
    spread = interval(list(diffs.values()))
    return {"a": a, "b": b, "metric": metric, "by_seed": diffs, "difference": spread,
            "wins": sum(d > 0 for d in diffs.values()), "seeds_needed": seeds_needed(spread.mean, spread.sd),
            "seeds_needed_sd_high": seeds_needed(spread.mean, sd_bounds(spread.sd, spread.n)[1])}
