"""How good are generated images, without downloads: an independently trained standard classifier.

Inception Score and FID need Inception-v3 weights that cannot be fetched everywhere. The proxy
asks a classifier that never saw the generator: a `cnn_fc` trained the standard way (no attack,
its own seed) on the same training images. Three numbers, named for what they are:

- ``judge_acc``: the fraction of samples the judge assigns to their intended class;
- ``judge_conf``: the judge's mean softmax probability of the intended class;
- ``judge_fd``: the Frechet distance between the judge's penultimate features of the samples and
  of real test images of the same classes (FID's formula in the judge's feature space; its scale
  is the judge's own, comparable only between runs that share a judge).

With ``inception_weights`` (a torchvision Inception-v3 state dict file) the real Inception Score
and FID are computed too (:func:`inception_scores`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainables import checkpoint
from trainables.attacks import eval_mode
from trainables.data import ImageData
from trainables.models import build_model

JUDGE_MODEL = "cnn_fc"
JUDGE_SEED = 12345  # not a trial's seed: the judge is independent of the models it judges


def train_judge(data: ImageData, *, epochs: int = 20, batch_size: int = 128, lr: float = 0.05) -> tuple[nn.Module, float]:
    """(judge, its clean test accuracy): standard training, SGD with momentum, cosine lr."""
    gen = torch.Generator().manual_seed(JUDGE_SEED)
    torch.manual_seed(JUDGE_SEED)
    x, y = data.train_x.float() / 255, data.train_y
    model = build_model(JUDGE_MODEL, in_channels=x.shape[1], num_classes=data.num_classes, image_size=x.shape[-1])
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    steps = epochs * math.ceil(len(y) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        for lo in range(0, len(y), batch_size):
            idx = order[lo : lo + batch_size]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(data.test_x.float() / 255).argmax(1) == data.test_y).float().mean())
    return model, acc


def load_or_train_judge(data: ImageData, path: Path) -> tuple[nn.Module, float]:
    """The judge saved at `path` when there is one for this dataset's shape, else a new one, saved."""
    shape = [int(s) for s in data.train_x.shape[1:]]
    if path.exists():
        state = checkpoint.load(path)
        if state["shape"] == shape and state["num_classes"] == data.num_classes and state["train_size"] == len(data.train_y):
            model = build_model(JUDGE_MODEL, in_channels=shape[0], num_classes=data.num_classes, image_size=shape[-1])
            model.load_state_dict(state["model"])
            return model.eval(), float(state["test_acc"])
    model, acc = train_judge(data)
    checkpoint.save(path, {"model": model.state_dict(), "shape": shape, "num_classes": data.num_classes,
                           "train_size": len(data.train_y), "test_acc": acc})
    return model, acc


def _penultimate(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, the input of the model's last Linear layer) in one forward pass."""
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    seen: list[torch.Tensor] = []
    handle = last.register_forward_hook(lambda _m, inputs, _out: seen.append(inputs[0].detach()))
    try:
        with torch.no_grad(), eval_mode(model):
            logits = model(x)
    finally:
        handle.remove()
    return logits, seen[0]


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), rows are samples (float64);
    NaN when either side has fewer than 2 samples (no covariance to compare)."""
    if len(a) < 2 or len(b) < 2:
        return math.nan
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.atleast_2d(torch.cov(a.T)), torch.atleast_2d(torch.cov(b.T))
    vals, vecs = torch.linalg.eigh(s_a)
    root_a = vecs @ torch.diag(vals.clamp_min(0).sqrt()) @ vecs.T
    cross = torch.linalg.eigvalsh(root_a @ s_b @ root_a).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + torch.trace(s_a) + torch.trace(s_b) - 2 * cross)


def judge_scores(judge: nn.Module, samples: torch.Tensor, y: torch.Tensor, real: torch.Tensor) -> dict[str, float]:
    """``judge_acc``, ``judge_conf`` and ``judge_fd`` of `samples` (intended classes `y`) against
    `real` test images (float in [0, 1]) of the same classes."""
    logits, feats = _penultimate(judge, samples)
    _real_logits, real_feats = _penultimate(judge, real)
    prob = logits.softmax(1).gather(1, y[:, None]).squeeze(1)
    return {
        "judge_acc": float((logits.argmax(1) == y).float().mean()),
        "judge_conf": float(prob.mean()),
        "judge_fd": frechet_distance(feats, real_feats),
    }


def inception_scores(samples: torch.Tensor, real: torch.Tensor, weights: Path, *, splits: int = 10) -> dict[str, Any]:
    """Inception Score and FID with the torchvision Inception-v3 whose state dict is in `weights`
    (for instance torchvision's ``inception_v3_google`` file, fetched where a network is)."""
    from torchvision.models import inception_v3

    net = inception_v3(weights=None, aux_logits=True, init_weights=False)
    net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    net.fc, fc = nn.Identity(), net.fc  # pool3 features (2048) for FID; logits through fc for IS

    def run(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        with torch.no_grad(), eval_mode(net):
            feats = torch.cat([net((x[i : i + 32] - mean) / std) for i in range(0, len(x), 32)])
            return feats, fc(feats)

    feats, logits = run(samples)
    real_feats, _ = run(real)
    p = logits.double().softmax(1)
    scores = []
    for part in p.chunk(min(splits, len(p))):
        marginal = part.mean(0, keepdim=True)
        scores.append(float((part * (part.clamp_min(1e-12).log() - marginal.clamp_min(1e-12).log())).sum(1).mean().exp()))
    return {"inception_score": sum(scores) / len(scores), "fid": frechet_distance(feats, real_feats)}
