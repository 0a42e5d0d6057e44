"""The paper's comparison, reproduced with energyat's own commands: `make reproduce`.

    python examples/reproduce.py [--storage DIR] [--spec FILE] [--set KEY=VALUE ...]
    python examples/reproduce.py --study DIR      # the tables of a study already run

1. `energyat run examples/paper_fashion_cpu.yaml`: 5 arms (standard, sat, trades, WEAT_adv,
   WEAT_nat) x 3 seeds on Fashion-MNIST (a previous study of the same name is moved aside);
2. `energyat sample DIR --trial ...`: SGLD samples from every trial, scored by the judge;
3. `energyat report DIR`;
4. DIR/report/reproduction.md: per arm, mean and 95% interval over seeds of clean, PGD and
   AutoAttack accuracy beside the paper's CIFAR-10 numbers; the paired comparisons per seed with
   the seeds a paired t-test would need; the energy view of each arm; findings 1, 2, 3 and 5,
   each with the `energyat` command that shows it. docs/reproduction.md discusses one such run.

Everything it shows is read back from the study's tables and files, through `energyat query`'s
own views (analysis.query.open_tables); the commands are run as a user would, in subprocesses.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script from a checkout: analysis/ is beside examples/

from analysis.errors import EnergyatError  # noqa: E402
from analysis.query import open_tables  # noqa: E402
from analysis.seeds import FINAL_METRICS, Interval, arms, paired, seeds_needed, summarize  # noqa: E402
from study.spec import load_spec  # noqa: E402

SPEC = REPO / "examples" / "paper_fashion_cpu.yaml"
ENERGYAT = [sys.executable, "-m", "study.cli"]
# The paper's CIFAR-10 robust accuracy (ResNet-18, PGD-20 / AutoAttack, %), by our arm names
PAPER = {"sat": (49.03, 45.37), "trades": (52.65, 49.46), "weat (weat_variant=adv)": (53.35, 49.75),
         "weat (weat_variant=nat)": (52.43, 49.02)}
NAMES = {"standard": "standard", "sat": "SAT", "trades": "TRADES", "weat (weat_variant=adv)": "WEAT_adv",
         "weat (weat_variant=nat)": "WEAT_nat"}
PAPER_COLUMN = {"final_pgd_acc": 0, "final_autoattack_acc": 1}
PAIRS = (("weat (weat_variant=adv)", "trades"), ("trades", "sat"), ("weat (weat_variant=nat)", "trades"))

# The one query behind each finding (docs/reproduction.md shows them with the study's path)
QUERIES = {
    "finding1": (
        "select t.seed, e.epoch, e.probe_train_E as E, e.probe_train_E_adv as E_untargeted, e.probe_train_E_tgt as E_targeted "
        "from epochs e join trials t using (trial_id) where t.method = 'standard' and e.epoch = t.epochs_run - 1 order by t.seed"
    ),
    "finding23": (
        "select t.method, t.weat_variant, e.epoch, round(e.lr, 4) as lr, round(avg(e.probe_train_dE), 3) as dE, "
        "round(min(e.probe_train_dE), 3) as dE_min, round(max(e.probe_train_dE), 3) as dE_max "
        "from epochs e join trials t using (trial_id) where e.probed and t.method in ('sat', 'trades', 'weat') "
        "group by all order by t.method, t.weat_variant, e.epoch"
    ),
}


def energyat(*args: str) -> None:
    """One energyat command, as a user types it (its output goes to this terminal)."""
    shown = " ".join(["energyat", *args])
    print(f"\n$ {shown}", flush=True)
    subprocess.run([*ENERGYAT, *args], check=True, cwd=REPO)


def run_study(storage: Path, spec: Path, overrides: Sequence[str]) -> Path:
    # the spec and overrides checked as `energyat run` checks them, before anything is moved:
    # the study's folder is named by the validated name (a safe name, never `..`)
    cfg = load_spec(spec, overrides).trial
    study = storage / cfg.name
    if study.exists():  # a new run starts afresh, as `make demo` does
        aside = study.with_name(f"{study.name}.{time.strftime('%Y%m%d-%H%M%S')}")
        study.rename(aside)
        print(f"previous study moved to {aside}")
    args = ["run", str(spec), "--storage", str(storage)]
    for item in overrides:
        args += ["--set", item]
    energyat(*args)
    return study


def query(study: Path, sql: str) -> list[dict[str, Any]]:
    con = open_tables(study)
    try:
        cur = con.execute(sql)
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
    finally:
        con.close()


def trial_rows(study: Path) -> list[dict[str, Any]]:
    return query(study, "select * from trials where status = 'TERMINATED' order by trial_id")


def judge_scores(study: Path) -> dict[str, float]:
    """Each trial's judge accuracy on its SGLD samples (PCA start), from `energyat sample`'s records."""
    out = {}
    for npz in sorted((study / "samples").glob("*-pca.npz")):
        with np.load(npz) as archive:
            record = json.loads(str(archive["record"]))
        out[record["trial_id"]] = float(record["scores"]["judge_acc"])
    return out


def pct(iv: Interval) -> str:
    if iv.n == 0:
        return "-"
    if iv.n < 2:
        return f"{100 * iv.mean:.2f}"
    return f"{100 * iv.mean:.2f} [{100 * iv.low:.2f}, {100 * iv.high:.2f}]"


def table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def _num(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def comparison(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The accuracy and paired sections, from finished trials' rows alone (docs/reproduction.md
    quotes them; tests/test_reproduce.py recomputes them from the measured run's rows)."""
    by_arm = arms_in_order(rows)
    summary = {s["arm"]: s for s in summarize(rows, metrics=FINAL_METRICS)}
    out = ["## Accuracy per arm", ""]
    body = []
    for arm in by_arm:
        s, paper = summary[arm], PAPER.get(arm)
        body.append([name_of(arm), len(s["seeds"]), pct(s["final_clean_acc"]), pct(s["final_pgd_acc"]), pct(s["final_autoattack_acc"]),
                     f"{paper[0]:.2f} / {paper[1]:.2f}" if paper else "-"])
    out += table(["arm", "seeds", "clean", "PGD-20", "AutoAttack", "paper, CIFAR-10 (PGD-20 / AA)"], body) + [""]

    out += ["## Paired by seed", "",
            "Differences in points, arm A minus arm B on the same seed. `seeds needed`: seeds a two-sided paired t-test "
            "at 5% needs to detect the measured mean difference with power 0.8, given the measured spread (sd); "
            "`paper's effect`: the same difference in the paper's CIFAR-10 numbers, and the seeds that effect would need "
            "at the spread measured here.", ""]
    body = []
    for a, b in PAIRS:
        if a not in by_arm or b not in by_arm:
            continue
        for metric in FINAL_METRICS:
            p = paired(rows, a=a, b=b, metric=metric)
            d = p["difference"]
            if d.n == 0:
                continue
            per_seed = ", ".join(f"s{seed} {100 * x:+.1f}" for seed, x in p["by_seed"].items())
            column = PAPER_COLUMN.get(metric)
            if column is None or a not in PAPER or b not in PAPER:
                effect, needed = "-", "-"
            else:
                gap = PAPER[a][column] - PAPER[b][column]
                effect, needed = f"{gap:+.2f}", _needed(seeds_needed(gap / 100, d.sd))
            body.append([f"{name_of(a)} - {name_of(b)}", metric.removeprefix("final_").removesuffix("_acc"), per_seed, pct(d),
                         f"{100 * d.sd:.2f}" if d.n > 1 else "-", f"{p['wins']}/{d.n}", _needed(p["seeds_needed"]), effect, needed])
    out += table(["comparison", "metric", "per seed", "mean [95%]", "sd", "A ahead", "seeds needed", "paper's effect",
                  "seeds for it"], body) + [""]
    return out


