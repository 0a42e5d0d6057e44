"""Everything energyat must show on a GPU, in one run: correctness first, then speed.

    python benchmarks/gpu_check.py --out gpu_check            # on a CUDA machine: at most ~8 minutes
    python benchmarks/gpu_check.py --tiny --out /tmp/dry      # the same checks, tiny shapes, on the CPU

It needs only torch, torchvision, numpy, pyarrow, pyyaml and scikit-learn (what a GPU machine
without a package registry has): no DuckDB, Ray or Optuna. Each check is timed, and a check that
fails is recorded with its error and the run goes on; the script exits 1 when any failed. Writes
``OUT/gpu_check.json`` (every number) and ``OUT/gpu_check.md`` (a table per check).

The checks:

- ``environment``: torch, CUDA and cuDNN versions, the device, TF32 defaults, which optional
  packages are present;
- ``methods``: one epoch of every AT method at `precision` auto and fp32 on CIFAR-shaped data with
  a partial last batch, under ``torch.cuda.set_sync_debug_mode("warn")``: finite losses and the
  number of host synchronisations (the engine's design: one per epoch);
- ``attack_grads``: every method's attack leaves the parameters' ``.grad`` untouched;
- ``attack_precision``: PGD's and TRADES' attack success on a trained digits model under bf16
  autocast, IEEE fp32 and TF32 (the fast-path tolerances: bf16 within 5 points of fp32);
- ``kill_resume``: a 2-epoch `energyat train` on a CIFAR-shaped npz, killed (SIGKILL) after its
  first epoch's rows and run again, against an uninterrupted run: one row per epoch, the same
  rows;
- ``precision_layout``: benchmarks/precision_layout.py's four cells per model;
- ``throughput``: benchmarks/throughput.py for sat and trades on preact_resnet18 at batch 128 and
  512 against the reference (its DataLoader workers kept alive), with MFU, the probe's share of
  an epoch and energyat's own peak memory, and the 100-epoch CIFAR-10 TRADES time projected;
- ``profile``: one SAT batch under torch.profiler: kernels launched per batch, the GPU's busy share;
- ``compiled``: `compile: true` (and `compile_mode: reduce-overhead` on CUDA): compile seconds,
  graphs after the first and the second epoch (recompiles), images/s against eager;
- ``shared_gpu``: 4 trials' training loops in 4 processes on one GPU: total images/s and memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

import precision_layout  # noqa: E402  (siblings, not part of the package)
import throughput  # noqa: E402

from analysis.errors import EnergyatError  # noqa: E402
from analysis.store import read_trial_rows, versions  # noqa: E402
from trainables.config import AttackConfig, DatasetConfig, TrialConfig  # noqa: E402
from trainables.data import ImageData, load_dataset, to_float  # noqa: E402
from trainables.engine import _train_epoch, compile_limits, compiled, device_label, select_device  # noqa: E402
from trainables.methods import METHODS, MethodParams  # noqa: E402
from trainables.models import build_model  # noqa: E402
from trainables.precision import _restore_tf32, _set_tf32, autocast, fp32  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Shapes and counts: the real ones for a GPU, tiny ones for the CPU dry run."""

    model: str
    channels: int
    image: int
    batch: int
    batches: int  # full batches per epoch in `methods`; one partial batch follows
    steps: int  # PGD steps
    throughput_batches: tuple[int, ...]
    throughput_repeats: int
    shared: int  # processes sharing the device
    compile_backend: str


GPU = Sizes("preact_resnet18", 3, 32, 128, 2, 10, (128, 512), 3, 4, "inductor")
TINY = Sizes("small_cnn", 1, 8, 16, 1, 2, (16,), 1, 2, "aot_eager")


