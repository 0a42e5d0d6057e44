"""benchmarks/remedies.py end to end at a size CI runs: the five arms trained one seed per study
(as a session at a time trains them), each study's last epochs evaluated and kept as records, and
one report over a study and the other's kept records. Real Ray Tune, real Parquet, real PNG."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from analysis.query import open_tables

sys.path.insert(0, str(ROOT / "benchmarks"))
import remedies  # noqa: E402  (benchmarks/ is not a package)

TINY = [  # the recipe cut to digits: 3 epochs, the drop after the first, AWP from the first epoch
    "dataset={name: digits, train_size: 300, val_size: 200}", "model=small_cnn", "batch_size=64", "epochs=3",
    "schedule={name: piecewise, milestones: [1], gamma: 0.1}", "attack={eps: 0.15, steps: 2}", "eval_attack={steps: 3}",
    "probe={train_size: 32, test_size: 0, every: 1, samples_every: 0}", "final_eval={n: 64, pgd_steps: 20, autoattack_n: 0}",
    "awp.warmup=0",
]


def _remedies(*args: str) -> str:
    proc = subprocess.run([sys.executable, "benchmarks/remedies.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    storage = tmp_path_factory.mktemp("remedies")
    for seed in (0, 1):
        _remedies("train", "--storage", str(storage), "--seeds", str(seed), "--name", f"rem_s{seed}", *[f"--set={s}" for s in TINY])
        _remedies("evaluate", str(storage / f"rem_s{seed}"), "--n", "64", "--autoattack-n", "0")
    return storage / "rem_s0", storage / "rem_s1"


def test_a_report_over_a_study_and_another_ones_kept_records(studies: tuple[Path, Path], tmp_path: Path) -> None:
    s0, s1 = studies
    kept = tmp_path / "kept"
    _remedies("export", str(s1), "--to", str(kept))
    records = [json.loads(line) for line in (kept / "rem_s1.jsonl").read_text().splitlines()]
    assert sorted(r["arm"] for r in records) == sorted(remedies.ARMS) and {r["seed"] for r in records} == {1}
    # the kept records are what the study gives: the report reads either the same
    assert remedies.load(str(kept / "rem_s1.jsonl")) == json.loads(json.dumps(remedies.records(str(s1))))

    out = tmp_path / "report"
    _remedies("report", str(s0), str(kept / "rem_s1.jsonl"), "--out", str(out))
    summary = {r["arm"]: r for r in json.loads((out / "remedies.json").read_text())}
    assert list(summary) == list(remedies.ARMS)  # the arms in their order, each over both seeds
    # each arm's gap is the mean over seeds of (best epoch - last epoch), read from the tables
    for study in (s0, s1):
        con = open_tables(study)
        rows = con.execute("select t.trial_id, t.method, t.ema_decay, t.awp_gamma, t.best_val_robust_acc, t.final_pgd_acc, "
                           "arg_max(e.val_robust_acc, e.epoch), t.final_n from trials t join epochs e using (trial_id) "
                           "where e.probed group by all").fetchall()
        last_pgd = dict(con.execute("select trial_id, accuracy from evals where attack = 'pgd' and checkpoint like '%last.pt'").fetchall())
        con.close()
        assert len(rows) == 5 and len(last_pgd) == 5
        for trial, method, ema, awp, best_val, best_pgd, last_val, n in rows:
            arm = remedies.arm_of({"method": method, "ema_decay": ema, "awp_gamma": awp})
            assert arm in summary and n == 64
            mine = next(r for r in (remedies.records(str(study))) if r["trial_id"] == trial)
            assert mine["best"]["val robust"] == best_val and mine["last"]["val robust"] == last_val
            assert mine["best"]["test PGD-20"] == best_pgd and mine["last"]["test PGD-20"] == last_pgd[trial]
    for arm, r in summary.items():
        members = [m for s in (s0, s1) for m in remedies.records(str(s)) if m["arm"] == arm]
        gaps = [m["best"]["test PGD-20"] - m["last"]["test PGD-20"] for m in members]
        assert r["seeds"] == [0, 1] and r["test PGD-20"]["gap"] == pytest.approx(sum(gaps) / 2)
        assert r["test PGD-20"]["gap_low"] <= r["test PGD-20"]["gap"] <= r["test PGD-20"]["gap_high"]
        # the figure's curve: dE per probed epoch (every epoch here), the mean over both seeds
        by_epoch = [dict(m["dE"]) for m in members]
        assert r["dE"] == {str(e): pytest.approx((by_epoch[0][e] + by_epoch[1][e]) / 2) for e in range(3)}
    table = (out / "remedies.md").read_text()
    assert "rem_s0, rem_s1" in table and "on the first 64 test images" in table
    assert sum(line.startswith("| SAT") or line.startswith("| TRADES") for line in table.splitlines()) == 5
    assert (out / "remedies-dE.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_report_refuses_a_seed_twice_and_kept_records_that_are_not_records(studies: tuple[Path, Path], tmp_path: Path,
                                                                                capsys: pytest.CaptureFixture[str]) -> None:
    s0, _ = studies
    _remedies("export", str(s0), "--to", str(tmp_path))
    kept = tmp_path / "rem_s0.jsonl"
    good = kept.read_text()
    for sources in ([str(s0), str(kept)],):  # the same seed of an arm from two sources
        with pytest.raises(SystemExit) as exc:
            remedies.main(["report", *sources, "--out", str(tmp_path / "r")])
        assert exc.value.code == 2 and "twice" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    first = json.loads(good.splitlines()[0])
    for text in ("not json\n", '{"study": "x"}\n', good.replace('"seed": 0', '"seed": "0"'), json.dumps([1, 2]) + "\n",
                 json.dumps(first | {"best": {**first["best"], "test PGD-20": "0.5"}}) + "\n",  # a number that is not one
                 json.dumps(first | {"dE": [[0, "x"]]}) + "\n"):
        bad.write_text(text)
        with pytest.raises(SystemExit) as exc:
            remedies.main(["report", str(bad), "--out", str(tmp_path / "r")])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.startswith(f"remedies.py: {bad}:1: ") and err.count("\n") == 1, err
    assert not (tmp_path / "r").exists()  # nothing written from a refused input
