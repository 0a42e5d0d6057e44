"""The Parquet store: one file per (table, trial, epoch), written atomically, and compacted parts.

Layout (docs/design.md section 3), under a study or train-output directory ``root``::

    tables/epochs/trial=<id>/epoch-<NNNN>.parquet     (a "loose" file: one row, or one epoch's rows)
    tables/samples/trial=<id>/epoch-<NNNN>.parquet
    tables/trials/trial=<id>.parquet
    tables/evals/trial=<id>/eval-<key>.parquet
    tables/<table>/parts/part-<time>-<random>.parquet (compacted rows of finished trials)

A part (analysis/compaction.py) holds the rows of whole trials, each tagged with the loose file it
came from (``_source``), and lists its trials in its metadata. Which copy of a row counts is one
rule, :func:`table_files`: a loose file always counts; a part's rows of a trial count only if no
newer part holds that trial, and minus the sources a loose file still holds. Compaction writes
its part before it deletes anything, so a crash between any two of its steps leaves every row
counted exactly once.

``root`` is a local path or a pyarrow filesystem URI (s3://, gs://). A file is written under a
hidden temporary name and renamed into place, so a reader never sees half a file and rewriting
the same (trial, epoch) replaces the row instead of adding one. On object stores a PUT is
already atomic, so the file is written in one go under its final name.

Every file carries ``schema_version`` and the trial's provenance (config, git SHA, package
versions) in its Parquet metadata.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

if TYPE_CHECKING:
    import pyarrow.dataset as ds

from analysis.errors import EnergyatError, StoreError, one_line
from analysis.schema import SCHEMA_VERSION, TABLES, TRIAL_OUTCOME, config_column

# Names that become one folder or file name (study names, trial ids, evaluated models): letters,
# digits, `_`, `.` and `-`, starting with a letter or a digit. So never a separator, `..`, a glob
# character, a newline or a query string: a name cannot leave its folder or match another's files.
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def check_name(name: object, what: str) -> str:
    """`name` if it matches :data:`SAFE_NAME`, else one line saying what is allowed."""
    if not isinstance(name, str) or SAFE_NAME.fullmatch(name) is None:
        raise EnergyatError(f"{what} {name!r}: use 1-128 letters, digits, `_`, `.` or `-`, starting with a letter or digit (it names a folder)")
    return name


def is_uri(location: str | os.PathLike[str]) -> bool:
    """True for a filesystem URI (s3://bucket/prefix, gs://...), False for a local path."""
    return "://" in str(location)


def join(location: str | os.PathLike[str], *parts: str) -> str:
    """``location/part/...`` for a local path or a URI; a URI keeps its query, such as
    ``?endpoint_override=127.0.0.1:9000&scheme=http``, which pyarrow reads from the URI's end."""
    if not is_uri(location):
        return str(Path(location).joinpath(*parts))
    url = urlsplit(str(location))
    return urlunsplit(url._replace(path="/".join([url.path.rstrip("/"), *parts])))


@lru_cache(maxsize=16)
def _from_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    # one filesystem (one S3 client) per URI and process: a trial writes a few files per epoch
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, OSError) as exc:
        raise StoreError(f"cannot open storage {uri}: {one_line(exc)}") from exc


# Query parameters of pyarrow's filesystem URIs that carry a secret.
_SECRET_PARAMETERS = ("access_key", "secret_key", "session_token", "credential")


def _check_no_credentials(uri: str) -> None:
    """Refuse a URI carrying credentials (``s3://KEY:SECRET@bucket``, ``?secret_key=``): energyat
    writes study URIs into spec.yaml, provenance and Ray Tune's pickled experiment, all in the
    bucket. The message names the URI without them."""
    url = urlsplit(uri)
    query = parse_qsl(url.query, keep_blank_values=True)
    hidden = [name.lower().startswith(_SECRET_PARAMETERS) for name, _value in query]
    if url.password is not None or url.username is not None or any(hidden):
        shown = urlunsplit(url._replace(netloc=url.hostname or "", query="&".join(
            f"{n}=..." if secret else f"{n}={v}" for (n, v), secret in zip(query, hidden, strict=True))))
        raise StoreError(
            f"storage {shown} carries credentials in the URI, which energyat would write into the study's files; "
            "give them in the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) or use an instance role"
        )


