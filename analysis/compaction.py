"""Compaction: finished trials' loose files rewritten as a few parts, with every guarantee kept.

One file per (table, trial, epoch) is what makes a running trial's writes atomic and crash-safe,
but every reader then opens every file: 1,000 trials x 200 epochs is 200,000 footers per command.
Once a trial has finished its files no longer change, so they are rewritten as one part per
table, and the parts, when there are many, as one (Delta Lake's OPTIMIZE, Iceberg's
rewrite_data_files, for a store whose writers are the trials).

The order of the steps is the guarantee (the reading rule is analysis.store.table_files):

1. read the rows that count of the trials to compact, each tagged with the loose file it came from;
2. write them as a new part, atomically (a temporary name renamed into place; one PUT on an
   object store), named by its time so that it is the newest;
3. delete the loose files it absorbed, then the parts it merged.

Killed after 2, the loose files still count and the part's rows from them do not; the merged
parts are superseded by the newer part, trial by trial. Killed before 2, nothing changed. So at
every point each row counts once. A loose file rewritten after step 1 (a trial run again) keeps
its new rows: step 3 deletes a loose file only if its size and time are still those it had when
read, and a loose file always overrides a part.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from analysis.store import (
    PART_PROVENANCE,
    PART_TRIALS,
    PARTS,
    SCHEMA_VERSION,
    SOURCE,
    TABLES,
    Part,
    filesystem,
    no_tables,
    open_storage,
    part_filter,
    read_files,
    read_rows,
    source_trial,
    table_files,
    write_atomic,
)

# A RUNNING row's trial may still write epochs; an ERROR row's may be retried
# (`resume --retry-errored`), which moves its files aside: both stay loose.
FINISHED = ("TERMINATED",)
MAX_PARTS = 8  # a compaction of one trial merges the parts once there would be more than this
ROW_GROUP = 65_536  # rows per row group: trial_id statistics let a one-trial query skip the rest


@dataclass(frozen=True)
class Compacted:
    """What one table's compaction did."""

    table: str
    trials: int  # trials whose loose files it absorbed
    loose_removed: int
    parts_merged: int
    part: str | None  # the new part's path, None when there was nothing to do


def finished_trials(root: str) -> set[str]:
    """Trials whose `trials` row says they finished (TERMINATED)."""
    rows = read_rows(root, table="trials", columns=["trial_id", "status"]).to_pylist()
    return {r["trial_id"] for r in rows if r["status"] in FINISHED}


def compact(root: str, *, trials: Collection[str] | None = None, merge: bool | None = None) -> dict[str, Compacted]:
    """Rewrite the loose files of finished `trials` (default: every finished trial) of each table
    as one new part, and merge the table's parts into it when `merge` (default: when there would
    be more than :data:`MAX_PARTS`). Safe to run while trials run and to kill at any point.
    Returns what it did, per table it changed."""
    out: dict[str, Compacted] = {}
    for step in steps(root, trials=trials, merge=merge):
        was = out.get(step.table, Compacted(step.table, 0, 0, 0, None))
        out[step.table] = Compacted(step.table, was.trials + step.trials, was.loose_removed + step.loose_removed,
                                    was.parts_merged + step.parts_merged, step.part or was.part)
    return out


def compact_study(directory: str) -> str:
    """`energyat compact DIRECTORY`: :func:`compact` with a merge, after checking that the
    directory holds tables; returns one line saying what it did."""
    fs, path = open_storage(directory)
    if fs.get_file_info(f"{path}/tables").type != pafs.FileType.Directory:
        raise no_tables(directory)
    done = compact(directory, merge=True)
    if not done:
        return f"{directory}: nothing to compact (no finished trial has per-epoch files, and each table has at most one part)"
    said = ", ".join(f"{c.table}: {c.loose_removed} files of {c.trials} trials" + (f" and {c.parts_merged} parts" if c.parts_merged else "")
                     for c in done.values())
    return f"compacted {directory}: {said}, each into one part"


def steps(root: str, *, trials: Collection[str] | None = None, merge: bool | None = None) -> Iterator[Compacted]:
    """:func:`compact`, one table at a time; within a table, a step per durable action (the
    part written, each loose file and each merged part deleted), so that a test can stop it
    between any two, as a kill would."""
    done = finished_trials(root)
    absorb = done if trials is None else done & set(trials)
    fs, path = filesystem(root)
    for table in TABLES:
        yield from _compact_table(fs, path, root, table, absorb, merge)


