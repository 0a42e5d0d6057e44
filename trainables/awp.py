"""Adversarial Weight Perturbation (Wu, Xia and Wang, NeurIPS 2020; their code: csdongxian/AWP).

Per training batch, after the attack has crafted x* with the model's own weights:

1. a proxy, a copy of the model (weights and batch-norm buffers), computes the gradient of the
   method's loss at that x* (in train mode: its batch-norm statistics move, the model's do not);
2. per layer, the gradient is rescaled to the norm of that layer's weight, v = ||w|| / ||g|| * g,
   for every weight with two or more dimensions (convolutions and linear layers; batch-norm
   scales and biases are not perturbed);
3. the model's weights move to w + gamma * v; the method's loss at the same x* is back-propagated
   there and the optimiser steps; then gamma * v is taken off again.

Where energyat differs from the reference, and why: the reference gets g as the difference of the
proxy's weights across one SGD step up the loss (lr 0.01 for PGD-AT, the training lr for TRADES),
whose lr then cancels in step 2. In float32 that difference of two nearly equal numbers loses
digits: at lr 0.01 on the small CNN of tests/test_awp.py some entries are off by more than 1% of
their value against the gradient itself (the test checks it; the direction agrees to a cosine
above 0.999). energyat takes the proxy's gradient directly:
the direction the reference means, without the rounding. The ascent is on each method's own
training loss: the reference defines it for PGD-AT, CE(f(x*), y), and TRADES, CE(f(x), y) +
beta KL(p(x) || p(x*)) with gradients through both; for WEAT, MART, DER, FGSM-RS and standard
energyat applies the same rule to their losses (docs/remedies.md).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from trainables.methods import MethodLoss, MethodParams

EPS = 1e-20  # the reference's guard against a zero gradient


def perturbed_weights(model: nn.Module) -> list[str]:
    """The parameters AWP moves: weights of two or more dimensions (convolution and linear)."""
    return [name for name, p in model.named_parameters() if p.dim() > 1 and "weight" in name]


class WeightPerturbation:
    """One trial's AWP: the proxy, built once; :meth:`direction` and :meth:`shift` per batch."""

    def __init__(self, model: nn.Module, *, gamma: float) -> None:
        self.model = model
        self.gamma = gamma
        self.proxy = copy.deepcopy(model)
        self.names = perturbed_weights(model)

    def direction(self, loss: MethodLoss, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor, params: MethodParams) -> dict[str, torch.Tensor]:
        """v per perturbed weight: the gradient of `loss` at `x_adv` (the proxy's, at the model's
        weights), rescaled per layer to the norm of the weight."""
        self.proxy.load_state_dict(self.model.state_dict())
        self.proxy.train()
        value, _ = loss(self.proxy, x, y, x_adv, params=params)
        proxy = dict(self.proxy.named_parameters())
        grads = torch.autograd.grad(value, [proxy[name] for name in self.names])
        with torch.no_grad():
            return {name: proxy[name].norm() / (g.norm() + EPS) * g for name, g in zip(self.names, grads, strict=True)}

    def shift(self, v: dict[str, torch.Tensor], sign: float) -> None:
        """The model's weights moved by sign * gamma * v (+1 perturbs, -1 restores)."""
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                if name in v:
                    p.add_(v[name], alpha=sign * self.gamma)
