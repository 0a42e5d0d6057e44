"""Studies end to end on a real local Ray: the smoke study, the search space, the stopper, resume."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import optuna
import pytest
from conftest import EXAMPLES, ROOT, energyat_cmd

from analysis.query import open_tables
from study.journal import DUPLICATE_ATTR, LOST_ATTR, RETRY_ATTR, TUNE_ID_ATTR
from study.space import SearchSpace, parse_search

SMOKE = str(EXAMPLES / "smoke.yaml")


def energyat(*args: str, timeout: float = 900, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*energyat_cmd(), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def journal_trials(study_dir: Path, *, journal: Path | None = None) -> list[optuna.trial.FrozenTrial]:
    # plain optuna, nothing of energyat: the journal is a standard JournalStorage file
    path = journal if journal is not None else study_dir / "optuna.journal"
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    (name,) = optuna.study.get_all_study_names(storage)
    return optuna.load_study(study_name=name, storage=storage).get_trials()


def assert_tables_consistent(study_dir: Path) -> list[tuple]:
    con = open_tables(study_dir)
    if Path(study_dir).is_dir():  # a local study: no temporary file of a killed writer is left behind
        assert not list(Path(study_dir, "tables").rglob("*.tmp"))
    # exactly one row per (trial, epoch), and epochs contiguous from 0 per trial
    dup = con.execute("select trial_id, epoch, count(*) from epochs group by 1, 2 having count(*) > 1").fetchall()
    assert dup == []
    gaps = con.execute("select trial_id, count(*), max(epoch) from epochs group by 1 having count(*) != max(epoch) + 1").fetchall()
    assert gaps == []
    # one set of samples rows per (trial, epoch) with probes
    sample_dups = con.execute(
        "select trial_id, epoch, split, index, count(*) from samples group by all having count(*) > 1"
    ).fetchall()
    assert sample_dups == []
    # every (trial, epoch) that has samples rows has one whole set: the two probes, once
    sets = con.execute("select trial_id, epoch, count(*) as n from samples group by 1, 2").fetchall()
    assert len({n for _t, _e, n in sets}) <= 1, f"samples rows per (trial, epoch) differ: {sorted({n for *_k, n in sets})}"
    trials = con.execute("select trial_id, status, stop_reason, epochs_run, method, best_val_robust_acc from trials order by trial_id").fetchall()
    per_trial = dict(con.execute("select trial_id, count(*) from epochs group by 1").fetchall())
    for trial_id, status, reason, epochs_run, _m, _a in trials:
        assert status == ("ERROR" if reason.startswith("error") else "TERMINATED") and per_trial[trial_id] == epochs_run
    return trials


def assert_journal_matches_tune(study_dir: Path | str, *, journal: Path | None = None, tune_dir: str | None = None, fs: object = None) -> None:
    """Every trial of Tune's experiment appears once in the Optuna journal, COMPLETE where Tune's is
    TERMINATED, with the objective its `trials` row holds (0.0 for a NaN, as reported to Optuna).

    Tune's trial ids are not in the journal, so trials are matched by their suggested parameters;
    trials with equal parameters (every `sat` trial suggests only `method`) as a group, by values.
    A study on object storage: `study_dir` its URI, `journal` a local copy, `tune_dir` and `fs`
    its Tune experiment's path in the bucket and the pyarrow filesystem to read it.
    """
    from ray.tune import ExperimentAnalysis

    tune_trials = ExperimentAnalysis(tune_dir or str(Path(study_dir) / "tune"), storage_filesystem=fs).trials  # reads files, no Ray
    objective = dict(open_tables(study_dir).execute("select trial_id, best_val_robust_acc from trials").fetchall())
    in_journal = journal_trials(Path(str(study_dir)), journal=journal)
    # trials a killed driver started after Tune's last snapshot were marked lost by `resume`
    # (study.runner.reconcile_lost_trials): FAIL, with the Tune id Tune never recorded, and no rows
    lost = [t for t in in_journal if LOST_ATTR in t.user_attrs]
    known = {t.trial_id for t in tune_trials}
    assert all(t.state == optuna.trial.TrialState.FAIL and t.user_attrs[TUNE_ID_ATTR] not in known for t in lost), lost
    assert not {t.user_attrs[TUNE_ID_ATTR] for t in lost} & set(objective)
    # suggestions that repeated a configuration were told its twin's values (FAIL while it ran)
    # and never trained (study.runner.StudySearch.suggest)
    duplicates = [t for t in in_journal if DUPLICATE_ATTR in t.user_attrs]
    by_number = {t.number: t for t in in_journal}
    for dup in duplicates:
        twin = by_number[dup.user_attrs[DUPLICATE_ATTR]]
        assert twin.params == dup.params and DUPLICATE_ATTR not in twin.user_attrs
        assert (dup.state, dup.values) in ((optuna.trial.TrialState.COMPLETE, twin.values), (optuna.trial.TrialState.FAIL, None)), (dup, twin)
    # a trial `resume --retry-errored` restarted: its failed life stays FAIL, its second life (a new
    # Tune id) is the one Tune knows
    superseded = {t.user_attrs[RETRY_ATTR] for t in in_journal if RETRY_ATTR in t.user_attrs}
    assert all(by_number[n].state == optuna.trial.TrialState.FAIL for n in superseded)
    optuna_trials = [t for t in in_journal if LOST_ATTR not in t.user_attrs and DUPLICATE_ATTR not in t.user_attrs and t.number not in superseded]
    assert len(optuna_trials) == len(tune_trials) == len(objective)
    def key(params: dict) -> str:
        return json.dumps(params, sort_keys=True)

    by_params: dict[str, list[tuple[str, float]]] = {}
    for t in tune_trials:
        assert t.status == "TERMINATED", (t.trial_id, t.status)
        value = objective[t.trial_id]
        by_params.setdefault(key(t.config), []).append(("COMPLETE", round(value if math.isfinite(value) else 0.0, 9)))
    in_journal: dict[str, list[tuple[str, float]]] = {}
    for o in optuna_trials:
        in_journal.setdefault(key(o.params), []).append((o.state.name, round(o.values[0], 9) if o.values else math.nan))
    assert {k: sorted(v) for k, v in in_journal.items()} == {k: sorted(v) for k, v in by_params.items()}


@pytest.fixture(scope="module")
def smoke_study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    storage = tmp_path_factory.mktemp("studies")
    proc = energyat("run", SMOKE, "--storage", str(storage), "--name", "smoke")
    return storage / "smoke", proc


def test_smoke_study_has_one_trials_row_per_optuna_trial(smoke_study: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    study_dir, _ = smoke_study
    assert len(assert_tables_consistent(study_dir)) == 4
    assert_journal_matches_tune(study_dir)


def test_smoke_study_prints_progress_and_where_results_are(smoke_study: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    study_dir, proc = smoke_study
    assert "trials 3/4 done" in proc.stderr or "trials 4/4 done" in proc.stderr
    assert f"study: {study_dir}" in proc.stdout and "best so far" in proc.stdout


def test_status_lists_every_trial_with_its_stop_reason(smoke_study: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    study_dir, _ = smoke_study
    out = energyat("status", str(study_dir)).stdout
    assert "4 TERMINATED" in out and out.count("completed") == 4 and "optuna: 4 COMPLETE" in out


def test_a_second_run_into_the_same_study_is_refused(smoke_study: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    study_dir, _ = smoke_study
    proc = energyat("run", SMOKE, "--storage", str(study_dir.parent), "--name", "smoke", check=False, timeout=120)
    assert proc.returncode == 2 and "energyat resume" in proc.stderr


def test_space_gives_beta_only_to_methods_that_use_it() -> None:
    base = {"method": "sat", "dataset": {"name": "digits"}}
    dims = tuple(parse_search({"method": ["sat", "trades", "weat"], "beta": [1.0, 12.0, "log"], "weat.power": [0.0, 2.0]}, base))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(30):
        trial = study.ask()
        SearchSpace(dims, "sat")(trial)
        study.tell(trial, 0.0)
    for t in study.trials:
        method = t.params["method"]
        assert ("beta" in t.params) == (method in ("trades", "weat"))
        assert ("weat.power" in t.params) == (method == "weat")
        if "beta" in t.params:
            assert 1.0 <= t.params["beta"] <= 12.0
    assert {t.params["method"] for t in study.trials} == {"sat", "trades", "weat"}


@pytest.mark.parametrize(
    ("search", "named"),
    [
        ({"beta": [12.0, 1.0]}, "search.beta"),
        ({"beta": [0.0, 1.0, "log"]}, "search.beta"),
        ({"method": ["sat", "bogus"]}, "search.method"),
        ({"attack.eps": [0.1, 2.0]}, "search.attack.eps"),
    ],
)
def test_bad_search_space_exits_2_before_ray_starts(search: dict, named: str, tmp_path: Path) -> None:
    args = ["run", SMOKE, "--storage", str(tmp_path), "--set", f"search={json.dumps(search)}"]
    proc = energyat(*args, check=False, timeout=120)
    assert proc.returncode == 2 and named in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())


def test_stop_rule_waits_for_alarm_and_patience_and_a_restored_detector_decides_the_same(tmp_path: Path) -> None:
    from test_phases import curve

    from analysis.phases import OnlineDetector
    from analysis.stopping import StopRule

    data = curve(sign=-1.0, scale=1.0, onset=30, epochs=60, noise=0.0)
    rows = [{k: data[k][i].item() for k in data} for i in range(60)]
    best_epochs = [min(r["epoch"], 35) for r in rows]  # validation robust accuracy improves until epoch 35, then stays

    def decisions(rule: StopRule, detector: OnlineDetector, start: int = 0) -> list[str | None]:
        out = []
        for r, best in zip(rows[start:], best_epochs[start:], strict=True):
            _phase, alarm = detector.update(r)
            out.append(rule.decide(epoch=r["epoch"], alarm=alarm, best_epoch=best))
        return out

    at_alarm = decisions(StopRule(energy_patience=0), OnlineDetector())
    alarm = at_alarm.index("energy_divergence")
    assert 30 < alarm < 45
    patient = decisions(StopRule(energy_patience=10), OnlineDetector())
    first = patient.index("energy_divergence")
    assert first == max(alarm, 35 + 10)
    assert set(decisions(StopRule(), OnlineDetector())) == {None}  # no rule: every epoch runs
    # a trial resumed from its checkpoint restores its detector (state_dict) and decides the same
    half = OnlineDetector()
    for r in rows[:first - 3]:
        half.update(r)
    restored = OnlineDetector.from_state_dict(half.state_dict())
    assert decisions(StopRule(energy_patience=10), restored, start=first - 3) == patient[first - 3:]


def test_multi_objective_study_keeps_a_pareto_front_in_the_journal(tmp_path: Path) -> None:
    # objective: [robust, clean] -> an Optuna study with two maximised values per trial
    energyat("run", SMOKE, "--storage", str(tmp_path), "--name", "pareto", "--set", "samples=2", "--set", "epochs=1",
             "--set", "objective=[best_val_robust_acc, best_val_clean_acc]")
    trials = [t for t in journal_trials(tmp_path / "pareto") if DUPLICATE_ATTR not in t.user_attrs]
    assert len(trials) == 2 and all(t.state == optuna.trial.TrialState.COMPLETE and len(t.values) == 2 for t in trials)
    con = open_tables(tmp_path / "pareto")
    rows = {round(a, 6): round(c, 6) for a, c in con.execute("select best_val_robust_acc, best_val_clean_acc from trials").fetchall()}
    assert {round(t.values[0], 6): round(t.values[1], 6) for t in trials} == rows


def test_a_diverging_trial_ends_with_its_reason_and_a_finite_bad_value_and_the_study_goes_on(tmp_path: Path) -> None:
    # lr 1e20 makes the loss non-finite within an epoch: that trial ends with its reason, Optuna
    # gets 0.0 (a NaN would drop the trial from the search), and the other trials run on. The
    # search holds two configurations: a third suggestion repeats one, is not trained, and the
    # study ends there (StudySearch.suggest)
    proc = energyat("run", SMOKE, "--storage", str(tmp_path), "--name", "nan", "--set", "samples=3", "--set", "epochs=2",
             "--set", "search={lr: {choices: [0.05, 1.0e+20]}}", "--set", "weight_decay=0.0")
    study_dir = tmp_path / "nan"
    trials = assert_tables_consistent(study_dir)
    assert_journal_matches_tune(study_dir)
    con = open_tables(study_dir)
    rows = con.execute("select t.trial_id, t.stop_reason, t.status, t.epochs_run, t.best_val_robust_acc, e.lr "
                       "from trials t join epochs e using (trial_id) where e.epoch = 0").fetchall()
    diverged = [r for r in rows if r[5] > 1.0]
    healthy = [r for r in rows if r[5] < 1.0]
    assert diverged and healthy, rows  # Optuna's seeded sampler chose both values
    for _t, reason, status, epochs_run, _acc, _lr in diverged:
        assert reason == f"error: non-finite loss at epoch {epochs_run - 1}" and status == "ERROR"
    assert all(reason in ("completed", "energy_divergence") and status == "TERMINATED" for _t, reason, status, *_ in healthy)
    values = [t.values[0] for t in journal_trials(study_dir) if DUPLICATE_ATTR not in t.user_attrs]
    assert all(math.isfinite(v) for v in values) and values.count(0.0) >= len(diverged)
    assert len(trials) == 2 and "looks exhausted" in proc.stderr


def test_sample_and_landscape_read_a_studys_trials_from_their_tune_checkpoints(smoke_study: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    # a study keeps each trial's parameters in tune/<id>/params.json and its checkpoints in
    # tune/<id>/checkpoint_*/: sample and landscape rebuild the trial from there
    import pyarrow.parquet as pq

    study_dir, _ = smoke_study
    trial_ids = [r[0] for r in open_tables(study_dir).execute("select trial_id from trials order by trial_id").fetchall()]
    proc = energyat("sample", str(study_dir), "--trial", trial_ids[0], "--n", "2", "--steps", "3", "--classes", "0,1")
    assert "judge acc" in proc.stdout and (study_dir / "samples" / f"{trial_ids[0]}-pca.png").is_file()
    energyat("landscape", str(study_dir), "--attacks", "pgd,fgsm")
    table = pq.read_table(study_dir / "landscape" / "landscape.parquet")
    per_trial = table.group_by(["trial_id", "attack"]).aggregate([("dE", "count")]).to_pylist()
    assert sorted({r["trial_id"] for r in per_trial}) == trial_ids and {r["dE_count"] for r in per_trial} == {128}
    methods = dict(open_tables(study_dir).execute("select trial_id, method from trials").fetchall())
    assert {r["method"] for r in table.select(["trial_id", "method"]).to_pylist()} == set(methods.values())
