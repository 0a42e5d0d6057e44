"""Robust classifiers as generators (docs/science.md section 5): SGLD with momentum on the joint energy.

    v_{n+1} = zeta * v_n - (eta / 2) * grad_x E(x_n, y),   v_0 = 0
    x_{n+1} = clip_[0,1]( x_n + v_{n+1} + sigma * N(0, I) )

with E(x, y) = -f(x)[y]. Where the chain starts matters as much as the model: ``pca`` draws
around the class mean along the principal directions of the class's training images (keeping a
fraction ``pca_variance`` of their variance, coefficients ``singular value x pca_sigma x N(0, 1)``),
``gaussian`` from the class's mean and full covariance, ``noise`` uniformly from [0, 1].

Gradients are taken with respect to the images only, as in the attacks. Everything random comes
from one ``torch.Generator``, so a seed gives the same samples.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import nn

from trainables.attacks import eval_mode
from trainables.config import SgldConfig
from trainables.energy import joint_energy

Init = Literal["pca", "gaussian", "noise"]


def _pca_start(x: torch.Tensor, n: int, cfg: SgldConfig, gen: torch.Generator) -> torch.Tensor:
    mean = x.mean(0)
    _u, s, vt = torch.linalg.svd(x - mean, full_matrices=False)
    share = torch.cumsum(s**2, 0) / (s**2).sum()
    k = int((share < cfg.pca_variance).sum()) + 1  # fewest directions reaching the fraction
    coef = torch.randn(n, k, generator=gen, dtype=x.dtype) * cfg.pca_sigma * s[:k]
    return mean + coef @ vt[:k]


def _gaussian_start(x: torch.Tensor, n: int, cfg: SgldConfig, gen: torch.Generator) -> torch.Tensor:
    mean = x.mean(0)
    centred = x - mean
    cov = centred.T @ centred / len(x) + 1e-4 * torch.eye(x.shape[1], dtype=x.dtype)  # jitter: digits have constant pixels
    chol = torch.linalg.cholesky(cov)
    return mean + torch.randn(n, x.shape[1], generator=gen, dtype=x.dtype) @ chol.T


def _noise_start(x: torch.Tensor, n: int, cfg: SgldConfig, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(n, x.shape[1], generator=gen, dtype=x.dtype)


STARTS: dict[str, Callable[[torch.Tensor, int, SgldConfig, torch.Generator], torch.Tensor]] = {
    "pca": _pca_start,
    "gaussian": _gaussian_start,
    "noise": _noise_start,
}


def class_starts(
    images: torch.Tensor, labels: torch.Tensor, *, classes: Sequence[int], n: int, init: Init, cfg: SgldConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, y): `n` starting images per class in `classes`, class by class, from the training
    `images` (N, C, H, W) float in [0, 1] and their `labels`. Computed in float64 on the CPU."""
    shape = images.shape[1:]
    starts, targets = [], []
    for c in classes:
        own = images[labels == c].reshape(int((labels == c).sum()), -1).double().cpu()
        starts.append(STARTS[init](own, n, cfg, generator).clamp(0.0, 1.0).float().reshape(n, *shape))
        targets.append(torch.full((n,), int(c), dtype=torch.int64))
    return torch.cat(starts), torch.cat(targets)


def sgld(model: nn.Module, x0: torch.Tensor, y: torch.Tensor, *, cfg: SgldConfig, generator: torch.Generator) -> torch.Tensor:
    """Run SGLD with momentum from `x0` towards low E(x, y); returns the final images in [0, 1]."""
    x = x0.detach().clone()
    velocity = torch.zeros_like(x)
    with eval_mode(model), torch.enable_grad():
        for _ in range(cfg.steps):
            x.requires_grad_(True)
            energy = joint_energy(model(x), y).sum()  # per-sample gradients: the sum separates
            (grad,) = torch.autograd.grad(energy, x)
            velocity = cfg.momentum * velocity - (cfg.eta / 2) * grad
            noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
            x = (x.detach() + velocity + cfg.noise * noise).clamp(0.0, 1.0)
    return x.detach()
