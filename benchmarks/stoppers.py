"""Stopping rules side by side: no stopping, the energy stopper, ASHA, median stopping, patience.

    python benchmarks/stoppers.py [--spec examples/quickstart.yaml] [--samples 16] [--seed 0]
        [--out runs/stoppers] [--only none,energy,...] [--set key=value ...]

One study, run once per rule (:data:`RULES`) through ``study.runner.run_study`` on a local Ray.
The sampler is Optuna's RandomSampler with a fixed seed: its suggestions do not depend on the
results, so every rule trains the same configurations in the same order and the rules differ only
in when they stop a trial (under TPE, a rule would also change what is tried next, and the
comparison would mix two effects). Per rule it reports:

- trial-epochs (sum of `epochs_run`) and wall time;
- the best validation robust accuracy found, and the configuration it picks (the trial with the
  highest `best_val_robust_acc`: selection on validation, never on test);
- that pick's test robust accuracy (`final_pgd_acc`, PGD on the test set from its best epoch)
  as the rule left it, and as the same configuration reaches it run to the end (from the
  no-stopping study): what a user who retrains the pick gets;
- Spearman's rank correlation between the rule's `best_val_robust_acc` per configuration and
  the no-stopping run's: how well the rule preserves the full-run ranking.

Wall time is the machine's at the time (2 trials at once by default); trial-epochs are the
portable measure. Prints one JSON line per rule and a Markdown table; writes both to OUT.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from analysis.query import open_tables
from analysis.schema import config_column
from analysis.store import git_sha, versions
from study.runner import run_study
from study.spec import load_spec

# rule -> the spec keys that set it (on top of the study's, with early_stop and scheduler cleared)
RULES: dict[str, list[str]] = {
    "none": [],
    "energy": ["early_stop={energy_divergence: true, patience: 3}"],
    "asha": ["scheduler={name: asha, grace_period: 5, reduction_factor: 3}"],
    "asha_budget": ["scheduler={name: asha, grace_period: 15, reduction_factor: 2}"],  # about the energy stopper's budget
    "median": ["scheduler={name: median, grace_period: 5, min_samples_required: 3}"],
    "patience": ["early_stop={val_patience: 5}"],
}


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rho: Pearson's correlation of the ranks (ties share their mean rank)."""
    def ranks(values: list[float]) -> np.ndarray:
        x = np.asarray(values, dtype=float)
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x), dtype=float)
        for v in np.unique(x):
            r[x == v] = r[x == v].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return math.nan
    return float(np.corrcoef(ra, rb)[0, 1])


def trials_of(study_dir: str, keys: list[str]) -> dict[str, dict[str, Any]]:
    """The study's trials by configuration (the searched keys' values, as JSON)."""
    cols = [config_column(k) for k in keys]
    con = open_tables(study_dir)
    rows = con.execute(
        "select trial_id, status, stop_reason, epochs_run, best_val_robust_acc, final_pgd_acc, seconds, "
        + ", ".join(f'"{c}"' for c in cols) + " from trials order by trial_id"
    ).fetchall()
    out = {}
    for trial_id, status, reason, epochs_run, best, final, seconds, *config in rows:
        key = json.dumps({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in zip(keys, config, strict=True)}, sort_keys=True)
        out[key] = {"trial_id": trial_id, "status": status, "stop_reason": reason, "epochs_run": epochs_run,
                    "best_val": best, "final_pgd": final, "seconds": seconds}
    return out


def summarise(rule: str, found: dict[str, dict[str, Any]], full: dict[str, dict[str, Any]], wall: float) -> dict[str, Any]:
    pick_key = max(found, key=lambda k: (found[k]["best_val"] if math.isfinite(found[k]["best_val"]) else -1.0))
    common = sorted(set(found) & set(full))
    reasons: dict[str, int] = {}
    for t in found.values():
        reasons[str(t["stop_reason"])] = reasons.get(str(t["stop_reason"]), 0) + 1
    return {
        "rule": rule, "trials": len(found), "trial_epochs": int(sum(t["epochs_run"] for t in found.values())), "wall_s": round(wall, 1),
        "best_val_robust": found[pick_key]["best_val"], "pick": json.loads(pick_key),
        "pick_final_pgd": found[pick_key]["final_pgd"],
        "pick_final_pgd_full_run": full.get(pick_key, {}).get("final_pgd", math.nan),
        "spearman_vs_full": spearman([found[k]["best_val"] for k in common], [full[k]["best_val"] for k in common]),
        "stop_reasons": reasons,
    }


def table(results: list[dict[str, Any]]) -> str:
    base = next((r for r in results if r["rule"] == "none"), None)
    lines = [
        "| rule | trial-epochs | vs none | wall s | best val robust | pick's test PGD (as stopped) | pick's test PGD (run to the end) "
        "| Spearman vs none | stops |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        saved = f"{1 - r['trial_epochs'] / base['trial_epochs']:+.0%}".replace("+", "-", 1) if base else "-"
        if base and r is base:
            saved = "-"
        stops = ", ".join(f"{k} {v}" for k, v in sorted(r["stop_reasons"].items()))
        lines.append(
            f"| {r['rule']} | {r['trial_epochs']} | {saved} | {r['wall_s']:.0f} | {r['best_val_robust']:.4f} | {r['pick_final_pgd']:.4f} | "
            f"{r['pick_final_pgd_full_run']:.4f} | {r['spearman_vs_full']:.2f} | {stops} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--spec", default="examples/quickstart.yaml")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0, help="the RandomSampler's seed")
    parser.add_argument("--out", default="runs/stoppers")
    parser.add_argument("--only", default=",".join(RULES), help="comma-separated rules; `none` is always run first (the reference)")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    args = parser.parse_args()
    rules = ["none"] + [r for r in args.only.split(",") if r and r != "none"]
    unknown = [r for r in rules if r not in RULES]
    if unknown:
        parser.error(f"unknown rule {unknown[0]!r}; choose from {', '.join(RULES)}")
    out = Path(args.out).resolve()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    common = [f"samples={args.samples}", f"sampler={{name: random, seed: {args.seed}}}", "early_stop={}", "scheduler=none"]
    header = (f"# {time.strftime('%Y-%m-%d %H:%M')} {os.cpu_count()} CPUs, git {git_sha()[:12]}, spec {args.spec} "
              f"{' '.join([*common, *args.overrides])}, versions {versions()}")
    print(header, flush=True)
    results: list[dict[str, Any]] = []
    full: dict[str, dict[str, Any]] = {}
    for rule in rules:
        study = load_spec(args.spec, [*common, *RULES[rule], *args.overrides])
        searched = sorted(d.key for d in study.search)
        t0 = time.perf_counter()
        study_dir, failed = run_study(study, address=None, storage=str(out), name=f"{rule}-{stamp}")
        wall = time.perf_counter() - t0
        if failed:
            raise SystemExit(f"rule {rule}: trials failed: {failed}")
        found = trials_of(study_dir, searched)
        if rule == "none":
            full = found
        result = summarise(rule, found, full, wall) | {"study": study_dir}
        results.append(result)
        print(json.dumps(result), flush=True)
    text = table(results)
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"stoppers-{stamp}.md").write_text(header + "\n\n" + text + "\n")
    (out / f"stoppers-{stamp}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results))


if __name__ == "__main__":
    main()
