"""The training engine: one trial, one loop.

``run_trial`` reads like airbench's ``main()``, each step a function named for it: set up (data
on the device as uint8, model, optimizer, probes) and resume, then per epoch: train -> evaluate
on the validation split and probe energies -> detect phase and select the best epoch -> write
rows -> decide whether to stop (:func:`_stop_reason`, the one place) -> checkpoint -> report.
Then the best checkpoint's final evaluation on the test set, and the final `trials` row.

What is selected, and on what: the best epoch (``best.pt``), the `best_val_*` columns, the
searcher's objective and the stop rule's patience all read the validation split (`dataset.val_size`
images held out of the training set). The test set is read by the final evaluation and by a
per-epoch test curve kept for the paper's figures, which selects nothing. Every evaluation runs in
fp32 (:mod:`trainables.probe`), whatever the training precision.

Where speed comes from (docs/design.md section 7), each with the reason it is safe:
- the whole dataset sits on the device as uint8 and is augmented there in batches: equivalent
  results to a per-sample CPU DataLoader, but no host-to-device copy per batch;
- attacks take input gradients only (``torch.autograd.grad``): no weight gradients computed;
- metrics accumulate in device tensors and the host synchronises once per epoch;
- channels_last everywhere (oneDNN's CPU convolutions are 1.1-1.3x faster with it too) and
  bf16 autocast on CUDA, or on the CPU with `precision: bf16` (:func:`autocast`).

The trial runs the same with or without Ray: ``study/`` passes ``on_epoch`` to report to Ray
Tune; ``energyat train`` passes a progress printer.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from analysis.errors import EnergyatError
from analysis.phases import DETECTOR_COLUMNS, OnlineDetector, PhaseResult, detect
from analysis.schema import SCHEMA_VERSION
from analysis.stopping import StopRule
from analysis.store import (
    check_name,
    check_schema_version,
    is_uri,
    provenance,
    read_trial_outcome,
    read_trial_rows,
    write_epoch_rows,
    write_trial_row,
)
from trainables import checkpoint
from trainables.awp import WeightPerturbation
from trainables.config import TrialConfig, flatten
from trainables.data import ImageData, augment, load_dataset, to_float
from trainables.evaluate import StageCallback, evaluate, write_evals
from trainables.methods import METHODS, MethodParams, awp_warmup, selection_metric
from trainables.models import build_model
from trainables.precision import autocast, training_precision
from trainables.probe import (
    PROBE_KEYS,
    ProbeSet,
    eval_seed,
    probe,
    probe_attacks,
    probe_columns,
    probe_set,
    sample_columns,
    whole_split,
)
from trainables.schedules import lr_at, momentum_at
from trainables.subjects import Subject

# Called with each epoch's row and the checkpoint directory once both are written; returns a
# stop reason (e.g. "scheduler") to end the trial, or None to go on. The trial's last epoch is
# reported after the final evaluation, with the `trials` outcome merged into its row, so that
# a caller (Ray Tune) that stops listening after it has seen everything.
EpochCallback = Callable[[dict[str, Any], Path], "str | None"]

# torch's thread count when this process started (a Ray worker: its CPUs), what `threads: null` means
_PROCESS_THREADS = torch.get_num_threads()


def select_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise EnergyatError("`device: cuda` was asked for but no CUDA device is visible; use `device: auto` or `cpu`")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.current_device()} ({torch.cuda.get_device_name()})"
    return "cpu"


@dataclass
class _Progress:
    """What the checkpoint carries besides weights: where the trial stands."""

    next_epoch: int = 0
    best_acc: float = -math.inf  # the `select` metric's best value so far (validation robust accuracy unless select says otherwise)
    best_clean: float = math.nan  # validation clean accuracy at that epoch
    best_robust: float = math.nan  # validation robust accuracy at that epoch
    best_epoch: int | None = None
    seconds: float = 0.0
    stop_reason: str | None = None
    final: dict[str, float | int | None] = field(default_factory=dict)  # the final_* columns, once evaluated


def _train_epoch(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    cfg: TrialConfig,
    data: ImageData,
    params: MethodParams,
    epoch: int,
    device: torch.device,
    average: Callable[[], None] | None = None,
    awp: WeightPerturbation | None = None,
) -> dict[str, float]:
    """One pass over the training set. Metrics stay on the device until the end. `average`,
    when given, runs after every optimiser step (the weight average's update); `awp`, when
    given, perturbs the weights for each step's loss and restores them after it."""
    method = METHODS[cfg.method]
    n = len(data.train_y)
    order = torch.randperm(n, device=device)
    bounds = list(range(0, n, cfg.batch_size)) + [n]
    if bounds[-1] - bounds[-2] < 2 and len(bounds) > 2:  # batch norm cannot train on 1 sample
        bounds.pop(-2)
    batches = len(bounds) - 1
    # sums: loss * b, clean correct, adv correct, weight sum; then min/max weight. The sample
    # count is known on the host: building it on the device would be a copy per step.
    sums = torch.zeros(4, device=device, dtype=torch.float64)
    w_min = torch.full((), math.inf, device=device)
    w_max = torch.full((), -math.inf, device=device)
    lr_sum = 0.0
    model.train()
    for i in range(batches):
        lr = lr_at(cfg.schedule, lr=cfg.lr, epochs=cfg.epochs, epoch=epoch, batch=i, batches=batches)
        lr_sum += lr
        for group in opt.param_groups:
            group["lr"] = lr
            if cfg.schedule.cycle_momentum:
                group["momentum"] = momentum_at(cfg.schedule, epochs=cfg.epochs, epoch=epoch, batch=i, batches=batches)
        idx = order[bounds[i] : bounds[i + 1]]
        x = to_float(augment(data.train_x[idx], crop_pad=data.crop_pad, flip=data.flip))
        y = data.train_y[idx]
        with autocast(device, cfg.precision):
            x_adv = method.inputs(model, x, y, params)  # crafted with the unperturbed weights
            if awp is not None:
                v = awp.direction(method.loss, x, y, x_adv, params)
                awp.shift(v, +1)
            loss, parts = method.loss(model, x, y, x_adv, params=params)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if awp is not None:
            awp.shift(v, -1)  # the step's update kept, the perturbation taken off
        if average is not None:
            average()
        w = parts.weights.detach().float()
        sums += torch.stack(
            [
                loss.detach().double() * len(y),
                (parts.logits.argmax(1) == y).sum().double(),
                (parts.logits_adv.argmax(1) == y).sum().double(),
                w.sum().double(),
            ]
        )
        w_min = torch.minimum(w_min, w.min())
        w_max = torch.maximum(w_max, w.max())
    # the epoch's one host synchronisation (benchmarks/gpu_check.py counts them)
    loss_sum, clean, adv, w_sum, lowest, highest = torch.cat([sums, torch.stack([w_min, w_max]).double()]).tolist()
    count = bounds[-1]
    return {
        "lr": lr_sum / batches,
        "train_loss": loss_sum / count,
        "train_clean_acc": clean / count,
        "train_adv_acc": adv / count,
        "weight_mean": w_sum / count,
        "weight_min": lowest,
        "weight_max": highest,
        "images": count,
    }


@dataclass
class EpochProbes:
    """The fixed image sets a trial evaluates at each probed epoch."""

    train: ProbeSet  # `probe.train_size` training images: energies under the method's own x*
    val: ProbeSet  # the whole validation split: selects the best epoch
    test: ProbeSet | None  # `probe.test_size` test images: the per-epoch test curve (None at size 0)


def epoch_probes(cfg: TrialConfig, data: ImageData) -> EpochProbes:
    seed, k = cfg.dataset.seed, data.num_classes
    test = probe_set("test", data.test_x, data.test_y, cfg.probe.test_size, seed + 2, k) if cfg.probe.test_size else None
    return EpochProbes(
        train=probe_set("train", data.train_x, data.train_y, cfg.probe.train_size, seed + 1, k),
        val=whole_split("val", data.val_x, data.val_y, seed + 3, k),
        test=test,
    )


def probe_epoch(model: nn.Module, probes: EpochProbes, cfg: TrialConfig, params: MethodParams, epoch: int) -> dict[str, dict[str, np.ndarray] | None]:
    """Per-sample values of one probed epoch: ``train`` (the method's x* and targeted PGD),
    ``val`` and ``test`` (eval PGD). Each set draws its random starts from its own seed
    (:func:`trainables.probe.eval_seed`), so the same weights give the same numbers again."""
    train_attack, eval_attack, targeted = probe_attacks(cfg, params)
    b = cfg.batch_size
    device = next(model.parameters()).device
    # the adversarial examples in the training precision (crafting is most of a probe), their
    # energies and accuracies in fp32 (probe): tests/test_precision.py bounds what this changes;
    # the validation split's too only with `all`, since it selects the best epoch
    craft = (lambda: autocast(device, cfg.precision)) if cfg.probe.craft in ("probes", "all") else None
    craft_val = craft if cfg.probe.craft == "all" else None

    def seed(split: str) -> int:
        return eval_seed(cfg.seed, epoch, split)

    out: dict[str, dict[str, np.ndarray] | None] = {
        "train": probe(model, probes.train.x, probes.train.y, attack=train_attack, targeted=targeted, targets=probes.train.targets,
                       batch_size=b, seed=seed("train"), craft=craft),
        "val": probe(model, probes.val.x, probes.val.y, attack=eval_attack, batch_size=b, seed=seed("val"), craft=craft_val),
        "test": None,
    }
    if probes.test is not None:
        out["test"] = probe(model, probes.test.x, probes.test.y, attack=eval_attack, batch_size=b, seed=seed("test"), craft=craft)
    return out


def final_evaluation(
    model: nn.Module, data: ImageData, cfg: TrialConfig, *, out: str, trial_id: str, weights: str, device: torch.device,
    progress: StageCallback | None = None,
) -> dict[str, float | int | None]:
    """The best checkpoint on the test set (:func:`trainables.evaluate.evaluate`): clean and
    PGD-(final_eval.pgd_steps) on the first `final_eval.n` images, the original AutoAttack on the
    first `final_eval.autoattack_n`; rows in `evals`, the `final_*` values returned, with how many
    images each used (`final_n`, `final_autoattack_n`)."""
    fe = cfg.final_eval
    results = evaluate(model, data, cfg, attacks=("clean", "pgd", "autoattack"), n=fe.n, autoattack_n=fe.autoattack_n,
                       pgd_steps=fe.pgd_steps, seed=cfg.seed, progress=progress)
    subject = Subject(trial_id, "trial", cfg, weights, cfg.method, cfg.model, cfg.name, load=lambda _data: model)
    write_evals(out, subject, results, seed=cfg.seed, evaluated_by="final_eval", device=device_label(device))
    found = {r.attack: r for r in results}
    counts = {"final_n": found["clean"].n, "final_autoattack_n": found["autoattack"].n if "autoattack" in found else None}
    return {f"final_{name}_acc": found[name].accuracy if name in found else math.nan for name in ("clean", "pgd", "autoattack")} | counts


class OutputConflictError(EnergyatError):
    pass


def _rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# Distinct graphs a compiled model needs in a trial, at most (measured with the aot_eager backend
# on digits, tests/test_compile.py): the attack (input gradient, parameters frozen), the training
# forward, the clean logits without gradients, times train and eval mode, autocast on and off
# (TRADES' fp32 step), and once more when the last batch is smaller: 12 for TRADES and WEAT under
# bf16, 6 for SAT. torch's default limit of 8 recompiles per function would send TRADES back to
# eager after its first epoch.
COMPILE_RECOMPILE_LIMIT = 32


def compiled(model: nn.Module, cfg: TrialConfig) -> nn.Module:
    """`model` under ``torch.compile`` when `cfg.compile`, with its backend and mode."""
    if not cfg.compile:
        return model
    mode = None if cfg.compile_mode == "default" else cfg.compile_mode
    return torch.compile(model, backend=cfg.compile_backend, mode=mode)  # type: ignore[return-value]


@contextmanager
def compile_limits(cfg: TrialConfig) -> Iterator[None]:
    """Dynamo's recompile limit raised to COMPILE_RECOMPILE_LIMIT while a compiled trial trains."""
    if not cfg.compile:
        yield
        return
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # renamed in torch 2.6
    with config.patch({name: max(COMPILE_RECOMPILE_LIMIT, getattr(config, name))}):
        yield


def run_trial(
    cfg: TrialConfig,
    *,
    out: str | Path,
    trial_id: str = "train",
    checkpoint_dir: Path | None = None,
    on_epoch: EpochCallback | None = None,
    stop: StopRule = StopRule(),
    spec_file: Path | None = None,
    device: torch.device | None = None,
    on_stage: StageCallback | None = None,
) -> dict[str, Any]:
    """Train one trial, writing its tables under `out` and checkpoints every epoch.

    Run again with the same `out` (and `checkpoint_dir`), it continues from the last
    checkpoint; a finished trial returns its stored result without training.

    Args:
        cfg: the validated configuration (:func:`trainables.config.parse_trial`).
        out: the study or output directory that receives ``tables/`` and ``spec.yaml``: a local
            path or a filesystem URI (s3://...; then only the tables go there).
        trial_id: the trial's id in the tables.
        checkpoint_dir: where ``last.pt`` and ``best.pt`` live; default ``out/checkpoints/<id>``,
            required when `out` is a URI (a study's trials get a local folder from Ray Tune).
        on_epoch: called after each epoch's rows and checkpoint are written; a returned
            string stops the trial with that stop reason. The last epoch is reported after the
            final evaluation, its row merged with the outcome (``stop_reason``, ``final_*``).
        stop: when the trial stops before its last epoch (:class:`analysis.stopping.StopRule`,
            decided after each epoch; the default runs every epoch).
        spec_file: where the resolved spec is written (``energyat train``: ``out/spec.yaml``); an
            existing file must hold the same spec, so a different trial never continues this one.
            Studies pass None: their trials differ by design and `trials` carries each config.
        device: where to train; None resolves `cfg.device` (:func:`select_device`). Under Ray the
            adapter passes the device Ray assigned (its GPU, or the CPU when it assigned none).
        on_stage: told, per batch, what the final evaluation runs and how far it is (PGD on the
            test set can take longer than the training; nothing else reports meanwhile).

    Returns:
        The trial's `trials` row (outcome columns) as a dict.
    """
    # -- set up: where the trial writes, then device, data, model, optimizer, probes ---------------
    resolved = cfg.to_dict()
    output = _output(resolved, study=cfg.name, out=out, trial_id=trial_id, checkpoint_dir=checkpoint_dir)
    if spec_file is not None:
        _check_output(spec_file, resolved)
    started = time.perf_counter()
    device = select_device(cfg.device) if device is None else device
    _configure_torch(cfg, device)
    data = load_dataset(cfg.dataset).to(device)
    if spec_file is not None:
        _write_spec(spec_file, resolved)  # only now: bad input (a missing dataset too) leaves no trace
    trial = _set_up(cfg, data, device)
    # -- resume: the last checkpoint's weights, optimizer, detector, progress and RNG ----------------
    detector, progress = _resume(trial, output)
    train_model = compiled(trial.model, cfg)
    seconds_before = progress.seconds

    rows: list[dict[str, Any]] = []
    with compile_limits(cfg):  # raised for a compiled model, restored after training
        while progress.stop_reason is None and progress.next_epoch < cfg.epochs:
            epoch = progress.next_epoch
            train, train_seconds = _train(train_model, trial, epoch)
            finite = math.isfinite(train["train_loss"])
            probed = _probe(trial, epoch, finite=finite)
            row = _epoch_row(output, cfg, epoch, train, probed)
            phase, alarm = detector.update({k: row.get(k) for k in DETECTOR_COLUMNS})
            new_best = _select(progress, probed, epoch, selection_metric(cfg))
            row.update(
                phase=phase, alarm=alarm, alarm_reason=detector.alarm_reason, **_best_columns(progress),
                epoch_seconds=train_seconds, probe_seconds=probed.seconds,
                images_per_second=train["images"] / train_seconds,
            )
            _write_rows(output, cfg, epoch, row, probed)
            rows.append(row)
            progress.next_epoch = epoch + 1
            progress.seconds = seconds_before + time.perf_counter() - started
            progress.stop_reason = _stop_reason(stop, finite=finite, epoch=epoch, alarm=alarm, best_epoch=progress.best_epoch)
            _save_checkpoint(trial, output, detector, progress, epoch=epoch, new_best=new_best)
            write_trial_row(output.out, trial_id=trial_id, outcome=_outcome("RUNNING", output, trial, detector, progress), config=output.config,
                            provenance=output.provenance)
            if on_epoch is not None and progress.stop_reason is None and progress.next_epoch < cfg.epochs:
                progress.stop_reason = on_epoch(row, output.checkpoints)
                if progress.stop_reason is not None:  # the caller's stop (a scheduler), kept for a restart
                    checkpoint.save(output.last, _checkpoint_state(trial, detector, progress))

    # -- final evaluation of the best checkpoint, on the test set ---------------------------------
    if not progress.final and output.best.exists():
        progress.final = _evaluate_best(trial, output, progress, on_stage)
    # -- final row: the outcome, with the offline phase labels over every epoch row ----------------
    if progress.stop_reason is None:
        progress.stop_reason = "completed"
    progress.seconds = seconds_before + time.perf_counter() - started
    checkpoint.save(output.last, _checkpoint_state(trial, detector, progress))
    phases = _offline_phases(output.out, trial_id)
    status = "ERROR" if progress.stop_reason.startswith("error") else "TERMINATED"
    result = _outcome(status, output, trial, detector, progress, phases=phases)
    write_trial_row(output.out, trial_id=trial_id, outcome=result, config=output.config, provenance=output.provenance)
    if on_epoch is not None and rows:
        on_epoch({**rows[-1], **{k: v for k, v in result.items() if k not in rows[-1]}, "done": True}, output.checkpoints)
    return result


@dataclass(frozen=True)
class _Output:
    """Where a trial writes, and what its rows carry besides their values."""

    out: str  # the study or output directory: a local path or a filesystem URI
    trial_id: str
    study: str
    checkpoints: Path  # local: last.pt and best.pt
    provenance: dict[str, Any]
    config: dict[str, Any]  # the resolved spec, flattened: the `trials` row's config columns

    @property
    def last(self) -> Path:
        return self.checkpoints / "last.pt"

    @property
    def best(self) -> Path:
        return self.checkpoints / "best.pt"


def _output(resolved: dict[str, Any], *, study: str, out: str | Path, trial_id: str, checkpoint_dir: Path | None) -> _Output:
    check_name(trial_id, "trial id (--trial-id)")  # it names the trial's folders and files
    if is_uri(out):  # kept a string: Path would fold s3://bucket into s3:/bucket
        if checkpoint_dir is None:
            raise EnergyatError(f"out={out} is a URI: give a local checkpoint_dir (checkpoints are written locally)")
        checkpoints = checkpoint_dir
    else:
        out = Path(out).expanduser()
        checkpoints = checkpoint_dir or out / "checkpoints" / trial_id
    return _Output(out=str(out), trial_id=trial_id, study=study, checkpoints=checkpoints, provenance=provenance(resolved), config=flatten(resolved))


def _configure_torch(cfg: TrialConfig, device: torch.device) -> None:
    """cuDNN's autotuner on CUDA, the CPU thread count, and the trial's seed."""
    training_precision(device, cfg.precision)  # a bad ENERGYAT_AUTO_PRECISION is refused here, before anything is written
    if device.type == "cuda":
        # every training batch but the last has one shape: cuDNN may time its algorithms once and
        # keep the fastest (evaluations stay reproducible on the CPU; on a GPU they never were bit for bit)
        torch.backends.cudnn.benchmark = True
    # None is the process's own default, set again: a worker that ran another trial (Ray Tune
    # reuses workers) may have been left at that trial's count
    torch.set_num_threads(cfg.threads if cfg.threads is not None else _PROCESS_THREADS)
    torch.manual_seed(cfg.seed)


@dataclass(frozen=True)
class _Trial:
    """What the loop trains and evaluates, set up once per run (:func:`_set_up`)."""

    cfg: TrialConfig
    device: torch.device
    data: ImageData  # on the device
    model: nn.Module  # the live weights, eager, channels_last: what the optimiser trains
    opt: torch.optim.Optimizer
    params: MethodParams
    probes: EpochProbes
    ema: AveragedModel | None = None  # `ema`: the average of `model`'s weights and buffers
    awp: WeightPerturbation | None = None  # `awp`: its proxy, once the warm-up is over (:meth:`perturbation`)

    def perturbation(self, epoch: int) -> WeightPerturbation | None:
        """AWP for the batches of `epoch`: None during `awp.warmup` and without `awp`."""
        return self.awp if self.awp is not None and epoch >= awp_warmup(self.cfg) else None

    @property
    def evaluated(self) -> nn.Module:
        """The weights every evaluation reads (probes, selection, checkpoints' `model`, the final
        evaluation): the average when `ema` is on, else the live model."""
        return self.ema.module if self.ema is not None else self.model

    def average(self, epoch: int) -> Callable[[], None] | None:
        """The per-step update of the average in `epoch`, or None without one. Before `ema.start`
        the average is not accumulated: :meth:`follow` sets it to the live weights instead."""
        ema = self.ema
        if ema is None or epoch < self.cfg.ema.start:
            return None
        return lambda: ema.update_parameters(self.model)

    def follow(self, epoch: int) -> None:
        """Before `ema.start`, after each epoch: the average restarts from the live weights."""
        if self.ema is not None and epoch < self.cfg.ema.start:
            self.ema.n_averaged.zero_()
            self.ema.update_parameters(self.model)  # with nothing averaged yet, a copy


def _set_up(cfg: TrialConfig, data: ImageData, device: torch.device) -> _Trial:
    in_channels, image_size = data.train_x.shape[1], data.train_x.shape[-1]
    model = build_model(cfg.model, in_channels=in_channels, num_classes=data.num_classes, image_size=image_size, width=cfg.width, init=cfg.model_init)
    model = model.to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    ema = None
    if cfg.ema.decay > 0:
        # torch's own EMA: ema = decay * ema + (1 - decay) * live, the batch-norm buffers averaged
        # too (use_buffers), so the average's statistics match its weights without a recalibration pass
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema.decay), use_buffers=True)
        ema.module.requires_grad_(False)  # evaluated, never trained: attacks take input gradients only
    awp = WeightPerturbation(model, gamma=cfg.awp.gamma) if cfg.awp.gamma > 0 else None
    return _Trial(cfg=cfg, device=device, data=data, model=model, opt=opt, params=MethodParams.from_config(cfg), probes=epoch_probes(cfg, data),
                  ema=ema, awp=awp)


