"""`awp:`, adversarial weight perturbation (trainables/awp.py), against the reference's math
written out here independently: the ascent direction of the method's loss at a fixed x*, rescaled
per layer to the weight's norm, for PGD-AT's and TRADES' losses; and one whole training step of
the engine (perturb, step, restore) against the same update computed by hand."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY

from analysis.errors import SpecError
from trainables.awp import WeightPerturbation
from trainables.config import parse_trial
from trainables.data import load_dataset, to_float
from trainables.engine import _configure_torch, _set_up, _train_epoch, run_trial
from trainables.methods import METHODS, MethodParams, awp_warmup

CPU = torch.device("cpu")
GAMMA = 0.02
SEED = 11


def _setup(method: str, **extra):
    cfg = parse_trial({**TINY, "method": method, "awp": {"gamma": GAMMA}, "weight_decay": 5e-4, "precision": "fp32", **extra})
    _configure_torch(cfg, CPU)
    data = load_dataset(cfg.dataset).to(CPU)
    trial = _set_up(cfg, data, CPU)
    x = to_float(data.train_x[:32])
    y = data.train_y[:32]
    return cfg, trial, x, y


def _reference_direction(model: torch.nn.Module, loss: torch.Tensor, raw: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The reference's v: the gradient of the loss (its proxy steps up it) per conv/linear weight,
    scaled to that weight's norm (the gradients themselves go to `raw` when given)."""
    names = [n for n, p in model.named_parameters() if p.dim() > 1]
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(loss, [params[n] for n in names])
    if raw is not None:
        raw.update(zip(names, grads, strict=True))
    return {n: params[n].norm() / g.norm() * g for n, g in zip(names, grads, strict=True)}


@pytest.mark.parametrize("method", ["sat", "trades"])
def test_the_direction_is_the_normalised_ascent_of_the_methods_loss(method: str) -> None:
    cfg, trial, x, y = _setup(method)
    params = MethodParams.from_config(cfg)
    x_adv = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    awp = WeightPerturbation(trial.model, gamma=GAMMA)
    buffers = {k: v.clone() for k, v in trial.model.state_dict().items() if "running" in k}
    v = awp.direction(METHODS[method].loss, x, y, x_adv, params)
    # the model's batch-norm statistics are untouched: the proxy's moved instead
    assert all(torch.equal(trial.model.state_dict()[k], b) for k, b in buffers.items())

    twin = copy.deepcopy(trial.model).train()
    if method == "sat":  # -CE(f(x*), y): the reference's PGD-AT proxy loss, ascended
        loss = F.cross_entropy(twin(x_adv), y)
    else:  # -(CE(f(x), y) + beta KL(p(x) || p(x*))), gradients through both (the reference's TRADES)
        clean, adv = twin(x), twin(x_adv)
        kl = F.kl_div(F.log_softmax(adv, dim=1), F.softmax(clean, dim=1), reduction="batchmean")
        loss = F.cross_entropy(clean, y) + cfg.beta * kl
    gradients: dict[str, torch.Tensor] = {}
    expected = _reference_direction(twin, loss, gradients)
    assert set(v) == set(expected) and len(v) >= 3  # every conv and linear weight, nothing else
    weights = dict(trial.model.named_parameters())
    worst = 0.0
    for name, value in expected.items():
        torch.testing.assert_close(v[name], value, rtol=1e-4, atol=1e-6)
        assert v[name].norm() == pytest.approx(weights[name].norm().item(), rel=1e-4)
        # the reference's way: one SGD step of lr 0.01 on the proxy, then the difference of the
        # weights, in float32. Same direction, but the difference of two nearly equal numbers
        # loses digits (trainables/awp.py says why energyat takes the gradient instead)
        w = weights[name].detach()
        d = (w + 0.01 * gradients[name]) - w
        ref = w.norm() / d.norm() * d
        assert F.cosine_similarity(ref.flatten(), value.flatten(), dim=0) > 0.999
        worst = max(worst, ((ref - value).abs() / value.abs().clamp_min(1e-12)).max().item())
    assert worst > 0.01, worst


