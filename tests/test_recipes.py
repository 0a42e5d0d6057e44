"""The reference protocols the recipe files follow, pinned, and the keys behind them doing what
they say: batch-norm mode while crafting, where the attack starts, momentum cycling, the step
that scales with eps (docs/evaluation.md lists where energyat still differs from each reference)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import EXAMPLES

from analysis.errors import SpecError
from study.spec import load_spec
from trainables.config import parse_trial
from trainables.methods import METHODS, MethodParams

PAPER = ["paper_cifar10.yaml", "paper_cifar100.yaml", "paper_svhn.yaml"]


@pytest.mark.parametrize("name", PAPER)
def test_the_paper_recipes_follow_the_weat_code(name: str) -> None:
    study = load_spec(EXAMPLES / name)
    cfg = study.trial
    assert (cfg.model, cfg.model_init, cfg.epochs, cfg.batch_size, cfg.lr, cfg.weight_decay) == ("resnet18", "reference", 100, 128, 0.1, 5e-4)
    s = cfg.schedule  # OneCycleLR(max_lr=0.1, pct_start=0.25), momentum cycled 0.95 -> 0.85 -> 0.95
    assert (s.name, s.pct_start, s.div_factor, s.final_div_factor) == ("onecycle", 0.25, 25.0, 1e4)
    assert (s.cycle_momentum, s.base_momentum, s.max_momentum) == (True, 0.85, 0.95)
    a = cfg.attack
    assert (a.eps, a.step, a.steps, a.norm, a.bn, a.start) == (pytest.approx(8 / 255), pytest.approx(2 / 255), 10, "linf", "auto", "auto")
    assert cfg.eval_attack.steps == 20
    d = cfg.dataset  # RandomCrop(32, padding=4) and RandomHorizontalFlip for every dataset, SVHN included
    assert (d.crop_pad, d.flip, d.val_size) == (4, True, 1000)
    assert (cfg.final_eval.n, cfg.final_eval.autoattack_n, cfg.final_eval.pgd_steps) == (None, None, 50)
    assert (cfg.weat.tau, cfg.weat.power, cfg.weat.normalize, cfg.weat.energy, cfg.weat.variant) == (1.0, 1.0, False, "natural", "adv")
    assert study.objectives == ("best_val_robust_acc", "best_val_clean_acc")


def test_the_rice_recipe_follows_rice_et_al() -> None:
    cfg = load_spec(EXAMPLES / "rice2020_cifar10.yaml").trial
    assert (cfg.model, cfg.method, cfg.epochs, cfg.batch_size, cfg.lr, cfg.momentum, cfg.weight_decay) == (
        "preact_resnet18",
        "sat",
        200,
        128,
        0.1,
        0.9,
        5e-4,
    )
    assert (cfg.schedule.name, cfg.schedule.milestones, cfg.schedule.gamma) == ("piecewise", (100.0, 150.0), 0.1)
    a = cfg.attack
    assert (a.eps, a.step, a.steps, a.bn, a.start) == (pytest.approx(8 / 255), pytest.approx(2 / 255), 10, "train", "uniform")
    assert (cfg.dataset.val_size, cfg.eval_attack.steps, cfg.final_eval.autoattack_n) == (1000, 10, None)


def test_auto_resolves_to_each_methods_reference() -> None:
    # Rice et al. and Wong et al. craft in train mode from a uniform start; TRADES, MART and the
    # WEAT code craft in eval mode from x + 0.001 N(0, I)
    expected_bn = {"sat": "train", "fgsm_rs": "train", "der": "train", "trades": "eval", "weat": "eval", "mart": "eval", "standard": "eval"}
    expected_start = {
        "sat": "uniform",
        "fgsm_rs": "uniform",
        "der": "uniform",
        "trades": "gaussian",
        "weat": "gaussian",
        "mart": "gaussian",
        "standard": "uniform",
    }
    assert {m: METHODS[m].bn for m in METHODS} == expected_bn and {m: METHODS[m].start for m in METHODS} == expected_start
    assert set(expected_bn) == set(METHODS)
    for method in METHODS:
        p = MethodParams.from_config(parse_trial({"method": method}))
        assert (p.bn, p.start) == (expected_bn[method], expected_start[method]), method
    p = MethodParams.from_config(parse_trial({"method": "sat", "attack": {"bn": "eval", "start": "gaussian"}}))
    assert (p.bn, p.start) == ("eval", "gaussian")


def _bn_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.Linear(4 * 36, 10))


@pytest.mark.parametrize(("method", "moves"), [("sat", True), ("fgsm_rs", True), ("trades", False), ("mart", False)])
def test_a_train_mode_craft_updates_batch_norm_and_an_eval_mode_one_does_not(method: str, moves: bool) -> None:
    # the training attack in the method's reference mode; the model's own mode comes back
    cfg = parse_trial({"method": method, "attack": {"eps": 0.1, "steps": 3}})
    model = _bn_model().train()
    before = model[1].running_mean.clone()
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    METHODS[method].craft(model, x, y, MethodParams.from_config(cfg))
    assert model.training
    assert (not torch.equal(model[1].running_mean, before)) is moves


def test_the_probes_craft_in_eval_mode_whatever_the_training_attack_does() -> None:
    from trainables.probe import probe, probe_attacks

    cfg = parse_trial({"method": "sat", "attack": {"eps": 0.1, "steps": 3}})
    model = _bn_model().eval()
    before = model[1].running_mean.clone()
    train_attack, eval_attack, targeted = probe_attacks(cfg, MethodParams.from_config(cfg))
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    probe(model, x, y, attack=train_attack, targeted=targeted, targets=(y + 1) % 10, seed=0)
    probe(model, x, y, attack=eval_attack, seed=0)
    assert torch.equal(model[1].running_mean, before) and not model.training


@pytest.mark.parametrize(("start", "spread"), [("uniform", 0.1 / 3**0.5), ("gaussian", 0.001)])
def test_the_attack_starts_where_its_reference_starts(start: str, spread: float) -> None:
    # a vanishing step leaves x* at the start: uniform in the ball (std eps/sqrt(3)) or MART's and
    # TRADES' x + 0.001 N(0, I)
    from trainables.attacks import pgd

    torch.manual_seed(0)
    model = _bn_model().eval()
    x = torch.full((64, 1, 8, 8), 0.5)
    x_adv = pgd(model, x, torch.zeros(64, dtype=torch.long), eps=0.1, step_size=1e-9, steps=1, start=start)  # type: ignore[arg-type]
    assert (x_adv - x).std().item() == pytest.approx(spread, rel=0.05)


def test_the_step_scales_with_eps_unless_given_and_must_reach_the_edge_of_the_ball() -> None:
    # 2.5 * eps / steps: 2/255 at 8/255 and 10 steps; an L2 ball of 0.5 gets 0.125, not 2/255
    assert parse_trial({}).attack.step == pytest.approx(2 / 255)
    assert parse_trial({"attack": {"norm": "l2", "eps": 0.5}}).attack.step == pytest.approx(0.125)
    with pytest.raises(SpecError, match="cannot reach eps 0.5") as err:
        parse_trial({"attack": {"norm": "l2", "eps": 0.5, "step": 2 / 255}})
    assert err.value.key == "attack.step"
    with pytest.raises(SpecError, match="eval_attack.steps 1"):
        parse_trial({"attack": {"eps": 8 / 255, "step": 2 / 255}, "eval_attack": {"steps": 1}})


def test_cycled_momentum_reaches_the_optimizer(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # one onecycle epoch with cycle_momentum: SGD's momentum at the last batch is the schedule's
    from conftest import TINY

    from trainables import checkpoint
    from trainables.engine import run_trial
    from trainables.schedules import momentum_at

    cfg = parse_trial({**TINY, "epochs": 2, "schedule": {"name": "onecycle", "cycle_momentum": True}})
    run_trial(cfg, out=tmp_path)
    group = checkpoint.load(tmp_path / "checkpoints/train/last.pt")["optimizer"]["param_groups"][0]
    batches = 200 // cfg.batch_size + (200 % cfg.batch_size > 1)
    assert group["momentum"] == pytest.approx(momentum_at(cfg.schedule, epochs=2, epoch=1, batch=batches - 1, batches=batches))
    assert group["momentum"] != cfg.momentum
    off = dataclasses.replace(cfg, schedule=dataclasses.replace(cfg.schedule, cycle_momentum=False))
    run_trial(off, out=tmp_path / "off")
    assert checkpoint.load(tmp_path / "off/checkpoints/train/last.pt")["optimizer"]["param_groups"][0]["momentum"] == cfg.momentum


def test_cycle_momentum_without_onecycle_is_refused() -> None:
    with pytest.raises(SpecError, match="onecycle schedule only"):
        parse_trial({"schedule": {"name": "piecewise", "cycle_momentum": True}})
