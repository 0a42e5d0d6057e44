"""The three phases of adversarial training and the onset of robust overfitting.

docs/science.md, section 2, finding 2: phase 1, the energies change fast; phase 2, the training-probe delta
energy dE is roughly flat; phase 3, |dE| diverges (SAT) while test robustness turns down.
The paper gives no rule; this module's rule works on magnitudes relative to a phase-2
baseline, because the sign and the scale of dE differ between setups.

- :class:`OnlineDetector` is causal: it is fed one epoch row at a time, reads only
  training-side columns (``epoch``, ``lr``, ``probe_train_dE``, ``probe_train_E``), and its state is a plain
  dict that round-trips through a checkpoint. The stopper uses it.
- :func:`detect` sees the whole curve: it replays the online rule for phase 2, then places
  the onset at the best change point (flat, then growing) after the lr gate opened and not
  after the online alarm.

Rule (every threshold is a keyword of :class:`OnlineDetector`):

1. m_t = |dE_t| smoothed by a running median of ``smooth`` probed epochs.
2. Phase 2 starts once ``warmup`` probed epochs have passed, m is at least ``floor`` (the
   model has started to learn) and m moved by less than ``settle`` (relative) over the last
   ``window`` probed epochs, or after ``max_phase1`` probed epochs at the latest; the baseline
   b is m at that point.
3. Alarms count only once the lr gate is open: the lr has fallen to at most ``lr_gate`` times
   the largest lr seen so far (piecewise: the first drop; onecycle and cosine: past the middle of
   the decay). Robust overfitting follows a drop (Rice et al.; docs/science.md, finding 2);
   before it, |dE| drift is noise and trials still gain. Rows without ``lr`` are not gated.
4. A new baseline after every drop: when the gate opens, and whenever the lr falls to at most
   ``lr_gate`` times the previous epoch's (a later milestone), alarms pause for ``transient``
   probed epochs and b is then m as it stands. The one-time step of |dE| at a drop is absorbed
   there, and nothing built up before the drop is carried over to count against it: only growth
   against the latest baseline raises the alarm. Before the gate opens b follows m
   (b += ``adapt`` * (m - b), whatever m does); after a drop's new baseline b stays put, so slow
   growth adds up against it (robust overfitting on the stored Fashion-MNIST run and the stopping
   suite's single-drop SAT runs is |dE| growing about 1% a probed epoch from the drop on, which a
   baseline following drift would never see). Rows without ``lr`` show no drop: there b follows
   drift below the alarm level.
5. The alarm fires when (m - b) / max(b, f) >= ``ratio`` - 1 for ``patience`` consecutive probed
   epochs with alarms counting. Phase 3 starts there and the alarm stays raised.
6. The floor f = max(``floor``, ``energy_floor`` * |E(x)|), |E(x)| the training probe's mean
   marginal energy at the start of phase 2 (``probe_train_E``, when the rows carry it): a delta
   energy below 5% of the energy scale counts as aligned, so TRADES' tiny |dE| (0.05 -> 0.07
   against |E| = 6) cannot raise a relative alarm. Seen on Fashion-MNIST and digits runs.
"""

from __future__ import annotations

import math
import statistics  # its median: the same value as numpy's, 50x faster on the few values of a window
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, TypeGuard

import numpy as np

# The columns the online rule reads: training-side only, never test metrics (docs/design.md section 6).
# Whoever feeds an OnlineDetector (engine, stopper, replay) passes exactly these.
# `probed` tells an epoch without a probe (dE missing: keep the label) from a probed epoch whose
# energies came back NaN or infinite (the divergence the alarm exists for).
DETECTOR_COLUMNS = ("epoch", "lr", "probe_train_dE", "probe_train_E", "probed")


def _finite(value: Any) -> TypeGuard[float]:
    return value is not None and isinstance(value, (int, float, np.floating, np.integer)) and math.isfinite(value)


@dataclass
class _State:
    mags: list[float] = field(default_factory=list)  # raw |dE| of the probed epochs so far
    phase: int = 1
    phase1_epochs: int = 0
    baseline: float | None = None
    above: int = 0
    phase2_start: int | None = None
    alarm_epoch: int | None = None
    last_epoch: int = -1
    energy: float | None = None  # latest finite |probe_train_E|
    max_lr: float = 0.0  # largest learning rate seen
    prev_lr: float | None = None  # the previous row's learning rate
    gated: bool = False  # lr has fallen to lr_gate * max_lr (or the rows carry no lr)
    gate_epoch: int | None = None  # the first gated epoch
    drop_epoch: int | None = None  # the latest drop (the gate's opening or a later milestone)
    settling: int = 0  # probed epochs still to pass after that drop before the new baseline
    baseline_epoch: int | None = None  # where the baseline in force was taken
    floor: float | None = None  # the floor in force from phase 2 on
    nonfinite_epoch: int | None = None  # a probed epoch whose energies were NaN or infinite


