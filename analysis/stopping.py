"""A trial's stop rule: when it ends before its last epoch, and with which `stop_reason`.

One record (:class:`StopRule`), parsed once from where the user writes it (a study's
`early_stop:` block, :func:`stop_rule_from_spec`; `energyat train`'s flags,
:func:`stop_rule_from_flags`) and decided in one place, the trial's own loop
(:meth:`StopRule.decide`, called by :func:`trainables.engine.run_trial` after each epoch).

The trial decides, not the Ray Tune driver: a stopped trial must still evaluate its best
checkpoint on the test set and write its `trials` row, which only the trial can do, and Tune
ends a trial it stops without either. Tune's own schedulers (ASHA, the median rule) decide on the
driver, and their decision reaches the trial as a stop request (:mod:`study.scheduler`).

Rules, each off unless asked for; the first that holds names the stop:

- ``energy_divergence``: the online detector's alarm is raised and validation robust accuracy has
  not improved for `energy_patience` epochs (:func:`analysis.phases.should_stop`).
- ``val_patience``: validation robust accuracy has not improved for `val_patience` epochs,
  alarm or not (plain patience, the baseline the energy rule is measured against).

Both together are energy-informed patience: `energy_patience` epochs without a new best once the
alarm is raised, `val_patience` before it (`energy_patience` must be the shorter). Alone, the energy
rule can only let a trial run longer than plain patience with the same k would; with a longer
plain patience beside it, the alarm is what lets a trial stop sooner.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from analysis.errors import EnergyatError, SpecError
from analysis.phases import STOP_PATIENCE, should_stop


@dataclass(frozen=True)
class StopRule:
    """When a trial stops early. The default runs every epoch."""

    energy_patience: int | None = None  # None: energy-divergence stopping off; else epochs to wait after the alarm
    val_patience: int | None = None  # None: off; else epochs without a new best validation robust accuracy

    def decide(self, *, epoch: int, alarm: bool, best_epoch: int | None) -> str | None:
        """The stop reason after `epoch` (`alarm`: the detector's as of this epoch; `best_epoch`:
        the epoch of the best validation robust accuracy so far, None if none yet), or None to go on."""
        if self.energy_patience is not None and should_stop(alarm=alarm, epoch=epoch, best_epoch=best_epoch, patience=self.energy_patience):
            return "energy_divergence"
        if self.val_patience is not None and best_epoch is not None and epoch - best_epoch >= self.val_patience:
            return "val_patience"
        return None


_EARLY_STOP_KEYS = ("energy_divergence", "patience", "val_patience")


def stop_rule_from_spec(early_stop: Mapping[str, Any]) -> StopRule:
    """A study's `early_stop:` block: ``{energy_divergence: true, patience: 10, val_patience: 5}``.
    `patience` (default :data:`analysis.phases.STOP_PATIENCE`) applies with `energy_divergence`."""
    for key, value in early_stop.items():
        if key == "energy_divergence":
            if not isinstance(value, bool):
                raise SpecError("early_stop.energy_divergence", f"expected true or false, got {value!r}")
        elif key == "patience":
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise SpecError("early_stop.patience", f"expected an int >= 0 (epochs without a new best after the alarm), got {value!r}")
        elif key == "val_patience":
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise SpecError(
                    "early_stop.val_patience", f"expected an int >= 1 (epochs without a new best validation robust accuracy) or null, got {value!r}"
                )
        else:
            raise SpecError(f"early_stop.{key}", f"unknown key; early_stop takes {', '.join(_EARLY_STOP_KEYS[:-1])} and {_EARLY_STOP_KEYS[-1]}")
    energy = int(early_stop.get("patience", STOP_PATIENCE)) if early_stop.get("energy_divergence", False) else None
    val = early_stop.get("val_patience")
    if energy is not None and val is not None and energy >= val:
        raise SpecError("early_stop.patience", f"{energy} is not below val_patience ({val}): plain patience would always stop first and "
                                               "the alarm would change nothing; give the alarmed trials the shorter patience")
    return StopRule(energy_patience=energy, val_patience=None if val is None else int(val))


def stop_rule_from_flags(*, stop_on_alarm: bool, stop_patience: int | None) -> StopRule:
    """`energyat train --stop-on-alarm [--stop-patience K]`."""
    if stop_patience is not None and not stop_on_alarm:
        raise EnergyatError("--stop-patience only applies with --stop-on-alarm; add --stop-on-alarm or drop --stop-patience")
    if stop_patience is not None and stop_patience < 0:
        raise EnergyatError(f"--stop-patience must be >= 0 epochs, got {stop_patience}")
    if not stop_on_alarm:
        return StopRule()
    return StopRule(energy_patience=STOP_PATIENCE if stop_patience is None else stop_patience)
