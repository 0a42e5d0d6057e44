"""Behaviours pinned by value, not only by "it ran and the numbers are finite" (issue 14, item 9).

Each test here was seen to fail when the code under it was broken on purpose (a flipped sign, a
skipped line, another ordering); the commit that added them lists the breaks. What they pin:

- the energy-divergence stop: a trial alarms and stops where the alarm and the patience rule say;
- a trial's `final_*` accuracies: the best checkpoint's, recomputed outside the engine;
- `energyat eval DIR --trial best`: the trial with the highest *validation* robust accuracy;
- the sign of `energyat landscape`'s dE = E(x) - E(x*): untargeted PGD lowers the energy of a
  standard model (dE > 0), targeted PGD raises it (dE < 0), per image as recomputed here.

Every trial pins `precision: fp32` and one thread, so its numbers do not depend on the CPU's bf16
support or on the thread count; the thread count is restored afterwards. That is not enough for a
training trajectory: fp32 kernels differ by instruction set (AVX-512 on Intel, AVX2 on older AMD),
and after a few epochs so do the curves. So the stop test scripts what its detector reads (see
DIVERGES), and the numbers quoted for the other trials are what one machine measured.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY

from analysis.phases import DETECTOR_COLUMNS, OnlineDetector
from analysis.query import open_tables
from analysis.stopping import StopRule
from study.cli import main
from trainables import checkpoint
from trainables.attacks import pgd, pgd_targeted
from trainables.config import DatasetConfig, TrialConfig, parse_trial
from trainables.data import load_dataset, to_float
from trainables.engine import run_trial
from trainables.models import build_model
from trainables.probe import eval_seed, probe_set


@pytest.fixture(autouse=True)
def _restore_threads() -> Iterator[None]:
    """`threads: 1` in a spec sets torch's thread count for the whole process: put it back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _rows(out: Path, sql: str) -> list[dict[str, Any]]:
    con = open_tables(out)
    try:
        return con.sql(sql).to_arrow_table().to_pylist()
    finally:
        con.close()


def _model(cfg: TrialConfig, weights: Path) -> torch.nn.Module:
    model = build_model(cfg.model, in_channels=1, num_classes=10, image_size=8, width=cfg.width, init=cfg.model_init)
    model.load_state_dict(checkpoint.load(weights)["model"])
    return model.to(memory_format=torch.channels_last).eval()  # the engine's layout: the same arithmetic


# -- 1. the energy-divergence stop ---------------------------------------------------------------

# What the detector reads is scripted here; the training, the checkpoints, the stop and the final
# evaluation are real. A real |dE| curve made this test pass or fail by the CPU's instruction set
# (measured on the recipe below with 30 epochs and 128 probed images, fp32, one thread):
#   Intel Xeon with AMX/AVX-512: |dE| 1.07-1.12 over epochs 7-10 (phase 2 from 10), then 1.47,
#     1.76: alarm at 13, stop at 14, about 7 s;
#   AVX2 only (ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2, the
#     code an AMD EPYC without AVX-512 runs): the same to 2 digits through epoch 5, then 1.17, 1.28
#     at 8-9, so phase 2 only from 16 (|dE| 1.8-1.9); it creeps to 2.3-2.5, at most +26% over
#     its baseline where the alarm wants +30% twice: no alarm, 30 epochs.
# The same recipe with seeds 1-8 (Intel) alarmed in 4 runs of 8; some 25 variants (lr drops at
# 8-12 from 0.1-0.4, label noise 0.2-0.4, weight decay 0, eps 0.2-0.25, batch 16, 100 or 400
# images, cnn_fc, width 2, onecycle, fgsm_rs), two seeds each, did no better: on runs this short
# |dE| rises and saturates, phase 2 starts on the plateau, and whether the creep after it reaches
# +30% is a coin toss. analysis.phases is tested on stored real curves (tests/test_phases.py).
#
# So the training probe's mean dE is replaced by a step (-1 through epoch 5, then -3: SAT's sign,
# three times the plateau, far past the alarm's 1.3x), and validation robust accuracy by a curve
# that peaks at epoch 9. The real detector, replayed below, alarms at 8 (phase 2 from 3); with
# patience 2 the trial stops at 11 of 16 planned, whatever the CPU: about 5 s (6 s with AVX2).
DIVERGES = {
    **TINY,
    "name": "diverges",
    "dataset": {"name": "digits", "train_size": 200, "val_size": 100},
    "method": "sat",
    "epochs": 16,
    "batch_size": 32,
    "lr": 0.1,
    "schedule": {"name": "piecewise", "milestones": [1], "gamma": 0.5},  # the lr gate is open from epoch 1
    "attack": {"eps": 0.15, "step": 0.0375, "steps": 5},
    "eval_attack": {"steps": 5},
    "probe": {"train_size": 48, "test_size": 0, "every": 1, "samples_every": 0},  # every epoch: the n-th probe is epoch n
    "final_eval": {"n": 64, "pgd_steps": 5, "autoattack_n": 0},
    "precision": "fp32",
    "threads": 1,
}
PATIENCE = 2
STEP_EPOCH, PEAK_EPOCH = 6, 9


