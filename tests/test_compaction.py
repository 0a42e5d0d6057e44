"""Compaction (analysis/compaction.py): finished trials' loose files become parts, and at every
point between its steps, as a kill would leave it, each row counts exactly once."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import energyat_cmd
from test_store import _row

from analysis.compaction import compact, steps
from analysis.query import open_tables
from analysis.schema import EVALS, SAMPLES
from analysis.store import read_rows, read_trial_outcome, read_trial_rows, write_epoch_rows, write_eval_rows, write_trial_row

VIEWS = ("epochs", "samples", "trials", "evals")
COMPACT_KILLS = (0.5, 0.7, 0.8, 0.9, 0.95)  # when `energyat compact` is killed, as fractions of its run (docs/reliability.md)


def _sample(trial: str, epoch: int) -> dict[str, list[Any]]:
    row: dict[str, Any] = {name: 0.25 for name in SAMPLES.names}
    row.update(study="s", trial_id=trial, epoch=epoch, split="train", label=1, correct=True, correct_adv=False)
    return {k: [0, 1] if k == "index" else [v, v] for k, v in row.items()}


def _eval(trial: str) -> dict[str, list[Any]]:
    row: dict[str, Any] = {name: None for name in EVALS.names}
    row.update(study="s", trial_id=trial, attack="pgd", n=10, correct=5, accuracy=0.5, steps=20, eps=0.1, seed=0)
    return {k: [v] for k, v in row.items()}


def write_trial(root: Path, trial: str, *, epochs: int, status: str, loss: float = 1.0, method: str = "sat") -> None:
    """What a trial writes: an epochs and a samples file per epoch, its trials row, its final evaluation."""
    for epoch in range(epochs):
        write_epoch_rows(str(root), table="epochs", trial_id=trial, epoch=epoch, columns=_row(trial, epoch, loss + epoch), provenance={})
        write_epoch_rows(str(root), table="samples", trial_id=trial, epoch=epoch, columns=_sample(trial, epoch), provenance={})
    config = {"method": method} | ({"beta": 6.0} if method == "trades" else {})
    outcome = {"study": "s", "trial_id": trial, "status": status, "epochs_run": epochs}
    write_trial_row(str(root), trial_id=trial, outcome=outcome, config=config, provenance={})
    if status != "RUNNING":
        write_eval_rows(str(root), trial_id=trial, key="pgd", columns=_eval(trial), provenance={})


def snapshot(root: Path, *, trial: str | None = None) -> dict[str, list[tuple[Any, ...]]]:
    """Every view's rows, sorted, as a reader sees them."""
    con = open_tables(root, trial=trial)
    try:
        views = {view: con.sql(f"select * from {view}").to_arrow_table() for view in VIEWS}
    finally:
        con.close()
    # the rule rendered for pyarrow (the engine's and the driver's reads, and every read on S3)
    # selects the same rows as its rendering in the views' SQL
    for view, table in views.items():
        assert _as_records(read_rows(str(root), table=view, trial=trial)) == _as_records(table), view
    return {view: sorted(map(tuple, zip(*table.to_pydict().values(), strict=True)), key=repr) for view, table in views.items()}


def _as_records(table: pa.Table) -> list[str]:
    """The rows, column order aside, comparable (NaN included) and sorted."""
    return sorted(repr(sorted(row.items())) for row in table.to_pylist())


def loose_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in (root / "tables").rglob("*.parquet") if "parts" not in p.parts)


def parts(root: Path, table: str) -> list[Path]:
    return sorted((root / "tables" / table / "parts").glob("part-*.parquet"))


@pytest.fixture
def study(tmp_path: Path) -> Path:
    root = tmp_path / "study"
    write_trial(root, "a", epochs=4, status="TERMINATED")
    write_trial(root, "b", epochs=3, status="ERROR", method="trades")
    write_trial(root, "c", epochs=2, status="RUNNING")
    write_trial(root, "d", epochs=2, status="TERMINATED", method="trades")
    return root


