"""The paper's comparison, reproduced with energyat's own commands: `make reproduce`.

    python examples/reproduce.py [--storage DIR] [--spec FILE] [--set KEY=VALUE ...]
    python examples/reproduce.py --resume [--set ...]   # continue an interrupted one (same --set)
    python examples/reproduce.py --study DIR      # the tables of a study already run

1. `energyat run examples/paper_fashion_cpu.yaml`: 5 arms (standard, sat, trades, WEAT_adv and
   WEAT_adv normalised) x 5 seeds on Fashion-MNIST (a previous study of the same
   name is moved aside; with --resume it is continued by `energyat resume` instead);
2. `energyat sample DIR --trial ...`: SGLD samples from every trial, scored by the judge, and
   `energyat report DIR`;
3. the same recipe at twice the epochs for TRADES and WEAT_adv, normalised and not, under the
   first 3 seeds (`<name>_x2`), and its report;
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
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script from a checkout: analysis/ is beside examples/

from analysis.errors import EnergyatError  # noqa: E402
from analysis.query import open_tables  # noqa: E402
from analysis.seeds import FINAL_METRICS, arms, interval, paired, seeds_needed, summarize  # noqa: E402
from study.cli import INTERRUPTED  # noqa: E402
from study.spec import load_spec  # noqa: E402

SPEC = REPO / "examples" / "paper_fashion_cpu.yaml"
ENERGYAT = [sys.executable, "-m", "study.cli"]
# The paper's CIFAR-10 robust accuracy (ResNet-18, PGD-20 / AutoAttack, %), by our arm names;
# its WEAT weights are unnormalised (weat.normalize: false)
PAPER = {"SAT": (49.03, 45.37), "TRADES": (52.65, 49.46), "WEAT_adv": (53.35, 49.75), "WEAT_nat": (52.43, 49.02)}
ORDER = ("standard", "SAT", "TRADES", "WEAT_adv", "WEAT_nat", "WEAT_adv norm", "WEAT_nat norm")
PAIRS = (("WEAT_adv", "TRADES"), ("TRADES", "SAT"), ("WEAT_nat", "TRADES"), ("WEAT_adv norm", "WEAT_adv"), ("WEAT_adv norm", "TRADES"))
PAPER_COLUMN = {"final_pgd_acc": 0, "final_autoattack_acc": 1}
INITS = ("pca", "noise", "gaussian")  # SGLD's starts: the paper's PCA, and two the judge does not recognise (finding 5)
# At twice the epochs: is WEAT_adv's deficit under-training? (its unnormalised weights shrink its
# effective lr) TRADES and WEAT_adv, normalised and not, under the main study's first LONG_SEEDS
# seeds: three pair each comparison seed by seed at half the cost of five, which is what fits the
# reproduction in one session on 2 cores; the headline comparison keeps all five
LONG_ARMS = "method: [trades, weat], weat.variant: [adv], weat.normalize: [false, true]"
LONG_SEEDS = 3

# The one query behind each finding (docs/reproduction.md shows them with the study's path)
QUERIES = {
    "finding1": (
        "select t.seed, e.epoch, e.probe_train_E as E, e.probe_train_E_adv as E_untargeted, e.probe_train_E_tgt as E_targeted "
        "from epochs e join trials t using (trial_id) where t.method = 'standard' and e.epoch = t.epochs_run - 1 order by t.seed"
    ),
    "finding23": (
        "select t.method, t.weat_variant, t.weat_normalize, e.epoch, round(e.lr, 4) as lr, round(avg(e.probe_train_dE), 3) as dE, "
        "round(min(e.probe_train_dE), 3) as dE_min, round(max(e.probe_train_dE), 3) as dE_max "
        "from epochs e join trials t using (trial_id) where e.probed and t.method in ('sat', 'trades', 'weat') "
        "group by all order by t.method, t.weat_variant, t.weat_normalize, e.epoch"
    ),
}


def energyat(*args: str) -> None:
    """One energyat command, as a user types it (its output goes to this terminal)."""
    shown = " ".join(["energyat", *args])
    print(f"\n$ {shown}", flush=True)
    with subprocess.Popen([*ENERGYAT, *args], cwd=REPO) as proc:
        # Ctrl-C reaches the command too (a terminal signals its whole process group): a study
        # saves itself and exits 130. This script waits for that, as a shell does, instead of
        # dying first and having the command killed in the middle of its save.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            code = proc.wait()
        finally:
            signal.signal(signal.SIGINT, previous)
    if code:
        raise subprocess.CalledProcessError(code, [*ENERGYAT, *args])


def run_study(storage: Path, spec: Path, overrides: Sequence[str], *, resume: bool = False) -> Path:
    """`energyat run` of the spec into storage; with `resume`, a study already there is continued
    (`energyat resume`: its unfinished trials, nothing else) instead of being moved aside."""
    # the spec and overrides checked as `energyat run` checks them, before anything is moved:
    # the study's folder is named by the validated name (a safe name, never `..`)
    cfg = load_spec(spec, overrides).trial
    study = storage / cfg.name
    if resume and study.exists():
        energyat("resume", str(study))
        return study
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


def judge_scores(study: Path) -> dict[str, dict[str, Any]]:
    """Per SGLD start (`init`), each trial's judge accuracy on its samples and on the chains'
    starting images, from `energyat sample`'s records."""
    out: dict[str, dict[str, Any]] = {}
    for init in INITS:
        for npz in sorted((study / "samples").glob(f"*-{init}.npz")):
            with np.load(npz) as archive:
                record = json.loads(str(archive["record"]))
            out.setdefault(init, {})[record["trial_id"]] = (float(record["scores"]["judge_acc"]),
                                                            float(record["start_scores"]["judge_acc"]))
    return out


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
    summary = {name_of(s["arm"]): s for s in summarize(rows, metrics=FINAL_METRICS)}
    out = ["## Accuracy per arm", ""]
    body = []
    for arm in by_arm:
        s, paper = summary[arm], PAPER.get(arm)
        body.append([arm, len(s["seeds"]), s["final_clean_acc"].percent(), s["final_pgd_acc"].percent(), s["final_autoattack_acc"].percent(),
                     f"{paper[0]:.2f} / {paper[1]:.2f}" if paper else "-"])
    out += table(["arm", "seeds", "clean", "PGD-20", "AutoAttack", "paper, CIFAR-10 (PGD-20 / AA)"], body) + [""]

    out += ["## Paired by seed", "",
            "Differences in points, arm A minus arm B on the same seed. `seeds needed`: seeds a two-sided paired t-test "
            "at 5% needs to detect the measured mean difference with power 0.8, given the measured spread (sd), and given "
            "the upper bound of the spread's 95% interval (`at sd high`); `paper's effect`: the same difference in the "
            "paper's CIFAR-10 numbers, and the seeds that effect would need at the spread measured here.", ""]
    body = []
    for a, b in PAIRS:
        if a not in by_arm or b not in by_arm:
            continue
        for metric in FINAL_METRICS:
            p = paired(rows, a=by_arm[a][0], b=by_arm[b][0], metric=metric)
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
            body.append([f"{a} - {b}", metric.removeprefix("final_").removesuffix("_acc"), per_seed, d.percent(),
                         f"{100 * d.sd:.2f}" if d.n > 1 else "-", f"{p['wins']}/{d.n}", _needed(p["seeds_needed"]),
                         _needed(p["seeds_needed_sd_high"]) if d.n > 1 else "-", effect, needed])
    out += table(["comparison", "metric", "per seed", "mean [95%]", "sd", "A ahead", "seeds needed", "at sd high", "paper's effect",
                  "seeds for it"], body) + [""]
    return out