@dataclass(frozen=True)
class DetectorParams:
    """The online rule's settings (:class:`OnlineDetector`'s keyword arguments, checked there)."""

    smooth: int
    warmup: int
    window: int
    settle: float
    max_phase1: int
    ratio: float
    patience: int
    adapt: float
    floor: float
    energy_floor: float
    lr_gate: float | None
    transient: int


class OnlineDetector:
    """Causal phase labeller and divergence alarm, one epoch row at a time.

    Example::

        det = OnlineDetector()
        for row in rows:                      # dicts or pandas rows with epoch, lr, probe_train_dE
            phase, alarm = det.update(row)
        saved = det.state_dict()              # plain types: goes into a checkpoint
        det2 = OnlineDetector.from_state_dict(saved)
    """

    def __init__(
        self,
        *,
        smooth: int = 3,
        warmup: int = 3,
        window: int = 3,
        settle: float = 0.15,
        max_phase1: int = 25,
        ratio: float = 1.3,
        patience: int = 2,
        adapt: float = 0.05,
        floor: float = 0.05,
        energy_floor: float = 0.05,
        lr_gate: float | None = 0.5,
        transient: int = 2,
    ) -> None:
        if smooth < 1 or window < 1 or warmup < 0 or patience < 1 or max_phase1 < 1 or transient < 1:
            raise ValueError("`smooth`, `window`, `patience`, `max_phase1` and `transient` must be >= 1, `warmup` >= 0")
        if ratio <= 1:
            raise ValueError(f"`ratio` must be above 1 (a growth factor), got {ratio}")
        if lr_gate is not None and not 0 < lr_gate <= 1:
            raise ValueError(f"`lr_gate` must be in (0, 1] or None, got {lr_gate}")
        if not 0 <= adapt < 1 or floor <= 0 or settle <= 0 or energy_floor < 0:
            raise ValueError("`adapt` must be in [0, 1), `floor` and `settle` positive, `energy_floor` non-negative")
        self.params = DetectorParams(
            smooth=smooth, warmup=warmup, window=window, settle=settle, max_phase1=max_phase1,
            ratio=ratio, patience=patience, adapt=adapt, floor=floor, energy_floor=energy_floor, lr_gate=lr_gate,
            transient=transient,
        )
        self._s = _State()

    # -- the rule -------------------------------------------------------------------------
    def _smoothed(self) -> float:
        return float(statistics.median(self._s.mags[-self.params.smooth:]))

    def update(self, row: Mapping[str, Any]) -> tuple[int, bool]:
        """Feed one epoch; returns (phase, alarm) as of this epoch.

        Epochs without a probe (``probe_train_dE`` NaN or missing) keep the current label. A
        probed epoch (``probed`` true) whose energies are NaN or infinite raises the alarm at
        once, in any phase and whatever the learning rate: the energies have diverged beyond
        measure, and the rule's |dE| statistics cannot see it.
        """
        s, p = self._s, self.params
        epoch = int(row["epoch"])
        if epoch <= s.last_epoch:
            raise ValueError(f"epochs must arrive in increasing order: got {epoch} after {s.last_epoch}")
        s.last_epoch = epoch
        self._watch_lr(row.get("lr") if hasattr(row, "get") else None, epoch)
        value = row.get("probe_train_dE") if hasattr(row, "get") else row["probe_train_dE"]
        energy = row.get("probe_train_E") if hasattr(row, "get") else None
        probed = row.get("probed") if hasattr(row, "get") else None
        if probed is not None and bool(probed) and not (_finite(value) and (energy is None or _finite(energy))):
            if s.alarm_epoch is None:
                s.phase, s.alarm_epoch, s.nonfinite_epoch = 3, epoch, epoch
            return s.phase, True
        if not _finite(value):
            return s.phase, s.alarm_epoch is not None
        if _finite(energy):
            s.energy = abs(float(energy))
        s.mags.append(abs(float(value)))
        m = self._smoothed()
        if s.phase == 1:
            s.phase1_epochs += 1
            settled = False
            smoothed_then = self._smoothed_at(len(s.mags) - 1 - p.window)
            # m must have left zero: a model still at chance (digits cnn_fc: 6 epochs) has a
            # flat |dE| of ~0, which is not phase 2 and would make every later value an alarm.
            if s.phase1_epochs > p.warmup and smoothed_then is not None and m >= p.floor:
                settled = abs(m - smoothed_then) / max(smoothed_then, p.floor) < p.settle
            if settled or s.phase1_epochs >= p.max_phase1:
                s.phase, s.baseline, s.phase2_start, s.baseline_epoch = 2, m, epoch, epoch
                s.settling = 0  # a drop during phase 1 has no baseline to replace
                s.floor = max(p.floor, p.energy_floor * (s.energy or 0.0))
        elif s.phase == 2:
            assert s.baseline is not None and s.floor is not None
            if s.settling:  # a drop's transient: no alarm counts, and the baseline is taken after it
                s.settling -= 1
                if not s.settling:
                    s.baseline, s.baseline_epoch, s.above = m, epoch, 0
                return s.phase, False
            growth = (m - s.baseline) / max(s.baseline, s.floor)
            if not s.gated:  # alarms cannot count yet: the baseline follows m, nothing is banked
                s.baseline += p.adapt * (m - s.baseline)
            elif growth >= p.ratio - 1:
                s.above += 1
            else:
                s.above = 0
                if s.drop_epoch is None:  # no drop to measure from (rows without lr): drift joins the baseline
                    s.baseline += p.adapt * (m - s.baseline)
            if s.above >= p.patience:
                s.phase, s.alarm_epoch = 3, epoch
        return s.phase, s.alarm_epoch is not None

    def _watch_lr(self, lr: Any, epoch: int) -> None:
        """Open the lr gate, and start a drop's transient, from this row's learning rate."""
        s, p = self._s, self.params
        if not _finite(lr) or p.lr_gate is None:
            s.gated = True  # no lr to gate on: alarms count from phase 2 on
        else:
            lr = float(lr)
            s.max_lr = max(s.max_lr, lr)
            opens = not s.gated and lr <= p.lr_gate * s.max_lr
            later_drop = s.gated and s.prev_lr is not None and lr <= p.lr_gate * s.prev_lr
            s.gated, s.prev_lr = s.gated or opens, lr
            if (opens or later_drop) and s.phase < 3:
                s.drop_epoch, s.settling = epoch, p.transient
        if s.gated and s.gate_epoch is None:
            s.gate_epoch = epoch

    def _smoothed_at(self, i: int) -> float | None:
        if i < 0:
            return None
        lo = max(0, i + 1 - self.params.smooth)
        return float(statistics.median(self._s.mags[lo : i + 1]))

    @property
    def last_epoch(self) -> int:
        """The last epoch fed to :meth:`update` (-1 before any)."""
        return self._s.last_epoch

    @property
    def nonfinite_epoch(self) -> int | None:
        """The first probed epoch whose energies were NaN or infinite, if it raised the alarm."""
        return self._s.nonfinite_epoch

    @property
    def phase2_start(self) -> int | None:
        return self._s.phase2_start

    @property
    def alarm_epoch(self) -> int | None:
        return self._s.alarm_epoch

    @property
    def alarm_reason(self) -> str | None:
        """Why the alarm fired, in words (None before it has)."""
        s, p = self._s, self.params
        if s.alarm_epoch is None:
            return None
        if s.nonfinite_epoch == s.alarm_epoch:
            return f"non-finite probe energies at epoch {s.alarm_epoch}"
        return (f"|dE| at least {p.ratio}x its baseline (taken at epoch {s.baseline_epoch}) for {p.patience} probed epochs, "
                f"at epoch {s.alarm_epoch}")

    @property
    def drop_epoch(self) -> int | None:
        """The latest lr drop seen (the gate's opening or a later milestone); None before any."""
        return self._s.drop_epoch

    @property
    def baseline_epoch(self) -> int | None:
        """Where the baseline now in force was taken: phase 2's start or the end of a drop's transient."""
        return self._s.baseline_epoch

    @property
    def gate_epoch(self) -> int | None:
        """The first epoch at which alarms could count (the lr gate opened)."""
        return self._s.gate_epoch

    # -- checkpointing --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain ints, floats, lists and None: safe for ``torch.load(weights_only=True)``."""
        return {"params": asdict(self.params), "state": asdict(self._s)}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> OnlineDetector:
        det = cls(**state["params"])
        det._s = _State(**state["state"])
        det._s.mags = [float(v) for v in det._s.mags]
        return det


