"""Adversarial attacks, one signature, one registry.

Every attack is ``attack(model, x, y, *, eps, step_size, steps, norm) -> x_adv`` (torchattacks'
``forward(images, labels)`` with Madry's keyword-only threat model). Shared guarantees, tested
over the whole registry in ``tests/test_attacks.py``:

- ``x_adv`` lies in the eps-ball around ``x`` (L-inf or L2) and in [0, 1];
- gradients are taken with respect to the input only (``torch.autograd.grad``), so no weight
  gradient is computed or accumulated: equivalent results to ``loss.backward()``, but faster,
  and the optimizer's ``.grad`` buffers are never touched;
- batch norm runs in the mode ``bn`` asks for while crafting (``eval`` by default; ``train`` is
  what Rice et al.'s PGD-AT and Wong et al.'s FGSM-RS do: batch statistics, and running
  statistics updated by every step), and the model's mode is restored afterwards;
- ``start`` says where the ascent begins: ``uniform`` in the ball (Madry et al.) or
  ``gaussian``, x + 0.001 * N(0, I) (TRADES, MART).

Shapes: ``x`` is (B, C, H, W) float in [0, 1], ``y`` is (B,) int64. For ``pgd_targeted`` the
``y`` argument holds the *target* classes (see :func:`random_targets`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from trainables.energy import kl_per_sample
from trainables.precision import fp32

Norm = Literal["linf", "l2"]
Start = Literal["uniform", "gaussian"]
BnMode = Literal["eval", "train"]
Attack = Callable[..., torch.Tensor]

GAUSSIAN_START_STD = 0.001  # TRADES' and MART's start: x + 0.001 * N(0, I)


@contextmanager
def bn_mode(model: nn.Module, mode: BnMode) -> Iterator[None]:
    """The model in `mode` (``eval`` or ``train``) inside; the caller's mode comes back in one place."""
    was_training = model.training
    model.train(mode == "train")
    try:
        yield
    finally:
        model.train(was_training)


def eval_mode(model: nn.Module) -> AbstractContextManager[None]:
    """Batch norm in eval mode inside (probes, evaluation, sampling)."""
    return bn_mode(model, "eval")


@contextmanager
def input_gradients_only(model: nn.Module) -> Iterator[None]:
    """The model's parameters do not require gradients inside; they do again on exit.

    Eager autograd already prunes weight gradients from ``autograd.grad(loss, x)``, but a model
    under ``torch.compile`` runs a backward graph that AOTAutograd traced for every input that
    requires a gradient, weights included: each attack step would compute and throw away a
    conv backward per layer. With the parameters frozen the traced backward computes the
    input's gradient alone (tests/test_compile.py reads the backward graph), and eager autograd
    keeps fewer activations alive.
    """
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)


def _l2(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (t.dim() - 1)))


def _project(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: Norm) -> torch.Tensor:
    delta = x_adv - x
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        delta = delta * (eps / _l2(delta)).clamp(max=1.0)
    return (x + delta).clamp(0.0, 1.0)


def _random_start(x: torch.Tensor, eps: float, norm: Norm, start: Start) -> torch.Tensor:
    if start == "gaussian":
        return _project(x + GAUSSIAN_START_STD * torch.randn_like(x), x, eps, norm)
    if norm == "linf":
        delta = torch.empty_like(x).uniform_(-eps, eps)
    else:  # a uniform direction with a uniform radius in [0, eps]
        direction = torch.randn_like(x)
        radius = torch.rand(x.shape[0], *([1] * (x.dim() - 1)), device=x.device, dtype=x.dtype)
        delta = direction / _l2(direction) * radius * eps
    return (x + delta).clamp(0.0, 1.0)


