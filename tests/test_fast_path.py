"""Correctness under speed: energyat's fast path against the plain path, on the CPU.

The plain path is ``benchmarks/reference_at.py``, the usual AT code that
``benchmarks/throughput.py`` times energyat against: NCHW fp32, ``loss.backward()`` in every
attack step, TRADES' clean forward recomputed inside every step. The fast path is what the
engine runs: channels_last, input-only gradients, the clean forward once, and bf16 autocast
when `precision` asks for it.

Stated tolerances (measured margins in the comments):
- fp32 fast path: the same arithmetic reordered, so the same adversarial examples and energies
  to float32 rounding (rtol 1e-4); each method's loss and weight gradients are compared in
  float64 (to 1e-9), where no attack step's sign is decided by rounding;
- bf16 fast path: attack success rate within 5 points and mean energies within 2% (E is about
  -8 here; bf16 keeps 8 bits of mantissa, so logits carry about 0.4% error).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import reference_at  # noqa: E402

from trainables.attacks import pgd, trades_kl  # noqa: E402
from trainables.config import AttackConfig, DatasetConfig, TrialConfig  # noqa: E402
from trainables.data import (
    load_dataset,  # noqa: E402
    to_float,  # noqa: E402
)
from trainables.energy import marginal_energy  # noqa: E402
from trainables.engine import _train_epoch  # noqa: E402
from trainables.methods import METHODS, MethodParams  # noqa: E402
from trainables.models import build_model  # noqa: E402
from trainables.precision import autocast  # noqa: E402

EPS, STEP, STEPS = 0.15, 0.0375, 5
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def trained() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """small_cnn after 4 epochs of standard training on digits (about 95% clean test accuracy),
    so that attacks have something to break; and 256 test images."""
    torch.manual_seed(0)
    data = load_dataset(DatasetConfig(name="digits"))
    cfg = TrialConfig(method="standard", batch_size=64, lr=0.05, epochs=4)
    model = build_model("small_cnn", in_channels=1, num_classes=10, image_size=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    params = MethodParams.from_config(cfg)
    for epoch in range(4):
        _train_epoch(model, opt, cfg, data, params, epoch, CPU)
    model.eval()
    return model, data.test_x[:256], data.test_y[:256]


def _plain(model: torch.nn.Module) -> torch.nn.Module:
    return model.to(memory_format=torch.contiguous_format)


def _fast(model: torch.nn.Module) -> torch.nn.Module:
    return model.to(memory_format=torch.channels_last)


def _success_and_energy(model: torch.nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor, precision: str) -> tuple[float, float, float]:
    """Attack success on correctly classified images, mean E(x), mean E(x*)."""
    with torch.no_grad(), autocast(CPU, precision):
        logits, logits_adv = model(x).float(), model(x_adv).float()
    correct = logits.argmax(1) == y
    success = ((logits_adv.argmax(1) != y) & correct).sum() / correct.sum()
    return float(success), float(marginal_energy(logits).mean()), float(marginal_energy(logits_adv).mean())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_pgd_fast_and_plain_paths_agree_on_success_and_energies(trained, precision: str) -> None:
    model, x_u8, y = trained
    x_plain = x_u8.float() / 255
    torch.manual_seed(1)
    x_adv_plain = reference_at.pgd_attack(_plain(model), x_plain, y, eps=EPS, step_size=STEP, steps=STEPS)
    model.eval()
    plain = _success_and_energy(model, x_plain, x_adv_plain, y, "fp32")

    fast_model = _fast(model)
    x_fast = to_float(x_u8)
    torch.manual_seed(1)
    with autocast(CPU, precision):
        x_adv_fast = pgd(fast_model, x_fast, y, eps=EPS, step_size=STEP, steps=STEPS)
    fast = _success_and_energy(fast_model, x_fast, x_adv_fast, y, precision)
    # the attack must work for the comparison to mean anything (measured: about 0.6)
    assert plain[0] > 0.3
    if precision == "fp32":
        assert fast == pytest.approx(plain, rel=1e-4, abs=1e-4)
        assert torch.allclose(x_adv_fast, x_adv_plain, atol=1e-5)
    else:
        assert abs(fast[0] - plain[0]) <= 0.05
        assert fast[1:] == pytest.approx(plain[1:], rel=0.02)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_trades_attack_with_one_clean_forward_matches_the_released_attack(trained, precision: str) -> None:
    model, x_u8, y = trained
    x = x_u8.float() / 255
    torch.manual_seed(2)
    x_adv_plain = reference_at.trades_attack(_plain(model), x, eps=EPS, step_size=STEP, steps=STEPS)
    model.eval()
    plain = _success_and_energy(model, x, x_adv_plain, y, "fp32")
    fast_model = _fast(model)
    torch.manual_seed(2)
    with autocast(CPU, precision):
        x_adv_fast = trades_kl(fast_model, to_float(x_u8), y, eps=EPS, step_size=STEP, steps=STEPS)
    fast = _success_and_energy(fast_model, x, x_adv_fast, y, precision)
    if precision == "fp32":
        assert fast == pytest.approx(plain, rel=1e-4, abs=1e-4)
    else:
        assert abs(fast[0] - plain[0]) <= 0.05
        assert fast[1:] == pytest.approx(plain[1:], rel=0.02)


@pytest.mark.parametrize("method", reference_at.REFERENCE_METHODS)
def test_each_method_loss_and_weight_gradients_match_the_plain_path(trained, method: str) -> None:
    # the same batch, the same random start: the engine's method (input-only attack gradients,
    # one clean forward, channels_last) and the plain code give the same loss and the same
    # weight gradients. In float64: TRADES and WEAT start their attack at x + 0.001 N(0, I),
    # where the KL gradient is nearly zero, so in fp32 the sign of a few pixels' gradient is
    # rounding and the two paths can craft different x*. With AVX2 kernels (as on an AMD CPU
    # without AVX-512) and the fixture trained in fp32 they did: losses 1e-3 apart, gradients
    # up to 0.07; in float64 all seven methods agree to 1e-15 on both instruction sets.
    model, x_u8, y = trained
    x, y = x_u8[:64].double() / 255, y[:64]
    cfg = TrialConfig(method=method, attack=AttackConfig(eps=EPS, step=STEP, steps=STEPS))  # type: ignore[arg-type]
    hp = {"eps": EPS, "step_size": STEP, "steps": STEPS, "beta": cfg.beta, "gamma": cfg.der.gamma}
    results = []
    for fast in (False, True):
        net = build_model("small_cnn", in_channels=1, num_classes=10, image_size=8)
        net.load_state_dict(model.state_dict())
        net = _fast(net.double()) if fast else _plain(net.double())
        net.train()
        torch.manual_seed(3)
        if fast:
            loss, _ = METHODS[method].batch_loss(net, x.contiguous(memory_format=torch.channels_last), y, params=MethodParams.from_config(cfg))
        else:
            loss = reference_at.batch_loss(net, x, y, method, hp)
        net.zero_grad()
        loss.backward()
        results.append((float(loss.detach()), [p.grad.clone() for p in net.parameters()]))
    (plain_loss, plain_grads), (fast_loss, fast_grads) = results
    assert fast_loss == pytest.approx(plain_loss, rel=1e-9)
    for g_fast, g_plain in zip(fast_grads, plain_grads, strict=True):
        assert g_fast.dtype == torch.float64 and torch.allclose(g_fast, g_plain, rtol=1e-7, atol=1e-10)


def test_a_bf16_epoch_trains_as_well_as_an_fp32_epoch() -> None:
    # one SAT epoch each from the same start: the training loss and accuracies of the bf16 fast
    # path stay within 5 points (loss within 5%) of fp32's
    data = load_dataset(DatasetConfig(name="digits"))
    out = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        cfg = TrialConfig(method="sat", batch_size=64, lr=0.05, epochs=2, attack=AttackConfig(eps=EPS, step=STEP, steps=3), precision=precision)  # type: ignore[arg-type]
        model = _fast(build_model("small_cnn", in_channels=1, num_classes=10, image_size=8))
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        params = MethodParams.from_config(cfg)
        rows = [_train_epoch(model, opt, cfg, data, params, epoch, CPU) for epoch in range(2)]
        out[precision] = rows[-1]
    assert out["bf16"]["train_loss"] == pytest.approx(out["fp32"]["train_loss"], rel=0.05)
    for key in ("train_clean_acc", "train_adv_acc"):
        assert abs(out["bf16"][key] - out["fp32"][key]) <= 0.05


AMX = "processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n"
NO_AMX = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16\n"


def test_auto_trains_in_bf16_on_cuda_and_on_amx_cpus_and_in_fp32_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    from trainables.precision import AUTO_PRECISION_ENV, cpu_has_native_bf16, training_precision

    monkeypatch.delenv(AUTO_PRECISION_ENV, raising=False)  # the machine's rule, not a forced one (tests/test_precision.py)

    assert cpu_has_native_bf16(AMX) and not cpu_has_native_bf16(NO_AMX) and not cpu_has_native_bf16("")
    assert training_precision(torch.device("cuda"), "auto") == "bf16"
    assert training_precision(CPU, "auto") == ("bf16" if cpu_has_native_bf16() else "fp32")  # this machine's flags
    assert training_precision(CPU, "fp32") == "fp32" and training_precision(torch.device("cuda"), "fp32") == "fp32"
    assert training_precision(CPU, "bf16") == "bf16"
