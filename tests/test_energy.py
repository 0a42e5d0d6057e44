"""Energy identities of docs/science.md, section 1 and finding 3, and the WEAT weighting family."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from trainables.config import WeatConfig
from trainables.energy import joint_energy, kl_per_sample, marginal_energy
from trainables.methods import weat_weights


def _logits(seed: int, b: int = 32, k: int = 10, scale: float = 5.0) -> torch.Tensor:
    return torch.randn(b, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def test_cross_entropy_is_joint_minus_marginal_energy() -> None:
    # CE(x, y) = E(x, y) - E(x), for every sample
    logits = _logits(0)
    y = torch.randint(0, 10, (32,), generator=torch.Generator().manual_seed(1))
    ce = F.cross_entropy(logits, y, reduction="none")
    assert torch.allclose(ce, joint_energy(logits, y) - marginal_energy(logits), atol=1e-10)
    assert (ce >= 0).all()


def test_ce_shift_equals_difference_of_delta_energies() -> None:
    # CE(x*, y) - CE(x, y) = dE(x) - dE(x, y), dE(x) = E(x) - E(x*), dE(x,y) = E(x,y) - E(x*,y)
    nat, adv = _logits(2), _logits(3)
    y = torch.randint(0, 10, (32,), generator=torch.Generator().manual_seed(4))
    lhs = F.cross_entropy(adv, y, reduction="none") - F.cross_entropy(nat, y, reduction="none")
    d_marginal = marginal_energy(nat) - marginal_energy(adv)
    d_joint = joint_energy(nat, y) - joint_energy(adv, y)
    assert torch.allclose(lhs, d_marginal - d_joint, atol=1e-10)


def test_trades_kl_equals_its_energy_decomposition() -> None:
    # KL(p(.|x) || p(.|x*)) = E_{k~p(.|x)}[E(x*,k) - E(x,k)] + (E(x) - E(x*))   (docs/science.md, finding 3)
    nat, adv = _logits(5), _logits(6)
    p = nat.softmax(1)
    expected_joint_shift = (p * ((-adv) - (-nat))).sum(1)  # E(x,k) = -f(x)[k]
    decomposition = expected_joint_shift + (marginal_energy(nat) - marginal_energy(adv))
    assert torch.allclose(kl_per_sample(nat, adv), decomposition, atol=1e-10)
    # and it is the KL torch computes
    torch_kl = F.kl_div(adv.log_softmax(1), nat.log_softmax(1), reduction="none", log_target=True).sum(1)
    assert torch.allclose(kl_per_sample(nat, adv), torch_kl, atol=1e-10)


def test_weat_power_zero_gives_unit_weights() -> None:
    # power 0 is plain TRADES: every weight is exactly 1
    energy = marginal_energy(_logits(7))
    assert torch.equal(weat_weights(energy, WeatConfig(power=0.0)), torch.ones_like(energy))


def test_weat_default_is_the_papers_weight() -> None:
    # tau 1, power 1, no normalisation: w = 1 / log(1 + exp(|E(x)|))
    energy = marginal_energy(_logits(8))
    expected = 1.0 / torch.log1p(torch.exp(energy.abs()))
    assert torch.allclose(weat_weights(energy, WeatConfig()), expected, rtol=1e-12)
    # the largest possible weight is 1/ln 2, at E = 0
    assert math.isclose(float(weat_weights(torch.zeros(1, dtype=torch.float64), WeatConfig())), 1 / math.log(2), rel_tol=1e-12)


def test_weat_normalised_weights_have_mean_one() -> None:
    energy = marginal_energy(_logits(9))
    w = weat_weights(energy, WeatConfig(normalize=True, tau=2.0, power=1.5))
    assert math.isclose(float(w.mean()), 1.0, rel_tol=1e-12)


def test_weat_weights_do_not_carry_gradients() -> None:
    # the weight is a function of a detached energy: no gradient flows through it
    logits = _logits(10).requires_grad_(True)
    assert not weat_weights(marginal_energy(logits), WeatConfig()).requires_grad
