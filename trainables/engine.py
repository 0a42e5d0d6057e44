"""The training engine: one trial, one loop.

``run_trial`` reads like airbench's ``main()``: set up (data on the device as uint8, model,
optimizer, probes), then per epoch: train -> evaluate and probe energies -> detect phase ->
report (Parquet rows, checkpoint, callback). Then the best checkpoint's final evaluation.

Where speed comes from (DESIGN.md section 7), each with the reason it is safe:
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
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from analysis.errors import EnergyatError
from analysis.phases import DETECTOR_COLUMNS, OnlineDetector, PhaseResult, detect, should_stop
from analysis.schema import SCHEMA_VERSION
from analysis.store import is_uri, provenance, write_epoch_rows, write_trial_row
from trainables import checkpoint
from trainables.attacks import eval_mode, pgd, pgd_targeted, random_targets
from trainables.config import TrialConfig, flatten
from trainables.data import ImageData, augment, load_dataset
from trainables.energy import joint_energy, marginal_energy
from trainables.methods import METHODS, Craft, MethodParams
from trainables.models import build_model
from trainables.schedules import lr_at

# Called with each epoch's row and the checkpoint directory once both are written; returns a
# stop reason (e.g. "scheduler") to end the trial, or None to go on. The trial's last epoch is
# reported after the final evaluation, with the `trials` outcome merged into its row, so that
# a caller (Ray Tune) that stops listening after it has seen everything.
EpochCallback = Callable[[dict[str, Any], Path], "str | None"]

# attack(model, x, y) -> x*, with the threat model bound (see :func:`probe_attacks`)
ProbeAttack = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]

_TARGET_SEED = 1234  # fixed wrong-class targets per probe image, the same every epoch


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


def _to_float(x_u8: torch.Tensor) -> torch.Tensor:
    return x_u8.float().div_(255.0).contiguous(memory_format=torch.channels_last)


def autocast(device: torch.device, precision: str) -> ContextManager[Any]:
    """bf16 autocast on CUDA (`precision` auto or bf16) and on the CPU when asked (bf16).

    bf16 keeps fp32's exponent range, so energies (logsumexp of logits) do not overflow; the
    engine turns logits to fp32 before any energy or loss reduction it reports.
    """
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


@dataclass
class ProbeSet:
    """A fixed set of images probed every epoch (no augmentation, eval-mode BN)."""

    split: str
    index: torch.Tensor  # positions in the split, int64
    x: torch.Tensor  # uint8, on the device
    y: torch.Tensor
    targets: torch.Tensor  # a fixed random wrong class per image


def _probe_set(split: str, x: torch.Tensor, y: torch.Tensor, size: int, seed: int, num_classes: int) -> ProbeSet:
    gen = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(y), generator=gen)[: min(size, len(y))].sort().values
    dev_index = index.to(x.device)
    labels = y[dev_index]
    targets = random_targets(labels, num_classes, torch.Generator().manual_seed(_TARGET_SEED + seed))
    return ProbeSet(split, index, x[dev_index], labels, targets)


@dataclass
class _Progress:
    """What the checkpoint carries besides weights: where the trial stands."""

    next_epoch: int = 0
    best_acc: float = -math.inf
    best_epoch: int | None = None
    seconds: float = 0.0
    stop_reason: str | None = None
    final: dict[str, float] = field(default_factory=dict)


def _train_epoch(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    cfg: TrialConfig,
    data: ImageData,
    params: MethodParams,
    epoch: int,
    device: torch.device,
) -> dict[str, float]:
    """One pass over the training set. Metrics stay on the device until the end."""
    loss_fn = METHODS[cfg.method].loss
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
        idx = order[bounds[i] : bounds[i + 1]]
        x = _to_float(augment(data.train_x[idx], crop_pad=data.crop_pad, flip=data.flip))
        y = data.train_y[idx]
        with autocast(device, cfg.precision):
            loss, parts = loss_fn(model, x, y, params=params)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
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
    loss_sum, clean, adv, w_sum = sums.tolist()  # the epoch's one host synchronisation
    count = bounds[-1]
    return {
        "lr": lr_sum / batches,
        "train_loss": loss_sum / count,
        "train_clean_acc": clean / count,
        "train_adv_acc": adv / count,
        "weight_mean": w_sum / count,
        "weight_min": float(w_min),
        "weight_max": float(w_max),
        "images": count,
    }


def _probe(
    model: nn.Module,
    probe: ProbeSet,
    craft: ProbeAttack,
    params: MethodParams,
    batch_size: int,
    device: torch.device,
    *,
    targeted: bool,
    precision: str,
) -> dict[str, np.ndarray]:
    """Per-sample energies of clean, adversarial (``craft``) and, if asked, targeted examples
    (targeted PGD towards ``probe.targets``; then also ``Ey_tgt`` and ``correct_tgt``).

    The targeted attack runs on the training probe only (``probe_train_E_tgt``): on the test
    subset it would add as many passes again for no column of `epochs` (test E_tgt is NaN).
    """
    names = ("E", "E_adv", "Ey", "Ey_adv", "E_tgt", "ce", "ce_adv", "correct", "correct_adv") + (("Ey_tgt", "correct_tgt") if targeted else ())
    cols: dict[str, list[torch.Tensor]] = {k: [] for k in names}
    with eval_mode(model):
        for lo in range(0, len(probe.y), batch_size):
            x = _to_float(probe.x[lo : lo + batch_size])
            y = probe.y[lo : lo + batch_size]
            with autocast(device, precision):
                x_adv = craft(model, x, y)
                with torch.no_grad():
                    logits, logits_adv = model(x).float(), model(x_adv).float()
                values = {"E_tgt": torch.full((len(y),), math.nan, device=device)}
                if targeted:
                    x_tgt = pgd_targeted(
                        model, x, probe.targets[lo : lo + batch_size],
                        eps=params.eps, step_size=params.step_size, steps=params.steps, norm=params.norm,  # type: ignore[arg-type]
                    )
                    with torch.no_grad():
                        logits_tgt = model(x_tgt).float()
                    values = {"E_tgt": marginal_energy(logits_tgt), "Ey_tgt": joint_energy(logits_tgt, y), "correct_tgt": logits_tgt.argmax(1) == y}
            values |= {
                "E": marginal_energy(logits),
                "E_adv": marginal_energy(logits_adv),
                "Ey": joint_energy(logits, y),
                "Ey_adv": joint_energy(logits_adv, y),
                "ce": F.cross_entropy(logits, y, reduction="none"),
                "ce_adv": F.cross_entropy(logits_adv, y, reduction="none"),
                "correct": logits.argmax(1) == y,
                "correct_adv": logits_adv.argmax(1) == y,
            }
            for name in names:
                cols[name].append(values[name].detach())
    # float64 on the host, so that mean(E - E*) equals mean(E) - mean(E*) to 1e-12
    return {k: torch.cat(v).cpu().double().numpy() if v[0].is_floating_point() else torch.cat(v).cpu().numpy() for k, v in cols.items()}


def probe_attacks(cfg: TrialConfig, params: MethodParams) -> tuple[ProbeAttack, ProbeAttack]:
    """(training probe's attack, test probe's attack): the method's own x*, and PGD with
    `eval_attack.steps` for test robust accuracy."""
    method_craft: Craft = METHODS[cfg.method].craft
    eval_steps = cfg.eval_attack.steps

    def train_attack(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return method_craft(m, x, y, params)

    def test_attack(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return pgd(m, x, y, eps=params.eps, step_size=params.step_size, steps=eval_steps, norm=params.norm)  # type: ignore[arg-type]

    return train_attack, test_attack


def _probe_columns(train: dict[str, np.ndarray], test: dict[str, np.ndarray]) -> dict[str, float]:
    d_e = train["E"] - train["E_adv"]
    test_d_e = test["E"] - test["E_adv"]
    return {
        "probe_train_E": float(train["E"].mean()),
        "probe_train_E_adv": float(train["E_adv"].mean()),
        "probe_train_dE": float(d_e.mean()),
        "probe_train_dE_abs_p50": float(np.quantile(np.abs(d_e), 0.5)),
        "probe_train_dE_abs_p90": float(np.quantile(np.abs(d_e), 0.9)),
        "probe_train_dEy": float((train["Ey"] - train["Ey_adv"]).mean()),
        "probe_train_E_tgt": float(train["E_tgt"].mean()),
        "probe_train_aae_frac": float((train["ce_adv"] < train["ce"]).mean()),
        "test_clean_acc": float(test["correct"].mean()),
        "test_robust_acc": float(test["correct_adv"].mean()),
        "test_robust_loss": float(test["ce_adv"].mean()),
        "probe_test_E": float(test["E"].mean()),
        "probe_test_E_adv": float(test["E_adv"].mean()),
        "probe_test_dE": float(test_d_e.mean()),
    }


_PROBE_KEYS = tuple(_probe_columns({k: np.zeros(1) for k in ("E", "E_adv", "Ey", "Ey_adv", "E_tgt", "ce", "ce_adv")},
                                   {k: np.zeros(1) for k in ("E", "E_adv", "ce_adv", "correct", "correct_adv")}))


def _sample_columns(study: str, trial_id: str, epoch: int, sets: list[tuple[ProbeSet, dict[str, np.ndarray]]]) -> dict[str, Any]:
    cols: dict[str, list[Any]] = {k: [] for k in ("study", "trial_id", "epoch", "split", "index", "label", "E", "E_adv", "Ey", "Ey_adv", "E_tgt", "correct", "correct_adv")}
    for probe, values in sets:
        n = len(probe.y)
        cols["study"] += [study] * n
        cols["trial_id"] += [trial_id] * n
        cols["epoch"] += [epoch] * n
        cols["split"] += [probe.split] * n
        cols["index"] += probe.index.tolist()
        cols["label"] += probe.y.cpu().tolist()
        for k in ("E", "E_adv", "Ey", "Ey_adv", "E_tgt", "correct", "correct_adv"):
            cols[k] += values[k].tolist()
    return cols


def final_evaluation(model: nn.Module, data: ImageData, cfg: TrialConfig, device: torch.device) -> dict[str, float]:
    """Clean and PGD-(final_eval.pgd_steps) accuracy on the test set, AutoAttack on a subset.

    AutoAttack is torchattacks' implementation of the standard version (APGD-CE, APGD-T,
    FAB-T, Square): the original `autoattack` package is not published on PyPI.
    """
    fe, a = cfg.final_eval, cfg.attack
    n = len(data.test_y) if fe.n is None else min(fe.n, len(data.test_y))
    clean = robust = 0
    with eval_mode(model):
        for lo in range(0, n, cfg.batch_size):
            hi = min(lo + cfg.batch_size, n)
            x, y = _to_float(data.test_x[lo:hi]), data.test_y[lo:hi]
            with autocast(device, cfg.precision):
                x_adv = pgd(model, x, y, eps=a.eps, step_size=a.step, steps=fe.pgd_steps, norm=a.norm)
                with torch.no_grad():
                    clean += int((model(x).argmax(1) == y).sum())
                    robust += int((model(x_adv).argmax(1) == y).sum())
        aa_acc = math.nan
        m = min(fe.autoattack_n, len(data.test_y))
        if m > 0:
            import torchattacks  # deferred: only the final evaluation needs it

            attack = torchattacks.AutoAttack(
                model, norm="Linf" if a.norm == "linf" else "L2", eps=a.eps, version="standard",
                n_classes=data.num_classes, seed=cfg.seed,
            )
            correct = 0
            for lo in range(0, m, cfg.batch_size):
                hi = min(lo + cfg.batch_size, m)
                x, y = _to_float(data.test_x[lo:hi]), data.test_y[lo:hi]
                x_adv = attack(x, y)
                with torch.no_grad():
                    correct += int((model(x_adv).argmax(1) == y).sum())
            aa_acc = correct / m
    return {"final_clean_acc": clean / n, "final_pgd_acc": robust / n, "final_autoattack_acc": aa_acc}


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


def run_trial(
    cfg: TrialConfig,
    *,
    out: str | Path,
    trial_id: str = "train",
    checkpoint_dir: Path | None = None,
    on_epoch: EpochCallback | None = None,
    stop_patience: int | None = None,
    spec_file: Path | None = None,
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
        stop_patience: None runs every epoch; an int stops the trial with ``energy_divergence``
            once the online detector alarms and test robust accuracy has not improved for
            that many epochs (:func:`analysis.phases.should_stop`; 0 stops at the alarm).
        spec_file: where the resolved spec is written (``energyat train``: ``out/spec.yaml``); an
            existing file must hold the same spec, so a different trial never continues this one.
            Studies pass None: their trials differ by design and `trials` carries each config.

    Returns:
        The trial's `trials` row (outcome columns) as a dict.
    """
    if is_uri(out):  # kept a string: Path would fold s3://bucket into s3:/bucket
        if checkpoint_dir is None:
            raise EnergyatError(f"out={out} is a URI: give a local checkpoint_dir (checkpoints are written locally)")
        ckpt_dir = checkpoint_dir
    else:
        out = Path(out).expanduser()
        ckpt_dir = checkpoint_dir or out / "checkpoints" / trial_id
    resolved = cfg.to_dict()
    if spec_file is not None:
        _check_output(spec_file, resolved)
    prov = provenance(resolved)
    flat_config = flatten(resolved)
    study = cfg.name

    started = time.perf_counter()
    device = select_device(cfg.device)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    data = load_dataset(cfg.dataset).to(device)
    if spec_file is not None:
        _write_spec(spec_file, resolved)  # only now: bad input (a missing dataset too) leaves no trace
    in_channels, image_size = data.train_x.shape[1], data.train_x.shape[-1]
    model = build_model(cfg.model, in_channels=in_channels, num_classes=data.num_classes, image_size=image_size, width=cfg.width)
    model = model.to(device, memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    params = MethodParams.from_config(cfg)
    train_attack, test_attack = probe_attacks(cfg, params)
    train_probe = _probe_set("train", data.train_x, data.train_y, cfg.probe.train_size, cfg.dataset.seed + 1, data.num_classes)
    test_probe = _probe_set("test", data.test_x, data.test_y, cfg.probe.test_size, cfg.dataset.seed + 2, data.num_classes)
    detector = OnlineDetector()
    progress = _Progress()

    last, best = ckpt_dir / "last.pt", ckpt_dir / "best.pt"
    if last.exists():
        state = checkpoint.load(last)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        detector = OnlineDetector.from_state_dict(state["detector"])
        progress = _Progress(**state["progress"])
        _set_rng_state(state["rng"], device)
    train_model = torch.compile(model) if cfg.compile else model
    seconds_before = progress.seconds

    def outcome(status: str) -> dict[str, Any]:
        return {
            "study": study, "trial_id": trial_id, "status": status, "stop_reason": progress.stop_reason,
            "epochs_run": progress.next_epoch, "best_epoch": progress.best_epoch,
            "best_test_robust_acc": progress.best_acc if progress.best_epoch is not None else math.nan,
            "final_clean_acc": progress.final.get("final_clean_acc", math.nan),
            "final_pgd_acc": progress.final.get("final_pgd_acc", math.nan),
            "final_autoattack_acc": progress.final.get("final_autoattack_acc", math.nan),
            # while running: the online detector's view; at the end: the offline labels
            "phase2_start": phases.phase2_start if phases else detector.phase2_start,
            "phase3_start": phases.phase3_start if phases else None,
            "alarm_epoch": detector.alarm_epoch,
            "seconds": progress.seconds, "device": device_label(device), "git_sha": prov["git_sha"],
        }

    rows: list[dict[str, Any]] = []
    phases: PhaseResult | None = None
    while progress.stop_reason is None and progress.next_epoch < cfg.epochs:
        epoch = progress.next_epoch
        # -- train ---------------------------------------------------------------------------
        t0 = time.perf_counter()
        train = _train_epoch(train_model, opt, cfg, data, params, epoch, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        train_seconds = time.perf_counter() - t0
        finite = math.isfinite(train["train_loss"])
        # -- evaluate and probe energies -------------------------------------------------------
        t1 = time.perf_counter()
        probed = finite and (epoch % cfg.probe.every == 0 or epoch == cfg.epochs - 1)
        probe_cols = dict.fromkeys(_PROBE_KEYS, math.nan)
        sample_sets: list[tuple[ProbeSet, dict[str, np.ndarray]]] = []
        if probed:
            train_vals = _probe(model, train_probe, train_attack, params, cfg.batch_size, device, targeted=True, precision=cfg.precision)
            test_vals = _probe(model, test_probe, test_attack, params, cfg.batch_size, device, targeted=False, precision=cfg.precision)
            probe_cols = _probe_columns(train_vals, test_vals)
            sample_sets = [(train_probe, train_vals), (test_probe, test_vals)]
        probe_seconds = time.perf_counter() - t1
        # -- detect phase ------------------------------------------------------------------------
        row: dict[str, Any] = {"study": study, "trial_id": trial_id, "epoch": epoch, "method": cfg.method}
        row.update({k: v for k, v in train.items() if k != "images"})
        row.update(probe_cols)
        phase, alarm = detector.update({k: row.get(k) for k in DETECTOR_COLUMNS})
        if probed and probe_cols["test_robust_acc"] > progress.best_acc:
            progress.best_acc, progress.best_epoch = probe_cols["test_robust_acc"], epoch
            checkpoint.save(best, {"model": model.state_dict(), "epoch": epoch})
        row.update(
            phase=phase, alarm=alarm, probed=probed,
            best_test_robust_acc=progress.best_acc if progress.best_epoch is not None else math.nan,
            epoch_seconds=train_seconds, probe_seconds=probe_seconds,
            images_per_second=train["images"] / train_seconds,
        )
        # -- report: rows first, then the checkpoint, so a restart rewrites the same files -------
        write_epoch_rows(str(out), table="epochs", trial_id=trial_id, epoch=epoch, columns={k: [v] for k, v in row.items()}, provenance=prov)
        # per-sample rows every `samples_every`-th regular probe, and always at the last epoch (the
        # report's histograms compare first, middle and last), which is probed even off the grid
        regular = epoch % cfg.probe.every == 0 and (epoch // cfg.probe.every) % max(cfg.probe.samples_every, 1) == 0
        if sample_sets and cfg.probe.samples_every and (regular or epoch == cfg.epochs - 1):
            write_epoch_rows(str(out), table="samples", trial_id=trial_id, epoch=epoch, columns=_sample_columns(study, trial_id, epoch, sample_sets), provenance=prov)
        rows.append(row)
        progress.next_epoch = epoch + 1
        progress.seconds = seconds_before + time.perf_counter() - started
        if not finite:
            progress.stop_reason = f"error: non-finite loss at epoch {epoch}"
        elif stop_patience is not None and should_stop(alarm=alarm, epoch=epoch, best_epoch=progress.best_epoch, patience=stop_patience):
            progress.stop_reason = "energy_divergence"
        checkpoint.save(last, _checkpoint_state(model, opt, detector, progress, device))
        write_trial_row(str(out), trial_id=trial_id, outcome=outcome("RUNNING"), config=flat_config, provenance=prov)
        if on_epoch is not None and progress.stop_reason is None and progress.next_epoch < cfg.epochs:
            reason = on_epoch(row, ckpt_dir)
            if reason is not None:
                progress.stop_reason = reason
                checkpoint.save(last, _checkpoint_state(model, opt, detector, progress, device))

    # -- final evaluation of the best checkpoint --------------------------------------------------
    if not progress.final and best.exists():
        # a copy: `model` keeps the last epoch's weights, which last.pt must hold
        best_model = copy.deepcopy(model)
        best_model.load_state_dict(checkpoint.load(best)["model"])
        progress.final = final_evaluation(best_model, data, cfg, device)
        del best_model
    if progress.stop_reason is None:
        progress.stop_reason = "completed"
    progress.seconds = seconds_before + time.perf_counter() - started
    checkpoint.save(last, _checkpoint_state(model, opt, detector, progress, device))
    phases = _offline_phases(out, trial_id)
    status = "ERROR" if progress.stop_reason.startswith("error") else "TERMINATED"
    result = outcome(status)
    write_trial_row(str(out), trial_id=trial_id, outcome=result, config=flat_config, provenance=prov)
    if on_epoch is not None and rows:
        on_epoch({**rows[-1], **{k: v for k, v in result.items() if k not in rows[-1]}, "done": True}, ckpt_dir)
    return result


def _offline_phases(out: str | Path, trial_id: str) -> PhaseResult:
    """Offline phases over every epoch row the trial has written (also those of earlier runs)."""
    from analysis.query import open_tables

    con = open_tables(out, trial=trial_id)  # only this trial's files: on an object store, far fewer GETs
    try:
        table = con.sql(
            f"select {', '.join(DETECTOR_COLUMNS)} from epochs where trial_id = $id order by epoch", params={"id": trial_id}
        ).to_arrow_table()
    finally:
        con.close()
    return detect(table)


def _checkpoint_state(model: nn.Module, opt: torch.optim.Optimizer, detector: OnlineDetector, progress: _Progress, device: torch.device) -> dict[str, Any]:
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "detector": detector.state_dict(),
        "progress": {
            "next_epoch": progress.next_epoch, "best_acc": progress.best_acc, "best_epoch": progress.best_epoch,
            "seconds": progress.seconds, "stop_reason": progress.stop_reason, "final": dict(progress.final),
        },
        "rng": _rng_state(device),
    }


def _spec_document(resolved: dict[str, Any]) -> dict[str, Any]:
    return {"schema_version": SCHEMA_VERSION, **resolved}


def _check_output(spec_path: Path, resolved: dict[str, Any]) -> None:
    """An existing spec file must hold this very spec (then the trial continues)."""
    document = _spec_document(resolved)
    if spec_path.exists():
        existing = yaml.safe_load(spec_path.read_text())
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