def filesystem(root: str | os.PathLike[str]) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI such as s3://bucket/studies."""
    text = str(root)
    if is_uri(text):
        _check_no_credentials(text)
        return _from_uri(text)
    return pafs.LocalFileSystem(), str(Path(text).expanduser().resolve())


def open_storage(root: str | os.PathLike[str]) -> tuple[pafs.FileSystem, str]:
    """:func:`filesystem`, checked: for a URI the endpoint answers and the bucket exists.

    Raises:
        StoreError: an unknown scheme, an unreachable endpoint or a missing bucket, in one line.
    """
    fs, path = filesystem(root)
    if is_uri(root):
        bucket = path.split("/", 1)[0]
        try:
            found = fs.get_file_info(bucket).type == pafs.FileType.Directory
        except OSError as exc:
            raise StoreError(f"cannot reach storage {root}: {one_line(exc)}") from exc
        if not found:
            raise StoreError(f"storage {root}: bucket `{bucket}` does not exist; create it first (energyat creates no buckets)")
    return fs, path


# What a directory written by an older energyat holds, and what to do with it.
_OLD_VERSIONS = {
    1: "schema_version 1 chose the best checkpoint on a test subset (best_test_robust_acc); "
       "schema_version 2 selects on a validation split, so the two cannot be mixed",
}


def no_tables(directory: str | os.PathLike[str]) -> StoreError:
    return StoreError(
        f"{directory} holds no energyat tables (no tables/ folder); "
        "give a study directory or an `energyat train --out` directory"
    )


def check_schema_version(found: object, *, where: str) -> None:
    """Refuse, in one line that says what to do, a directory another schema version wrote."""
    if found is None or str(found) == str(SCHEMA_VERSION):
        return
    why = _OLD_VERSIONS.get(int(str(found)), "") if str(found).isdigit() else ""
    raise StoreError(
        f"{where} was written with energyat table schema_version {found}; this energyat reads {SCHEMA_VERSION}"
        + (f" ({why})" if why else "")
        + ": run the spec again into a new directory (its spec.yaml holds it), or read this one with the energyat that wrote it"
    )


def epoch_file(root: str, table: str, trial_id: str, epoch: int) -> str:
    return f"{root}/tables/{table}/trial={trial_id}/epoch-{epoch:04d}.parquet"


def eval_file(root: str, trial_id: str, key: str) -> str:
    return f"{root}/tables/evals/trial={trial_id}/eval-{key}.parquet"


def trial_file(root: str, trial_id: str) -> str:
    return f"{root}/tables/trials/trial={trial_id}.parquet"


# What a table's loose files are called, relative to tables/<table>/ (one trial: `*` is its id).
LOOSE = {
    "epochs": "trial=*/epoch-*.parquet",
    "samples": "trial=*/epoch-*.parquet",
    "trials": "trial=*.parquet",
    "evals": "trial=*/eval-*.parquet",
}
PARTS = "parts"  # tables/<table>/parts/part-<time>-<random>.parquet
SOURCE = "_source"  # a part's column: the loose file (relative to tables/<table>/) a row came from
PART_TRIALS = b"energyat.trials"  # a part's metadata: the JSON list of the trials it holds
PART_PROVENANCE = b"energyat.provenance_by_trial"  # and each one's provenance, from its loose files


@dataclass(frozen=True)
class Part:
    """A compacted file (its `size` and `columns` as listed and read once, from its footer) and
    which of its rows count: all but those of `superseded` trials (a newer part holds them) and
    those from `overridden` sources (a loose file holds them)."""

    path: str
    size: int
    trials: frozenset[str]
    columns: tuple[str, ...]
    superseded: frozenset[str] = frozenset()
    overridden: frozenset[str] = frozenset()


@dataclass(frozen=True)
class TableFiles:
    """Where a table's rows live: loose files (as listed: path, size, time) and parts, newest part first."""

    listed: list[pafs.FileInfo]
    parts: list[Part]

    @property
    def loose(self) -> list[str]:
        return [f.path for f in self.listed]


def source_trial(source: str) -> str:
    """The trial of a loose file named relative to its table's folder: ``trial=<id>/...`` or ``trial=<id>.parquet``."""
    head = source.split("/", 1)[0]
    return head[len("trial="):].removesuffix(".parquet")


