"""Every AT method: one signature, finite losses, and a 2-epoch run on digits with finite rows."""

from __future__ import annotations

import copy
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import get_args

import pytest
import torch
from conftest import ROOT, TINY

from analysis.query import open_tables
from analysis.schema import EPOCHS
from study.space import Dimension
from trainables.config import DerConfig, MethodName, TrialConfig, WeatConfig, flatten, parse_trial
from trainables.engine import run_trial
from trainables.methods import METHODS, MethodParams, delta_energy_penalty, weat_weights
from trainables.models import build_model


def _params(**changes: object) -> MethodParams:
    base = MethodParams(eps=0.15, step_size=0.05, steps=2, norm="linf", fgsm_step=0.1875, beta=6.0, weat=WeatConfig(), der=DerConfig())
    return replace(base, **changes)  # type: ignore[arg-type]


def test_the_spec_names_the_methods_of_the_registry_in_its_order() -> None:
    # MethodName is what the spec parser accepts and mypy checks; METHODS is what trains
    assert get_args(MethodName) == tuple(METHODS)


def test_the_registry_and_the_search_space_import_without_torch() -> None:
    # spec checks and the search space run where nothing trains (the study driver, `energyat check`)
    code = "import sys, study.space, trainables.methods; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


@pytest.mark.parametrize("name", sorted(METHODS))
def test_each_method_has_a_label_a_summary_and_claims_only_spec_keys_that_exist(name: str) -> None:
    method = METHODS[name]
    assert method.label and method.summary
    keys = flatten(TrialConfig().to_dict())
    for claimed in method.spec_keys:  # a key, or a block with a trailing dot ("weat.")
        assert any(k == claimed or (claimed.endswith(".") and k.startswith(claimed)) for k in keys), claimed


def test_the_search_space_suggests_a_methods_own_keys_to_that_method_only() -> None:
    # beta for the methods with a KL or penalty weight, a method's own block for it alone, the rest for all
    expected = {"beta": {"trades", "weat", "der", "mart"}, "weat.power": {"weat"}, "der.gamma": {"der"}, "lr": set(METHODS)}
    for key, methods in expected.items():
        assert {m for m in METHODS if Dimension(key, "float").used_by(m)} == methods, key


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_returns_finite_scalar_loss_and_parts(name: str, trained_cnn, digits_batch) -> None:
    x, y = digits_batch
    trained_cnn.train()
    loss, parts = METHODS[name].batch_loss(trained_cnn, x, y, params=_params())
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
    trades_loss, _ = METHODS["trades"].batch_loss(a, x, y, params=_params())
    torch.manual_seed(3)
    weat_loss, parts = METHODS["weat"].batch_loss(b, x, y, params=_params(weat=WeatConfig(power=0.0, variant="nat")))
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


