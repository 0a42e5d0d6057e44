"""Ray Tune reuses a finished trial's worker for the next trial (study.runner's `reuse_actors`):
a trial must give the same rows in a worker another trial has used as in a fresh one."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import EXAMPLES
from test_study import energyat

from analysis.query import open_tables

# what differs between two runs of one trial: its ids and its timings
NOT_COMPARED = {"study", "trial_id", "epoch_seconds", "probe_seconds", "images_per_second", "seconds", "final_seconds"}


def _study(storage: Path, points: list[dict[str, object]]) -> tuple[dict[str, list[tuple]], dict[str, set[int]]]:
    """Each trial's rows (epochs, then trials) by method, and the worker processes each ran in."""
    overrides = ["epochs=2", "dataset.train_size=200", "probe.train_size=32", "probe.test_size=32", "final_eval.n=64",
                 "max_concurrent=1", f"samples={len(points)}", "search={method: [sat, trades], seed: {choices: [0, 1]}}",
                 f"points_to_evaluate={json.dumps(points)}", f"storage={storage}"]
    energyat("run", str(EXAMPLES / "smoke.yaml"), *[a for o in overrides for a in ("--set", o)])
    study = storage / "smoke"
    con = open_tables(study)
    rows: dict[str, list[tuple]] = {}
    methods = dict(con.execute("select trial_id, method from trials").fetchall())
    for table in ("epochs", "trials"):
        columns = ", ".join(f'"{c}"' for (c, *_) in con.execute(f"describe {table}").fetchall() if c not in NOT_COMPARED)
        for trial_id, method in methods.items():
            order = "order by epoch" if table == "epochs" else ""
            rows.setdefault(method, []).extend(
                con.execute(f"select {columns} from {table} where trial_id = ? {order}", [trial_id]).fetchall())
    pids = {method: {json.loads(line)["pid"] for line in (study / "tune" / trial_id / "result.json").read_text().splitlines()}
            for trial_id, method in methods.items()}
    return rows, pids


def test_a_trial_in_a_reused_worker_writes_the_rows_it_writes_in_a_fresh_one(tmp_path: Path) -> None:
    first, second = {"method": "trades", "seed": 1}, {"method": "sat", "seed": 0}
    after, pids = _study(tmp_path / "after", [first, second])
    assert pids["trades"] == pids["sat"] and len(pids["sat"]) == 1  # one worker ran both, one after the other
    alone, alone_pids = _study(tmp_path / "alone", [second])
    assert alone_pids["sat"] != pids["sat"]
    # the sat trial after a trades trial with another seed, bit for bit what it is by itself
    # (repr: a NaN, such as the skipped AutoAttack's accuracy, equals no NaN)
    assert repr(after["sat"]) == repr(alone["sat"])
