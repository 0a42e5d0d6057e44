"""The Ray Tune trainable: a thin adapter from a Tune trial to :func:`run_trial`.

config (Optuna's suggestions) -> spec overrides -> :class:`TrialConfig` -> engine, reporting
every epoch with ``ray.tune.report(metrics, checkpoint=...)`` and resuming through
``ray.tune.get_checkpoint()``, like Ray's own ``train_cifar(config)`` example. This is the only
module of trainables/ that imports ray.
"""

from __future__ import annotations

import glob
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ray
import ray.tune as tune
import torch

from analysis.errors import EnergyatError
from analysis.stopping import StopRule
from analysis.store import StageClock, clear_stage, stop_request, write_stage
from trainables.config import parse_trial, trial_spec
from trainables.engine import run_trial, write_error_row

# Reported values the searcher may optimise: never NaN, or Optuna drops the trial's result.
OBJECTIVE_FALLBACK = 0.0


def _finite_metrics(row: Mapping[str, Any], objectives: list[str]) -> dict[str, Any]:
    metrics = {k: v for k, v in row.items() if isinstance(v, (int, float, str, bool)) or v is None}
    for name in objectives:
        value = metrics.get(name)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            metrics[name] = OBJECTIVE_FALLBACK
    return metrics


def ray_device(requested: str) -> torch.device:
    """The device Ray assigned to this trial: its GPU when it reserved one (`resources.gpu` > 0),
    the CPU when it reserved none, whatever torch can see.

    Ray (2.60) does not hide the GPUs from an actor that asked for none, so `device: auto` read
    as "any visible GPU" would put every zero-GPU trial of a GPU node on cuda:0, which Ray does
    not count. For a trial with a GPU, Ray sets CUDA_VISIBLE_DEVICES to the one it assigned, so
    torch numbers it 0; where that variable is not set (RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES),
    the assigned id is the physical index.
    """
    gpu_ids = [str(g) for g in ray.get_runtime_context().get_accelerator_ids().get("GPU", [])]
    if not gpu_ids:
        if requested == "cuda":  # the study spec refuses this pairing; a direct caller may not
            raise EnergyatError("`device: cuda` but Ray assigned this trial no GPU; set resources.gpu")
        return torch.device("cpu")
    if requested == "cpu":
        return torch.device("cpu")
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    index = visible.index(gpu_ids[0]) if gpu_ids[0] in visible else (0 if visible else int(gpu_ids[0]))
    return torch.device("cuda", index)


# A trial hands Ray Tune a checkpoint at its first epoch, then at most every CHECKPOINT_SECONDS,
# and with its last result. Tune keeps the newest three (study.runner: num_to_keep=3) and forces
# a snapshot of the experiment whenever a trial has checkpointed num_to_keep times since the last
# one, so that no snapshot names a deleted checkpoint; it snapshots every 10 s anyway, and prints a
# three-line "snapshotting has been triggered multiple times" warning when a forced snapshot comes
# within 5 s of the previous one. Checkpoints 10 s apart cannot put three into one 10-s snapshot
# period (a snapshot falls between the first and the second), so none is forced and Tune stays
# quiet however short the epochs: a 2-second digits epoch checkpointing every epoch would force a
# snapshot every few seconds. Three rather than two, because a short trial's first and last
# checkpoints alone make two. A restarted trial re-runs at most this many seconds of epochs (its
# rows are rewritten, the same).
CHECKPOINT_SECONDS = 10.0

STAGE_SECONDS = 5.0  # how often a trial's final evaluation rewrites its stage file
HANG_EXIT = 75  # the exit status of a worker ended by its watchdog (EX_TEMPFAIL)


class Watchdog:
    """Ends this worker process when no epoch finishes within `seconds` (`hang_timeout`).

    A hung trial (a stale network mount, a deadlocked collective, a data loader stuck on a pipe)
    reports nothing, so nothing on the driver's side ever sees it; it would hold its resources
    for ever. The watchdog, a daemon thread, first records the reason as the trial's `trials`
    row (`on_hang`), then exits the process: an exception could not interrupt a thread stuck in
    a system call. Ray Tune then restarts the trial from its checkpoint like any lost worker
    (`max_failures`), and ends it as ERROR when the hang persists; the study goes on.
    """

    def __init__(self, seconds: float, on_hang: Any) -> None:
        self.seconds = seconds
        self.on_hang = on_hang
        self.last = time.monotonic()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="energyat-watchdog", daemon=True)
        self.thread.start()

    def beat(self) -> None:
        self.last = time.monotonic()

    def stop(self) -> None:
        self.done.set()

    def _watch(self) -> None:
        while not self.done.wait(min(self.seconds / 4, 10.0)):
            if time.monotonic() - self.last > self.seconds:
                try:
                    self.on_hang()
                finally:
                    os._exit(HANG_EXIT)


