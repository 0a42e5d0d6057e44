"""Memory layout and precision, one at a time: NCHW/channels_last x fp32/bf16 on the CPU or GPU.

    python benchmarks/precision_layout.py [--threads 2] [--steps 3] [--batch 128]

Times one AT step without the optimizer (``steps``-step PGD with energyat's input-only
attack, then one training forward and backward) on a batch, for each model and each of the
four combinations, best of a few runs. NCHW fp32 is the usual code's layout; channels_last fp32
is energyat's CPU default; channels_last bf16 is `precision: bf16` (and the CUDA default).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from trainables.attacks import pgd
from trainables.engine import device_label, select_device
from trainables.models import build_model
from trainables.precision import autocast

SHAPES = {"small_cnn": (1, 8), "preact_resnet18": (3, 32)}


def step_seconds(model_name: str, *, channels_last: bool, precision: str, batch: int, steps: int, device: torch.device, repeats: int) -> float:
    channels, size = SHAPES[model_name]
    torch.manual_seed(0)
    model = build_model(model_name, in_channels=channels, num_classes=10, image_size=size).to(device)
    x = torch.rand(batch, channels, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    best = float("inf")
    for i in range(repeats + 1):  # the first is a warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with autocast(device, precision):
            x_adv = pgd(model, x, y, eps=0.1, step_size=0.02, steps=steps)
            loss = F.cross_entropy(model(x_adv), y)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = select_device(args.device)
    print(f"# {time.strftime('%Y-%m-%d')} {device_label(device)}, {args.threads} threads, batch {args.batch}, "
          f"PGD-{args.steps} + one training forward/backward, torch {torch.__version__}")
    print("| model | NCHW fp32 | channels_last fp32 | NCHW bf16 | channels_last bf16 |")
    print("|---|---|---|---|---|")
    for name in SHAPES:
        repeats = 2 if name == "preact_resnet18" and device.type == "cpu" else 3
        cells = [
            step_seconds(name, channels_last=cl, precision=p, batch=args.batch, steps=args.steps, device=device, repeats=repeats)
            for p in ("fp32", "bf16") for cl in (False, True)
        ]
        print(f"| {name} | " + " | ".join(f"{c:.3f} s" for c in cells) + " |", flush=True)


if __name__ == "__main__":
    main()
