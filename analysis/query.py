"""SQL over a study's tables: DuckDB views `epochs`, `samples`, `trials`.

``open_tables(DIR)`` (exported as ``analysis.open``) works on a study directory and on an
``energyat train`` output alike, and on a directory whose trials are still running: each
Parquet file is complete (atomic writes), so a query sees a consistent set of rows.
"""

from __future__ import annotations

import os
from pathlib import Path

import duckdb
import pyarrow as pa

from analysis.errors import QueryError, StoreError
from analysis.schema import TABLES

_GLOBS = {
    "epochs": "tables/epochs/trial=*/epoch-*.parquet",
    "samples": "tables/samples/trial=*/epoch-*.parquet",
    "trials": "tables/trials/trial=*.parquet",
}


def _sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def open_tables(directory: str | os.PathLike[str]) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with the views `epochs`, `samples` and `trials` of `directory`.

    Example::

        con = analysis.open("studies/quickstart")
        con.sql("select trial_id, max(test_robust_acc) from epochs group by 1").show()
    """
    root = Path(directory).expanduser()
    if not (root / "tables").is_dir():
        raise StoreError(
            f"{directory} holds no energyat tables (no tables/ folder); "
            "give a study directory or an `energyat train --out` directory"
        )
    con = duckdb.connect(":memory:")
    for view, pattern in _GLOBS.items():
        if any(root.glob(pattern)):
            source = (
                f"read_parquet({_sql_string(str(root.resolve() / pattern))}, "
                "union_by_name = true, hive_partitioning = false)"
            )
        else:  # no file yet: an empty view with the declared columns
            empty = pa.Table.from_pylist([], schema=TABLES[view])
            con.register(f"_empty_{view}", empty)
            source = f"_empty_{view}"
        con.execute(f"create view {view} as select * from {source}")
    return con


def run_query(directory: str | os.PathLike[str], sql: str) -> pa.Table:
    """Run one read-only SELECT over the views; anything else raises :class:`QueryError`."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise QueryError(f"bad SQL: {_one_line(exc)}") from exc
    if len(statements) != 1:
        raise QueryError(f"give exactly one SQL statement, got {len(statements)}")
    if statements[0].type != duckdb.StatementType.SELECT:
        raise QueryError(
            f"only read-only SELECT queries are allowed, got {statements[0].type.name}; "
            "the tables are not modified through `query`"
        )
    con = open_tables(directory)
    try:
        return con.sql(sql).to_arrow_table()
    except duckdb.Error as exc:
        raise QueryError(f"query failed: {_one_line(exc)}") from exc
    finally:
        con.close()


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())
