"""`compile: true` keeps the fast path's promises: attack steps compute the input's gradient only,
and a trial compiles in its first epoch and never again.

Both are properties of dynamo (its guards decide what recompiles) and of AOTAutograd (it traces
the backward a compiled model runs), not of the code generator: the tests use the `aot_eager`
backend, which compiles in seconds on the CPU where inductor takes over a minute.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch._dynamo
from conftest import TINY
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.utils import counters

from trainables.attacks import ATTACKS, random_targets
from trainables.config import parse_trial
from trainables.engine import COMPILE_RECOMPILE_LIMIT, run_trial
from trainables.methods import METHODS
from trainables.models import build_model


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _backward_gradients(attack: str) -> list[list[bool]]:
    """Which inputs of each traced backward graph get a gradient, for one attack on a compiled model."""
    graphs = []

    def keep(gm: torch.fx.GraphModule, _inputs: Any) -> Any:
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    backend = aot_autograd(fw_compiler=lambda gm, _inputs: make_boxed_func(gm.forward), bw_compiler=keep)
    torch.manual_seed(0)
    model = build_model("small_cnn", in_channels=1, num_classes=10, image_size=8)
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    target = random_targets(y, 10, torch.Generator().manual_seed(0)) if attack == "pgd_targeted" else y
    ATTACKS[attack](torch.compile(model, backend=backend), x, target, eps=0.1, step_size=0.05, steps=2)
    assert graphs, "no backward graph was traced"
    out = []
    for gm in graphs:
        (result,) = [n for n in gm.graph.nodes if n.op == "output"]
        out.append([g is not None for g in result.args[0]])
    return out


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_an_attack_on_a_compiled_model_computes_the_inputs_gradient_only(attack: str) -> None:
    # without freezing the parameters, AOTAutograd's backward returns a gradient for each of
    # small_cnn's 10 weights as well (seen: 11 of 18 outputs); energyat's attacks return one
    for grads in _backward_gradients(attack):
        assert sum(grads) == 1, grads


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_compiled_trial_compiles_in_its_first_epoch_and_never_again(method: str, tmp_path: Path) -> None:
    # bf16 autocast (TRADES' fp32 step included), train- and eval-mode crafting, clean logits
    # without gradients and a last batch of 8 (200 images, batch 64): every variant is compiled
    # in epoch 0; dynamo may not recompile later, nor hit its recompile limit and fall back to eager
    cfg = parse_trial({**TINY, "method": method, "epochs": 3, "precision": "bf16", "compile": True, "compile_backend": "aot_eager"})
    graphs: list[int] = []

    def after_epoch(_row: dict[str, Any], _ckpt: Path) -> None:
        graphs.append(counters["stats"]["unique_graphs"])
        return None

    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        run_trial(cfg, out=tmp_path, on_epoch=after_epoch)
    assert len(graphs) == 3 and graphs[0] == graphs[-1], graphs  # epochs 0 and 1, then the end
    assert 2 <= graphs[0] <= COMPILE_RECOMPILE_LIMIT


def test_compile_modes_are_inductors() -> None:
    from analysis.errors import SpecError

    with pytest.raises(SpecError, match="no modes"):
        parse_trial({"compile": True, "compile_backend": "aot_eager", "compile_mode": "reduce-overhead"})
    with pytest.raises(SpecError, match="with `compile: true` only"):
        parse_trial({"compile_mode": "reduce-overhead"})
