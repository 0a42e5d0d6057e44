"""The stopping-rule suite: every rule family at every k, replayed on studies trained to the end.

    python benchmarks/stoppers.py train RECIPE [--storage runs/suite] [--set key=value ...]
    python benchmarks/stoppers.py replay STUDY [STUDY ...] [--out runs/suite/report] [--n 2500] [--autoattack-n 1000]
    python benchmarks/stoppers.py live LIVE_STUDY --full FULL_STUDY --rule FAMILY:K
    python benchmarks/stoppers.py retrain STUDY|EXPORT [...] [--storage runs/suite] [--n 2500] [--autoattack-n 2500]

`train` runs one recipe (:data:`RECIPES`) of the suite's base study (benchmarks/suite/stoppers.yaml):
every configuration under each training seed, to its last epoch, no stopping, with every new best
checkpoint kept (`keep_best_checkpoints`). Hours on two cores: an interrupted study continues with
`energyat resume STUDY`.

`replay` decides, on those rows, when each rule would have stopped each trial. Every rule here is
a causal function of a trial's epoch rows (ASHA's of the rows of the trials before it at its
rungs), so a trial stopped at epoch s has exactly the rows of the full run up to s: the replay
runs the product's own code (``analysis.phases.OnlineDetector``, ``analysis.stopping.StopRule``,
``study.scheduler``'s ASHA classes) over them. Each training seed is one replicate study of the
recipe's configurations. ASHA runs at each k of :data:`KS` as its grace period and also at the
recipe's first lr drop (:func:`first_drop`). Per recipe, family and k it reports:

- trial-epochs (the sum of epochs run, both replicates) and the trials' summed seconds;
- the validation robust accuracy each trial gave up by stopping (its full run's best minus its
  best up to the stop), median and worst: validation numbers only, so a rule's constants can be
  chosen on them without looking at the test set;
- each replicate's pick: the trial with the best validation robust accuracy up to its stop (ties
  broken by the configuration, a fixed key), at its best epoch up to the stop; the pick's test
  accuracy under PGD-20 on the first `--n` test images and under the original AutoAttack on the
  first `--autoattack-n`, from the kept checkpoint of that epoch (binomial SE sqrt(p(1-p)/n));
- Spearman's rho between each configuration's best validation robust accuracy under the rule
  and under the full run, averaged over the replicates;
- a Pareto figure per recipe: trial-epochs against the picks' mean test PGD accuracy, one line
  per family across k;
- the offline onset (``analysis.phases.detect``) against the validation robust-loss minimum.

ASHA replays with the trials in the order the study started them, one at a time; a live ASHA
study running trials two at a time sees its rungs fill in another order (`live` compares).

`live` compares a study run with a stop rule (same recipe, same configurations) with the replay of
that rule on the full study: per configuration, the epochs each ran.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from analysis.errors import EnergyatError
from analysis.phases import DETECTOR_COLUMNS, OnlineDetector, detect, ground_truth_onset
from analysis.query import open_tables
from analysis.schema import config_column
from analysis.stopping import StopRule
from analysis.store import git_sha, versions

SUITE = Path(__file__).resolve().parent / "suite" / "stoppers.yaml"
# recipe -> spec overrides on benchmarks/suite/stoppers.yaml
RECIPES: dict[str, list[str]] = {
    # the quickstart's schedule: two drops in 30 epochs, little room to overfit
    "two_drops": ["epochs=30", "schedule={name: piecewise, milestones: [0.5, 0.75], gamma: 0.1}"],
    # one drop at 40, then a 60-epoch tail at the low lr where robust overfitting shows (with the
    # drop at 20 of 80, training accuracy on the adversarial batches ended at 0.60-0.78 and no trial's
    # validation robust loss rose: too little time at the high lr to fit the training set)
    "single_drop": ["epochs=100", "schedule={name: piecewise, milestones: [40], gamma: 0.1}"],
    # Rice et al.'s schedule (drops at 50% and 75%): overfitting starts after the first drop
    "rice": ["epochs=80", "schedule={name: piecewise, milestones: [0.5, 0.75], gamma: 0.1}"],
    # OneCycle, the paper's schedule: no drop, no overfitting expected
    "onecycle": ["epochs=30", "schedule={name: onecycle, pct_start: 0.25}"],
}
KS = (2, 4, 6, 8, 10, 15, 20)  # every patience family's k, and ASHA's grace period
ASHA_REDUCTION = 2
SEARCHED = ("method", "lr", "weight_decay")  # a configuration; `seed` makes the replicate
FAMILIES = ("none", "patience", "alarm_patience", "energy_patience", "asha", "asha_energy")


def stop_rule(family: str, k: int) -> StopRule:
    """The trial-side families at k: plain patience k; the alarm, then k; energy-informed patience
    (k // 2 after the alarm, k before it). The ratio 1/2 was fixed before any suite run."""
    if family == "patience":
        return StopRule(val_patience=k)
    if family == "alarm_patience":
        return StopRule(energy_patience=k)
    if family == "energy_patience":
        return StopRule(energy_patience=k // 2, val_patience=k)
    raise ValueError(family)


# -- the rows ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Trial:
    trial_id: str
    config: str  # the searched keys' values as sorted JSON: the configuration, a fixed tie-break key
    seed: int
    rows: list[dict[str, Any]]  # epoch rows, in epoch order

    @property
    def epochs(self) -> int:
        return len(self.rows)

    # derived once per trial: every rule and every k reads them
    @cached_property
    def bests(self) -> list[tuple[float, int | None]]:
        return running_bests(self.rows)

    @cached_property
    def alarms(self) -> list[bool]:
        return alarms(self.rows)


ROW_COLUMNS = ("epoch", "lr", "probe_train_dE", "probe_train_E", "probed", "val_robust_acc", "val_robust_loss", "epoch_seconds",
               "probe_seconds")  # what the replay reads of each epoch row, and all that `export` keeps


# the `trials` columns of a configuration's searched keys and its seed, in that order
CONFIG_COLUMNS = ", ".join(f'"{config_column(k)}"' for k in (*SEARCHED, "seed"))


def configuration(values: Sequence[Any]) -> str:
    """The searched keys' values (in SEARCHED's order) as a configuration: sorted JSON."""
    return json.dumps(dict(zip(SEARCHED, values, strict=True)), sort_keys=True)


def load_trials(source: str) -> list[Trial]:
    """A study's finished trials (a study directory, or a file `export` wrote) in the order the
    study started them (Optuna's trial number)."""
    if source.endswith(".csv.gz"):
        return load_exported(source)
    study_dir = source
    con = open_tables(study_dir)
    done = con.execute(f"select trial_id, {CONFIG_COLUMNS} from trials where status = 'TERMINATED'").fetchall()
    epochs = con.execute(f"select trial_id, {', '.join(ROW_COLUMNS)} from epochs order by trial_id, epoch").fetchall()
    by_trial: dict[str, list[dict[str, Any]]] = {}
    for trial_id, *values in epochs:
        by_trial.setdefault(trial_id, []).append(dict(zip(ROW_COLUMNS, values, strict=True)))
    order = _start_order(study_dir)
    trials = []
    for trial_id, *config in done:
        rows = by_trial.get(trial_id, [])
        if [r["epoch"] for r in rows] != list(range(len(rows))):
            raise EnergyatError(f"{study_dir}: trial {trial_id}'s epochs are not contiguous from 0")
        trials.append(Trial(trial_id, configuration(config[:-1]), int(config[-1]), rows))
    return sorted(trials, key=lambda t: (order.get(t.trial_id, math.inf), t.trial_id))


def export(trials: Sequence[Trial], path: Path) -> None:
    """The rows the replay reads, one gzipped CSV per recipe: what tests/data keeps of a suite run."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    records = [{"order": i, "trial_id": t.trial_id, "config": t.config, "seed": t.seed, **r} for i, t in enumerate(trials) for r in t.rows]
    table = pa.Table.from_pylist(records)
    with pa.CompressedOutputStream(str(path), "gzip") as out:
        pacsv.write_csv(table, out)


def load_exported(path: str) -> list[Trial]:
    import pyarrow.csv as pacsv

    records = pacsv.read_csv(path).to_pylist()  # gzip, from the file name
    trials: dict[str, Trial] = {}
    order: dict[str, int] = {}
    for r in records:
        tid = str(r["trial_id"])
        if tid not in trials:
            trials[tid] = Trial(tid, str(r["config"]), int(r["seed"]), [])
            order[tid] = int(r["order"])
        trials[tid].rows.append({k: r[k] for k in ROW_COLUMNS})
    return sorted(trials.values(), key=lambda t: order[t.trial_id])


def _start_order(study_dir: str) -> dict[str, int]:
    """Tune trial id -> the Optuna trial number (the order the searcher handed them out)."""
    import optuna

    from study.journal import TUNE_ID_ATTR, journal_copy, journal_storage
    from study.spec import load_study

    loaded = load_study(study_dir)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with journal_copy(study_dir) as path:
        if path is None:
            return {}
        frozen = optuna.load_study(study_name=loaded.study_name, storage=journal_storage(path)).get_trials()
    return {str(t.user_attrs[TUNE_ID_ATTR]): t.number for t in frozen if TUNE_ID_ATTR in t.user_attrs}


# -- replaying a rule ------------------------------------------------------------------------------------


def running_bests(rows: Sequence[dict[str, Any]]) -> list[tuple[float, int | None]]:
    """After each epoch: (best validation robust accuracy so far, its first epoch), over the probed
    epochs, as the engine selects (a new best must be strictly higher)."""
    best, epoch, out = -math.inf, None, []
    for row in rows:
        acc = row["val_robust_acc"]
        if row["probed"] and acc is not None and math.isfinite(acc) and acc > best:
            best, epoch = acc, int(row["epoch"])
        out.append((best, epoch))
    return out


def alarms(rows: Sequence[dict[str, Any]]) -> list[bool]:
    """The online detector's alarm after each epoch, fed as the engine feeds it."""
    det = OnlineDetector()
    return [det.update({k: r.get(k) for k in DETECTOR_COLUMNS})[1] for r in rows]


def replay_rule(trial: Trial, rule: StopRule) -> int:
    """The last epoch the trial runs under `rule` (the engine's loop: alarm, then best, then decide)."""
    for epoch in range(trial.epochs):
        _, best_epoch = trial.bests[epoch]
        if rule.decide(epoch=epoch, alarm=trial.alarms[epoch], best_epoch=best_epoch) is not None:
            return epoch
    return trial.epochs - 1


def replay_asha(trials: Sequence[Trial], *, family: str, grace: int) -> dict[str, int]:
    """The last epoch of each trial under Tune's ASHA (or energyat's asha_energy), trials one at a
    time in order, each reporting what the trainable reports (training_iteration = epoch + 1)."""
    from study.scheduler import build_scheduler
    from study.scheduler_keys import check_scheduler
    from trainables.tune_adapter import OBJECTIVE_FALLBACK

    epochs = trials[0].epochs
    stops: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as requests:  # the stop requests the classes write
        sched = build_scheduler(check_scheduler({"name": family, "grace_period": grace, "reduction_factor": ASHA_REDUCTION}),
                                study_dir=requests, metric="best_val_robust_acc", epochs=epochs)
        for trial in trials:
            handle = _Handle(trial.trial_id)
            sched.on_trial_add(None, handle)
            stops[trial.trial_id] = trial.epochs - 1
            for epoch in range(trial.epochs - 1):  # the last epoch's report is the final one: no decision
                best, _ = trial.bests[epoch]
                result = {"training_iteration": epoch + 1, "alarm": trial.alarms[epoch],
                          "best_val_robust_acc": best if math.isfinite(best) else OBJECTIVE_FALLBACK}
                sched.on_trial_result(None, handle, result)
                if trial.trial_id in sched.asked:
                    stops[trial.trial_id] = epoch
                    break
            sched.on_trial_complete(None, handle, result)
    return stops


@dataclass(frozen=True)
class _Handle:
    trial_id: str  # all a Tune scheduler reads of a trial


def first_drop(rows: Sequence[dict[str, Any]]) -> int | None:
    """The epochs run before the online detector's lr gate opens (the lr at half its peak so far):
    ASHA's grace period "at the first lr drop", the rule the quickstart uses; for OneCycle and
    cosine, the middle of the decay. None when the gate never opens."""
    det = OnlineDetector()
    for ran, row in enumerate(rows):
        det.update({k: row.get(k) for k in DETECTOR_COLUMNS})
        if det.gate_epoch is not None:
            return ran
    return None


def asha_graces(trials: Sequence[Trial]) -> tuple[int, ...]:
    """ASHA's grace periods: :data:`KS` and the recipe's first lr drop, those a trial can pass."""
    drop = first_drop(trials[0].rows)
    return tuple(sorted(k for k in {*KS, drop} if k and k < trials[0].epochs))


def replay(trials: Sequence[Trial], family: str, k: int) -> dict[str, int]:
    """Trial id -> its last epoch under family at k, for one replicate's trials (in start order)."""
    if family == "none":
        return {t.trial_id: t.epochs - 1 for t in trials}
    if family in ("asha", "asha_energy"):
        return replay_asha(trials, family=family, grace=k)
    rule = stop_rule(family, k)
    return {t.trial_id: replay_rule(t, rule) for t in trials}


# -- picks and their test accuracy -------------------------------------------------------------------------


@dataclass(frozen=True)
class Pick:
    trial_id: str
    epoch: int
    val: float
    config: str


def pick_of(trials: Sequence[Trial], stops: dict[str, int]) -> Pick:
    """The trial with the best validation robust accuracy up to its stop; ties by configuration."""
    scored = []
    for t in trials:
        best, epoch = t.bests[stops[t.trial_id]]
        if epoch is not None:
            scored.append((-best, t.config, Pick(t.trial_id, epoch, best, t.config)))
    if not scored:
        raise EnergyatError("no trial has a validation robust accuracy")
    return min(scored, key=lambda s: (s[0], s[1]))[2]


class PickAccuracy:
    """Test accuracy of a trial's kept best checkpoint at an epoch, cached in a JSON-lines file so
    that a replay run again (more families, more k) evaluates only new picks, and a larger
    `--autoattack-n` only the images the cache has not attacked: AutoAttack on the first N is the
    cached count on the first M plus AutoAttack on images [M, N) (each part seeded by the trial's
    seed; the standard attacks judge every image on its own, so the sum is AutoAttack on N images,
    though not bit for bit the single call's: the parts' batches draw their random starts afresh)."""

    def __init__(self, cache: Path, *, n: int, autoattack_n: int, frozen: bool = False) -> None:
        self.cache, self.n, self.autoattack_n, self.frozen = cache, n, autoattack_n, frozen
        self.known: dict[str, dict[str, Any]] = {}
        if cache.exists():
            for line in cache.read_text().splitlines():
                entry = json.loads(line)
                self.known[entry["key"]] = entry

    def __call__(self, study_dir: str, pick: Pick, *, autoattack: bool) -> dict[str, Any]:
        autoattack_n = self.autoattack_n if autoattack else 0
        key = f"{study_key(study_dir)}/{pick.trial_id}/{pick.epoch}/{self.n}/{autoattack_n}"
        if key not in self.known and self.frozen:
            raise EnergyatError(f"{self.cache} has no evaluation of the pick {key}: replay the study itself to evaluate it")
        if key not in self.known:
            prefix = key.rsplit("/", 1)[0] + "/"
            smaller = [e for k, e in self.known.items() if k.startswith(prefix) and 0 < int(k.rsplit("/", 1)[1]) < autoattack_n]
            if smaller:  # extend the largest AutoAttack sample already evaluated
                base = max(smaller, key=lambda e: e["autoattack"]["n"])
                done = base["autoattack"]
                more = evaluate_pick(study_dir, pick, n=0, autoattack_n=autoattack_n, autoattack_start=done["n"])["autoattack"]
                total, correct = done["n"] + more["n"], done["correct"] + more["correct"]
                entry = {**base, "key": key, "autoattack": {"n": total, "correct": correct, "accuracy": correct / total,
                                                            "seconds": round(done["seconds"] + more["seconds"], 1),
                                                            "parts": [*done.get("parts", [done["n"]]), more["n"]]}}
            else:
                entry = {"key": key, **evaluate_pick(study_dir, pick, n=self.n, autoattack_n=autoattack_n)}
            self.known[key] = entry
            with self.cache.open("a") as f:
                f.write(json.dumps(entry) + "\n")
        return self.known[key]


def evaluate_pick(study_dir: str, pick: Pick, *, n: int, autoattack_n: int, autoattack_start: int = 0) -> dict[str, Any]:
    """PGD-20 on the first n test images (0: none), AutoAttack on the first autoattack_n (from
    image autoattack_start), fp32, from the trial's kept checkpoint of that epoch
    (``best-e<epoch>.pt``), the attacks seeded by the trial's seed as its own final evaluation
    is: a full run's pick gives its `final_pgd_acc`."""
    import torch

    from trainables.data import load_dataset
    from trainables.evaluate import evaluate
    from trainables.subjects import trial_subject

    subject = trial_subject(study_dir, pick.trial_id, epoch=pick.epoch)
    data = load_dataset(subject.cfg.dataset)
    model = subject.model(data, torch.device("cpu"))
    attacks = (["clean", "pgd"] if n else []) + (["autoattack"] if autoattack_n else [])
    results = evaluate(model, data, subject.cfg, attacks=attacks, n=n, autoattack_n=autoattack_n, pgd_steps=20, seed=subject.cfg.seed,
                       autoattack_start=autoattack_start)
    return {r.attack: {"n": r.n, "correct": r.correct, "accuracy": r.accuracy, "seconds": round(r.seconds, 1)} for r in results}


def binomial_se(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n)


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rho: Pearson's correlation of the ranks (ties share their mean rank)."""
    def ranks(values: Sequence[float]) -> np.ndarray:
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


# -- one recipe --------------------------------------------------------------------------------------------


def replicates(trials: Sequence[Trial]) -> dict[int, list[Trial]]:
    out: dict[int, list[Trial]] = {}
    for t in trials:
        out.setdefault(t.seed, []).append(t)
    return dict(sorted(out.items()))


def rule_rows(study_dir: str, trials: Sequence[Trial], accuracy: Callable[..., dict[str, Any]], *,
              autoattack_for: frozenset[tuple[str, int]] = frozenset()) -> list[dict[str, Any]]:
    """One result per (family, k) on one recipe's study; the picks of `autoattack_for` (and the
    full run's) are also evaluated under AutoAttack."""
    reps = replicates(trials)
    full = {seed: replay(ts, "none", 0) for seed, ts in reps.items()}
    out = []
    for family in FAMILIES:
        for k in (0,) if family == "none" else asha_graces(trials) if family in ("asha", "asha_energy") else KS:
            picks, rhos, trial_epochs, seconds, stopped, regrets = [], [], 0, 0.0, 0, []
            for seed, ts in reps.items():
                stops = replay(ts, family, k)
                # validation accuracy a trial gave up by stopping: what chooses a rule's constants
                regrets += [t.bests[full[seed][t.trial_id]][0] - t.bests[stops[t.trial_id]][0] for t in ts]
                trial_epochs += sum(s + 1 for s in stops.values())
                stopped += sum(stops[t.trial_id] + 1 < t.epochs for t in ts)
                seconds += sum(r["epoch_seconds"] + r["probe_seconds"] for t in ts for r in t.rows[: stops[t.trial_id] + 1])
                pick = pick_of(ts, stops)
                picks.append({"seed": seed, "trial_id": pick.trial_id, "epoch": pick.epoch, "val": pick.val, "config": pick.config,
                              **accuracy(study_dir, pick, autoattack=family == "none" or (family, k) in autoattack_for)})
                rhos.append(spearman([t.bests[stops[t.trial_id]][0] for t in ts], [t.bests[full[seed][t.trial_id]][0] for t in ts]))
            out.append({"family": family, "k": k, "trial_epochs": trial_epochs, "seconds": round(seconds, 1), "picks": picks,
                        "spearman": float(np.nanmean(rhos)) if not all(math.isnan(r) for r in rhos) else math.nan,
                        "stopped": stopped, "val_regret_median": float(np.median(regrets)), "val_regret_max": float(np.max(regrets))})
    return out


def mean_accuracy(picks: Sequence[dict[str, Any]], attack: str) -> tuple[float, float]:
    """Mean test accuracy of the replicates' picks under `attack`, and its binomial SE."""
    found = [p[attack] for p in picks if attack in p]
    if not found:
        return math.nan, math.nan
    mean = float(np.mean([f["accuracy"] for f in found]))
    se = math.sqrt(sum(binomial_se(f["accuracy"], f["n"]) ** 2 for f in found)) / len(found)
    return mean, se


def onsets(trials: Sequence[Trial]) -> list[dict[str, Any]]:
    """Per trial: the offline onset against the validation robust-loss minimum."""
    out = []
    for t in trials:
        probed = [r for r in t.rows if r["probed"]]
        columns = {k: np.array([r[k] for r in t.rows], dtype=float) for k in ("epoch", "lr", "probe_train_dE", "probe_train_E")}
        columns["probed"] = np.array([bool(r["probed"]) for r in t.rows], dtype=float)
        found = detect(columns)
        truth = ground_truth_onset({"epoch": np.array([r["epoch"] for r in probed]),
                                    "val_robust_loss": np.array([r["val_robust_loss"] for r in probed], dtype=float)},
                                   split="val", signals=("robust_loss",))
        out.append({"trial_id": t.trial_id, "config": t.config, "seed": t.seed, "truth": truth.epoch, "onset": found.phase3_start,
                    "alarm": found.alarm_epoch})
    return out


# -- output ----------------------------------------------------------------------------------------------------


def table(recipe: str, results: Sequence[dict[str, Any]], *, n: int) -> str:
    base = next(r for r in results if r["family"] == "none")
    base_pgd, base_se = mean_accuracy(base["picks"], "pgd")
    lines = [
        f"**{recipe}** (full run: {base['trial_epochs']} trial-epochs; its picks test {base_pgd:.4f} +- {base_se:.4f} under PGD-20, n = {n} each)",
        "",
        "| rule | k | trial-epochs | saved | trial-hours | trials stopped | val acc given up, median / worst | picks' test PGD-20 (SE) "
        "| vs full run | picks' AutoAttack (SE) | Spearman | picks (seed: trial@epoch) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        pgd, se = mean_accuracy(r["picks"], "pgd")
        aa, aa_se = mean_accuracy(r["picks"], "autoattack")
        saved = 1 - r["trial_epochs"] / base["trial_epochs"]
        picks = ", ".join(f"{p['seed']}: {p['trial_id'][:8]}@{p['epoch']}" for p in r["picks"])
        aa_text = "-" if math.isnan(aa) else f"{aa:.4f} ({aa_se:.4f})"
        lines.append(f"| {r['family']} | {r['k'] or '-'} | {r['trial_epochs']} | {saved:.0%} | {r['seconds'] / 3600:.2f} | {r['stopped']} | "
                     f"{r['val_regret_median']:.4f} / {r['val_regret_max']:.4f} | {pgd:.4f} ({se:.4f}) | "
                     f"{pgd - base_pgd:+.4f} | {aa_text} | {r['spearman']:.2f} | {picks} |")
    return "\n".join(lines)


ENERGY_FAMILIES = ("alarm_patience", "energy_patience", "asha_energy")
BASELINE_FAMILIES = ("patience", "asha")
GOAL_SAVED = 0.30  # the goal: at least 30% of the full run's trial-epochs saved
# STOP_PATIENCE's criterion, fixed before any replay of the suite's runs: the smallest k at which
# "alarm, then patience k" gives up no validation robust accuracy in the median trial and at most
# this much (10 of 1,000 validation images) in the worst trial, on every recipe. Validation only.
# A rule that stopped no trial gives up nothing at every k and so tells nothing: with no alarmed
# stop on any recipe there is no choice to make (the first replay, of `rice`, showed that case).
PATIENCE_WORST_REGRET = 0.01


def overfits(onset_rows: Sequence[dict[str, Any]]) -> bool:
    """A recipe overfits when most of its trials' validation robust loss has a minimum it then rises from."""
    return sum(r["truth"] is not None for r in onset_rows) > len(onset_rows) / 2


def judge(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each energy rule at each k against the goal: trial-epochs saved against the full run, its
    picks' test PGD-20 against the full run's (within 1 SE of it), and whether a baseline rule
    (plain patience, ASHA) at any k dominates it: no more trial-epochs and a higher accuracy, or
    fewer trial-epochs and no lower accuracy."""
    base = next(r for r in results if r["family"] == "none")
    base_pgd, base_se = mean_accuracy(base["picks"], "pgd")
    points = [(r["family"], r["k"], r["trial_epochs"], mean_accuracy(r["picks"], "pgd")[0]) for r in results]
    out = []
    for family, k, epochs, pgd in points:
        if family not in ENERGY_FAMILIES:
            continue
        dominated = [f"{f}:{kk}" for f, kk, e, a in points if f in BASELINE_FAMILIES
                     and ((e <= epochs and a > pgd) or (e < epochs and a >= pgd))]
        saved = 1 - epochs / base["trial_epochs"]
        out.append({"family": family, "k": k, "saved": saved, "delta": pgd - base_pgd, "se": base_se,
                    "within_1se": abs(pgd - base_pgd) <= base_se, "dominated_by": dominated,
                    "meets_goal": saved >= GOAL_SAVED and abs(pgd - base_pgd) <= base_se and not dominated})
    return out


def verdict_text(by_recipe: dict[str, list[dict[str, Any]]], onset_rows: dict[str, list[dict[str, Any]]]) -> str:
    """The goal's verdict per recipe: on a recipe that overfits, the energy rules that save 30% of
    trial-epochs within 1 SE of the full run's picks and that no baseline dominates; on one that
    does not, the energy rules that cost more than 1 SE."""
    lines = []
    for recipe, results in by_recipe.items():
        judged = judge(results)
        if overfits(onset_rows[recipe]):
            winners = [f"{j['family']}:{j['k']} (saves {j['saved']:.0%}, {j['delta']:+.4f})" for j in judged if j["meets_goal"]]
            lines.append(f"- **{recipe}** overfits (validation robust loss rises after its minimum in "
                         f"{sum(r['truth'] is not None for r in onset_rows[recipe])} of {len(onset_rows[recipe])} trials): "
                         + (f"the goal is met by {', '.join(winners)}." if winners else "no energy rule meets the goal."))
        else:
            costly = [f"{j['family']}:{j['k']} ({j['delta']:+.4f})" for j in judged if j["delta"] < -j["se"]]
            lines.append(f"- **{recipe}** does not overfit: "
                         + (f"energy rules costing more than 1 SE: {', '.join(costly)}." if costly else "no energy rule costs more than 1 SE."))
    return "\n".join(lines)


def chosen_patience(by_recipe: dict[str, list[dict[str, Any]]]) -> int | None:
    """STOP_PATIENCE by :data:`PATIENCE_WORST_REGRET`'s criterion, on validation numbers only; None
    when no k of the suite meets it, or when the rule stopped no trial at any k (no alarm led to a stop)."""
    if not any(r["stopped"] for results in by_recipe.values() for r in results if r["family"] == "alarm_patience"):
        return None
    for k in KS:
        rows = [r for results in by_recipe.values() for r in results if (r["family"], r["k"]) == ("alarm_patience", k)]
        if rows and all(r["val_regret_median"] <= 0 and r["val_regret_max"] <= PATIENCE_WORST_REGRET for r in rows):
            return k
    return None


def onset_table(by_recipe: dict[str, list[dict[str, Any]]]) -> str:
    lines = ["| recipe | trials | overfit (val loss) | onsets placed | matched | median abs error | worst abs error | false alarms | missed |",
             "|---|---|---|---|---|---|---|---|---|"]
    for recipe, rows in by_recipe.items():
        truth = [r for r in rows if r["truth"] is not None]
        placed = [r for r in rows if r["onset"] is not None]
        both = [abs(r["onset"] - r["truth"]) for r in rows if r["truth"] is not None and r["onset"] is not None]
        false = sum(1 for r in rows if r["truth"] is None and r["onset"] is not None)
        missed = sum(1 for r in rows if r["truth"] is not None and r["onset"] is None)
        med = f"{np.median(both):.0f}" if both else "-"
        worst = f"{max(both)}" if both else "-"
        lines.append(f"| {recipe} | {len(rows)} | {len(truth)} | {len(placed)} | {len(both)} | {med} | {worst} | {false} | {missed} |")
    return "\n".join(lines)


def pareto_figure(recipe: str, results: Sequence[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = next(r for r in results if r["family"] == "none")
    base_pgd, base_se = mean_accuracy(base["picks"], "pgd")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.axhspan(base_pgd - base_se, base_pgd + base_se, color="0.85", label="full run's picks +- 1 SE")
    ax.axhline(base_pgd, color="0.4", lw=1)
    markers = {"patience": "o", "asha": "^", "alarm_patience": "s", "energy_patience": "D", "asha_energy": "v"}
    labels: dict[tuple[float, float], list[str]] = {}  # one label per point: the k of every rule on it
    for family, marker in markers.items():  # baselines first: an energy rule that stops where one does lies on it
        rows = sorted((r for r in results if r["family"] == family), key=lambda r: r["trial_epochs"])
        if not rows:
            continue
        x = [r["trial_epochs"] / base["trial_epochs"] for r in rows]
        y = [mean_accuracy(r["picks"], "pgd")[0] for r in rows]
        if family in ENERGY_FAMILIES:  # dashed and hollow, so the baseline under it stays visible
            ax.plot(x, y, marker=marker, ls="--", markersize=5, markerfacecolor="none", label=family)
        else:
            ax.plot(x, y, marker=marker, markersize=9, alpha=0.7, label=family)
        for xi, yi, r in zip(x, y, rows, strict=True):
            ks = labels.setdefault((xi, yi), [])
            if str(r["k"]) not in ks:
                ks.append(str(r["k"]))
    for (xi, yi), ks in labels.items():
        ax.annotate(",".join(ks), (xi, yi), textcoords="offset points", xytext=(3, 3), fontsize=7)
    ax.axvline(0.7, color="0.6", ls=":", lw=1)
    ax.set_xlabel("trial-epochs, fraction of the full run's (dotted: the goal, 30% saved)")
    ax.set_ylabel("picks' test PGD-20 accuracy (mean of replicates)")
    ax.set_title(f"{recipe}: stopping rules across k (labels: k, or ASHA's grace period)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- commands ------------------------------------------------------------------------------------------------------


@contextmanager
def interruptible(script: str, *, again: str = "") -> Iterator[None]:
    """A study stopped by Ctrl-C: one line naming how to continue it and exit 130, as `energyat
    run` does, not a traceback. `again`: another way to continue, said after `energyat resume`."""
    from study.recovery import Interrupted

    try:
        yield
    except Interrupted as stopped:
        print(f"{script}: {stopped}{again}", file=sys.stderr)
        raise SystemExit(130) from None


@contextmanager
def bad_input_exits_2(script: str) -> Iterator[None]:
    """Bad input as energyat's own commands report it: one line and exit 2, not a traceback."""
    try:
        yield
    except EnergyatError as exc:
        print(f"{script}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def train(args: argparse.Namespace) -> None:
    from study.runner import run_study
    from study.spec import load_spec

    study = load_spec(str(SUITE), [*RECIPES[args.recipe], *args.overrides])
    with interruptible("stoppers.py"):
        study_dir, failed = run_study(study, address=None, storage=args.storage, name=f"stoppers-{args.recipe}")
    print(study_dir)
    if failed:
        raise SystemExit(f"trials failed: {failed}; `energyat resume {study_dir}` retries what can be retried")


def retrain_command(args: argparse.Namespace) -> None:
    """Each replicate's full-run pick trained again from its configuration and seed, to its last
    epoch, and its best epoch by validation evaluated by the trial's own final evaluation: PGD-20
    on the first `--n` test images, the original AutoAttack on the first `--autoattack-n`. One
    study per recipe (`retrain-<recipe>` under --storage); one already there is resumed, so an
    interrupted retrain continues where it stopped. For models that are gone (a study directory
    lost), or to measure them on another machine: a retrained model is the same one only where
    training is bit for bit the same (the same CPU's kernels and precision)."""
    from study.runner import resume_study, run_study
    from study.spec import load_spec

    rows = []
    for source in args.sources:
        recipe = recipe_of(source)
        if recipe not in RECIPES:
            raise EnergyatError(f"{source}: not a recipe's study or export (recipes: {', '.join(sorted(RECIPES))})")
        picks = {seed: pick_of(ts, replay(ts, "none", 0)) for seed, ts in replicates(load_trials(source)).items()}
        points = [{**json.loads(pick.config), "seed": seed} for seed, pick in picks.items()]
        study_dir = Path(args.storage) / f"retrain-{recipe}"
        with interruptible("stoppers.py", again="; or run this retrain again"):
            if (study_dir / "spec.yaml").exists():
                resume_study(study_dir, address=None)
            else:
                final = f"final_eval={{n: {args.n}, pgd_steps: 20, autoattack_n: {args.autoattack_n}}}"
                study = load_spec(str(SUITE), [*RECIPES[recipe], f"points_to_evaluate={json.dumps(points)}", "sampler={name: random}",
                                               f"samples={len(points)}", final, "keep_best_checkpoints=false", *args.overrides])
                run_study(study, address=None, storage=args.storage, name=study_dir.name)
        found = open_tables(str(study_dir)).execute(
            f"select {CONFIG_COLUMNS}, trial_id, status, best_epoch, final_pgd_acc, final_n, final_autoattack_acc, "
            "final_autoattack_n, train_precision from trials").fetchall()
        width = len(SEARCHED)
        retrained = {(configuration(r[:width]), int(r[width])): r[width + 1:] for r in found}
        for seed, pick in picks.items():
            trial_id, status, best, pgd, n, aa, aa_n, precision = retrained.get((pick.config, seed), (None,) * 8)
            rows.append({"recipe": recipe, "seed": seed, "config": pick.config, "pick": f"{pick.trial_id}@{pick.epoch}",
                         "trial_id": trial_id, "status": status, "best_epoch": best, "pgd": pgd, "n": n, "autoattack": aa,
                         "autoattack_n": aa_n, "precision": precision})
    lines = ["| recipe | seed | configuration | full run's pick | retrained: trial@best epoch | PGD-20 (n) | AutoAttack (n) | "
             "its SE | training precision |", "|---|---|---|---|---|---|---|---|---|"]

    def acc(value: float | None, n: int | None) -> str:
        return "-" if value is None or math.isnan(value) or not n else f"{value:.4f} ({n})"

    for r in rows:
        se = "-" if r["autoattack"] is None or not r["autoattack_n"] else f"{binomial_se(r['autoattack'], r['autoattack_n']):.4f}"
        lines.append(f"| {r['recipe']} | {r['seed']} | {r['config']} | {r['pick']} | {r['trial_id']}@{r['best_epoch']} ({r['status']}) | "
                     f"{acc(r['pgd'], r['n'])} | {acc(r['autoattack'], r['autoattack_n'])} | {se} | {r['precision']} |")
    header = (f"# {time.strftime('%Y-%m-%d %H:%M')} {os.cpu_count()} CPUs, git {git_sha()[:12]}, versions {versions()}\n"
              f"# python benchmarks/stoppers.py retrain {' '.join(args.sources)} --n {args.n} --autoattack-n {args.autoattack_n}")
    text = header + "\n\n" + "\n".join(lines) + "\n"
    print(text)
    (Path(args.storage) / "retrain.md").write_text(text)
    (Path(args.storage) / "retrain.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def study_key(source: str) -> str:
    """The study's name, from its directory or from the file `export` wrote of it."""
    name = Path(source).name
    return "stoppers-" + name.removesuffix(".csv.gz") if name.endswith(".csv.gz") else name


def recipe_of(source: str) -> str:
    name = study_key(source)
    return name.split("stoppers-", 1)[1] if name.startswith("stoppers-") else name


def replay_command(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.picks is not None:  # evaluations kept from an earlier replay: nothing is evaluated again
        accuracy = PickAccuracy(Path(args.picks), n=args.n, autoattack_n=args.autoattack_n, frozen=True)
    else:
        accuracy = PickAccuracy(out / "picks.jsonl", n=args.n, autoattack_n=args.autoattack_n)
    header = (f"# {time.strftime('%Y-%m-%d %H:%M')} {os.cpu_count()} CPUs, git {git_sha()[:12]}, versions {versions()}\n"
              f"# python benchmarks/stoppers.py replay {' '.join(args.studies)} --n {args.n} --autoattack-n {args.autoattack_n}"
              f" --autoattack-for {','.join(f'{f}:{k}' for f, k in sorted(args.autoattack_for))}")
    sections, by_recipe, everything, results_by_recipe = [header], {}, [], {}
    for study_dir in args.studies:
        recipe = recipe_of(study_dir)
        trials = load_trials(study_dir)
        if not trials:
            raise EnergyatError(f"{study_dir}: no finished trial")
        results = rule_rows(study_dir, trials, accuracy, autoattack_for=args.autoattack_for)
        sections.append(table(recipe, results, n=args.n))
        pareto_figure(recipe, results, out / f"pareto-{recipe}.png")
        by_recipe[recipe] = onsets(trials)
        results_by_recipe[recipe] = results
        everything += [{"recipe": recipe, **r} for r in results]
        print(sections[-1], flush=True)
    sections.append("Offline onset against the validation robust-loss minimum:\n\n" + onset_table(by_recipe))
    patience = chosen_patience(results_by_recipe)
    sections.append("Verdict (energy rules: alarm_patience, energy_patience, asha_energy; baselines: patience, asha):\n\n"
                    + verdict_text(results_by_recipe, by_recipe)
                    + f"\n\nSTOP_PATIENCE by its validation criterion (median trial gives up nothing, worst at most "
                    f"{PATIENCE_WORST_REGRET}): {patience if patience is not None else 'none: no k meets it, or no alarm stopped a trial'}")
    text = "\n\n".join(sections) + "\n"
    print(sections[-1])
    (out / "stoppers.md").write_text(text)
    (out / "stoppers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in everything))
    (out / "onsets.json").write_text(json.dumps(by_recipe, indent=1))


def export_command(args: argparse.Namespace) -> None:
    to = Path(args.to)
    to.mkdir(parents=True, exist_ok=True)
    for study_dir in args.studies:
        export(load_trials(study_dir), to / f"{recipe_of(study_dir)}.csv.gz")
    if args.picks:
        keys = {study_key(s) for s in args.studies}
        kept = [line for line in Path(args.picks).read_text().splitlines() if json.loads(line)["key"].split("/")[0] in keys]
        (to / "picks.jsonl").write_text("".join(line + "\n" for line in kept))


def parse_rule(text: str) -> tuple[str, int]:
    """FAMILY:K (K omitted for none)."""
    family, _, k = text.partition(":")
    if family not in FAMILIES or (family != "none" and not k.isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r}: expected FAMILY:K with FAMILY one of {', '.join(FAMILIES)}")
    return family, int(k or 0)


def rule_list(text: str) -> frozenset[tuple[str, int]]:
    return frozenset(parse_rule(t) for t in text.split(",") if t)


def live_command(args: argparse.Namespace) -> None:
    family, k = args.rule
    full = {(t.config, t.seed): t for t in load_trials(args.full)}
    live = load_trials(args.live)
    agree, lines = 0, []
    for seed, ts in replicates(live).items():
        # the full runs of the live study's configurations, in the live study's order
        mirrored = [full[(t.config, seed)] for t in ts]
        stops = replay(mirrored, family, k)
        for t, m in zip(ts, mirrored, strict=True):
            same = t.epochs == stops[m.trial_id] + 1
            agree += same
            lines.append(f"seed {seed} {t.config}: live {t.epochs} epochs, replay {stops[m.trial_id] + 1}{'' if same else '  <- differs'}")
    print("\n".join(lines))
    print(f"{agree} of {len(live)} trials ran the same epochs live and in the replay")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="run one recipe's full study")
    p.add_argument("recipe", choices=sorted(RECIPES))
    p.add_argument("--storage", default="runs/suite")
    p.add_argument("--set", action="append", default=[], dest="overrides")
    p = sub.add_parser("replay", help="replay every rule on full studies")
    p.add_argument("studies", nargs="+")
    p.add_argument("--out", default="runs/suite/report")
    p.add_argument("--n", type=int, default=2500, help="test images for the picks' PGD-20 accuracy")
    p.add_argument("--autoattack-n", type=int, default=1000, help="test images for the picks' AutoAttack accuracy (0: skip)")
    p.add_argument("--autoattack-for", type=rule_list, default=frozenset(), metavar="FAMILY:K,...",
                   help="the rules whose picks AutoAttack also evaluates, besides the full run's (it costs minutes per pick on a CPU)")
    p.add_argument("--picks", default=None, help="a picks.jsonl kept from an earlier replay: read, never evaluated again (with exported rows)")
    p = sub.add_parser("export", help="keep the rows the replay reads, one .csv.gz per recipe, with the picks' evaluations")
    p.add_argument("studies", nargs="+")
    p.add_argument("--to", required=True)
    p.add_argument("--picks", default=None, help="the replay's picks.jsonl, whose entries for these studies are kept")
    p = sub.add_parser("retrain", help="train each replicate's full-run pick again and evaluate it (PGD-20 and AutoAttack)")
    p.add_argument("sources", nargs="+", help="recipes' full studies, or the files `export` wrote of them")
    p.add_argument("--storage", default="runs/suite")
    p.add_argument("--n", type=int, default=2500, help="test images for PGD-20")
    p.add_argument("--autoattack-n", type=int, default=2500, help="test images for AutoAttack")
    p.add_argument("--set", action="append", default=[], dest="overrides")
    p = sub.add_parser("live", help="a live study's stops against the replay of its rule")
    p.add_argument("live")
    p.add_argument("--full", required=True)
    p.add_argument("--rule", required=True, type=parse_rule, help="FAMILY:K, e.g. patience:6 or asha:4")
    args = parser.parse_args(argv)
    with bad_input_exits_2("stoppers.py"):
        {"train": train, "replay": replay_command, "export": export_command, "retrain": retrain_command, "live": live_command}[args.command](args)


if __name__ == "__main__":
    main()
