"""The stopping-rule suite (benchmarks/stoppers.py) end to end at a size CI runs: a recipe's full
study on digits, every rule replayed on it, the picks evaluated from their kept checkpoints, and a
live study with a stop rule against the replay of that rule. Real Ray Tune, real Optuna, real
Parquet."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT

from analysis.query import open_tables

sys.path.insert(0, str(ROOT / "benchmarks"))
import remedies  # noqa: E402  (benchmarks/ is not a package)
import stoppers  # noqa: E402

TINY = [  # the suite's base study cut to digits, 4 trials (2 configurations x 2 seeds) of 8 epochs
    "dataset={name: digits, train_size: 300, val_size: 200}", "model=small_cnn", "batch_size=64",
    "attack={eps: 0.15, steps: 2}", "eval_attack={steps: 3}", "probe={train_size: 32, test_size: 0, every: 1, samples_every: 0}",
    "final_eval={n: 120, pgd_steps: 20, autoattack_n: 0}", "samples=4", "lr=0.05",
    "search={method: [sat, trades], seed: {choices: [0, 1]}}", "max_concurrent=2",
]


def _suite(*args: str) -> str:
    proc = subprocess.run([sys.executable, "benchmarks/stoppers.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> Path:
    storage = tmp_path_factory.mktemp("suite")
    sets = [f"--set={s}" for s in TINY]
    _suite("train", "two_drops", "--storage", str(storage), *sets, "--set=epochs=8")
    return storage / "stoppers-two_drops"


def test_the_replay_reports_every_rule_and_evaluates_the_picks_from_their_checkpoints(full: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    _suite("replay", str(full), "--out", str(out), "--n", "120", "--autoattack-n", "8", "--autoattack-for", "patience:2")
    results = [json.loads(line) for line in (out / "stoppers.jsonl").read_text().splitlines()]
    families = {(r["family"], r["k"]) for r in results}
    assert ("none", 0) in families and {("patience", k) for k in stoppers.KS} <= families
    assert {("asha", k) for k in stoppers.KS if k < 8} <= families and ("asha", 8) not in families  # a grace period no trial passes
    assert (out / "pareto-two_drops.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "false alarms" in (out / "stoppers.md").read_text()
    # the full run's pick is the study's best trial at its best epoch, and its checkpoint of that
    # epoch gives exactly the trial's own final evaluation (same n, steps, seed): the right weights
    con = open_tables(full)
    none = next(r for r in results if r["family"] == "none")
    for pick in none["picks"]:
        best_trial, best_epoch, final_pgd, n_trials = con.execute(
            "select first(trial_id order by best_val_robust_acc desc, trial_id), first(best_epoch order by best_val_robust_acc desc, trial_id), "
            "first(final_pgd_acc order by best_val_robust_acc desc, trial_id), count(*) from trials where seed = $s",
            {"s": pick["seed"]},
        ).fetchone()
        assert n_trials == 2
        assert pick["val"] == max(r[0] for r in con.execute("select best_val_robust_acc from trials where seed = $s", {"s": pick["seed"]}).fetchall())
        if pick["trial_id"] == best_trial:  # the tie-break (configuration, not trial id) can pick the other of a tie
            assert pick["epoch"] == best_epoch
            assert pick["pgd"]["accuracy"] == pytest.approx(final_pgd, abs=1e-12)
        assert pick["pgd"]["n"] == 120 and math.isfinite(pick["clean"]["accuracy"])
    # AutoAttack (8 images here) on the full run's picks and on those of the rules asked for, only
    for r in results:
        asked = r["family"] == "none" or (r["family"], r["k"]) == ("patience", 2)
        assert all(("autoattack" in p) == asked for p in r["picks"]), r
        assert all(p["autoattack"]["n"] == 8 for p in r["picks"] if asked)
    assert all(r["trial_epochs"] <= none["trial_epochs"] for r in results)  # no rule runs longer than the full run

    # a larger AutoAttack sample attacks only the images the cache has not: the first 8 are kept,
    # images 8-11 are attacked now and the counts add up
    _suite("replay", str(full), "--out", str(out), "--n", "120", "--autoattack-n", "12")
    wider = next(json.loads(line) for line in (out / "stoppers.jsonl").read_text().splitlines() if json.loads(line)["family"] == "none")
    for before, after in zip(none["picks"], wider["picks"], strict=True):
        assert (after["trial_id"], after["epoch"], after["pgd"]) == (before["trial_id"], before["epoch"], before["pgd"])
        pick = stoppers.Pick(after["trial_id"], after["epoch"], after["val"], after["config"])
        rest = stoppers.evaluate_pick(str(full), pick, n=0, autoattack_n=12, autoattack_start=8)["autoattack"]
        correct = before["autoattack"]["correct"] + rest["correct"]
        assert {k: after["autoattack"][k] for k in ("n", "correct", "accuracy", "parts")} == {
            "n": 12, "correct": correct, "accuracy": correct / 12, "parts": [8, 4]}


def test_exported_rows_and_kept_evaluations_replay_to_the_same_tables(full: Path, tmp_path: Path) -> None:
    # what tests/data keeps of a suite run: the rows the replay reads and the picks' evaluations;
    # replayed from those alone, the tables are the study's own
    first = tmp_path / "first"
    _suite("replay", str(full), "--out", str(first), "--n", "64", "--autoattack-n", "0")
    _suite("export", str(full), "--to", str(tmp_path / "data"), "--picks", str(first / "picks.jsonl"))
    again = tmp_path / "again"
    data = tmp_path / "data" / "two_drops.csv.gz"
    _suite("replay", str(data), "--out", str(again), "--n", "64", "--autoattack-n", "0", "--picks", str(tmp_path / "data" / "picks.jsonl"))

    def tables(folder: Path) -> list[str]:
        return [line for line in (folder / "stoppers.md").read_text().splitlines() if line.startswith(("|", "**"))]

    assert tables(again) == tables(first) and len(tables(first)) > 30
    assert (again / "onsets.json").read_text() == (first / "onsets.json").read_text()
    # a pick the kept evaluations lack is refused, not evaluated (there are no checkpoints here)
    proc = subprocess.run([sys.executable, "benchmarks/stoppers.py", "replay", str(data), "--out", str(tmp_path / "x"), "--n", "65",
                           "--picks", str(tmp_path / "data" / "picks.jsonl")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "has no evaluation of the pick" in proc.stderr


def test_a_live_study_with_a_stop_rule_stops_where_the_replay_does(full: Path, tmp_path: Path) -> None:
    sets = [f"--set={s}" for s in TINY]
    # patience 1: a trial stops at its first epoch without a new best (a tie counts), so in 8 epochs
    # some stop early and the comparison is about real stops
    live = tmp_path / "stoppers-two_drops"
    _suite("train", "two_drops", "--storage", str(tmp_path), *sets, "--set=epochs=8", "--set=early_stop={val_patience: 1}")
    assert open_tables(live).execute("select count(*) from trials where epochs_run < 8").fetchone()[0] >= 1
    text = _suite("live", str(live), "--full", str(full), "--rule", "patience:1")
    assert "4 of 4 trials ran the same epochs live and in the replay" in text, text


def test_retrain_trains_each_pick_again_into_the_same_model_and_evaluates_it(full: Path, tmp_path: Path) -> None:
    # the same configuration and seed on the same CPU train bit for bit the same: each retrained
    # pick has the full run's best epoch and final PGD accuracy, and its AutoAttack on the images asked
    sets = [f"--set={s}" for s in TINY if not s.startswith(("samples=", "search=", "final_eval="))]
    _suite("retrain", str(full), "--storage", str(tmp_path), "--n", "120", "--autoattack-n", "6", *sets, "--set=epochs=8")
    rows = [json.loads(line) for line in (tmp_path / "retrain.jsonl").read_text().splitlines()]
    con = open_tables(full)
    for seed, row in zip((0, 1), rows, strict=True):
        trial_id, epoch = row["pick"].split("@")
        best_epoch, final_pgd = con.execute("select best_epoch, final_pgd_acc from trials where trial_id = $t", {"t": trial_id}).fetchone()
        assert (row["seed"], row["status"], row["best_epoch"], int(epoch)) == (seed, "TERMINATED", best_epoch, best_epoch)
        assert (row["pgd"], row["n"], row["autoattack_n"]) == (final_pgd, 120, 6) and 0 <= row["autoattack"] <= 1
    assert (tmp_path / "retrain.md").read_text().count("| two_drops |") == 2
    # run again, the retrain is resumed, not trained anew
    _suite("retrain", str(full), "--storage", str(tmp_path), "--n", "120", "--autoattack-n", "6", *sets, "--set=epochs=8")
    assert [json.loads(line) for line in (tmp_path / "retrain.jsonl").read_text().splitlines()] == rows


def test_a_pick_at_an_epoch_without_a_kept_checkpoint_is_refused_in_one_line(full: Path) -> None:
    from analysis.errors import StoreError
    from trainables.subjects import trial_subject

    trial_id = open_tables(full).execute("select min(trial_id) from trials").fetchone()[0]
    with pytest.raises(StoreError, match="kept no checkpoint of epoch 999"):
        trial_subject(str(full), trial_id, epoch=999)
    assert trial_subject(str(full), trial_id, epoch=0).weights.endswith("best-e0000.pt")  # epoch 0 is always a new best


def _result(family: str, k: int, trial_epochs: int, pgd: float, regret: tuple[float, float] = (0.0, 0.0), stopped: int = 3) -> dict:
    picks = [{"seed": s, "pgd": {"accuracy": pgd, "n": 2500}} for s in (0, 1)]
    return {"family": family, "k": k, "trial_epochs": trial_epochs, "picks": picks, "val_regret_median": regret[0], "val_regret_max": regret[1],
            "stopped": stopped}


def test_a_suite_study_stopped_by_ctrl_c_is_one_line_naming_how_to_continue_and_exit_130(capsys: pytest.CaptureFixture[str]) -> None:
    # what `train`, `retrain` and remedies.py's `train` do with the Interrupted a study stopped by
    # Ctrl-C raises (study.runner): `energyat run`'s line and status, no traceback
    from study.recovery import Interrupted

    with pytest.raises(SystemExit) as exc, stoppers.interruptible("stoppers.py", again="; or run this retrain again"):
        raise Interrupted("runs/retrain-rice")
    assert exc.value.code == 130
    assert capsys.readouterr().err == ("stoppers.py: runs/retrain-rice was interrupted before it finished; "
                                       "`energyat resume runs/retrain-rice` continues it; or run this retrain again\n")
    with stoppers.interruptible("stoppers.py"):  # a study that ends is let through
        pass


def test_the_verdict_applies_the_goal_saved_within_one_se_and_not_dominated() -> None:
    # the full run's picks: 0.50 on 2 x 2,500 images, SE 0.0071
    results = [_result("none", 0, 100, 0.50), _result("patience", 2, 60, 0.49), _result("asha", 2, 40, 0.47),
               _result("alarm_patience", 2, 65, 0.50),  # saves 35%, no loss, no baseline dominates: meets the goal
               _result("energy_patience", 2, 80, 0.50),  # saves 20%: short of 30%
               _result("asha_energy", 2, 50, 0.48),  # 2 points below: more than 1 SE
               _result("alarm_patience", 4, 62, 0.485)]  # patience:2 has fewer trial-epochs and more accuracy: dominated
    judged = {(j["family"], j["k"]): j for j in stoppers.judge(results)}
    assert set(judged) == {("alarm_patience", 2), ("energy_patience", 2), ("asha_energy", 2), ("alarm_patience", 4)}
    assert judged[("alarm_patience", 2)]["meets_goal"] and judged[("alarm_patience", 2)]["saved"] == pytest.approx(0.35)
    assert not judged[("energy_patience", 2)]["meets_goal"] and judged[("energy_patience", 2)]["within_1se"]
    assert not judged[("asha_energy", 2)]["within_1se"] and judged[("asha_energy", 2)]["se"] == pytest.approx(math.sqrt(0.25 / 2500) / math.sqrt(2))
    assert judged[("alarm_patience", 4)]["dominated_by"] == ["patience:2"]
    overfit = [{"truth": 30}, {"truth": 41}, {"truth": None}]
    flat = [{"truth": None}, {"truth": None}, {"truth": 12}]
    text = stoppers.verdict_text({"rice": results, "onecycle": results}, {"rice": overfit, "onecycle": flat})
    assert ("**rice** overfits (validation robust loss rises after its minimum in 2 of 3 trials): "
            "the goal is met by alarm_patience:2 (saves 35%") in text
    assert "**onecycle** does not overfit: energy rules costing more than 1 SE: asha_energy:2 (-0.0200), alarm_patience:4 (-0.0150)." in text


def test_stop_patience_is_the_smallest_k_whose_validation_regret_meets_the_criterion() -> None:
    def recipe(regrets: dict[int, tuple[float, float]]) -> list[dict]:
        return [_result("alarm_patience", k, 100, 0.5, regrets.get(k, (0.0, 0.0))) for k in stoppers.KS]

    a = recipe({2: (0.0, 0.05), 4: (0.0, 0.02)})
    b = recipe({2: (0.001, 0.01), 4: (0.0, 0.01), 6: (0.0, 0.02)})
    assert stoppers.chosen_patience({"a": a, "b": b}) == 8  # 2 and 4 fail on a, 6 on b
    assert stoppers.chosen_patience({"a": a}) == 6
    assert stoppers.chosen_patience({"a": recipe(dict.fromkeys(stoppers.KS, (0.0, 0.5)))}) is None
    # a rule that stopped nothing gives up nothing at every k: no choice, not the smallest k
    silent = [_result("alarm_patience", k, 100, 0.5, stopped=0) for k in stoppers.KS]
    assert stoppers.chosen_patience({"a": silent}) is None


KEPT = ROOT / "tests" / "data" / "stoppers"  # the suite's four recipes, 96 trials (BENCHMARKS.md section 4.1)
KEPT_RECIPES = ("rice", "two_drops", "single_drop", "onecycle")
FIRST_DROPS = {"rice": 40, "two_drops": 15, "single_drop": 40, "onecycle": 19}  # where each recipe's lr first falls to half its peak


@pytest.fixture(scope="module")
def kept_replay(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("kept")
    stoppers.main(["replay", *(str(KEPT / f"{r}.csv.gz") for r in KEPT_RECIPES), "--out", str(out), "--n", "2500",
                   "--autoattack-n", "1000", "--autoattack-for", "asha:15,asha:19,asha:40", "--picks", str(KEPT / "picks.jsonl")])
    rows = [json.loads(line) for line in (out / "stoppers.jsonl").read_text().splitlines()]
    return {"by": {(r["recipe"], r["family"], r["k"]): r for r in rows}, "onsets": json.loads((out / "onsets.json").read_text()),
            "text": (out / "stoppers.md").read_text()}


def _models(row: dict[str, Any]) -> list[tuple[str, int]]:
    """A rule's picks as the models they are (trial, epoch), whatever evaluations they carry."""
    return [(x["trial_id"], x["epoch"]) for x in row["picks"]]


