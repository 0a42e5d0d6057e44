"""What Ray Tune costs a study: per trial start, per report, and trials per hour.

    python benchmarks/study_overhead.py [--trials 6] [--reports 20] [--checkpoint-kb 1100] [--import-repeats 5]
        [--study examples/smoke.yaml] [--set key=value ...]

1. Tune alone, measured against itself: function trainables that do nothing but report, with a
   checkpoint directory of `--checkpoint-kb` (small_cnn's last.pt, with SGD momentum, plus
   best.pt: about 1.1 MB), through the same local Ray as `energyat run`, one trial at a
   time. Per trial = wall / trials of a one-report run; per report = the seconds the
   trainable itself spends in
   `tune.report(..., checkpoint=...)`, timed inside it (wall-clock differences between runs
   were smaller than the run-to-run noise of trial starts).
2. A new worker's imports: a fresh Python process importing what a Tune worker imports before
   its first trial (`trainables.tune_adapter`), median of `--import-repeats`, against the
   reference of the same import with torchvision imported first (energyat imports it only to read
   a torchvision dataset; its import pulls in torch._dynamo). The two alternate, under the same load.
3. The study itself: `--study` run through ``study.runner.run_study`` one trial at a time
   (``max_concurrent=1``, so the accounting is plain), against the engine's own seconds in the
   `trials` table. Overhead per trial = (study wall - sum of trial seconds) / trials: Optuna's
   suggestion, Tune's bookkeeping and checkpoint copies, and for the first trial the worker's
   start. Side by side in the same run, the reference: the same study with a fresh worker per
   trial (Tune's default, `reuse_actors=False`), where each trial also pays a process start and
   the import of torch. Trials per hour is printed at the study's own `max_concurrent` too.

Prints one JSON line per measurement and a summary table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ray
from ray import tune

from analysis.query import open_tables
from analysis.store import versions
from study import runner
from study.runner import _init_ray, run_study
from study.spec import load_spec

REPO = Path(__file__).resolve().parent.parent


def _noop_trainable(config: dict[str, Any]) -> None:
    """Reports `reports` times with a checkpoint; the last report carries the seconds the
    others took (a report blocks until Tune has its checkpoint copied into the storage)."""
    folder = Path(tempfile.mkdtemp())
    (folder / "last.pt").write_bytes(os.urandom(config["checkpoint_bytes"]))
    t0 = time.perf_counter()
    for i in range(config["reports"] - 1):
        tune.report({"epoch": i}, checkpoint=tune.Checkpoint.from_directory(str(folder)))
    tune.report({"epoch": config["reports"] - 1, "report_seconds": time.perf_counter() - t0})


def tune_alone(trials: int, reports: int, checkpoint_bytes: int, storage: Path) -> tuple[float, float]:
    """(wall seconds, mean seconds per report) of `trials` no-op trials, one at a time."""
    tuner = tune.Tuner(
        tune.with_resources(_noop_trainable, {"cpu": 1}),
        param_space={"reports": reports, "checkpoint_bytes": checkpoint_bytes},
        tune_config=tune.TuneConfig(num_samples=trials, max_concurrent_trials=1),
        run_config=tune.RunConfig(storage_path=str(storage), name=f"noop-{reports}", verbose=0),
    )
    t0 = time.perf_counter()
    results = tuner.fit()
    wall = time.perf_counter() - t0
    if results.errors:
        raise SystemExit(f"no-op trials failed: {results.errors[0]}")
    per_report = sum(r.metrics["report_seconds"] for r in results) / max(1, trials * (reports - 1))
    return wall, per_report


@contextmanager
def fresh_workers() -> Iterator[None]:
    """The reference: energyat's own Tune configuration but a new worker process for every trial."""
    own = runner._tune_config
    runner._tune_config = lambda *a, **k: dataclasses.replace(own(*a, **k), reuse_actors=False)  # type: ignore[assignment]
    try:
        yield
    finally:
        runner._tune_config = own


