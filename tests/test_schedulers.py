"""Ray Tune's schedulers in a study (`scheduler:`) and plain patience (`early_stop.val_patience`):
a trial any of them stops still gets its final evaluation, its `trials` row saying who stopped it,
and its value in Optuna. Real Ray Tune, real Optuna journal, digits."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml
from test_study import assert_journal_matches_tune, assert_tables_consistent, energyat, journal_trials

from analysis.errors import SpecError
from analysis.query import open_tables
from analysis.stopping import StopRule
from study.sampler import check_sampler
from study.scheduler import Asha, AshaEnergy, KeepInSearch, Median, asha_rungs, build_scheduler
from study.scheduler_keys import check_scheduler, check_scheduler_for

SPEC = {
    "name": "sched", "dataset": {"name": "digits", "train_size": 200, "val_size": 200}, "model": "small_cnn", "method": "sat",
    "epochs": 4, "batch_size": 64, "attack": {"eps": 0.15, "steps": 2}, "eval_attack": {"steps": 3},
    "probe": {"train_size": 32, "test_size": 32}, "final_eval": {"n": 64, "pgd_steps": 3, "autoattack_n": 0}, "device": "cpu",
    "seed": 0, "max_concurrent": 2, "search": {"lr": [0.001, 0.3, "log"]}, "sampler": {"name": "random", "seed": 1},
}


@pytest.mark.parametrize(("block", "key"), [
    ({"name": "hyperband"}, "scheduler.name"),
    ({"name": "pbt", "quantile_fraction": 0.7}, "scheduler.quantile_fraction"),
    ({"name": "pbt", "perturbation_interval": 0}, "scheduler.perturbation_interval"),
    ({"name": "asha", "max_t": 10}, "scheduler.max_t"),  # the study's epochs
    ({"name": "asha", "metric": "val_robust_acc"}, "scheduler.metric"),  # the study's objective
    ({"name": "asha", "reduction_factor": 1}, "scheduler.reduction_factor"),
    ({"name": "asha", "grace_period": 0}, "scheduler.grace_period"),
    ({"name": "asha", "grace_period": 1.5}, "scheduler.grace_period"),
    ({"name": "median", "hard_stop": False}, "scheduler.hard_stop"),
    ({"name": "median", "min_samples_required": True}, "scheduler.min_samples_required"),
    (["asha"], "scheduler"),
])
def test_a_bad_scheduler_block_names_its_key(block: object, key: str) -> None:
    with pytest.raises(SpecError, match=f"`{key}`"):
        check_scheduler(block)


@pytest.mark.parametrize(("search", "extra", "key"), [
    ({"method": ["sat", "trades"], "lr": [0.01, 0.1]}, {}, "search.method"),  # a model cannot change its method mid-run
    ({"beta": [1.0, 6.0]}, {}, "search.beta"),  # sat does not read beta: nothing to perturb
    ({}, {}, "search"),
    ({"lr": [0.01, 0.1]}, {"objectives": 2}, "objective"),
    ({"lr": [0.01, 0.1]}, {"sampler": check_sampler({"name": "tpe"})}, "sampler"),
])
def test_pbt_refuses_what_it_cannot_search(search: dict, extra: dict, key: str) -> None:
    from study.space import parse_search

    dims = parse_search(search, {"method": "sat", "dataset": {"name": "digits"}})
    with pytest.raises(SpecError, match=f"`{key}`"):
        check_scheduler_for(check_scheduler("pbt"), epochs=10, dims=dims, base_method="sat", **extra)


def test_a_grace_period_no_trial_reaches_is_refused() -> None:
    check_scheduler_for(check_scheduler({"name": "asha", "grace_period": 3}), epochs=4, base_method="sat")
    with pytest.raises(SpecError, match="grace_period"):
        check_scheduler_for(check_scheduler({"name": "asha", "grace_period": 4}), epochs=4, base_method="sat")


def test_each_scheduler_is_tunes_own_counted_in_epochs_on_the_objective() -> None:
    asha = build_scheduler(check_scheduler({"name": "asha", "grace_period": 2, "reduction_factor": 3}), study_dir="/s",
                           metric="best_val_robust_acc", epochs=30)
    assert isinstance(asha, Asha) and asha._time_attr == "training_iteration" and asha.metric == "best_val_robust_acc"
    assert asha._max_t == 30 and [m for m, _ in asha._brackets[0]._rungs] == [18, 6, 2]
    median = build_scheduler(check_scheduler("median"), study_dir="/s", metric="best_val_clean_acc", epochs=30)
    assert isinstance(median, Median) and median._grace_period == 1 and median._hard_stop
    assert type(build_scheduler(check_scheduler("none"), study_dir="/s", metric="m", epochs=3)).__name__ == "FIFOScheduler"


def test_pbt_ranks_on_the_value_of_the_checkpoint_it_clones() -> None:
    # the epoch's own validation number at the (0-based) epochs the trials checkpoint at, not the
    # running best, which may belong to an epoch whose weights are long gone
    pbt = build_scheduler(check_scheduler("pbt"), study_dir="/s", metric="best_val_clean_acc", epochs=40, probe_every=3)
    assert (pbt._metric, pbt._time_attr, pbt._perturbation_interval) == ("val_clean_acc", "epoch", 6)
    assert build_scheduler(check_scheduler("pbt"), study_dir="/s", metric="best_val_robust_acc", epochs=40)._metric == "val_robust_acc"
    check_scheduler_for(check_scheduler({"name": "pbt", "perturbation_interval": 4}), epochs=10, base_method="sat",
                        dims=_lr_dims(), probe_every=2)
    with pytest.raises(SpecError, match="not a multiple of probe.every"):
        check_scheduler_for(check_scheduler({"name": "pbt", "perturbation_interval": 3}), epochs=10, base_method="sat",
                            dims=_lr_dims(), probe_every=2)


def _lr_dims() -> tuple:
    from study.space import parse_search

    return tuple(parse_search({"lr": [0.01, 0.1]}, {"method": "sat", "dataset": {"name": "digits"}}))


@pytest.mark.parametrize(("grace", "rf", "max_t"), [(2, 3, 30), (1, 4, 4), (5, 2, 80), (15, 2, 30), (3, 2.5, 50)])
def test_asha_energy_judges_at_tunes_own_rungs(grace: int, rf: float, max_t: int) -> None:
    asha = build_scheduler(check_scheduler({"name": "asha", "grace_period": grace, "reduction_factor": rf}), study_dir="/s",
                           metric="best_val_robust_acc", epochs=max_t)
    assert asha_rungs(grace_period=grace, reduction_factor=rf, max_t=max_t) == tuple(sorted(m for m, _ in asha._brackets[0]._rungs))


class _Trial:
    def __init__(self, trial_id: str) -> None:
        self.trial_id = trial_id


def _feed(sched: AshaEnergy, trial_id: str, curve: list[tuple[bool, float]]) -> int | None:
    """Report (alarm, running best) per epoch; the epoch (1-based, Tune's training_iteration) at
    which the trial was asked to stop, or None. The curves stop short of max_t, where ASHA
    stops every trial (its last epoch ends it anyway)."""
    trial = _Trial(trial_id)
    sched.on_trial_add(None, trial)
    for t, (alarm, best) in enumerate(curve, start=1):
        sched.on_trial_result(None, trial, {"training_iteration": t, "best_val_robust_acc": best, "alarm": alarm})
        if trial_id in sched.asked:
            return t
    return None


def test_asha_energy_cuts_at_a_rung_a_trial_that_has_not_improved_since_its_alarm(tmp_path: Path) -> None:
    # rungs at 2, 6, 18 of 30; the trials rank the same at every rung, so ASHA alone cuts none
    # of the leaders: what stops them below is the energy cut
    sched = build_scheduler(check_scheduler({"name": "asha_energy", "grace_period": 2, "reduction_factor": 3}),
                            study_dir=str(tmp_path), metric="best_val_robust_acc", epochs=30)
    assert isinstance(sched, AshaEnergy) and sched.rungs == (2, 6, 18)
    flat = [(e >= 3, 0.9) for e in range(29)]  # alarm from epoch 4 on (t = 4), best flat since: cut at the rung t = 6
    assert _feed(sched, "a", flat) == 6
    assert (tmp_path / "stops" / "a").read_text() == "scheduler: asha_energy"
    rising = [(e >= 3, 0.9 + 0.001 * e) for e in range(29)]  # alarmed, but its best keeps rising: no cut
    assert _feed(sched, "b", rising) is None
    at_rung = [(e >= 5, 0.95) for e in range(29)]  # alarmed at the rung itself (t = 6): not yet; at 18, yes
    assert _feed(sched, "c", at_rung) == 18
    quiet = [(False, 0.96) for _ in range(29)]  # no alarm: ASHA's decision only
    assert _feed(sched, "d", quiet) is None
    # a trial ranked low at a rung is cut by ASHA as before, with ASHA's reason
    assert _feed(sched, "e", [(False, 0.1)] * 29) == 2
    assert (tmp_path / "stops" / "e").read_text() == "scheduler: asha"


def _run(tmp_path: Path, **keys: object) -> Path:
    spec = {k: v for k, v in {**SPEC, **keys}.items() if v is not None}  # a key given as None is left out
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    energyat("run", str(tmp_path / "spec.yaml"), "--storage", str(tmp_path / "studies"))
    return tmp_path / "studies" / "sched"


def _stopped(study: Path, reason: str) -> list[tuple]:
    con = open_tables(study)
    return con.execute(
        "select trial_id, status, epochs_run, final_clean_acc, final_pgd_acc, best_val_robust_acc from trials where stop_reason = $r",
        {"r": reason},
    ).fetchall()


def test_a_trial_asha_stops_is_evaluated_recorded_and_told_to_optuna(tmp_path: Path) -> None:
    study = _run(tmp_path, samples=6, scheduler={"name": "asha", "grace_period": 1, "reduction_factor": 2})
    assert_tables_consistent(study)
    stopped = _stopped(study, "scheduler: asha")
    assert stopped, "ASHA stopped no trial of 6 (rungs at epochs 1 and 2 of 4)"
    for trial_id, status, epochs_run, clean, pgd, best in stopped:
        assert status == "TERMINATED" and epochs_run in (1, 2)  # at a rung: where Tune would have stopped it
        assert math.isfinite(clean) and math.isfinite(pgd) and math.isfinite(best)  # its final evaluation ran
        assert (study / "stops" / trial_id).read_text() == "scheduler: asha"
        evals = open_tables(study).execute("select count(*) from evals where trial_id = $t", {"t": trial_id}).fetchone()
        assert evals == (2,)  # clean and PGD rows of the final evaluation
    # Optuna has every trial, the stopped ones COMPLETE with their rows' objective
    assert_journal_matches_tune(study)
    assert len(journal_trials(study)) == 6


def test_a_trial_median_stopping_stops_is_evaluated_and_recorded(tmp_path: Path) -> None:
    study = _run(tmp_path, samples=5, max_concurrent=1, scheduler={"name": "median", "grace_period": 1, "min_samples_required": 1},
                 early_stop={"energy_divergence": True, "patience": 0})
    assert_tables_consistent(study)
    stopped = _stopped(study, "scheduler: median")
    assert stopped, "the median rule stopped no trial of 5"
    for _trial_id, status, epochs_run, clean, pgd, _best in stopped:
        assert status == "TERMINATED" and 1 <= epochs_run < 4 and math.isfinite(clean) and math.isfinite(pgd)
    assert_journal_matches_tune(study)


def test_val_patience_stops_after_that_many_epochs_without_a_new_best(tmp_path: Path) -> None:
    from trainables.config import parse_trial
    from trainables.engine import run_trial

    cfg = parse_trial({k: v for k, v in SPEC.items() if k not in ("search", "sampler", "max_concurrent")} | {"epochs": 8, "lr": 0.002})
    result = run_trial(cfg, out=tmp_path, stop=StopRule(val_patience=2))
    acc = [a for (a,) in open_tables(tmp_path).execute("select val_robust_acc from epochs order by epoch").fetchall()]
    # the rule replayed on the stored curve: the first epoch two epochs past the running best
    best_epoch, expected = 0, None
    for epoch, value in enumerate(acc):
        if value > acc[best_epoch]:
            best_epoch = epoch
        if epoch - best_epoch >= 2:
            expected = epoch
            break
    if expected is None:
        assert result["stop_reason"] == "completed" and len(acc) == 8
    else:
        assert result["stop_reason"] == "val_patience" and result["epochs_run"] == expected + 1 == len(acc)
        assert math.isfinite(result["final_pgd_acc"])


def test_pbt_perturbations_stay_inside_the_search() -> None:
    from study.space import parse_search

    dims = tuple(parse_search({"lr": [0.01, 0.1, "log"], "attack.steps": [2, 6]}, {"method": "sat", "dataset": {"name": "digits"}}))
    assert KeepInSearch(dims)({"lr": 0.12, "attack.steps": 1.6}) == {"lr": 0.1, "attack.steps": 2}
    assert KeepInSearch(dims)({"lr": 0.05, "attack.steps": 4}) == {"lr": 0.05, "attack.steps": 4}


def test_a_pbt_study_exploits_records_every_trial_in_optuna_and_evaluates_each(tmp_path: Path) -> None:
    """Four trials of 6 epochs, perturbed every 2: the bottom quarter continues from a top trial's
    checkpoint with a perturbed lr; every trial still ends with its final evaluation and `trials`
    row, and the journal holds each with its final lr and its row's objective."""
    import json

    spec = {
        "sampler": None, "epochs": 6, "samples": 4, "max_concurrent": 4, "search": {"lr": [0.002, 0.3, "log"]},
        "scheduler": {"name": "pbt", "perturbation_interval": 2, "quantile_fraction": 0.25}}
    study = _run(tmp_path, **spec)
    rows = open_tables(study).execute(
        "select trial_id, status, stop_reason, epochs_run, final_pgd_acc, best_val_robust_acc, lr from trials").fetchall()
    assert len(rows) == 4 and all(status == "TERMINATED" and epochs == 6 and math.isfinite(pgd) for _t, status, _r, epochs, pgd, _b, _lr in rows)
    # at least one exploit, in Tune's PBT log: [old tag, new tag, old step, new step, old config,
    # new config] per line; the exploited trial's row holds its last new config, inside the search
    lr_of = {t: lr for t, *_r, lr in rows}
    policies = list((study / "tune").glob("pbt_policy_*.txt"))
    assert policies, "PBT exploited no trial"
    for policy in policies:
        steps = [json.loads(line) for line in policy.read_text().splitlines()]
        trial = policy.stem.removeprefix("pbt_policy_")
        assert lr_of[trial] == pytest.approx(steps[-1][5]["lr"]) and 0.002 <= lr_of[trial] <= 0.3
        assert steps[-1][4]["lr"] != steps[-1][5]["lr"]  # perturbed, not copied
        # ranked at a checkpointed, validated epoch (2 or 4). The log's steps are Tune's
        # training_iteration (the epoch + 1) of the result before the one being decided: that epoch
        assert all(step[2] in (2, 4) for step in steps), steps
        # its rows train with the new lr from the epoch after the exploit (the schedule's 0.1 after epoch 3)
        epoch_lr = dict(open_tables(study).execute("select epoch, lr from epochs where trial_id = $t", {"t": trial}).fetchall())
        assert epoch_lr[5] == pytest.approx(lr_of[trial] * 0.1 * 0.1) or epoch_lr[5] == pytest.approx(lr_of[trial] * 0.1)
    recorded = {t.user_attrs["tune_trial_id"]: (t.state.name, t.values, t.params["lr"], t.user_attrs["energyat_stop_reason"])
                for t in journal_trials(study)}
    assert recorded == {t: ("COMPLETE", [pytest.approx(best)], pytest.approx(lr), reason) for t, _s, reason, _e, _p, best, lr in rows}
