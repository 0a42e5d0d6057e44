"""Invariants of every attack in the registry (STYLE.md habit 13)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trainables.attacks import ATTACKS, pgd, pgd_targeted, random_targets, trades_kl

EPS, STEP = 0.15, 0.05


@pytest.mark.parametrize("name", sorted(ATTACKS))
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_attack_stays_in_ball_and_image_range(name: str, norm: str, trained_cnn, digits_batch) -> None:
    x, y = digits_batch
    eps = EPS if norm == "linf" else 1.0
    steps = 1 if name == "fgsm_rs" else 5
    x_adv = ATTACKS[name](trained_cnn, x, y, eps=eps, step_size=STEP if norm == "linf" else 0.3, steps=steps, norm=norm)
    delta = (x_adv - x).flatten(1)
    size = delta.abs().max(1).values if norm == "linf" else delta.norm(dim=1)
    # ||x* - x|| <= eps and 0 <= x* <= 1
    assert (size <= eps + 1e-6).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert x_adv.shape == x.shape and not x_adv.requires_grad


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attack_accumulates_no_weight_gradients(name: str, trained_cnn, digits_batch) -> None:
    # crafting x* takes gradients w.r.t. the input only: .grad of every weight stays None
    x, y = digits_batch
    for p in trained_cnn.parameters():
        p.grad = None
    ATTACKS[name](trained_cnn, x, y, eps=EPS, step_size=STEP, steps=3, norm="linf")
    assert all(p.grad is None for p in trained_cnn.parameters())


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attack_restores_training_mode(name: str, trained_cnn, digits_batch) -> None:
    # batch norm runs in eval mode while crafting; the caller's mode comes back afterwards
    x, y = digits_batch
    trained_cnn.train()
    seen: list[bool] = []
    hook = trained_cnn.register_forward_pre_hook(lambda m, inp: seen.append(m.training))
    ATTACKS[name](trained_cnn, x, y, eps=EPS, step_size=STEP, steps=2, norm="linf")
    hook.remove()
    assert seen and not any(seen)
    assert trained_cnn.training
    trained_cnn.eval()


def test_untargeted_pgd_raises_the_loss(trained_cnn, digits_batch) -> None:
    x, y = digits_batch
    x_adv = pgd(trained_cnn, x, y, eps=EPS, step_size=STEP, steps=10)
    with torch.no_grad():
        clean, adv = F.cross_entropy(trained_cnn(x), y), F.cross_entropy(trained_cnn(x_adv), y)
    assert adv > clean + 0.5


def test_targeted_pgd_raises_the_target_logit(trained_cnn, digits_batch) -> None:
    x, y = digits_batch
    target = random_targets(y, 10, torch.Generator().manual_seed(0))
    x_adv = pgd_targeted(trained_cnn, x, target, eps=EPS, step_size=STEP, steps=10)
    with torch.no_grad():
        before = trained_cnn(x).gather(1, target[:, None])
        after = trained_cnn(x_adv).gather(1, target[:, None])
    assert (after > before).float().mean() > 0.9
    assert after.mean() > before.mean() + 1.0


def test_random_targets_are_always_wrong_and_cover_all_classes() -> None:
    y = torch.arange(10).repeat(100)
    t = random_targets(y, 10, torch.Generator().manual_seed(0))
    assert (t != y).all() and set(t.tolist()) == set(range(10))


def test_trades_attack_raises_the_kl(trained_cnn, digits_batch) -> None:
    from trainables.energy import kl_per_sample

    x, y = digits_batch
    x_adv = trades_kl(trained_cnn, x, y, eps=EPS, step_size=STEP, steps=10)
    with torch.no_grad():
        kl = kl_per_sample(trained_cnn(x), trained_cnn(x_adv)).mean()
    assert kl > 0.1


def test_robust_accuracy_never_exceeds_clean_by_much(trained_cnn, digits_batch) -> None:
    # clean_acc >= robust_acc for an untargeted attack (torchattacks' invariant)
    x, y = digits_batch
    x_adv = pgd(trained_cnn, x, y, eps=EPS, step_size=STEP, steps=10)
    with torch.no_grad():
        clean = (trained_cnn(x).argmax(1) == y).float().mean()
        robust = (trained_cnn(x_adv).argmax(1) == y).float().mean()
    assert clean >= robust