def import_seconds(*, eager_torchvision: bool) -> float:
    """Wall seconds of a new Python process importing trainables.tune_adapter."""
    code = ("import torchvision; " if eager_torchvision else "") + "import trainables.tune_adapter"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
    return time.perf_counter() - t0


def study_wall(spec_path: str, overrides: list[str], storage: Path, name: str) -> tuple[float, int, float, int]:
    """(wall, trials, sum of trial seconds, trial-epochs) of one study run."""
    study = load_spec(spec_path, overrides)
    t0 = time.perf_counter()
    study_dir, _failed = run_study(study, address=None, storage=str(storage), name=name)
    wall = time.perf_counter() - t0
    con = open_tables(study_dir)
    n, seconds, epochs = con.execute("select count(*), sum(seconds), sum(epochs_run) from trials").fetchone()
    con.close()
    return wall, n, seconds, epochs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=6, help="no-op trials per Tune-alone run")
    parser.add_argument("--reports", type=int, default=20, help="reports per no-op trial in the many-reports run")
    parser.add_argument("--checkpoint-kb", type=int, default=1100)
    parser.add_argument("--import-repeats", type=int, default=5, help="new processes per arm of the import measurement")
    parser.add_argument("--study", default="examples/smoke.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key of --study")
    args = parser.parse_args()
    print(f"# {time.strftime('%Y-%m-%d')} {os.cpu_count()} CPUs, versions {versions()}")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        _init_ray(None)
        rows.append({"what": "ray_init_seconds", "value": round(time.perf_counter() - t0, 2)})
        one, _ = tune_alone(args.trials, 1, args.checkpoint_kb * 1024, Path(tmp))
        _, per_report = tune_alone(args.trials, args.reports, args.checkpoint_kb * 1024, Path(tmp))
        rows.append({"what": "tune_seconds_per_trial", "value": round(one / args.trials, 3), "trials": args.trials})
        rows.append({"what": "tune_seconds_per_report", "value": round(per_report, 4), "checkpoint_kb": args.checkpoint_kb})
        lazy, eager = [], []
        for _ in range(args.import_repeats):  # alternating, so that both arms see the same load
            lazy.append(import_seconds(eager_torchvision=False))
            eager.append(import_seconds(eager_torchvision=True))
        rows.append({"what": "worker_import_seconds_torchvision_eager", "value": round(statistics.median(eager), 2), "runs": len(eager)})
        rows.append({"what": "worker_import_seconds", "value": round(statistics.median(lazy), 2), "runs": len(lazy)})
        with fresh_workers():
            wall, n, seconds, epochs = study_wall(args.study, [*args.set, "max_concurrent=1"], Path(tmp), "serial-fresh")
        rows.append({"what": "study_overhead_seconds_per_trial_fresh_workers", "value": round((wall - seconds) / n, 2), "study": args.study,
                     "trials": n, "wall": round(wall, 1), "trial_seconds": round(seconds, 1), "trial_epochs": epochs})
        wall, n, seconds, epochs = study_wall(args.study, [*args.set, "max_concurrent=1"], Path(tmp), "serial")
        rows.append({"what": "study_overhead_seconds_per_trial", "value": round((wall - seconds) / n, 2), "study": args.study,
                     "trials": n, "wall": round(wall, 1), "trial_seconds": round(seconds, 1), "trial_epochs": epochs})
        wall, n, seconds, epochs = study_wall(args.study, args.set, Path(tmp), "concurrent")
        rows.append({"what": "trials_per_hour", "value": round(3600 * n / wall, 1), "study": args.study, "trials": n,
                     "wall": round(wall, 1), "trial_epochs": epochs, "note": "the study's own max_concurrent"})
    ray.shutdown()
    print("| measurement | value |")
    print("|---|---|")
    for r in rows:
        print(f"| {r['what']} | {r['value']} |")
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
