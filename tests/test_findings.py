"""The paper's findings, reproduced at small scale on digits through the whole pipeline.

Each test trains with the engine (``run_trial``) on the CPU, then reads the energies back from
the Parquet tables through DuckDB, so it checks the science and the plumbing together: the
training loop, the methods' own attacks in the probes, the targeted probe attack and the stored
columns. The configuration is ``examples/findings_digits.yaml``; every threshold below holds
with a wide margin for seeds 0, 1 and 2 (numbers in the comments). Measured on a 2-core
machine with other jobs running (load 2-6): about 10-20 s and 50-65 s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import EXAMPLES

from analysis.query import open_tables
from study.spec import load_spec
from trainables import checkpoint
from trainables.attacks import pgd, pgd_targeted, random_targets
from trainables.data import load_dataset
from trainables.energy import marginal_energy
from trainables.engine import EpochCallback, run_trial
from trainables.models import build_model

SPEC = EXAMPLES / "findings_digits.yaml"

# Finding 1 needs an attack that actually succeeds on the standard model: at the spec's eps 0.15
# PGD-5 leaves about half of the digits correct and mostly makes the model *less* confident
# (E(x*) > E(x)), while at eps 0.25 PGD-10 flips every digit and the untargeted attack overshoots
# into a confident wrong class, as on CIFAR-10 at 8/255. (At eps 0.4 the targeted attack also
# lowers E: the window in which both directions show is roughly eps 0.2-0.3 here.)
STANDARD = [
    "method=standard",
    "epochs=10",  # ~100% train accuracy, E(x) about -7.5 on the training probe
    "attack.eps=0.25",
    "attack.step=0.0625",
    "attack.steps=10",
    "eval_attack.steps=10",
    "probe.train_size=256",
    "probe.every=8",  # probe epochs 0, 8 and 9 (the last); 8 is for the independent recomputation
]


def _train(tmp_path: Path, overrides: list[str], on_epoch: EpochCallback | None = None) -> tuple[Path, Any]:
    cfg = load_spec(SPEC, overrides).trial
    out = tmp_path / cfg.method
    result = run_trial(cfg, out=out, on_epoch=on_epoch)
    assert result["status"] == "TERMINATED" and result["stop_reason"] == "completed"
    return out, cfg


def _probed_epochs(out: Path) -> list[dict[str, Any]]:
    con = open_tables(out)
    try:
        cur = con.execute(
            "select epoch, probe_train_E, probe_train_E_adv, probe_train_E_tgt, probe_train_dE, train_clean_acc "
            "from epochs where probed order by epoch"
        )
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
    finally:
        con.close()


def test_untargeted_attacks_lower_and_targeted_attacks_raise_the_energy_of_a_standard_model(tmp_path: Path) -> None:
    # docs/science.md section 2, finding 1. Seeds 0 / 1 / 2 (seed and dataset.seed), last epoch (9),
    # training probe of 256 images:
    #   E(x)   -7.48 / -7.51 / -7.48
    #   E(x*)  -9.59 / -10.39 / -8.76   (untargeted PGD-10, eps 0.25)
    #   E_tgt  -5.98 / -5.75 / -5.55    (targeted PGD-10 to a random wrong class)
    # Each epoch's weights, read from last.pt when the epoch is reported. The recomputation below
    # uses epoch 8, the last one reported from inside the training loop: the last epoch (9) is
    # reported only after the final evaluation of the best checkpoint.
    weights: dict[int, dict[str, torch.Tensor]] = {}

    def keep_weights(row: dict[str, Any], ckpt_dir: Path) -> None:
        weights.setdefault(row["epoch"], checkpoint.load(ckpt_dir / "last.pt")["model"])

    out, cfg = _train(tmp_path, STANDARD, keep_weights)
    rows = _probed_epochs(out)
    assert [r["epoch"] for r in rows] == [0, 8, 9] and cfg.epochs == 10
    last = rows[-1]

    # the model did learn (the finding is about a trained, non-robust classifier; seen >= 0.998)
    assert last["train_clean_acc"] > 0.95

    # untargeted PGD pushes the marginal energy down: E(x*) < E(x), by more than 0.5 (seen: 1.3-2.9)
    assert last["probe_train_E_adv"] < last["probe_train_E"] - 0.5
    # targeted PGD pushes it up: E(x*_tgt) > E(x), by more than 0.5 (seen: 1.5-1.9)
    assert last["probe_train_E_tgt"] > last["probe_train_E"] + 0.5
    # the stored dE is E(x) - E(x*) of the same probe: positive for the untargeted attack here
    assert last["probe_train_dE"] == pytest.approx(last["probe_train_E"] - last["probe_train_E_adv"], abs=1e-5)

    # the shift is not carried by a few outliers: most probe images move in each direction
    # (seen: 75-88% down, 75-81% up)
    con = open_tables(out)
    try:
        down, up = con.execute(
            "select avg((E_adv < E)::int), avg((E_tgt > E)::int) from samples where split = 'train' and epoch = 9"
        ).fetchone()
        index, stored_e = zip(*con.execute(
            "select index, E from samples where split = 'train' and epoch = 8 order by index"
        ).fetchall(), strict=True)
    finally:
        con.close()
    assert down > 0.5 and up > 0.5

    # the same directions, recomputed from epoch 8's weights with the library's own attacks,
    # independently of the engine's probe code (seen: 1.0-3.0 down, 1.4-2.0 up)
    torch.manual_seed(0)
    data = load_dataset(cfg.dataset)
    channels, size = data.train_x.shape[1], data.train_x.shape[-1]
    model = build_model(cfg.model, in_channels=channels, num_classes=data.num_classes, image_size=size, width=cfg.width)
    model.load_state_dict(weights[8])
    model.eval()
    idx = torch.tensor(index)
    x, y = data.train_x[idx].float() / 255, data.train_y[idx]
    a = cfg.attack
    targets = random_targets(y, data.num_classes, torch.Generator().manual_seed(0))
    x_adv = pgd(model, x, y, eps=a.eps, step_size=a.step, steps=a.steps)
    x_tgt = pgd_targeted(model, x, targets, eps=a.eps, step_size=a.step, steps=a.steps)
    with torch.no_grad():
        e, e_adv, e_tgt = (marginal_energy(model(t)) for t in (x, x_adv, x_tgt))
    # the stored per-sample E(x) is that model's energy of those very images
    assert e.tolist() == pytest.approx(list(stored_e), abs=1e-4)
    assert float(e_adv.mean()) < float(e.mean()) - 0.5
    assert float(e_tgt.mean()) > float(e.mean()) + 0.5


def test_sat_delta_energy_grows_while_trades_stays_near_zero(tmp_path: Path) -> None:
    # docs/science.md section 2, findings 2 and 3 (and its own digits check, where SAT's dE went from
    # about -0.4 to -5.6 in 100 epochs while TRADES stayed near -0.45). Here, 15 epochs,
    # |probe_train_dE| at epochs 0 / 5 / 10 / 14 (SAT's dE is negative: E(x*) above E(x)):
    #   seed 0: SAT 0.001 / 2.18 / 2.55 / 2.71   TRADES 0.001 / 0.08 / 0.13 / 0.15
    #   seed 1: SAT 0.002 / 1.89 / 2.79 / 2.85   TRADES 0.000 / 0.12 / 0.15 / 0.14
    #   seed 2: SAT 0.004 / 1.88 / 2.61 / 2.69   TRADES 0.009 / 0.12 / 0.11 / 0.13
    sat_out, _ = _train(tmp_path, ["method=sat"])
    trades_out, _ = _train(tmp_path, ["method=trades"])
    sat_de = [r["probe_train_dE"] for r in _probed_epochs(sat_out)]
    trades_de = [r["probe_train_dE"] for r in _probed_epochs(trades_out)]
    assert len(sat_de) == len(trades_de) == 4  # epochs 0, 5, 10 and the last
    sat, trades = [abs(v) for v in sat_de], [abs(v) for v in trades_de]

    # on the adversarially trained model PGD's x* sits *above* x in energy (dE < 0), unlike on
    # the standard model of the test above (seen: -2.69 to -2.85 at the last epoch)
    assert sat_de[-1] < 0

    # SAT's |dE| at the last epoch is far above TRADES': at least 5x (seen: 18x-21x)
    assert sat[-1] >= 5 * trades[-1]
    # SAT's |dE| grew over training: from ~0 after the first epoch to above 1.5 (seen: 2.7-2.85)
    assert sat[0] < 0.3 and sat[-1] > 1.5
    # ... and kept growing after the first probe past the start (seen: 1.9-2.2 at epoch 5)
    assert sat[-1] > sat[1]
    # TRADES' |dE| stayed small at every probed epoch (seen: at most 0.15)
    assert max(trades) < 0.5