def test_the_suites_kept_rows_replay_to_what_benchmarks_quotes(kept_replay: dict[str, Any]) -> None:
    by, recipes = kept_replay["by"], KEPT_RECIPES
    # the energy signal changed almost no stop: below k = 20 energy-informed patience stops where
    # plain patience does and ASHA's energy cut where ASHA does; at 20 they save 2 to 20
    # trial-epochs more, with the same picks
    for recipe in recipes:
        for energy, plain in (("energy_patience", "patience"), ("asha_energy", "asha")):
            for k in stoppers.KS:
                e, p = by[recipe, energy, k], by[recipe, plain, k]
                assert _models(e) == _models(p)
                assert e["trial_epochs"] == p["trial_epochs"] if k < 20 else p["trial_epochs"] - 20 <= e["trial_epochs"] <= p["trial_epochs"]
    # "alarm, then patience" stops only the trials that alarmed (1 on rice, 5 on single_drop) and gives up nothing
    assert [by[r, "alarm_patience", 2]["stopped"] for r in recipes] == [1, 0, 5, 0]
    assert [by[r, "alarm_patience", 2]["trial_epochs"] for r in recipes] == [1899, 720, 2279, 720]
    assert all(by[r, "alarm_patience", k]["val_regret_max"] == 0 for r in recipes for k in stoppers.KS)
    # the full runs' picks and ASHA at grace 15 (the quickstart's first lr drop), PGD-20 on 2,500 test images
    pgd = {r: stoppers.mean_accuracy(by[r, "none", 0]["picks"], "pgd")[0] for r in recipes}
    assert [round(pgd[r], 4) for r in recipes] == [0.5918, 0.5580, 0.5934, 0.5750]
    # and the original AutoAttack on the first 1,000 of them, 2 to 3 points below PGD-20
    aa = {r: stoppers.mean_accuracy(by[r, "none", 0]["picks"], "autoattack")[0] for r in recipes}
    assert [round(aa[r], 4) for r in recipes] == [0.5640, 0.5315, 0.5685, 0.5475]
    assert all(0.02 <= pgd[r] - aa[r] <= 0.03 for r in recipes)
    # ASHA's picks under AutoAttack: at grace 15, and at the first drop (40, 15, 40, 19)
    aa_asha = [round(stoppers.mean_accuracy(by[r, "asha", k]["picks"], "autoattack")[0], 4) for r in recipes for k in (15, FIRST_DROPS[r])]
    assert aa_asha == [0.5625, 0.5640, 0.5315, 0.5315, 0.5625, 0.5685, 0.5475, 0.5420]
    assert [by[r, "asha", 15]["trial_epochs"] for r in recipes] == [785, 525, 865, 540]
    # ASHA at each recipe's first lr drop (OneCycle: the middle of its decay) keeps the full run's
    # picks on the three piecewise recipes
    drops = [stoppers.first_drop(stoppers.load_exported(str(KEPT / f"{r}.csv.gz"))[0].rows) for r in recipes]
    assert drops == list(FIRST_DROPS.values())
    assert [by[r, "asha", d]["trial_epochs"] for r, d in zip(recipes, drops, strict=True)] == [1360, 525, 1520, 599]
    assert all(_models(by[r, "asha", d]) == _models(by[r, "none", 0]) for r, d in zip(recipes[:3], drops[:3], strict=True))
    assert _models(by["onecycle", "asha", drops[3]]) != _models(by["onecycle", "none", 0])
    # the default patience is the one the pre-fixed validation criterion picks on these rows
    from analysis.phases import STOP_PATIENCE

    assert f"STOP_PATIENCE by its validation criterion (median trial gives up nothing, worst at most 0.01): {STOP_PATIENCE}" in kept_replay["text"]
    # the offline onset against the validation robust-loss minimum: 5 trials overfit, all placed
    onsets = kept_replay["onsets"]
    errors = sorted(abs(o["onset"] - o["truth"]) for r in recipes for o in onsets[r] if o["truth"] is not None)
    assert errors == [2, 2, 2, 6, 10]
    assert sum(o["truth"] is None and o["onset"] is not None for r in recipes for o in onsets[r]) == 1


@pytest.mark.parametrize("script, argv", [(stoppers, ["retrain", "no/such/study"]), (remedies, ["report", "no/such/study"])])
def test_a_suite_script_given_a_path_that_is_no_study_says_so_in_one_line_and_exits_2(
        script: Any, argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        script.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no/such/study" in err, err