# Epochs without a new best validation robust accuracy that the stop rule waits for after the alarm.
# Chosen by the stopping suite (benchmarks/stoppers.py, BENCHMARKS.md section 4.1) on validation
# numbers only, by a criterion fixed before its replay: the smallest k at which "alarm, then
# patience k" gives up no validation robust accuracy in the median trial and at most 0.01 in the
# worst, on every recipe. Every k from 2 to 20 met it: the alarm comes 16-50 epochs after the lr
# drop and the trials' validation best came before it, so a short wait loses nothing. The sample is
# small: 6 of 96 trials alarmed (two recipes of Fashion-MNIST 14x14, cnn_fc).
STOP_PATIENCE = 2


def should_stop(*, alarm: bool, epoch: int, best_epoch: int | None, patience: int = STOP_PATIENCE) -> bool:
    """The early-stopping rule shared by ``energyat train --stop-on-alarm`` and the study's stopper.

    Stop once the online detector's alarm is raised (phase 3: the energies diverge) and
    validation robust accuracy has not improved for ``patience`` epochs (``best_epoch``: the
    epoch of the best so far, None if none yet). The alarm alone is not enough: on the real
    runs, |dE| kept diverging for 15-100 epochs while robust accuracy still rose (digits SAT).
    Patience alone is not enough either: before the learning-rate drop accuracy plateaus for
    many epochs and then jumps. The detector stays training-side only; this rule is where a
    held-out robust accuracy enters, as in Rice et al.'s early stopping: the validation split's,
    never the test set's.
    """
    if patience < 0:
        raise ValueError(f"`patience` must be >= 0, got {patience}")
    return alarm and (best_epoch is None or epoch - best_epoch >= patience)


