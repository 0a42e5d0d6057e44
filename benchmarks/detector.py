"""Judge the phase detector and the stop rule on real runs.

    python benchmarks/detector.py runs/ro120_sat_s0 studies/quickstart_nostop [...]   # train outputs or studies

Prints a markdown table, one row per trial (runs made with stopping off, so every epoch is there):

- true onset: analysis.phases.ground_truth_onset (best smoothed test robust accuracy, else
  minimum smoothed test robust loss, when the run ends clearly worse), with the signal used:
  the test curve explains, it never selects;
- online alarm and offline onset: the detector replayed on the stored training-side columns,
  and the robust accuracy kept by stopping right at the alarm;
- the stop rule (analysis.phases.should_stop, default patience, on validation robust accuracy
  as the trial applies it): the epoch it would stop at, the robust accuracy it keeps against
  the whole run's, and the epochs it saves;
- for comparison, plain patience without the alarm (Rice et al.'s early stopping on
  validation robust accuracy): where it would stop and what it would keep.

"Kept" is the *test* robust accuracy of the checkpoint the trial keeps: the epoch of best
validation robust accuracy up to the stop (the test curve is per-epoch, on `probe.test_size`
images; the final evaluation of that checkpoint is in `trials`).

Then one summary line: median |alarm - true onset| over the runs that overfit, alarms on runs
that do not, and the worst robust accuracy lost by the stop rule.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

from analysis.phases import STOP_PATIENCE, detect, ground_truth_onset, should_stop
from analysis.query import open_tables

HEADER = (
    "| run | trial | method | epochs | true onset | online alarm | offline onset | robust acc kept at alarm "
    "| stop (alarm + patience) | robust acc kept at stop | best robust acc | epochs saved | patience alone: stop, kept |"
)


def stop_epoch(rows: list[dict[str, Any]], alarm_epoch: int | None, patience: int) -> int | None:
    """The first epoch at which the stop rule fires (alarm_epoch None: patience alone), with the
    best epoch on validation robust accuracy, as the trial keeps it."""
    best, best_epoch = -1.0, None
    for r in rows:
        if r["probed"] and r["val_robust_acc"] > best:
            best, best_epoch = r["val_robust_acc"], r["epoch"]
        alarm = True if alarm_epoch is None else r["epoch"] >= alarm_epoch
        if should_stop(alarm=alarm, epoch=r["epoch"], best_epoch=best_epoch, patience=patience):
            return int(r["epoch"])
    return None


def kept(rows: list[dict[str, Any]], stop: int | None) -> float:
    """Test robust accuracy of the checkpoint a run stopped at `stop` keeps: its epoch of best
    validation robust accuracy (the first, on ties) up to `stop`."""
    seen = [r for r in rows if r["probed"] and (stop is None or r["epoch"] <= stop)]
    return max(seen, key=lambda r: (r["val_robust_acc"], -r["epoch"]))["test_robust_acc"]


def judge(directory: str, patience: int) -> list[dict[str, Any]]:
    con = open_tables(directory)
    out = []
    trials = [t for (t,) in con.execute("select distinct trial_id from epochs order by 1").fetchall()]
    for trial in trials:
        table = con.sql("select * from epochs where trial_id = $t order by epoch", params={"t": trial}).to_arrow_table()
        rows = table.to_pylist()
        truth = ground_truth_onset(table)
        found = detect(table)
        stop = stop_epoch(rows, found.alarm_epoch, patience) if found.alarm_epoch is not None else None
        plain = stop_epoch(rows, None, patience)
        out.append(dict(
            run=directory, trial=trial, method=rows[0]["method"], epochs=len(rows), truth=truth,
            alarm=found.alarm_epoch, onset=found.phase3_start, at_alarm=kept(rows, found.alarm_epoch), stop=stop, kept=kept(rows, stop),
            best=kept(rows, None), saved=0 if stop is None else len(rows) - 1 - stop,
            plain=plain, plain_kept=kept(rows, plain),
        ))
    con.close()
    return out


def _text(value: Any) -> str:
    return "none" if value is None else str(value)


def line(r: dict[str, Any]) -> str:
    truth = "none" if r["truth"].epoch is None else f"{r['truth'].epoch} ({r['truth'].signal.replace('test_robust_', '')})"
    return (
        f"| {r['run']} | {r['trial']} | {r['method']} | {r['epochs']} | {truth} | {_text(r['alarm'])} | {_text(r['onset'])} "
        f"| {r['at_alarm']:.3f} | {_text(r['stop'])} | {r['kept']:.3f} | {r['best']:.3f} | {r['saved']} "
        f"| {_text(r['plain'])}, {r['plain_kept']:.3f} |"
    )


def summary(results: list[dict[str, Any]]) -> str:
    overfit = [r for r in results if r["truth"].epoch is not None]
    gaps = [abs(r["alarm"] - r["truth"].epoch) for r in overfit if r["alarm"] is not None]
    missed = sum(r["alarm"] is None for r in overfit)
    clean = [r for r in results if r["truth"].epoch is None]
    false_alarms = sum(r["alarm"] is not None for r in clean)
    lost = max((r["best"] - r["kept"] for r in results), default=0.0)
    lost_at_alarm = [r["best"] - r["at_alarm"] for r in overfit if r["alarm"] is not None]
    median = f"{statistics.median(gaps):.1f}" if gaps else "n/a"
    return (
        f"{len(overfit)} run(s) overfit: median |alarm - true onset| {median} epochs, {missed} without an alarm; "
        f"robust accuracy at their alarm {100 * max(lost_at_alarm, default=0.0):.1f} points or less below the best; "
        f"{false_alarms} of {len(clean)} run(s) that do not overfit raised an alarm; "
        f"the stop rule lost at most {100 * lost:.1f} points of robust accuracy over all runs"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directories", nargs="+", help="`energyat train --out` directories or study directories")
    parser.add_argument("--patience", type=int, default=STOP_PATIENCE, help=f"stop-rule patience (default {STOP_PATIENCE})")
    args = parser.parse_args()
    results = [r for d in args.directories for r in judge(d, args.patience)]
    print(HEADER)
    print("|" + "---|" * HEADER.count(" | ") + "---|")
    for r in results:
        print(line(r))
    print()
    print(summary(results))


if __name__ == "__main__":
    main()
