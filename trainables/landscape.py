"""`energyat landscape`: how far each attack moves the energies of a trial's test probe.

For every sample of the trial's fixed test probe (the images its epochs were probed on) and every
attack: dE(x) = E(x) - E(x*) and dE(x,y) = E(x,y) - E(x*,y), from the trial's best checkpoint.
The paper reads a smoother energy landscape off small, tight shifts (PAPER.md section 2, finding
4); untargeted attacks push E(x*) below E(x) (dE > 0), targeted ones above (finding 1).

The attacks use each trial's own threat model (`attack.eps`, `attack.step`, `attack.norm`):
``pgd`` untargeted PGD with `eval_attack.steps`, ``targeted`` PGD with `eval_attack.steps` towards
the probe's fixed random wrong classes, ``trades`` TRADES' KL attack with `attack.steps`,
``fgsm`` FGSM with random start (the methods' own crafts and the engine's probe).
Rows follow :data:`analysis.schema.LANDSCAPE`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import torch

from analysis.errors import EnergyatError
from analysis.schema import LANDSCAPE
from trainables.data import load_dataset
from trainables.engine import ProbeAttack, _probe, _probe_set
from trainables.generate import find_trial, load_model
from trainables.methods import Craft, MethodParams, craft_fgsm_rs, craft_pgd, craft_trades

LANDSCAPE_ATTACKS = ("pgd", "targeted", "trades", "fgsm")
# the methods' own crafts; `targeted` is the engine probe's targeted PGD (towards probe.targets)
_CRAFTS: dict[str, Craft] = {"pgd": craft_pgd, "trades": craft_trades, "fgsm": craft_fgsm_rs}
# which of the probe's per-sample values hold x*, for an untargeted attack and for `targeted`
_ADVERSARIAL = ("E_adv", "Ey_adv", "correct_adv")
_TARGETED = ("E_tgt", "Ey_tgt", "correct_tgt")


def parse_attacks(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in LANDSCAPE_ATTACKS]
    if unknown or not names:
        raise EnergyatError(f"--attacks {text!r}: choose from {', '.join(LANDSCAPE_ATTACKS)} (comma-separated)")
    return names


def _bound(craft: Craft, params: MethodParams) -> ProbeAttack:
    return lambda m, x, y: craft(m, x, y, params)


def trial_landscape(directory: str | Path, trial_id: str, *, attacks: Sequence[str], seed: int = 0) -> pa.Table:
    """One trial's rows of the landscape table (all attacks), on the CPU in fp32.

    Every attack goes through the engine's probe (:func:`trainables.engine._probe`); `targeted`
    rides along with `pgd` when both are asked for (one clean pass for the two).
    """
    trial = find_trial(directory, trial_id)
    cfg = trial.cfg
    data = load_dataset(cfg.dataset)
    model = load_model(trial, data)
    probe = _probe_set("test", data.test_x, data.test_y, cfg.probe.test_size, cfg.dataset.seed + 2, data.num_classes)
    params = MethodParams.from_config(cfg)
    eval_params = dataclasses.replace(params, steps=cfg.eval_attack.steps)  # pgd and targeted: the test attack's steps
    torch.manual_seed(seed)  # the attacks' random starts

    def run(craft: ProbeAttack, p: MethodParams, *, targeted: bool) -> dict[str, np.ndarray]:
        return _probe(model, probe, craft, p, cfg.batch_size, torch.device("cpu"), targeted=targeted, precision="fp32")

    found: dict[str, tuple[dict[str, np.ndarray], tuple[str, str, str]]] = {}
    for attack in attacks:
        if attack == "targeted" and "pgd" not in attacks:  # no untargeted pass to ride on: x* = x there
            found[attack] = (run(lambda m, x, y: x, eval_params, targeted=True), _TARGETED)
        elif attack == "pgd":
            values = run(_bound(craft_pgd, eval_params), eval_params, targeted="targeted" in attacks)
            found["pgd"] = (values, _ADVERSARIAL)
            if "targeted" in attacks:
                found["targeted"] = (values, _TARGETED)
        elif attack != "targeted":
            found[attack] = (run(_bound(_CRAFTS[attack], params), params, targeted=False), _ADVERSARIAL)

    columns: dict[str, list] = {name: [] for name in LANDSCAPE.names}
    for attack in attacks:
        values, (e_adv, ey_adv, correct_adv) = found[attack]
        n = len(values["E"])
        columns["attack"] += [attack] * n
        columns["index"] += probe.index.tolist()
        columns["label"] += probe.y.tolist()
        columns["dE"] += (values["E"] - values[e_adv]).tolist()
        columns["dEy"] += (values["Ey"] - values[ey_adv]).tolist()
        columns["fooled"] += (~values[correct_adv]).tolist()
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