def _resume(trial: _Trial, output: _Output) -> tuple[OnlineDetector, _Progress]:
    """The detector and progress to go on with: the last checkpoint's (:func:`_resume_state`),
    restoring the model, the optimizer and the RNG with them; fresh ones for a new trial."""
    state = _resume_state(output.last, output.best)
    if state is None:
        return OnlineDetector(), _Progress()
    trial.model.load_state_dict(state.get("live_model", state["model"]))
    if trial.ema is not None:
        trial.ema.module.load_state_dict(state["model"])
        trial.ema.n_averaged.fill_(int(state["ema_averaged"]))
    trial.opt.load_state_dict(state["optimizer"])
    detector = OnlineDetector.from_state_dict(state["detector"])
    progress = _Progress(**state["progress"])
    _set_rng_state(state["rng"], trial.device)
    return detector, progress


def _train(train_model: nn.Module, trial: _Trial, epoch: int) -> tuple[dict[str, float], float]:
    """One epoch of training (:func:`_train_epoch`) and its seconds, the device synchronised so
    that they time the work and not its queueing."""
    t0 = time.perf_counter()
    train = _train_epoch(train_model, trial.opt, trial.cfg, trial.data, trial.params, epoch, trial.device, average=trial.average(epoch),
                         awp=trial.perturbation(epoch))
    trial.follow(epoch)
    if trial.device.type == "cuda":
        torch.cuda.synchronize()
    return train, time.perf_counter() - t0


