"""Spec validation: bad input gets one line naming the key, exit 2, and nothing is written."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import EXAMPLES

from study.cli import main
from study.spec import load_spec
from trainables.config import parse_trial

BAD_SETS = [
    (["colour=red"], "`colour`"),
    (["epochs=ten"], "`epochs`"),
    (["epochs=-3"], "`epochs`"),
    (["attack.eps=1.5"], "`attack.eps`"),
    (["attack.eps=9/0"], "`attack.eps`"),
    (["method=adversarial"], "`method`"),
    (["dataset.name=imagenet"], "`dataset.name`"),
    (["model=vit"], "`model`"),
    (["attack.norm=L-inf"], "`attack.norm`"),
    (["weat.variant=both"], "`weat.variant`"),
    (["attack.typo=1"], "`attack.typo`"),
    (["batch_size=true"], "`batch_size`"),
    (["schedule=linear"], "`schedule.name`"),
    (["samples=0"], "`samples`"),
    (["search=[beta]"], "`search`"),
    (["early_stop.patience=-1"], "`early_stop.patience`"),
    (["early_stop.energy_divergence=maybe"], "`early_stop.energy_divergence`"),
    (["early_stop.after=3"], "`early_stop.after`"),
    (["dataset.name=cifar10", "dataset.root=/nonexistent-energyat"], "cifar10"),
]


@pytest.mark.parametrize(("sets", "named"), BAD_SETS)
def test_bad_spec_exits_2_naming_the_key_and_writes_nothing(sets: list[str], named: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    argv = ["train", str(EXAMPLES / "quickstart.yaml"), "--out", str(out)]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and named in err, err
    assert not out.exists()


def test_missing_spec_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_invalid_yaml_exits_2_with_the_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text("name: x\nattack: {eps: [\n")
    assert main(["train", str(spec), "--out", str(tmp_path / "o")]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_unknown_flag_exits_2_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["train", "x.yaml", "--outt", "y"])
    assert exc.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1


def test_fractions_are_parsed_without_eval() -> None:
    cfg = load_spec(EXAMPLES / "quickstart.yaml", ["attack.eps=8/255", "attack.step=2/255"]).trial
    assert cfg.attack.eps == pytest.approx(8 / 255) and cfg.attack.step == pytest.approx(2 / 255)


def test_set_overrides_nested_keys_and_schedule_shorthand() -> None:
    cfg = load_spec(EXAMPLES / "quickstart.yaml", ["weat.tau=2", "schedule=onecycle", "schedule.pct_start=0.3"]).trial
    assert cfg.weat.tau == 2.0 and cfg.schedule.name == "onecycle" and cfg.schedule.pct_start == 0.3


def test_every_literal_choice_parses() -> None:
    # each Literal value a spec may name is accepted (a flag that parses must reach code: see test_methods)
    for key, values in {
        "method": ["standard", "sat", "trades", "weat", "der", "fgsm_rs", "mart"],
        "model": ["small_cnn", "tiny_cnn", "cnn_fc", "preact_resnet18", "resnet18", "wrn34_10"],
        "device": ["auto", "cpu", "cuda"],
    }.items():
        for v in values:
            assert getattr(parse_trial({key: v}), key) == v


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_spec_is_valid(path: Path) -> None:
    load_spec(path)


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_study_search_and_objective_are_valid(path: Path) -> None:
    from study.sampler import check_sampler_for

    study = load_spec(path)
    assert study.objectives
    check_sampler_for(study.keys.sampler, objectives=len(study.objectives), dims=study.search, points=study.keys.points_to_evaluate or ())


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [(["--stop-patience", "3"], "only applies with --stop-on-alarm"), (["--stop-on-alarm", "--stop-patience", "-2"], ">= 0")],
)
def test_stop_patience_without_its_flag_or_negative_exits_2(
    flags: list[str], fragment: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert main(["train", str(EXAMPLES / "quickstart.yaml"), "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and fragment in err, err
    assert not out.exists()


def test_study_stop_rule_follows_early_stop() -> None:
    from analysis.phases import STOP_PATIENCE
    from analysis.stopping import StopRule
    from study.spec import _check_study_keys

    assert _check_study_keys({}).early_stop == StopRule()
    assert _check_study_keys({"early_stop": {"energy_divergence": True}}).early_stop == StopRule(energy_patience=STOP_PATIENCE)
    assert _check_study_keys({"early_stop": {"energy_divergence": True, "patience": 0}}).early_stop == StopRule(energy_patience=0)
    assert _check_study_keys({"early_stop": {"patience": 3, "val_patience": 5}}).early_stop == StopRule(val_patience=5)
