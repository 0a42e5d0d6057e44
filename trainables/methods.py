"""Adversarial-training methods: one record per method, one registry.

Every method is ``method_loss(model, x, y, x_adv, *, params) -> (loss, parts)``, given the
inputs `x_adv` its attack crafted (:attr:`Method.craft`; the clean `x` for a method without
one): ``loss`` is the scalar to back-propagate, ``parts`` holds the detached per-batch values
the engine reports (clean logits, the logits of the inputs trained on, per-sample weights).
Crafting is kept out of the loss so that the same x* can be trained on with other weights:
adversarial weight perturbation (trainables.awp) takes its ascent step on the method's own loss
at the x* crafted before it. The training loop never branches on a method's name.

A method is one :class:`Method` in :data:`METHODS`, holding all that is particular to it: its
loss, the attack that crafts its x* (the energy probes use it too, so ``probe_train_dE`` is
measured with the adversary the model trains against), the batch-norm mode and start its
reference code crafts with, the spec keys only it reads, and its label. Adding a method is its
loss, its entry here, its name in :data:`trainables.config.MethodName`, and a test.

torch is imported inside the functions, on a method's first call: the spec checks and the search
space (trainables.config, study/space.py) read this registry in processes that never train.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from trainables.config import DerConfig, SelectMetric, TrialConfig, WeatConfig

if TYPE_CHECKING:
    import torch
    from torch import nn

    from trainables.attacks import BnMode, Start


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
    def from_config(cls, cfg: TrialConfig) -> MethodParams:
        """The method's parameters with `auto` resolved to the method's reference (:attr:`Method.bn`, :attr:`Method.start`)."""
        a = cfg.attack
        assert a.step is not None  # AttackConfig derives it
        method = METHODS[cfg.method]
        return cls(
            eps=a.eps, step_size=a.step, steps=a.steps, norm=a.norm,
            fgsm_step=a.fgsm_step if a.fgsm_step is not None else 1.25 * a.eps,
            beta=cfg.beta, weat=cfg.weat, der=cfg.der,
            bn=method.bn if a.bn == "auto" else a.bn,
            start=method.start if a.start == "auto" else a.start,
        )


class Parts(NamedTuple):
    """Detached per-sample values of one training batch."""

    logits: torch.Tensor  # clean logits (B, K)
    logits_adv: torch.Tensor  # logits of the inputs the method trained on (x* or, for standard, x)
    weights: torch.Tensor  # per-sample loss weights (B,), ones when the method has none


# strings: torch is not imported at run time here (the module docstring says why)
MethodLoss = Callable[..., "tuple[torch.Tensor, Parts]"]
Craft = Callable[["nn.Module", "torch.Tensor", "torch.Tensor", MethodParams], "torch.Tensor"]


def craft_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, p: MethodParams) -> torch.Tensor:
    from trainables.attacks import pgd

    return pgd(model, x, y, eps=p.eps, step_size=p.step_size, steps=p.steps, norm=p.norm, start=p.start, bn=p.bn)  # type: ignore[arg-type]


def craft_fgsm_rs(model: nn.Module, x: torch.Tensor, y: torch.Tensor, p: MethodParams) -> torch.Tensor:
    from trainables.attacks import pgd

    return pgd(model, x, y, eps=p.eps, step_size=p.fgsm_step, steps=1, norm=p.norm, start=p.start, bn=p.bn)  # type: ignore[arg-type]


def craft_trades(model: nn.Module, x: torch.Tensor, y: torch.Tensor, p: MethodParams) -> torch.Tensor:
    from trainables.attacks import trades_kl

    return trades_kl(model, x, y, eps=p.eps, step_size=p.step_size, steps=p.steps, norm=p.norm, start=p.start, bn=p.bn)  # type: ignore[arg-type]


def craft_der(model: nn.Module, x: torch.Tensor, y: torch.Tensor, p: MethodParams) -> torch.Tensor:
    return (craft_fgsm_rs if p.der.single_step else craft_pgd)(model, x, y, p)


def _clean_logits_for_metrics(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Clean logits for the accuracy column of methods whose loss never sees x.

    One forward without gradients in eval mode (so batch-norm statistics are not updated twice
    per batch): about 1/(2 * steps + 2) of the step's cost.
    """
    import torch

    from trainables.attacks import eval_mode

    with torch.no_grad(), eval_mode(model):
        return model(x)


def _ones(x: torch.Tensor) -> torch.Tensor:
    import torch

    return torch.ones(x.shape[0], device=x.device)


def standard(model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor, *, params: MethodParams) -> tuple[torch.Tensor, Parts]:
    """Plain cross-entropy on clean inputs: the non-robust baseline (`x_adv` is `x`)."""
    import torch.nn.functional as F

    logits = model(x)
    loss = F.cross_entropy(logits, y)
    return loss, Parts(logits.detach(), logits.detach(), _ones(x))


