"""A study's trials read back for the commands that summarise them (`status`, `phases`,
`report`): the rows as Python values, each trial's epoch columns, and its phases. No matplotlib,
no scipy: `energyat status` imports this, not the report."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, cast

import duckdb
import numpy as np

from analysis.errors import StoreError
from analysis.phases import DETECTOR_COLUMNS, PhaseResult, detect
from analysis.query import open_tables


def columns(rows: Any) -> dict[str, np.ndarray]:
    """Rows as a dict of numpy columns: from a pyarrow Table, a mapping of sequences or a DataFrame.

    Nulls become NaN in numeric columns and None in the others.
    """
    if hasattr(rows, "column_names") and hasattr(rows, "column"):  # pyarrow Table
        return {name: _to_numpy(rows.column(name)) for name in rows.column_names}
    if isinstance(rows, Mapping):
        return {str(k): np.asarray(v) for k, v in rows.items()}
    if hasattr(rows, "columns"):  # a pandas DataFrame, without importing pandas
        return {str(k): np.asarray(rows[k]) for k in rows.columns}
    raise TypeError(f"expected a pyarrow Table or a mapping of columns, got {type(rows).__name__}")


def _to_numpy(column: Any) -> np.ndarray:
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_integer(column.type) or pa.types.is_floating(column.type):
        return np.asarray(pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False), dtype=float)
    return np.asarray(column.to_pylist(), dtype=object)


def fetch(con: duckdb.DuckDBPyConnection, sql: str, **params: Any) -> dict[str, Any]:
    return columns(con.sql(sql, params=params or None).to_arrow_table())


def rows_of(cols: Mapping[str, Any]) -> list[dict[str, Any]]:
    n = len(next(iter(cols.values()))) if cols else 0
    return [{k: plain(v[i]) for k, v in cols.items()} for i in range(n)]


def plain(value: Any) -> Any:
    """numpy scalars as Python values; NaN stays NaN."""
    return value.item() if hasattr(value, "item") else value


def missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def int_or_none(value: Any) -> int | None:
    return None if missing(value) else int(value)


def trial_rows(con: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    """The `trials` rows, plus a bare row for a trial with `epochs` rows but no `trials` row yet."""
    rows = rows_of(fetch(con, "select * from trials"))
    known = {r["trial_id"] for r in rows}
    for r in rows_of(fetch(con, "select trial_id, any_value(method) as method, count(*) as epochs_run from epochs group by 1")):
        if r["trial_id"] not in known:
            rows.append({**r, "status": "RUNNING"})
    return rows


def epochs_by_trial(con: duckdb.DuckDBPyConnection, ids: Sequence[str], columns: Sequence[str] | None = None) -> dict[str, dict[str, np.ndarray]]:
    """The `epochs` rows of each of `ids` (`columns` only, if given; none for a trial without
    rows), sorted by epoch: one scan of the table, not a query per trial (1,000 trials would be
    1,000 scans of a part)."""
    wanted = "*" if columns is None else ", ".join(dict.fromkeys(["trial_id", *columns]))
    cols = fetch(con, f"select {wanted} from epochs where list_contains($ids, trial_id) order by trial_id, epoch", ids=list(ids))
    found = cols["trial_id"]
    starts = [0, *(np.flatnonzero(found[1:] != found[:-1]) + 1).tolist(), len(found)] if len(found) else [0]
    spans = {str(found[a]): (a, b) for a, b in zip(starts[:-1], starts[1:], strict=True)}
    return {tid: {k: v[slice(*spans.get(tid, (0, 0)))] for k, v in cols.items()} for tid in ids}


def phases_of(epochs: Mapping[str, Any]) -> PhaseResult:
    # the detector's own columns, so that offline labels replay exactly what the stopper saw
    return detect({name: epochs[name] for name in DETECTOR_COLUMNS})


def phases_table(directory: str | os.PathLike[str], trial: str | None = None, *, recorded: bool = False) -> list[dict[str, Any]]:
    """Offline phases and the robust-overfitting onset of every trial (or of one), by trial id.

    Each row: ``trial_id, method, epochs, phase2_start, phase3_start`` (offline
    :func:`analysis.phases.detect` on the trial's `epochs` rows), ``alarm_epoch`` (the online
    alarm as recorded during training), ``best_epoch, best_val_robust_acc``.

    With `recorded`, a TERMINATED trial's phases are those its `trials` row recorded when it
    finished (the same detector on the same rows, unless the detector changed since) and its
    epochs are not read: `energyat status` of 1,000 finished trials reads the `trials` table and
    the running trials' epochs only. Without it (`energyat phases`, the report), every trial's
    phases are detected now.

    Raises:
        StoreError: `directory` holds no tables, or `trial` is not one of its trial ids.
    """
    con = open_tables(directory, views=("trials", "epochs"))
    try:
        return phases_rows(con, trial, recorded=recorded, where=directory)
    finally:
        con.close()


def phases_rows(con: duckdb.DuckDBPyConnection, trial: str | None = None, *, recorded: bool = False,
                where: str | os.PathLike[str] = "the study") -> list[dict[str, Any]]:
    """:func:`phases_table` on tables already open (`energyat status` reads the same connection
    for its counts); `where` names them in the error for an unknown `trial`."""
    trials = {r["trial_id"]: r for r in trial_rows(con)}
    ids = sorted(trials)
    if trial is not None:
        if trial not in trials:
            known = ", ".join(ids) if ids else "none yet"
            raise StoreError(f"no trial `{trial}` in {where}; known trial ids: {known}")
        ids = [trial]
    done = {tid for tid in ids if recorded and trials[tid].get("status") == "TERMINATED"}
    by_trial = epochs_by_trial(con, [tid for tid in ids if tid not in done], [*DETECTOR_COLUMNS, "alarm"])
    out = []
    for tid in ids:
        row = trials[tid]
        if tid in done:
            found = {"epochs": int_or_none(row.get("epochs_run")), "phase2_start": int_or_none(row.get("phase2_start")),
                     "phase3_start": int_or_none(row.get("phase3_start")), "alarm_epoch": int_or_none(row.get("alarm_epoch"))}
        else:
            epochs = by_trial[tid]
            phases = phases_of(epochs)
            found = {"epochs": len(epochs["epoch"]), "phase2_start": phases.phase2_start, "phase3_start": phases.phase3_start,
                     "alarm_epoch": online_alarm_epoch(epochs, phases)}
        best = row.get("best_val_robust_acc")
        out.append({"trial_id": tid, "method": row.get("method"), **found, "best_epoch": int_or_none(row.get("best_epoch")),
                    "best_val_robust_acc": None if missing(best) else float(cast(float, best))})
    return out


def online_alarm_epoch(epochs: Mapping[str, np.ndarray], phases: PhaseResult) -> int | None:
    """First epoch whose `alarm` was raised during training (as the stopper saw it).

    Falls back on the alarm of the online rule replayed by :func:`analysis.phases.detect` when
    the rows have no `alarm` column.
    """
    if "alarm" not in epochs:
        return phases.alarm_epoch
    raised = [int(e) for e, a in zip(epochs["epoch"], epochs["alarm"], strict=True) if a is not None and bool(a)]
    return min(raised) if raised else None
