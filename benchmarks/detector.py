"""Judge the phase detector on real runs: true onset vs online alarm vs offline onset.

    python benchmarks/detector.py runs/ro_sat_s0 runs/ro_trades_s0 [...]   # train outputs or studies

Prints a markdown table, one row per trial: the ground-truth robust-overfitting onset
(analysis.phases.ground_truth_onset: best smoothed test robust accuracy, else minimum smoothed
test robust loss, when the run ends clearly worse), the online alarm epoch (the stopper's), the
offline onset, and test robust accuracy at the alarm against the best of the run.
"""

from __future__ import annotations

import sys

from analysis.phases import detect, ground_truth_onset
from analysis.query import open_tables


def rows_for(directory: str) -> list[str]:
    con = open_tables(directory)
    out = []
    trials = [t for (t,) in con.execute("select distinct trial_id from epochs order by 1").fetchall()]
    for trial in trials:
        table = con.sql("select * from epochs where trial_id = $t order by epoch", params={"t": trial}).to_arrow_table()
        rows = table.to_pylist()
        method = rows[0]["method"]
        probed = [r for r in rows if r["probed"]]
        truth = ground_truth_onset(table)
        found = detect(table)
        best = max(r["test_robust_acc"] for r in probed)
        at_alarm = "-"
        if found.alarm_epoch is not None:
            upto = [r["test_robust_acc"] for r in probed if r["epoch"] <= found.alarm_epoch]
            at_alarm = f"{max(upto):.3f}"  # what early stopping keeps: the best checkpoint so far
        truth_text = "none" if truth.epoch is None else f"{truth.epoch} ({truth.signal.replace('test_robust_', '')})"
        d_e = f"{probed[0]['probe_train_dE']:.2f} -> {probed[-1]['probe_train_dE']:.2f}"
        out.append(
            f"| {directory} | {trial} | {method} | {len(rows)} | {truth_text} | {found.alarm_epoch if found.alarm_epoch is not None else 'none'} "
            f"| {found.phase3_start if found.phase3_start is not None else 'none'} | {at_alarm} | {best:.3f} | {d_e} |"
        )
    return out


def main(paths: list[str]) -> None:
    print("| run | trial | method | epochs | true onset | online alarm | offline onset | robust acc kept at alarm | best robust acc | dE first -> last |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for path in paths:
        for line in rows_for(path):
            print(line)


if __name__ == "__main__":
    main(sys.argv[1:])
