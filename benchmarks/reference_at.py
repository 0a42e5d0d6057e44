"""Adversarial training written the usual way: the yardstick `throughput.py` measures against.

This is how published AT code is typically written (Madry's PGD-AT as in Rice et al.'s
`train_cifar.py`, TRADES' `trades.py`, the paper's own code), kept deliberately plain:

- a ``DataLoader`` over a ``Dataset`` whose ``__getitem__`` turns one uint8 array into a PIL
  image and runs torchvision's per-sample transforms (RandomCrop, RandomHorizontalFlip,
  ToTensor) on the CPU, then copies each batch to the device;
- fp32 everywhere, no channels_last, no compile;
- every attack step calls ``loss.backward()``, which also computes (and then throws away)
  the weight gradients;
- the TRADES attack recomputes the clean softmax ``model(x_natural)`` inside every step;
- ``loss.item()`` after every batch (a host synchronisation per step).

The objectives are the same as energyat's (tests/test_fast_path.py checks that both paths
give the same attack success and energies): only how they are computed differs. Nothing here
is imported by the package.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

REFERENCE_METHODS = ("standard", "sat", "fgsm_rs", "trades", "weat", "der", "mart")


class UInt8Images(Dataset):
    """(N, C, H, W) uint8 images and labels, one PIL image per item, as torchvision's CIFAR10 does."""

    def __init__(self, x: np.ndarray, y: np.ndarray, *, crop_pad: int, flip: bool) -> None:
        self.x, self.y = x, y
        size = x.shape[-1]
        steps: list = []
        if crop_pad:
            steps.append(transforms.RandomCrop(size, padding=crop_pad))
        if flip:
            steps.append(transforms.RandomHorizontalFlip())
        steps.append(transforms.ToTensor())
        self.transform = transforms.Compose(steps)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = self.x[i]
        pil = Image.fromarray(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0))
        return self.transform(pil), int(self.y[i])


def loader(x: np.ndarray, y: np.ndarray, *, batch_size: int, crop_pad: int, flip: bool, workers: int) -> DataLoader:
    # workers persist across epochs (each timed run is one): restarting them every run would
    # charge the reference a start-up the usual long training run pays once
    return DataLoader(
        UInt8Images(x, y, crop_pad=crop_pad, flip=flip), batch_size=batch_size, shuffle=True,
        num_workers=workers, pin_memory=torch.cuda.is_available(), drop_last=False, persistent_workers=workers > 0,
    )


def pgd_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, step_size: float, steps: int, train_mode: bool = False,
               gaussian_start: bool = False) -> torch.Tensor:
    """L-inf PGD; each step calls loss.backward(). Rice et al.'s attack_pgd (and Wong et al.'s
    FGSM-RS) keep the model in train mode and start uniformly in the ball; MART's code calls
    model.eval() and starts at x + 0.001 * N(0, I)."""
    model.train(train_mode)
    if gaussian_start:
        x_adv = x.detach() + 0.001 * torch.randn_like(x)
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps)
    else:
        x_adv = x + torch.zeros_like(x).uniform_(-eps, eps)
    x_adv = torch.clamp(x_adv, 0.0, 1.0)
    for _ in range(steps):
        x_adv.requires_grad_()
        loss = F.cross_entropy(model(x_adv), y)
        model.zero_grad()
        loss.backward()  # computes weight gradients too
        x_adv = x_adv.detach() + step_size * x_adv.grad.sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    model.train()
    return x_adv.detach()


def trades_attack(model: nn.Module, x: torch.Tensor, *, eps: float, step_size: float, steps: int) -> torch.Tensor:
    """TRADES' KL attack as released: the clean distribution is recomputed inside every step."""
    model.eval()
    criterion_kl = nn.KLDivLoss(reduction="sum")
    x_adv = x.detach() + 0.001 * torch.randn_like(x)
    x_adv = torch.clamp(torch.min(torch.max(x_adv, x - eps), x + eps), 0.0, 1.0)
    for _ in range(steps):
        x_adv.requires_grad_()
        loss_kl = criterion_kl(F.log_softmax(model(x_adv), dim=1), F.softmax(model(x), dim=1))
        model.zero_grad()
        loss_kl.backward()  # computes weight gradients too
        x_adv = x_adv.detach() + step_size * x_adv.grad.sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    model.train()
    return x_adv.detach()


