"""Training images per second: energyat's engine against the usual AT code, in the same run.

    python benchmarks/throughput.py [--quick] [--cases digits,cifar] [--methods sat,trades]
        [--batch 128] [--batches 4] [--repeats 5] [--threads 2] [--workers 0] [--compile]
        [--peak-tflops T]

For each case (model and data shape) and method, the same initial weights are trained for
`--batches` batches by energyat's ``_train_epoch`` (uint8 data on the device, batched
augmentation there, input-only attack gradients, one clean forward per batch, metrics kept on
the device; bf16 and channels_last on CUDA) and by ``benchmarks/reference_at.py`` (a
DataLoader with per-sample PIL transforms, fp32, ``loss.backward()`` in every attack step,
TRADES' clean forward inside every step, ``loss.item()`` per batch). The two alternate, one
warm-up each, then `--repeats` timed runs each. ``speedup`` is the median of the per-round
ratios: a shared machine's slow spells hit both sides of a round alike (this VM's steal time
moves single runs by 5x), so the ratio is steadier than either median.

``probe_overhead`` is the energy probe's share of an epoch at the default probe sizes
(``probe.train_size`` training images with the method's attack and the targeted attack, the
validation split and ``probe.test_size`` test images with the ``eval_attack``) over a whole
training set of the case's size (digits 1,400 images, CIFAR 50,000): the probe is timed on one
batch per split and scaled by image count, the epoch from energyat's measured images per second.
It is the default ``probe.craft: probes`` (the training and test probes' examples crafted in the
training precision, the validation split's in fp32); measured in the same run,
``probe_overhead_fp32_crafting`` crafts every one in fp32 (``probe.craft: fp32``) and
``probe_overhead_all_crafted`` every one in the training precision (``probe.craft: all``).

``peak_mem_mb`` and ``peak_reserved_mb`` are the CUDA allocator's peaks (allocated, reserved)
during one more run of energyat's alone, after the timed rounds (null on the CPU, where no
per-run peak can be told apart from the process's). On CUDA, ``mfu`` is model FLOP
utilisation against `--peak-tflops` (bf16 dense; default from the device name when known),
counting a forward pass of preact_resnet18 as 0.555 G multiply-accumulates per image, an
input-gradient backward as one forward and a weight-updating backward as two.

``--remedies`` measures instead what each remedy for robust overfitting costs (docs/remedies.md):
the same weights trained by ``_train_epoch`` plain, with `ema` (torch's AveragedModel updated
after every step) and with `awp` (gamma 0.01: one more forward and backward per batch, on the
proxy), interleaved round by round; ``cost`` is the median per-round ratio of plain to remedied
images per second, minus 1 (0.02: 2% slower).

Prints a Markdown table, then one JSON line per (model, method). ``--quick`` (digits,
sat and trades, 5 repeats of 2 batches) finishes within a minute on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reference_at  # noqa: E402  (a sibling file, not part of the package)

from analysis.store import versions  # noqa: E402
from trainables.config import AttackConfig, DatasetConfig, ProbeConfig, TrialConfig  # noqa: E402
from trainables.data import ImageData, load_dataset  # noqa: E402
from trainables.engine import _train_epoch, device_label, select_device  # noqa: E402
from trainables.methods import MethodParams  # noqa: E402
from trainables.models import build_model  # noqa: E402
from trainables.precision import autocast  # noqa: E402
from trainables.probe import probe, probe_attacks, probe_set  # noqa: E402

# bf16 dense peak, TFLOP/s, for MFU when --peak-tflops is not given
_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
# multiply-accumulates of one forward pass per 32x32 image, G: torch.utils.flop_counter.FlopCounterMode
# counts 1.111 GFLOPs for preact_resnet18 (convolutions and the linear layer; 2 FLOPs per MAC)
_FORWARD_GMAC = {"preact_resnet18": 0.555}


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    model: str
    eps: float
    step: float
    full_train_size: int  # the training-set size an epoch's probe share is computed over
    val_size: int  # the validation split evaluated every probed epoch


CASES = {
    "digits": Case("digits", "small_cnn", eps=0.15, step=0.0375, full_train_size=1200, val_size=200),
    "cifar": Case("cifar", "preact_resnet18", eps=8 / 255, step=2 / 255, full_train_size=49_000, val_size=1000),
}


def case_data(case: Case, n: int) -> ImageData:
    """Digits: the bundled set. CIFAR: random uint8 images of CIFAR-10's shape and augmentation
    (no CIFAR files here; the arithmetic per image does not depend on the pixel values)."""
    if case.name == "digits":
        return load_dataset(DatasetConfig(name="digits"))
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, 32, 32), generator=gen, dtype=torch.uint8)
    y = torch.randint(0, 10, (n,), generator=gen)
    return ImageData(x, y, x[:256].clone(), y[:256].clone(), num_classes=10, crop_pad=4, flip=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn: Callable[[], int], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    images = fn()
    _sync(device)
    return images / (time.perf_counter() - t0)


def probe_seconds_per_image(model: torch.nn.Module, cfg: TrialConfig, data: ImageData, device: torch.device) -> dict[str, float]:
    """Seconds per probed image, each timed on one batch, as the engine probes (trainables.probe):
    the training probe (`train`) and evaluation PGD (`eval`, the validation and test sets), with
    the adversarial examples crafted in fp32 and in the training precision (`*_crafted`,
    `probe.craft`); energies and accuracies in fp32 either way."""
    n = min(cfg.batch_size, len(data.test_y))
    train_probe = probe_set("train", data.train_x, data.train_y, n, 1, data.num_classes)
    test_probe = probe_set("test", data.test_x, data.test_y, n, 2, data.num_classes)
    train_attack, eval_attack, targeted = probe_attacks(cfg, MethodParams.from_config(cfg))
    def crafted() -> Any:
        return autocast(device, cfg.precision)

    def train(craft: Any) -> Any:
        return probe(model, train_probe.x, train_probe.y, attack=train_attack, targeted=targeted, targets=train_probe.targets,
                     batch_size=cfg.batch_size, seed=0, craft=craft)

    def evaluation(craft: Any) -> Any:
        return probe(model, test_probe.x, test_probe.y, attack=eval_attack, batch_size=cfg.batch_size, seed=0, craft=craft)

    out = {}
    for name, run in (("train", lambda: train(None)), ("eval", lambda: evaluation(None)),
                      ("train_crafted", lambda: train(crafted)), ("eval_crafted", lambda: evaluation(crafted))):
        run()  # warm-up
        _sync(device)
        t0 = time.perf_counter()
        run()
        _sync(device)
        out[name] = (time.perf_counter() - t0) / n
    return out


def bench(case: Case, method: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    n = args.batch * args.batches
    data = case_data(case, n)
    if len(data.train_y) < n:
        raise SystemExit(f"{case.name} has {len(data.train_y)} training images; ask for fewer than {n} (--batch x --batches)")
    sub = dataclasses.replace(data, train_x=data.train_x[:n], train_y=data.train_y[:n]).to(device)
    cfg = TrialConfig(
        method=method, model=case.model, batch_size=args.batch, lr=0.05, epochs=1,  # type: ignore[arg-type]
        attack=AttackConfig(eps=case.eps, step=case.step, steps=10), probe=ProbeConfig(), precision=args.precision,
    )
    params = MethodParams.from_config(cfg)
    torch.manual_seed(0)
    base = build_model(case.model, in_channels=data.train_x.shape[1], num_classes=data.num_classes, image_size=data.train_x.shape[-1]).to(device)

    ours_model = copy.deepcopy(base).to(memory_format=torch.channels_last)  # as run_trial does
    ours_opt = torch.optim.SGD(ours_model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=5e-4)
    compile_seconds = None
    train_model = ours_model
    if args.compile:
        train_model = torch.compile(ours_model)
        t0 = time.perf_counter()
        _train_epoch(train_model, ours_opt, cfg, sub, params, 0, device)  # compiles
        _sync(device)
        compile_seconds = time.perf_counter() - t0

    ref_model = copy.deepcopy(base)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=5e-4)
    ref_loader = reference_at.loader(
        data.train_x[:n].numpy(), data.train_y[:n].numpy(), batch_size=args.batch,
        crop_pad=data.crop_pad, flip=data.flip, workers=args.workers,
    )
    hp = {"eps": case.eps, "step_size": case.step, "steps": 10, "beta": cfg.beta, "gamma": cfg.der.gamma}

    def ours() -> int:
        return int(_train_epoch(train_model, ours_opt, cfg, sub, params, 0, device)["images"])

    def reference() -> int:
        return reference_at.train_batches(ref_model, ref_opt, ref_loader, method, hp, device)

    ours_ips: list[float] = []
    ref_ips: list[float] = []
    for i in range(args.repeats + 1):  # interleaved; the first round is the warm-up
        o, r = _timed(ours, device), _timed(reference, device)
        if i:
            ours_ips.append(o)
            ref_ips.append(r)
    peak: dict[str, float] | None = None
    if device.type == "cuda":  # energyat's own run alone: the interleaved rounds mix in the reference's
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        ours()
        torch.cuda.synchronize(device)
        peak = {"allocated": torch.cuda.max_memory_allocated(device) / 2**20, "reserved": torch.cuda.max_memory_reserved(device) / 2**20}

    per_image = probe_seconds_per_image(ours_model, cfg, sub, device)
    # as the engine probes at the default `probe.craft: probes`: the training and test probes
    # crafted in the training precision, the validation split in fp32; and all in fp32 beside it
    probe_s = (per_image["train_crafted"] * cfg.probe.train_size + per_image["eval"] * case.val_size
               + per_image["eval_crafted"] * cfg.probe.test_size)
    probe_fp32_s = per_image["train"] * cfg.probe.train_size + per_image["eval"] * (case.val_size + cfg.probe.test_size)
    probe_all_s = per_image["train_crafted"] * cfg.probe.train_size + per_image["eval_crafted"] * (case.val_size + cfg.probe.test_size)
    ours_med, ref_med = statistics.median(ours_ips), statistics.median(ref_ips)
    epoch_s = case.full_train_size / ours_med
    row: dict[str, Any] = {
        "device": device_label(device),
        "model": case.model,
        "method": method,
        "batch": args.batch,
        "precision": args.precision,
        "ours_ips": round(ours_med, 2),
        "reference_ips": round(ref_med, 2),
        "speedup": round(statistics.median(o / r for o, r in zip(ours_ips, ref_ips, strict=True)), 2),
        "probe_overhead": round(probe_s / (probe_s + epoch_s), 4),
        "probe_overhead_fp32_crafting": round(probe_fp32_s / (probe_fp32_s + epoch_s), 4),
        "probe_overhead_all_crafted": round(probe_all_s / (probe_all_s + epoch_s), 4),
        "peak_mem_mb": None if peak is None else round(peak["allocated"], 1),
        "peak_reserved_mb": None if peak is None else round(peak["reserved"], 1),
        "ours_runs": [round(v, 2) for v in ours_ips],
        "reference_runs": [round(v, 2) for v in ref_ips],
    }
    if compile_seconds is not None:
        row["compile_seconds"] = round(compile_seconds, 1)
    peak_tflops = args.peak_tflops or next((v for k, v in _PEAK_TFLOPS.items() if device.type == "cuda" and k in torch.cuda.get_device_name()), None)
    if peak_tflops and case.model in _FORWARD_GMAC:
        row["mfu"] = round(ours_med * _flops_per_image(case.model, method, 10) / (peak_tflops * 1e12), 4)
    return row


def remedies(case: Case, method: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Images per second of plain training, with `ema` and with `awp`, interleaved; each remedy's cost."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from trainables.awp import WeightPerturbation

    n = args.batch * args.batches
    data = case_data(case, n)
    sub = dataclasses.replace(data, train_x=data.train_x[:n], train_y=data.train_y[:n]).to(device)
    cfg = TrialConfig(
        method=method, model=case.model, batch_size=args.batch, lr=0.05, epochs=1,  # type: ignore[arg-type]
        attack=AttackConfig(eps=case.eps, step=case.step, steps=10), precision=args.precision,
    )
    params = MethodParams.from_config(cfg)
    torch.manual_seed(0)
    base = build_model(case.model, in_channels=data.train_x.shape[1], num_classes=data.num_classes,
                       image_size=data.train_x.shape[-1]).to(device).to(memory_format=torch.channels_last)

    def variant(kind: str) -> Callable[[], int]:
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=5e-4)
        average, awp = None, None
        if kind == "ema":
            ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.999), use_buffers=True)

            def average() -> None:
                ema.update_parameters(model)
        if kind == "awp":
            awp = WeightPerturbation(model, gamma=0.01)
        return lambda: int(_train_epoch(model, opt, cfg, sub, params, 0, device, average=average, awp=awp)["images"])

    runs = {kind: variant(kind) for kind in ("plain", "ema", "awp")}
    ips: dict[str, list[float]] = {kind: [] for kind in runs}
    for i in range(args.repeats + 1):  # interleaved; the first round is the warm-up
        round_ips = {kind: _timed(run, device) for kind, run in runs.items()}
        if i:
            for kind, value in round_ips.items():
                ips[kind].append(value)
    cost = {kind: round(statistics.median(p / r for p, r in zip(ips["plain"], ips[kind], strict=True)) - 1, 4) for kind in ("ema", "awp")}
    return {"device": device_label(device), "model": case.model, "method": method, "batch": args.batch, "precision": args.precision,
            **{f"{kind}_ips": round(statistics.median(v), 2) for kind, v in ips.items()}, "ema_cost": cost["ema"], "awp_cost": cost["awp"],
            "runs": {kind: [round(v, 2) for v in vs] for kind, vs in ips.items()}}


def _flops_per_image(model: str, method: str, steps: int) -> float:
    """Model FLOPs per trained image in forward-pass units (2 FLOPs per MAC)."""
    forward = 2 * _FORWARD_GMAC[model] * 1e9
    attack_steps = {"standard": 0, "fgsm_rs": 1}.get(method, steps)
    attack = attack_steps * 2  # forward + input-gradient backward
    trains_on_both = method in ("trades", "weat", "der", "mart")
    train = 3 * (2 if trains_on_both else 1)  # forward + weight-updating backward
    extra = 1 if method in ("trades", "weat") else 0  # the attack's one clean forward
    metrics = 1 if method in ("sat", "fgsm_rs") else 0  # the clean forward for the accuracy column
    return forward * (attack + train + extra + metrics)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="digits, sat and trades, 5 repeats of 2 batches")
    parser.add_argument("--cases", default="digits,cifar", help=f"comma-separated, from {sorted(CASES)}")
    parser.add_argument("--methods", default="sat,trades", help=f"comma-separated, from {list(reference_at.REFERENCE_METHODS)}")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--batches", type=int, default=4, help="batches per timed run")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per side after one warm-up")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (both sides)")
    parser.add_argument("--workers", type=int, default=0, help="the reference DataLoader's worker processes")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"), help="energyat's `precision` (the reference is fp32)")
    parser.add_argument("--compile", action="store_true", help="torch.compile energyat's model; compile time is reported")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's bf16 dense peak, for MFU")
    parser.add_argument("--remedies", action="store_true", help="the cost of `ema` and `awp` against plain training, instead")
    args = parser.parse_args()
    if args.quick:
        args.cases, args.batches, args.repeats = "digits", 2, 5
    cases = [c for c in args.cases.split(",") if c]
    methods = [m for m in args.methods.split(",") if m]
    bad = [c for c in cases if c not in CASES] + [m for m in methods if m not in reference_at.REFERENCE_METHODS]
    if bad:
        parser.exit(2, f"throughput.py: unknown case or method {bad}; cases {sorted(CASES)}, methods {list(reference_at.REFERENCE_METHODS)}\n")
    torch.set_num_threads(args.threads)
    device = select_device(args.device)
    print(f"# {time.strftime('%Y-%m-%d')} device {device_label(device)}, torch threads {args.threads}, "
          f"batch {args.batch} x {args.batches} batches, {args.repeats} repeats, energyat precision {args.precision}, "
          f"reference DataLoader workers {args.workers}, versions {versions()}")
    rows = []
    for case_name in cases:
        for method in methods:
            rows.append((remedies if args.remedies else bench)(CASES[case_name], method, args, device))
            print(f"# done: {json.dumps(rows[-1])}", flush=True)  # a long run's rows survive an interruption
    if args.remedies:
        print("| model | method | batch | precision | plain img/s | ema img/s | awp img/s | ema cost | awp cost |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['model']} | {r['method']} | {r['batch']} | {r['precision']} | {r['plain_ips']:.1f} | {r['ema_ips']:.1f} | "
                  f"{r['awp_ips']:.1f} | {r['ema_cost']:+.1%} | {r['awp_cost']:+.1%} |")
        for r in rows:
            print(json.dumps(r))
        return
    print("| model | method | batch | precision | energyat img/s | reference img/s | speedup | probe share | peak MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        peak = "n/a" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.0f}"
        print(f"| {r['model']} | {r['method']} | {r['batch']} | {r['precision']} | {r['ours_ips']:.1f} | {r['reference_ips']:.1f} | "
              f"{r['speedup']:.2f}x | {r['probe_overhead']:.1%} | {peak} |")
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