def _needed(n: int | None) -> str:
    return "never" if n is None else str(n)


def arms_in_order(rows: Sequence[dict[str, Any]]) -> dict[str, list[Any]]:
    """analysis.seeds.arms, in the paper's order: standard, SAT, TRADES, WEAT_adv, WEAT_nat, others after."""
    order = {arm: i for i, arm in enumerate(NAMES)}
    return dict(sorted(arms(rows).items(), key=lambda kv: order.get(kv[0], len(order))))


def name_of(arm: str) -> str:
    return NAMES.get(arm, arm)


def markdown(study: Path, *, seconds: float | None) -> str:
    rows = trial_rows(study)
    by_arm = arms_in_order(rows)
    out = [f"# Reproduction: {study.name}", ""]
    seeds = sorted({r["seed"] for r in rows})
    out += [f"{len(rows)} finished trials, seeds {seeds}; accuracy in % on the first {rows[0]['final_eval_n']} test images "
            f"(AutoAttack on {rows[0]['final_eval_autoattack_n']}), of the checkpoint the validation split chose; "
            "mean [95% t interval] over seeds." + (f" Wall time of the whole reproduction: {seconds / 60:.1f} min." if seconds else ""), ""]
    out += comparison(rows)

    out += ["## The energy view", "",
            "Per trial: the training probe's dE = E(x) - E(x*) at the first and last probe, the online detector's alarm "
            "and the offline onset of robust overfitting (`energyat phases DIR`).", ""]
    first_last = {r["trial_id"]: r for r in query(study, (
        "select trial_id, arg_min(probe_train_dE, epoch) as dE_first, arg_max(probe_train_dE, epoch) as dE_last "
        "from epochs where probed group by trial_id"))}
    body = []
    for arm, members in by_arm.items():
        for m in members:
            fl = first_last.get(m["trial_id"], {})
            body.append([name_of(arm), m["seed"], m["trial_id"], _num(fl.get("dE_first")), _num(fl.get("dE_last")),
                         _num(m.get("best_epoch")), _num(m.get("alarm_epoch")), _num(m.get("phase3_start"))])
    out += table(["arm", "seed", "trial", "dE first probe", "dE last probe", "best epoch", "alarm", "onset"], body) + [""]

    out += ["## Finding 1: untargeted attacks lower E(x*), targeted ones raise it (standard model)", "",
            f"    energyat query {study} \"{QUERIES['finding1']}\"", ""]
    f1 = query(study, QUERIES["finding1"])
    out += table(["seed", "epoch", "E(x)", "E(x*) untargeted", "E(x*) targeted"],
                 [[r["seed"], r["epoch"], _num(r["E"]), _num(r["E_untargeted"]), _num(r["E_targeted"])] for r in f1]) + [""]

    out += ["## Findings 2 and 3: dE per probe, mean over seeds (min, max)", "",
            f"    energyat query {study} \"{QUERIES['finding23']}\"", ""]
    f23 = query(study, QUERIES["finding23"])
    out += table(["method", "weat_variant", "epoch", "lr", "dE mean", "dE min", "dE max"],
                 [[r["method"], r["weat_variant"] if r["method"] == "weat" else "", r["epoch"], r["lr"], r["dE"], r["dE_min"], r["dE_max"]]
                  for r in f23]) + [""]

    judged = judge_scores(study)
    out += ["## Finding 5: the judge recognises samples of robust models", "",
            f"    energyat sample {study} --trial ID --init pca    (one trial; the judge's accuracy on its samples)", ""]
    body = []
    for arm, members in by_arm.items():
        accs = [judged[m["trial_id"]] for m in members if m["trial_id"] in judged]
        body.append([name_of(arm), ", ".join(f"{a:.3f}" for a in accs) or "-", f"{sum(accs) / len(accs):.3f}" if accs else "-"])
    out += table(["arm", "judge accuracy per seed", "mean"], body) + [""]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--storage", type=Path, default=REPO / "studies", help="where the study goes (default: ./studies)")
    parser.add_argument("--spec", type=Path, default=SPEC, help="the study's spec (default: examples/paper_fashion_cpu.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a spec key, repeatable")
    parser.add_argument("--study", type=Path, default=None, help="a study already run: only sample, report and summarise it")
    args = parser.parse_args(argv)
    if args.study is not None and args.overrides:
        parser.error("--set changes the study to run; with --study nothing is run")
    try:
        return _reproduce(args)
    except EnergyatError as exc:  # bad input: one line, exit 2, as energyat's own commands
        print(f"reproduce: {exc}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as exc:  # the energyat command has said why
        return exc.returncode


def _reproduce(args: argparse.Namespace) -> int:
    start = time.monotonic()
    study = args.study if args.study is not None else run_study(args.storage.resolve(), args.spec.resolve(), args.overrides)
    trials = [r["trial_id"] for r in trial_rows(study)]
    if not trials:
        print(f"reproduce: {study} has no finished trial: run it to the end first (`energyat resume {study}`)", file=sys.stderr)
        return 2
    sample_args = ["sample", str(study), "--init", "pca"]
    for trial in trials:
        sample_args += ["--trial", trial]
    energyat(*sample_args)
    energyat("report", str(study))
    text = markdown(study, seconds=None if args.study is not None else time.monotonic() - start)
    path = study / "report" / "reproduction.md"
    path.write_text(text + "\n")
    print(f"\n{text}\n\nreproduction: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
