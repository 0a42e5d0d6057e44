"""The engine's contracts: exact resume from a checkpoint, divergence recorded, safe checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ROOT, TINY

from analysis.query import open_tables
from trainables.config import parse_trial
from trainables.engine import run_trial


class Crash(RuntimeError):
    pass


def _epochs(out: Path) -> list[tuple[Any, ...]]:
    con = open_tables(out)
    return con.execute("select epoch, train_loss, probe_train_dE, test_robust_acc from epochs order by epoch").fetchall()


@pytest.mark.parametrize("extra", [{}, {"ema": {"decay": 0.8, "start": 1}}], ids=["plain", "ema"])
def test_resume_after_a_crash_matches_an_uninterrupted_run(tmp_path: Path, extra: dict[str, Any]) -> None:
    # killed after epoch 1 and run again, the trial continues from its checkpoint and ends with
    # the same rows (same RNG streams) as a run that was never interrupted; with `ema`, the
    # probes read the average, so it too must come back whole
    cfg = parse_trial({**TINY, "epochs": 4, "method": "sat", **extra})
    straight = tmp_path / "straight"
    run_trial(cfg, out=straight)

    def crash_after_epoch_1(row: dict[str, Any], _ckpt: Path) -> None:
        if row["epoch"] == 1:
            raise Crash("simulated kill")
        return None

    broken = tmp_path / "broken"
    with pytest.raises(Crash):
        run_trial(cfg, out=broken, on_epoch=crash_after_epoch_1)
    assert len(_epochs(broken)) == 2
    run_trial(cfg, out=broken)
    a, b = _epochs(straight), _epochs(broken)
    assert [r[0] for r in b] == [0, 1, 2, 3]
    for ra, rb in zip(a, b, strict=True):
        assert ra == pytest.approx(rb, rel=1e-5, abs=1e-6)


def test_non_finite_loss_stops_the_trial_with_an_error_reason(tmp_path: Path) -> None:
    cfg = parse_trial({**TINY, "epochs": 5, "method": "sat", "lr": 1.0e20, "weight_decay": 0.0})
    result = run_trial(cfg, out=tmp_path)
    assert result["status"] == "ERROR"
    assert result["stop_reason"].startswith("error: non-finite loss at epoch ")
    last = int(result["stop_reason"].rsplit(" ", 1)[1])
    assert result["epochs_run"] == last + 1 < 5  # the diverged epoch is recorded, nothing after it
    assert [r[0] for r in _epochs(tmp_path)] == list(range(last + 1))


def test_on_epoch_can_stop_a_trial_with_its_reason(tmp_path: Path) -> None:
    cfg = parse_trial({**TINY, "epochs": 4, "method": "trades"})
    result = run_trial(cfg, out=tmp_path, on_epoch=lambda row, _: "scheduler" if row["epoch"] == 1 else None)
    assert result["stop_reason"] == "scheduler" and result["epochs_run"] == 2
    assert result["final_pgd_acc"] == result["final_pgd_acc"]  # the best checkpoint is still evaluated (not NaN)
    assert result["final_n"] == TINY["final_eval"]["n"] and result["final_autoattack_n"] is None  # AutoAttack skipped


def test_checkpoints_load_with_weights_only(tmp_path: Path) -> None:
    cfg = parse_trial({**TINY, "epochs": 1, "method": "standard"})
    run_trial(cfg, out=tmp_path)
    for name in ("last.pt", "best.pt"):
        state = torch.load(tmp_path / "checkpoints" / "train" / name, weights_only=True)
        assert "model" in state


def test_last_checkpoint_keeps_the_last_weights_after_the_final_evaluation(tmp_path: Path) -> None:
    # the final evaluation loads best.pt into a copy: last.pt still holds the last epoch's
    # model, so last.pt equals best.pt exactly when the best epoch is the last one
    cfg = parse_trial({**TINY, "epochs": 3, "method": "standard", "lr": 0.2})
    result = run_trial(cfg, out=tmp_path)
    folder = tmp_path / "checkpoints" / "train"
    last = torch.load(folder / "last.pt", weights_only=True)["model"]
    best = torch.load(folder / "best.pt", weights_only=True)
    same = all(torch.equal(last[k], best["model"][k]) for k in last)
    assert best["epoch"] == result["best_epoch"]
    assert same == (result["best_epoch"] == 2)


def test_keep_best_checkpoints_keeps_one_file_per_new_best(tmp_path: Path) -> None:
    # a stop rule replayed afterwards picks the best epoch up to its stop: always a running best,
    # so these files are every pick it can make
    cfg = parse_trial({**TINY, "epochs": 5, "method": "standard", "lr": 0.2, "keep_best_checkpoints": True})
    run_trial(cfg, out=tmp_path)
    con = open_tables(tmp_path)
    (metric,) = con.execute("select selected_by from trials").fetchone()  # standard's: val_clean_acc
    accs = con.execute(f"select epoch, {metric} from epochs where probed order by epoch").fetchall()
    bests, best = [], -1.0
    for epoch, acc in accs:
        if acc > best:
            bests.append(epoch)
            best = acc
    assert len(bests) >= 2  # more than the first epoch, or the test shows little
    folder = tmp_path / "checkpoints" / "train"
    assert sorted(p.name for p in folder.glob("best-e*.pt")) == [f"best-e{e:04d}.pt" for e in bests]
    assert all(torch.load(folder / f"best-e{e:04d}.pt", weights_only=True)["epoch"] == e for e in bests)
    run_trial(parse_trial({**TINY, "epochs": 2, "method": "standard"}), out=tmp_path / "off")
    assert not list((tmp_path / "off" / "checkpoints" / "train").glob("best-e*.pt"))


def test_sample_rows_follow_samples_every_and_always_include_the_last_epoch(tmp_path: Path) -> None:
    # probes at 0, 2, 4 and the last epoch 5; samples every 2nd regular probe (0, 4) and at 5
    cfg = parse_trial({**TINY, "epochs": 6, "method": "standard", "probe": {**TINY["probe"], "every": 2, "samples_every": 2}})
    run_trial(cfg, out=tmp_path)
    con = open_tables(tmp_path)
    assert [e for (e,) in con.execute("select distinct epoch from samples order by 1").fetchall()] == [0, 4, 5]
    assert [e for (e,) in con.execute("select epoch from epochs where probed order by 1").fetchall()] == [0, 2, 4, 5]


def test_a_trial_runs_where_duckdb_ray_and_optuna_are_not_installed(tmp_path: Path) -> None:
    # a GPU machine without a package registry has torch, numpy and pyarrow but none of these:
    # the engine writes its tables and detects phases without them (imports blocked below)
    code = (
        "import sys\n"
        "for name in ('duckdb', 'ray', 'optuna'):\n"
        "    sys.modules[name] = None  # `import duckdb` now raises ImportError\n"
        "import json\n"
        "from trainables.config import parse_trial\n"
        "from trainables.engine import run_trial\n"
        f"cfg = parse_trial(json.loads({json.dumps({**TINY, 'epochs': 1})!r}))\n"
        f"print(run_trial(cfg, out={str(tmp_path)!r})['status'])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("TERMINATED"), proc.stderr[-2000:]


def test_the_final_evaluation_reports_its_progress_and_its_seconds(tmp_path: Path) -> None:
    # what `energyat train` and a study's live view show after the last epoch: PGD batch by batch
    # to the last test image, then AutoAttack attack by attack (from its own log), and the time
    # it all took in the trials row
    calls: list[tuple[str, int, int]] = []
    cfg = parse_trial({**TINY, "epochs": 1, "final_eval": {"n": 150, "pgd_steps": 3, "autoattack_n": 6}})
    result = run_trial(cfg, out=tmp_path, on_stage=lambda what, done, total: calls.append((what, done, total)))
    pgd = [c for c in calls if c[0] == "PGD-3 on 150 test images"]
    assert [done for _w, done, _t in pgd] == [64, 128, 150] and {t for *_x, t in pgd} == {150}
    autoattack = [c for c in calls if c[0].startswith("AutoAttack on 6 test images: ")]
    # each of its attacks announced as it starts (the later ones only while some image is still robust)
    assert autoattack[0] == ("AutoAttack on 6 test images: apgd-ce on the images still robust", 0, 0)
    assert calls.index(pgd[-1]) < calls.index(autoattack[0])
    assert result["final_seconds"] > 0
    con = open_tables(tmp_path)
    assert con.execute("select final_seconds > 0 and final_seconds <= seconds from trials").fetchall() == [(True,)]


def test_autoattacks_batch_lines_become_progress() -> None:
    # the line AutoAttack logs after each batch of an attack (pyautoattack/autoattack.py, verbose)
    import logging

    from trainables.evaluate import _AutoAttackProgress

    calls: list[tuple[str, int, int]] = []
    handler = _AutoAttackProgress(lambda *c: calls.append(c), 1000)
    for message in ("running apgd-t", "{} - {}/{} - {} out of {} successfully perturbed".format("apgd-t", 3, 4, 17, 250),
                    "robust accuracy after APGD-T: 45.00% (total time 12.3 s)"):
        handler.emit(logging.LogRecord("auto-attack", logging.DEBUG, __file__, 0, message, None, None))
    what = "AutoAttack on 1,000 test images: apgd-t on the images still robust"
    assert calls == [(what, 0, 0), (what, 3, 4)]


def test_threads_null_sets_the_processs_own_count_again_after_a_trial_that_set_another() -> None:
    # a reused Ray worker runs trial after trial in one process: null must not inherit the last trial's count
    from trainables import engine

    before = torch.get_num_threads()
    try:
        engine._configure_torch(parse_trial({**TINY, "threads": engine._PROCESS_THREADS + 1}), torch.device("cpu"))
        assert torch.get_num_threads() == engine._PROCESS_THREADS + 1
        engine._configure_torch(parse_trial({**TINY, "threads": None}), torch.device("cpu"))
        assert torch.get_num_threads() == engine._PROCESS_THREADS
    finally:
        torch.set_num_threads(before)
