"""SQL over a study's tables: DuckDB views `epochs`, `samples`, `trials`, `evals`.

``open_tables(DIR)`` (exported as ``analysis.open``) works on a study directory and on an
``energyat train`` output alike, and on a directory whose trials are still running: each
Parquet file is complete (atomic writes), so a query sees a consistent set of rows.

``DIR`` may also be a URI (``s3://bucket/studies/NAME?endpoint_override=...``): its files are
listed and read through pyarrow's filesystem (DuckDB's httpfs extension is a download this
package does not rely on) and registered with DuckDB, so a query reads from memory.

Every connection is sandboxed (:func:`sandboxed`): it reads files under the directory's `tables/`
only (nothing at all for a URI), installs and loads no extension, and its configuration is locked,
so a query, whoever wrote it, cannot read other files, reach the network or change that.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Collection
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from analysis.errors import QueryError, StoreError, one_line
from analysis.schema import TABLES
from analysis.store import (
    SOURCE,
    TableFiles,
    check_name,
    check_schema_version,
    is_uri,
    no_tables,
    open_storage,
    part_conditions,
    read_rows,
    table_files,
)


def _file_version(metadata: dict[bytes, bytes] | None) -> str | None:
    value = (metadata or {}).get(b"schema_version")
    return value.decode() if value is not None else None


def _sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def sandboxed(tables: Path | None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection that may read files under `tables` and nothing else.

    DuckDB's table functions (read_csv, read_text, read_blob, glob, a quoted path after FROM)
    read any file the process can, and a query naming an https:// or s3:// path would download
    and load the httpfs extension (into ~/.duckdb) and then reach the network, the cloud's
    metadata service included. So: no extension is installed or loaded behind our back, file
    access is limited to `tables` (given twice: as a path, and glob-escaped as the views'
    patterns spell it, since DuckDB checks the pattern), spilling to disk is off (it would write
    a .tmp folder), and the configuration is then locked so that no statement can undo it.
    `tables=None` (a study on object storage, read into memory) allows no file at all.
    """
    con = duckdb.connect(":memory:", config={"autoinstall_known_extensions": False, "autoload_known_extensions": False})
    allowed = [] if tables is None else sorted({f"{tables}/", f"{glob.escape(str(tables))}/"})
    # the order matters: allowed_directories cannot be set once external access is off
    con.execute("set allowed_directories = $1", [allowed])
    con.execute("set temp_directory = ''")
    con.execute("set enable_external_access = false")
    con.execute("set lock_configuration = true")
    return con


