"""RobustBench models through robustbench's own `load_model`, with no network touched.

RobustBench's weights cannot be downloaded here: each test builds the model with RobustBench's
own architecture code, saves its state dict where `load_model` looks
(`<models_dir>/cifar10/Linf/<name>.pt`), and runs energyat on a small CIFAR-10 written in the real
on-disk format. Every command runs with its HTTP(S) proxy pointed at a closed local port, so any
attempt to download would fail the test instead of reaching the network.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from conftest import ROOT, energyat_cmd
from test_data import cifar_rows, py2_pickle

from analysis.query import open_tables

MODELS = ("Andriushchenko2020Understanding", "Wong2020Fast")  # PreAct ResNet-18s; Wong's normalises inside
TEST_IMAGES = 8


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("zoo")
    folder = base / "data" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i in range(5):
        (folder / f"data_batch_{i + 1}").write_bytes(py2_pickle({"labels": [i, i + 5], "data": cifar_rows(2, seed=i)}))
    (folder / "test_batch").write_bytes(py2_pickle({"labels": [k % 10 for k in range(16)], "data": cifar_rows(16, seed=9)}))
    (folder / "batches.meta").write_bytes(py2_pickle({"label_names": [f"c{k}" for k in range(10)], "num_vis": 3072}))

    from trainables.zoo import import_robustbench

    import_robustbench()
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    weights = base / "models" / "cifar10" / "Linf"
    weights.mkdir(parents=True)
    for i, name in enumerate(MODELS):
        torch.manual_seed(i)
        model = model_dicts[BenchmarkDataset.cifar_10][ThreatModel.Linf][name]["model"]()
        # each in the layout of its published file: Andriushchenko et al. saved the last and best epochs
        saved = {"last": model.state_dict()} if name == "Andriushchenko2020Understanding" else model.state_dict()
        torch.save(saved, weights / f"{name}.pt")
    return {"data": base / "data", "models": base / "models", "out": base / "out"}


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "NO_PROXY": "", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([*energyat_cmd(), *argv], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


def _flags(zoo: dict[str, Path]) -> list[str]:
    return ["--models-dir", str(zoo["models"]), "--data-root", str(zoo["data"]), "--dataset", "cifar10", "--device", "cpu"]


def test_eval_of_a_robustbench_model_equals_its_own_forward_pass(zoo: dict[str, Path]) -> None:
    proc = _run("eval", str(zoo["out"]), "--robustbench", "Wong2020Fast", *_flags(zoo), "--n", str(TEST_IMAGES),
                "--attacks", "clean,pgd", "--pgd-steps", "4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["attack"]: r for r in open_tables(zoo["out"]).sql("select * from evals").to_arrow_table().to_pylist()}
    assert rows["pgd"]["source"] == "robustbench" and rows["pgd"]["checkpoint"] == "robustbench:Wong2020Fast/cifar10/Linf"
    assert rows["pgd"]["eps"] == pytest.approx(8 / 255) and rows["pgd"]["steps"] == 4 and rows["pgd"]["n"] == TEST_IMAGES
    # the clean accuracy is the model's own: robustbench's load_model, the first test images in [0, 1]
    from trainables.config import DatasetConfig
    from trainables.data import load_dataset
    from trainables.zoo import import_robustbench

    rb = import_robustbench()
    model = rb.utils.load_model("Wong2020Fast", model_dir=str(zoo["models"]), dataset="cifar10", threat_model="Linf")
    assert "mu" in dict(model.named_buffers())  # it normalises inside, and keeps doing so
    data = load_dataset(DatasetConfig(name="cifar10", root=str(zoo["data"]), val_size=1))
    with torch.no_grad():
        own = (model(data.test_x[:TEST_IMAGES].float() / 255).argmax(1) == data.test_y[:TEST_IMAGES]).sum().item()
    assert rows["clean"]["correct"] == own


def test_landscape_of_robustbench_models_is_one_command(zoo: dict[str, Path]) -> None:
    # finding 4: several RobustBench models' dE(x) and dE(x,y) side by side
    proc = _run("landscape", str(zoo["out"]), "--robustbench", ",".join(MODELS), *_flags(zoo), "--n", str(TEST_IMAGES),
                "--attacks", "pgd,targeted", "--pgd-steps", "4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = pq.read_table(zoo["out"] / "landscape" / "landscape.parquet")
    assert table.num_rows == len(MODELS) * 2 * TEST_IMAGES
    assert list(dict.fromkeys(table.column("trial_id").to_pylist())) == list(MODELS)
    assert set(table.column("method").to_pylist()) == {"robustbench"}
    assert (zoo["out"] / "landscape" / "landscape.png").stat().st_size > 10_000
    assert "Wong2020Fast" in proc.stdout


def test_an_unknown_robustbench_name_is_one_line_with_suggestions(zoo: dict[str, Path]) -> None:
    proc = _run("eval", str(zoo["out"] / "x"), "--robustbench", "Wong2020Fas", *_flags(zoo), "--n", "2")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "did you mean Wong2020Fast" in lines[0], proc.stderr
    assert not (zoo["out"] / "x").exists()


def test_a_damaged_robustbench_checkpoint_is_one_line(zoo: dict[str, Path], tmp_path: Path) -> None:
    target = tmp_path / "models" / "cifar10" / "Linf" / "Wong2020Fast.pt"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"not a checkpoint")
    proc = _run("eval", str(tmp_path / "out"), "--robustbench", "Wong2020Fast", "--models-dir", str(tmp_path / "models"),
                "--data-root", str(zoo["data"]), "--device", "cpu", "--n", "2", "--attacks", "clean")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "delete it to download it again" in lines[0], proc.stderr[-3000:]
    assert target.read_bytes() == b"not a checkpoint" and not (tmp_path / "out").exists()


def test_weights_that_cannot_be_downloaded_are_one_line_saying_where_to_put_them(zoo: dict[str, Path], tmp_path: Path) -> None:
    # no file in an empty models dir: robustbench tries to download, the closed proxy refuses
    proc = _run("eval", str(tmp_path / "out"), "--robustbench", "Rice2020Overfitting", "--models-dir", str(tmp_path / "models"),
                "--data-root", str(zoo["data"]), "--device", "cpu", "--n", "2", "--attacks", "clean")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert "place its checkpoint at" in lines[0] and "cifar10/Linf/Rice2020Overfitting.pt" in lines[0]
    assert not (tmp_path / "out").exists()


def test_a_rice_et_al_checkpoint_runs_with_its_normalisation_in_front(zoo: dict[str, Path], tmp_path: Path) -> None:
    # Rice et al.'s PreAct ResNet-18 expects inputs normalised by CIFAR-10's mean and std: their
    # state dict loads into preact_resnet18 as it is, and --normalize cifar10 gives RobustBench's
    # own wrapper of that model (Rice2020OverfittingNetL2) logit for logit
    from robustbench.model_zoo.cifar10 import Rice2020OverfittingNetL2

    from trainables.data import load_dataset
    from trainables.subjects import checkpoint_subject, outside_config

    torch.manual_seed(5)
    reference = Rice2020OverfittingNetL2().eval()
    theirs = {k: v for k, v in reference.state_dict().items() if k not in ("mu", "sigma")}  # what their training code saves
    file = tmp_path / "rice.pt"
    torch.save(theirs, file)
    cfg = outside_config(dataset="cifar10", root=str(zoo["data"]), download=False, norm="linf", eps=None, n=4, eval_steps=20,
                         batch_size=128, model="preact_resnet18")
    subject = checkpoint_subject(file, architecture="preact_resnet18", cfg=cfg, name=None, study="x", normalize="cifar10")
    data = load_dataset(cfg.dataset)
    x = data.test_x[:4].float() / 255
    with torch.no_grad():
        assert torch.allclose(subject.load(data)(x), reference(x), rtol=1e-5, atol=1e-6)
        plain = checkpoint_subject(file, architecture="preact_resnet18", cfg=cfg, name=None, study="x").load(data)
        assert not torch.allclose(plain(x), reference(x), rtol=1e-3)  # without it: another function
