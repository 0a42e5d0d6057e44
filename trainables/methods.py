"""Adversarial-training methods, one signature, one registry.

Every method is ``method_loss(model, x, y, *, params) -> (loss, parts)`` (TRADES'
``trades_loss(..., beta=...)``): ``loss`` is the scalar to back-propagate, ``parts`` holds the
detached per-batch values the engine reports (clean logits, the logits of the inputs trained
on, per-sample weights). The training loop never branches on a method's name.

Each method also names the attack that crafts its own x* (:attr:`Method.craft`): the energy
probes use it, so ``probe_train_dE`` is measured with the adversary the model trains against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from trainables.attacks import eval_mode, pgd, trades_kl
from trainables.config import REFERENCE_BN, REFERENCE_START, DerConfig, TrialConfig, WeatConfig
from trainables.energy import joint_energy, kl_per_sample, marginal_energy


@dataclass(frozen=True)
class MethodParams:
    """Everything a method may use; built once per trial from the :class:`TrialConfig`."""

    eps: float  # threat radius, input scale [0, 1]
    step_size: float  # PGD step, input scale
    steps: int  # PGD steps
    norm: str  # "linf" | "l2"
    fgsm_step: float  # FGSM-RS step, input scale
    beta: float  # KL weight (trades, weat, mart) or penalty weight (der)
    weat: WeatConfig
    der: DerConfig
    bn: str = "eval"  # batch-norm mode while crafting: "train" | "eval" (attack.bn resolved)
    start: str = "uniform"  # where the attack starts: "uniform" | "gaussian" (attack.start resolved)

    @classmethod
    def from_config(cls, cfg: TrialConfig) -> "MethodParams":
        """The method's parameters with `auto` resolved to the method's reference (config.REFERENCE_BN, REFERENCE_START)."""
        a = cfg.attack
        assert a.step is not None  # AttackConfig derives it
        return cls(
            eps=a.eps, step_size=a.step, steps=a.steps, norm=a.norm,
            fgsm_step=a.fgsm_step if a.fgsm_step is not None else 1.25 * a.eps,
            beta=cfg.beta, weat=cfg.weat, der=cfg.der,
            bn=REFERENCE_BN[cfg.method] if a.bn == "auto" else a.bn,
            start=REFERENCE_START[cfg.method] if a.start == "auto" else a.start,
        )


class Parts(NamedTuple):
    """Detached per-sample values of one training batch."""

    logits: torch.Tensor  # clean logits (B, K)
    logits_adv: torch.Tensor  # logits of the inputs the method trained on (x* or, for standard, x)
    weights: torch.Tensor  # per-sample loss weights (B,), ones when the method has none


MethodLoss = Callable[..., tuple[torch.Tensor, Parts]]
Craft = Callable[[nn.Module, torch.Tensor, torch.Tensor, MethodParams], torch.Tensor]


def craft_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, p: MethodParams) -> torch.Tensor:
    return pgd(model, x, y, eps=p.eps, step_size=p.step_size, steps=p.steps, norm=p.norm, start=p.start, bn=p.bn)  # type: ignore[arg-type]


def craft_fgsm_rs(model: nn.Module, x: torch.Tensor, y: torch.Tensor, p: MethodParams) -> torch.Tensor:
    return pgd(model, x, y, eps=p.eps, step_size=p.fgsm_step, steps=1, norm=p.norm, start=p.start, bn=p.bn)  # type: ignore[arg-type]


def craft_trades(model: nn.Module, x: torch.Tensor, y: torch.Tensor, p: MethodParams) -> torch.Tensor:
    return trades_kl(model, x, y, eps=p.eps, step_size=p.step_size, steps=p.steps, norm=p.norm, start=p.start, bn=p.bn)  # type: ignore[arg-type]


def craft_der(model: nn.Module, x: torch.Tensor, y: torch.Tensor, p: MethodParams) -> torch.Tensor:
    return (craft_fgsm_rs if p.der.single_step else craft_pgd)(model, x, y, p)


def _clean_logits_for_metrics(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Clean logits for the accuracy column of methods whose loss never sees x.

    One forward without gradients in eval mode (so batch-norm statistics are not updated twice
    per batch): about 1/(2 * steps + 2) of the step's cost.
    """
    with torch.no_grad(), eval_mode(model):
        return model(x)


def _ones(x: torch.Tensor) -> torch.Tensor:
    return torch.ones(x.shape[0], device=x.device)


def standard(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, params: MethodParams) -> tuple[torch.Tensor, Parts]:
    """Plain cross-entropy on clean inputs: the non-robust baseline."""
    logits = model(x)
    loss = F.cross_entropy(logits, y)
    return loss, Parts(logits.detach(), logits.detach(), _ones(x))


def sat(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, params: MethodParams) -> tuple[torch.Tensor, Parts]:
    """PGD-AT (Madry et al. 2018): CE(f(x*), y) with x* from untargeted PGD."""
    x_adv = craft_pgd(model, x, y, params)
    logits_adv = model(x_adv)
    loss = F.cross_entropy(logits_adv, y)
    return loss, Parts(_clean_logits_for_metrics(model, x), logits_adv.detach(), _ones(x))


def fgsm_rs(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, params: MethodParams) -> tuple[torch.Tensor, Parts]:
    """Single-step AT with FGSM and a random start (Wong et al. 2020): the CO-prone case."""
    x_adv = craft_fgsm_rs(model, x, y, params)
    logits_adv = model(x_adv)
    loss = F.cross_entropy(logits_adv, y)
    return loss, Parts(_clean_logits_for_metrics(model, x), logits_adv.detach(), _ones(x))