@dataclass(frozen=True)
class PhaseResult:
    """Offline labels: ``labels[i]`` is the phase of the i-th row (rows sorted by epoch)."""

    epochs: np.ndarray
    labels: np.ndarray
    phase2_start: int | None
    phase3_start: int | None  # the detected robust-overfitting onset
    alarm_epoch: int | None  # where the online rule, replayed, raised its alarm


def _column(epochs: Any, name: str) -> np.ndarray:
    return np.asarray(epochs[name], dtype=float)


def detect(epochs: Any, **detector_params: Any) -> PhaseResult:
    """Label the phases of one trial's whole curve.

    Args:
        epochs: one trial's `epochs` rows (a pandas DataFrame, a pyarrow Table or a dict of
            arrays) with at least ``epoch`` and ``probe_train_dE``; rows in any order.
        **detector_params: thresholds passed to :class:`OnlineDetector`.

    Returns:
        A :class:`PhaseResult`. The onset is placed at the best two-segment fit of the
        smoothed |dE| (flat before, linear after), searched between the lr gate's opening (or
        phase 2's start, if later) and the online alarm, so it is never later than the alarm
        and exists only when the alarm fired.
    """
    epoch = _column(epochs, "epoch").astype(int)
    order = np.argsort(epoch, kind="stable")
    epoch = epoch[order]
    d_e = _column(epochs, "probe_train_dE")[order]
    nan = np.full(len(epoch), np.nan)
    energy = _column(epochs, "probe_train_E")[order] if _has_column(epochs, "probe_train_E") else nan
    lr = _column(epochs, "lr")[order] if _has_column(epochs, "lr") else nan
    probed = _column(epochs, "probed")[order] if _has_column(epochs, "probed") else nan
    det = OnlineDetector(**detector_params)
    has_energy = _has_column(epochs, "probe_train_E")  # rows without the column are judged on dE alone
    for e, v, en, r, p in zip(epoch, d_e, energy, lr, probed, strict=True):
        det.update({"epoch": int(e), "probe_train_dE": float(v), "probe_train_E": float(en) if has_energy else None, "lr": float(r),
                    "probed": None if math.isnan(p) else bool(p)})
    labels = np.ones(len(epoch), dtype=int)
    p2 = det.phase2_start
    if det.nonfinite_epoch is not None and det.nonfinite_epoch == det.alarm_epoch:
        # no |dE| to fit a change point to: the onset is the epoch the energies stopped being numbers
        labels[epoch >= det.alarm_epoch] = 3
        if p2 is not None:
            labels[(epoch >= p2) & (epoch < det.alarm_epoch)] = 2
        return PhaseResult(epoch, labels, p2, det.alarm_epoch, det.alarm_epoch)
    if p2 is None:
        return PhaseResult(epoch, labels, None, None, None)
    labels[epoch >= p2] = 2
    alarm = det.alarm_epoch
    onset = None
    if alarm is not None:
        onset = _change_point(epoch, d_e, p2, alarm, det.params.smooth, earliest=det.gate_epoch)
        labels[epoch >= onset] = 3
    return PhaseResult(epoch, labels, p2, onset, alarm)