def test_compaction_leaves_the_same_rows_and_only_running_trials_loose(study: Path) -> None:
    before = snapshot(study)
    done = compact(str(study))
    assert snapshot(study) == before
    assert {t: c.trials for t, c in done.items()} == {"epochs": 2, "samples": 2, "trials": 2, "evals": 2}
    # the running trial keeps its files, and so does the failed one (`resume --retry-errored`
    # moves its files aside); each table of the finished ones is one part
    assert loose_files(study) == sorted(
        [f"tables/{t}/trial={trial}/epoch-000{e}.parquet" for t in ("epochs", "samples") for trial, n in (("b", 3), ("c", 2)) for e in range(n)]
        + ["tables/evals/trial=b/eval-pgd.parquet", "tables/trials/trial=b.parquet", "tables/trials/trial=c.parquet"]
    )
    assert all(len(parts(study, table)) == 1 for table in VIEWS)
    assert not (study / "tables/epochs/trial=a").exists()  # emptied folders go too
    # the pyarrow readers the engine and the driver use see the same
    assert read_trial_rows(str(study), table="epochs", trial_id="a", columns=["epoch", "train_loss"]) == {
        "epoch": [0, 1, 2, 3], "train_loss": [1.0, 2.0, 3.0, 4.0]}
    assert read_trial_outcome(str(study), "a")["status"] == "TERMINATED"  # type: ignore[index]
    # the trials view keeps each method's config columns, matched by name
    assert sorted(snapshot(study)["trials"]) == sorted(before["trials"])
    assert open_tables(study).sql("select trial_id, beta from trials order by 1").fetchall() == [("a", None), ("b", 6.0), ("c", None), ("d", 6.0)]


def test_one_trial_queries_read_the_same_rows_from_parts_and_loose_files(study: Path) -> None:
    compact(str(study), trials=["a"])
    whole = open_tables(study)
    for trial in ("a", "b", "c", "d"):
        one = open_tables(study, trial=trial)
        for view in VIEWS:
            got = one.sql(f"select * from {view}").to_arrow_table()
            # the trials view of one trial has its own config columns only (a's has no `beta`)
            expected = whole.sql(f"select {', '.join(got.column_names)} from {view} where trial_id = $t", params={"t": trial})
            assert sorted(map(repr, got.to_pylist())) == sorted(map(repr, expected.to_arrow_table().to_pylist())), (trial, view)
            assert got.num_rows > 0 or view == "evals"


