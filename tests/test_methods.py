"""Every AT method: one signature, finite losses, and a 2-epoch run on digits with finite rows."""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from analysis.query import open_tables
from analysis.schema import EPOCHS
from trainables.config import DerConfig, WeatConfig, parse_trial
from trainables.engine import run_trial
from trainables.methods import METHODS, MethodParams, delta_energy_penalty
from conftest import TINY


def _params(**changes: object) -> MethodParams:
    base = MethodParams(eps=0.15, step_size=0.05, steps=2, norm="linf", fgsm_step=0.1875, beta=6.0, weat=WeatConfig(), der=DerConfig())
    return replace(base, **changes)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_returns_finite_scalar_loss_and_parts(name: str, trained_cnn, digits_batch) -> None:
    x, y = digits_batch
    trained_cnn.train()
    loss, parts = METHODS[name].loss(trained_cnn, x, y, params=_params())
    trained_cnn.eval()
    assert loss.dim() == 0 and torch.isfinite(loss) and loss.requires_grad
    assert parts.logits.shape == parts.logits_adv.shape == (len(y), 10)
    assert parts.weights.shape == (len(y),) and not parts.logits.requires_grad


def test_weat_with_power_zero_is_trades(trained_cnn, digits_batch) -> None:
    # WEAT_nat with power 0 (all weights 1) is exactly TRADES given the same attack randomness
    # (each on its own copy: a train-mode forward updates batch-norm running statistics)
    x, y = digits_batch
    a, b = copy.deepcopy(trained_cnn).train(), copy.deepcopy(trained_cnn).train()
    torch.manual_seed(3)
    trades_loss, _ = METHODS["trades"].loss(a, x, y, params=_params())
    torch.manual_seed(3)
    weat_loss, parts = METHODS["weat"].loss(b, x, y, params=_params(weat=WeatConfig(power=0.0, variant="nat")))
    assert torch.allclose(trades_loss, weat_loss, rtol=1e-5)
    assert torch.equal(parts.weights, torch.ones(len(y)))


def test_der_penalty_is_zero_inside_gamma_and_euclidean_outside() -> None:
    nat = torch.tensor([[2.0, 0.0], [2.0, 0.0]])
    adv = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    y = torch.tensor([0, 0])
    pen = delta_energy_penalty(nat, adv, y, gamma=0.0)
    assert pen[0] == 0  # no energy shift, no penalty
    d_marginal = -torch.logsumexp(nat[1], 0) + torch.logsumexp(adv[1], 0)
    assert torch.isclose(pen[1], torch.hypot(d_marginal, torch.tensor(-2.0)))
    assert delta_energy_penalty(nat, adv, y, gamma=10.0)[1] == 0


def test_single_step_der_gates_on_abnormal_examples(trained_cnn, digits_batch) -> None:
    # the reported DER weights are the AAE gate: 0 or 1, CE(x*) < CE(x)
    x, y = digits_batch
    trained_cnn.train()
    _, parts = METHODS["der"].loss(trained_cnn, x, y, params=_params(der=DerConfig(single_step=True)))
    trained_cnn.eval()
    assert set(parts.weights.unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_two_epochs_with_finite_rows(method: str, tmp_path: Path) -> None:
    extra = {"der": {"single_step": True}} if method == "der" else {}
    cfg = parse_trial({**TINY, "method": method, **extra})
    result = run_trial(cfg, out=tmp_path, trial_id=f"t-{method}")
    assert result["status"] == "TERMINATED" and result["epochs_run"] == 2
    con = open_tables(tmp_path)
    rows = con.sql("select * from epochs order by epoch").to_arrow_table().to_pylist()
    assert [r["epoch"] for r in rows] == [0, 1]
    for row in rows:
        for column in EPOCHS.names:
            value = row[column]
            assert value is not None, column
            if isinstance(value, float):
                assert math.isfinite(value), (column, value)
    assert con.execute("select count(*) from samples").fetchone()[0] == 2 * (48 + 48)