def open_tables(directory: str | os.PathLike[str], *, trial: str | None = None,
                views: Collection[str] | None = None) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with the views `epochs`, `samples`, `trials` and `evals` of `directory`.

    Each view reads the rows that count (analysis.store.table_files): the loose files of running
    trials and the compacted parts of finished ones. Opening reads the footers of the loose files
    and parts only: a compacted study opens in a few file reads, whatever its number of epochs.

    Args:
        directory: a study directory or an ``energyat train --out`` directory, local or a URI.
        trial: only this trial's rows (the same rows as ``where trial_id = ...``, read faster:
            only its loose files are listed, and the parts' row groups of other trials are skipped).
        views: only these views (default all four): a lookup in `trials` lists no epoch file.

    Example::

        con = analysis.open("studies/quickstart")
        con.sql("select trial_id, max(test_robust_acc) from epochs group by 1").show()
    """
    if trial is not None:
        check_name(trial, "trial")
    chosen = [view for view in TABLES if views is None or view in views]
    if is_uri(directory):
        return _open_remote(str(directory), trial, chosen)
    root = Path(directory).expanduser().resolve()
    if not (root / "tables").is_dir():
        raise no_tables(directory)
    con = sandboxed(root / "tables")
    fs = pafs.LocalFileSystem()
    for view in chosen:
        try:
            files = table_files(fs, str(root), view, trial=trial)
            _check_version(files, where=str(directory))
            # binding reads each file's footer (union_by_name): a damaged file fails now
            con.execute(f"create view {view} as {_local_source(con, view, files, trial)}")
        except duckdb.Error as exc:
            con.close()
            # DuckDB's first line names the file; the rest quotes our SQL back
            raise _damaged(directory, str(exc).splitlines()[0]) from exc
        except StoreError:
            con.close()
            raise
        except (pa.ArrowInvalid, OSError) as exc:  # a part's footer (its trial list) unreadable
            con.close()
            raise _damaged(directory, one_line(exc)) from exc
    return con


def _check_version(files: TableFiles, *, where: str) -> None:
    """One footer per view tells which energyat wrote the directory."""
    first = files.parts[0].path if files.parts else (files.loose[0] if files.loose else None)
    if first is None:
        return
    try:
        metadata = pq.read_schema(first).metadata
    except (OSError, pa.ArrowInvalid):
        return  # a damaged file: reading the view names it
    check_schema_version(_file_version(metadata), where=where)


def _local_source(con: duckdb.DuckDBPyConnection, view: str, files: TableFiles, trial: str | None) -> str:
    """The SQL that reads `view`'s rows that count: the loose files (an explicit list, so that a
    file a compaction removes after the listing fails the query rather than vanish from it) and
    each part, filtered where a newer part or a loose file holds some of its rows."""
    selects = []
    if files.loose:
        files_sql = ", ".join(_sql_string(glob.escape(name)) for name in files.loose)
        selects.append(f"select * from read_parquet([{files_sql}], union_by_name = true, hive_partitioning = false)")
    for part in files.parts:
        where = [f"{column} = {_sql_string(values[0])}" if wanted and len(values) == 1
                 else f"{column} {'in' if wanted else 'not in'} ({', '.join(map(_sql_string, values))})"
                 for column, wanted, values in part_conditions(part, trial=trial)]
        selects.append(f"select * exclude ({SOURCE}) from read_parquet({_sql_string(glob.escape(part.path))}, hive_partitioning = false)"
                       + (f" where {' and '.join(where)}" if where else ""))
    if not selects:  # no file yet: an empty view with the declared columns
        return f"select * from {_register_empty(con, view)}"
    return " union all by name ".join(f"({s})" for s in selects)


def _damaged(directory: str | os.PathLike[str], problem: str) -> StoreError:
    return StoreError(
        f"cannot read the tables of {directory}: {problem}; move the damaged file out of tables/ "
        "to read the rest"
    )


def _register_empty(con: duckdb.DuckDBPyConnection, view: str) -> str:
    con.register(f"_empty_{view}", pa.Table.from_pylist([], schema=TABLES[view]))
    return f"_empty_{view}"


def _open_remote(directory: str, trial: str | None, views: list[str]) -> duckdb.DuckDBPyConnection:
    """The views of a study on an object store, read into memory through pyarrow
    (analysis.store.read_rows: the rows that count, 8 files at a time)."""
    fs, root = open_storage(directory)
    if fs.get_file_info(f"{root}/tables").type != pafs.FileType.Directory:
        raise no_tables(directory)
    con = sandboxed(None)
    try:
        for view in views:
            con.register(f"_{view}", read_rows(directory, table=view, trial=trial))
            con.execute(f"create view {view} as select * from _{view}")
    except OSError as exc:
        con.close()
        raise StoreError(f"cannot read the tables of {directory}: {one_line(exc)}") from exc
    except pa.ArrowInvalid as exc:  # a damaged file, named
        con.close()
        raise _damaged(directory, one_line(exc)) from exc
    except StoreError:  # another schema version
        con.close()
        raise
    return con


def run_query(directory: str | os.PathLike[str], sql: str, *, trial: str | None = None) -> pa.Table:
    """Run one read-only SELECT over the views (of `trial` only, if given: :func:`open_tables`);
    anything else raises :class:`QueryError`."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise QueryError(f"bad SQL: {one_line(exc)}") from exc
    if len(statements) != 1:
        raise QueryError(f"give exactly one SQL statement, got {len(statements)}")
    if statements[0].type != duckdb.StatementType.SELECT:
        raise QueryError(
            f"only read-only SELECT queries are allowed, got {statements[0].type.name}; "
            "the tables are not modified through `query`"
        )
    # the views the statement names (a word match: one named in a string or a comment opens for nothing)
    named = [view for view in TABLES if re.search(rf"\b{view}\b", sql, flags=re.IGNORECASE)]
    # with `trial`, its `trials` row too: every trial with rows has one, so a mistyped id is told
    # apart from a trial with no matching rows
    con = open_tables(directory, views=named if trial is None else [*named, "trials"], trial=trial)
    try:
        if trial is not None and con.execute("select count(*) from trials").fetchall() == [(0,)]:
            raise QueryError(f"no trial `{trial}` in {directory}; `energyat status {directory}` lists its trials")
        return con.sql(sql).to_arrow_table()
    except duckdb.PermissionException as exc:
        raise QueryError(
            f"query refused: {one_line(exc)}; a query reads the views epochs, samples, trials and evals of {directory}, "
            "no other file and no network"
        ) from exc
    except duckdb.Error as exc:
        raise QueryError(f"query failed: {one_line(exc)}") from exc
    finally:
        con.close()

