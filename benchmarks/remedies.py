"""The remedies for robust overfitting, measured through the energy lens (docs/remedies.md).

    python benchmarks/remedies.py train [--storage runs/remedies] [--seeds 0 1 2] [--name remedies] [--set key=value ...]
    python benchmarks/remedies.py evaluate STUDY [--n 2500] [--autoattack-n 500]
    python benchmarks/remedies.py export STUDY [STUDY ...] [--to tests/data/remedies]
    python benchmarks/remedies.py report SOURCE [SOURCE ...] [--out DIR]

`train` runs one study on the stopping suite's recipe that robust-overfits (benchmarks/stoppers.py's
`single_drop`: Fashion-MNIST 14x14, 1,000 training images, cnn_fc, 100 epochs, lr dropped once at
40): the arms SAT, SAT+EMA, SAT+AWP, TRADES and TRADES+AWP (:data:`ARMS`), each under the given
training seeds, every trial to its last epoch, two at a time. All three seeds are many hours on two
cores; one seed (`--seeds 0 --name remedies_s0`) is about one 3-hour session. `energyat resume
STUDY` continues an interrupted one.

`evaluate` evaluates every finished trial's last epoch on the test set (`energyat eval --last`:
PGD-20 on the first `--n` images, the original AutoAttack on the first `--autoattack-n`); the
trial's own final evaluation already holds its best epoch's on the same images.

`export` keeps what `report` reads of each evaluated study, one JSON record per trial, small
enough to commit: a study trained one seed per session outlives the machine it ran on.

`report` writes, per arm, over studies and kept records together: the best and last epoch's
validation robust accuracy, test PGD and AutoAttack accuracy, the best-to-last gap (the size of
robust overfitting) with its 95% t interval over seeds, the online detector's alarms and the
offline onset, and one figure of the training probe's dE per arm (mean over seeds): remedies.md,
remedies.json, remedies-dE.png.
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


def overrides(seeds: Sequence[int] = SEEDS, *, name: str = "remedies") -> list[str]:
    """The suite's base study with the recipe, its study keys replaced by the arms x seeds, two
    trials at once (one core each; the suite's base runs one, for its live comparisons)."""
    points = [{**keys, "seed": seed} for keys in ARMS.values() for seed in seeds]
    search = {"method": ["sat", "trades"], "ema.decay": {"choices": sorted({k["ema.decay"] for k in ARMS.values()})},
              "awp.gamma": {"choices": sorted({k["awp.gamma"] for k in ARMS.values()})}, "seed": {"choices": list(seeds)}}
    return [*RECIPES[RECIPE], f"name={name}", "max_concurrent=2", "keep_best_checkpoints=false",
            "final_eval={n: 2500, pgd_steps: 20, autoattack_n: 500}",
            f"search={json.dumps(search)}", f"points_to_evaluate={json.dumps(points)}", "sampler={name: random}", f"samples={len(points)}"]


def arm_of(row: dict[str, Any]) -> str:
    keys = {"method": row["method"], "ema.decay": row["ema_decay"], "awp.gamma": row["awp_gamma"]}
    return next((name for name, arm in ARMS.items() if arm == keys), f"{row['method']} ema {row['ema_decay']} awp {row['awp_gamma']}")


def train(args: argparse.Namespace) -> None:
    from study.runner import run_study
    from study.spec import load_spec

    study = load_spec(str(SUITE), [*overrides(tuple(args.seeds), name=args.name), *args.overrides])
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


# What the report reads of a trial, and its type: one record per finished trial, from a study
# (records) or from the JSON lines `export` kept of one (load), so that a study trained one seed
# per session, on machines that do not outlive the session, is reported as one
RECORD: dict[str, type | tuple[type, ...]] = {"study": str, "trial_id": str, "arm": str, "seed": int, "best": dict, "last": dict,
                                              "n": dict, "alarm_epoch": (int, type(None)), "phase3_start": (int, type(None)), "dE": list}
MEASURES = {"val robust": ("best_val_robust_acc", "val_robust"), "test PGD-20": ("final_pgd_acc", "test_pgd"),
            "test AutoAttack": ("final_autoattack_acc", "test_autoattack")}


def records(study: str) -> list[dict[str, Any]]:
    """Per finished trial of `study`: its arm and seed, the best and the last epoch's numbers, how
    many images each used, the detector's alarm, the offline onset and the training probe's dE."""
    trials = finished(study)
    last = last_numbers(study)
    con = open_tables(study)
    try:
        curves = con.execute("select trial_id, epoch, probe_train_dE from epochs where probed order by epoch").fetchall()
    finally:
        con.close()
    out = []
    for t in trials:
        mine = last.get(t["trial_id"], {})
        n = {"val": t.get("dataset_val_size"), "pgd": t["final_n"], "autoattack": t["final_autoattack_n"],
             "last_pgd": mine.get("test_pgd_n"), "last_autoattack": mine.get("test_autoattack_n")}
        out.append({"study": Path(study).name, "trial_id": t["trial_id"], "arm": arm_of(t), "seed": t["seed"],
                    "best": {m: t[best] for m, (best, _) in MEASURES.items()},
                    "last": {m: mine.get(lst) for m, (_, lst) in MEASURES.items()}, "n": n,
                    "alarm_epoch": t["alarm_epoch"], "phase3_start": t["phase3_start"],
                    "dE": [[e, v] for tid, e, v in curves if tid == t["trial_id"] and v is not None and math.isfinite(v)]})
    return out


def _is_record(record: Any) -> bool:
    """The shape `records` gives, down to the numbers: what `report` does arithmetic on."""
    def number(x: Any) -> bool:
        return isinstance(x, int | float) and not isinstance(x, bool)

    if not isinstance(record, dict) or set(record) != set(RECORD) or not all(isinstance(record[k], t) for k, t in RECORD.items()):
        return False
    return (all(set(record[side]) == set(MEASURES) and all(v is None or number(v) for v in record[side].values()) for side in ("best", "last"))
            and all(v is None or isinstance(v, int) for v in record["n"].values())
            and all(isinstance(p, list) and len(p) == 2 and all(number(x) for x in p) for p in record["dE"]))


def load(source: str) -> list[dict[str, Any]]:
    """The records of a study directory, or of a `.jsonl` file `export` wrote (checked: it is read
    back from disk, not trusted)."""
    if not source.endswith(".jsonl"):
        return records(source)
    try:
        lines = Path(source).read_text().splitlines()
    except OSError as exc:
        raise EnergyatError(f"{source}: cannot read it ({exc.strerror})") from None
    out = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EnergyatError(f"{source}:{number}: not a JSON record ({exc.msg})") from None
        if not _is_record(record):
            raise EnergyatError(f"{source}:{number}: not a record `remedies.py export` writes (keys {', '.join(RECORD)})")
        out.append(record)
    return out


def export(args: argparse.Namespace) -> None:
    """Each study's records as `<to>/<study name>.jsonl`, once every trial's last epoch is evaluated."""
    to = Path(args.to)
    for study in args.studies:
        kept = records(study)
        if not kept:
            raise EnergyatError(f"{study} has no finished trial yet")
        unevaluated = [r["trial_id"] for r in kept if r["last"]["test PGD-20"] is None]
        if unevaluated:
            raise EnergyatError(f"{study}: the last epoch of {', '.join(unevaluated)} is not evaluated: "
                                f"`python benchmarks/remedies.py evaluate {study}` first")
        to.mkdir(parents=True, exist_ok=True)
        path = to / f"{Path(study).name}.jsonl"
        path.write_text("".join(json.dumps(r, default=float) + "\n" for r in kept))
        print(path)


def table(kept: Sequence[dict[str, Any]]) -> tuple[list[list[str]], list[dict[str, Any]]]:
    """Per arm (ARMS' order, then any other): the table's cells and the record of its numbers."""
    by_arm: dict[str, list[dict[str, Any]]] = {}
    for r in kept:
        by_arm.setdefault(r["arm"], []).append(r)
    rows, summary = [], []
    for arm in [a for a in ARMS if a in by_arm] + [a for a in by_arm if a not in ARMS]:
        members = sorted(by_arm[arm], key=lambda r: r["seed"])
        seeds = [r["seed"] for r in members]
        if len(set(seeds)) != len(seeds):
            raise EnergyatError(f"arm {arm} has seed {max(set(seeds), key=seeds.count)} twice ({', '.join(r['study'] for r in members)}): "
                                "report each seed from one study")
        cells = [arm, ", ".join(str(s) for s in seeds)]
        record: dict[str, Any] = {"arm": arm, "seeds": seeds, "trials": [r["trial_id"] for r in members]}
        for measure in MEASURES:
            pairs = [(r["best"][measure], r["last"][measure]) for r in members]
            best, lst = interval([b for b, _ in pairs]), interval([la for _, la in pairs])
            gap = interval([math.nan if b is None or la is None else b - la for b, la in pairs])
            cells += [f"{100 * x.mean:.2f}" if x.n else "-" for x in (best, lst)] + [gap.percent(signed=True) if gap.n else "-"]
            record[measure] = {"best": best.mean, "last": lst.mean, "gap": gap.mean, "gap_low": gap.low, "gap_high": gap.high, "n": gap.n}
        alarms, onsets = [r["alarm_epoch"] for r in members], [r["phase3_start"] for r in members]
        cells += [", ".join("-" if a is None else str(a) for a in alarms), ", ".join("-" if o is None else str(o) for o in onsets)]
        rows.append(cells)
        summary.append(record | {"alarm_epochs": alarms, "onsets": onsets})
    return rows, summary


def report(args: argparse.Namespace) -> None:
    kept = [r for source in args.sources for r in load(source)]
    if not kept:
        raise EnergyatError(f"{', '.join(args.sources)}: no finished trial yet")
    # a gap is best minus last on the same images: the last epoch must be evaluated as the best was
    for r in kept:
        n = r["n"]
        for best, last in (("pgd", "last_pgd"), ("autoattack", "last_autoattack")):
            if n[last] is not None and n[last] != n[best]:
                raise EnergyatError(f"trial {r['trial_id']} ({r['study']}): its last epoch's {best} used {n[last]} test images, its best "
                                    f"epoch's {n[best]}: evaluate again with the final evaluation's number")
    sizes = {k: sorted({r["n"][k] for r in kept}, key=str) for k in ("val", "pgd", "autoattack")}
    rows, summary = table(kept)
    curves = mean_curves(kept)
    summary = [record | {"dE": curves.get(record["arm"], {})} for record in summary]
    first = args.sources[0]
    out = Path(args.out or ("runs/remedies/report" if first.endswith(".jsonl") else Path(first) / "report"))
    out.mkdir(parents=True, exist_ok=True)
    head = ["arm", "seeds"] + [f"{m} {w}" for m in ("val robust", "PGD-20", "AA") for w in ("best", "last", "gap [95%]")] + ["alarm", "onset"]
    studies = sorted({r["study"] for r in kept})
    lines = [f"# Remedies on `{RECIPE}` ({', '.join(studies)})", "",
             "Accuracy in %, mean over seeds; gap = best epoch minus last epoch, per seed, with its 95% t interval. Test PGD-20 on the first "
             f"{'/'.join(map(str, sizes['pgd']))} test images, AutoAttack on the first {'/'.join(map(str, sizes['autoattack']))}; "
             f"validation on {'/'.join(map(str, sizes['val']))} held-out images. "
             "`alarm`: the online detector's first alarm epoch per seed; `onset`: the offline phase-3 start.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    (out / "remedies.md").write_text("\n".join(lines) + "\n")
    (out / "remedies.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    _figure(curves, out / "remedies-dE.png", title=", ".join(studies))
    print("\n".join(lines))
    print(f"\nremedies: {out / 'remedies.md'}, {out / 'remedies-dE.png'}")


def mean_curves(kept: Sequence[dict[str, Any]]) -> dict[str, dict[int, float]]:
    """Per arm, the training probe's dE at each probed epoch, mean over the arm's seeds."""
    series: dict[str, dict[int, list[float]]] = {}
    for r in kept:
        for epoch, de in r["dE"]:
            series.setdefault(r["arm"], {}).setdefault(int(epoch), []).append(float(de))
    return {arm: {e: sum(v) / len(v) for e, v in sorted(points.items())} for arm, points in series.items()}


def _figure(curves: dict[str, dict[int, float]], path: Path, *, title: str) -> None:
    """The training probe's dE per probed epoch, mean over each arm's seeds, one line per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4))
    for arm in sorted(curves, key=lambda a: list(ARMS).index(a) if a in ARMS else len(ARMS)):
        ax.plot(list(curves[arm]), list(curves[arm].values()), label=arm)
    ax.axhline(0.0, color="grey", lw=0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs
    ax.set_xlabel("epoch")
    ax.set_ylabel("training probe dE = E(x) - E(x*), mean over seeds")
    ax.set_title(f"{title}: delta energy per arm")
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
    p.add_argument("--name", default="remedies", help="the study's name (one per seed when each seed is its own session: remedies_s0)")
    p.add_argument("--set", action="append", default=[], dest="overrides")
    p = sub.add_parser("evaluate", help="evaluate every finished trial's last epoch on the test set")
    p.add_argument("study")
    p.add_argument("--n", type=int, default=2500)
    p.add_argument("--autoattack-n", type=int, default=500)
    p = sub.add_parser("export", help="keep each study's records (what report reads) as <to>/<study name>.jsonl")
    p.add_argument("studies", nargs="+")
    p.add_argument("--to", default="tests/data/remedies")
    p = sub.add_parser("report", help="the table and the dE figure, from studies and kept records together")
    p.add_argument("sources", nargs="+", help="study directories and .jsonl files export wrote")
    p.add_argument("--out", default=None, help="default: the first source's report/ when it is a study, else runs/remedies/report")
    args = parser.parse_args(argv)
    with bad_input_exits_2("remedies.py"):
        {"train": train, "evaluate": evaluate, "export": export, "report": report}[args.command](args)


if __name__ == "__main__":
    main()
