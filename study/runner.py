"""Studies: a Ray Tune Tuner over the trial adapter, searched by Optuna.

    STUDY_DIR = <storage>/<name>/
      spec.yaml         the spec as run (resolved), schema_version, study_name
      optuna.journal    Optuna JournalStorage (plain optuna and optuna-dashboard read it)
      tune/             the Ray Tune experiment: trial dirs named by trial id, checkpoints
      tables/           epochs, samples, trials (written by the trials themselves)

``<storage>`` is a local path or a pyarrow filesystem URI (s3://bucket/prefix?endpoint_override=...).
A study directory is passed around as a string: a resolved local path, or the URI of the study,
query included (:func:`analysis.store.join`), which every process opens with
:func:`analysis.store.filesystem`.

This module is the orchestration, top to bottom: :func:`run_study` checks what Ray cannot check
for it, writes spec.yaml, starts Ray and fits a Tuner built from the parsed study;
:func:`resume_study` sets the lost and errored trials right (:mod:`study.recovery`) and fits the
restored Tuner. The parts live by concept: the journal in :mod:`study.journal`, the searchers
in :mod:`study.search`, Tune's callbacks in :mod:`study.callbacks`, the schedulers in
:mod:`study.scheduler`, the samplers in :mod:`study.sampler`.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
import ray
import yaml
from pyarrow.fs import FileSystem, FileType
from ray import tune
from ray.tune.search.basic_variant import BasicVariantGenerator

import analysis
import study as study_package
import trainables
from analysis.errors import EnergyatError, StoreError, one_line
from analysis.schema import SCHEMA_VERSION
from analysis.store import SHIPPED_SHA, filesystem, git_sha, is_uri, join, open_storage, remove_stale_temporaries
from study.callbacks import Compaction, JournalUpload, LiveView, OptunaRecord, TrialErrors, compact_or_warn, id_of
from study.journal import check_journal, journal_storage, reconcile_journals, upload_journal
from study.layout import JOURNAL, journal_dir, journal_file, study_dir_for
from study.live import Board
from study.loggers import logger_callbacks
from study.recovery import Failed, Interrupted, failed_trials, reconcile_lost_trials, set_aside_errored
from study.sampler import check_sampler_for
from study.scheduler import build_scheduler, domain
from study.scheduler_keys import STOPPING, check_scheduler_for, perturbation_interval, ranked_metric
from study.search import StudyLimiter, StudySearch, build_sampler
from study.space import SearchSpace
from study.spec import Study, check_placement, load_study
from trainables.tune_adapter import energyat_trial


def run_study(study: Study, *, address: str | None, storage: str | None, name: str | None,
              dashboard_port: int | None = None) -> tuple[str, list[Failed]]:
    """Launch a study; returns its directory (a local path or a URI) and the trials that failed
    (their restarts spent), or raises :class:`study.recovery.Interrupted` when SIGINT stopped
    the fit. Validation happens before Ray starts."""
    if name is not None:
        study = study.renamed(name)
    keys = study.keys
    check_sampler_for(keys.sampler, objectives=len(study.objectives), dims=study.search, points=keys.points_to_evaluate or ())
    check_scheduler_for(keys.scheduler, epochs=study.trial.epochs, dims=study.search, base_method=study.trial.method,
                        objectives=len(study.objectives), sampler=keys.sampler, probe_every=study.trial.probe.every)
    check_placement(study.trial, keys)
    check_dashboard(address, dashboard_port)
    study_dir = study_dir_for(storage or keys.storage, study.name)
    fs, root = open_storage(study_dir)  # a bad scheme, endpoint or bucket: one line, before Ray
    if fs.get_file_info(f"{root}/spec.yaml").type != FileType.NotFound:
        raise EnergyatError(f"{study_dir} already holds a study; continue it with `energyat resume {study_dir}` or choose another --name")
    study_name = f"{study.name}-{uuid.uuid4().hex[:8]}"
    if is_uri(study_dir):
        try:
            journal_dir().mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise EnergyatError(f"cannot create the journal folder {journal_dir()}: {one_line(exc)}; set ENERGYAT_JOURNAL_DIR") from exc
    journal = journal_file(study_dir, study_name)
    document = {"schema_version": SCHEMA_VERSION, "study_name": study_name, "spec": dict(study.spec), "resolved": study.trial.to_dict()}
    try:
        fs.create_dir(root, recursive=True)
        with fs.open_output_stream(f"{root}/spec.yaml") as f:
            f.write(yaml.safe_dump(document, sort_keys=False).encode())
    except OSError as exc:
        raise StoreError(f"cannot create the study directory {study_dir}: {one_line(exc)}; choose a writable --storage") from exc

    _init_ray(address, dashboard_port)
    pbt = keys.scheduler.name == "pbt"
    if pbt:  # no searcher creates the Optuna study, so it is created here
        optuna.create_study(study_name=study_name, storage=journal_storage(journal), direction="maximize")
    upload = JournalUpload(study_name, study_dir) if is_uri(study_dir) else None
    tune_config = _tune_config(study, study_dir, study_name, journal, upload)  # the searcher creates the Optuna study
    if upload is not None:
        upload_journal(journal, study_dir)  # the empty study: a resume anywhere finds a journal
    # PBT's starting distributions; under Optuna the searcher suggests every parameter
    param_space = {d.key: domain(d) for d in study.search} if pbt else {}
    tuner = tune.Tuner(_trainable(study, study_dir), param_space=param_space, tune_config=tune_config,
                       run_config=_run_config(study, study_dir, study_name, upload))
    return _fit(tuner, study_dir, upload=journal if upload is not None else None)


def resume_study(study_dir: str | Path, *, address: str | None, retry_errored: bool = False,
                 dashboard_port: int | None = None) -> tuple[str, list[Failed]]:
    """Continue an interrupted study: Tuner.restore with the same trainable and searcher. Trials
    that ended as ERROR stay so, unless `retry_errored`: then each starts again from epoch 0
    (a fresh second life: the rows of the failed one move to ``STUDY_DIR/retried/``, its Optuna
    trial stays FAIL and a new one with the same parameters receives its results). Returns the
    study directory and the trials that failed, or raises :class:`study.recovery.Interrupted`
    as :func:`run_study` does."""
    check_dashboard(address, dashboard_port)
    loaded = load_study(study_dir)
    location = loaded.directory
    remote = is_uri(location)
    if remote:
        reconcile_journals(location, loaded.journal)
    check_journal(loaded.journal, where=join(location, JOURNAL))
    storage_path, storage_fs = _tune_storage(location)
    tune_dir = f"{storage_path}/tune"
    if not tune.Tuner.can_restore(tune_dir, storage_filesystem=storage_fs):
        raise EnergyatError(f"{study_dir} has no restorable Ray Tune experiment under tune/")
    reconcile_lost_trials(location, loaded.journal, tune_dir, storage_fs)
    if retry_errored:
        set_aside_errored(location, tune_dir, storage_fs)
    _init_ray(address, dashboard_port)
    # Tune restores the searcher, the scheduler and the callbacks from its experiment state; only
    # the trainable, a function, must be given again
    tuner = tune.Tuner.restore(tune_dir, trainable=_trainable(loaded.study, location), resume_unfinished=True, resume_errored=False,
                               restart_errored=retry_errored, storage_filesystem=storage_fs)
    return _fit(tuner, location, upload=loaded.journal if remote else None)


def _fit(tuner: tune.Tuner, study_dir: str, *, upload: Path | None) -> tuple[str, list[Failed]]:
    """A run's or a resume's fit and what follows it: the journal `upload` sent to a remote study
    (its final state; JournalUpload sent the ones before), the finished trials' rows compacted to a
    part per table, and :class:`Interrupted` when SIGINT stopped the fit."""
    with _tune_output_off(), _sigint_watch() as interrupted:
        results = tuner.fit()
        stopped = interrupted()
    if upload is not None:
        upload_journal(upload, study_dir)
    remove_stale_temporaries(study_dir)  # no trial runs now: what a killed writer left is garbage
    compact_or_warn(study_dir, merge=True)
    if stopped:
        raise Interrupted(study_dir)
    return study_dir, failed_trials(results, study_dir)


def _trainable(study: Study, study_dir: str) -> Any:
    """The trial adapter with the study's parameters and each trial's resources."""
    keys = study.keys
    pbt = keys.scheduler.name == "pbt"
    cpus = float(keys.resources.get("cpu", 1))
    return tune.with_resources(
        tune.with_parameters(energyat_trial, base_spec=dict(study.spec), study_dir=study_dir, objectives=list(study.objectives),
                             cpus=max(1, int(cpus)), stop=keys.early_stop, hang_timeout=keys.hang_timeout,
                             scheduled=keys.scheduler.name in STOPPING,
                             # PBT ranks the trials and clones a top one's checkpoint at each perturbation: one must exist there
                             checkpoint_every=perturbation_interval(keys.scheduler, epochs=study.trial.epochs,
                                                                    probe_every=study.trial.probe.every) if pbt else None,
                             pbt_metric=ranked_metric(study.objectives[0]) if pbt else None),
        {"cpu": cpus, "gpu": float(keys.resources.get("gpu", 0))},
    )


def _tune_config(study: Study, study_dir: str, study_name: str, journal: Path, upload: JournalUpload | None) -> tune.TuneConfig:
    """The searcher (Optuna's, or for PBT Tune's random starting points) and the scheduler."""
    keys = study.keys
    search_alg: Any
    if keys.scheduler.name == "pbt":  # Tune refuses a searcher beside PBT: random starting points, recorded in Optuna by OptunaRecord
        search_alg = BasicVariantGenerator(points_to_evaluate=keys.points_to_evaluate or None, max_concurrent=keys.max_concurrent,
                                           random_state=study.trial.seed)
    else:
        several = len(study.objectives) > 1
        searcher = StudySearch(
            upload=upload,
            study_dir=study_dir,
            space=SearchSpace(study.search, study.trial.method),
            metric=list(study.objectives) if several else study.objectives[0],
            mode=["max"] * len(study.objectives) if several else "max",
            storage=journal_storage(journal),
            study_name=study_name,
            sampler=build_sampler(keys.sampler, objectives=len(study.objectives), seed=study.trial.seed, dims=study.search),
            points_to_evaluate=keys.points_to_evaluate or None,
        )
        search_alg = StudyLimiter(searcher, max_concurrent=keys.max_concurrent)
    return tune.TuneConfig(
        search_alg=search_alg,
        scheduler=build_scheduler(keys.scheduler, study_dir=study_dir, metric=study.objectives[0], epochs=study.trial.epochs, dims=study.search,
                                  probe_every=study.trial.probe.every),
        num_samples=keys.samples,
        trial_dirname_creator=id_of,
        trial_name_creator=id_of,
        # a finished trial's worker takes the next trial instead of a new process starting and
        # importing torch again (BENCHMARKS.md section 2: 2 s per trial beyond its training instead
        # of 16 on the smoke study). Safe because a trial keeps no state in its process: it seeds
        # torch, sets its threads, and starts and stops its watchdog and scratch folder itself
        # (tests/test_reuse.py)
        reuse_actors=True,
    )


def _run_config(study: Study, study_dir: str, study_name: str, upload: JournalUpload | None) -> tune.RunConfig:
    """Where Tune writes, what it keeps, and the callbacks that watch the trials."""
    keys = study.keys
    pbt = keys.scheduler.name == "pbt"
    board = Board(name=study.name, total=keys.samples, epochs=study.trial.epochs)
    callbacks: list[tune.Callback] = [LiveView(board, study.trial.method, study_dir), TrialErrors(dict(study.spec), study_dir), Compaction(study_dir)]
    if pbt:
        callbacks.append(OptunaRecord(study_dir, study_name, study.objectives[0], study.search))
    if upload is not None:
        callbacks.append(upload)  # after OptunaRecord: it uploads what that wrote
    callbacks += logger_callbacks(keys.loggers, study_dir=study_dir, name=study.name)
    storage_path, storage_fs = _tune_storage(study_dir)
    return tune.RunConfig(
        name="tune",
        storage_path=storage_path,
        storage_filesystem=storage_fs,
        failure_config=tune.FailureConfig(max_failures=keys.max_failures),
        # PBT restores a bottom trial from a top trial's checkpoint of some epochs ago, which a
        # num_to_keep would have deleted meanwhile, so under PBT a trial keeps every checkpoint
        # (one per perturbation_interval epochs); otherwise three: see
        # trainables.tune_adapter.CHECKPOINT_SECONDS for why not two
        checkpoint_config=tune.CheckpointConfig(num_to_keep=None if pbt else 3),
        callbacks=callbacks,
        verbose=0,
    )


def check_dashboard(address: str | None, dashboard_port: int | None) -> None:
    """`--dashboard` starts a local Ray's dashboard; a cluster has its head node's (refused before Ray starts)."""
    if dashboard_port is None:
        return
    if address or os.environ.get("RAY_ADDRESS"):
        raise EnergyatError("--dashboard starts the dashboard of a local Ray; a cluster's is its head node's "
                            "(`ray start --head --include-dashboard=true --dashboard-host=127.0.0.1`, then an SSH tunnel)")
    if not 1024 <= dashboard_port <= 65535:
        raise EnergyatError(f"--dashboard-port must be in 1024-65535, got {dashboard_port}")
    if importlib.util.find_spec("aiohttp") is None:  # Ray's dashboard server, in ray[default]
        raise EnergyatError("--dashboard needs Ray's dashboard packages: pip install 'energyat[dashboard]'")


@contextmanager
def _sigint_watch() -> Iterator[Callable[[], bool]]:
    """Around a Tune fit: a function that says whether SIGINT stopped it.

    Ray Tune gives no other sign: on the first SIGINT it saves the experiment, returns from
    `fit()` as after a finished run, and puts back the SIGINT handler it found when the fit
    began. The handler installed here (Python's own behaviour, KeyboardInterrupt) is therefore
    back in place exactly when a SIGINT stopped the fit. Where Tune installs no handler (not the
    main thread, or TUNE_DISABLE_SIGINT_HANDLER) nothing can be told, and the answer is False.
    """
    def default(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread() or os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0") != "0":
        yield lambda: False
        return
    previous = signal.signal(signal.SIGINT, default)
    try:
        yield lambda: signal.getsignal(signal.SIGINT) is default
    finally:
        signal.signal(signal.SIGINT, previous)


def _init_ray(address: str | None, dashboard_port: int | None = None) -> None:
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        # The driver's own energyat travels to every worker with the study (Ray's py_modules),
        # so a node installed from another revision days earlier still runs exactly this code;
        # the nodes need only energyat's dependencies. Its revision goes along for provenance.
        runtime_env = {"py_modules": [analysis, study_package, trainables], "env_vars": {SHIPPED_SHA: git_sha()}}
        try:
            ray.init(address=address, log_to_driver=False, runtime_env=runtime_env)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            hint = "" if os.environ.get("RAY_AUTH_MODE") == "token" else (
                "; a cluster with token authentication (energyat's cluster.yaml) also needs RAY_AUTH_MODE=token and its token "
                "in ~/.ray/auth_token or RAY_AUTH_TOKEN")
            raise EnergyatError(f"cannot join the Ray cluster at {address}: {' '.join(str(exc).split())[:200]}{hint}") from exc
    else:
        # A local Ray without the dashboard unless asked for (`--dashboard`), and then on loopback
        # only: it is a web UI that runs jobs for whoever reaches it. Ray 2.60's gRPC servers still
        # listen on every interface, whatever the node address (ray-project/ray#59852 moves them
        # to the node's): docs/reliability.md says what to do.
        if dashboard_port is None:
            ray.init(include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
            return
        context = ray.init(include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=dashboard_port, log_to_driver=False,
                           _node_ip_address="127.0.0.1")
        print(f"energyat: Ray dashboard at http://{context.dashboard_url} (this machine only; it stops with the study)", file=sys.stderr, flush=True)


def _tune_storage(study_dir: str) -> tuple[str, FileSystem | None]:
    """(storage_path, storage_filesystem) for Ray Tune, new or restored: on a URI, Tune writes
    tune/ through the same pyarrow filesystem as the tables; locally, Tune's default (None)."""
    if not is_uri(study_dir):
        return study_dir, None
    fs, root = filesystem(study_dir)
    return root, fs


@contextmanager
def _tune_output_off() -> Iterator[None]:
    """Ray Tune's console output off while a study runs (energyat's own is study.live's Board).

    At `verbose=0` Tune's newer output engine still prints its start and end blocks on stdout,
    among them "To visualize your results with TensorBoard, run: tensorboard --logdir
    /tmp/ray/session_.../driver_artifacts", a folder that is not the study's (its event files are
    in STUDY_DIR/tune/<trial>/). RAY_AIR_NEW_OUTPUT=0 selects Tune's older engine, which prints
    nothing at verbose 0; the variable is restored afterwards."""
    before = os.environ.get("RAY_AIR_NEW_OUTPUT")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = before