def _kl(logits: torch.Tensor, logits_adv: torch.Tensor) -> torch.Tensor:
    """Per-sample KL(p(x) || p(x*))."""
    p = F.softmax(logits, dim=1)
    return (p * (F.log_softmax(logits, dim=1) - F.log_softmax(logits_adv, dim=1))).sum(1)


def batch_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, method: str, hp: dict) -> torch.Tensor:
    """One method's training loss on one batch, attack included (model left in train mode)."""
    eps, step, steps, beta = hp["eps"], hp["step_size"], hp["steps"], hp["beta"]
    if method == "standard":
        return F.cross_entropy(model(x), y)
    if method in ("sat", "fgsm_rs", "der", "mart"):
        if method == "fgsm_rs":
            x_adv = pgd_attack(model, x, y, eps=eps, step_size=1.25 * eps, steps=1, train_mode=True)
        elif method == "mart":
            x_adv = pgd_attack(model, x, y, eps=eps, step_size=step, steps=steps, gaussian_start=True)
        else:
            x_adv = pgd_attack(model, x, y, eps=eps, step_size=step, steps=steps, train_mode=True)
        logits_adv = model(x_adv)
        if method in ("sat", "fgsm_rs"):
            return F.cross_entropy(logits_adv, y)
        logits = model(x)
        if method == "der":  # multi-step DER: CE(x*) + beta * max(||[dE, dEy]|| - gamma, 0)
            d_e = -torch.logsumexp(logits, 1) + torch.logsumexp(logits_adv, 1)
            d_ey = -logits.gather(1, y[:, None])[:, 0] + logits_adv.gather(1, y[:, None])[:, 0]
            penalty = torch.clamp(torch.sqrt(d_e**2 + d_ey**2) - hp["gamma"], min=0.0)
            return (F.cross_entropy(logits_adv, y, reduction="none") + beta * penalty).mean()
        adv_probs = F.softmax(logits_adv, dim=1)  # MART
        tmp1 = torch.argsort(adv_probs, dim=1)[:, -2:]
        new_y = torch.where(tmp1[:, -1] == y, tmp1[:, -2], tmp1[:, -1])
        loss_adv = F.cross_entropy(logits_adv, y, reduction="none") + F.nll_loss(torch.log(1.0001 - adv_probs + 1e-12), new_y, reduction="none")
        true_probs = torch.gather(F.softmax(logits, dim=1), 1, y.unsqueeze(1)).squeeze()
        return (loss_adv + beta * _kl(logits, logits_adv) * (1.0000001 - true_probs)).mean()
    if method in ("trades", "weat"):
        x_adv = trades_attack(model, x, eps=eps, step_size=step, steps=steps)
        logits, logits_adv = model(x), model(x_adv)
        if method == "trades":
            return (F.cross_entropy(logits, y, reduction="none") + beta * _kl(logits, logits_adv)).mean()
        # WEAT_adv with the paper's weights 1 / log(1 + exp(|E(x)|)), E(x) = -logsumexp(f(x))
        weights = 1.0 / torch.log1p(torch.exp(torch.logsumexp(logits.detach(), 1).abs()))
        return (weights * (F.cross_entropy(logits_adv, y, reduction="none") + beta * _kl(logits, logits_adv))).mean()
    raise ValueError(f"unknown method {method!r}; choose from {REFERENCE_METHODS}")


def train_batches(
    model: nn.Module, opt: torch.optim.Optimizer, batches: DataLoader, method: str, hp: dict, device: torch.device, *, limit: int | None = None
) -> int:
    """The usual epoch loop; returns the number of images trained on."""
    model.train()
    images = 0
    train_loss = 0.0
    for i, (x, y) in enumerate(batches):
        if limit is not None and i >= limit:
            break
        x, y = x.to(device), y.to(device)
        loss = batch_loss(model, x, y, method, hp)
        opt.zero_grad()
        loss.backward()
        opt.step()
        train_loss += loss.item() * len(y)  # a host synchronisation per batch, as usual
        images += len(y)
    return images
