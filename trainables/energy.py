"""Energies of a classifier read as an energy-based model (docs/science.md section 1).

Temperature 1, raw logits. Low energy = "in distribution" for the model.
"""

from __future__ import annotations

import torch


def marginal_energy(logits: torch.Tensor) -> torch.Tensor:
    """E(x) = -logsumexp_k f(x)[k], one value per row of `logits` (B, K) -> (B,)."""
    return -torch.logsumexp(logits, dim=1)


def joint_energy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """E(x, y) = -f(x)[y], (B, K), (B,) -> (B,)."""
    return -logits.gather(1, y[:, None]).squeeze(1)


def kl_per_sample(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row, p = softmax(logits_p), q = softmax(logits_q). (B, K) -> (B,)."""
    log_p = torch.log_softmax(logits_p, dim=1)
    log_q = torch.log_softmax(logits_q, dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=1)