def _needed(n: int | None) -> str:
    return "never" if n is None else str(n)


def name_of(arm: str) -> str:
    """The paper's name of an arm (analysis.seeds.arm_of's label): WEAT_adv for `weat
    (weat_variant=adv)`, with " norm" when its weights are normalised; others as they are."""
    method, _, settings = arm.partition(" (")
    if method == "standard":
        return "standard"
    if method in ("sat", "trades"):
        return method.upper() if not settings else arm
    if method != "weat":
        return arm
    values = dict(part.split("=", 1) for part in settings.rstrip(")").split(", ") if "=" in part)
    variant = values.pop("weat_variant", "adv")
    norm = values.pop("weat_normalize", "False") == "True"
    if values:  # another setting varies too: the full label says which
        return arm
    return f"WEAT_{variant}" + (" norm" if norm else "")


def divergence_size(by_arm: Mapping[str, tuple[str, list[Any]]], dE_last: Mapping[str, float | None]) -> list[str]:
    """How far SAT's dE drifted against each other AT arm's, as a size that depends on no chosen
    start epoch: per seed, SAT's |dE| at the last probe over the other arm's, then the geometric
    mean and 95% t interval of those ratios over seeds (a mean and interval of their logs)."""
    if "SAT" not in by_arm:
        return []
    sat = {m["seed"]: d for m in by_arm["SAT"][1] if (d := dE_last.get(m["trial_id"])) is not None}
    body = []
    for arm, (_label, members) in by_arm.items():
        if arm in ("standard", "SAT"):
            continue
        ratios = {m["seed"]: abs(sat[m["seed"]]) / abs(d) for m in members
                  if m["seed"] in sat and (d := dE_last.get(m["trial_id"])) is not None and d != 0.0}
        if ratios:  # a ratio's spread is multiplicative: the interval is taken on its log
            size = interval([math.log(r) for r in ratios.values()])
            spread = (f"{math.exp(size.mean):.1f} [{math.exp(size.low):.1f}, {math.exp(size.high):.1f}]" if size.n > 1
                      else f"{math.exp(size.mean):.1f}")
            body.append([f"SAT / {arm}", ", ".join(f"s{seed} {r:.1f}" for seed, r in ratios.items()), spread])
    if not body:
        return []
    return (["The size of the drift, defined so that it depends on no chosen start epoch: SAT's |dE| at the last probe over "
             "each other AT arm's on the same seed; geometric mean [95% t interval of the log] over seeds.", ""]
            + table(["ratio", "per seed", "geometric mean [95%]"], body) + [""])