def _ascend(
    model: nn.Module,
    x: torch.Tensor,
    x_adv: torch.Tensor,
    objective: Callable[[torch.Tensor], torch.Tensor],
    *,
    eps: float,
    step_size: float,
    steps: int,
    norm: Norm,
    bn: BnMode,
) -> torch.Tensor:
    """`steps` of projected steepest ascent on objective(model(x_adv)), input gradients only."""
    with bn_mode(model, bn), input_gradients_only(model):
        for _ in range(steps):
            x_adv = x_adv.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(objective(model(x_adv)), x_adv)
            if norm == "linf":
                x_adv = x_adv.detach() + step_size * grad.sign()
            else:
                x_adv = x_adv.detach() + step_size * grad / _l2(grad)
            x_adv = _project(x_adv, x, eps, norm)
    return x_adv.detach()


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    norm: Norm = "linf",
    start: Start = "uniform",
    bn: BnMode = "eval",
) -> torch.Tensor:
    """Untargeted PGD on cross-entropy with a random start (Madry et al. 2018, arXiv 1706.06083).

    With ``steps=1`` and ``step_size=1.25 * eps`` this is FGSM with random start ("Fast is better
    than free", Wong et al. 2020, arXiv 2001.03994), registered as ``fgsm_rs``. With
    ``start="gaussian"`` it is MART's attack (Wang et al. 2020).

    Example::

        x_adv = pgd(model, x, y, eps=8 / 255, step_size=2 / 255, steps=10)
    """
    x = x.detach()
    return _ascend(
        model, x, _random_start(x, eps, norm, start),
        lambda logits: F.cross_entropy(logits, y, reduction="sum"),
        eps=eps, step_size=step_size, steps=steps, norm=norm, bn=bn,
    )


def pgd_targeted(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    norm: Norm = "linf",
    start: Start = "uniform",
    bn: BnMode = "eval",
) -> torch.Tensor:
    """Targeted PGD with a random start: descends cross-entropy towards the targets ``y``.

    Pass targets from :func:`random_targets` for the paper's "random wrong class" attack.
    """
    x = x.detach()
    return _ascend(
        model, x, _random_start(x, eps, norm, start),
        lambda logits: -F.cross_entropy(logits, y, reduction="sum"),
        eps=eps, step_size=step_size, steps=steps, norm=norm, bn=bn,
    )


def trades_kl(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    norm: Norm = "linf",
    start: Start = "gaussian",
    bn: BnMode = "eval",
) -> torch.Tensor:
    """TRADES' attack: maximise KL(p(.|x) || p(.|x*)) (Zhang et al. 2019, arXiv 1901.08573).

    Starts at x + 0.001 * N(0, I) as the TRADES code does (``start="gaussian"``); ``y`` is unused
    (the attack needs no labels). The clean distribution p(.|x) is computed once, not inside
    every step: equivalent results to the released code, but one forward pass instead of ``steps``.

    Under bf16 autocast the first step runs in fp32: at the 0.001 start, p(.|x*) differs from
    p(.|x) by less than bf16's resolution (logits near 10 are rounded to 0.06), so that gradient
    is rounding noise. Measured on digits (tests/test_fast_path.py's model): all-bf16 reaches attack
    success 0.44-0.50 against fp32's 0.72-0.77; with the first step in fp32, 0.70-0.76.
    """
    x = x.detach()
    x_adv = _random_start(x, eps, norm, start)
    if steps and torch.is_autocast_enabled(x.device.type):
        with fp32():  # autocast off, and TF32 off on CUDA: a TF32 step would round the same way
            x_adv = _kl_ascent(model, x, x_adv, eps=eps, step_size=step_size, steps=1, norm=norm, bn=bn)
        steps -= 1
    return _kl_ascent(model, x, x_adv, eps=eps, step_size=step_size, steps=steps, norm=norm, bn=bn)


def _kl_ascent(
    model: nn.Module, x: torch.Tensor, start: torch.Tensor, *, eps: float, step_size: float, steps: int, norm: Norm, bn: BnMode
) -> torch.Tensor:
    if steps == 0:
        return start
    with torch.no_grad(), bn_mode(model, bn):
        clean_logits = model(x)  # in the same precision and mode as the steps that compare against it
    return _ascend(
        model, x, start,
        lambda logits: kl_per_sample(clean_logits, logits).sum(),
        eps=eps, step_size=step_size, steps=steps, norm=norm, bn=bn,
    )


def random_targets(y: torch.Tensor, num_classes: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A uniformly random wrong class for each label: (y + U{1..K-1}) mod K."""
    shift = torch.randint(1, num_classes, y.shape, generator=generator, device="cpu").to(y.device)
    return (y + shift) % num_classes


ATTACKS: dict[str, Attack] = {
    "pgd": pgd,
    "pgd_targeted": pgd_targeted,
    "trades_kl": trades_kl,
    "fgsm_rs": pgd,  # a one-step PGD; callers pass steps=1 and step_size=1.25*eps
}
