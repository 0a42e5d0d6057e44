"""The Parquet store: one row per (trial, epoch) however often it is written; readers never see half a file."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from analysis.errors import QueryError, StoreError
from analysis.query import open_tables, run_query
from analysis.schema import EPOCHS
from analysis.store import remove_stale_temporaries, write_epoch_rows, write_trial_row


def _row(trial: str, epoch: int, loss: float) -> dict[str, list[object]]:
    row: dict[str, object] = {name: 0.5 for name in EPOCHS.names}
    row.update(study="s", trial_id=trial, epoch=epoch, method="sat", phase=1, alarm=False, alarm_reason=None, probed=True, train_loss=loss)
    return {k: [v] for k, v in row.items()}


def test_rewriting_an_epoch_leaves_one_row(tmp_path: Path) -> None:
    for loss in (1.0, 2.0, 3.0):
        write_epoch_rows(str(tmp_path), table="epochs", trial_id="a", epoch=4, columns=_row("a", 4, loss), provenance={})
    rows = open_tables(tmp_path).execute("select epoch, train_loss from epochs").fetchall()
    # the last write wins and there is exactly one row for (a, 4)
    assert rows == [(4, 3.0)]
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


def test_rewriting_an_epoch_removes_the_temporary_file_of_a_killed_writer(tmp_path: Path) -> None:
    # what a worker SIGKILLed inside pq.write_table leaves: a hidden, half-written file beside
    # the one it was replacing; the restarted trial's rewrite of that epoch removes it
    write_epoch_rows(str(tmp_path), table="epochs", trial_id="a", epoch=3, columns=_row("a", 3, 1.0), provenance={})
    folder = tmp_path / "tables" / "epochs" / "trial=a"
    stale = folder / ".epoch-0003.parquet.0123456789abcdef.tmp"
    stale.write_bytes(b"PAR1 half a file")
    other = folder / ".epoch-0004.parquet.0123456789abcdef.tmp"  # another epoch's: not this write's to judge
    other.write_bytes(b"PAR1")
    write_epoch_rows(str(tmp_path), table="epochs", trial_id="a", epoch=3, columns=_row("a", 3, 2.0), provenance={})
    assert sorted(p.name for p in folder.iterdir()) == [other.name, "epoch-0003.parquet"]
    assert open_tables(tmp_path).execute("select train_loss from epochs").fetchall() == [(2.0,)]


def test_stale_temporaries_of_a_file_never_written_again_are_removed_once_no_trial_runs(tmp_path: Path) -> None:
    # a trials row whose write a SIGKILL cut short, of a trial that then finished without rewriting
    # that file: only the sweep after the fit (study.runner._fit) removes it
    write_epoch_rows(str(tmp_path), table="epochs", trial_id="a", epoch=0, columns=_row("a", 0, 1.0), provenance={})
    tables = tmp_path / "tables"
    stale = [tables / "trials" / ".trial=a.parquet.0123456789abcdef.tmp", tables / "epochs" / "trial=a" / ".epoch-0001.parquet.feed.tmp"]
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"PAR1 half a file")
    assert remove_stale_temporaries(tmp_path) == 2
    assert [p.name for p in tables.rglob("*") if p.is_file()] == ["epoch-0000.parquet"]
    assert open_tables(tmp_path).execute("select train_loss from epochs").fetchall() == [(1.0,)]
    assert remove_stale_temporaries(tmp_path / "not-a-study") == 0


def test_a_column_outside_the_schema_is_refused(tmp_path: Path) -> None:
    cols = _row("a", 0, 1.0) | {"surprise": [1]}
    with pytest.raises(ValueError, match="surprise"):
        write_epoch_rows(str(tmp_path), table="epochs", trial_id="a", epoch=0, columns=cols, provenance={})


def test_trial_rows_union_across_trials_with_different_config_keys(tmp_path: Path) -> None:
    outcome = {"study": "s", "status": "TERMINATED", "epochs_run": 3}
    write_trial_row(str(tmp_path), trial_id="a", outcome=outcome | {"trial_id": "a"}, config={"method": "sat"}, provenance={})
    write_trial_row(str(tmp_path), trial_id="b", outcome=outcome | {"trial_id": "b"}, config={"method": "trades", "beta": 6.0}, provenance={})
    rows = open_tables(tmp_path).execute("select trial_id, method, beta from trials order by trial_id").fetchall()
    assert rows == [("a", "sat", None), ("b", "trades", 6.0)]


def test_empty_tables_have_their_declared_columns(tmp_path: Path) -> None:
    (tmp_path / "tables").mkdir()
    con = open_tables(tmp_path)
    assert [d[0] for d in con.execute("select * from epochs").description] == EPOCHS.names
    assert con.execute("select count(*) from samples").fetchone() == (0,)


def test_not_a_results_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no energyat tables"):
        open_tables(tmp_path)


def test_only_select_is_allowed(tmp_path: Path) -> None:
    (tmp_path / "tables").mkdir()
    for sql in ("create table x (a int)", "copy epochs to 'x.csv'", "select 1; select 2", "drop view epochs"):
        with pytest.raises(QueryError):
            run_query(tmp_path, sql)


def test_reader_sees_consistent_tables_while_a_writer_runs(tmp_path: Path) -> None:
    # a writer process keeps rewriting 40 epochs (each twice per pass) until told to stop, while
    # this process queries: every query succeeds, sees at most one row per epoch, and never a row
    # count that goes down. The writer runs until the reader has made its 20 queries, so the test
    # does not depend on which of the two is faster on a loaded machine.
    stop = tmp_path / "stop"
    writer = textwrap.dedent(
        f"""
        import pathlib, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_store import _row
        from analysis.store import write_epoch_rows
        stop = pathlib.Path({str(stop)!r})
        while not stop.exists():
            for epoch in range(40):
                for loss in (1.0, 2.0):
                    write_epoch_rows({str(tmp_path)!r}, table="epochs", trial_id="w", epoch=epoch, columns=_row("w", epoch, loss), provenance={{}})
        """
    )
    (tmp_path / "tables").mkdir()
    proc = subprocess.Popen([sys.executable, "-c", writer])
    seen: list[int] = []
    deadline = time.monotonic() + 120
    try:
        while len(seen) < 20 and time.monotonic() < deadline:
            assert proc.poll() is None, "the writer process died"
            con = open_tables(tmp_path)
            total, distinct = con.execute("select count(*), count(distinct epoch) from epochs").fetchone()
            con.close()
            assert total == distinct
            if total or seen:  # count from the writer's first visible row
                seen.append(total)
    finally:
        stop.touch()
    assert proc.wait(timeout=60) == 0
    assert len(seen) == 20 and seen == sorted(seen)
    assert open_tables(tmp_path).execute("select count(*) from epochs").fetchone() == (40,)
