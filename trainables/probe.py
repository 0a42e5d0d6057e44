"""The one evaluation loop: per-sample energies and accuracies of fixed image sets, in fp32.

Every number energyat reports about a model, apart from the training-batch columns, comes from
:func:`probe`: the per-epoch training probe (the method's own x*), validation and test PGD,
the final clean and PGD accuracy, `energyat eval` and `energyat landscape`. It runs

- in **fp32 whatever the training precision** (:func:`fp32`: autocast off and, on CUDA, TF32 off
  for convolutions and matmuls), as all reference code evaluates: under bf16 a logit near 10 is
  rounded by about 0.06, which moves energies and flips borderline predictions;
- with batch norm in **eval mode**, and the probes' attacks built with ``bn="eval"``
  (:func:`probe_attacks`) whatever the training attack does: probing must not change the model
  (a train-mode attack would update the running statistics);
- from a **seeded random stream of its own** (:func:`seeded`), so an evaluation gives the same
  numbers whenever it is repeated on the same weights, and probing never shifts the training
  run's random numbers (changing `probe.every` does not change what is trained).

Energies follow the paper: E(x) = -logsumexp f(x), E(x,y) = -f(x)[y], dE(x) = E(x) - E(x*).

Example::

    from functools import partial
    from trainables.attacks import pgd
    from trainables.probe import probe

    values = probe(model, images, labels, attack=partial(pgd, eps=8 / 255, step_size=2 / 255, steps=20))
    delta_energy = values["E"] - values["E_adv"]          # per sample, float64 numpy
    robust_acc = values["correct_adv"].mean()
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trainables.attacks import eval_mode, pgd, pgd_targeted, random_targets
from trainables.config import TrialConfig
from trainables.data import to_float
from trainables.energy import joint_energy, marginal_energy
from trainables.methods import METHODS, Craft, MethodParams
from trainables.precision import fp32

# attack(model, x, y) -> x*, with the threat model bound (functools.partial of an attack, or a
# method's craft with its parameters)
ProbeAttack = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]

_TARGET_SEED = 1234  # fixed wrong-class targets per probe image, the same every epoch
# stream numbers of :func:`eval_seed`: every evaluation of a trial draws from its own stream
SPLITS = {"train": 0, "val": 1, "test": 2, "final": 3, "eval": 4, "landscape": 5}

VALUES = ("E", "E_adv", "Ey", "Ey_adv", "E_tgt", "ce", "ce_adv", "correct", "correct_adv")


def eval_seed(seed: int, epoch: int, split: str) -> int:
    """The seed of one evaluation: a trial's `seed`, the epoch (-1 after training) and the split."""
    return int(np.random.SeedSequence([seed, epoch + 1, SPLITS[split]]).generate_state(1)[0])


@contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """torch's random streams (CPU, and `device` if CUDA) seeded with `seed` inside and restored
    on exit, so an evaluation neither depends on nor disturbs the training run's random numbers."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


@dataclass
class ProbeSet:
    """A fixed set of images probed every epoch (no augmentation, eval-mode BN)."""

    split: str
    index: torch.Tensor  # positions in the split, int64
    x: torch.Tensor  # uint8, on the device
    y: torch.Tensor
    targets: torch.Tensor  # a fixed random wrong class per image


def probe_set(split: str, x: torch.Tensor, y: torch.Tensor, size: int, seed: int, num_classes: int) -> ProbeSet:
    """`size` images of a split (all of them if it has fewer), drawn with `seed`, in index order."""
    gen = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(y), generator=gen)[: min(size, len(y))].sort().values
    return _as_probe_set(split, index, x, y, seed, num_classes)


def whole_split(split: str, x: torch.Tensor, y: torch.Tensor, seed: int, num_classes: int) -> ProbeSet:
    """Every image of a split (the validation split), in order."""
    return _as_probe_set(split, torch.arange(len(y)), x, y, seed, num_classes)


def _as_probe_set(split: str, index: torch.Tensor, x: torch.Tensor, y: torch.Tensor, seed: int, num_classes: int) -> ProbeSet:
    dev_index = index.to(x.device)
    labels = y[dev_index]
    targets = random_targets(labels, num_classes, torch.Generator().manual_seed(_TARGET_SEED + seed))
    return ProbeSet(split, index, x[dev_index], labels, targets)


def probe(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    attack: ProbeAttack,
    targeted: ProbeAttack | None = None,
    targets: torch.Tensor | None = None,
    batch_size: int = 128,
    seed: int | None = None,
    on_batch: Callable[[int], None] | None = None,
    craft: Callable[[], AbstractContextManager[Any]] | None = None,
) -> dict[str, np.ndarray]:
    """Per-sample energies and correctness of `images` and of their adversarial examples.

    Args:
        model: a classifier returning logits; it is used in eval mode and in fp32 (its mode
            comes back afterwards).
        images: (N, C, H, W), uint8 (0..255) or float in [0, 1], on any device (batches are moved
            to the model's).
        labels: (N,) true classes.
        attack: crafts x* from a batch: ``attack(model, x, y) -> x*`` (any energyat attack with
            its threat model bound, e.g. ``functools.partial(pgd, eps=8/255, step_size=2/255, steps=20)``).
        targeted: optionally a second attack run towards ``targets`` (the class it is given
            as ``y``), for E(x*) under a targeted attack.
        targets: (N,) target classes for ``targeted``.
        batch_size: images per forward pass.
        seed: seeds the attacks' random starts (:func:`seeded`); None draws from torch's
            current stream.
        on_batch: called after each batch with the number of images done so far (progress).
        craft: the context the attacks run in (the training precision's autocast, for per-epoch
            probes: crafting is most of a probe's cost); None crafts in fp32. The energies and
            accuracies of x and x* are computed in fp32 either way.

    Returns:
        float64 numpy arrays ``E, E_adv, Ey, Ey_adv, ce, ce_adv, E_tgt`` (NaN without a
        targeted attack) and bool arrays ``correct, correct_adv``; with ``targeted`` also
        ``Ey_tgt`` (E(x*,y) of the targeted x*) and ``correct_tgt``.
    """
    if (targeted is None) != (targets is None):
        raise ValueError("`targeted` and `targets` go together: give both or neither")
    if len(labels) == 0:
        raise ValueError("probe needs at least one image")
    device = next(model.parameters()).device
    names = VALUES + (("Ey_tgt", "correct_tgt") if targeted is not None else ())
    cols: dict[str, list[torch.Tensor]] = {k: [] for k in names}
    with seeded(seed, device) if seed is not None else nullcontext(), fp32(), eval_mode(model):
        for lo in range(0, len(labels), batch_size):
            batch = images[lo : lo + batch_size].to(device)
            x = to_float(batch) if batch.dtype == torch.uint8 else batch.float().contiguous(memory_format=torch.channels_last)
            y = labels[lo : lo + batch_size].to(device)
            with craft() if craft is not None else nullcontext():
                x_adv = attack(model, x, y).float()
            with torch.no_grad():
                logits, logits_adv = model(x).float(), model(x_adv).float()
            values: dict[str, torch.Tensor] = {"E_tgt": torch.full((len(y),), math.nan, device=device)}
            if targeted is not None:
                assert targets is not None
                with craft() if craft is not None else nullcontext():
                    x_tgt = targeted(model, x, targets[lo : lo + batch_size].to(device)).float()
                with torch.no_grad():
                    logits_tgt = model(x_tgt).float()
                values = {"E_tgt": marginal_energy(logits_tgt), "Ey_tgt": joint_energy(logits_tgt, y), "correct_tgt": logits_tgt.argmax(1) == y}
            values |= {
                "E": marginal_energy(logits),
                "E_adv": marginal_energy(logits_adv),
                "Ey": joint_energy(logits, y),
                "Ey_adv": joint_energy(logits_adv, y),
                "ce": F.cross_entropy(logits, y, reduction="none"),
                "ce_adv": F.cross_entropy(logits_adv, y, reduction="none"),
                "correct": logits.argmax(1) == y,
                "correct_adv": logits_adv.argmax(1) == y,
            }
            for name in names:
                cols[name].append(values[name].detach())
            if on_batch is not None:
                on_batch(lo + len(y))
    # float64 on the host, so that mean(E - E*) equals mean(E) - mean(E*) to 1e-12
    return {k: torch.cat(v).cpu().double().numpy() if v[0].is_floating_point() else torch.cat(v).cpu().numpy() for k, v in cols.items()}


def probe_columns(train: dict[str, np.ndarray] | None, val: dict[str, np.ndarray] | None, test: dict[str, np.ndarray] | None) -> dict[str, float]:
    """The `epochs` columns of one probed epoch; a missing set's columns are NaN."""
    cols = dict.fromkeys(PROBE_KEYS, math.nan)
    if train is not None:
        d_e = train["E"] - train["E_adv"]
        cols |= {
            "probe_train_E": float(train["E"].mean()),
            "probe_train_E_adv": float(train["E_adv"].mean()),
            "probe_train_dE": float(d_e.mean()),
            "probe_train_dE_abs_p50": float(np.quantile(np.abs(d_e), 0.5)),
            "probe_train_dE_abs_p90": float(np.quantile(np.abs(d_e), 0.9)),
            "probe_train_dEy": float((train["Ey"] - train["Ey_adv"]).mean()),
            "probe_train_E_tgt": float(train["E_tgt"].mean()),
            "probe_train_aae_frac": float((train["ce_adv"] < train["ce"]).mean()),
        }
    if val is not None:
        cols |= {
            "val_clean_acc": float(val["correct"].mean()),
            "val_robust_acc": float(val["correct_adv"].mean()),
            "val_robust_loss": float(val["ce_adv"].mean()),
        }
    if test is not None:
        cols |= {
            "test_clean_acc": float(test["correct"].mean()),
            "test_robust_acc": float(test["correct_adv"].mean()),
            "test_robust_loss": float(test["ce_adv"].mean()),
            "probe_test_E": float(test["E"].mean()),
            "probe_test_E_adv": float(test["E_adv"].mean()),
            "probe_test_dE": float((test["E"] - test["E_adv"]).mean()),
        }
    return cols


PROBE_KEYS = (
    "probe_train_E", "probe_train_E_adv", "probe_train_dE", "probe_train_dE_abs_p50", "probe_train_dE_abs_p90",
    "probe_train_dEy", "probe_train_E_tgt", "probe_train_aae_frac",
    "val_clean_acc", "val_robust_acc", "val_robust_loss",
    "test_clean_acc", "test_robust_acc", "test_robust_loss", "probe_test_E", "probe_test_E_adv", "probe_test_dE",
)

_SAMPLE_VALUES = ("E", "E_adv", "Ey", "Ey_adv", "E_tgt", "correct", "correct_adv")


def sample_columns(study: str, trial_id: str, epoch: int, sets: list[tuple[ProbeSet, dict[str, np.ndarray]]]) -> dict[str, Any]:
    """The `samples` rows of one epoch: one per image of each probed set."""
    cols: dict[str, list[Any]] = {k: [] for k in ("study", "trial_id", "epoch", "split", "index", "label", *_SAMPLE_VALUES)}
    for ps, values in sets:
        n = len(ps.y)
        cols["study"] += [study] * n
        cols["trial_id"] += [trial_id] * n
        cols["epoch"] += [epoch] * n
        cols["split"] += [ps.split] * n
        cols["index"] += ps.index.tolist()
        cols["label"] += ps.y.cpu().tolist()
        for k in _SAMPLE_VALUES:
            cols[k] += values[k].tolist()
    return cols


def probe_attacks(cfg: TrialConfig, params: MethodParams) -> tuple[ProbeAttack, ProbeAttack, ProbeAttack]:
    """The probes' attacks, all crafting in eval mode (probing must not update batch norm):

    - the training probe's: the method's own x* (its craft, start and steps);
    - the evaluation PGD of the validation and test sets: untargeted, uniform random start,
      `eval_attack.steps` steps of `attack.step` (the paper's PGD-20 at 8/255 and 2/255);
    - the targeted PGD of the training probe (towards fixed random wrong classes), with the
      training attack's steps.
    """
    probe_params = dataclasses.replace(params, bn="eval")
    method_craft: Craft = METHODS[cfg.method].craft
    eval_steps = cfg.eval_attack.steps

    def train_attack(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return method_craft(m, x, y, probe_params)

    def eval_attack(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return pgd(m, x, y, eps=params.eps, step_size=params.step_size, steps=eval_steps, norm=params.norm)  # type: ignore[arg-type]

    def targeted_attack(m: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return pgd_targeted(m, x, targets, eps=params.eps, step_size=params.step_size, steps=params.steps, norm=params.norm)  # type: ignore[arg-type]

    return train_attack, eval_attack, targeted_attack
