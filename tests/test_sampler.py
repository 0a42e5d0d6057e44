"""The study's sampler (`sampler:`), its first points (`points_to_evaluate:`) and the searcher's
refusal to train a configuration twice, through Optuna's own samplers and a real journal."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from analysis.errors import SpecError
from study.journal import DUPLICATE_ATTR, TUNE_ID_ATTR, journal_storage
from study.sampler import SAMPLERS, SINGLE_OBJECTIVE_ONLY, check_points, check_sampler, check_sampler_for
from study.search import StudySearch, build_sampler
from study.space import SearchSpace, parse_search

BASE = {"name": "s", "dataset": {"name": "digits"}, "model": "small_cnn", "method": "sat", "epochs": 2}
SEARCH = {"method": ["sat", "trades", "weat"], "beta": [1.0, 12.0, "log"], "weat.power": [0.0, 2.0]}


@pytest.mark.parametrize(("name", "objectives", "cls"), [
    (None, 1, optuna.samplers.TPESampler), (None, 2, optuna.samplers.NSGAIISampler),  # optuna.create_study's defaults
    ("random", 1, optuna.samplers.RandomSampler), ("cmaes", 1, optuna.samplers.CmaEsSampler),
    ("gp", 2, optuna.samplers.GPSampler), ("qmc", 1, optuna.samplers.QMCSampler), ("tpe", 2, optuna.samplers.TPESampler),
])
def test_each_sampler_is_optunas_own_and_survives_tunes_pickling(name: str | None, objectives: int, cls: type) -> None:
    import pickle

    keys = check_sampler({} if name is None else {"name": name})
    sampler = build_sampler(keys, objectives=objectives, seed=0)
    assert isinstance(sampler, cls) and type(sampler).__mro__[1:].count(cls) <= 1
    study = optuna.create_study(sampler=sampler, directions=["maximize"] * objectives)
    study.tell(study.ask(), [0.5] * objectives)
    again = pickle.loads(pickle.dumps(sampler))  # Ray Tune pickles the searcher and its sampler
    assert type(again) is type(sampler)
    optuna.create_study(sampler=again, directions=["maximize"] * objectives).ask().suggest_float("x", 0, 1)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_registered_sampler_builds_optunas_class_and_pickles(name: str) -> None:
    # the registry sweep: a sampler added to SAMPLERS is built, asked and pickled here at once
    import pickle

    dims = parse_search({"method": ["sat", "trades"]}, BASE)  # a grid needs choices
    objectives = 1 if name in SINGLE_OBJECTIVE_ONLY else 2
    sampler = build_sampler(check_sampler({"name": name}), objectives=objectives, seed=0, dims=dims)
    assert isinstance(sampler, getattr(optuna.samplers, SAMPLERS[name]))
    again = pickle.loads(pickle.dumps(sampler))
    study = optuna.create_study(sampler=again, directions=["maximize"] * objectives)
    assert study.ask().suggest_categorical("method", ["sat", "trades"]) in ("sat", "trades")


def test_sampler_options_and_seed_reach_the_sampler() -> None:
    sampler = build_sampler(check_sampler({"name": "tpe", "seed": 7, "n_startup_trials": 3, "multivariate": True}), objectives=1, seed=0)
    assert sampler._n_startup_trials == 3 and sampler._multivariate
    # the same seed draws the same first points; the spec's seed is the default
    draws = []
    for keys, seed in ((check_sampler({"name": "random", "seed": 5}), 0), (check_sampler({"name": "random"}), 5)):
        study = optuna.create_study(sampler=build_sampler(keys, objectives=1, seed=seed))
        draws.append([study.ask().suggest_float("x", 0, 1) for _ in range(3)])
    assert draws[0] == draws[1]


@pytest.mark.parametrize(("block", "key"), [
    ({"name": "anneal"}, "sampler.name"),
    ({"name": "tpe", "seed": "1"}, "sampler.seed"),
    ({"name": "tpe", "n_startup": 3}, "sampler.n_startup"),
    ({"name": "tpe", "gamma": 0.1}, "sampler.gamma"),  # a callable in Optuna: not settable from a file
    ({"name": "tpe", "n_startup_trials": [3]}, "sampler.n_startup_trials"),
    ({"n_startup_trials": 3}, "sampler.n_startup_trials"),
    ("tpe", "sampler"),
])
def test_a_bad_sampler_block_names_its_key(block: object, key: str) -> None:
    with pytest.raises(SpecError, match=f"`{key}`"):
        check_sampler(block)


def test_cmaes_is_refused_for_several_objectives() -> None:
    with pytest.raises(SpecError, match="sampler.name"):
        check_sampler_for(check_sampler({"name": "cmaes"}), objectives=2, dims=[])
    check_sampler_for(check_sampler({"name": "cmaes"}), objectives=1, dims=[])


@pytest.mark.parametrize(("point", "says"), [
    ({"beta": 20.0, "method": "trades"}, "outside search.beta"),
    ({"lr": 0.1}, "not searched"),
    ({"method": "sat", "beta": 6.0}, "not used by method sat"),
    ({"method": "mart"}, "outside search.method"),
    ({"weat.power": True, "method": "weat"}, "outside search.weat.power"),
])
def test_a_bad_point_names_its_key(point: dict, says: str) -> None:
    with pytest.raises(SpecError, match=says):
        check_points([point], parse_search(SEARCH, BASE), BASE)


def _searcher(tmp_path: Path, dims: dict, sampler: object = None, **kwargs: object) -> StudySearch:
    journal = tmp_path / "j.journal"
    return StudySearch(upload=None, study_dir=str(tmp_path), space=SearchSpace(tuple(parse_search(dims, BASE)), "sat"), metric="acc", mode="max",
                       storage=journal_storage(journal), study_name="s", sampler=sampler or optuna.samplers.RandomSampler(seed=0), **kwargs)


def test_the_first_trials_are_the_points_to_evaluate(tmp_path: Path) -> None:
    points = check_points([{"method": "weat", "beta": 6.0, "weat.power": 1.0}, {"method": "trades", "beta": 6.0}], parse_search(SEARCH, BASE), BASE)
    searcher = _searcher(tmp_path, SEARCH, points_to_evaluate=points)
    assert searcher.suggest("t1") == {"method": "weat", "beta": 6.0, "weat.power": 1.0}
    assert searcher.suggest("t2") == {"method": "trades", "beta": 6.0}


def test_a_configuration_already_run_is_not_suggested_again(tmp_path: Path, capfd) -> None:
    # two configurations in all: sat, and trades at beta 6
    searcher = _searcher(tmp_path, {"method": ["sat", "trades"], "beta": {"choices": [6.0]}})
    first = searcher.suggest("t1")
    searcher.on_trial_complete("t1", {"acc": 0.5, "training_iteration": 1})
    second = searcher.suggest("t2")  # while t2 runs, a third suggestion can only repeat one of them
    assert {tuple(first.items()), tuple(second.items())} == {(("method", "sat"),), (("method", "trades"), ("beta", 6.0))}
    assert searcher.suggest("t3") == "FINISHED" and "looks exhausted" in capfd.readouterr().err
    trials = optuna.load_study(study_name="s", storage=journal_storage(tmp_path / "j.journal")).get_trials()
    kept = [t for t in trials if DUPLICATE_ATTR not in t.user_attrs]
    assert [t.user_attrs[TUNE_ID_ATTR] for t in kept] == ["t1", "t2"]
    by_number = {t.number: t for t in kept}
    duplicates = [t for t in trials if DUPLICATE_ATTR in t.user_attrs]
    assert duplicates, "the sampler never repeated a configuration: the test shows nothing"
    for dup in duplicates:  # told the finished twin's value, or FAIL while the twin still runs
        twin = by_number[dup.user_attrs[DUPLICATE_ATTR]]
        assert dup.params == twin.params and TUNE_ID_ATTR not in dup.user_attrs
        if twin.user_attrs[TUNE_ID_ATTR] == "t1":
            assert dup.state == optuna.trial.TrialState.COMPLETE and dup.values == [0.5]
        else:
            assert dup.state == optuna.trial.TrialState.FAIL


GRID = {"method": ["sat", "trades", "weat"], "weat.variant": ["adv", "nat"], "seed": {"choices": [0, 1, 2]}}


def test_a_grid_runs_every_distinct_configuration_once_then_ends(tmp_path: Path, capfd) -> None:
    import pickle

    dims = parse_search(GRID, BASE)
    sampler = build_sampler(check_sampler({"name": "grid"}), objectives=1, seed=0, dims=dims)
    assert isinstance(sampler, optuna.samplers.GridSampler)
    searcher = _searcher(tmp_path, GRID, sampler=pickle.loads(pickle.dumps(sampler)))  # Ray Tune pickles it
    suggested = []
    for i in range(12):  # 18 grid points; sat and trades ignore weat.variant: 12 configurations
        params = searcher.suggest(f"t{i}")
        assert isinstance(params, dict), f"suggestion {i} was {params!r}"
        suggested.append(params)
        # every point told, the last one included: Optuna's own GridSampler would call
        # study.stop() there, which raises outside study.optimize
        searcher.on_trial_complete(f"t{i}", {"acc": 0.1 * i, "training_iteration": 1})
    arms = {(p["method"], p.get("weat.variant"), p["seed"]) for p in suggested}
    expected = {(m, v, s) for m in ("sat", "trades") for v in (None,) for s in (0, 1, 2)} | {
        ("weat", v, s) for v in ("adv", "nat") for s in (0, 1, 2)
    }
    assert arms == expected and len(suggested) == 12
    assert searcher.suggest("t12") == "FINISHED" and "looks exhausted" in capfd.readouterr().err


@pytest.mark.parametrize(("search", "points", "says"), [
    ({"method": ["sat", "trades"], "beta": [1.0, 12.0]}, [], "search.beta.*list of choices"),
    ({}, [], "searches nothing"),
    ({"method": ["sat", "trades"]}, [{"method": "sat"}], "points_to_evaluate"),
])
def test_a_grid_needs_choices_and_no_points(search: dict, points: list, says: str) -> None:
    with pytest.raises(SpecError, match=says):
        check_sampler_for(check_sampler({"name": "grid"}), objectives=1, dims=parse_search(search, BASE), points=points)