def dE_by_epoch(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The finding-2/3 query's rows as one table: a row per probed epoch (with its lr), a column
    per arm in the paper's order, each cell the mean dE over seeds (min, max)."""
    order = {name: i for i, name in enumerate(ORDER)}
    arms_seen = sorted({_arm_of_row(r) for r in rows}, key=lambda a: order.get(a, len(order)))
    cells: dict[int, dict[str, str]] = {}
    lr: dict[int, Any] = {}
    for r in rows:
        cells.setdefault(r["epoch"], {})[_arm_of_row(r)] = f"{r['dE']:.3f} ({r['dE_min']:.3f}, {r['dE_max']:.3f})"
        lr.setdefault(r["epoch"], r["lr"])
    return table(["epoch", "lr", *arms_seen], [[e, lr[e], *(cells[e].get(a, "-") for a in arms_seen)] for e in sorted(cells)])


def _arm_of_row(row: Mapping[str, Any]) -> str:
    """The paper's name of a query row's arm, from its method and WEAT settings."""
    if row["method"] != "weat":
        return str(row["method"]).upper()
    return f"WEAT_{row['weat_variant']}" + (" norm" if row["weat_normalize"] else "")


def arms_in_order(rows: Sequence[dict[str, Any]]) -> dict[str, tuple[str, list[Any]]]:
    """analysis.seeds.arms by their paper names (each with its label), in the paper's order."""
    named = {name_of(label): (label, members) for label, members in arms(rows).items()}
    order = {name: i for i, name in enumerate(ORDER)}
    return dict(sorted(named.items(), key=lambda kv: order.get(kv[0], len(order))))


def markdown(study: Path, *, long: Path | None, seconds: float | None) -> str:
    rows = trial_rows(study)
    by_arm = arms_in_order(rows)
    out = [f"# Reproduction: {study.name}", ""]
    seeds = sorted({r["seed"] for r in rows})
    out += [f"{len(rows)} finished trials, seeds {seeds}; accuracy in % on the first {rows[0]['final_eval_n']} test images "
            f"(AutoAttack on {rows[0]['final_eval_autoattack_n']}), of the checkpoint the validation split chose "
            "(robust accuracy; clean accuracy for the standard arm: `select`); mean [95% t interval] over seeds."
            + (f" Wall time of the whole reproduction: {seconds / 60:.1f} min." if seconds else ""), ""]
    out += comparison(rows)
    if long is not None:
        long_rows = trial_rows(long)
        out += [f"## At twice the epochs ({long.name}: {long_rows[0]['epochs_run'] if long_rows else '-'} epochs)", "",
                "Is WEAT_adv's deficit under-training? Its unnormalised weights shrink its effective learning rate; "
                "the same arms at twice the epochs, same seeds.", ""]
        out += [line.replace("## ", "### ", 1) for line in comparison(long_rows)] if long_rows else ["(no finished trial)", ""]

    out += ["## The energy view", "",
            "Per trial: the training probe's dE = E(x) - E(x*) at the first and last probe, the online detector's alarm "
            "and the offline onset of robust overfitting (`energyat phases DIR`).", ""]
    first_last = {r["trial_id"]: r for r in query(study, (
        "select trial_id, arg_min(probe_train_dE, epoch) as dE_first, arg_max(probe_train_dE, epoch) as dE_last "
        "from epochs where probed group by trial_id"))}
    body = []
    for arm, (_label, members) in by_arm.items():
        for m in members:
            fl = first_last.get(m["trial_id"], {})
            body.append([arm, m["seed"], m["trial_id"], _num(fl.get("dE_first")), _num(fl.get("dE_last")),
                         _num(m.get("best_epoch")), _num(m.get("alarm_epoch")), _num(m.get("phase3_start"))])
    out += table(["arm", "seed", "trial", "dE first probe", "dE last probe", "best epoch", "alarm", "onset"], body) + [""]
    out += divergence_size(by_arm, {t: fl["dE_last"] for t, fl in first_last.items()})

    out += ["## Finding 1: untargeted attacks lower E(x*), targeted ones raise it (standard model)", "",
            f"    energyat query {study} \"{QUERIES['finding1']}\"", ""]
    f1 = query(study, QUERIES["finding1"])
    out += table(["seed", "epoch", "E(x)", "E(x*) untargeted", "E(x*) targeted"],
                 [[r["seed"], r["epoch"], _num(r["E"]), _num(r["E_untargeted"]), _num(r["E_targeted"])] for r in f1]) + [""]

    out += ["## Findings 2 and 3: dE per probe, mean over seeds (min, max)", "",
            f"    energyat query {study} \"{QUERIES['finding23']}\"", ""]
    f23 = query(study, QUERIES["finding23"])
    out += dE_by_epoch(f23) + [""]
    return "\n".join(out + finding5(study, by_arm))


def finding5(study: Path, by_arm: Mapping[str, tuple[str, list[Any]]]) -> list[str]:
    """The judge's accuracy on each arm's SGLD samples, per start, beside its accuracy on the
    starts themselves: samples can only show what SGLD added where the starts are not already
    recognised (noise, gaussian); from PCA starts the metric rewards moving the chains less."""
    judged = judge_scores(study)
    out = ["## Finding 5: does the judge recognise samples of robust models?", "",
           f"    energyat sample {study} --trial ID --init noise    (also pca, gaussian; the judge's accuracy on the samples and "
           "on their starts)", "",
           "Judge accuracy on each arm's samples, mean over seeds [min, max], per SGLD start; the last row is the judge on "
           "the starts themselves (the same starts for every trial).", ""]
    inits = [init for init in INITS if init in judged]
    body = []
    for arm, (_label, members) in by_arm.items():
        cells = []
        for init in inits:
            accs = [judged[init][m["trial_id"]][0] for m in members if m["trial_id"] in judged[init]]
            cells.append(f"{sum(accs) / len(accs):.3f} [{min(accs):.3f}, {max(accs):.3f}]" if accs else "-")
        body.append([arm, *cells])
    starts = [[v[1] for v in judged[init].values()] for init in inits]
    body.append(["(the starts)", *(f"{sum(s) / len(s):.3f}" for s in starts)])
    return out + table(["arm", *inits], body) + [""]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--storage", type=Path, default=REPO / "studies", help="where the study goes (default: ./studies)")
    parser.add_argument("--spec", type=Path, default=SPEC, help="the study's spec (default: examples/paper_fashion_cpu.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a spec key, repeatable")
    parser.add_argument("--study", type=Path, default=None, help="a study already run: only sample, report and summarise it")
    parser.add_argument("--resume", action="store_true",
                        help="continue the studies an interrupted reproduction left (energyat resume), run those it did not reach")
    parser.add_argument("--sample-steps", type=int, default=None, metavar="N", help="SGLD steps per chain (default: energyat sample's, 50)")
    parser.add_argument("--sample-n", type=int, default=None, metavar="N", help="SGLD chains per class (default: energyat sample's, 8)")
    args = parser.parse_args(argv)
    if args.study is not None and (args.overrides or args.resume):
        parser.error("--set and --resume are about the studies to run; with --study nothing is run")
    for flag, value in (("--sample-steps", args.sample_steps), ("--sample-n", args.sample_n)):
        if value is not None and value < 1:  # refused now, not after hours of training
            print(f"reproduce: {flag} {value}: give at least 1", file=sys.stderr)
            return 2
    try:
        return _reproduce(args)
    except EnergyatError as exc:  # bad input: one line, exit 2, as energyat's own commands
        print(f"reproduce: {exc}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as exc:  # the energyat command has said why
        if exc.returncode == INTERRUPTED:  # Ctrl-C: energyat named its own resume; this whole script has one too
            print("reproduce: interrupted; `python examples/reproduce.py --resume` with the same --set continues it", file=sys.stderr)
        return exc.returncode


def long_overrides(spec: Path, overrides: Sequence[str]) -> list[str]:
    """The study at twice the epochs: LONG_ARMS under the main study's first LONG_SEEDS seeds,
    named `<name>_x2`."""
    main = load_spec(spec, overrides)
    seed = next((d for d in main.search if d.key == "seed"), None)
    seeds = list(seed.choices)[:LONG_SEEDS] if seed is not None and seed.kind == "categorical" else [main.trial.seed]
    return [*overrides, f"name={main.trial.name}_x2", f"epochs={2 * main.trial.epochs}",
            f"search={{{LONG_ARMS}, seed: {{choices: {seeds}}}}}", f"samples={3 * len(seeds)}"]


def _reproduce(args: argparse.Namespace) -> int:
    start = time.monotonic()
    sgld = [*(["--steps", str(args.sample_steps)] if args.sample_steps is not None else []),
            *(["--n", str(args.sample_n)] if args.sample_n is not None else [])]

    def in_turn() -> Iterator[Path]:
        """The studies, each trained (or found) only when the one before is sampled and reported:
        what needs a study's checkpoints is done before the next study's hours begin."""
        if args.study is not None:
            yield args.study
            if (sibling := args.study.with_name(f"{args.study.name}_x2")).is_dir():
                yield sibling
        else:
            spec, storage = args.spec.resolve(), args.storage.resolve()
            long = long_overrides(spec, args.overrides)
            load_spec(spec, long)  # the second study's spec checked before the first one's hours, too
            yield run_study(storage, spec, args.overrides, resume=args.resume)
            yield run_study(storage, spec, long, resume=args.resume)

    studies: list[Path] = []
    for study in in_turn():
        studies.append(study)
        trials = [r["trial_id"] for r in trial_rows(study)]
        if not trials:
            print(f"reproduce: {study} has no finished trial: run it to the end first (`energyat resume {study}`)", file=sys.stderr)
            return 2
        if len(studies) == 1:  # finding 5 on the main study's arms
            for init in INITS:
                energyat("sample", str(study), "--init", init, *sgld, *[a for t in trials for a in ("--trial", t)])
        energyat("report", str(study))
    text = markdown(studies[0], long=studies[1] if len(studies) > 1 else None,
                    seconds=None if args.study is not None or args.resume else time.monotonic() - start)  # one session's wall is not the whole
    path = studies[0] / "report" / "reproduction.md"
    path.write_text(text + "\n")
    print(f"\n{text}\n\nreproduction: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
