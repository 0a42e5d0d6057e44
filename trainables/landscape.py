"""`energyat landscape`: how far each attack moves the energies of a trial's test probe.

For every sample of the trial's fixed test probe (the images its epochs were probed on) and every
attack: dE(x) = E(x) - E(x*) and dE(x,y) = E(x,y) - E(x*,y), from the trial's best checkpoint.
The paper reads a smoother energy landscape off small, tight shifts (PAPER.md section 2, finding
4); untargeted attacks push E(x*) below E(x) (dE > 0), targeted ones above (finding 1).

The attacks use each trial's own threat model (`attack.eps`, `attack.step`, `attack.norm`):
``pgd`` untargeted PGD with `eval_attack.steps`, ``targeted`` PGD towards the probe's fixed random
wrong classes, ``trades`` TRADES' KL attack with `attack.steps`, ``fgsm`` FGSM with random start.
Rows follow :data:`analysis.schema.LANDSCAPE`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import torch

from analysis.errors import EnergyatError
from analysis.schema import LANDSCAPE
from trainables.attacks import eval_mode, pgd, pgd_targeted, trades_kl
from trainables.config import TrialConfig
from trainables.data import load_dataset
from trainables.energy import joint_energy, marginal_energy
from trainables.engine import _probe_set, _to_float
from trainables.generate import find_trial, load_model

LANDSCAPE_ATTACKS = ("pgd", "targeted", "trades", "fgsm")


def _craft(name: str, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, targets: torch.Tensor, cfg: TrialConfig) -> torch.Tensor:
    a = cfg.attack
    if name == "pgd":
        return pgd(model, x, y, eps=a.eps, step_size=a.step, steps=cfg.eval_attack.steps, norm=a.norm)
    if name == "targeted":
        return pgd_targeted(model, x, targets, eps=a.eps, step_size=a.step, steps=cfg.eval_attack.steps, norm=a.norm)
    if name == "trades":
        return trades_kl(model, x, y, eps=a.eps, step_size=a.step, steps=a.steps, norm=a.norm)
    return pgd(model, x, y, eps=a.eps, step_size=a.fgsm_step or 1.25 * a.eps, steps=1, norm=a.norm)  # fgsm


def parse_attacks(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in LANDSCAPE_ATTACKS]
    if unknown or not names:
        raise EnergyatError(f"--attacks {text!r}: choose from {', '.join(LANDSCAPE_ATTACKS)} (comma-separated)")
    return names


def trial_landscape(directory: str | Path, trial_id: str, *, attacks: Sequence[str], seed: int = 0) -> pa.Table:
    """One trial's rows of the landscape table (all attacks), on the CPU."""
    trial = find_trial(directory, trial_id)
    cfg = trial.cfg
    data = load_dataset(cfg.dataset)
    model = load_model(trial, data)
    probe = _probe_set("test", data.test_x, data.test_y, cfg.probe.test_size, cfg.dataset.seed + 2, data.num_classes)
    torch.manual_seed(seed)  # the attacks' random starts
    columns: dict[str, list] = {name: [] for name in LANDSCAPE.names}
    with eval_mode(model):
        for attack in attacks:
            for lo in range(0, len(probe.y), cfg.batch_size):
                x = _to_float(probe.x[lo : lo + cfg.batch_size])
                y, targets = probe.y[lo : lo + cfg.batch_size], probe.targets[lo : lo + cfg.batch_size]
                x_adv = _craft(attack, model, x, y, targets, cfg)
                with torch.no_grad():
                    logits, logits_adv = model(x).double(), model(x_adv).double()
                d_e = marginal_energy(logits) - marginal_energy(logits_adv)
                d_ey = joint_energy(logits, y) - joint_energy(logits_adv, y)
                columns["dE"] += d_e.tolist()
                columns["dEy"] += d_ey.tolist()
                columns["index"] += probe.index[lo : lo + cfg.batch_size].tolist()
                columns["label"] += y.tolist()
                columns["fooled"] += (logits_adv.argmax(1) != y).tolist()
                columns["attack"] += [attack] * len(y)
    n = len(columns["dE"])
    columns.update(trial_id=[trial_id] * n, method=[cfg.method] * n, checkpoint=[str(trial.best)] * n)
    return pa.Table.from_pydict(columns, schema=LANDSCAPE)


def landscape(directory: str | Path, trials: Sequence[str], *, attacks: Sequence[str], seed: int = 0) -> pa.Table:
    """The landscape rows of several trials, in the order given."""
    tables = [trial_landscape(directory, t, attacks=attacks, seed=seed) for t in trials]
    return pa.concat_tables(tables) if tables else LANDSCAPE.empty_table()


def summary(table: pa.Table) -> list[dict[str, object]]:
    """Per (trial, attack): n, fooled rate, mean, std and 10/90 % quantiles of dE(x) and dE(x,y)."""
    cols = {name: np.asarray(table.column(name).to_pylist()) for name in ("trial_id", "method", "attack", "dE", "dEy", "fooled")}
    rows = []
    for trial in dict.fromkeys(cols["trial_id"].tolist()):
        for attack in dict.fromkeys(cols["attack"].tolist()):
            keep = (cols["trial_id"] == trial) & (cols["attack"] == attack)
            if not keep.any():
                continue
            d_e, d_ey = cols["dE"][keep], cols["dEy"][keep]
            rows.append({
                "trial_id": trial, "method": str(cols["method"][keep][0]), "attack": attack, "n": int(keep.sum()),
                "fooled": float(cols["fooled"][keep].mean()),
                "dE_mean": float(d_e.mean()), "dE_std": float(d_e.std()),
                "dE_p10": float(np.quantile(d_e, 0.1)), "dE_p90": float(np.quantile(d_e, 0.9)),
                "dEy_mean": float(d_ey.mean()), "dEy_std": float(d_ey.std()),
            })
    return rows