def trades(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, params: MethodParams) -> tuple[torch.Tensor, Parts]:
    """TRADES (Zhang et al. 2019): CE(f(x), y) + beta * KL(p(.|x) || p(.|x*))."""
    x_adv = craft_trades(model, x, y, params)
    logits, logits_adv = model(x), model(x_adv)
    per_sample = F.cross_entropy(logits, y, reduction="none") + params.beta * kl_per_sample(logits, logits_adv)
    return per_sample.mean(), Parts(logits.detach(), logits_adv.detach(), _ones(x))


def weat_weights(energy: torch.Tensor, w: WeatConfig) -> torch.Tensor:
    """w = softplus(|E| / tau) ** (-power), optionally divided by its batch mean; E detached.

    ``tau=1, power=1, normalize=False`` is the paper's 1 / log(1 + exp(|E(x)|));
    ``power=0`` gives ones (plain TRADES).
    """
    weights = F.softplus(energy.detach().abs() / w.tau).pow(-w.power)
    return weights / weights.mean() if w.normalize else weights


def weat(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, params: MethodParams) -> tuple[torch.Tensor, Parts]:
    """WEAT (Mirza et al. 2024, arXiv 2407.06315): energy-weighted TRADES.

    sum_i w_i [CE(f(x*_i) or f(x_i), y_i) + beta * KL(p(.|x_i) || p(.|x*_i))] / B, with
    w from :func:`weat_weights` of the natural or adversarial marginal energy.
    """
    w = params.weat
    x_adv = craft_trades(model, x, y, params)
    logits, logits_adv = model(x), model(x_adv)
    weights = weat_weights(marginal_energy(logits if w.energy == "natural" else logits_adv), w)
    ce = F.cross_entropy(logits_adv if w.variant == "adv" else logits, y, reduction="none")
    per_sample = weights * (ce + params.beta * kl_per_sample(logits, logits_adv))
    return per_sample.mean(), Parts(logits.detach(), logits_adv.detach(), weights)


def delta_energy_penalty(
    logits: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor, gamma: float
) -> torch.Tensor:
    """DER's per-sample max(||[dE(x), dE(x,y)]||_2 - gamma, 0) (arXiv 2505.22486)."""
    d_marginal = marginal_energy(logits) - marginal_energy(logits_adv)
    d_joint = joint_energy(logits, y) - joint_energy(logits_adv, y)
    return (torch.stack([d_marginal, d_joint], dim=1).norm(dim=1) - gamma).clamp_min(0.0)


def der(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, params: MethodParams) -> tuple[torch.Tensor, Parts]:
    """Delta Energy Regularizer: CE(f(x*), y) + beta * gate * max(||[dE, dE_y]|| - gamma, 0).

    Multi-step (PGD) x*: gate = 1. Single-step (``der.single_step``, FGSM-RS x*): gate = 1 only
    for abnormal adversarial examples, CE(x*, y) < CE(x, y). The reported weights are the gate.
    """
    x_adv = craft_der(model, x, y, params)
    logits, logits_adv = model(x), model(x_adv)
    ce_adv = F.cross_entropy(logits_adv, y, reduction="none")
    if params.der.single_step:
        gate = (ce_adv < F.cross_entropy(logits, y, reduction="none")).float().detach()
    else:
        gate = _ones(x)
    penalty = delta_energy_penalty(logits, logits_adv, y, params.der.gamma)
    loss = (ce_adv + params.beta * gate * penalty).mean()
    return loss, Parts(logits.detach(), logits_adv.detach(), gate)


def mart(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, params: MethodParams) -> tuple[torch.Tensor, Parts]:
    """MART (Wang et al. 2020, ICLR): boosted CE on x* + beta * KL(p(x)||p(x*)) * (1 - p_y(x))."""
    x_adv = craft_pgd(model, x, y, params)
    logits, logits_adv = model(x), model(x_adv)
    adv_probs = logits_adv.softmax(dim=1)
    top2 = adv_probs.topk(2, dim=1).indices
    runner_up = torch.where(top2[:, 0] == y, top2[:, 1], top2[:, 0])
    boosted = F.cross_entropy(logits_adv, y, reduction="none") + F.nll_loss(
        torch.log(1.0001 - adv_probs + 1e-12), runner_up, reduction="none"
    )
    true_prob = logits.softmax(dim=1).gather(1, y[:, None]).squeeze(1)
    robust = kl_per_sample(logits, logits_adv) * (1.0000001 - true_prob)
    loss = (boosted + params.beta * robust).mean()
    return loss, Parts(logits.detach(), logits_adv.detach(), _ones(x))


@dataclass(frozen=True)
class Method:
    loss: MethodLoss
    craft: Craft  # the attack whose x* the method trains on; the probes use it too


METHODS: dict[str, Method] = {
    # standard trains on clean inputs; its probes measure it against PGD, the usual threat.
    "standard": Method(standard, craft_pgd),
    "sat": Method(sat, craft_pgd),
    "trades": Method(trades, craft_trades),
    "weat": Method(weat, craft_trades),
    "der": Method(der, craft_der),
    "fgsm_rs": Method(fgsm_rs, craft_fgsm_rs),
    "mart": Method(mart, craft_pgd),
}
