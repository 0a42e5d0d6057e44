"""The remedies for robust overfitting, measured through the energy lens (docs/remedies.md).

    python benchmarks/remedies.py train [--storage runs/remedies] [--set key=value ...]
    python benchmarks/remedies.py evaluate STUDY [--n 2500] [--autoattack-n 500]
    python benchmarks/remedies.py report STUDY [--out DIR]

`train` runs one study on the stopping suite's recipe that robust-overfits (benchmarks/stoppers.py's
`single_drop`: Fashion-MNIST 14x14, 1,000 training images, cnn_fc, 100 epochs, lr dropped once at
40): the arms SAT, SAT+EMA, SAT+AWP, TRADES and TRADES+AWP (:data:`ARMS`), each under 3 training
seeds, every trial to its last epoch. Hours on two cores; `energyat resume STUDY` continues it.

`evaluate` evaluates every finished trial's last epoch on the test set (`energyat eval --last`:
PGD-20 on the first `--n` images, the original AutoAttack on the first `--autoattack-n`); the
trial's own final evaluation already holds its best epoch's on the same images.

`report` writes, per arm, the best and last epoch's validation robust accuracy, test PGD and
AutoAttack accuracy, the best-to-last gap (the size of robust overfitting) with its 95% t
interval over seeds, the online detector's alarms and the offline onset, and one figure of the
training probe's dE per arm (mean over seeds): remedies.md, remedies.json, remedies-dE.png.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stoppers import RECIPES, SUITE, bad_input_exits_2, interruptible  # noqa: E402  (a sibling file: the suite's base study and recipes)

from analysis.errors import EnergyatError  # noqa: E402
from analysis.query import open_tables  # noqa: E402
from analysis.seeds import interval  # noqa: E402

RECIPE = "single_drop"
SEEDS = (0, 1, 2)
# arm -> the keys it sets; the reference's AWP gammas (csdongxian/AWP: 0.01 PGD-AT, 0.005 TRADES),
# and an average over about 50 steps (3 epochs of 16 batches)
ARMS: dict[str, dict[str, Any]] = {
    "SAT": {"method": "sat", "ema.decay": 0.0, "awp.gamma": 0.0},
    "SAT+EMA": {"method": "sat", "ema.decay": 0.98, "awp.gamma": 0.0},
    "SAT+AWP": {"method": "sat", "ema.decay": 0.0, "awp.gamma": 0.01},
    "TRADES": {"method": "trades", "ema.decay": 0.0, "awp.gamma": 0.0},
    "TRADES+AWP": {"method": "trades", "ema.decay": 0.0, "awp.gamma": 0.005},
}
ENERGYAT = [sys.executable, "-m", "study.cli"]


def overrides(seeds: Sequence[int] = SEEDS) -> list[str]:
    """The suite's base study with the recipe, its study keys replaced by the arms x seeds."""
    points = [{**keys, "seed": seed} for keys in ARMS.values() for seed in seeds]
    search = {"method": ["sat", "trades"], "ema.decay": {"choices": sorted({k["ema.decay"] for k in ARMS.values()})},
              "awp.gamma": {"choices": sorted({k["awp.gamma"] for k in ARMS.values()})}, "seed": {"choices": list(seeds)}}
    return [*RECIPES[RECIPE], "name=remedies", "keep_best_checkpoints=false", "final_eval={n: 2500, pgd_steps: 20, autoattack_n: 500}",
            f"search={json.dumps(search)}", f"points_to_evaluate={json.dumps(points)}", "sampler={name: random}", f"samples={len(points)}"]


def arm_of(row: dict[str, Any]) -> str:
    keys = {"method": row["method"], "ema.decay": row["ema_decay"], "awp.gamma": row["awp_gamma"]}
    return next((name for name, arm in ARMS.items() if arm == keys), f"{row['method']} ema {row['ema_decay']} awp {row['awp_gamma']}")


def train(args: argparse.Namespace) -> None:
    from study.runner import run_study
    from study.spec import load_spec

    study = load_spec(str(SUITE), [*overrides(tuple(args.seeds)), *args.overrides])
    with interruptible("remedies.py"):
        study_dir, failed = run_study(study, address=None, storage=args.storage, name=None)
    print(study_dir)
    if failed:
        raise SystemExit(f"trials failed: {failed}; `energyat resume {study_dir}` retries what can be retried")


def finished(study: str) -> list[dict[str, Any]]:
    con = open_tables(study)
    try:
        cur = con.execute("select * from trials where status = 'TERMINATED' order by trial_id")
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
    finally:
        con.close()


def evaluate(args: argparse.Namespace) -> None:
    trials = finished(args.study)
    if not trials:
        raise EnergyatError(f"{args.study} has no finished trial yet")
    for t in trials:
        for attack, n in (("clean,pgd", args.n), ("autoattack", args.autoattack_n)):
            if n:
                subprocess.run([*ENERGYAT, "eval", args.study, "--trial", t["trial_id"], "--last", "--attacks", attack, "--n", str(n),
                                "--pgd-steps", "20"], check=True)


def last_numbers(study: str) -> dict[str, dict[str, float]]:
    """Per trial, the last epoch's validation robust accuracy and its test evaluations (`--last`)."""
    con = open_tables(study)
    try:
        val = dict(con.execute("select trial_id, arg_max(val_robust_acc, epoch) from epochs where probed group by trial_id").fetchall())
        evals = con.execute("select trial_id, attack, accuracy, n from evals where checkpoint like '%last.pt' and evaluated_by = 'energyat eval'"
                            ).fetchall()
    finally:
        con.close()
    out: dict[str, dict[str, float]] = {t: {"val_robust": v} for t, v in val.items()}
    for trial, attack, accuracy, n in evals:
        out.setdefault(trial, {})[f"test_{attack}"] = accuracy
        out[trial][f"test_{attack}_n"] = n
    return out