def test_query_trial_reads_one_trials_rows_and_refuses_a_bad_id_in_one_line(study: Path) -> None:
    compact(str(study), trials=["a"])
    sql = "select trial_id, count(*) from epochs group by 1 order by 1"
    for trial, count in (("a", 4), ("c", 2)):  # from a part, from loose files
        done = subprocess.run([*energyat_cmd(), "query", str(study), sql, "--trial", trial, "--format", "csv"],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines()[1:] == [f'"{trial}",{count}'], done.stdout
    for bad in ("../a", "a' or 1=1 --", "nosuch"):  # a name refused, a name quoted, a trial the study lacks
        done = subprocess.run([*energyat_cmd(), "query", str(study), sql, "--trial", bad], capture_output=True, text=True, timeout=300)
        assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1 and "trial" in done.stderr, done.stderr


def test_every_crash_point_of_a_compaction_and_of_a_merge_counts_each_row_once(study: Path, tmp_path: Path) -> None:
    compact(str(study), trials=["a"])  # a part holding a, so that the merge below has two to merge
    before = snapshot(study)
    total = len(list(steps(str(shutil.copytree(study, tmp_path / "count")), merge=True)))
    assert total > 8  # a part written, loose files and a part deleted, per table
    for k in range(total):
        crashed = shutil.copytree(study, tmp_path / f"crash{k}")
        run = steps(str(crashed), merge=True)
        for _ in range(k + 1):  # then stop, as a kill would: no cleanup runs
            next(run)
        assert snapshot(crashed) == before, f"after step {k + 1} of {total}"
        assert read_trial_rows(str(crashed), table="epochs", trial_id="a", columns=["epoch"]) == {"epoch": [0, 1, 2, 3]}
        compact(str(crashed), merge=True)  # the next compaction finishes the job
        assert snapshot(crashed) == before
        assert all(len(parts(crashed, table)) == 1 for table in VIEWS), f"after step {k + 1}"


def test_a_loose_file_written_after_compaction_overrides_the_part(study: Path) -> None:
    # trial a run again from a checkpoint (a driver killed before it recorded the trial done):
    # its epoch 2 is written again, with other numbers, and so is its trials row
    compact(str(study))
    write_epoch_rows(str(study), table="epochs", trial_id="a", epoch=2, columns=_row("a", 2, 9.5), provenance={})
    write_trial_row(str(study), trial_id="a", outcome={"study": "s", "trial_id": "a", "status": "RUNNING", "epochs_run": 2},
                    config={"method": "sat"}, provenance={})
    rows = open_tables(study).sql("select epoch, train_loss from epochs where trial_id = 'a' order by 1").fetchall()
    assert rows == [(0, 1.0), (1, 2.0), (2, 9.5), (3, 4.0)]
    assert read_trial_outcome(str(study), "a")["status"] == "RUNNING"  # type: ignore[index]
    compact(str(study))  # a is running again: left as it is
    assert "tables/epochs/trial=a/epoch-0002.parquet" in loose_files(study)
    write_trial_row(str(study), trial_id="a", outcome={"study": "s", "trial_id": "a", "status": "TERMINATED", "epochs_run": 4},
                    config={"method": "sat"}, provenance={})
    compact(str(study), merge=False)  # a second part holds a's new rows; the first still holds its old ones
    assert len(parts(study, "epochs")) == 2
    assert open_tables(study).sql("select epoch, train_loss from epochs where trial_id = 'a' order by 1").fetchall() == rows
    assert read_trial_rows(str(study), table="epochs", trial_id="a", columns=["train_loss"])["train_loss"] == [1.0, 2.0, 9.5, 4.0]
    assert "tables/epochs/trial=a/epoch-0002.parquet" not in loose_files(study)
    compact(str(study), merge=True)
    assert open_tables(study).sql("select epoch, train_loss from epochs where trial_id = 'a' order by 1").fetchall() == rows
    assert all(len(parts(study, table)) == 1 for table in VIEWS)


def test_a_loose_file_rewritten_while_it_is_compacted_is_kept(study: Path) -> None:
    # the part is written, then trial a rewrites its epoch 1 before the compaction deletes it
    run = steps(str(study), merge=True)
    first = next(run)
    assert first.table == "epochs" and first.part is not None
    write_epoch_rows(str(study), table="epochs", trial_id="a", epoch=1, columns=_row("a", 1, 7.5), provenance={})
    for _ in run:
        pass
    assert "tables/epochs/trial=a/epoch-0001.parquet" in loose_files(study)
    assert open_tables(study).sql("select train_loss from epochs where trial_id = 'a' and epoch = 1").fetchall() == [(7.5,)]


def test_compacting_one_trial_at_a_time_merges_once_there_are_many_parts(tmp_path: Path) -> None:
    from analysis.compaction import MAX_PARTS

    for i in range(MAX_PARTS + 2):
        write_trial(tmp_path, f"t{i}", epochs=2, status="TERMINATED")
        compact(str(tmp_path), trials=[f"t{i}"])
        assert 1 <= len(parts(tmp_path, "epochs")) <= MAX_PARTS
    assert open_tables(tmp_path).execute("select count(*), count(distinct trial_id) from epochs").fetchone() == (2 * (MAX_PARTS + 2), MAX_PARTS + 2)
    # each part holds whole trials, sorted, and says which in its footer
    meta = pq.read_metadata(parts(tmp_path, "epochs")[-1]).metadata
    assert b"energyat.trials" in meta


def test_energyat_compact_killed_at_any_moment_loses_and_doubles_nothing(tmp_path: Path) -> None:
    root = tmp_path / "study"
    for i in range(30):
        write_trial(root, f"t{i:02d}", epochs=6, status="TERMINATED")
    before = snapshot(root)
    cmd = [*energyat_cmd(), "compact", str(root)]
    # kill it at several moments of its run: from before it starts to after it is done
    start = time.monotonic()
    probe = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    whole = time.monotonic() - start
    assert probe.returncode == 0, probe.stderr
    assert "compacted" in probe.stdout
    assert snapshot(root) == before
    for i, fraction in enumerate(COMPACT_KILLS):
        fresh = tmp_path / f"fresh{i}"
        for j in range(30):
            write_trial(fresh, f"t{j:02d}", epochs=6, status="TERMINATED")
        proc = subprocess.Popen(cmd[:-1] + [str(fresh)], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(whole * fraction)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        assert snapshot(fresh) == before, f"killed at {fraction:.0%} of a run"
        assert subprocess.run(cmd[:-1] + [str(fresh)], cwd=tmp_path, capture_output=True, timeout=300).returncode == 0
        assert snapshot(fresh) == before
        assert loose_files(fresh) == []


def test_a_compacted_trial_set_aside_leaves_every_view_and_keeps_its_rows(study: Path, tmp_path: Path) -> None:
    # what `resume` does to a trial Ray Tune never recorded (study.recovery), once the driver has
    # compacted it: its rows go under lost/ and out of the views, the other trials' stay
    from analysis.compaction import set_aside
    from analysis.store import read_rows

    before = snapshot(study)
    compact(str(study))
    lost = study / "lost"
    assert set_aside(str(study), "a", str(lost)) == 4 + 8 + 1 + 1  # epochs, samples, trials, evals rows
    after = snapshot(study)
    assert after == {view: [r for r in rows if r[1] != "a"] for view, rows in before.items()}
    kept = read_rows(str(lost), table="epochs", trial="a", columns=["epoch", "train_loss"])
    assert kept.to_pydict() == {"epoch": [0, 1, 2, 3], "train_loss": [1.0, 2.0, 3.0, 4.0]}
    # a merge keeps it out, and a second set-aside finds nothing left to move
    compact(str(study), merge=True)
    assert snapshot(study) == after
    assert read_rows(str(study), table="trials", trial="a").num_rows == 0
