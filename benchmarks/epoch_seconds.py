"""Seconds per epoch of each AT method on digits, and the probe's share of an epoch.

    python benchmarks/epoch_seconds.py [--epochs 3] [--threads 2] [--set key=value ...]

Runs `examples/quickstart.yaml` (digits, small_cnn) once per method through the engine, with
no final AutoAttack, and prints per method the median training seconds per epoch, images per
second and the probe's share (probe + test evaluation seconds over the whole epoch), from the
`epochs` table the run wrote. Device and versions are printed with the numbers.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import torch

from analysis.query import open_tables
from analysis.store import versions
from study.spec import load_spec
from trainables.engine import device_label, run_trial, select_device
from trainables.methods import METHODS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", type=str, action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    overrides = [f"epochs={args.epochs}", f"threads={args.threads}", "final_eval.autoattack_n=0", *args.set]
    print(f"device: {device_label(select_device('auto'))}, torch threads {args.threads}, versions {versions()}")
    print("| method | train s/epoch | images/s | probe+eval s/epoch | probe share |")
    print("|---|---|---|---|---|")
    for method in METHODS:
        cfg = load_spec("examples/quickstart.yaml", [*overrides, f"method={method}"]).trial
        with tempfile.TemporaryDirectory() as out:
            run_trial(cfg, out=out, trial_id=method)
            rows = open_tables(out).execute("select epoch_seconds, probe_seconds, images_per_second from epochs where epoch > 0").fetchall()
        train = statistics.median(r[0] for r in rows)
        probe = statistics.median(r[1] for r in rows)
        ips = statistics.median(r[2] for r in rows)
        print(f"| {method} | {train:.2f} | {ips:.0f} | {probe:.2f} | {probe / (train + probe):.0%} |")
    torch.set_num_threads(args.threads)


if __name__ == "__main__":
    main()
