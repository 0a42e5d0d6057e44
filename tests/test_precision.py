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