def _scripted_dE(epoch: int) -> float:
    return -1.0 if epoch < STEP_EPOCH else -3.0


def _scripted_val_robust_acc(epoch: int) -> float:
    return 0.1 + 0.05 * min(epoch, PEAK_EPOCH) - 0.02 * max(epoch - PEAK_EPOCH, 0)


@pytest.fixture
def scripted_probe(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, float]]:
    """The engine's probe columns with `probe_train_dE` and `val_robust_acc` scripted by epoch
    (the probe runs every epoch, so its n-th call is epoch n); returns the real columns."""
    import trainables.engine as engine

    real, seen = engine.probe_columns, []

    def scripted(*args: Any, **kwargs: Any) -> dict[str, float]:
        columns = real(*args, **kwargs)
        epoch = len(seen)
        seen.append(dict(columns))
        return {**columns, "probe_train_dE": _scripted_dE(epoch), "val_robust_acc": _scripted_val_robust_acc(epoch)}

    monkeypatch.setattr(engine, "probe_columns", scripted)
    return seen


def test_energy_divergence_stops_a_trial_at_the_first_alarmed_epoch_without_a_new_best_for_patience_epochs(
    tmp_path: Path, scripted_probe: list[dict[str, float]]
) -> None:
    cfg = parse_trial(DIVERGES)
    result = run_trial(cfg, out=tmp_path, stop=StopRule(energy_patience=PATIENCE))
    rows = _rows(tmp_path, "select * from epochs order by epoch")
    assert [r["probe_train_dE"] for r in rows] == [_scripted_dE(r["epoch"]) for r in rows]  # the script reached the rows
    assert len(scripted_probe) == len(rows) and all(math.isfinite(c["probe_train_dE"]) for c in scripted_probe)

    # the stop epoch, worked out from the stored rows: the online detector replayed on the
    # training-side columns, the best epoch on validation robust accuracy (a strictly higher
    # value moves it), and analysis.phases.should_stop's rule written out
    detector, best, best_epoch, stop = OnlineDetector(), -math.inf, None, None
    for row in rows:
        _, alarm = detector.update({k: row[k] for k in DETECTOR_COLUMNS})
        assert row["alarm"] == alarm, row["epoch"]
        if row["val_robust_acc"] > best:
            best, best_epoch = row["val_robust_acc"], row["epoch"]
        if alarm and row["epoch"] - best_epoch >= PATIENCE:
            stop = row["epoch"]
            break
    assert stop is not None and detector.alarm_epoch is not None
    # the script's premise: the alarm comes after the step, and patience delays the stop past it
    # (alarm 8, best 9, stop 11)
    assert STEP_EPOCH <= detector.alarm_epoch < stop < cfg.epochs - 1

    assert result["stop_reason"] == "energy_divergence" and result["status"] == "TERMINATED"
    assert result["epochs_run"] == stop + 1 == len(rows)  # nothing trained after the stop
    assert [r["epoch"] for r in rows] == list(range(stop + 1))
    assert result["alarm_epoch"] == detector.alarm_epoch
    assert result["best_epoch"] == best_epoch and result["best_val_robust_acc"] == best
    assert result["phase3_start"] is not None and result["phase3_start"] <= detector.alarm_epoch

    # the trials row says the same, and the best checkpoint was evaluated on the test set
    (trial,) = _rows(tmp_path, "select * from trials")
    outcome = (trial["stop_reason"], trial["epochs_run"], trial["alarm_epoch"], trial["best_epoch"])
    assert outcome == ("energy_divergence", stop + 1, detector.alarm_epoch, best_epoch)
    assert checkpoint.load(tmp_path / "checkpoints" / "train" / "best.pt")["epoch"] == best_epoch
    assert 0.1 < trial["final_pgd_acc"] <= trial["final_clean_acc"] <= 1.0  # finite, above chance
    assert trial["final_clean_acc"] * 64 == round(trial["final_clean_acc"] * 64)  # a count of the 64 images
    assert math.isnan(trial["final_autoattack_acc"])  # autoattack_n 0: skipped, not made up