def table_files(fs: pafs.FileSystem, root: str, table: str, *, trial: str | None = None) -> TableFiles:
    """The files holding `table`'s rows under study directory `root` (a path inside `fs`), and
    which rows of each part count (the module's rule); `trial` lists only that trial's loose files.

    The loose files are listed before the parts: a compaction writes its part before it deletes
    the files the part absorbed, so every row is in one listing or the other.
    """
    folder = f"{root}/tables/{table}"
    pattern = LOOSE[table] if trial is None else LOOSE[table].replace("trial=*", f"trial={trial}")
    if trial is not None and table == "trials":
        info = fs.get_file_info(f"{folder}/{pattern}")
        listed = [info] if info.type == pafs.FileType.File else []
    else:
        where = folder if trial is None else f"{folder}/trial={trial}"
        found = fs.get_file_info(pafs.FileSelector(where, recursive=True, allow_not_found=True))
        listed = sorted((f for f in found if f.type == pafs.FileType.File and fnmatch.fnmatchcase(f.path[len(folder) + 1:], pattern)),
                        key=lambda f: f.path)
    found = fs.get_file_info(pafs.FileSelector(f"{folder}/{PARTS}", allow_not_found=True))
    names = sorted((f for f in found if f.type == pafs.FileType.File and fnmatch.fnmatchcase(f.base_name, "part-*.parquet")),
                   key=lambda f: f.path, reverse=True)
    by_trial: dict[str, set[str]] = {}
    for f in listed:
        source = f.path[len(folder) + 1:]
        by_trial.setdefault(source_trial(source), set()).add(source)
    parts: list[Part] = []
    seen: set[str] = set()
    for info in names:  # newest first: the part's name starts with its time
        trials, columns = _part_footer(fs, info)
        if trial is not None and trial not in trials:
            continue
        overridden = {s for t in trials - seen for s in by_trial.get(t, ())}
        parts.append(Part(info.path, info.size or 0, trials, columns, frozenset(trials & seen), frozenset(overridden)))
        seen |= trials
    return TableFiles(listed, parts)


def _part_footer(fs: pafs.FileSystem, info: pafs.FileInfo) -> tuple[frozenset[str], tuple[str, ...]]:
    """The trials a part holds and its columns, from its footer (a part is never rewritten, so its listed size holds)."""
    try:
        if isinstance(fs, pafs.LocalFileSystem):  # the size is a stat here, and pyarrow.dataset's import (it loads pandas) 0.3 s
            footer = pq.read_metadata(info.path, filesystem=fs)
        else:
            footer = _at_listed_size(fs, info.path, info.size).metadata
        return frozenset(json.loads((footer.metadata or {})[PART_TRIALS])), tuple(footer.schema.to_arrow_schema().names)
    except (KeyError, ValueError, TypeError) as exc:
        raise StoreError(
            f"{info.path} is not a part energyat wrote (no readable trial list: {one_line(exc)}); move it out of the table's parts/ folder"
        ) from exc


def _at_listed_size(fs: pafs.FileSystem, path: str, size: int | None) -> ds.ParquetFileFragment:
    """A Parquet file (a pyarrow.dataset fragment) opened at the size its listing gave: on an
    object store, reading it is then GETs only (opened by name, pyarrow first asks each file's
    size: three HEADs per file)."""
    import pyarrow.dataset as ds  # here: a command that reads no row through pyarrow never imports it

    return ds.ParquetFileFormat().make_fragment(path, filesystem=fs, file_size=size)


def part_conditions(part: Part, *, trial: str | None = None) -> list[tuple[str, bool, list[str]]]:
    """The rows of `part` that count (of `trial` only, if given), as conditions that must all hold:
    ``(column, wanted, values)``, the column's value in `values` when `wanted`, else not in them.
    The one statement of the rule; :func:`part_filter` renders it for pyarrow and
    ``analysis.query`` for DuckDB's SQL."""
    keep = []
    if trial is not None:
        keep.append(("trial_id", True, [trial]))
    if part.superseded:
        keep.append(("trial_id", False, sorted(part.superseded)))
    if part.overridden:
        keep.append((SOURCE, False, sorted(part.overridden)))
    return keep