@dataclass(frozen=True)
class _Probed:
    """An epoch's evaluation and energy probes; NaN columns and no samples when not probed."""

    probed: bool
    columns: dict[str, float]  # PROBE_KEYS
    samples: list[tuple[ProbeSet, dict[str, np.ndarray]]]  # per-sample values of the training and test probes
    seconds: float


def _probe(trial: _Trial, epoch: int, *, finite: bool) -> _Probed:
    """Evaluate on the validation split and probe energies every `probe.every` epochs and at the
    last; never after a non-finite loss (its weights give nothing worth probing)."""
    t1 = time.perf_counter()
    cfg, probes = trial.cfg, trial.probes
    probed = finite and (epoch % cfg.probe.every == 0 or epoch == cfg.epochs - 1)
    columns = dict.fromkeys(PROBE_KEYS, math.nan)
    samples: list[tuple[ProbeSet, dict[str, np.ndarray]]] = []
    if probed:
        values = probe_epoch(trial.evaluated, probes, cfg, trial.params, epoch)
        columns = probe_columns(values["train"], values["val"], values["test"])
        samples = [(ps, v) for ps, v in ((probes.train, values["train"]), (probes.test, values["test"])) if ps is not None and v is not None]
    return _Probed(probed, columns, samples, time.perf_counter() - t1)


