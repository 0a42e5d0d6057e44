"""`make reproduce` in miniature: examples/reproduce.py end to end (study, samples, report,
reproduction.md) on the real recipe with 1 epoch (2 in the study at twice the epochs) and 2 seeds,
so the command cannot rot.

The images are scikit-learn's digits written as Fashion-MNIST's idx files (upscaled to 28x28),
so the recipe's Fashion-MNIST loading runs as it does on the real files, on any machine."""

from __future__ import annotations

import csv
import gzip
import importlib.util
import math
import re
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ctrl_c
from sklearn.datasets import load_digits

from analysis.query import open_tables

REPO = Path(__file__).resolve().parent.parent


def _idx(array: np.ndarray) -> bytes:
    kind = 0x08  # unsigned byte
    return struct.pack(">HBB", 0, kind, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def _digits_as_fashion(folder: Path) -> None:
    digits = load_digits()
    images = np.kron(digits.images / 16.0, np.ones((3, 3)))  # 8x8 -> 24x24
    images = np.pad(images, ((0, 0), (2, 2), (2, 2)))  # -> 28x28, as Fashion-MNIST
    images = (images * 255).round().astype(np.uint8)
    labels = digits.target.astype(np.uint8)
    folder.mkdir(parents=True)
    for stem, array in (("train-images-idx3-ubyte", images[:1400]), ("train-labels-idx1-ubyte", labels[:1400]),
                        ("t10k-images-idx3-ubyte", images[1400:]), ("t10k-labels-idx1-ubyte", labels[1400:])):
        (folder / f"{stem}.gz").write_bytes(gzip.compress(_idx(array)))


def _script():
    spec = importlib.util.spec_from_file_location("reproduce", REPO / "examples" / "reproduce.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = ["epochs=1", "dataset.train_size=200", "dataset.val_size=100", "probe.train_size=32", "probe.test_size=32", "probe.every=1",
        "final_eval.n=64", "final_eval.autoattack_n=4", "attack.eps=0.3", "attack.steps=2", "attack.step=0.2", "eval_attack.steps=2",
        "final_eval.pgd_steps=2",
        "search={method: [standard, sat, trades, weat], weat.variant: [adv, nat], seed: {choices: [0, 1]}}", "samples=10"]
# (the normalised WEAT arm runs in the study at twice the epochs: 5 arms x 2 seeds here, 3 x 2 there)
# eps 0.3: no image of these tiny models survives AutoAttack's first attack, so the other three (tens
# of seconds of APGD-T, FAB-T and Square per trial on a CPU) are skipped; AutoAttack still runs on every trial


def test_the_reproduction_stopped_by_ctrl_c_resumes_to_the_end_and_its_tables_are_the_studys(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _digits_as_fashion(tmp_path / "data")
    storage = tmp_path / "studies"
    args = ["--storage", str(storage), "--set", f"dataset.root={tmp_path / 'data'}", *[a for item in TINY for a in ("--set", item)],
            "--sample-steps", "3", "--sample-n", "2"]
    # Ctrl-C to the script's process group while its first study trains (a session ending): energyat
    # exits 130 and the script with it, naming its own --resume; the second study is never started
    epochs = storage / "paper_fashion_cpu" / "tables" / "epochs"
    code, _, err = ctrl_c([sys.executable, str(REPO / "examples" / "reproduce.py"), *args],
                          when=lambda: any(epochs.rglob("*.parquet")),  # a trial's epoch file, or the part its compaction wrote
                          what="an epoch written")
    lines = err.strip().splitlines()
    assert code == 130, lines[-20:]
    assert lines[-1] == "reproduce: interrupted; `python examples/reproduce.py --resume` with the same --set continues it"
    assert "`energyat resume " in lines[-2] and " continues it" in lines[-2]
    assert sorted(p.name for p in storage.iterdir()) == ["paper_fashion_cpu"]

    # --resume continues the first study in place and runs the one it did not reach
    reproduce = _script()
    assert reproduce.main([*args, "--resume"]) == 0
    assert sorted(p.name for p in storage.iterdir()) == ["paper_fashion_cpu", "paper_fashion_cpu_x2"]  # nothing moved aside
    study = storage / "paper_fashion_cpu"
    text = (study / "report" / "reproduction.md").read_text()
    page = (study / "report" / "index.html").read_text()
    assert "Arms over seeds" in page and "<td>trades</td><td>0, 1</td>" in page
    assert "<td>weat (weat_variant=nat)</td><td>0, 1</td>" in page

    con = open_tables(study)
    try:
        trials = con.execute("select trial_id, method, weat_variant, weat_normalize, seed, final_pgd_acc, final_autoattack_acc, status, "
                             "selected_by from trials order by method, weat_variant, seed").fetchall()
    finally:
        con.close()
    # the grid ran every arm under both seeds, once, across the two sessions: 5 arms x 2 seeds
    arms = sorted((m, (v, n) if m == "weat" else None, s) for _, m, v, n, s, *_ in trials)
    assert arms == sorted((m, v, s) for m, v in (("standard", None), ("sat", None), ("trades", None), ("weat", ("adv", False)),
                                                 ("weat", ("nat", False))) for s in (0, 1))
    assert all(status == "TERMINATED" for *_, status, _ in trials)
    assert all(not math.isnan(aa) for *_, aa, _, _ in trials)  # AutoAttack ran on every trial
    # the standard arm is chosen on clean accuracy, the AT arms on robust accuracy
    assert {m: sel for _, m, *_, sel in trials} == {"standard": "val_clean_acc", "sat": "val_robust_acc", "trades": "val_robust_acc",
                                                     "weat": "val_robust_acc"}

    # the accuracy table is the trials table's mean over seeds, per arm
    row = re.search(r"^\| TRADES \| 2 \| [^|]+ \| ([0-9.]+) \[", text, re.M)
    assert row, text
    trades = [pgd for _, m, _, _, _, pgd, *_ in trials if m == "trades"]
    assert float(row.group(1)) == pytest.approx(100 * sum(trades) / 2, abs=0.006)
    for arm in ("standard", "SAT", "WEAT_adv", "WEAT_nat", "WEAT_adv norm"):  # the last at twice the epochs
        assert re.search(rf"^\| {arm} \| 2 \|", text, re.M), arm
    # paired comparisons, seed by seed, for each metric, with seeds counted at the spread's upper bound too
    assert len(re.findall(r"^\| WEAT_adv - TRADES \| (clean|pgd|autoattack) \|", text, re.M)) == 6  # at 2 and at 4 epochs
    assert len(re.findall(r"^\| WEAT_adv norm - WEAT_adv \| ", text, re.M)) == 3
    assert len(re.findall(r"^\| TRADES - SAT \| ", text, re.M)) == 3
    assert "## At twice the epochs (paper_fashion_cpu_x2: 2 epochs)" in text
    long = open_tables(storage / "paper_fashion_cpu_x2").execute(
        "select method, weat_variant, weat_normalize, seed, epochs_run from trials").fetchall()
    assert sorted((m, (v, n) if m == "weat" else None, s, e) for m, v, n, s, e in long) == sorted(
        (m, vn, s, 2) for m, vn in (("trades", None), ("weat", ("adv", False)), ("weat", ("adv", True))) for s in (0, 1))
    # the findings' tables have rows: the standard model's energies, dE per probe, the judge per start
    assert len(re.findall(r"^\| [01] \| 0 \| -?[0-9.]+ \| -?[0-9.]+ \| -?[0-9.]+ \|$", text, re.M)) == 2
    assert re.search(r"^\| epoch \| lr \| SAT \| TRADES \| WEAT_adv \| WEAT_nat \|$", text, re.M)
    assert re.search(r"^\| 0 \| [0-9.]+ \| -?[0-9.]+ \(-?[0-9.]+, -?[0-9.]+\) \|", text, re.M)
    # the drift's size: SAT's |dE| at the last probe over TRADES', seed by seed, from the tables
    last = dict(open_tables(study).execute(
        "select t.method || t.seed, arg_max(e.probe_train_dE, e.epoch) from epochs e join trials t using (trial_id) "
        "where e.probed and t.method in ('sat', 'trades') group by all").fetchall())
    ratio = re.search(r"^\| SAT / TRADES \| s0 ([0-9.]+), s1 ([0-9.]+) \|", text, re.M)
    assert ratio, text
    for seed in (0, 1):
        assert float(ratio.group(seed + 1)) == pytest.approx(abs(last[f"sat{seed}"]) / abs(last[f"trades{seed}"]), abs=0.051)
    judged = re.search(r"^\| WEAT_adv \| ([0-9.]+) \[[0-9., ]+\] \| ([0-9.]+) \[[0-9., ]+\] \| ([0-9.]+) \[", text, re.M)
    assert judged and all(0 <= float(a) <= 1 for a in judged.groups()), text
    assert re.search(r"^\| \(the starts\) \| [0-9.]+ \| [0-9.]+ \| [0-9.]+ \|$", text, re.M)
    for init in ("pca", "noise", "gaussian"):
        assert len(list((study / "samples").glob(f"*-{init}.npz"))) == 10
    # the first study was sampled before the second started: what needs its checkpoints comes first
    sampled = max(p.stat().st_mtime for p in (study / "samples").glob("*.npz"))
    assert (storage / "paper_fashion_cpu_x2" / "spec.yaml").stat().st_mtime > sampled
    assert "reproduction:" in capsys.readouterr().out
    # one session's wall time is not the reproduction's: a resumed one states none
    assert "Wall time" not in text
    assert "Wall time of the whole reproduction: 2.0 min." in reproduce.markdown(study, long=None, seconds=120.0)


def test_analysing_a_study_takes_no_overrides(tmp_path: Path) -> None:
    for extra in (["--set", "epochs=1"], ["--resume"]):
        with pytest.raises(SystemExit) as exc:
            _script().main(["--study", str(tmp_path), *extra])
        assert exc.value.code == 2


_TYPES = {"seed": int, "best_epoch": int, "best_val_robust_acc": float, "final_clean_acc": float, "final_pgd_acc": float,
          "final_autoattack_acc": float, "final_n": int, "final_autoattack_n": int}


def test_docs_reproduction_quotes_the_measured_runs_tables() -> None:
    """docs/reproduction.md's accuracy and paired tables are what examples/reproduce.py computes
    from the measured run's `trials` rows (kept in tests/data/reproduction/trials.csv)."""
    with open(REPO / "tests" / "data" / "reproduction" / "trials.csv", newline="") as f:
        rows = [{k: _TYPES.get(k, str)(v) for k, v in r.items()} for r in csv.DictReader(f)]
    assert len(rows) == 25 and {r["seed"] for r in rows} == {0, 1, 2, 3, 4}
    table = [line for line in _script().comparison(rows) if line.startswith("| ")]
    assert len(table) == 1 + 5 + 1 + 12  # a header and 5 arms, a header and 4 comparisons x 3 metrics
    doc = (REPO / "docs" / "reproduction.md").read_text()
    missing = [line for line in table if line not in doc.splitlines()]
    assert not missing, missing


def test_bad_input_is_one_line_and_exit_2_and_moves_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reproduce = _script()
    previous = tmp_path / "studies" / "paper_fashion_cpu"
    previous.mkdir(parents=True)
    (previous / "kept").write_text("a finished study")
    for bad in (["--set", "name=.."], ["--set", "epochs=-1"], ["--set", "no_such_key=1"]):
        capsys.readouterr()
        assert reproduce.main(["--storage", str(tmp_path / "studies"), *bad]) == 2, bad
        err = capsys.readouterr().err.strip()
        assert err.startswith("reproduce: ") and "\n" not in err, err
    assert (previous / "kept").read_text() == "a finished study" and sorted(p.name for p in tmp_path.iterdir()) == ["studies"]
    assert [p.name for p in (tmp_path / "studies").iterdir()] == ["paper_fashion_cpu"]
    assert reproduce.main(["--study", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert reproduce.main(["--storage", str(tmp_path / "studies"), "--sample-steps", "0"]) == 2  # refused before any study runs
    assert capsys.readouterr().err == "reproduce: --sample-steps 0: give at least 1\n"