def sat(model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor, *, params: MethodParams) -> tuple[torch.Tensor, Parts]:
    """PGD-AT (Madry et al. 2018, arXiv 1706.06083): CE(f(x*), y) with x* from untargeted PGD."""
    import torch.nn.functional as F

    logits_adv = model(x_adv)
    loss = F.cross_entropy(logits_adv, y)
    return loss, Parts(_clean_logits_for_metrics(model, x), logits_adv.detach(), _ones(x))


def fgsm_rs(model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor, *, params: MethodParams) -> tuple[torch.Tensor, Parts]:
    """Single-step AT with FGSM and a random start (Wong et al. 2020, arXiv 2001.03994): the CO-prone case."""
    import torch.nn.functional as F

    logits_adv = model(x_adv)
    loss = F.cross_entropy(logits_adv, y)
    return loss, Parts(_clean_logits_for_metrics(model, x), logits_adv.detach(), _ones(x))


def trades(model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor, *, params: MethodParams) -> tuple[torch.Tensor, Parts]:
    """TRADES (Zhang et al. 2019, arXiv 1901.08573): CE(f(x), y) + beta * KL(p(.|x) || p(.|x*))."""
    import torch.nn.functional as F

    from trainables.energy import kl_per_sample

    logits, logits_adv = model(x), model(x_adv)
    per_sample = F.cross_entropy(logits, y, reduction="none") + params.beta * kl_per_sample(logits, logits_adv)
    return per_sample.mean(), Parts(logits.detach(), logits_adv.detach(), _ones(x))


def weat_weights(energy: torch.Tensor, w: WeatConfig) -> torch.Tensor:
    """w = softplus(|E| / tau) ** (-power), optionally divided by its batch mean; E detached.

    ``tau=1, power=1, normalize=False`` is the paper's 1 / log(1 + exp(|E(x)|));
    ``power=0`` gives ones (plain TRADES).
    """
    import torch.nn.functional as F

    weights = F.softplus(energy.detach().abs() / w.tau).pow(-w.power)
    return weights / weights.mean() if w.normalize else weights


def weat(model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor, *, params: MethodParams) -> tuple[torch.Tensor, Parts]:
    """WEAT (Mirza et al. 2024, arXiv 2407.06315): energy-weighted TRADES.

    sum_i w_i [CE(f(x*_i) or f(x_i), y_i) + beta * KL(p(.|x_i) || p(.|x*_i))] / B, with
    w from :func:`weat_weights` of the natural or adversarial marginal energy.
    """
    import torch.nn.functional as F

    from trainables.energy import kl_per_sample, marginal_energy

    w = params.weat
    logits, logits_adv = model(x), model(x_adv)
    weights = weat_weights(marginal_energy(logits if w.energy == "natural" else logits_adv), w)
    ce = F.cross_entropy(logits_adv if w.variant == "adv" else logits, y, reduction="none")
    per_sample = weights * (ce + params.beta * kl_per_sample(logits, logits_adv))
    return per_sample.mean(), Parts(logits.detach(), logits_adv.detach(), weights)


def delta_energy_penalty(
    logits: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor, gamma: float
) -> torch.Tensor:
    """DER's per-sample max(||[dE(x), dE(x,y)]||_2 - gamma, 0) (arXiv 2505.22486)."""
    import torch

    from trainables.energy import joint_energy, marginal_energy

    d_marginal = marginal_energy(logits) - marginal_energy(logits_adv)
    d_joint = joint_energy(logits, y) - joint_energy(logits_adv, y)
    return (torch.stack([d_marginal, d_joint], dim=1).norm(dim=1) - gamma).clamp_min(0.0)


def der(model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor, *, params: MethodParams) -> tuple[torch.Tensor, Parts]:
    """Delta Energy Regularizer (arXiv 2505.22486): CE(f(x*), y) + beta * gate * max(||[dE, dE_y]|| - gamma, 0).

    Multi-step (PGD) x*: gate = 1. Single-step (``der.single_step``, FGSM-RS x*): gate = 1 only
    for abnormal adversarial examples, CE(x*, y) < CE(x, y). The reported weights are the gate.
    """
    import torch.nn.functional as F

    logits, logits_adv = model(x), model(x_adv)
    ce_adv = F.cross_entropy(logits_adv, y, reduction="none")
    if params.der.single_step:
        gate = (ce_adv < F.cross_entropy(logits, y, reduction="none")).float().detach()
    else:
        gate = _ones(x)
    penalty = delta_energy_penalty(logits, logits_adv, y, params.der.gamma)
    loss = (ce_adv + params.beta * gate * penalty).mean()
    return loss, Parts(logits.detach(), logits_adv.detach(), gate)