def part_filter(part: Part, *, trial: str | None = None) -> pc.Expression | None:
    """:func:`part_conditions` as a pyarrow filter; None for all rows."""
    out = None
    for column, wanted, values in part_conditions(part, trial=trial):
        if wanted and len(values) == 1:  # an equality: what row-group statistics can skip on
            expr = pc.field(column) == values[0]
        else:
            expr = pc.field(column).isin(values) if wanted else ~pc.field(column).isin(values)
        out = expr if out is None else out & expr
    return out


def read_rows(root: str, *, table: str, trial: str | None = None, columns: Sequence[str] | None = None,
              with_source: bool = False) -> pa.Table:
    """`table`'s rows that count (of `trial` only, if given), read with pyarrow from a local path or
    a URI; `columns` only, if given; with each row's `_source` if `with_source` (for compaction).
    Columns are matched by name across files; a column a file lacks reads as null."""
    fs, path = filesystem(root)
    files = table_files(fs, path, table, trial=trial)
    return read_files(fs, path, table, files.listed, [(p, part_filter(p, trial=trial)) for p in files.parts],
                      columns=columns, with_source=with_source)


def read_files(fs: pafs.FileSystem, path: str, table: str, loose: Sequence[pafs.FileInfo], parts: Sequence[tuple[Part, pc.Expression | None]], *,
               columns: Sequence[str] | None = None, with_source: bool = False) -> pa.Table:
    """The rows of these loose files (as listed) and of these parts (each read with its filter), as one table."""
    folder = f"{path}/tables/{table}/"
    wanted = None if columns is None else list(columns)

    def one_loose(info: pafs.FileInfo) -> pa.Table:
        rows = _read_checked(fs, info.path, info.size, columns=wanted)
        if with_source:
            rows = rows.append_column(SOURCE, pa.array([info.path.removeprefix(folder)] * rows.num_rows, pa.string()))
        return rows

    def one_part(item: tuple[Part, pc.Expression | None]) -> pa.Table:
        p, where = item
        keep = [c for c in p.columns if (wanted is None or c in wanted) and (with_source or c != SOURCE)]
        return _read_checked(fs, p.path, p.size, columns=keep, filter=where)

    with ThreadPoolExecutor(READERS) as pool:  # parallel GETs on an object store; each file is small
        pieces = list(pool.map(one_loose, loose)) + list(pool.map(one_part, parts))
    if not pieces:
        schema = TABLES[table] if wanted is None else pa.schema([TABLES[table].field(c) for c in wanted])
        return schema.empty_table()
    return pa.concat_tables([p.replace_schema_metadata(None) for p in pieces], promote_options="permissive")


READERS = 8


def _read_checked(fs: pafs.FileSystem, path: str, size: int | None, **options: Any) -> pa.Table:
    """One file, read at its listed `size`, refused in one line naming it when it is damaged or of
    another schema version. A loose file rewritten since the listing (a trial's row updated, an
    epoch trained again after a resume) no longer has that size: it is read again by name."""
    try:
        try:
            table = _at_listed_size(fs, path, size).to_table(**options)
        except (pa.ArrowInvalid, OSError):
            table = _at_listed_size(fs, path, None).to_table(**options)
    except pa.ArrowInvalid as exc:
        raise pa.ArrowInvalid(f"{path}: {one_line(exc)}") from exc
    found = (table.schema.metadata or {}).get(b"schema_version")
    check_schema_version(found.decode() if found is not None else None, where=path)
    return table


def durable_replace(tmp: str | os.PathLike[str], path: str | os.PathLike[str]) -> None:
    """Rename the finished file `tmp` to `path`, durably: the data reaches the disk before the
    rename (else a power loss can leave the new name on an empty file, as ext4 and XFS allow),
    and the rename reaches it before we go on (the directory is synced too)."""
    _fsync(tmp)
    os.replace(tmp, path)
    _fsync(os.path.dirname(os.path.abspath(path)))


def _fsync(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY)  # a file or a folder: both sync through a read-only descriptor
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(fs: pafs.FileSystem, path: str, table: pa.Table, *, row_group_size: int | None = None) -> None:
    parent = path.rsplit("/", 1)[0]
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(parent, recursive=True)
        name = path.rsplit("/", 1)[1]
        tmp = f"{parent}/.{name}.{uuid.uuid4().hex}.tmp"
        pq.write_table(table, tmp, filesystem=fs, row_group_size=row_group_size)
        durable_replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one
        # a writer killed mid-write (a trial's worker, the test_kills way) left its temporary file;
        # the restarted trial rewrites the same file, and this is the moment it is certainly stale
        for stale in Path(parent).glob(f".{name}.*.tmp"):
            stale.unlink(missing_ok=True)
    else:  # an object store: no folders to create (a key's prefix is its folder; pyarrow would PUT a marker per level)
        pq.write_table(table, path, filesystem=fs, row_group_size=row_group_size)


