"""`ENERGYAT_AUTO_PRECISION`: forcing what `precision: auto` trains in (trainables/precision.py).

`auto` is bf16 on CUDA and on CPUs with AMX, fp32 elsewhere; the variable makes one machine do
what `auto` does on another (an AMD CPU without AMX trains in fp32), so a test suite can run
once with `auto` forced to fp32 and once to bf16. Each test below sets or clears the variable
itself, so they hold under any outer setting; "AMX" and "no AMX" machines are simulated by
replacing `cpu_has_native_bf16` (its lru_cache is left alone).

Seen to fail when the code was broken on purpose: the variable ignored (fp32 and bf16 cases,
the recorded `train_precision`), read once and cached (the re-read test), applied to an
explicit `fp32`/`bf16` (the explicit test), any string accepted (the bad-value test), fp32 and
bf16 swapped, the CUDA rule dropped (the unset test).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY

import trainables.precision as precision
from analysis.errors import EnergyatError
from analysis.query import open_tables
from trainables.config import parse_trial
from trainables.engine import run_trial
from trainables.precision import AUTO_PRECISION_ENV, autocast, training_precision

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # training_precision reads only .type: no GPU needed


@pytest.fixture
def amx(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda cpuinfo=None: True)


@pytest.fixture
def no_amx(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda cpuinfo=None: False)


def test_the_variable_is_named_as_documented() -> None:
    assert AUTO_PRECISION_ENV == "ENERGYAT_AUTO_PRECISION"
    assert AUTO_PRECISION_ENV in (training_precision.__doc__ or "")


def test_unset_auto_follows_the_machine_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(AUTO_PRECISION_ENV, raising=False)
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda cpuinfo=None: True)
    assert training_precision(CPU, "auto") == "bf16"
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda cpuinfo=None: False)
    assert training_precision(CPU, "auto") == "fp32"
    assert training_precision(CUDA, "auto") == "bf16"


@pytest.mark.usefixtures("amx")
def test_fp32_makes_auto_train_in_fp32_on_an_amx_cpu_and_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(AUTO_PRECISION_ENV, "fp32")
    assert training_precision(CPU, "auto") == "fp32"
    assert training_precision(CUDA, "auto") == "fp32"
    with autocast(CPU, "auto"):
        assert not torch.is_autocast_enabled("cpu")


@pytest.mark.usefixtures("no_amx")
def test_bf16_makes_auto_train_in_bf16_on_a_cpu_without_amx(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(AUTO_PRECISION_ENV, "bf16")
    assert training_precision(CPU, "auto") == "bf16"
    assert training_precision(CUDA, "auto") == "bf16"
    with autocast(CPU, "auto"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")


@pytest.mark.usefixtures("no_amx")
def test_the_variable_is_read_at_each_call(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(AUTO_PRECISION_ENV, "bf16")
    assert training_precision(CPU, "auto") == "bf16"
    monkeypatch.setenv(AUTO_PRECISION_ENV, "fp32")
    assert training_precision(CPU, "auto") == "fp32"
    monkeypatch.delenv(AUTO_PRECISION_ENV)
    assert training_precision(CPU, "auto") == "fp32"  # the machine rule again (no AMX)


@pytest.mark.parametrize("forced", ["fp32", "bf16"])
def test_an_explicit_precision_is_never_overridden(monkeypatch: pytest.MonkeyPatch, forced: str) -> None:
    monkeypatch.setenv(AUTO_PRECISION_ENV, forced)
    for device in (CPU, CUDA):
        assert training_precision(device, "fp32") == "fp32"
        assert training_precision(device, "bf16") == "bf16"


@pytest.mark.parametrize("bad", ["", "FP32", "bf16 ", "fp16", "auto", "float32", "1"])
def test_any_other_value_is_one_clear_error(monkeypatch: pytest.MonkeyPatch, bad: str) -> None:
    monkeypatch.setenv(AUTO_PRECISION_ENV, bad)
    with pytest.raises(EnergyatError) as caught:
        training_precision(CPU, "auto")
    message = str(caught.value)
    assert "\n" not in message
    assert AUTO_PRECISION_ENV in message and repr(bad) in message
    assert "fp32" in message and "bf16" in message
    assert training_precision(CPU, "fp32") == "fp32"  # an explicit precision never reads it


def test_the_machine_probe_keeps_its_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(AUTO_PRECISION_ENV, "bf16")
    training_precision(CPU, "auto")
    assert hasattr(precision.cpu_has_native_bf16, "cache_info")  # still the lru_cache'd function
    assert isinstance(precision.cpu_has_native_bf16(), bool)


def test_a_trial_with_auto_trains_and_records_the_forced_precision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the opposite of this machine's rule, so a variable the engine ignored would show
    forced = "fp32" if precision.cpu_has_native_bf16() else "bf16"
    monkeypatch.setenv(AUTO_PRECISION_ENV, forced)
    threads = torch.get_num_threads()
    try:
        run_trial(parse_trial({**TINY, "name": "forced", "epochs": 1, "precision": "auto", "threads": 1}), out=tmp_path)
    finally:
        torch.set_num_threads(threads)
    con = open_tables(tmp_path)
    try:
        (row,) = con.sql("select train_precision from trials").to_arrow_table().to_pylist()
    finally:
        con.close()
    assert row["train_precision"] == forced


def test_a_bad_value_stops_energyat_train_in_one_line_before_anything_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from conftest import EXAMPLES

    from study.cli import main

    monkeypatch.setenv(AUTO_PRECISION_ENV, "fp16")
    out = tmp_path / "out"
    assert main(["train", str(EXAMPLES / "quickstart.yaml"), "--set", "epochs=1", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and AUTO_PRECISION_ENV in err[0], err
    assert not out.exists()


# What crafting the per-epoch probes' adversarial examples in bf16 may change, against crafting
# them in fp32 (probe.craft): the mean |dE| of a probe by at most 1% of itself. The detector sees
# relative changes of |dE| of 15% (`settle`, phase 2) and 30% (`ratio`, the alarm); measured on
# digits: 0.02% to 0.2% (tests below; docs/evaluation.md).
CRAFT_DE_TOLERANCE = 0.01


def test_probes_crafted_in_bf16_keep_the_energies_the_detector_reads() -> None:
    from functools import partial

    from trainables.attacks import pgd
    from trainables.config import DatasetConfig
    from trainables.data import load_dataset
    from trainables.models import build_model
    from trainables.probe import probe

    torch.manual_seed(0)
    data = load_dataset(DatasetConfig(name="digits"))
    x, y = data.train_x[:512].float() / 255, data.train_y[:512]
    model = build_model("small_cnn", in_channels=1, num_classes=10, image_size=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(200):  # adversarially trained a little, so that PGD has work to do
        i = torch.randint(0, 512, (64,))
        xa = pgd(model, x[i], y[i], eps=0.15, step_size=0.05, steps=3) if step > 50 else x[i]
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xa), y[i]).backward()
        opt.step()
    attack = partial(pgd, eps=0.15, step_size=0.0375, steps=10)
    exact = probe(model, data.test_x, data.test_y, attack=attack, seed=1)
    crafted = probe(model, data.test_x, data.test_y, attack=attack, seed=1, craft=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    assert (crafted["E"] == exact["E"]).all()  # x itself: fp32 both ways, to the bit
    assert (crafted["E_adv"] != exact["E_adv"]).any()  # x* was crafted in bf16: other examples
    d_exact, d_crafted = abs((exact["E"] - exact["E_adv"]).mean()), abs((crafted["E"] - crafted["E_adv"]).mean())
    assert abs(d_crafted - d_exact) <= CRAFT_DE_TOLERANCE * d_exact, (d_exact, d_crafted)
    assert crafted["E_adv"].dtype == exact["E_adv"].dtype  # energies of x* in fp32 (float64 on the host)
    # x* differs (bf16 gradients), so robust accuracy may differ by a few images, not more
    assert abs(crafted["correct_adv"].mean() - exact["correct_adv"].mean()) <= 0.03


def test_a_trial_crafts_its_probes_in_its_training_precision_and_selects_as_in_fp32(tmp_path: Path) -> None:
    def rows(craft: str, precision_: str) -> list[tuple]:
        out = tmp_path / f"{craft}-{precision_}"
        run_trial(parse_trial({**TINY, "epochs": 2, "precision": precision_, "probe": {**TINY["probe"], "craft": craft}}), out=out)
        sql = "select val_clean_acc, val_robust_acc, probe_train_E, probe_train_dE, test_robust_acc, best_val_robust_acc from epochs order by epoch"
        picked = open_tables(out).execute("select best_epoch from trials").fetchall()
        return [(*row, picked) for row in open_tables(out).execute(sql).fetchall()]

    probes, everything, none = rows("probes", "bf16"), rows("all", "bf16"), rows("fp32", "bf16")
    # the validation split (which selects) is crafted in fp32 by default: the same numbers, the same pick
    assert [(r[:2], r[5:]) for r in probes] == [(r[:2], r[5:]) for r in none]
    assert [r[2] for r in probes] == [r[2] for r in none]  # E(x): fp32 whatever crafts x*
    assert [r[3] for r in probes] != [r[3] for r in none]  # x* crafted in bf16 here, in fp32 there
    assert [r[1] for r in everything] != [r[1] for r in none] or [r[3] for r in everything] != [r[3] for r in none]
    assert rows("probes", "fp32") == rows("fp32", "fp32")  # training in fp32: everything crafts in fp32