def mart(model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor, *, params: MethodParams) -> tuple[torch.Tensor, Parts]:
    """MART (Wang et al. 2020, ICLR): boosted CE on x* + beta * KL(p(x)||p(x*)) * (1 - p_y(x))."""
    import torch
    import torch.nn.functional as F

    from trainables.energy import kl_per_sample

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


@dataclass(frozen=True, kw_only=True)
class Method:
    """One AT method: everything about it that is not shared with the others."""

    label: str  # its name in prose, tables and figures
    loss: MethodLoss
    craft: Craft  # the attack whose x* the method trains on; the probes use it too
    trains_on_attack: bool = True  # False: training crafts nothing and the loss gets x as x_adv (standard)
    bn: BnMode  # batch-norm mode its reference code crafts the training x* in (`attack.bn: auto`)
    start: Start  # where its reference code starts the training attack (`attack.start: auto`)
    # the spec keys only this method reads, a trailing dot for a whole block ("weat."): a study's
    # search suggests them in this method's trials only (study/space.py); a key that no method
    # names here is read by every method
    spec_keys: tuple[str, ...] = ()
    # the validation metric that picks its best epoch under `select: auto`: robust accuracy for an
    # AT method; clean accuracy for a model trained without an adversary, whose robust accuracy is
    # highest before it has learnt anything (its epoch 0)
    select: SelectMetric = "val_robust_acc"
    # epochs before adversarial weight perturbation starts under `awp.warmup: null`: the AWP
    # reference's, 10 for TRADES (and WEAT, built on it), 0 for PGD-AT and the rest
    awp_warmup: int = 0

    def inputs(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, params: MethodParams) -> torch.Tensor:
        """The x_adv its loss trains on: its attack's x*, or x for a method that crafts none."""
        return self.craft(model, x, y, params) if self.trains_on_attack else x

    def batch_loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, params: MethodParams) -> tuple[torch.Tensor, Parts]:
        """Craft and loss in one call: the method's training loss on a batch, as the engine
        computes it without weight perturbation."""
        return self.loss(model, x, y, self.inputs(model, x, y, params), params=params)

    @property
    def summary(self) -> str:
        """One line: what the method optimises, and its paper (its loss's docstring opens with it)."""
        return (self.loss.__doc__ or "").strip().splitlines()[0]


# Batch-norm modes and starts follow each method's reference code: Rice et al. (PGD-AT) and Wong
# et al. (FGSM-RS) call model.train() around the attack, so batch statistics are used and running
# statistics updated by every attack step, and start uniformly in the eps-ball (as Madry et al.);
# TRADES, MART and the WEAT code call model.eval() and start at x + 0.001 * N(0, I). The order is
# trainables.config.MethodName's (tests/test_methods.py checks both name the same methods).
METHODS: dict[str, Method] = {
    # trains on clean inputs and crafts nothing in training; its probes measure it against PGD,
    # the usual threat
    "standard": Method(label="standard", loss=standard, craft=craft_pgd, trains_on_attack=False, bn="eval", start="uniform",
                       select="val_clean_acc"),
    "sat": Method(label="SAT", loss=sat, craft=craft_pgd, bn="train", start="uniform"),
    "trades": Method(label="TRADES", loss=trades, craft=craft_trades, bn="eval", start="gaussian", spec_keys=("beta",), awp_warmup=10),
    "weat": Method(label="WEAT", loss=weat, craft=craft_trades, bn="eval", start="gaussian", spec_keys=("beta", "weat."), awp_warmup=10),
    # DER builds on PGD-AT or FGSM-RS and crafts as they do (its code was not available to us)
    "der": Method(label="DER", loss=der, craft=craft_der, bn="train", start="uniform", spec_keys=("beta", "der.")),
    "fgsm_rs": Method(label="FGSM-RS", loss=fgsm_rs, craft=craft_fgsm_rs, bn="train", start="uniform"),
    "mart": Method(label="MART", loss=mart, craft=craft_pgd, bn="eval", start="gaussian", spec_keys=("beta",)),
}


def awp_warmup(cfg: TrialConfig) -> int:
    """Epochs before adversarial weight perturbation starts: `awp.warmup`, or the method's reference."""
    return METHODS[cfg.method].awp_warmup if cfg.awp.warmup is None else cfg.awp.warmup


def selection_metric(cfg: TrialConfig) -> SelectMetric:
    """The validation metric that picks the trial's best epoch: `select`, or its method's for `auto`."""
    return METHODS[cfg.method].select if cfg.select == "auto" else cfg.select
