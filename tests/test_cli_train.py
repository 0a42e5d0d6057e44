"""`energyat train` and `energyat query` end to end, as a user runs them (subprocesses)."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import EXAMPLES, ROOT, energyat_cmd

from analysis.query import open_tables
from analysis.schema import EPOCHS, SAMPLES, SCHEMA_VERSION, TRIAL_OUTCOME

QUICK = [
    "--set", "epochs=3", "--set", "probe.train_size=64", "--set", "probe.test_size=64",
    "--set", "final_eval.autoattack_n=8", "--set", "final_eval.n=64",
]


def run_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*energyat_cmd(), *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def sat_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sat") / "OUT"
    run_cli("train", str(EXAMPLES / "quickstart.yaml"), "--set", "method=sat", *QUICK, "--out", str(out))
    return out


def test_train_writes_three_complete_finite_epoch_rows(sat_run: Path) -> None:
    rows = json.loads(run_cli("query", str(sat_run), "select * from epochs order by epoch", "--format", "json").stdout)
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    for row in rows:
        assert set(EPOCHS.names) <= set(row)
        for name in set(EPOCHS.names) - {"alarm_reason"}:  # null without an alarm
            assert row[name] is not None, name
            if isinstance(row[name], float):
                assert math.isfinite(row[name]), name
        # dE is E(x) - E(x*), column for column
        assert math.isclose(row["probe_train_dE"], row["probe_train_E"] - row["probe_train_E_adv"], rel_tol=1e-9, abs_tol=1e-9)


def test_query_counts_three_epochs(sat_run: Path) -> None:
    proc = run_cli("query", str(sat_run), "select count(*) as n from epochs", "--format", "csv")
    assert proc.stdout.strip().splitlines()[-1] == "3"


def test_train_writes_one_trial_row_with_final_evaluation(sat_run: Path) -> None:
    rows = json.loads(run_cli("query", str(sat_run), "select * from trials", "--format", "json").stdout)
    assert len(rows) == 1
    row = rows[0]
    assert set(TRIAL_OUTCOME.names) <= set(row)
    assert row["status"] == "TERMINATED" and row["stop_reason"] == "completed" and row["epochs_run"] == 3
    for name in ("final_clean_acc", "final_pgd_acc", "final_autoattack_acc", "best_val_robust_acc", "best_val_clean_acc"):
        assert 0.0 <= row[name] <= 1.0, name
    # every config value is its own column
    assert row["method"] == "sat" and row["attack_eps"] == pytest.approx(0.15) and row["spec_device"] == "cpu"


def test_train_writes_samples_for_both_probes(sat_run: Path) -> None:
    rows = json.loads(
        run_cli(
            "query",
            str(sat_run),
            "select split, count(*) as n, count(distinct epoch) as e from samples group by split order by split",
            "--format",
            "json",
        ).stdout
    )
    assert rows == [{"split": "test", "n": 3 * 64, "e": 3}, {"split": "train", "n": 3 * 64, "e": 3}]
    # the trial's files, compacted at its end, are one part per table: the declared columns and each row's source file
    (part,) = (sat_run / "tables/samples/parts").glob("part-*.parquet")
    assert pq.read_schema(part).names == [*SAMPLES.names, "_source"]
    assert [c[0] for c in open_tables(sat_run).execute("select * from samples").description] == SAMPLES.names


def test_every_file_carries_schema_version_and_provenance(sat_run: Path) -> None:
    paths = list((sat_run / "tables").rglob("*.parquet"))
    assert len(paths) == 4  # a part per table
    for path in paths:
        meta = pq.read_schema(path).metadata
        assert meta[b"schema_version"] == str(SCHEMA_VERSION).encode()
        prov = json.loads(meta[b"energyat.provenance_by_trial"])["train"]
        assert prov["config"]["method"] == "sat" and "torch" in prov["versions"] and prov["git_sha"]


def test_query_table_format_prints_a_header(sat_run: Path) -> None:
    out = run_cli("query", str(sat_run), "select epoch, method from epochs order by epoch").stdout.splitlines()
    assert out[0].split() == ["epoch", "method"] and len(out) == 4


def test_bad_sql_is_one_line_and_exit_2(sat_run: Path) -> None:
    proc = run_cli("query", str(sat_run), "select nope from epochs", check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "nope" in proc.stderr


def test_query_refuses_writes(sat_run: Path) -> None:
    before = sorted((p, p.stat().st_mtime_ns) for p in (sat_run / "tables").rglob("*"))
    target = sat_run / "leak.csv"
    proc = run_cli("query", str(sat_run), f"copy (select * from epochs) to '{target}'", check=False)
    assert proc.returncode == 2 and "read-only" in proc.stderr
    assert not target.exists()
    assert sorted((p, p.stat().st_mtime_ns) for p in (sat_run / "tables").rglob("*")) == before


def test_rerun_of_a_finished_trial_changes_nothing(sat_run: Path) -> None:
    files = sorted((p, p.stat().st_mtime_ns) for p in (sat_run / "tables/epochs").rglob("*.parquet"))
    proc = run_cli("train", str(EXAMPLES / "quickstart.yaml"), "--set", "method=sat", *QUICK, "--out", str(sat_run))
    assert "TERMINATED" in proc.stdout
    assert sorted((p, p.stat().st_mtime_ns) for p in (sat_run / "tables/epochs").rglob("*.parquet")) == files


def test_different_spec_on_same_out_is_refused(sat_run: Path) -> None:
    proc = run_cli("train", str(EXAMPLES / "quickstart.yaml"), "--set", "method=trades", *QUICK, "--out", str(sat_run), check=False)
    assert proc.returncode == 2 and "method" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_query_csv_writes_list_columns_as_json(sat_run: Path) -> None:
    proc = run_cli("query", str(sat_run), "select list(epoch order by epoch) as epochs from epochs", "--format", "csv")
    assert proc.stdout.strip().splitlines() == ['"epochs"', '"[0, 1, 2]"']