def _compact_table(fs: pafs.FileSystem, path: str, root: str, table: str, absorb: set[str], merge: bool | None) -> Iterator[Compacted]:
    folder = f"{path}/tables/{table}"
    files = table_files(fs, path, table)
    loose = {f.path: f for f in files.listed if source_trial(f.path[len(folder) + 1:]) in absorb}  # as listed: size and time
    if merge is None:  # the smaller half of the parts once there would be too many: each row is rewritten O(log n) times
        by_size = sorted(files.parts, key=lambda p: p.size)
        merged = by_size[: len(by_size) // 2 + 1] if len(files.parts) + 1 > MAX_PARTS else []
    else:
        merged = files.parts if merge else []
    if not loose and len(merged) < 2:
        return
    # Each trial the new part holds gets all its rows that count, so that the part, the newest,
    # can supersede every older copy: a merged part's trials (those it is the newest for), and
    # the absorbed loose files' trials, with their rows in an unmerged part when one is the newest
    # for them (a trial run again after it was compacted).
    absorbed = {source_trial(name[len(folder) + 1:]) for name in loose}
    owners = absorbed | {t for p in merged for t in p.trials - p.superseded}
    merged_paths = {p.path for p in merged}
    reads = [(p, part_filter(p)) for p in merged]
    for p in files.parts:
        theirs = absorbed & (p.trials - p.superseded)
        if p.path not in merged_paths and theirs:
            only = pc.field("trial_id").isin(sorted(theirs))
            where = part_filter(p)
            reads.append((p, only if where is None else where & only))
    rows = read_files(fs, path, table, list(loose.values()), reads, with_source=True)
    rows = rows.filter(pc.is_in(rows.column("trial_id"), value_set=pa.array(sorted(owners), pa.string())))
    rows = rows.sort_by([("trial_id", "ascending"), (SOURCE, "ascending")])
    meta = {b"schema_version": str(SCHEMA_VERSION).encode(), PART_TRIALS: json.dumps(sorted(owners)).encode(),
            PART_PROVENANCE: json.dumps(_provenance(fs, folder, loose, merged, owners), sort_keys=True).encode()}
    part = f"{folder}/{PARTS}/{_part_name()}"
    write_atomic(fs, part, rows.replace_schema_metadata(meta), row_group_size=ROW_GROUP)
    yield Compacted(table, len(absorbed), 0, 0, part)
    for name, seen in loose.items():
        now = fs.get_file_info(name)
        if now.type == pafs.FileType.File and (now.size, now.mtime) == (seen.size, seen.mtime):
            fs.delete_file(name)
        yield Compacted(table, 0, 1, 0, None)
    for old in merged:
        try:
            fs.delete_file(old.path)
        except FileNotFoundError:
            pass  # another compaction merged it first
        yield Compacted(table, 0, 0, 1, None)
    _remove_empty_folders(fs, folder, {os.path.dirname(name) for name in loose})


def _provenance(fs: pafs.FileSystem, folder: str, loose: Collection[str], merged: list[Part], owners: set[str]) -> dict[str, Any]:
    """Each trial's provenance (config, git SHA, versions), kept from its files: a trial's newest
    loose file's, else what the merged parts recorded (newest first)."""
    out: dict[str, Any] = {}
    for name in sorted(loose, reverse=True):
        trial = source_trial(name[len(folder) + 1:])
        if trial not in out:
            found = (pq.read_schema(name, filesystem=fs).metadata or {}).get(b"energyat.provenance")
            if found is not None:
                out[trial] = json.loads(found)
    for part in merged:
        recorded = json.loads((pq.read_schema(part.path, filesystem=fs).metadata or {}).get(PART_PROVENANCE, b"{}"))
        for trial in owners - out.keys():
            if trial in recorded:
                out[trial] = recorded[trial]
    return out


def _remove_empty_folders(fs: pafs.FileSystem, folder: str, candidates: set[str]) -> None:
    """A trial's folder once its last loose file is gone (object stores have no folders to remove)."""
    if not isinstance(fs, pafs.LocalFileSystem):
        return
    for name in candidates:
        if name != folder and name.startswith(folder + "/"):
            try:
                os.rmdir(name)
            except OSError:
                pass  # not empty: a file arrived (a trial run again), or another compaction's


def set_aside(root: str, trial: str, target: str) -> int:
    """Take `trial`'s rows held in parts out of every view, keeping a copy: for each table whose
    parts hold the trial, its rows are written under `target` (``<target>/tables/<table>/parts/``,
    readable like any part) and then an empty part naming the trial, newer than any that holds
    it, supersedes them. Its loose files are the caller's to move. Returns the rows set aside.

    For a trial Ray Tune will never resume (study.recovery): a driver can compact a trial that
    finished after Tune's last snapshot of the experiment."""
    fs, path = filesystem(root)
    moved = 0
    for table in TABLES:
        files = table_files(fs, path, table, trial=trial)
        if not files.parts:
            continue
        loose = pa.array([name[len(f"{path}/tables/{table}/"):] for name in files.loose], pa.string())
        rows = read_rows(root, table=table, trial=trial, with_source=True)
        rows = rows.filter(pc.invert(pc.is_in(rows.column(SOURCE), value_set=loose)))  # the loose ones move as files
        meta = {b"schema_version": str(SCHEMA_VERSION).encode(), PART_TRIALS: json.dumps([trial]).encode(),
                PART_PROVENANCE: json.dumps(_provenance(fs, f"{path}/tables/{table}", [], files.parts, {trial})).encode()}
        write_atomic(fs, f"{target}/tables/{table}/{PARTS}/{_part_name()}", rows.replace_schema_metadata(meta))
        write_atomic(fs, f"{path}/tables/{table}/{PARTS}/{_part_name()}", rows.schema.empty_table().replace_schema_metadata(meta))
        moved += rows.num_rows
    return moved


def _part_name() -> str:
    return f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
