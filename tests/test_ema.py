"""`ema:`, the exponential moving average of the weights: updated after every optimiser step
(from `ema.start`; before it the average follows the live weights), batch-norm buffers included,
and read by every evaluation while the live weights train. Checked against the average computed
here by hand from the live weights after each step of the same training."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from conftest import TINY

from analysis.errors import SpecError
from analysis.query import open_tables
from trainables.config import EmaConfig, parse_trial
from trainables.data import load_dataset
from trainables.engine import _configure_torch, _set_up, _train_epoch, epoch_probes, probe_epoch, run_trial
from trainables.probe import probe_columns

CPU = torch.device("cpu")
DECAY = 0.7


def _cfg(**extra):
    return parse_trial({**TINY, "epochs": 3, "method": "sat", "ema": {"decay": DECAY, "start": 1}, **extra})


def _by_hand(cfg) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The live weights after the last epoch and their average, trained as run_trial trains (same
    seed, same order of draws) with the average kept here: during epochs before `start` it is the
    live state at each epoch's end; from `start` on, decay * average + (1 - decay) * live after
    every step, parameters and floating-point buffers alike."""
    _configure_torch(cfg, CPU)
    data = load_dataset(cfg.dataset).to(CPU)
    trial = _set_up(dataclasses.replace(cfg, ema=EmaConfig()), data, CPU)  # no average inside: it is kept here
    model = trial.model

    def live() -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    average: dict[str, torch.Tensor] = {}

    def step() -> None:
        for k, v in live().items():
            average[k] = v if k not in average or not v.is_floating_point() else DECAY * average[k] + (1 - DECAY) * v

    for epoch in range(cfg.epochs):
        if epoch < cfg.ema.start:
            _train_epoch(model, trial.opt, cfg, data, trial.params, epoch, CPU)
            average.clear()
            average.update(live())
        else:
            _train_epoch(model, trial.opt, cfg, data, trial.params, epoch, CPU, average=step)
    return live(), average


@pytest.mark.parametrize("extra", [{}, {"precision": "bf16"}, {"compile": True, "compile_backend": "aot_eager"}],
                         ids=["fp32", "bf16", "compiled"])
def test_the_average_is_the_ema_of_the_live_weights_after_every_step(tmp_path: Path, extra: dict) -> None:
    # under bf16 autocast the weights and their average stay fp32; a compiled model trains the
    # same parameters the average reads
    cfg = _cfg(**extra)
    run_trial(cfg, out=tmp_path)
    last = torch.load(tmp_path / "checkpoints" / "train" / "last.pt", weights_only=True)
    live, average = _by_hand(cfg)
    # the probes draw from their own seeded streams, so the live weights train as they do without them
    for k, v in live.items():
        torch.testing.assert_close(last["live_model"][k], v, rtol=1e-5, atol=1e-6)
    for k, v in average.items():
        if v.is_floating_point():  # batch-norm running statistics included
            torch.testing.assert_close(last["model"][k], v, rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(last["model"][k], live[k]) for k in live if live[k].is_floating_point())


def test_every_evaluation_reads_the_average(tmp_path: Path) -> None:
    # best.pt's `model` (what the final evaluation, `energyat eval` and `sample` load) holds the
    # average, and the validation numbers of the best epoch are that average's
    cfg = _cfg(ema={"decay": DECAY, "start": 0})  # averaged from the first step: never the live weights
    result = run_trial(cfg, out=tmp_path)
    best = torch.load(tmp_path / "checkpoints" / "train" / "best.pt", weights_only=True)
    epoch = result["best_epoch"]
    data = load_dataset(cfg.dataset).to(CPU)
    trial = _set_up(cfg, data, CPU)
    for weights, same in ((best["model"], True), (best["live_model"], False)):
        trial.model.load_state_dict(weights)
        values = probe_epoch(trial.model, epoch_probes(cfg, data), cfg, trial.params, epoch)
        columns = probe_columns(values["train"], values["val"], values["test"])
        row = open_tables(tmp_path).execute("select val_robust_loss, probe_train_dE from epochs where epoch = $e", {"e": epoch}).fetchone()
        matches = [columns["val_robust_loss"] == pytest.approx(row[0]), columns["probe_train_dE"] == pytest.approx(row[1])]
        assert matches == [same, same], (weights is best["model"], columns, row)


@pytest.mark.parametrize(("ema", "key"), [({"decay": 1.0}, "ema.decay"), ({"decay": -0.1}, "ema.decay"), ({"decay": 0.9, "start": 3}, "ema.start"),
                                          ({"decay": 0.9, "every": 2}, "ema.every")])
def test_a_bad_ema_block_names_its_key(ema: dict, key: str) -> None:
    with pytest.raises(SpecError, match=f"`{key}`"):
        parse_trial({**TINY, "epochs": 3, "ema": ema})
