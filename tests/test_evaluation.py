"""Numbers a reviewer accepts: the original AutoAttack, selection on a validation split, fp32
evaluation whatever the training precision, and `energyat eval` on any model.

One small SAT model on digits (a few epochs, fp32) serves the AutoAttack and `eval` tests; one
trained under bf16 autocast serves the precision tests.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import TINY

from analysis.query import open_tables
from study.cli import main
from trainables import checkpoint
from trainables.config import parse_trial
from trainables.data import load_dataset, to_float
from trainables.engine import epoch_probes, probe_epoch, run_trial
from trainables.evaluate import evaluate
from trainables.methods import MethodParams
from trainables.models import build_model
from trainables.precision import fp32
from trainables.probe import probe, probe_columns

AA_IMAGES = 32  # AutoAttack in tests: a few dozen digits (about 15 s on 2 CPU cores)

# a SAT model that keeps a fair share of its test images under attack (PGD about 0.5), so that
# AutoAttack has something left to break and "at most PGD" says something
ROBUST = {
    **TINY,
    "name": "robust",
    "dataset": {"name": "digits", "train_size": 600},
    "epochs": 4,
    "attack": {"eps": 0.15, "step": 0.0375, "steps": 5},
    "eval_attack": {"steps": 5},
    "final_eval": {"n": 64, "pgd_steps": 20, "autoattack_n": AA_IMAGES},
    "seed": 3,
}


def _model(cfg, data, weights: Path) -> torch.nn.Module:  # type: ignore[no-untyped-def]
    model = build_model(cfg.model, in_channels=1, num_classes=10, image_size=8, width=cfg.width, init=cfg.model_init)
    model.load_state_dict(checkpoint.load(weights)["model"])
    return model.to(memory_format=torch.channels_last).eval()  # the engine's layout: the same conv arithmetic


def _trial_row(out: Path) -> dict:
    con = open_tables(out)
    try:
        return con.sql("select * from trials").to_arrow_table().to_pylist()[0]
    finally:
        con.close()


@pytest.fixture(scope="module")
def robust(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("robust") / "out"
    spec = out.parent / "spec.yaml"
    spec.write_text(yaml.safe_dump(ROBUST))
    assert main(["train", str(spec), "--out", str(out)]) == 0
    return out


# -- 1. the original AutoAttack ------------------------------------------------------------------------


def test_final_autoattack_is_the_original_called_directly_and_at_most_pgd(robust: Path) -> None:
    from pyautoattack import AutoAttack

    cfg = parse_trial(ROBUST)
    data = load_dataset(cfg.dataset)
    model = _model(cfg, data, robust / "checkpoints/train/best.pt")
    x, y = to_float(data.test_x[:AA_IMAGES]), data.test_y[:AA_IMAGES]
    # Croce and Hein's code as every published table calls it: standard version, same images, same seed
    adversary = AutoAttack(model, norm="Linf", eps=cfg.attack.eps, version="standard", seed=cfg.seed, device="cpu")
    _x_adv, y_adv = adversary.run_standard_evaluation(x, y)
    direct = float((y_adv == y).float().mean())
    row = _trial_row(robust)
    assert row["final_autoattack_acc"] == direct
    # a stronger attack than PGD-50 on the same images, and something left for it to break
    pgd50 = evaluate(model, data, cfg, attacks=("pgd",), n=AA_IMAGES, autoattack_n=0, pgd_steps=50, seed=cfg.seed)[0].accuracy
    assert 0 < direct <= pgd50
    evals = open_tables(robust).sql("select attack, n, steps, accuracy, evaluated_by from evals order by attack").fetchall()
    assert evals == [("autoattack", AA_IMAGES, None, direct, "final_eval"), ("clean", 64, None, row["final_clean_acc"], "final_eval"),
                     ("pgd", 64, 20, row["final_pgd_acc"], "final_eval")]
    assert (row["final_n"], row["final_autoattack_n"]) == (64, AA_IMAGES)  # the row says how many images each number used


def test_autoattack_from_a_later_image_is_the_original_on_those_images(robust: Path) -> None:
    # the rest of a sample evaluated in parts (benchmarks/stoppers.py extends a cached count so)
    from pyautoattack import AutoAttack

    from analysis.errors import EnergyatError

    cfg = parse_trial(ROBUST)
    data = load_dataset(cfg.dataset)
    model = _model(cfg, data, robust / "checkpoints/train/best.pt")
    start, stop = AA_IMAGES // 2, AA_IMAGES
    [part] = evaluate(model, data, cfg, attacks=("autoattack",), n=0, autoattack_n=stop, autoattack_start=start, pgd_steps=0, seed=cfg.seed)
    x, y = to_float(data.test_x[start:stop]), data.test_y[start:stop]
    _x_adv, y_adv = AutoAttack(model, norm="Linf", eps=cfg.attack.eps, version="standard", seed=cfg.seed, device="cpu").run_standard_evaluation(x, y)
    assert (part.n, part.correct) == (stop - start, int((y_adv == y).sum()))
    for bad in (stop, -1):
        with pytest.raises(EnergyatError, match="give a start from 0 to"):
            evaluate(model, data, cfg, attacks=("autoattack",), n=0, autoattack_n=stop, autoattack_start=bad, pgd_steps=0, seed=cfg.seed)


def test_energyats_autoattack_is_configured_as_the_published_standard_version(trained_cnn: torch.nn.Module) -> None:
    # what the equality above cannot see (AutoAttack's outcome rarely depends on its seed): the
    # adversary energyat builds is the standard version at the trial's eps and seed, 100
    # iterations, 9 target classes, 5,000 Square queries
    from trainables.evaluate import autoattack_adversary

    adv = autoattack_adversary(trained_cnn, norm="linf", eps=0.15, seed=11)
    assert (adv.version, adv.norm, adv.epsilon, adv.seed) == ("standard", "Linf", 0.15, 11)
    assert adv.attacks_to_run == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert (adv.apgd.n_iter, adv.apgd.n_restarts, adv.apgd_targeted.n_iter, adv.apgd_targeted.n_target_classes) == (100, 1, 100, 9)
    assert (adv.fab.n_iter, adv.fab.n_target_classes, adv.square.n_queries) == (100, 9, 5000)
    assert autoattack_adversary(trained_cnn, norm="l2", eps=0.5, seed=0).norm == "L2"


def test_autoattack_leaves_the_callers_random_stream_where_it_was(
    trained_cnn: torch.nn.Module, digits_batch: tuple[torch.Tensor, torch.Tensor]
) -> None:
    # AutoAttack reseeds torch's global generator inside each attack; energyat runs it in a fork
    from trainables.evaluate import autoattack_correct

    x, y = digits_batch
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    autoattack_correct(trained_cnn, x[:8], y[:8], norm="linf", eps=0.15, seed=0)
    assert torch.equal(torch.rand(3), expected)


# -- 2. the validation split selects -------------------------------------------------------------------


def test_the_best_epoch_is_chosen_on_the_validation_split_without_a_test_curve(tmp_path: Path) -> None:
    # with no per-epoch test curve (probe.test_size 0) the test set cannot be what selects: the
    # best epoch is the first maximum of val_robust_acc, best.pt holds it, best_val_* repeat it
    cfg = parse_trial({**TINY, "epochs": 4, "probe": {"train_size": 48, "test_size": 0}})
    result = run_trial(cfg, out=tmp_path)
    rows = open_tables(tmp_path).sql("select * from epochs order by epoch").to_arrow_table().to_pylist()
    val = [r["val_robust_acc"] for r in rows]
    best = int(np.argmax(val))
    assert result["best_epoch"] == best and result["best_val_robust_acc"] == val[best]
    assert result["best_val_clean_acc"] == rows[best]["val_clean_acc"]
    assert checkpoint.load(tmp_path / "checkpoints/train/best.pt")["epoch"] == best
    assert all(math.isnan(r["test_robust_acc"]) for r in rows)
    assert [r["best_val_robust_acc"] for r in rows] == [max(val[: i + 1]) for i in range(len(val))]
    splits = open_tables(tmp_path).execute("select distinct split from samples").fetchall()
    assert splits == [("train",)]
    assert result["selected_by"] == "val_robust_acc"  # TINY's method is an AT method


@pytest.mark.parametrize(("method", "select", "metric"), [
    ("standard", "auto", "val_clean_acc"),  # a model trained without an adversary: clean accuracy picks
    ("sat", "auto", "val_robust_acc"),
    ("sat", "val_clean_acc", "val_clean_acc"),  # `select` overrides the method's
    ("standard", "val_robust_acc", "val_robust_acc"),
])
def test_select_picks_the_best_epoch_by_its_metric(tmp_path: Path, method: str, select: str, metric: str) -> None:
    cfg = parse_trial({**TINY, "method": method, "select": select, "epochs": 5, "lr": 0.2, "probe": {"train_size": 32, "test_size": 0}})
    result = run_trial(cfg, out=tmp_path)
    rows = open_tables(tmp_path).sql("select * from epochs order by epoch").to_arrow_table().to_pylist()
    best = int(np.argmax([r[metric] for r in rows]))  # the first maximum
    assert result["selected_by"] == metric and result["best_epoch"] == best
    assert (result["best_val_robust_acc"], result["best_val_clean_acc"]) == (rows[best]["val_robust_acc"], rows[best]["val_clean_acc"])
    assert checkpoint.load(tmp_path / "checkpoints/train/best.pt")["epoch"] == best
    # the epochs rows carry the best epoch's numbers so far, by the same metric
    for i, r in enumerate(rows):
        so_far = int(np.argmax([x[metric] for x in rows[: i + 1]]))
        assert r["best_val_robust_acc"] == rows[so_far]["val_robust_acc"]
    row = open_tables(tmp_path).execute("select selected_by, \"select\" from trials").fetchone()
    assert row == (metric, select)  # the resolved metric, and the key as written


def test_probing_does_not_shift_the_training_runs_random_numbers(tmp_path: Path) -> None:
    # evaluations draw from their own seeded streams: probing every epoch or every other one
    # trains the very same model
    losses = {}
    for every in (1, 2):
        cfg = parse_trial({**TINY, "epochs": 3, "probe": {"train_size": 48, "test_size": 48, "every": every}})
        run_trial(cfg, out=tmp_path / str(every))
        losses[every] = [r[0] for r in open_tables(tmp_path / str(every)).execute("select train_loss from epochs order by epoch").fetchall()]
    assert losses[1] == losses[2]


# -- 3. fp32 evaluation ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bf16") / "out"
    cfg = parse_trial({**TINY, "epochs": 2, "precision": "bf16", "final_eval": {"n": 64, "pgd_steps": 5, "autoattack_n": 0}})
    run_trial(cfg, out=out)
    return out


def test_a_bf16_trained_models_epoch_numbers_equal_the_fp32_evaluation_of_its_weights(bf16_run: Path) -> None:
    # the last epoch's row, recomputed from last.pt (the same weights) with the engine's own probe
    # called outside any autocast: every validation, test and probe number is the same
    cfg = parse_trial({**TINY, "epochs": 2, "precision": "bf16", "final_eval": {"n": 64, "pgd_steps": 5, "autoattack_n": 0}})
    data = load_dataset(cfg.dataset)
    model = _model(cfg, data, bf16_run / "checkpoints/train/last.pt")
    values = probe_epoch(model, epoch_probes(cfg, data), cfg, MethodParams.from_config(cfg), epoch=1)
    again = probe_columns(values["train"], values["val"], values["test"])
    stored = open_tables(bf16_run).sql("select * from epochs where epoch = 1").to_arrow_table().to_pylist()[0]
    for key, value in again.items():
        assert stored[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key


def test_a_bf16_trained_models_final_numbers_equal_the_fp32_evaluation_of_its_weights(bf16_run: Path) -> None:
    cfg = parse_trial({**TINY, "epochs": 2, "precision": "bf16", "final_eval": {"n": 64, "pgd_steps": 5, "autoattack_n": 0}})
    data = load_dataset(cfg.dataset)
    model = _model(cfg, data, bf16_run / "checkpoints/train/best.pt")
    results = {r.attack: r.accuracy for r in evaluate(model, data, cfg, attacks=("clean", "pgd"), n=64, autoattack_n=0, pgd_steps=5, seed=cfg.seed)}
    row = _trial_row(bf16_run)
    assert (row["final_clean_acc"], row["final_pgd_acc"]) == (results["clean"], results["pgd"])


def test_probe_ignores_an_enclosing_bf16_autocast(trained_cnn: torch.nn.Module, digits_batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    # fp32() turns autocast off inside: a probe called under bf16 autocast gives fp32's numbers
    from functools import partial

    from trainables.attacks import pgd

    x, y = digits_batch
    attack = partial(pgd, eps=0.15, step_size=0.05, steps=3)
    plain = probe(trained_cnn, x, y, attack=attack, seed=7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = probe(trained_cnn, x, y, attack=attack, seed=7)
    for key in ("E", "E_adv", "Ey", "ce_adv"):
        np.testing.assert_array_equal(inside[key], plain[key], err_msg=key)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        rounded = trained_cnn(x).float()  # what bf16 would have given: not the same logits
    assert not torch.equal(rounded, trained_cnn(x).detach())


def test_fp32_turns_tf32_off_inside_and_restores_the_settings() -> None:
    # torch lets cuDNN convolutions use TF32 by default: "fp32" evaluation must say no to it
    conv = torch.backends.cudnn.conv
    matmul = torch.backends.cuda.matmul
    before = (conv.fp32_precision, matmul.fp32_precision)
    conv.fp32_precision = "tf32"
    try:
        with fp32():
            assert (conv.fp32_precision, matmul.fp32_precision) == ("ieee", "ieee")
            assert not torch.is_autocast_enabled("cpu")
        assert conv.fp32_precision == "tf32"
    finally:
        conv.fp32_precision, matmul.fp32_precision = before


# -- 5. energyat eval ----------------------------------------------------------------------------------


def _evals(out: Path) -> list[dict]:
    con = open_tables(out)
    try:
        return con.sql("select * from evals order by evaluated_by, attack").to_arrow_table().to_pylist()
    finally:
        con.close()


def test_eval_of_a_trial_reproduces_its_final_evaluation_and_writes_evals_rows(robust: Path, capsys: pytest.CaptureFixture[str]) -> None:
    row = _trial_row(robust)
    argv = ["eval", str(robust), "--trial", "best", "--n", "64", "--attacks", "clean,pgd", "--pgd-steps", "20"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "pgd" in printed and "evals:" in printed
    ours = [r for r in _evals(robust) if r["evaluated_by"] == "energyat eval"]
    assert {r["attack"]: r["accuracy"] for r in ours} == {"clean": row["final_clean_acc"], "pgd": row["final_pgd_acc"]}
    assert all(r["source"] == "trial" and r["checkpoint"].endswith("best.pt") and r["n"] == 64 and r["seed"] == ROBUST["seed"] for r in ours)
    assert main(argv) == 0  # the same evaluation again replaces its rows
    assert len([r for r in _evals(robust) if r["evaluated_by"] == "energyat eval"]) == 2
    assert main(["report", str(robust)]) == 0
    page = (robust / "report" / "index.html").read_text()
    assert "Test-set evaluations" in page and "energyat eval" in page


def test_eval_last_reads_the_last_epochs_weights(robust: Path, tmp_path: Path) -> None:
    # --last: last.pt's weights, the same numbers as that state dict given as a file, in rows of
    # their own. The copy's last.pt is made unlike its best.pt (the output layer's bias pushed to
    # class 0), so that reading best.pt instead could not give the same numbers
    study = tmp_path / "study"
    shutil.copytree(robust, study)
    last_pt = study / "checkpoints/train/last.pt"
    state = checkpoint.load(last_pt)
    bias = [k for k in state["model"] if k.endswith("bias")][-1]
    state["model"][bias] = torch.zeros_like(state["model"][bias])
    state["model"][bias][0] = 100.0
    checkpoint.save(last_pt, state)
    file = tmp_path / "last.pt"
    torch.save(state["model"], file)
    assert main(["eval", str(study), "--trial", "train", "--last", "--n", "64", "--attacks", "clean,pgd", "--pgd-steps", "20"]) == 0
    assert main(["eval", str(tmp_path / "out"), "--checkpoint", str(file), "--model", "small_cnn", "--dataset", "digits", "--eps", "0.15",
                 "--n", "64", "--attacks", "clean,pgd", "--pgd-steps", "20", "--seed", str(ROBUST["seed"])]) == 0
    last = {r["attack"]: r["accuracy"] for r in _evals(study) if r["checkpoint"].endswith("last.pt")}
    assert last == {r["attack"]: r["accuracy"] for r in _evals(tmp_path / "out")}
    assert last["clean"] != _trial_row(study)["final_clean_acc"]  # not the best checkpoint's numbers
    assert main(["eval", str(tmp_path / "x"), "--checkpoint", str(file), "--model", "small_cnn", "--last", "--n", "8"]) == 2


@pytest.mark.parametrize("wrap", ["plain", "module", "state_dict"])
def test_eval_of_a_state_dict_file_gives_the_trials_numbers(robust: Path, tmp_path: Path, wrap: str) -> None:
    # the trial's best weights as a researcher's own file: a plain state_dict, DataParallel's
    # `module.` keys, or {"state_dict": ...}; same images, seed and PGD: the same accuracy
    state = checkpoint.load(robust / "checkpoints/train/best.pt")["model"]
    saved = {"plain": state, "module": {f"module.{k}": v for k, v in state.items()}, "state_dict": {"state_dict": state, "epoch": 3}}[wrap]
    file = tmp_path / "mine.pt"
    torch.save(saved, file)
    out = tmp_path / "results"
    assert main(["eval", str(out), "--checkpoint", str(file), "--model", "small_cnn", "--dataset", "digits", "--eps", "0.15",
                 "--n", "64", "--attacks", "clean,pgd", "--pgd-steps", "20", "--seed", str(ROBUST["seed"])]) == 0
    rows = {r["attack"]: r for r in _evals(out)}
    row = _trial_row(robust)
    assert rows["clean"]["accuracy"] == row["final_clean_acc"] and rows["pgd"]["accuracy"] == row["final_pgd_acc"]
    assert rows["pgd"]["source"] == "checkpoint" and rows["pgd"]["trial_id"] == "mine" and rows["pgd"]["model"] == "small_cnn"


def test_a_state_dict_for_another_architecture_is_one_line_naming_the_keys(robust: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    file = tmp_path / "mine.pt"
    torch.save(checkpoint.load(robust / "checkpoints/train/best.pt")["model"], file)
    assert main(["eval", str(tmp_path / "out"), "--checkpoint", str(file), "--model", "cnn_fc", "--dataset", "digits", "--n", "8"]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing keys" in err[0] and "unexpected keys" in err[0] and "features.0.weight" in err[0], err
    assert not (tmp_path / "out").exists()


def test_landscape_and_sample_take_a_state_dict_file(robust: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import pyarrow.parquet as pq

    file = tmp_path / "mine.pt"
    torch.save(checkpoint.load(robust / "checkpoints/train/best.pt")["model"], file)
    out = tmp_path / "results"
    common = ["--checkpoint", str(file), "--model", "small_cnn", "--dataset", "digits", "--eps", "0.15"]
    assert main(["landscape", str(out), *common, "--n", "16", "--attacks", "pgd,targeted"]) == 0
    table = pq.read_table(out / "landscape" / "landscape.parquet")
    assert table.num_rows == 2 * 16 and set(table.column("method").to_pylist()) == {"checkpoint"}
    assert main(["sample", str(out), *common, "--classes", "0", "--n", "1", "--steps", "2"]) == 0
    assert (out / "samples" / "mine-pca.png").is_file()
    capsys.readouterr()


def test_the_evaluation_keys_are_what_the_rows_say(robust: Path) -> None:
    # rows carry the threat model and the weights: a researcher can tell every number apart
    for r in _evals(robust):
        assert r["norm"] == "linf" and r["eps"] == pytest.approx(0.15) and r["dataset"] == "digits"
        assert r["correct"] == round(r["accuracy"] * r["n"]) and r["git_sha"] and r["evaluated_at"]
        assert json.dumps(r, default=str)  # plain values


def test_evaluate_is_seeded_and_repeatable(robust: Path) -> None:
    cfg = parse_trial(ROBUST)
    data = load_dataset(cfg.dataset)
    model = _model(cfg, data, robust / "checkpoints/train/best.pt")
    runs = [evaluate(model, data, cfg, attacks=("pgd",), n=64, autoattack_n=0, pgd_steps=3, seed=s)[0].correct for s in (0, 0, 1)]
    assert runs[0] == runs[1]
    moved = dataclasses.replace(cfg, attack=dataclasses.replace(cfg.attack, eps=0.0001, step=0.0001))
    weak = evaluate(model, data, moved, attacks=("pgd", "clean"), n=64, autoattack_n=0, pgd_steps=3, seed=0)
    assert weak[0].correct == weak[1].correct  # a vanishing ball: PGD changes nothing