def synthetic(sizes: Sizes, n: int, *, seed: int = 0) -> ImageData:
    """Random uint8 images of the model's shape (the arithmetic per image ignores their values)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, sizes.channels, sizes.image, sizes.image), generator=gen, dtype=torch.uint8)
    y = torch.randint(0, 10, (n,), generator=gen)
    return ImageData(x, y, x[:64].clone(), y[:64].clone(), num_classes=10, crop_pad=4 if sizes.image == 32 else 0, flip=sizes.image == 32)


def trial_config(sizes: Sizes, method: str, precision: str) -> TrialConfig:
    eps = 8 / 255 if sizes.image == 32 else 0.15
    return TrialConfig(method=method, model=sizes.model, batch_size=sizes.batch, lr=0.05, epochs=1,  # type: ignore[arg-type]
                       attack=AttackConfig(eps=eps, steps=sizes.steps), precision=precision)  # type: ignore[arg-type]


def fresh_model(sizes: Sizes, device: torch.device, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model(sizes.model, in_channels=sizes.channels, num_classes=10, image_size=sizes.image)
    return model.to(device, memory_format=torch.channels_last)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- correctness ------------------------------------------------------------------------------------


def check_environment(sizes: Sizes, device: torch.device) -> dict[str, Any]:
    import importlib

    def importable(name: str) -> bool:
        try:
            importlib.import_module("trainables.zoo" if name == "robustbench" else name)
            if name == "robustbench":
                importlib.import_module("trainables.zoo").import_robustbench()
        except (ImportError, EnergyatError):  # not usable on this machine: that is the answer recorded
            return False
        return True

    out: dict[str, Any] = {"device": device_label(device), "torch": torch.__version__, "versions": versions()}
    out["optional"] = {name: importable(name) for name in ("duckdb", "ray", "optuna", "pyautoattack", "robustbench")}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out |= {"cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(), "capability": f"{props.major}.{props.minor}",
                "multiprocessors": props.multi_processor_count, "memory_gb": round(props.total_memory / 2**30, 1)}
    before = _set_tf32(True)
    _restore_tf32(before)
    out["tf32_default"] = before
    return out


def check_methods(sizes: Sizes, device: torch.device) -> dict[str, Any]:
    """One epoch per (method, precision) with a partial last batch; host syncs counted on CUDA."""
    n = sizes.batch * sizes.batches + sizes.batch // 2 + 3
    data = synthetic(sizes, n).to(device)
    out: dict[str, Any] = {}
    for method in METHODS:
        for precision in ("auto", "fp32"):
            cfg = trial_config(sizes, method, precision)
            model = fresh_model(sizes, device)
            opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
            _train_epoch(model, opt, cfg, data, MethodParams.from_config(cfg), 0, device)  # warm-up (cuDNN, allocator)
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                if device.type == "cuda":
                    torch.cuda.set_sync_debug_mode("warn")
                try:
                    row = _train_epoch(model, opt, cfg, data, MethodParams.from_config(cfg), 1, device)
                finally:
                    if device.type == "cuda":
                        torch.cuda.set_sync_debug_mode("default")
            syncs = sum("synchroniz" in str(w.message) for w in seen) if device.type == "cuda" else None
            out[f"{method}/{precision}"] = {"train_loss": row["train_loss"], "images": row["images"], "host_syncs": syncs}
            if not math.isfinite(row["train_loss"]) or row["images"] != n:
                raise AssertionError(f"{method} at {precision}: loss {row['train_loss']}, {row['images']} of {n} images")
            if syncs is not None and syncs > 1:
                raise AssertionError(f"{method} at {precision}: {syncs} host synchronisations in one epoch; the engine promises one")
    return out


def check_attack_grads(sizes: Sizes, device: torch.device) -> dict[str, Any]:
    """Each method's attack, in train and eval mode, leaves every parameter's .grad as it was."""
    data = synthetic(sizes, sizes.batch).to(device)
    x, y = to_float(data.train_x), data.train_y
    out = {}
    for method, spec in METHODS.items():
        model = fresh_model(sizes, device).train()
        for p in model.parameters():
            p.grad = torch.full_like(p, 7.0)
        cfg = trial_config(sizes, method, "auto")
        with autocast(device, cfg.precision):
            spec.craft(model, x, y, MethodParams.from_config(cfg))
        untouched = all(p.grad is not None and bool((p.grad == 7.0).all()) for p in model.parameters())
        out[method] = untouched
        if not untouched:
            raise AssertionError(f"{method}'s attack changed the parameters' gradients")
    return out


def check_attack_precision(sizes: Sizes, device: torch.device) -> dict[str, Any]:
    """Attack success on a trained digits model: bf16 autocast, IEEE fp32 and TF32."""
    from trainables.attacks import pgd, trades_kl

    data = load_dataset(DatasetConfig(name="digits")).to(device)
    cfg = TrialConfig(method="standard", batch_size=64, lr=0.05, epochs=4)
    model = build_model("small_cnn", in_channels=1, num_classes=10, image_size=8).to(device, memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    torch.manual_seed(0)
    for epoch in range(4):
        _train_epoch(model, opt, cfg, data, MethodParams.from_config(cfg), epoch, device)
    model.eval()
    x, y = to_float(data.test_x[:256]), data.test_y[:256]
    out: dict[str, Any] = {}
    for name, attack in (("pgd", pgd), ("trades_kl", trades_kl)):
        rates = {}
        for mode in ("fp32", "tf32", "bf16"):
            torch.manual_seed(1)
            before = _set_tf32(mode == "tf32")
            try:
                ctx = torch.autocast(device.type, dtype=torch.bfloat16) if mode == "bf16" else torch.autocast(device.type, enabled=False)
                with ctx:
                    x_adv = attack(model, x, y, eps=0.15, step_size=0.0375, steps=5)
            finally:
                _restore_tf32(before)
            with torch.no_grad(), fp32():
                rates[mode] = float((model(x_adv).argmax(1) != y).float().mean())
        out[name] = rates
        if abs(rates["bf16"] - rates["fp32"]) > 0.05:
            raise AssertionError(f"{name}: attack success {rates['bf16']:.3f} under bf16 against {rates['fp32']:.3f} in fp32")
    return out


def check_kill_resume(sizes: Sizes, device: torch.device, work: Path) -> dict[str, Any]:
    """`energyat train` killed after its first epoch and run again, against a run left alone."""
    gen = np.random.default_rng(0)
    shape = (192, sizes.image, sizes.image, sizes.channels) if sizes.channels == 3 else (192, sizes.image, sizes.image)
    npz = work / "cifar_shaped.npz"
    np.savez(npz, image=gen.integers(0, 256, shape, dtype=np.uint8), label=gen.integers(0, 10, 192))
    spec = {"name": "kill", "dataset": {"name": "npz", "root": str(npz), "val_size": 32}, "model": sizes.model, "epochs": 2,
            "batch_size": sizes.batch, "lr": 0.05, "attack": {"eps": 8 / 255, "steps": min(sizes.steps, 3)}, "eval_attack": {"steps": 4},
            "probe": {"train_size": 32, "test_size": 32}, "final_eval": {"n": 32, "pgd_steps": 4, "autoattack_n": 0},
            "device": device.type, "method": "sat"}
    (work / "spec.yaml").write_text(yaml.safe_dump(spec))
    cli = [sys.executable, "-m", "study.cli", "train", str(work / "spec.yaml")]
    alone = subprocess.run([*cli, "--out", str(work / "alone")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    if alone.returncode != 0:
        raise AssertionError(f"the uninterrupted run failed: {alone.stderr[-1500:]}")
    killed_out = work / "killed"
    proc = subprocess.Popen([*cli, "--out", str(killed_out)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    first = killed_out / "tables/epochs/trial=train/epoch-0000.parquet"
    deadline = time.monotonic() + 600
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    killed_during = "epoch 1" if proc.poll() is None else "after the end"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    again = subprocess.run([*cli, "--out", str(killed_out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    if again.returncode != 0:
        raise AssertionError(f"the resumed run failed: {again.stderr[-1500:]}")
    columns = ("epoch", "train_loss", "val_robust_acc", "probe_train_dE")
    a = read_trial_rows(str(work / "alone"), table="epochs", trial_id="train", columns=columns)
    b = read_trial_rows(str(killed_out), table="epochs", trial_id="train", columns=columns)
    if a["epoch"] != [0, 1] or b["epoch"] != [0, 1]:
        raise AssertionError(f"rows per epoch: alone {a['epoch']}, killed and resumed {b['epoch']}")
    diffs = {c: max(abs(u - v) for u, v in zip(a[c], b[c], strict=True)) for c in columns[1:]}
    return {"killed": killed_during, "rows": b["epoch"], "max_abs_diff": diffs, "identical": all(d == 0 for d in diffs.values())}


# -- speed -----------------------------------------------------------------------------------------


def check_precision_layout(sizes: Sizes, device: torch.device) -> dict[str, Any]:
    models = ["small_cnn"] + ([sizes.model] if sizes.model != "small_cnn" else [])
    out = {}
    for name in models:
        cells = {f"{'channels_last' if cl else 'NCHW'} {p}": precision_layout.step_seconds(
            name, channels_last=cl, precision=p, batch=sizes.batch, steps=sizes.steps, device=device, repeats=2 if sizes is TINY else 3)
            for p in ("fp32", "bf16") for cl in (False, True)}
        out[name] = {k: round(v, 4) for k, v in cells.items()}
    return out


def check_throughput(sizes: Sizes, device: torch.device) -> dict[str, Any]:
    case = throughput.CASES["cifar"] if sizes.image == 32 else throughput.CASES["digits"]
    rows = []
    for batch in sizes.throughput_batches:
        for method in ("sat", "trades"):
            args = argparse.Namespace(
                batch=batch,
                batches=2 if sizes is GPU else 1,
                repeats=sizes.throughput_repeats,
                workers=4 if device.type == "cuda" else 0,
                precision="auto",
                compile=False,
                peak_tflops=None,
            )
            row = throughput.bench(case, method, args, device)
            epoch_s = case.full_train_size / row["ours_ips"]
            row["projected_100_epochs_min"] = round(100 * epoch_s / (1 - row["probe_overhead"]) / 60, 1)
            rows.append(row)
    return {"rows": rows}


def check_profile(sizes: Sizes, device: torch.device) -> dict[str, Any]:
    """Kernels per SAT batch and the share of the batch's wall time the GPU was busy."""
    from torch.profiler import ProfilerActivity, profile

    data = synthetic(sizes, sizes.batch).to(device)
    cfg = trial_config(sizes, "sat", "auto")
    model = fresh_model(sizes, device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    params = MethodParams.from_config(cfg)
    _train_epoch(model, opt, cfg, data, params, 0, device)  # warm-up
    _sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        _train_epoch(model, opt, cfg, data, params, 1, device)
        _sync(device)
    wall_us = (time.perf_counter() - t0) * 1e6
    events = prof.events()
    if device.type == "cuda":
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        busy = sum(e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total for e in kernels)
        return {"kernels_per_batch": len(kernels), "gpu_busy_share": round(busy / wall_us, 3), "batch_ms": round(wall_us / 1000, 1)}
    ops = [e for e in events if e.name.startswith("aten::")]
    return {"aten_ops_per_batch": len(ops), "batch_ms": round(wall_us / 1000, 1), "gpu_busy_share": None}


def check_compiled(sizes: Sizes, device: torch.device) -> dict[str, Any]:
    """Compile time, graphs after epochs 1 and 2 (recompiles), images/s against eager."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    n = sizes.batch * sizes.batches + sizes.batch // 2 + 3
    data = synthetic(sizes, n).to(device)
    modes = ["default"] + (["reduce-overhead"] if device.type == "cuda" and sizes.compile_backend == "inductor" else [])
    out: dict[str, Any] = {}
    for mode in modes:
        for method in ("sat", "trades"):
            torch._dynamo.reset()
            counters.clear()
            base = trial_config(sizes, method, "auto")
            cfg = dataclasses.replace(base, compile=True, compile_backend=sizes.compile_backend, compile_mode=mode)  # type: ignore[arg-type]
            model = fresh_model(sizes, device)
            opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
            params = MethodParams.from_config(cfg)
            train_model = compiled(model, cfg)
            graphs, seconds = [], []
            with compile_limits(cfg):
                for epoch in range(3):
                    _sync(device)
                    t0 = time.perf_counter()
                    _train_epoch(train_model, opt, cfg, data, params, epoch, device)
                    _sync(device)
                    seconds.append(time.perf_counter() - t0)
                    graphs.append(counters["stats"]["unique_graphs"])
            eager = fresh_model(sizes, device)
            eager_opt = torch.optim.SGD(eager.parameters(), lr=0.05, momentum=0.9)
            _train_epoch(eager, eager_opt, base, data, params, 0, device)
            _sync(device)
            t0 = time.perf_counter()
            _train_epoch(eager, eager_opt, base, data, params, 1, device)
            _sync(device)
            eager_s = time.perf_counter() - t0
            out[f"{method}/{mode}"] = {"first_epoch_s": round(seconds[0], 1), "graphs_per_epoch": graphs,
                                       "recompiled_after_first_epoch": graphs[-1] != graphs[0],
                                       "compiled_ips": round(n / min(seconds[1:]), 1), "eager_ips": round(n / eager_s, 1)}
            if graphs[-1] != graphs[0]:
                raise AssertionError(f"{method} ({mode}) recompiled after its first epoch: graphs {graphs}")
    return out


_SHARED = """
import sys, time, torch
sys.path.insert(0, {root!r})
sys.path.insert(0, {here!r})
import gpu_check
sizes = gpu_check.{sizes}
device = torch.device({device!r})
data = gpu_check.synthetic(sizes, sizes.batch * 3).to(device)
cfg = gpu_check.trial_config(sizes, "sat", "auto")
model = gpu_check.fresh_model(sizes, device)
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
params = gpu_check.MethodParams.from_config(cfg)
gpu_check._train_epoch(model, opt, cfg, data, params, 0, device)
gpu_check._sync(device)
print("ready", flush=True)
sys.stdin.readline()
t0 = time.perf_counter()
images = sum(gpu_check._train_epoch(model, opt, cfg, data, params, e, device)["images"] for e in range(1, {epochs}))
gpu_check._sync(device)
mem = torch.cuda.max_memory_reserved(device) / 2**20 if device.type == "cuda" else 0.0
print(images / (time.perf_counter() - t0), mem, flush=True)
"""


def check_shared_gpu(sizes: Sizes, device: torch.device) -> dict[str, Any]:
    """`shared` processes training SAT at once on one device (as trials with gpu 1/shared do)."""
    code = _SHARED.format(
        root=str(ROOT), here=str(HERE), sizes="GPU" if sizes is GPU else "TINY", device=str(device), epochs=4 if sizes is GPU else 2
    )
    procs = [subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(sizes.shared)]
    for p in procs:  # every process warmed up before any is timed
        line = p.stdout.readline() if p.stdout else ""
        if line.strip() != "ready":
            raise AssertionError(f"a sharing process failed: {p.stderr.read()[-1500:] if p.stderr else ''}")
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    results = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        if p.returncode != 0:
            raise AssertionError(f"a sharing process failed: {err[-1500:]}")
        ips, mem = map(float, out.split())
        results.append((ips, mem))
    free, total = torch.cuda.mem_get_info(device) if device.type == "cuda" else (0, 0)
    return {"processes": sizes.shared, "total_ips": round(sum(r[0] for r in results), 1), "per_process_ips": [round(r[0], 1) for r in results],
            "per_process_reserved_mb": [round(r[1], 1) for r in results], "device_used_mb_after": round((total - free) / 2**20, 1) if total else None}


CHECKS: dict[str, Callable[..., dict[str, Any]]] = {
    "environment": check_environment,
    "methods": check_methods,
    "attack_grads": check_attack_grads,
    "attack_precision": check_attack_precision,
    "kill_resume": check_kill_resume,
    "precision_layout": check_precision_layout,
    "throughput": check_throughput,
    "profile": check_profile,
    "compiled": check_compiled,
    "shared_gpu": check_shared_gpu,
}


def run(out: Path, *, tiny: bool, device_name: str, only: list[str] | None = None) -> dict[str, Any]:
    sizes = TINY if tiny else GPU
    device = select_device(device_name)
    if not tiny and device.type != "cuda":
        raise SystemExit("no CUDA device visible: run with --tiny for the CPU dry run")
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M"), "tiny": tiny, "checks": {}}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="energyat-gpu-check-") as tmp:
        for name, check in CHECKS.items():
            if only and name not in only:
                continue
            t0 = time.perf_counter()
            kwargs = {"work": Path(tmp) / name} if name == "kill_resume" else {}
            if kwargs:
                kwargs["work"].mkdir()
            try:
                result = {"ok": True, **check(sizes, device, **kwargs)}
            except Exception as exc:  # recorded, shown, and the exit status says so: the other checks still run
                result = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
            result["seconds"] = round(time.perf_counter() - t0, 1)
            results["checks"][name] = result
            print(f"{name}: {'ok' if result['ok'] else 'FAILED ' + result['error']} ({result['seconds']} s)", flush=True)
            (out / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str))  # after every check: a timeout keeps the rest
    results["seconds"] = round(time.perf_counter() - started, 1)
    (out / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "gpu_check.md").write_text(markdown(results))
    return results


def markdown(results: dict[str, Any]) -> str:
    lines = [f"# gpu_check, {results['date']}{' (tiny dry run)' if results['tiny'] else ''}: {results.get('seconds', '?')} s", ""]
    for name, r in results["checks"].items():
        lines.append(f"## {name}: {'ok' if r['ok'] else 'FAILED'} ({r['seconds']} s)")
        lines.append("")
        if not r["ok"]:
            lines += [f"    {r['error']}", ""]
            continue
        rows = r.get("rows")
        if isinstance(rows, list) and rows and all(isinstance(row, dict) for row in rows):
            keys = [k for k in rows[0] if not isinstance(rows[0][k], list)]
            lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            lines += ["| " + " | ".join(str(row.get(k)) for k in keys) + " |" for row in rows]
        else:
            lines += ["| key | value |", "|---|---|"]
            lines += [f"| {k} | {json.dumps(v, default=str)} |" for k, v in r.items() if k not in ("ok", "seconds")]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU: the dry run the test suite keeps")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--only", default=None, help=f"comma-separated, from {', '.join(CHECKS)}")
    args = parser.parse_args()
    only = [c for c in args.only.split(",") if c] if args.only else None
    unknown = sorted(set(only or []) - set(CHECKS))
    if unknown:
        parser.exit(2, f"gpu_check.py: unknown checks {unknown}; choose from {', '.join(CHECKS)}\n")
    if args.tiny:
        torch.set_num_threads(2)
    results = run(args.out, tiny=args.tiny, device_name="cpu" if args.tiny else args.device, only=only)
    print(
        f"{sum(r['ok'] for r in results['checks'].values())} of {len(results['checks'])} checks ok in {results['seconds']} s: "
        f"{args.out / 'gpu_check.md'}"
    )
    raise SystemExit(0 if all(r["ok"] for r in results["checks"].values()) else 1)


if __name__ == "__main__":
    main()
