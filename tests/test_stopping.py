"""The stop rule as one record: parsed from a spec or from flags, decided in one place."""

from __future__ import annotations

import pytest

from analysis.errors import EnergyatError, SpecError
from analysis.phases import STOP_PATIENCE
from analysis.stopping import StopRule, stop_rule_from_flags, stop_rule_from_spec


def test_val_patience_stops_once_the_best_is_that_many_epochs_back() -> None:
    rule = StopRule(val_patience=3)
    assert rule.decide(epoch=5, alarm=False, best_epoch=None) is None  # no validation probe yet
    assert rule.decide(epoch=5, alarm=False, best_epoch=3) is None  # 2 epochs back
    assert rule.decide(epoch=6, alarm=False, best_epoch=3) == "val_patience"  # 3 epochs back


def test_energy_divergence_needs_the_alarm_and_names_the_stop_when_both_rules_hold() -> None:
    rule = StopRule(energy_patience=2, val_patience=2)
    assert rule.decide(epoch=6, alarm=False, best_epoch=4) == "val_patience"
    assert rule.decide(epoch=6, alarm=True, best_epoch=4) == "energy_divergence"
    assert rule.decide(epoch=5, alarm=True, best_epoch=4) is None
    assert StopRule().decide(epoch=99, alarm=True, best_epoch=0) is None  # nothing asked for: every epoch runs


def test_the_spec_block_and_the_train_flags_make_the_same_rule() -> None:
    assert stop_rule_from_spec({"energy_divergence": True}) == stop_rule_from_flags(stop_on_alarm=True, stop_patience=None)
    assert stop_rule_from_spec({"energy_divergence": True, "patience": 0}) == StopRule(energy_patience=0)
    assert stop_rule_from_flags(stop_on_alarm=True, stop_patience=None) == StopRule(energy_patience=STOP_PATIENCE)
    assert stop_rule_from_flags(stop_on_alarm=False, stop_patience=None) == StopRule()
    # `patience` is the energy rule's: without energy_divergence it stops nothing
    assert stop_rule_from_spec({"patience": 4}) == StopRule()


@pytest.mark.parametrize(("block", "key"), [
    ({"energy_divergence": "yes"}, "early_stop.energy_divergence"),
    ({"patience": -1}, "early_stop.patience"),
    ({"val_patience": 0}, "early_stop.val_patience"),
    ({"after": 3}, "early_stop.after"),
])
def test_a_bad_early_stop_block_names_its_key(block: dict, key: str) -> None:
    with pytest.raises(SpecError) as err:
        stop_rule_from_spec(block)
    assert err.value.key == key


def test_stop_patience_without_stop_on_alarm_is_refused() -> None:
    with pytest.raises(EnergyatError, match="only applies with --stop-on-alarm"):
        stop_rule_from_flags(stop_on_alarm=False, stop_patience=3)


def test_energy_informed_patience_stops_alarmed_trials_sooner() -> None:
    # k_alarm = 2 after the alarm, k_plain = 5 before it: the alarm is what shortens the wait
    rule = stop_rule_from_spec({"energy_divergence": True, "patience": 2, "val_patience": 5})
    assert rule == StopRule(energy_patience=2, val_patience=5)
    assert rule.decide(epoch=12, alarm=True, best_epoch=10) == "energy_divergence"
    assert rule.decide(epoch=12, alarm=False, best_epoch=10) is None
    assert rule.decide(epoch=15, alarm=False, best_epoch=10) == "val_patience"


@pytest.mark.parametrize("patience", [5, 8])
def test_an_energy_patience_not_below_val_patience_is_refused(patience: int) -> None:
    # plain patience would always fire first: the alarm could change nothing
    with pytest.raises(SpecError) as err:
        stop_rule_from_spec({"energy_divergence": True, "patience": patience, "val_patience": 5})
    assert err.value.key == "early_stop.patience" and "not below val_patience" in str(err.value)
