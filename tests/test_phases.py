"""Phase labels and the divergence alarm on synthetic curves with known boundaries."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from analysis.phases import OnlineDetector, detect, ground_truth_onset, should_stop


def curve(*, sign: float, scale: float, onset: int | None, epochs: int = 100, noise: float = 0.03, seed: int = 0) -> dict[str, np.ndarray]:
    """dE: fast change for ~10 epochs, a flat phase 2, then (from `onset`, 2 epochs after an lr
    drop) a 2.7x divergence over 20 epochs."""
    rng = np.random.default_rng(seed)
    t = np.arange(epochs, dtype=float)
    magnitude = 1.0 - 0.9 * np.exp(-t / 3.0)
    if onset is not None:
        magnitude = magnitude + np.clip(t - onset, 0, None) * (1.7 / 20)
    d_e = sign * scale * magnitude * (1 + noise * rng.standard_normal(epochs))
    drop = 75 if onset is None else onset - 2  # robust overfitting follows a learning-rate drop
    lr = np.where(t < drop, 0.1, 0.01)
    return {"epoch": t.astype(int), "lr": lr, "probe_train_dE": d_e}


@pytest.mark.parametrize("sign", [-1.0, 1.0])
@pytest.mark.parametrize("scale", [0.3, 5.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_onset_found_within_a_few_epochs_for_any_sign_and_scale(sign: float, scale: float, seed: int) -> None:
    result = detect(curve(sign=sign, scale=scale, onset=77, seed=seed))
    assert result.phase2_start is not None and 3 <= result.phase2_start <= 20
    assert result.phase3_start is not None and abs(result.phase3_start - 77) <= 4
    assert result.alarm_epoch is not None and 77 <= result.alarm_epoch <= 77 + 15


@pytest.mark.parametrize("seed", range(5))
def test_no_alarm_on_a_flat_noisy_curve(seed: int) -> None:
    result = detect(curve(sign=-1.0, scale=0.45, onset=None, noise=0.08, seed=seed))
    assert result.phase3_start is None and result.alarm_epoch is None
    assert set(np.unique(result.labels)) <= {1, 2}


def test_online_alarm_and_offline_onset_agree_on_a_clean_curve() -> None:
    data = curve(sign=-1.0, scale=1.0, onset=60, noise=0.0)
    det = OnlineDetector()
    alarms = [det.update({k: data[k][i] for k in data})[1] for i in range(100)]
    offline = detect(data)
    first_alarm = alarms.index(True)
    assert offline.alarm_epoch == first_alarm
    assert offline.phase3_start is not None and offline.phase3_start <= first_alarm <= offline.phase3_start + 10


def test_detector_state_survives_a_checkpoint_mid_curve() -> None:
    # feeding epochs 0..49, saving, restoring, then 50..99 gives the same labels as one pass
    data = curve(sign=-1.0, scale=2.0, onset=70, seed=3)
    rows = [{k: data[k][i] for k in data} for i in range(100)]
    one = OnlineDetector()
    expected = [one.update(r) for r in rows]
    first = OnlineDetector()
    got = [first.update(r) for r in rows[:50]]
    restored = OnlineDetector.from_state_dict(first.state_dict())
    got += [restored.update(r) for r in rows[50:]]
    assert got == expected


def test_epochs_without_probe_keep_their_label() -> None:
    det = OnlineDetector()
    assert det.update({"epoch": 0, "probe_train_dE": float("nan")}) == (1, False)
    assert det.update({"epoch": 1}) == (1, False)


def test_epochs_out_of_order_are_refused() -> None:
    det = OnlineDetector()
    det.update({"epoch": 3, "probe_train_dE": -0.5})
    with pytest.raises(ValueError, match="increasing"):
        det.update({"epoch": 2, "probe_train_dE": -0.5})


def test_bad_thresholds_are_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="ratio"):
        OnlineDetector(ratio=0.9)


# Rice et al. (2020)'s real per-epoch logs (PreActResNet-18, CIFAR-10; docs/science.md section 6),
# kept in the repository so that the ground-truth tests run wherever it is checked out.
REFERENCE = Path(__file__).resolve().parent / "data" / "reference"


def _reference(name: str) -> pd.DataFrame:
    return pd.read_csv(REFERENCE / f"rice2020_cifar10_{name}_preactresnet18.csv")


@pytest.mark.parametrize("signal", ["test_robust_acc", "test_robust_loss"])
def test_ground_truth_finds_rice_et_al_onset_on_either_signal(signal: str) -> None:
    # Rice et al.: best test robust accuracy 53.49% at epoch 106, robust loss bottoms at 105-106
    df = _reference("standard")
    if signal == "test_robust_loss":
        df = df.assign(test_robust_acc=np.nan)  # force the loss-based rule
    truth = ground_truth_onset(df)
    assert truth.signal == signal and truth.epoch is not None and 105 <= truth.epoch <= 106


def test_ground_truth_sees_no_overfitting_before_the_lr_drop() -> None:
    # epochs 0-99 at lr 0.1: test robust accuracy is noisy but does not degrade by the margin
    assert ground_truth_onset(_reference("standard").query("epoch < 100")).epoch is None


def test_ground_truth_on_the_validation_run() -> None:
    truth = ground_truth_onset(_reference("validation"))
    assert truth.epoch is not None and 100 <= truth.epoch <= 110 and truth.final < truth.best - 0.05


def test_detect_accepts_a_pandas_frame_and_a_pyarrow_table() -> None:
    data = curve(sign=-1.0, scale=1.0, onset=60, noise=0.0)
    a = detect(pd.DataFrame(data))
    b = detect(pa.table(data))
    assert (a.phase2_start, a.phase3_start) == (b.phase2_start, b.phase3_start)


def test_tiny_delta_energy_against_a_large_energy_scale_is_not_divergence() -> None:
    # TRADES keeps |dE| near 0.05-0.08 while |E(x)| is about 6: a 50% relative rise of such a
    # small dE is still alignment, so no alarm; the same curve without energies does alarm
    data = curve(sign=-1.0, scale=0.05, onset=40, noise=0.0)
    data["probe_train_dE"] = np.clip(data["probe_train_dE"], -0.08, None)  # rises 0.05 -> 0.08, then flat
    with_energy = detect({**data, "probe_train_E": np.full(100, -6.0)})
    assert with_energy.alarm_epoch is None
    assert detect(data).alarm_epoch is not None


def test_no_alarm_before_the_learning_rate_drops() -> None:
    # the same divergence at full learning rate is not robust overfitting (yet); once the lr
    # has dropped, it is
    data = curve(sign=-1.0, scale=1.0, onset=40, noise=0.0)
    assert detect(data).alarm_epoch is not None
    data["lr"] = np.full(100, 0.1)
    assert detect(data).alarm_epoch is None
    assert detect(data, lr_gate=None).alarm_epoch is not None


def test_a_flat_zero_start_is_not_phase_2() -> None:
    # a model at chance for its first epochs has |dE| ~ 0 (digits cnn_fc: 6 epochs); phase 2
    # must wait until |dE| has risen and settled, or every later value would look divergent
    data = curve(sign=-1.0, scale=1.0, onset=None, noise=0.0)
    data["probe_train_dE"] = np.where(data["epoch"] < 10, -1e-4, data["probe_train_dE"])
    result = detect(data)
    assert result.phase2_start is not None and result.phase2_start >= 13
    assert result.alarm_epoch is None


@pytest.mark.parametrize(
    ("alarm", "epoch", "best_epoch", "patience", "stop"),
    [
        (False, 50, 10, 10, False),  # no alarm: never stop, however long since the best
        (True, 50, 45, 10, False),  # alarm, but accuracy improved 5 epochs ago
        (True, 55, 45, 10, True),  # alarm and 10 epochs without a new best
        (True, 45, 45, 0, True),  # patience 0: stop at the alarm
        (True, 3, None, 10, True),  # no best yet (nothing probed): nothing to wait for
    ],
)
def test_stop_rule_needs_the_alarm_and_no_gain_for_patience_epochs(
    alarm: bool, epoch: int, best_epoch: int | None, patience: int, stop: bool
) -> None:
    assert should_stop(alarm=alarm, epoch=epoch, best_epoch=best_epoch, patience=patience) is stop


def test_offline_onset_is_not_placed_before_the_lr_drop() -> None:
    # |dE| starts to grow at 50 but the lr drops at 60: the online alarm is gated until 60, and the
    # offline onset, like the rule, puts robust overfitting after the drop
    data = curve(sign=-1.0, scale=1.0, onset=50, noise=0.0)
    data["lr"] = np.where(data["epoch"] < 60, 0.1, 0.01)
    result = detect(data)
    assert result.alarm_epoch is not None and result.alarm_epoch >= 60
    assert result.phase3_start is not None and 60 <= result.phase3_start <= result.alarm_epoch


@pytest.mark.parametrize("onset", [40, 60, 77])
@pytest.mark.parametrize(("sign", "scale"), [(-1.0, 0.3), (1.0, 1.0), (-1.0, 5.0)])
def test_a_noise_free_divergence_alarms_six_epochs_after_its_onset(onset: int, sign: float, scale: float) -> None:
    # The exact epochs of the default rule on curve(noise=0), worked out by hand (m_t: the median
    # of the last 3 |dE|, which on a rising curve is |dE| one epoch back):
    # - phase 2 starts at 9, the first epoch where m moved by under 15% over 3 probed epochs:
    #   (m_t - m_{t-3}) / m_{t-3} = 0.569 u / (1 - 0.9 u), u = exp(-(t - 4) / 3), is 0.197 at 8 and
    #   0.129 at 9; scale and sign drop out (|dE| relative to itself, far above the 0.05 floor);
    # - the baseline has crept to 0.985-0.998 by the onset (adapt 0.05) and keeps adapting while
    #   m is under 1.3 x baseline: 1.013-1.023 at onset + 4; m = 1 + 0.085 (t - 1 - onset) is 0.24-0.26
    #   above it at onset + 4 and first reaches 1.3 x it at onset + 5 (growth 0.31-0.32), again at
    #   onset + 6: patience 2, so the alarm fires at onset + 6 (the lr dropped at onset - 2: the
    #   gate is open);
    # - the offline onset is onset + 1, where the smoothed (one-epoch-late) |dE| starts to rise.
    # An off-by-one in patience or smoothing, or another ratio, moves one of these.
    data = curve(sign=sign, scale=scale, onset=onset, noise=0.0)
    det = OnlineDetector()
    alarms = [det.update({k: data[k][i] for k in data})[1] for i in range(100)]
    assert det.phase2_start == 9 and det.alarm_epoch == onset + 6
    assert alarms.index(True) == onset + 6 and all(alarms[onset + 6 :])
    result = detect(data)
    assert (result.phase2_start, result.alarm_epoch, result.phase3_start) == (9, onset + 6, onset + 1)
    assert result.labels.tolist() == [1] * 9 + [2] * (onset + 1 - 9) + [3] * (100 - onset - 1)


# -- drops: the baseline is re-taken after each lr drop -------------------------------------------
# Synthetic |dE| on known schedules. phase 1 settles by epoch ~9 onto a plateau of 1 (times
# `scale`); `piecewise` gives the lr of a schedule dropping 10x at `drops`; the probe runs every
# `every` epochs (the other rows carry the lr and a NaN dE, as the engine writes them).


def piecewise(epochs: int, drops: list[int]) -> np.ndarray:
    return 0.1 * 0.1 ** np.searchsorted(np.asarray(drops), np.arange(epochs), side="right")


def rows_of(magnitude: np.ndarray, lr: np.ndarray, *, every: int = 1, noise: float = 0.0, seed: int = 0, scale: float = 1.0) -> dict[str, np.ndarray]:
    t = np.arange(len(magnitude))
    warm = 1.0 - 0.9 * np.exp(-t / 3.0)  # phase 1: |dE| rises and settles
    d_e = -scale * warm * magnitude * (1 + noise * np.random.default_rng(seed).standard_normal(len(t)))
    probed = (t % every == 0) | (t == len(t) - 1)
    return {"epoch": t, "lr": lr, "probe_train_dE": np.where(probed, d_e, np.nan), "probed": probed}


def growth(epochs: int, start: int, per_epoch: float, *, stop: int | None = None) -> np.ndarray:
    """1 until `start`, then +`per_epoch` of the plateau per epoch (until `stop`, flat after)."""
    t = np.arange(epochs, dtype=float)
    return 1.0 + per_epoch * (np.clip(t, None, stop if stop is not None else epochs) - start).clip(0)


def steps(epochs: int, at: list[int], size: float) -> np.ndarray:
    """A one-time step of +`size` of the level at each epoch in `at`, flat between."""
    return (1 + size) ** np.searchsorted(np.asarray(at), np.arange(epochs), side="right")


@pytest.mark.parametrize("every", [1, 2])
def test_growth_before_the_first_drop_then_flat_does_not_alarm(every: int) -> None:
    # |dE| grows 6% a probed epoch up to the first drop and stays flat after: drift at full lr is
    # not robust overfitting, and nothing built up before the drop is counted against it
    lr = piecewise(30, [15, 23])
    assert detect(rows_of(growth(30, 9, 0.06, stop=15), lr, every=every)).alarm_epoch is None
    assert detect(rows_of(growth(30, 9, 0.06, stop=15), lr, every=every), transient=1).alarm_epoch is None


@pytest.mark.parametrize("size", [0.4, 0.8])
@pytest.mark.parametrize("every", [1, 2])
def test_a_step_at_each_drop_flat_between_does_not_alarm(size: float, every: int) -> None:
    lr = piecewise(40, [15, 23])
    result = detect(rows_of(steps(40, [15, 23], size), lr, every=every))
    assert result.alarm_epoch is None
    # with the baseline taken at the drop itself (no transient), the same steps alarm: the test
    # holds the transient to its job
    assert result.phase2_start is not None
    assert detect(rows_of(steps(40, [15, 23], size), lr, every=every), transient=1).alarm_epoch is not None


@pytest.mark.parametrize("every", [1, 2])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_growth_after_the_last_drop_alarms_within_five_probed_epochs(every: int, seed: int) -> None:
    # |dE| grows 15% of its plateau per epoch from the last drop on
    lr = piecewise(60, [15, 23])
    result = detect(rows_of(growth(60, 23, 0.15), lr, every=every, noise=0.02, seed=seed))
    assert result.alarm_epoch is not None and 23 < result.alarm_epoch <= 23 + 5 * every
    assert result.phase3_start is not None and 23 <= result.phase3_start <= result.alarm_epoch


@pytest.mark.parametrize("start", [50, 53])
@pytest.mark.parametrize("every", [1, 2])
def test_overfitting_after_the_first_of_two_drops_is_caught_there(start: int, every: int) -> None:
    # Rice's schedule (drops at 50% and 75% of 100 epochs): robust overfitting starts after the
    # first drop, and the alarm comes within 5 probed epochs, not at the second drop
    lr = piecewise(100, [50, 75])
    result = detect(rows_of(growth(100, start, 0.15), lr, every=every, noise=0.02))
    assert result.alarm_epoch is not None and start < result.alarm_epoch <= start + 5 * every < 75


@pytest.mark.parametrize("seed", range(4))
def test_trades_like_flat_energies_never_alarm(seed: int) -> None:
    # TRADES: |dE| small against |E(x)|, flat with noise, small steps at the drops
    lr = piecewise(100, [50, 75])
    data = rows_of(steps(100, [50, 75], 0.3), lr, noise=0.1, seed=seed, scale=0.06)
    assert detect({**data, "probe_train_E": np.full(100, -6.0)}).alarm_epoch is None
    assert detect(rows_of(steps(100, [50, 75], 0.1), lr, noise=0.05, seed=seed)).alarm_epoch is None


def test_onecycle_counts_alarms_past_the_middle_of_its_decay() -> None:
    # a smooth decay opens the gate at half the peak lr and takes one baseline there; growth
    # before it is absorbed, growth after it alarms
    t = np.arange(60)
    peak = 15
    lr = np.where(t < peak, 0.004 + 0.096 * t / peak, 0.05 * (1 + np.cos(np.pi * (t - peak) / (60 - peak))))
    opens = peak + int(np.argmax(lr[peak:] <= 0.05))
    assert detect(rows_of(growth(60, 10, 0.06, stop=opens), lr)).alarm_epoch is None
    result = detect(rows_of(growth(60, opens + 5, 0.15), lr))
    assert result.alarm_epoch is not None and opens + 5 < result.alarm_epoch <= opens + 10


@pytest.mark.parametrize("every", [1, 2])
@pytest.mark.parametrize("seed", [0, 1])
def test_slow_growth_after_the_drop_alarms_once_it_has_added_up_to_the_ratio(every: int, seed: int) -> None:
    # robust overfitting as the stopping suite's single-drop SAT runs and the stored Fashion-MNIST
    # run show it: |dE| grows about 1% of its level per epoch from the drop on, for the rest of the
    # run. The baseline taken after the drop stays put, so the growth adds up: the alarm comes once
    # it reaches 30% (epoch 40 + 30), and the offline onset sits at the drop, where the growth starts
    lr = piecewise(100, [40])
    result = detect(rows_of(growth(100, 40, 0.01), lr, every=every, noise=0.01, seed=seed))
    assert result.alarm_epoch is not None and 40 + 28 <= result.alarm_epoch <= 40 + 30 + 4 * every, result
    assert result.phase3_start is not None and 40 <= result.phase3_start <= 46, result
    # drift that stops short of the ratio (20% here) raises nothing
    assert detect(rows_of(growth(100, 40, 0.01, stop=60), lr, every=every, noise=0.01, seed=seed)).alarm_epoch is None


def test_without_lr_slow_drift_joins_the_baseline_and_fast_growth_still_alarms() -> None:
    # rows without `lr` show no drop to measure from: alarms count from phase 2 on, against a
    # baseline that follows drift below the alarm level (1% a probed epoch lags it by ~20%)
    no_lr = np.full(100, np.nan)
    assert detect(rows_of(growth(100, 20, 0.01), no_lr, noise=0.01)).alarm_epoch is None
    result = detect(rows_of(growth(100, 40, 0.15), no_lr, noise=0.01))
    assert result.alarm_epoch is not None and 40 < result.alarm_epoch <= 45


def test_the_baseline_is_retaken_after_each_drop_and_survives_a_checkpoint() -> None:
    lr = piecewise(40, [15, 23])
    data = rows_of(steps(40, [15, 23], 0.5), lr)
    rows = [{k: data[k][i] for k in data} for i in range(40)]
    det = OnlineDetector()
    for r in rows[:16]:
        det.update(r)
    assert det.drop_epoch == 15 and det.baseline_epoch is not None and det.baseline_epoch < 15  # still settling
    det = OnlineDetector.from_state_dict(det.state_dict())
    for r in rows[16:]:
        det.update(r)
    assert det.drop_epoch == 23 and det.baseline_epoch == 24 and det.alarm_epoch is None



def test_ground_truth_on_the_validation_loss_alone() -> None:
    # validation robust loss bottoms at 40 and ends 30% higher; robust accuracy stays flat: only the
    # loss shows the overfitting, and `signals` chooses which columns may
    t = np.arange(100)
    loss = 1.0 + 0.3 * np.clip(t - 40, 0, None) / 60 + 0.5 * np.clip(40 - t, 0, None) / 40
    data = {"epoch": t, "val_robust_loss": loss, "val_robust_acc": np.full(100, 0.5), "test_robust_acc": np.full(100, 0.5)}
    truth = ground_truth_onset(data, split="val", signals=("robust_loss",))
    assert truth.epoch is not None and 39 <= truth.epoch <= 41 and truth.signal == "val_robust_loss"
    assert ground_truth_onset(data, split="val", signals=("robust_acc",)).epoch is None
    assert ground_truth_onset(data).epoch is None  # the test columns show nothing
    with pytest.raises(ValueError, match="signals"):
        ground_truth_onset(data, signals=("loss",))