# -- 2. several trials in one directory: final accuracies and `eval --trial best` ----------------

# Three SAT trials of TINY that differ by seed, in one `energyat train`-style directory. Their
# numbers (fp32, one thread; the same with AVX2 kernels, ONEDNN_MAX_CPU_ISA=AVX2
# ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2: three epochs are too few to drift apart):
# best validation robust accuracy / final PGD / final clean accuracy
#   a (seed 3): 0.150 / 0.250 / 0.328, best epoch 1 of 3
#   b (seed 2): 0.160 / 0.203 / 0.422
#   c (seed 4): 0.070 / 0.141 / 0.141
# so validation picks b, which is neither the first nor the last id, nor the test set's pick (a).
MULTI = {**TINY, "name": "multi", "method": "sat", "epochs": 3, "precision": "fp32", "threads": 1}
SEEDS = {"a": 3, "b": 2, "c": 4}


@pytest.fixture(scope="module")
def trials(tmp_path_factory: pytest.TempPathFactory) -> Path:
    threads = torch.get_num_threads()
    out = tmp_path_factory.mktemp("multi") / "out"
    for trial_id, seed in SEEDS.items():
        # the first writes spec.yaml, as `energyat train` does; the others differ from it by seed only
        spec_file = out / "spec.yaml" if trial_id == "a" else None
        run_trial(parse_trial({**MULTI, "seed": seed}), out=out, trial_id=trial_id, spec_file=spec_file)
    torch.set_num_threads(threads)
    return out


def test_final_accuracies_are_the_best_checkpoints_recomputed_outside_the_engine(trials: Path) -> None:
    # final_clean_acc and final_pgd_acc of trial `a`, recomputed from its best.pt: the clean
    # accuracy with a plain forward pass over the first final_eval.n test images, the PGD accuracy
    # with trainables.attacks.pgd from the final evaluation's own random stream. Its best epoch is
    # not its last, so numbers taken from the last weights would not match.
    (row,) = _rows(trials, "select * from trials where trial_id = 'a'")
    cfg = parse_trial({**MULTI, "seed": SEEDS["a"]})
    folder = trials / "checkpoints" / "a"
    assert checkpoint.load(folder / "best.pt")["epoch"] == row["best_epoch"] < cfg.epochs - 1
    data = load_dataset(cfg.dataset)
    n, a, step = cfg.final_eval.n, cfg.attack, cfg.attack.step
    assert n is not None and step is not None
    x, y = to_float(data.test_x[:n]), data.test_y[:n]

    def accuracies(model: torch.nn.Module) -> tuple[float, float]:
        with torch.random.fork_rng():
            torch.manual_seed(eval_seed(cfg.seed, -1, "final"))
            x_adv = pgd(model, x, y, eps=a.eps, step_size=step, steps=cfg.final_eval.pgd_steps, norm=a.norm)
        with torch.no_grad():
            clean, robust = (int((model(t).argmax(1) == y).sum()) for t in (x, x_adv))
        return clean / n, robust / n

    best = accuracies(_model(cfg, folder / "best.pt"))
    assert (row["final_clean_acc"], row["final_pgd_acc"]) == best
    assert best != accuracies(_model(cfg, folder / "last.pt"))  # the last epoch's weights: 0.297 / 0.172 against 0.328 / 0.250