def _epoch_row(output: _Output, cfg: TrialConfig, epoch: int, train: dict[str, float], probed: _Probed) -> dict[str, Any]:
    """The epoch's `epochs` row as far as training and the probes fill it; the phase, the best epoch
    and the timings follow."""
    row: dict[str, Any] = {"study": output.study, "trial_id": output.trial_id, "epoch": epoch, "method": cfg.method}
    row.update({k: v for k, v in train.items() if k != "images"})
    row.update(probed.columns, probed=probed.probed)
    return row


def _select(progress: _Progress, probed: _Probed, epoch: int, metric: str) -> bool:
    """Whether `epoch` is the new best by the validation `metric` (`select`; never a test number);
    `progress` is updated when it is."""
    new_best = probed.probed and probed.columns[metric] > progress.best_acc
    if new_best:
        progress.best_acc, progress.best_epoch = probed.columns[metric], epoch
        progress.best_robust, progress.best_clean = probed.columns["val_robust_acc"], probed.columns["val_clean_acc"]
    return new_best


def _best_columns(progress: _Progress) -> dict[str, float]:
    """The validation accuracies of the best epoch so far. A checkpoint written before `select`
    existed carries no best_robust: its best_acc was the robust accuracy."""
    robust = progress.best_acc if math.isnan(progress.best_robust) else progress.best_robust
    return {
        "best_val_robust_acc": robust if progress.best_epoch is not None else math.nan,
        "best_val_clean_acc": progress.best_clean,
    }