def remove_stale_temporaries(root: str | os.PathLike[str]) -> int:
    """Delete the temporary files that writers killed mid-write left under ROOT/tables; how many.

    Call it only while no trial of the study runs (a fit has returned): a live writer's temporary
    file is one not yet renamed. :func:`write_atomic` removes its own path's stale ones, but a
    file that is never written again (its trial finished before the kill, or was compacted since)
    keeps them. An object store has none: each write is one PUT."""
    if is_uri(root):
        return 0
    tables = Path(root).expanduser() / "tables"
    stale = [p for p in tables.rglob(".*.tmp") if p.is_file()] if tables.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


def _with_metadata(table: pa.Table, provenance: Mapping[str, Any]) -> pa.Table:
    meta = dict(table.schema.metadata or {})
    meta[b"schema_version"] = str(SCHEMA_VERSION).encode()
    meta[b"energyat.provenance"] = json.dumps(provenance, sort_keys=True, default=str).encode()
    return table.replace_schema_metadata(meta)


def write_epoch_rows(
    root: str,
    *,
    table: str,
    trial_id: str,
    epoch: int,
    columns: Mapping[str, Sequence[Any] | Any],
    provenance: Mapping[str, Any],
) -> None:
    """Write one (trial, epoch) file of `epochs` or `samples`, replacing any earlier one.

    ``columns`` maps every column of the table's schema to a sequence (or array) of values;
    a missing or extra column is a bug in the caller and raises ``KeyError``/``ValueError``.
    """
    fs, path = filesystem(root)
    write_atomic(fs, epoch_file(path, table, trial_id, epoch), _table(table, columns, provenance))


def write_eval_rows(root: str, *, trial_id: str, key: str, columns: Mapping[str, Sequence[Any]], provenance: Mapping[str, Any]) -> None:
    """Write one evaluation's `evals` rows (:data:`analysis.schema.EVALS`), replacing the file of
    the same `key` (the same evaluation run again)."""
    fs, path = filesystem(root)
    write_atomic(fs, eval_file(path, trial_id, key), _table("evals", columns, provenance))


def _table(table: str, columns: Mapping[str, Sequence[Any] | Any], provenance: Mapping[str, Any]) -> pa.Table:
    """`columns` as a table of `table`'s declared schema, with provenance in its metadata."""
    schema = TABLES[table]
    extra = set(columns) - set(schema.names)
    if extra:
        raise ValueError(f"columns not in the {table} schema: {sorted(extra)}")
    arrays = [pa.array(columns[name], type=schema.field(name).type) for name in schema.names]
    return _with_metadata(pa.Table.from_arrays(arrays, schema=schema), provenance)


def read_trial_rows(root: str, *, table: str, trial_id: str, columns: Sequence[str]) -> dict[str, list[Any]]:
    """One trial's rows of `epochs` or `samples` (`columns` only), sorted by epoch, read with
    pyarrow from a local path or a URI: the writer's own reader, which needs no DuckDB."""
    rows = read_rows(root, table=table, trial=trial_id, columns=columns)
    if rows.num_rows and "epoch" in columns:
        rows = rows.sort_by("epoch")
    return rows.to_pydict()


def write_trial_row(
    root: str,
    *,
    trial_id: str,
    outcome: Mapping[str, Any],
    config: Mapping[str, Any],
    provenance: Mapping[str, Any],
) -> None:
    """Write the trial's one `trials` row: outcome columns, then flattened config columns."""
    arrays = [pa.array([outcome.get(name)], type=TRIAL_OUTCOME.field(name).type) for name in TRIAL_OUTCOME.names]
    fields = list(TRIAL_OUTCOME)
    for key, value in config.items():
        column = config_column(key)
        if isinstance(value, (list, tuple)):
            value = json.dumps(list(value))  # e.g. milestones; one scalar column per key
        arr = pa.array([value])
        if pa.types.is_null(arr.type):  # an unset optional value; keep a usable type
            arr = pa.array([None], type=pa.string())
        fields.append(pa.field(column, arr.type))
        arrays.append(arr)
    fs, path = filesystem(root)
    data = pa.Table.from_arrays(arrays, schema=pa.schema(fields))
    write_atomic(fs, trial_file(path, trial_id), _with_metadata(data, provenance))


