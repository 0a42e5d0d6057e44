"""Redraw the figures of docs/phases.md and docs/sampling.md from the code that draws them.

    .venv/bin/python docs/figures.py [--only phases|samples] [--out docs] [--rerun] [--work DIR]

phases: docs/phases-ro-sat-fashion.png and docs/phases-ro-sat-digits.png, each
    ``analysis.plots.phase_figure(rows, analysis.phases.detect(rows), path=...)`` of one run's
    `epochs` rows. The rows are stored in tests/data/phases/ (ro_fashion_sat_s0.csv,
    ro_digits_sat_s0.csv), so redrawing takes about 2 s and needs no data set. ``--rerun``
    trains the two runs again first and replaces the stored rows with theirs:

        energyat train examples/ro_fashion_sat.yaml --set seed=0 --out WORK/ro_fashion_sat_s0
        energyat train examples/ro_digits_sat.yaml --set seed=0 --out WORK/ro_digits_sat_s0

    about 10 and 3 minutes of CPU time, one core each (measured 2026-12-02 on this project's 2-core
    AMX CPU, bf16 training: 12 and 5 minutes of wall time, run side by side on a busy machine);
    Fashion-MNIST comes from Debian's dataset-fashion-mnist (/usr/share/datasets/fashion-mnist),
    digits from scikit-learn.
samples: docs/samples-digits-sat-vs-standard.png. Trains the SAT and the standard model of
    examples/findings_digits.yaml on all digits training images beside the validation split (as
    tests/test_generation.py does), runs ``energyat sample --init noise --eta 0.05 --momentum 0
    --n 20`` on each (seed 0) and stacks the two grids that command draws
    (``analysis.plots.sample_grid``), SAT above standard: about 40 s of one core.

Everything runs on the CPU and downloads nothing. Each figure's numbers (lr drop, offline onset,
online alarm; judge accuracies) are printed: docs/phases.md and docs/sampling.md quote them, and
tests/test_figures.py checks that docs/phases.md states what the phase figures show.
Without --work the training runs go to a temporary folder that is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from analysis.phases import detect, ground_truth_onset
from analysis.plots import lr_drops, phase_figure
from analysis.trials import columns, online_alarm_epoch

DATA = ROOT / "tests" / "data" / "phases"
EXAMPLES = ROOT / "examples"

# figure name -> (spec, stored rows); both runs are seed 0 of their example, stopping off
PHASE_RUNS = {
    "fashion": ("ro_fashion_sat.yaml", "ro_fashion_sat_s0"),
    "digits": ("ro_digits_sat.yaml", "ro_digits_sat_s0"),
}
# the `epochs` columns kept in tests/data/phases: what the figure, the detector, the ground truth
# and benchmarks/detector.py read (timings and weight statistics are left out)
KEEP = (
    "trial_id", "epoch", "method", "lr", "train_loss", "train_adv_acc",
    "probe_train_E", "probe_train_E_adv", "probe_train_E_tgt", "probe_train_dE", "probe_train_dEy",
    "probe_train_dE_abs_p50", "probe_train_dE_abs_p90", "probe_train_aae_frac",
    "val_clean_acc", "val_robust_acc", "val_robust_loss", "test_clean_acc", "test_robust_acc", "test_robust_loss",
    "phase", "alarm", "probed",
)
# tests/test_generation.py's sampling setup (docs/sampling.md, "Sample quality")
SAMPLE_ARGS = ["--init", "noise", "--eta", "0.05", "--momentum", "0", "--n", "20", "--seed", "0"]
SAMPLES_PNG = "samples-digits-sat-vs-standard.png"


def _cli(argv: Sequence[str]) -> None:
    from study.cli import main

    code = main(list(argv))
    if code != 0:
        raise SystemExit(f"energyat {' '.join(argv)} exited {code}")


# -- phases -------------------------------------------------------------------------------------------
def load_rows(name: str, data: Path = DATA) -> pa.Table:
    """The stored `epochs` rows of one run (tests/data/phases/<name>.csv)."""
    return pacsv.read_csv(data / f"{name}.csv")


def rerun(work: Path, data: Path = DATA) -> None:
    """Train the two runs again (stopping off) and store their `epochs` rows in `data`."""
    for spec, name in PHASE_RUNS.values():
        out = work / name
        _cli(["train", str(EXAMPLES / spec), "--set", "seed=0", "--out", str(out)])
        store_rows(out, name, data)


def store_rows(run: Path, name: str, data: Path = DATA) -> Path:
    """Keep the `epochs` rows of an `energyat train --out` folder as data/<name>.csv."""
    from analysis.query import open_tables

    con = open_tables(str(run))
    table = con.sql("select * from epochs order by epoch").to_arrow_table()
    con.close()
    data.mkdir(parents=True, exist_ok=True)
    pacsv.write_csv(table.select(list(KEEP)), data / f"{name}.csv")
    return data / f"{name}.csv"


def first_lr_drop(rows: pa.Table) -> int | None:
    """The first epoch where phase_figure draws 'lr drop' (analysis.plots.lr_drops)."""
    cols = columns(rows)
    order = np.argsort(cols["epoch"], kind="stable")
    drops = lr_drops(cols["epoch"][order], cols["lr"][order])
    return drops[0] if drops else None


def draw_phases(out: Path, data: Path = DATA) -> dict[str, dict[str, Any]]:
    """Draw both phase figures into `out` from the stored rows, labelled by today's detector;
    returns what each shows. The rows' own `phase` and `alarm` columns are what the detector of
    their training day raised (`recorded_alarm`), and are left out of the figure."""
    shown = {}
    for key, (_spec, name) in PHASE_RUNS.items():
        stored = load_rows(name, data)
        rows = stored.drop_columns(["phase", "alarm"])
        phases = detect(rows)
        png = phase_figure(rows, phases, path=Path(out) / f"phases-ro-sat-{key}.png")
        probed = rows.filter(pc.equal(rows["probed"], True))
        truth = ground_truth_onset(probed, split="val", signals=("robust_loss",))
        shown[key] = {
            "png": png, "run": name, "epochs": rows.num_rows, "lr_drop": first_lr_drop(rows),
            "phase2_start": phases.phase2_start, "onset": phases.phase3_start,
            "alarm": online_alarm_epoch(columns(rows), phases), "replayed_alarm": phases.alarm_epoch,
            "recorded_alarm": online_alarm_epoch(columns(stored), phases), "val_loss_onset": truth.epoch,
        }
    return shown


# -- samples ------------------------------------------------------------------------------------------
def draw_samples(out: Path, work: Path) -> dict[str, Any]:
    """Train SAT and standard on digits, sample from noise, stack the two grids into `out`."""
    from PIL import Image

    scores, grids = {}, []
    for method in ("sat", "standard"):
        folder = work / f"samples_{method}"
        _cli(["train", str(EXAMPLES / "findings_digits.yaml"), "--set", f"method={method}", "--set", "dataset.train_size=null",
              "--set", "final_eval.autoattack_n=0", "--out", str(folder)])
        _cli(["sample", str(folder), "--trial", "train", *SAMPLE_ARGS])
        with np.load(folder / "samples" / "train-noise.npz") as npz:
            record = json.loads(str(npz["record"]))
            per_class = int(np.bincount(npz["labels"]).max())
        scores[method] = {"judge_acc": record["scores"]["judge_acc"], "judge_fd": record["scores"]["judge_fd"],
                          "start_judge_acc": record["start_scores"]["judge_acc"], "per_class": per_class}
        grids.append(Image.open(folder / "samples" / "train-noise.png").convert("RGB"))
    canvas = Image.new("RGB", (max(g.width for g in grids), sum(g.height for g in grids)), "white")
    top = 0
    for g in grids:
        canvas.paste(g, (0, top))
        top += g.height
    png = Path(out) / SAMPLES_PNG
    png.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(png)
    return {"png": png, **scores}


# -- command line -------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--only", choices=("phases", "samples"), help="draw only these figures (default: all)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="where the PNGs go (default: docs/)")
    parser.add_argument("--rerun", action="store_true", help="phases: train the two runs again and replace tests/data/phases")
    parser.add_argument("--work", type=Path, help="keep the training runs here (default: a temporary folder)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="energyat-figures-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.only in (None, "phases"):
            if args.rerun:
                rerun(work)
            for s in draw_phases(args.out).values():
                print(f"{s['png']}: {s['run']}, {s['epochs']} epochs, lr drop at {s['lr_drop']}, phase 2 from {s['phase2_start']}, "
                      f"offline onset {s['onset']}, online alarm {s['alarm']} (raised in training: {s['recorded_alarm']}), "
                      f"validation robust-loss minimum {s['val_loss_onset']}")
        if args.only in (None, "samples"):
            s = draw_samples(args.out, work)
            print(f"{s['png']}: {s['sat']['per_class']} per class from noise (judged {s['sat']['start_judge_acc']:.3f} before SGLD); "
                  f"judge acc SAT {s['sat']['judge_acc']:.3f} (FD {s['sat']['judge_fd']:.1f}), "
                  f"standard {s['standard']['judge_acc']:.3f} (FD {s['standard']['judge_fd']:.1f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