def test_eval_trial_best_evaluates_the_trial_with_the_highest_best_validation_robust_accuracy(
    trials: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = {r["trial_id"]: r for r in _rows(trials, "select * from trials")}
    by_val = max(rows, key=lambda t: rows[t]["best_val_robust_acc"])
    # the fixture's premises: every other rule picks another trial
    assert len({r["best_val_robust_acc"] for r in rows.values()}) == 3
    assert by_val not in (min(rows), max(rows))  # not the first or the last id (nor the first or last written)
    assert by_val != max(rows, key=lambda t: rows[t]["final_pgd_acc"])  # the test set would pick another
    assert min(rows, key=lambda t: rows[t]["best_val_robust_acc"]) != by_val

    # with the picked trial's seed, `eval` repeats its final evaluation: the same weights were loaded
    assert main(["eval", str(trials), "--trial", "best", "--n", "64", "--attacks", "clean,pgd", "--pgd-steps", "3",
                 "--seed", str(SEEDS[by_val])]) == 0
    capsys.readouterr()
    evals = _rows(trials, "select * from evals where evaluated_by = 'energyat eval' order by attack")
    assert [(r["trial_id"], r["attack"]) for r in evals] == [(by_val, "clean"), (by_val, "pgd")]
    assert all(Path(r["checkpoint"]) == trials / "checkpoints" / by_val / "best.pt" for r in evals)
    assert [r["accuracy"] for r in evals] == [rows[by_val]["final_clean_acc"], rows[by_val]["final_pgd_acc"]]


# -- 3. the sign of the landscape's dE -----------------------------------------------------------


@pytest.fixture(scope="module")
def standard_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A standard (non-robust) small CNN: 3 epochs of SGD on the digits training split (train
    accuracy about 0.99), saved as a plain state_dict."""
    data = load_dataset(DatasetConfig(name="digits"))
    x, y = to_float(data.train_x), data.train_y
    torch.manual_seed(0)
    model = build_model("small_cnn", in_channels=1, num_classes=10, image_size=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    model.train()
    for _ in range(3):
        order = torch.randperm(len(y))
        for lo in range(0, len(y), 64):
            idx = order[lo : lo + 64]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    path = tmp_path_factory.mktemp("standard") / "standard.pt"
    torch.save(model.state_dict(), path)
    return path


def test_landscape_de_is_positive_under_untargeted_and_negative_under_targeted_pgd_on_a_standard_model(
    standard_weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # docs/science.md finding 1, and the definition dE = E(x) - E(x*), E = -logsumexp f: on a standard
    # model untargeted PGD overshoots into a confident wrong class (E(x*) below E(x): dE > 0) and
    # targeted PGD to a random wrong class leaves it less confident (dE < 0). At eps 0.25 (PGD-20,
    # step 0.0625) on the 64-image test probe: mean dE 4.7 and -1.4, 88% and 75% of the images
    # (measured). Each stored value is recomputed here from the weights, the probe's images and
    # targets, and the landscape's random stream (the CLI's default --seed 0).
    out = tmp_path / "results"
    assert main(["landscape", str(out), "--checkpoint", str(standard_weights), "--model", "small_cnn", "--dataset", "digits",
                 "--eps", "0.25", "--n", "64", "--attacks", "pgd,targeted"]) == 0
    capsys.readouterr()
    import pyarrow.parquet as pq

    table = pq.read_table(out / "landscape" / "landscape.parquet").to_pylist()
    stored = {attack: [r for r in table if r["attack"] == attack] for attack in ("pgd", "targeted")}

    data = load_dataset(DatasetConfig(name="digits", val_size=1))  # the split a model from outside is studied on
    test = probe_set("test", data.test_x, data.test_y, 64, 0 + 2, data.num_classes)  # dataset.seed 0, the test probe's + 2
    for rows in stored.values():
        assert [r["index"] for r in rows] == test.index.tolist()
    model = build_model("small_cnn", in_channels=1, num_classes=10, image_size=8)
    model.load_state_dict(torch.load(standard_weights, weights_only=True))
    model = model.to(memory_format=torch.channels_last).eval()
    x, y = to_float(test.x), test.y
    with torch.random.fork_rng():
        torch.manual_seed(eval_seed(0, -1, "landscape"))
        x_adv = pgd(model, x, y, eps=0.25, step_size=0.0625, steps=20)
        x_tgt = pgd_targeted(model, x, test.targets, eps=0.25, step_size=0.0625, steps=20)
    with torch.no_grad():
        logits = {name: model(t).double() for name, t in (("x", x), ("pgd", x_adv), ("targeted", x_tgt))}

    def energy(name: str) -> torch.Tensor:
        return -torch.logsumexp(logits[name], 1)

    def joint(name: str) -> torch.Tensor:
        return -logits[name].gather(1, y[:, None]).squeeze(1)

    for attack, rows in stored.items():
        assert [r["dE"] for r in rows] == pytest.approx((energy("x") - energy(attack)).tolist(), abs=1e-4)
        assert [r["dEy"] for r in rows] == pytest.approx((joint("x") - joint(attack)).tolist(), abs=1e-4)
    pgd_de = np.array([r["dE"] for r in stored["pgd"]])
    tgt_de = np.array([r["dE"] for r in stored["targeted"]])
    assert pgd_de.mean() > 1.0 and (pgd_de > 0).mean() > 0.7
    assert tgt_de.mean() < -0.5 and (tgt_de < 0).mean() > 0.6
    # the attacks did succeed (every digit fooled, measured) and pushed E(x, y) up: dEy < 0 for both
    assert np.mean([r["fooled"] for r in stored["pgd"]]) > 0.9
    assert np.mean([r["dEy"] for r in stored["pgd"]]) < 0 and np.mean([r["dEy"] for r in stored["targeted"]]) < 0
