"""analysis.seeds: arms over seeds, their intervals, paired differences and the seeds a
difference needs, checked against textbook values and a direct simulation."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from scipy import stats

from analysis.errors import EnergyatError
from analysis.seeds import arm_of, arms, interval, paired, paired_t_power, sd_bounds, seeds_needed, summarize, upper_tail_by_integration


def _row(method: str, seed: int, pgd: float, **config: object) -> dict:
    return {"trial_id": f"{method}-{seed}-{config.get('weat_variant', '')}", "status": "TERMINATED", "method": method, "seed": seed,
            "weat_variant": "adv", "beta": 6.0, "final_pgd_acc": pgd, "final_clean_acc": 0.8, "seconds": 10.0 + seed, **config}


ROWS = [
    _row("sat", 0, 0.50), _row("sat", 1, 0.52), _row("sat", 2, 0.51),
    _row("trades", 0, 0.55), _row("trades", 1, 0.56), _row("trades", 2, 0.58),
    _row("weat", 0, 0.57), _row("weat", 1, 0.55), _row("weat", 2, 0.58),
    _row("weat", 0, 0.53, weat_variant="nat"), _row("weat", 1, 0.54, weat_variant="nat"), _row("weat", 2, 0.52, weat_variant="nat"),
]


def test_the_interval_is_students_t() -> None:
    # mean 2, sd 1, n 3: half width t(0.975, 2) / sqrt(3) = 4.302653 / 1.732051 = 2.484138
    got = interval([1.0, 2.0, 3.0])
    assert (got.mean, got.n, got.sd) == (2.0, 3, 1.0)
    assert got.low == pytest.approx(2 - 2.484138, abs=1e-6) and got.high == pytest.approx(2 + 2.484138, abs=1e-6)
    one = interval([0.4, math.nan])  # a run without the number is left out; one seed has no interval
    assert one.n == 1 and one.mean == 0.4 and math.isnan(one.low) and "1 seed" in str(one)


def test_seeds_needed_matches_the_noncentral_t_power() -> None:
    # textbook paired t-test sample sizes (power 0.8, two-sided 5%): effect size 1 -> 10, 0.5 -> 34
    assert seeds_needed(1.0, 1.0) == 10
    assert seeds_needed(-0.5, 1.0) == 34  # the sign of the difference does not matter
    assert seeds_needed(0.0, 1.0) is None
    # and the power it promises is what a simulation of that many seeds sees
    rng = random.Random(0)
    n = seeds_needed(0.02, 0.03)
    assert n is not None and n > 3
    hits = 0
    for _ in range(2000):
        diffs = [rng.gauss(0.02, 0.03) for _ in range(n)]
        iv = interval(diffs)
        hits += iv.low > 0 or iv.high < 0
    assert 0.77 < hits / 2000 < 0.9
    fewer = seeds_needed(0.02, 0.03, power=0.5)
    assert fewer is not None and fewer < n


def test_seeds_needed_where_scipys_noncentral_t_returns_nan() -> None:
    # docs/reproduction.md's TRADES - SAT AutoAttack difference: mean 0.024667, sd 0.0030551 over
    # 3 seeds. At n = 3 the power is 0.99993, but scipy's nct.cdf in the far lower tail (df 2,
    # noncentrality 13.98) is NaN, and a NaN power skipped n = 3
    assert seeds_needed(0.024667, 0.0030551) == 3
    assert paired_t_power(0.024667 / 0.0030551, 2) == pytest.approx(0.62968, abs=1e-4)
    assert paired_t_power(0.024667 / 0.0030551, 3) == pytest.approx(0.99993, abs=1e-5)


@pytest.mark.parametrize(("crit", "df", "nc"), [(2.0, 1, 0.5), (4.3, 2, 3.0), (2.26, 9, 3.16), (2.03, 33, 2.9), (4.3, 2, 13.98)])
def test_the_integrated_upper_tail_is_scipys_where_scipy_is_finite(crit: float, df: int, nc: float) -> None:
    # the fallback for a non-finite nct.sf, checked where nct.sf is finite
    assert upper_tail_by_integration(crit, df, nc) == pytest.approx(float(stats.nct.sf(crit, df, nc)), abs=1e-7)


@pytest.mark.parametrize(("d", "n"), [(8.074, 2), (8.074, 3), (2.0, 3), (1.0, 10), (0.5, 34), (12.0, 2)])
def test_the_power_matches_a_simulated_paired_t_test(d: float, n: int) -> None:
    # 40,000 simulated studies of n seeds, differences N(d, 1): the share a two-sided t-test at
    # the 5% level calls significant, within 4 binomial SEs of the computed power
    rng = np.random.default_rng(0)
    x = rng.normal(d, 1.0, size=(40_000, n))
    t = x.mean(1) / (x.std(1, ddof=1) / math.sqrt(n))
    simulated = float((np.abs(t) > stats.t.ppf(0.975, n - 1)).mean())
    power = paired_t_power(d, n)
    assert math.isfinite(power)
    assert abs(simulated - power) <= 4 * math.sqrt(max(power * (1 - power), 1e-4) / 40_000) + 1e-4, (simulated, power)


def test_the_spread_of_three_seeds_is_known_to_a_factor_of_twelve() -> None:
    low, high = sd_bounds(1.0, 3)
    assert (round(low, 2), round(high, 1)) == (0.52, 6.3)
    # the interval covers the true spread 95% of the time: simulated, 20,000 draws of 5 values
    rng = np.random.default_rng(0)
    sds = rng.normal(0.0, 2.0, size=(20_000, 5)).std(axis=1, ddof=1)
    covered = np.mean([lo <= 2.0 <= hi for lo, hi in (sd_bounds(float(s), 5) for s in sds)])
    assert covered == pytest.approx(0.95, abs=0.006)
    assert all(math.isnan(b) for b in sd_bounds(1.0, 1))


def test_arms_are_named_by_what_varies_within_a_method() -> None:
    assert arm_of(ROWS[0], ROWS) == "sat"  # sat's weat_variant never varies: not part of its name
    assert arm_of(ROWS[6], ROWS) == "weat (weat_variant=adv)" and arm_of(ROWS[9], ROWS) == "weat (weat_variant=nat)"
    grouped = arms(ROWS)
    assert list(grouped) == ["sat", "trades", "weat (weat_variant=adv)", "weat (weat_variant=nat)"]
    assert all([m["seed"] for m in members] == [0, 1, 2] for members in grouped.values())
    # outcome columns (seconds differ by seed here) never split an arm
    with pytest.raises(EnergyatError, match="same seed"):
        arms([*ROWS, _row("sat", 0, 0.49)])


def test_summary_and_paired_differences() -> None:
    by_arm = {s["arm"]: s for s in summarize(ROWS, metrics=("final_pgd_acc",))}
    assert by_arm["trades"]["final_pgd_acc"].mean == pytest.approx((0.55 + 0.56 + 0.58) / 3)
    assert by_arm["sat"]["seeds"] == [0, 1, 2]
    got = paired(ROWS, a="trades", b="sat", metric="final_pgd_acc")
    assert got["by_seed"] == pytest.approx({0: 0.05, 1: 0.04, 2: 0.07})
    assert got["wins"] == 3 and got["difference"].mean == pytest.approx(0.16 / 3)
    assert got["difference"].low > 0  # consistent across seeds: the interval excludes 0
    swapped = paired(ROWS, a="sat", b="trades", metric="final_pgd_acc")
    assert swapped["difference"].mean == pytest.approx(-got["difference"].mean) and swapped["wins"] == 0
    noisy = paired(ROWS, a="weat (weat_variant=adv)", b="trades", metric="final_pgd_acc")
    assert noisy["by_seed"] == pytest.approx({0: 0.02, 1: -0.01, 2: 0.0}) and noisy["wins"] == 1
    assert noisy["difference"].low < 0 < noisy["difference"].high and noisy["seeds_needed"] > 3
    # at the upper bound of the spread's interval more seeds are needed than at the estimate
    assert got["seeds_needed_sd_high"] == seeds_needed(got["difference"].mean, sd_bounds(got["difference"].sd, 3)[1])
    assert got["seeds_needed_sd_high"] > got["seeds_needed"]
    with pytest.raises(EnergyatError, match="no arm 'mart'"):
        paired(ROWS, a="mart", b="sat", metric="final_pgd_acc")
