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

import fnmatch
import glob
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from analysis.errors import QueryError, StoreError, one_line
from analysis.schema import TABLES
from analysis.store import check_schema_version, is_uri, open_storage

_GLOBS = {
    "epochs": "tables/epochs/trial=*/epoch-*.parquet",
    "samples": "tables/samples/trial=*/epoch-*.parquet",
    "trials": "tables/trials/trial=*.parquet",
    "evals": "tables/evals/trial=*/eval-*.parquet",
}
_READERS = 8  # parallel GETs from an object store; each file is small


def _file_version(metadata: dict[bytes, bytes] | None) -> str | None:
    value = (metadata or {}).get(b"schema_version")
    return value.decode() if value is not None else None


def _sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _pattern(view: str, trial: str | None) -> str:
    return _GLOBS[view] if trial is None else _GLOBS[view].replace("trial=*", f"trial={glob.escape(trial)}")


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


def open_tables(directory: str | os.PathLike[str], *, trial: str | None = None) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with the views `epochs`, `samples` and `trials` of `directory`.

    Args:
        directory: a study directory or an ``energyat train --out`` directory, local or a URI.
        trial: only this trial's files (the same rows as ``where trial_id = ...``, read faster).

    Example::

        con = analysis.open("studies/quickstart")
        con.sql("select trial_id, max(test_robust_acc) from epochs group by 1").show()
    """
    if is_uri(directory):
        return _open_remote(str(directory), trial)
    root = Path(directory).expanduser().resolve()
    if not (root / "tables").is_dir():
        raise _no_tables(directory)
    con = sandboxed(root / "tables")
    for view in _GLOBS:
        pattern = _pattern(view, trial)
        first = next(root.glob(pattern), None)
        if first is not None:
            try:  # one footer per view tells which energyat wrote the directory
                check_schema_version(_file_version(pq.read_schema(first).metadata), where=str(directory))
            except (OSError, pa.ArrowInvalid):
                pass  # a damaged file: read_parquet below names it
            except StoreError:
                con.close()
                raise
            # the directory's own name may hold glob characters (`exp[1]` would also match `exp1`)
            source = (
                f"read_parquet({_sql_string(glob.escape(str(root)) + '/' + pattern)}, "
                "union_by_name = true, hive_partitioning = false)"
            )
        else:  # no file yet: an empty view with the declared columns
            source = _register_empty(con, view)
        try:  # union_by_name reads every file's footer here: a damaged file fails now
            con.execute(f"create view {view} as select * from {source}")
        except duckdb.Error as exc:
            con.close()
            # DuckDB's first line names the file; the rest quotes our SQL back
            raise _damaged(directory, str(exc).splitlines()[0]) from exc
    return con


def _damaged(directory: str | os.PathLike[str], problem: str) -> StoreError:
    return StoreError(
        f"cannot read the tables of {directory}: {problem}; move the damaged file out of tables/ "
        "to read the rest"
    )


def _no_tables(directory: str | os.PathLike[str]) -> StoreError:
    return StoreError(
        f"{directory} holds no energyat tables (no tables/ folder); "
        "give a study directory or an `energyat train --out` directory"
    )


def _register_empty(con: duckdb.DuckDBPyConnection, view: str) -> str:
    con.register(f"_empty_{view}", pa.Table.from_pylist([], schema=TABLES[view]))
    return f"_empty_{view}"


def _open_remote(directory: str, trial: str | None) -> duckdb.DuckDBPyConnection:
    """The views of a study on an object store, read into memory through pyarrow."""
    fs, root = open_storage(directory)
    if fs.get_file_info(f"{root}/tables").type != pafs.FileType.Directory:
        raise _no_tables(directory)
    con = sandboxed(None)
    with ThreadPoolExecutor(_READERS) as pool:
        try:
            for view in _GLOBS:
                # list only what the view can hold: one table's folder, or one trial's
                folder = f"tables/{view}" if trial is None or view == "trials" else f"tables/{view}/trial={trial}"
                found = fs.get_file_info(pafs.FileSelector(f"{root}/{folder}", recursive=True, allow_not_found=True))
                names = sorted(f.path[len(root) + 1:] for f in found if f.type == pafs.FileType.File)
                names = [name for name in names if fnmatch.fnmatchcase(name, _pattern(view, trial))]
                tables = list(pool.map(lambda name: _read_file(fs, root, name), names))
                source = _union_by_name(con, view, tables) if tables else _register_empty(con, view)
                con.execute(f"create view {view} as select * from {source}")
        except OSError as exc:
            con.close()
            raise StoreError(f"cannot read the tables of {directory}: {one_line(exc)}") from exc
        except pa.ArrowInvalid as exc:  # from _read_file: a damaged file, named
            con.close()
            raise _damaged(directory, one_line(exc)) from exc
        except StoreError:  # from _read_file: another schema version
            con.close()
            raise
    return con


def _read_file(fs: pafs.FileSystem, root: str, name: str) -> pa.Table:
    try:
        table = pq.read_table(f"{root}/{name}", filesystem=fs, partitioning=None)
    except pa.ArrowInvalid as exc:
        raise pa.ArrowInvalid(f"{name}: {one_line(exc)}") from exc
    check_schema_version(_file_version(table.schema.metadata), where=f"{root}/{name}")
    return table


def _union_by_name(con: duckdb.DuckDBPyConnection, view: str, tables: list[pa.Table]) -> str:
    """The files as one relation, columns matched by name as ``read_parquet(union_by_name)`` does.

    Files with the same schema are concatenated by pyarrow; the few distinct schemas (`trials`
    has config columns per method) are unioned by DuckDB, which promotes types as locally.
    """
    groups: dict[pa.Schema, list[pa.Table]] = {}
    for table in tables:
        table = table.replace_schema_metadata(None)
        groups.setdefault(table.schema, []).append(table)
    parts = []
    for i, group in enumerate(groups.values()):
        con.register(f"_{view}_{i}", pa.concat_tables(group))
        parts.append(f"select * from _{view}_{i}")
    return "(" + " union all by name ".join(parts) + ")"


def run_query(directory: str | os.PathLike[str], sql: str) -> pa.Table:
    """Run one read-only SELECT over the views; anything else raises :class:`QueryError`."""
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
    con = open_tables(directory)
    try:
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

