"""`energyat landscape`: how far each attack moves the energies of a model's test probe.

For every sample of the test probe (a trial's own fixed test probe; for a model from outside,
`--n` test images drawn the same way) and every attack: dE(x) = E(x) - E(x*) and
dE(x,y) = E(x,y) - E(x*,y), from the trial's best checkpoint or the given model. The paper reads
a smoother energy landscape off small, tight shifts (finding 4: RobustBench models, narrower as
robustness rises); untargeted attacks push E(x*) below E(x) (dE > 0), targeted ones above
(finding 1).

The attacks use the subject's threat model (`attack.eps`, `attack.step`, `attack.norm`):
``pgd`` untargeted PGD with `eval_attack.steps`, ``targeted`` PGD with `eval_attack.steps` towards
the probe's fixed random wrong classes, ``trades`` TRADES' KL attack with `attack.steps`,
``fgsm`` FGSM with random start (the methods' own crafts, in eval mode, through the one probe:
fp32, seeded). Rows follow :data:`analysis.schema.LANDSCAPE`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import torch

from analysis.errors import EnergyatError
from analysis.schema import LANDSCAPE
from trainables.attacks import pgd_targeted
from trainables.data import load_dataset
from trainables.methods import Craft, MethodParams, craft_fgsm_rs, craft_pgd, craft_trades
from trainables.probe import ProbeAttack, eval_seed, probe, probe_set
from trainables.subjects import Subject

LANDSCAPE_ATTACKS = ("pgd", "targeted", "trades", "fgsm")
# the methods' own crafts, each from its reference start; `targeted` is the probe's targeted
# PGD (towards the probe's targets)
_CRAFTS: dict[str, Craft] = {"pgd": craft_pgd, "trades": craft_trades, "fgsm": craft_fgsm_rs}
_STARTS = {"pgd": "uniform", "trades": "gaussian", "fgsm": "uniform"}
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


def subject_landscape(subject: Subject, *, attacks: Sequence[str], seed: int = 0, device: torch.device = torch.device("cpu")) -> pa.Table:
    """One model's rows of the landscape table (all attacks).

    Every attack goes through the one probe (:func:`trainables.probe.probe`); `targeted` rides
    along with `pgd` when both are asked for (one clean pass for the two).
    """
    cfg = subject.cfg
    data = load_dataset(cfg.dataset)
    model = subject.model(data, device)
    test = probe_set("test", data.test_x, data.test_y, cfg.probe.test_size, cfg.dataset.seed + 2, data.num_classes)
    # the same attacks whatever the subject's method: in eval mode, each from its reference start
    params = dataclasses.replace(MethodParams.from_config(cfg), bn="eval")
    eval_params = dataclasses.replace(params, steps=cfg.eval_attack.steps, start="uniform")  # pgd and targeted: the eval PGD

    def run(craft: ProbeAttack, *, targeted: bool) -> dict[str, np.ndarray]:
        tgt = _bound(_targeted, eval_params) if targeted else None
        return probe(model, test.x, test.y, attack=craft, targeted=tgt, targets=test.targets if targeted else None,
                     batch_size=cfg.batch_size, seed=eval_seed(seed, -1, "landscape"))

    found: dict[str, tuple[dict[str, np.ndarray], tuple[str, str, str]]] = {}
    for attack in attacks:
        if attack == "targeted" and "pgd" not in attacks:  # no untargeted pass to ride on: x* = x there
            found[attack] = (run(lambda m, x, y: x, targeted=True), _TARGETED)
        elif attack == "pgd":
            values = run(_bound(craft_pgd, eval_params), targeted="targeted" in attacks)
            found["pgd"] = (values, _ADVERSARIAL)
            if "targeted" in attacks:
                found["targeted"] = (values, _TARGETED)
        elif attack != "targeted":
            found[attack] = (run(_bound(_CRAFTS[attack], dataclasses.replace(params, start=_STARTS[attack])), targeted=False), _ADVERSARIAL)

    columns: dict[str, list] = {name: [] for name in LANDSCAPE.names}
    for attack in attacks:
        values, (e_adv, ey_adv, correct_adv) = found[attack]
        n = len(values["E"])
        columns["attack"] += [attack] * n
        columns["index"] += test.index.tolist()
        columns["label"] += test.y.tolist()
        columns["dE"] += (values["E"] - values[e_adv]).tolist()
        columns["dEy"] += (values["Ey"] - values[ey_adv]).tolist()
        columns["fooled"] += (~values[correct_adv]).tolist()
    n = len(columns["dE"])
    columns.update(trial_id=[subject.name] * n, method=[subject.label] * n, checkpoint=[subject.weights] * n)
    return pa.Table.from_pydict(columns, schema=LANDSCAPE)


def _targeted(model: torch.nn.Module, x: torch.Tensor, targets: torch.Tensor, p: MethodParams) -> torch.Tensor:
    return pgd_targeted(model, x, targets, eps=p.eps, step_size=p.step_size, steps=p.steps, norm=p.norm)  # type: ignore[arg-type]


def landscape(subjects: Sequence[Subject], *, attacks: Sequence[str], seed: int = 0, device: torch.device = torch.device("cpu")) -> pa.Table:
    """The landscape rows of several models, in the order given."""
    tables = [subject_landscape(s, attacks=attacks, seed=seed, device=device) for s in subjects]
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