def _ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per sample in float64, written out (not F.cross_entropy)."""
    logits = logits.double()
    return torch.logsumexp(logits, 1) - logits.gather(1, y[:, None]).squeeze(1)


def test_single_step_der_gate_is_ce_after_the_step_below_ce_before(digits_batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    # DER's single-step gate (arXiv 2505.22486): the penalty applies to abnormal adversarial
    # examples only, those whose loss after the FGSM-RS step is *lower* than before,
    # CE(x*, y) < CE(x, y). A trained model has none at eps 0.15 (every gate 0, so any rule
    # passes); a freshly initialised CNN (seed 3) with a large ball (eps 0.5, step 1.0) has 17
    # of 64, so a flipped comparison, a gate of ones or an ungated penalty each change the numbers.
    x, y = digits_batch
    torch.manual_seed(3)
    model = build_model("small_cnn", in_channels=1, num_classes=10, image_size=8).train()
    params = _params(eps=0.5, fgsm_step=1.0, der=DerConfig(single_step=True, gamma=0.0))
    loss, parts = METHODS["der"].batch_loss(model, x, y, params=params)
    ce, ce_adv = _ce(parts.logits, y), _ce(parts.logits_adv, y)
    gate = (ce_adv < ce).double()
    assert 10 <= int(gate.sum()) <= len(y) - 10  # both kinds present (measured: 17 abnormal)
    assert parts.weights.tolist() == gate.tolist()
    # and the loss applies it: mean(CE(x*) + beta * gate * ||[dE(x), dE(x, y)]||), gamma 0
    logits, logits_adv = parts.logits.double(), parts.logits_adv.double()
    d_marginal = torch.logsumexp(logits_adv, 1) - torch.logsumexp(logits, 1)  # E(x) - E(x*)
    d_joint = logits_adv.gather(1, y[:, None]).squeeze(1) - logits.gather(1, y[:, None]).squeeze(1)  # E(x,y) - E(x*,y)
    penalty = torch.hypot(d_marginal, d_joint)
    expected = (ce_adv + params.beta * gate * penalty).mean()
    assert loss.item() == pytest.approx(float(expected), rel=1e-5)
    ungated = (ce_adv + params.beta * penalty).mean()
    assert abs(float(ungated) - float(expected)) > 1e-3 * float(expected)  # the gate is visible in the loss


@pytest.mark.parametrize(
    "weat",
    [
        WeatConfig(tau=2.5, power=1.5, energy="adversarial"),  # the `energy: adversarial` branch, tau != 1
        WeatConfig(tau=0.5, power=2.0, energy="natural", normalize=True),
    ],
    ids=["adversarial-tau2.5", "natural-tau0.5-normalized"],
)
def test_weat_weights_are_the_closed_form_of_the_chosen_energy_over_tau(
    weat: WeatConfig, trained_cnn: torch.nn.Module, digits_batch: tuple[torch.Tensor, torch.Tensor]
) -> None:
    # docs/science.md section 3: w_i = log(1 + exp(|E_i| / tau)) ** (-power), E = -logsumexp of the
    # natural (`energy: natural`) or the adversarial (`energy: adversarial`) logits, divided by
    # the batch mean with `normalize`; the loss is mean(w * (CE(x*) + beta * KL(p(x) || p(x*)))).
    # Computed here in float64 from the logits the method returns.
    x, y = digits_batch
    model = copy.deepcopy(trained_cnn).train()  # a copy: a train-mode forward moves batch-norm statistics
    loss, parts = METHODS["weat"].batch_loss(model, x, y, params=_params(weat=weat))

    def closed_form(logits: torch.Tensor) -> torch.Tensor:
        energy = -torch.logsumexp(logits.double(), 1)
        w = torch.log1p(torch.exp(energy.abs() / weat.tau)) ** (-weat.power)
        return w / w.mean() if weat.normalize else w

    chosen, other = (parts.logits_adv, parts.logits) if weat.energy == "adversarial" else (parts.logits, parts.logits_adv)
    expected = closed_form(chosen)
    assert parts.weights.double().tolist() == pytest.approx(expected.tolist(), rel=1e-5)
    # the other energy gives other weights (measured: |E(x) - E(x*)| is about 3 on average), so
    # the branch is seen; and so does tau 1 without normalisation (with it, tau nearly cancels:
    # |E| / tau is 14-22 here, where softplus is linear)
    assert (closed_form(other) - expected).abs().max() > 0.05 * expected.abs().max()
    if not weat.normalize:
        tau_one = replace(weat, tau=1.0)
        assert not torch.allclose(weat_weights(-torch.logsumexp(chosen, 1), tau_one).double(), expected, rtol=1e-2)
    log_p, log_q = torch.log_softmax(parts.logits.double(), 1), torch.log_softmax(parts.logits_adv.double(), 1)
    kl = (log_p.exp() * (log_p - log_q)).sum(1)
    assert loss.item() == pytest.approx(float((expected * (_ce(parts.logits_adv, y) + 6.0 * kl)).mean()), rel=1e-5)


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
        for column in set(EPOCHS.names) - {"alarm_reason"}:  # null without an alarm
            value = row[column]
            assert value is not None, column
            if isinstance(value, float):
                assert math.isfinite(value), (column, value)
    assert con.execute("select count(*) from samples").fetchone()[0] == 2 * (48 + 48)
