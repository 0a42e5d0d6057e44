"""How reading a study's tables scales with its size, before and after compaction.

    python benchmarks/tables.py [--trials 10,100,1000] [--epochs 200] [--probe-every 5]
        [--out runs/tables] [--repeat 3] [--loose-max 100] [--continue] [--s3 10,100] [--skip-local]

For each size, a synthetic study is written through the store as trials write it
(analysis.store: per epoch an `epochs` file, a `samples` file on probed epochs and the
RUNNING `trials` row; at the end the TERMINATED row and a final evaluation's `evals` rows),
then read by the commands users run, each a fresh process as a user starts it:

- ``energyat query DIR "<an aggregate over epochs>"``
- the same with ``--trial t0000`` (one trial's files, the parts' other row groups skipped)
- ``energyat status DIR``
- ``energyat report DIR`` (figures included: the table reads are not timed apart), with its
  default processes and with ``--jobs 1``
- ``energyat eval --trial best``'s lookup (:func:`trainables.subjects.best_trial`, timed inside
  its process: the rest of `eval` is evaluating a model)

first on the loose per-epoch files, then after compaction (:func:`analysis.compaction.compact`
with a merge, timed; above ``--loose-max`` trials the study is written as a run leaves it, each
trial compacted at its end, and timed compacted only; ``--continue`` keeps the trials a stopped
run of such a size finished and writes the rest), against the
floor: plain DuckDB, in a fresh process, over a copy of the same rows as one Parquet file per
table, reading what the command reads. Process start counts in every number: `python -c pass`,
`python -c "import duckdb"` and `energyat --help` are printed for reference.

The write path's cost per epoch is timed while writing (the store's writes of one epoch, and the
compaction of a finished trial spread over its epochs). With ``--s3``, the same study is written
to a moto S3 server on 127.0.0.1 and `query` and `status` are run against it, counting the
server's requests per command by kind (GET, LIST, HEAD, writes).

Prints one JSON line per measurement, and appends them to ``OUT/tables.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from analysis.compaction import compact, finished_trials  # noqa: E402
from analysis.report import default_jobs  # noqa: E402
from analysis.schema import EPOCHS, EVALS, SAMPLES, SCHEMA_VERSION  # noqa: E402
from analysis.store import filesystem, provenance, write_epoch_rows, write_eval_rows, write_trial_row  # noqa: E402

PY = sys.executable
ENERGYAT = [PY, "-m", "study.cli"]
QUERY = "select trial_id, max(val_robust_acc) as best, avg(train_loss) as loss from epochs group by 1 order by 2 desc limit 5"
SAMPLES_PER_PROBE = 64  # 32 train + 32 test probe rows


def _epoch_row(rng: np.random.Generator, trial: str, epoch: int, probed: bool, method: str) -> dict[str, list[Any]]:
    row: dict[str, Any] = {}
    for field in EPOCHS:
        if pa.types.is_floating(field.type):  # probe columns are NaN on epochs without a probe
            row[field.name] = float(rng.random()) if probed or not field.name.startswith(("E", "dE", "val_", "test_")) else float("nan")
        elif pa.types.is_integer(field.type):
            row[field.name] = 1
        elif pa.types.is_boolean(field.type):
            row[field.name] = False
        else:
            row[field.name] = None
    row.update(study="bench", trial_id=trial, epoch=epoch, method=method, phase=1, probed=probed, alarm=False, alarm_reason=None)
    row["train_loss"] = 2.0 * np.exp(-epoch / 50) + 0.05 * rng.random()
    row["val_robust_acc"] = 0.3 + 0.2 * (1 - np.exp(-epoch / 30)) - (0.001 * max(0, epoch - 100)) + 0.01 * rng.random()
    return {k: [v] for k, v in row.items()}


def _samples(rng: np.random.Generator, trial: str, epoch: int) -> dict[str, list[Any]]:
    n = SAMPLES_PER_PROBE
    cols: dict[str, list[Any]] = {"study": ["bench"] * n, "trial_id": [trial] * n, "epoch": [epoch] * n,
                                  "split": ["train"] * (n // 2) + ["test"] * (n // 2), "index": list(range(n)),
                                  "label": [int(v) for v in rng.integers(0, 10, n)]}
    for name in ("E", "E_adv", "Ey", "Ey_adv", "E_tgt"):
        cols[name] = [float(v) for v in rng.normal(-5, 1, n)]
    cols["correct"] = [bool(v) for v in rng.random(n) < 0.8]
    cols["correct_adv"] = [bool(v) for v in rng.random(n) < 0.4]
    assert set(cols) == set(SAMPLES.names)
    return cols


def write_study(root: str, trials: int, epochs: int, probe_every: int, *, compact_each: bool) -> dict[str, float]:
    """The synthetic study, through the store; returns the write path's seconds per epoch (and
    per trial's compaction, with `compact_each`, as a study's driver does), over the trials this
    call wrote: a trial already finished and compacted in `root` is kept (a run continued)."""
    write_s, compact_s, written = 0.0, 0.0, 0
    kept = finished_trials(root) if compact_each else set()
    for i in range(trials):
        trial, method = f"t{i:04d}", ("sat", "trades")[i % 2]
        if trial in kept:
            continue
        rng = np.random.default_rng(i)  # per trial, so that a continued run writes what one run would
        written += 1
        config = {"method": method, "lr": float(rng.choice([0.02, 0.05, 0.1])), "epochs": epochs}
        prov = provenance(config)
        t0 = time.perf_counter()
        for epoch in range(epochs):
            probed = epoch % probe_every == 0 or epoch == epochs - 1
            row = _epoch_row(rng, trial, epoch, probed, method)
            write_epoch_rows(root, table="epochs", trial_id=trial, epoch=epoch, columns=row, provenance=prov)
            if probed:
                write_epoch_rows(root, table="samples", trial_id=trial, epoch=epoch, columns=_samples(rng, trial, epoch), provenance=prov)
            status = "RUNNING" if epoch < epochs - 1 else "TERMINATED"
            outcome = {"study": "bench", "trial_id": trial, "status": status, "epochs_run": epoch + 1,
                       "best_val_robust_acc": float(0.4 + 0.1 * rng.random()), "best_epoch": epoch, "seconds": 1.0}
            write_trial_row(root, trial_id=trial, outcome=outcome, config=config, provenance=prov)
        evals: dict[str, list[Any]] = {name: [None] for name in EVALS.names}
        evals |= {"study": ["bench"], "trial_id": [trial], "attack": ["pgd"], "n": [10000], "correct": [4500], "accuracy": [0.45]}
        write_eval_rows(root, trial_id=trial, key="pgd", columns=evals, provenance=prov)
        write_s += time.perf_counter() - t0
        if compact_each:
            t0 = time.perf_counter()
            compact(root, trials=[trial])
            compact_s += time.perf_counter() - t0
    # spec.yaml as a study has one: `status` and `eval` read the study's directory as a study's
    spec = {"schema_version": SCHEMA_VERSION, "study_name": "bench", "spec": {"name": "bench"}, "resolved": {}}
    fs, path = filesystem(root)
    with fs.open_output_stream(f"{path}/spec.yaml") as f:
        f.write(yaml.safe_dump(spec).encode())
    per_epoch = max(written, 1) * epochs
    return {"write_ms_per_epoch": 1000 * write_s / per_epoch, "compact_ms_per_epoch": 1000 * compact_s / per_epoch, "trials_written": written}


def timed(cmd: list[str], repeat: int, env: dict[str, str] | None = None) -> tuple[float, str]:
    """Median wall seconds of `cmd` as a fresh process, and its last stdout."""
    times, out = [], ""
    for _ in range(repeat):
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=3600)
        times.append(time.perf_counter() - t0)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd[:5])} failed: {proc.stderr.strip().splitlines()[-1:]}")
        out = proc.stdout
    return statistics.median(times), out


def floor_copy(study: Path, floor: Path) -> None:
    """The same rows as one Parquet file per table (the views, written by DuckDB)."""
    from analysis.query import open_tables

    floor.mkdir(parents=True, exist_ok=True)
    con = open_tables(study)
    import pyarrow.parquet as pq

    for view in ("epochs", "samples", "trials", "evals"):
        pq.write_table(con.sql(f"select * from {view}").to_arrow_table(), floor / f"{view}.parquet")
    con.close()


def floor_cmd(floor: Path, *sqls: str) -> list[str]:
    """Plain DuckDB in a fresh process over the floor copy: each of `sqls`, the views' names
    replaced by their files, fetched."""
    fetches = []
    for sql in sqls:
        for view in ("epochs", "samples", "trials", "evals"):
            sql = re.sub(rf"\b{view}\b", f"read_parquet('{floor / (view + '.parquet')}')", sql)
        fetches.append(f"duckdb.sql({sql!r}).fetchall()")
    return [PY, "-c", "import duckdb; " + "; ".join(fetches)]


# What `status` and `report` read: every trials row, and every trial's detector columns
STATUS_SQL = "select * from trials"
EPOCHS_SQL = "select * from epochs order by trial_id, epoch"
LOOKUP_SQL = "select trial_id from trials where best_val_robust_acc = best_val_robust_acc order by best_val_robust_acc desc, trial_id limit 1"
LOOKUP = ("import sys, time; from trainables.subjects import best_trial; t = time.perf_counter(); "
          "best_trial(sys.argv[1]); print(time.perf_counter() - t)")


def measure(study: Path, floor: Path, repeat: int, stage: str, size: int) -> dict[str, Any]:
    out: dict[str, Any] = {"trials": size, "stage": stage}
    out["query_s"], _ = timed([*ENERGYAT, "query", str(study), QUERY], repeat)
    out["query_one_trial_s"], _ = timed([*ENERGYAT, "query", str(study), QUERY, "--trial", "t0000"], repeat)
    out["status_s"], _ = timed([*ENERGYAT, "status", str(study)], repeat)
    out["report_s"], _ = timed([*ENERGYAT, "report", str(study)], 1)  # figures drawn by the usable CPUs
    out["report_one_process_s"], _ = timed([*ENERGYAT, "report", str(study), "--jobs", "1"], 1)
    out["report_jobs"] = default_jobs()
    out["lookup_in_process_s"] = float(timed([PY, "-c", LOOKUP, str(study)], repeat)[1].strip())
    out["floor_query_s"], _ = timed(floor_cmd(floor, QUERY), repeat)
    out["floor_status_s"], _ = timed(floor_cmd(floor, STATUS_SQL, EPOCHS_SQL), repeat)
    out["floor_lookup_s"], _ = timed(floor_cmd(floor, LOOKUP_SQL), repeat)
    return out


def start_moto() -> tuple[subprocess.Popen[bytes], str, Path]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"moto-{port}.log"
    proc = subprocess.Popen([PY, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=log.open("wb"))
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    return proc, f"127.0.0.1:{port}", log


REQUEST = re.compile(r"(GET|HEAD|PUT|POST|DELETE) /\S*")  # a request in moto's log (werkzeug colours some lines)


def requests(log: Path, since: int) -> dict[str, int]:
    """The S3 requests moto logged after line `since`, by kind: object reads (GET, ranged reads
    included), listings (GET with list-type), HEADs, and writes (PUT, POST, DELETE)."""
    found = [m.group(0) for line in log.read_text(errors="replace").splitlines()[since:] if (m := REQUEST.search(line))]
    lists = sum(r.startswith("GET") and "list-type=" in r for r in found)
    return {"get": sum(r.startswith("GET") for r in found) - lists, "list": lists, "head": sum(r.startswith("HEAD") for r in found),
            "write": sum(r.startswith(("PUT", "POST", "DELETE")) for r in found)}


def s3_measure(size: int, epochs: int, probe_every: int, repeat: int) -> list[dict[str, Any]]:
    import pyarrow.fs as pafs

    env = os.environ | {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1",
                        "AWS_EC2_METADATA_DISABLED": "true"}
    os.environ.update(env)
    proc, endpoint, log = start_moto()
    try:
        fs = pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", access_key="x", secret_key="x", region="us-east-1",
                               allow_bucket_creation=True)
        fs.create_dir("bench")
        uri = f"s3://bench/t{size}?endpoint_override={endpoint}&scheme=http"
        rows = []
        write = write_study(uri, size, epochs, probe_every, compact_each=False)
        for stage in ("loose", "compacted"):
            if stage == "compacted":
                t0 = time.perf_counter()
                compact(uri, merge=True)
                write["compact_s"] = time.perf_counter() - t0
            row: dict[str, Any] = {"trials": size, "stage": stage, "storage": "s3", **write}
            for name, cmd in (("query", [*ENERGYAT, "query", uri, QUERY]), ("status", [*ENERGYAT, "status", uri])):
                before = len(log.read_text(errors="replace").splitlines())
                row[f"{name}_s"], _ = timed(cmd, 1, env=env)
                row[f"{name}_requests"] = requests(log, before)
            rows.append(row)
            print(json.dumps(row), flush=True)
        return rows
    finally:
        proc.terminate()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=str, default="10,100,1000")
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--probe-every", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "tables")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--s3", type=str, default="", help="sizes to run on a moto S3 server too, e.g. 10,100")
    parser.add_argument("--skip-local", action="store_true", help="only the --s3 sizes")
    parser.add_argument("--loose-max", type=int, default=100,
                        help="above this many trials, write the study as a run does (each trial compacted at its end) "
                             "and time the commands on the compacted study only (default 100)")
    parser.add_argument("--continue", dest="continue_", action="store_true",
                        help="keep the trials a stopped run of a size above --loose-max finished, and write the rest")
    args = parser.parse_args()
    rows = []
    for name, cmd in (("python -c pass", [PY, "-c", "pass"]), ("python -c 'import duckdb'", [PY, "-c", "import duckdb"]),
                      ("energyat --help", [*ENERGYAT, "--help"])):
        rows.append({"reference": name, "seconds": timed(cmd, args.repeat)[0]})
        print(json.dumps(rows[-1]), flush=True)
    for size in [] if args.skip_local else [int(s) for s in args.trials.split(",") if s]:
        study, floor = args.out / f"t{size}", args.out / f"t{size}-floor"
        as_run = size > args.loose_max  # written as a study's driver leaves it: each trial compacted at its end
        if not (as_run and args.continue_):
            shutil.rmtree(study, ignore_errors=True)
        shutil.rmtree(floor, ignore_errors=True)
        write = write_study(str(study), size, args.epochs, args.probe_every, compact_each=as_run)
        if not as_run:  # the commands on the loose files, as before compaction existed
            files = sum(1 for _ in (study / "tables").rglob("*.parquet"))
            floor_copy(study, floor)
            row = {**measure(study, floor, args.repeat, "loose", size), **write, "files": files}
            print(json.dumps(row), flush=True)
            rows.append(row)
        t0 = time.perf_counter()
        compact(str(study), merge=True)
        compact_s = time.perf_counter() - t0
        if as_run:
            floor_copy(study, floor)
        files = sum(1 for _ in (study / "tables").rglob("*.parquet"))
        row = {**measure(study, floor, args.repeat, "compacted", size), "compact_s": compact_s, "files": files, **(write if as_run else {})}
        print(json.dumps(row), flush=True)
        rows.append(row)
    smallest = min(int(s) for s in args.trials.split(",") if s)
    if not args.skip_local and smallest <= args.loose_max:  # the write path with the driver's compaction of each
        # finished trial, on the smallest size (a size above --loose-max was written so already)
        each = args.out / "each"
        shutil.rmtree(each, ignore_errors=True)
        write = write_study(str(each), smallest, args.epochs, args.probe_every, compact_each=True)
        row = {"trials": smallest, "stage": "write, each trial compacted at its end", **write}
        print(json.dumps(row), flush=True)
        rows.append(row)
    for size in [int(s) for s in args.s3.split(",") if s]:
        rows += s3_measure(size, args.epochs, args.probe_every, args.repeat)
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "tables.jsonl").open("a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