def report(args: argparse.Namespace) -> None:
    trials = finished(args.study)
    if not trials:
        raise EnergyatError(f"{args.study} has no finished trial yet")
    last = last_numbers(args.study)
    out = Path(args.out or Path(args.study) / "report")
    out.mkdir(parents=True, exist_ok=True)
    by_arm: dict[str, list[dict[str, Any]]] = {}
    for t in trials:
        by_arm.setdefault(arm_of(t), []).append(t)
    rows, records = [], []
    for arm in [a for a in ARMS if a in by_arm] + [a for a in by_arm if a not in ARMS]:
        members = sorted(by_arm[arm], key=lambda t: t["seed"])
        pairs = {
            "val robust": [(t["best_val_robust_acc"], last.get(t["trial_id"], {}).get("val_robust", math.nan)) for t in members],
            "test PGD-20": [(t["final_pgd_acc"], last.get(t["trial_id"], {}).get("test_pgd", math.nan)) for t in members],
            "test AutoAttack": [(t["final_autoattack_acc"], last.get(t["trial_id"], {}).get("test_autoattack", math.nan)) for t in members],
        }
        cells = [arm, ", ".join(str(t["seed"]) for t in members)]
        record: dict[str, Any] = {"arm": arm, "seeds": [t["seed"] for t in members], "trials": [t["trial_id"] for t in members]}
        for name, values in pairs.items():
            best, lst = interval([b for b, _ in values]), interval([la for _, la in values])
            gap = interval([b - la for b, la in values])
            cells += [f"{100 * best.mean:.2f}", f"{100 * lst.mean:.2f}" if lst.n else "-", gap.percent(signed=True)]
            record[name] = {"best": best.mean, "last": lst.mean, "gap": gap.mean, "gap_low": gap.low, "gap_high": gap.high, "n": gap.n}
        alarms = [t["alarm_epoch"] for t in members]
        onsets = [t["phase3_start"] for t in members]
        cells += [", ".join("-" if a is None else str(a) for a in alarms), ", ".join("-" if o is None else str(o) for o in onsets)]
        record |= {"alarm_epochs": alarms, "onsets": onsets}
        rows.append(cells)
        records.append(record)
    head = ["arm", "seeds"] + [f"{m} {w}" for m in ("val robust", "PGD-20", "AA") for w in ("best", "last", "gap [95%]")] + ["alarm", "onset"]
    n_pgd = trials[0]["final_n"]
    n_aa = trials[0]["final_autoattack_n"]
    lines = [f"# Remedies on `{RECIPE}` ({Path(args.study).name})", "",
             f"Accuracy in %, mean over seeds; gap = best epoch minus last epoch, per seed, with its 95% t interval. Test PGD-20 on the first "
             f"{n_pgd} test images, AutoAttack on the first {n_aa}; validation on {trials[0].get('dataset_val_size', '?')} held-out images. "
             "`alarm`: the online detector's first alarm epoch per seed; `onset`: the offline phase-3 start.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    (out / "remedies.md").write_text("\n".join(lines) + "\n")
    (out / "remedies.json").write_text(json.dumps(records, indent=1, default=str) + "\n")
    _figure(args.study, by_arm, out / "remedies-dE.png")
    print("\n".join(lines))
    print(f"\nremedies: {out / 'remedies.md'}, {out / 'remedies-dE.png'}")


def _figure(study: str, by_arm: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """The training probe's dE per probed epoch, mean over each arm's seeds, one line per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    con = open_tables(study)
    try:
        curves = con.execute("select trial_id, epoch, probe_train_dE from epochs where probed order by epoch").fetchall()
    finally:
        con.close()
    arm_by_trial = {t["trial_id"]: arm for arm, ts in by_arm.items() for t in ts}
    series: dict[str, dict[int, list[float]]] = {}
    for trial, epoch, de in curves:
        if trial in arm_by_trial and de is not None and math.isfinite(de):
            series.setdefault(arm_by_trial[trial], {}).setdefault(epoch, []).append(de)
    fig, ax = plt.subplots(figsize=(7, 4))
    for arm in sorted(series, key=lambda a: list(ARMS).index(a) if a in ARMS else len(ARMS)):
        points = series[arm]
        epochs = sorted(points)
        ax.plot(epochs, [sum(points[e]) / len(points[e]) for e in epochs], label=arm)
    ax.axhline(0.0, color="grey", lw=0.5)
    ax.set_xlabel("epoch")
    ax.set_ylabel("training probe dE = E(x) - E(x*), mean over seeds")
    ax.set_title(f"{Path(study).name}: delta energy per arm")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="run the remedies study")
    p.add_argument("--storage", default="runs/remedies")
    p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS), help="training seeds per arm (default 0 1 2)")
    p.add_argument("--set", action="append", default=[], dest="overrides")
    p = sub.add_parser("evaluate", help="evaluate every finished trial's last epoch on the test set")
    p.add_argument("study")
    p.add_argument("--n", type=int, default=2500)
    p.add_argument("--autoattack-n", type=int, default=500)
    p = sub.add_parser("report", help="the table and the dE figure")
    p.add_argument("study")
    p.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    with bad_input_exits_2("remedies.py"):
        {"train": train, "evaluate": evaluate, "report": report}[args.command](args)


if __name__ == "__main__":
    main()