def read_trial_outcome(root: str, trial_id: str) -> dict[str, Any] | None:
    """The outcome columns of a trial's `trials` row, or None when it has none (or it is unreadable)."""
    try:
        table = read_rows(root, table="trials", trial=trial_id)
    except (OSError, pa.ArrowInvalid, KeyError, StoreError):
        return None
    rows = table.select([n for n in TRIAL_OUTCOME.names if n in table.column_names]).to_pylist()
    # a row written before a column was added reads as that column's null
    return {name: rows[0].get(name) for name in TRIAL_OUTCOME.names} if rows else None


SHIPPED_SHA = "ENERGYAT_GIT_SHA"  # the driver's revision, for workers running its shipped code


@lru_cache(maxsize=1)
def git_sha() -> str:
    """The energyat checkout's revision, with `-dirty` for uncommitted changes; `unknown` if none.

    On a cluster's worker the code is the driver's, shipped by Ray (study.runner joins a cluster
    with it as `py_modules`) without its .git: the driver passes its revision in
    ENERGYAT_GIT_SHA, which is then the answer.
    """
    shipped = os.environ.get(SHIPPED_SHA)
    if shipped:
        return shipped
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here, capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha


def versions() -> dict[str, str]:
    """Versions of the packages that shape a result (read from metadata: imports nothing)."""
    out = {"python": platform.python_version()}
    for name in ("energyat", "torch", "torchvision", "numpy", "pyarrow", "ray", "optuna", "pyautoattack", "robustbench"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def provenance(config: Mapping[str, Any]) -> dict[str, Any]:
    """What goes with every result: the resolved config, the git SHA, package versions, host, and
    where the energyat code that ran lives (a checkout, or Ray's copy of the driver's on a worker)."""
    return {"config": dict(config), "git_sha": git_sha(), "versions": versions(), "host": platform.node(),
            "code": str(Path(__file__).resolve().parents[1])}


def write_table_file(table: pa.Table, path: str | os.PathLike[str], *, config: Mapping[str, Any]) -> None:
    """One Parquet file outside the three tables (e.g. ``energyat landscape``'s), written atomically
    with ``schema_version`` and the provenance of `config` in its metadata."""
    fs, resolved = filesystem(path)
    write_atomic(fs, resolved, _with_metadata(table, provenance(config)))


# ---------------------------------------------------------------------------------------------
# Stop requests: how a Ray Tune scheduler (ASHA, median stopping) tells a trial to finish.
#
# Tune stops a function trainable by ending its worker, which would skip the trial's final
# evaluation and `trials` row. energyat's schedulers instead write STUDY_DIR/stops/<trial id>
# (the reason, one line) and let the trial go on; the trial reads it after each reported epoch
# and finishes like any other stopped trial. A file, not an actor: it outlives a driver restart,
# reaches every node that reaches the tables, and says afterwards who stopped the trial.
STOPS = "stops"
SCHEDULER_STOP_REASONS = ("scheduler: asha", "scheduler: asha_energy", "scheduler: median")


def stop_file(root: str, trial_id: str) -> str:
    return f"{root}/{STOPS}/{trial_id}"


def request_stop(study_dir: str, trial_id: str, reason: str) -> None:
    """Ask trial `trial_id` of the study to finish after its current epoch, for `reason`."""
    if reason not in SCHEDULER_STOP_REASONS:
        raise ValueError(f"unknown stop reason {reason!r}")
    fs, root = filesystem(study_dir)
    fs.create_dir(f"{root}/{STOPS}", recursive=True)
    with fs.open_output_stream(stop_file(root, check_name(trial_id, "trial id"))) as f:
        f.write(reason.encode())


def stop_request(study_dir: str, trial_id: str) -> str | None:
    """The reason a scheduler asked trial `trial_id` to stop, or None. The file comes from the
    study's storage: anything but a known reason is refused in one line and ignored."""
    fs, root = filesystem(study_dir)
    path = stop_file(root, trial_id)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        text = f.read(64).decode(errors="replace").strip()
    if text not in SCHEDULER_STOP_REASONS:
        print(f"energyat: warning: ignoring {path}: not a stop request energyat writes ({text[:40]!r})", file=sys.stderr, flush=True)
        return None
    return text


# ---------------------------------------------------------------------------------------------
# Stages: what a trial runs after its last epoch (the final evaluation), for the driver's view.
#
# A trial's worker prints nothing the driver sees (Ray's log_to_driver is off) and reports to
# Tune once per epoch, so a final evaluation of many minutes would show as a silent trial. The
# worker writes STUDY_DIR/stages/<trial id>, one JSON object, every few seconds; the driver's
# live view reads it. Like a stop request: a file, so it reaches the driver from any node.
STAGES = "stages"


@dataclass(frozen=True)
class Stage:
    """A long stage's progress: `what` runs (e.g. "PGD-20 on 10,000 test images"), `done` of `total`
    (0 of 0: begun, its size not known yet)."""

    what: str
    done: int
    total: int
    eta_seconds: float | None

    def text(self) -> str:
        if not self.total:  # started, its size not known yet
            return f"final evaluation: {self.what}"
        eta = "" if self.eta_seconds is None else f", eta {self.eta_seconds:.0f} s"
        return f"final evaluation: {self.what}: {self.done:,}/{self.total:,}{eta}"


class StageClock:
    """(what, done, total) progress calls as :class:`Stage` values with an ETA (the rate since
    `what` started, over what is left of it), and whether one is due to be shown: at a new
    `what`, at its end, and otherwise at most every `every` seconds."""

    def __init__(self, every: float) -> None:
        self.every = every
        self.what: str | None = None
        self.started = 0.0
        self.first = 0  # done at the stage's first call: its rate counts from there
        self.shown = -math.inf

    def __call__(self, what: str, done: int, total: int) -> tuple[Stage, bool]:
        now = time.monotonic()
        new = what != self.what
        if new:
            self.what, self.started, self.first = what, now, done
            stage = Stage(what, done, total, None)
        else:
            rate = (now - self.started) / (done - self.first) if done > self.first else None
            stage = Stage(what, done, total, None if rate is None else rate * (total - done))
        due = new or done == total or now - self.shown >= self.every
        if due:
            self.shown = now
        return stage, due


def write_stage(study_dir: str, trial_id: str, stage: Stage) -> None:
    fs, root = filesystem(study_dir)
    fs.create_dir(f"{root}/{STAGES}", recursive=True)
    write_atomic_bytes(fs, f"{root}/{STAGES}/{check_name(trial_id, 'trial id')}", json.dumps(stage.__dict__).encode())


def read_stage(study_dir: str, trial_id: str) -> Stage | None:
    """Trial `trial_id`'s current stage, or None. The file comes from the study's storage: one
    that is not a stage energyat writes (a bad type, an overlong or unprintable text) is None."""
    fs, root = filesystem(study_dir)
    try:
        with fs.open_input_stream(f"{root}/{STAGES}/{check_name(trial_id, 'trial id')}") as f:
            found = json.loads(f.read(1024))
        stage = Stage(str(found["what"]), int(found["done"]), int(found["total"]),
                      None if found["eta_seconds"] is None else float(found["eta_seconds"]))
    except (OSError, ValueError, KeyError, TypeError):  # none yet, gone, or not ours
        return None
    return stage if stage.what.isprintable() and len(stage.what) <= 120 and 0 <= stage.done <= stage.total else None


def clear_stage(study_dir: str, trial_id: str) -> None:
    fs, root = filesystem(study_dir)
    try:
        fs.delete_file(f"{root}/{STAGES}/{check_name(trial_id, 'trial id')}")
    except FileNotFoundError:
        pass  # the trial never wrote one


def write_atomic_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """`data` as the file `path`, whole or not at all (a temporary name renamed; one PUT on an object store)."""
    if isinstance(fs, pafs.LocalFileSystem):
        parent, name = path.rsplit("/", 1)
        tmp = f"{parent}/.{name}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)  # no fsync: a stage lost to a power cut is only a stale progress line
    else:
        with fs.open_output_stream(path) as f:
            f.write(data)