def _write_rows(output: _Output, cfg: TrialConfig, epoch: int, row: dict[str, Any], probed: _Probed) -> None:
    """The epoch's `epochs` row and, when due, its `samples` rows. Rows are written before the
    checkpoint, so a restart from the previous checkpoint rewrites the same files."""
    columns = {k: [v] for k, v in row.items()}
    write_epoch_rows(output.out, table="epochs", trial_id=output.trial_id, epoch=epoch, columns=columns, provenance=output.provenance)
    # per-sample rows every `samples_every`-th regular probe, and always at the last epoch (the
    # report's histograms compare first, middle and last), which is probed even off the grid
    regular = epoch % cfg.probe.every == 0 and (epoch // cfg.probe.every) % max(cfg.probe.samples_every, 1) == 0
    if probed.samples and cfg.probe.samples_every and (regular or epoch == cfg.epochs - 1):
        samples = sample_columns(output.study, output.trial_id, epoch, probed.samples)
        write_epoch_rows(output.out, table="samples", trial_id=output.trial_id, epoch=epoch, columns=samples, provenance=output.provenance)


def _stop_reason(stop: StopRule, *, finite: bool, epoch: int, alarm: bool, best_epoch: int | None) -> str | None:
    """Why the trial ends after `epoch`, or None to go on: a non-finite loss is an error (training
    cannot recover from it); otherwise the stop rule decides (:meth:`StopRule.decide`)."""
    if not finite:
        return f"error: non-finite loss at epoch {epoch}"
    return stop.decide(epoch=epoch, alarm=alarm, best_epoch=best_epoch)


def _save_checkpoint(trial: _Trial, output: _Output, detector: OnlineDetector, progress: _Progress, *, epoch: int, new_best: bool) -> None:
    checkpoint.save(output.last, {**_checkpoint_state(trial, detector, progress), "epoch": epoch})
    if new_best:  # the whole state, not only the weights: a damaged last.pt falls back to it
        checkpoint.copy(output.last, output.best)
        if trial.cfg.keep_best_checkpoints:
            checkpoint.copy(output.last, output.checkpoints / f"best-e{epoch:04d}.pt")


def _outcome(
    status: str, output: _Output, trial: _Trial, detector: OnlineDetector, progress: _Progress, *, phases: PhaseResult | None = None
) -> dict[str, Any]:
    """The `trials` row's outcome columns. `phases`: the offline labels, once training is over;
    while it runs (None), the online detector's view."""
    return {
        "study": output.study, "trial_id": output.trial_id, "status": status, "stop_reason": progress.stop_reason,
        "epochs_run": progress.next_epoch, "best_epoch": progress.best_epoch, "selected_by": selection_metric(trial.cfg),
        **_best_columns(progress),
        "final_clean_acc": progress.final.get("final_clean_acc", math.nan),
        "final_pgd_acc": progress.final.get("final_pgd_acc", math.nan),
        "final_autoattack_acc": progress.final.get("final_autoattack_acc", math.nan),
        "final_n": progress.final.get("final_n"), "final_autoattack_n": progress.final.get("final_autoattack_n"),
        "final_seconds": progress.final.get("final_seconds"),
        "phase2_start": phases.phase2_start if phases else detector.phase2_start,
        "phase3_start": phases.phase3_start if phases else None,
        "alarm_epoch": detector.alarm_epoch,
        "seconds": progress.seconds, "device": device_label(trial.device), "train_precision": training_precision(trial.device, trial.cfg.precision),
        "git_sha": output.provenance["git_sha"],
    }


def _evaluate_best(trial: _Trial, output: _Output, progress: _Progress, on_stage: StageCallback | None) -> dict[str, float | int | None]:
    """:func:`final_evaluation` of best.pt's weights (the average's, with `ema`), loaded into a
    copy: the trial keeps the last epoch's weights, which last.pt must hold; with its seconds."""
    started = time.perf_counter()
    best_model = copy.deepcopy(trial.evaluated)
    best_model.load_state_dict(checkpoint.load(output.best)["model"])
    final = final_evaluation(best_model, trial.data, trial.cfg, out=output.out, trial_id=output.trial_id,
                             weights=f"best.pt (epoch {progress.best_epoch})", device=trial.device, progress=on_stage)
    return final | {"final_seconds": time.perf_counter() - started}


def write_error_row(cfg: TrialConfig, *, out: str, trial_id: str, reason: str) -> dict[str, Any]:
    """End a trial's `trials` row as ERROR with `reason` (one line, starting "error: "), keeping
    what it had recorded (epochs run, best validation accuracy, alarm); a trial that died before
    its first epoch gets a row of its own. For failures outside the trial's loop: Ray Tune giving
    up after its restarts (study.callbacks.TrialErrors), or a hang (trainables.tune_adapter)."""
    resolved = cfg.to_dict()
    outcome = read_trial_outcome(out, trial_id) or {
        "study": cfg.name, "trial_id": trial_id, "epochs_run": 0, "best_val_robust_acc": math.nan, "best_val_clean_acc": math.nan,
        "final_clean_acc": math.nan, "final_pgd_acc": math.nan, "final_autoattack_acc": math.nan, "seconds": 0.0,
    }
    outcome = {**outcome, "status": "ERROR", "stop_reason": reason}
    prov = provenance(resolved)
    outcome.setdefault("git_sha", prov["git_sha"])
    write_trial_row(out, trial_id=trial_id, outcome=outcome, config=flatten(resolved), provenance=prov)
    return outcome


def _offline_phases(out: str | Path, trial_id: str) -> PhaseResult:
    """Offline phases over every epoch row the trial has written (also those of earlier runs),
    read with pyarrow (no DuckDB: the engine runs where only torch, numpy and pyarrow are)."""
    return detect(read_trial_rows(str(out), table="epochs", trial_id=trial_id, columns=DETECTOR_COLUMNS))


def _resume_state(last: Path, best: Path) -> dict[str, Any] | None:
    """The state to continue from: last.pt; when it is damaged (a full disk, a lost node, a bad
    copy), best.pt, the whole state as of the best epoch, an earlier point of the same run whose
    later epochs then run again and rewrite their own rows; None to start afresh. Each damaged
    file is named in one warning line; a refused one (code inside) still stops the trial."""
    for path in (last, best):
        if not path.exists():
            continue
        try:
            state = checkpoint.load(path)
        except checkpoint.DamagedCheckpointError as exc:
            then = "best.pt" if path == last and best.exists() else "epoch 0"
            print(f"energyat: warning: {exc}; continuing from {then}", file=sys.stderr, flush=True)
            continue
        if "progress" in state:  # an older energyat's best.pt held the weights only
            return state
    return None


def _checkpoint_state(trial: _Trial, detector: OnlineDetector, progress: _Progress) -> dict[str, Any]:
    """The whole state of a trial. `model` holds the weights its evaluations read (the average,
    with `ema`), so every reader of a checkpoint (`energyat eval`, `sample`, the final
    evaluation) gets them; with `ema`, `live_model` holds the trained weights and `ema_averaged`
    the average's step count, for a resume."""
    averaged = {} if trial.ema is None else {"live_model": trial.model.state_dict(), "ema_averaged": int(trial.ema.n_averaged)}
    return {
        "model": trial.evaluated.state_dict(),
        **averaged,
        "optimizer": trial.opt.state_dict(),
        "detector": detector.state_dict(),
        "progress": {
            "next_epoch": progress.next_epoch, "best_acc": progress.best_acc, "best_clean": progress.best_clean,
            "best_robust": progress.best_robust, "best_epoch": progress.best_epoch,
            "seconds": progress.seconds, "stop_reason": progress.stop_reason, "final": dict(progress.final),
        },
        "rng": _rng_state(trial.device),
    }


def _spec_document(resolved: dict[str, Any]) -> dict[str, Any]:
    return {"schema_version": SCHEMA_VERSION, **resolved}


def _check_output(spec_path: Path, resolved: dict[str, Any]) -> None:
    """An existing spec file must hold this very spec (then the trial continues)."""
    document = _spec_document(resolved)
    if spec_path.exists():
        existing = yaml.safe_load(spec_path.read_text())
        if isinstance(existing, dict):  # another energyat's output: say so, not "a different spec"
            check_schema_version(existing.get("schema_version"), where=str(spec_path.parent))
        if existing != document:
            changed = sorted(
                k for k in set(flatten(existing or {})) | set(flatten(document))
                if flatten(existing or {}).get(k) != flatten(document).get(k)
            )
            raise OutputConflictError(
                f"{spec_path.parent} already holds a trial with a different spec (keys {', '.join(changed)}); "
                "give a new --out, or the same spec to continue it"
            )


def _write_spec(spec_path: Path, resolved: dict[str, Any]) -> None:
    if spec_path.exists():
        return
    document = _spec_document(resolved)
    spec_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = spec_path.with_name(".spec.yaml.tmp")
    tmp.write_text(yaml.safe_dump(document, sort_keys=False))
    tmp.replace(spec_path)