def test_one_training_step_is_taken_at_the_perturbed_weights_and_restored() -> None:
    # one batch of `standard` (no attack, so nothing random): w <- w - lr * (g(w + gamma v) + wd (w + gamma v))
    cfg, trial, _, _ = _setup("standard", batch_size=200, momentum=0.0)
    data = trial.data
    # the batch in the engine's own order (its first draw is the epoch's permutation): digits'
    # pixels are integers, so max-pooling meets near-ties, and an order that changes the last bit
    # of a weight can route a gradient elsewhere (0.3% of an entry, seen without AVX-512)
    torch.manual_seed(SEED)
    order = torch.randperm(len(data.train_y))
    x, y = to_float(data.train_x[order]), data.train_y[order]
    before = copy.deepcopy(trial.model).train()
    params = MethodParams.from_config(cfg)
    torch.manual_seed(SEED)
    _train_epoch(trial.model, trial.opt, cfg, data, params, 0, CPU, awp=trial.perturbation(0))

    v = _reference_direction(before, F.cross_entropy(before(x), y))
    moved = copy.deepcopy(before)
    with torch.no_grad():
        for name, p in moved.named_parameters():
            if name in v:
                p.add_(v[name], alpha=GAMMA)
    moved.load_state_dict({**moved.state_dict(), **{k: b for k, b in before.state_dict().items() if "running" in k or "batches" in k}})
    moved.train()
    loss = F.cross_entropy(moved(x), y)
    grads = torch.autograd.grad(loss, list(moved.parameters()))
    plain = torch.autograd.grad(F.cross_entropy(before(x), y), list(before.parameters()))
    trained = dict(trial.model.named_parameters())
    with torch.no_grad():
        for (name, p), g in zip(moved.named_parameters(), grads, strict=True):
            expected = p - cfg.lr * (g + cfg.weight_decay * p) - GAMMA * v.get(name, torch.zeros_like(p))
            torch.testing.assert_close(trained[name], expected, rtol=1e-4, atol=1e-6)
        # and it is not the plain step from w: the perturbation changed the gradient
        first = next(iter(v))
        index = [n for n, _ in before.named_parameters()].index(first)
        p0, g0 = list(before.parameters())[index], plain[index]
        assert (trained[first] - (p0 - cfg.lr * (g0 + cfg.weight_decay * p0))).abs().max() > 1e-5


def test_warmup_follows_the_reference_per_method_and_a_trial_with_awp_runs(tmp_path) -> None:
    assert awp_warmup(parse_trial({**TINY, "method": "trades", "awp": {"gamma": 0.005}})) == 10
    assert awp_warmup(parse_trial({**TINY, "method": "sat", "awp": {"gamma": 0.01}})) == 0
    assert awp_warmup(parse_trial({**TINY, "method": "trades", "awp": {"gamma": 0.005, "warmup": 1}})) == 1
    cfg = parse_trial({**TINY, "method": "trades", "epochs": 2, "awp": {"gamma": 0.005, "warmup": 1}})
    _configure_torch(cfg, CPU)
    trial = _set_up(cfg, load_dataset(cfg.dataset).to(CPU), CPU)
    assert trial.perturbation(0) is None and trial.perturbation(1) is trial.awp
    result = run_trial(cfg, out=tmp_path)
    assert result["status"] == "TERMINATED" and result["final_pgd_acc"] == result["final_pgd_acc"]
    off = _set_up(dataclasses.replace(cfg, awp=dataclasses.replace(cfg.awp, gamma=0.0)), trial.data, CPU)
    assert off.awp is None and off.perturbation(5) is None


@pytest.mark.parametrize(("awp", "key"), [({"gamma": -0.01}, "awp.gamma"), ({"gamma": 2.0}, "awp.gamma"),
                                          ({"gamma": 0.01, "warmup": -1}, "awp.warmup"), ({"gamma": 0.01, "proxy_lr": 0.1}, "awp.proxy_lr")])
def test_a_bad_awp_block_names_its_key(awp: dict, key: str) -> None:
    with pytest.raises(SpecError, match=f"`{key}`"):
        parse_trial({**TINY, "awp": awp})