def scratch_folder(trial_id: str) -> Path:
    """This attempt's checkpoint folder, ``<tmp>/energyat-<trial id>-<pid>``.

    A worker killed by SIGKILL cannot remove its folder, so each attempt first removes the folders
    of earlier attempts of the same trial whose process is gone. A folder whose process still runs
    is left alone: the worker of a lost node can outlive its raylet for a while, and the restarted
    attempt may run on the same machine (two nodes on one host, as in tests/test_cluster.py); when
    the attempts shared one folder, the old one's clean-up deleted the new one's restored checkpoint
    and the trial started again from epoch 0.
    """
    root = Path(tempfile.gettempdir())
    for old in root.glob(f"energyat-{glob.escape(trial_id)}-*"):
        pid = old.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    work = root / f"energyat-{trial_id}-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    return work


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: running
        return True
    return True


def energyat_trial(
    config: dict[str, Any], *, base_spec: dict[str, Any], study_dir: str, objectives: list[str], cpus: int, stop: StopRule = StopRule(),
    hang_timeout: float | None = None, scheduled: bool = False, checkpoint_every: int | None = None,
    pbt_metric: str | None = None,
) -> None:
    """Run one trial of a study under Ray Tune (see ``tune.with_parameters``)."""
    spec = trial_spec(base_spec, config)  # Optuna's flat suggestions: {"weat.power": 1.5}
    if spec.get("threads") is None:
        spec["threads"] = max(1, cpus)  # one torch thread per reserved CPU: no oversubscription
    cfg = parse_trial(spec)
    trial_id = tune.get_context().get_trial_id()
    work = scratch_folder(trial_id)
    watchdog = None
    if hang_timeout is not None:
        reason = f"error: hung: no epoch finished within {hang_timeout:g} s (hang_timeout)"

        def on_hang() -> None:
            print(f"energyat: trial {trial_id} {reason}; ending its worker", file=sys.stderr, flush=True)
            write_error_row(cfg, out=study_dir, trial_id=trial_id, reason=reason)

        watchdog = Watchdog(hang_timeout, on_hang)
    restored = tune.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as folder:
            shutil.copytree(folder, work, dirs_exist_ok=True)

    node_id = ray.get_runtime_context().get_node_id()  # which cluster node ran the trial

    last_checkpoint = -math.inf

    def report(row: dict[str, Any], ckpt_dir: Path) -> str | None:
        nonlocal last_checkpoint
        if watchdog is not None:
            watchdog.beat()
        ranked: list[str] = []
        if checkpoint_every is not None:  # PBT: at its perturbation epochs, where it ranks the trials and clones a top one's checkpoint
            due = int(row["epoch"]) > 0 and int(row["epoch"]) % checkpoint_every == 0
            ranked = [pbt_metric] if due and pbt_metric else []  # a diverged model's NaN ranks last, not unordered
        else:
            due = time.monotonic() - last_checkpoint >= CHECKPOINT_SECONDS
        metrics = _finite_metrics(row, objectives + ranked) | {"ray_node_id": node_id}
        checkpoint = None
        if row.get("done") or due:
            checkpoint = tune.Checkpoint.from_directory(str(ckpt_dir))
            last_checkpoint = time.monotonic()
        # returns once the driver has decided about this epoch (a function trainable reports
        # synchronously), so a scheduler's stop request for it is already written
        tune.report(metrics, checkpoint=checkpoint)
        return stop_request(study_dir, trial_id) if scheduled and not row.get("done") else None

    clock = StageClock(every=STAGE_SECONDS)

    def stage(what: str, done: int, total: int) -> None:
        # the final evaluation: no epoch ends meanwhile, so the watchdog hears from here, and the
        # driver's view reads the stage file (written at a new stage, then every STAGE_SECONDS)
        if watchdog is not None:
            watchdog.beat()
        current, due = clock(what, done, total)
        if due:
            write_stage(study_dir, trial_id, current)

    try:
        run_trial(cfg, out=study_dir, trial_id=trial_id, checkpoint_dir=work, on_epoch=report, stop=stop,
                  device=ray_device(cfg.device), on_stage=stage)
    finally:
        if watchdog is not None:
            watchdog.stop()
        shutil.rmtree(work, ignore_errors=True)
        clear_stage(study_dir, trial_id)