def _change_point(epoch: np.ndarray, d_e: np.ndarray, start: int, alarm: int, smooth: int, *, earliest: int | None) -> int:
    """Epoch in [max(start, earliest), alarm] where a flat-then-linear fit of smoothed |dE| over
    [start, alarm] is best. ``earliest`` is where the lr gate opened: robust overfitting follows
    the drop, as the online rule assumes; without this bound the fit put the onset 5-8 epochs
    before the drop on the real runs, where the true onsets sit at the drop (docs/phases.md)."""
    ok = np.isfinite(d_e)
    e, m = epoch[ok], np.abs(d_e[ok])
    m = np.array([statistics.median(m[max(0, i + 1 - smooth) : i + 1].tolist()) for i in range(len(m))])
    keep = e >= start
    e, m = e[keep], m[keep]
    best, best_cost = alarm, math.inf
    for k in range(1, len(e)):
        if e[k] > alarm:
            break
        if earliest is not None and e[k] < earliest:
            continue
        head, tail, tail_e = m[:k], m[k:], e[k:]
        cost = float(((head - head.mean()) ** 2).sum())
        if len(tail) >= 2:
            slope, intercept = np.polyfit(tail_e, tail, 1)
            cost += float(((tail - (slope * tail_e + intercept)) ** 2).sum())
        if cost < best_cost:
            best, best_cost = int(e[k]), cost
    return best


@dataclass(frozen=True)
class OnsetTruth:
    """Ground truth for judging a detector on a real run (docs/design.md section 6)."""

    epoch: int | None  # onset: the last epoch before test robustness only gets worse; None if it never degrades
    signal: str | None  # the column that showed the degradation, e.g. "test_robust_acc" or "val_robust_loss"
    best: float | None  # smoothed value at the onset
    final: float | None  # mean over the run's last epochs (max(5, 10% of the run))


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Centered running mean over finite values (shorter at the ends)."""
    half = window // 2
    out = np.full(len(values), np.nan)
    for i in range(len(values)):
        chunk = values[max(0, i - half) : i + half + 1]
        chunk = chunk[np.isfinite(chunk)]
        if len(chunk):
            out[i] = chunk.mean()
    return out


def ground_truth_onset(
    epochs: Any, *, window: int = 3, acc_margin: float = 0.015, loss_margin: float = 0.10, split: str = "test",
    signals: tuple[str, ...] = ("robust_acc", "robust_loss"),
) -> OnsetTruth:
    """The robust-overfitting onset as held-out metrics show it, for judging detectors.

    Onset = the epoch of the best smoothed (centered mean of ``window`` epochs) robust accuracy
    of `split` (``test`` or ``val``: the columns ``<split>_robust_acc``, ``<split>_robust_loss``),
    provided the run ends (mean of its last max(5, 10%) epochs) at least ``acc_margin``
    (absolute, 1.5 points by default) below it; failing that, the epoch of the minimum smoothed
    robust loss, provided the run ends at least ``loss_margin`` (relative, 10%) above it. None
    when neither degrades: the run did not robust-overfit. `signals` names which of the two to
    try, in order. Judging by the end of the run, not by its worst dip, keeps epoch-to-epoch noise
    at a high learning rate from counting as overfitting. Rice et al.'s PreActResNet-18 run
    (tests/data/reference) gives epoch 106 on both signals with the defaults.
    """
    unknown = set(signals) - {"robust_acc", "robust_loss"}
    if unknown or split not in ("test", "val"):
        raise ValueError(f"signals must be robust_acc and/or robust_loss and split test or val, got {signals} and {split!r}")
    epoch = _column(epochs, "epoch").astype(int)
    order = np.argsort(epoch, kind="stable")
    epoch = epoch[order]
    tail = max(5, len(epoch) // 10)
    for signal in signals:
        name = f"{split}_{signal}"
        if not _has_column(epochs, name):
            continue
        raw = _column(epochs, name)[order]
        smooth = _smooth(raw, window)
        if not np.isfinite(smooth).any():
            continue
        final = float(np.nanmean(raw[-tail:]))
        if signal == "robust_acc":
            i = int(np.nanargmax(smooth))
            degraded = smooth[i] - final >= acc_margin
        else:
            i = int(np.nanargmin(smooth))
            degraded = final - smooth[i] >= loss_margin * abs(smooth[i])
        if i < len(epoch) - tail and degraded:
            return OnsetTruth(int(epoch[i]), name, float(smooth[i]), final)
    return OnsetTruth(None, None, None, None)


def _has_column(epochs: Any, name: str) -> bool:
    try:
        epochs[name]
    except (KeyError, IndexError):
        return False
    return True
