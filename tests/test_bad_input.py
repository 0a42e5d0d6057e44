"""Bad input, table-driven: every case is one clear line on stderr, exit 2, and nothing changed.

Each case runs the real command line (``study.cli.main``, in this process: the cases fail before
Ray or training start, so a subprocess per case would only add interpreter start-up) against its
own copy of a real study (made by `energyat run`, with Ray) and a real `energyat train` output.
Before and after the command, every file under the case's folder is hashed: a bad input may not
create, change or delete anything. The count of cases is quoted in docs/reliability.md.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml
from conftest import EXAMPLES, ROOT, TINY, energyat_cmd

from analysis.schema import SCHEMA_VERSION
from study.cli import main

SMOKE = str(EXAMPLES / "smoke.yaml")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished one-trial study (`studies/s`) and a finished `energyat train` output (`train`)."""
    base = tmp_path_factory.mktemp("pristine")
    subprocess.run(
        [*energyat_cmd(), "run", SMOKE, "--storage", str(base / "studies"), "--name", "s", "--set", "samples=1", "--set", "epochs=1"],
        cwd=ROOT, check=True, capture_output=True, timeout=600,
    )
    spec = base / "tiny.yaml"
    spec.write_text(yaml.safe_dump({**TINY, "epochs": 1}))
    assert main(["train", str(spec), "--out", str(base / "train")]) == 0
    return base


def _spec(**changes: Any) -> dict[str, Any]:
    """TINY with dotted-key changes, e.g. _spec(**{"attack.eps": 2})."""
    spec = yaml.safe_load(yaml.safe_dump(TINY))
    for key, value in changes.items():
        *parents, leaf = key.split(".")
        node = spec
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return spec


def _study_spec(**changes: Any) -> dict[str, Any]:
    return {**yaml.safe_load(Path(SMOKE).read_text()), **changes}


def _corrupt_parquet(d: Path) -> None:
    """The finished study's epochs are one compacted part: damage it."""
    (target,) = (d / "studies/s/tables/epochs/parts").glob("part-*.parquet")
    target.write_bytes(b"PAR1 this is not a parquet file")


def _corrupt_loose_parquet(d: Path) -> None:
    """A running trial's epoch file (loose, not compacted), damaged."""
    target = d / "studies/s/tables/epochs/trial=zz/epoch-0000.parquet"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"PAR1 this is not a parquet file")


def _truncate_journal(d: Path) -> None:
    journal = d / "studies/s/optuna.journal"
    journal.write_bytes(journal.read_bytes()[:-25])


def _garble_study_spec(d: Path) -> None:
    (d / "studies/s/spec.yaml").write_text("schema_version: [1, 2\n")


def _drop_tune(d: Path) -> None:
    shutil.rmtree(d / "studies/s/tune")


def _old_study_spec(d: Path) -> None:
    """A study written by energyat 0.1 (schema 1: the best checkpoint chosen on a test subset)."""
    spec = d / "studies/s/spec.yaml"
    spec.write_text(spec.read_text().replace(f"schema_version: {SCHEMA_VERSION}", "schema_version: 1"))


def _old_train_spec(d: Path) -> None:
    spec = d / "train/spec.yaml"
    spec.write_text(spec.read_text().replace(f"schema_version: {SCHEMA_VERSION}", "schema_version: 1"))


def _old_table_file(d: Path) -> None:
    (target,) = (d / "studies/s/tables/epochs/parts").glob("part-*.parquet")
    table = pq.read_table(target)
    pq.write_table(table.replace_schema_metadata({**table.schema.metadata, b"schema_version": b"1"}), target)


def _secret_csv(d: Path) -> None:
    """A CSV outside the tables: DuckDB reads a quoted `.csv` path after FROM without any function."""
    (d / "secret.csv").write_text("key,value\naws_secret,abc\n")


def _garbage_checkpoint(d: Path) -> None:
    (d / "garbage.pt").write_bytes(b"\x80\x02 not a torch file")


@dataclass(frozen=True)
class Case:
    """argv with {d} for the case's folder; `spec` is written to {d}/spec.yaml first."""

    name: str
    argv: list[str]
    expect: str  # words the one line must contain
    spec: dict[str, Any] | str | None = None
    prepare: Callable[[Path], None] | None = None


TRAIN = ["train", "{d}/spec.yaml", "--out", "{d}/out"]
RUN = ["run", "{d}/spec.yaml", "--storage", "{d}/studies", "--name", "new"]
STUDY = "{d}/studies/s"

CASES = [
    # -- specs ------------------------------------------------------------------------------------
    Case("unknown key", TRAIN, "`lrr`", _spec(lrr=0.1)),
    Case("unknown nested key", TRAIN, "`attack.epsilon`", _spec(**{"attack.epsilon": 0.1})),
    Case("wrong type", TRAIN, "`epochs`", _spec(epochs="ten")),
    Case("eps above 1", TRAIN, "`attack.eps`", _spec(**{"attack.eps": 2})),
    Case("negative epochs", TRAIN, "`epochs`", _spec(epochs=-3)),
    Case("unknown dataset", TRAIN, "`dataset.name`", _spec(**{"dataset.name": "mnist2"})),
    Case("unknown model", TRAIN, "`model`", _spec(model="vgg16")),
    Case("unknown method", TRAIN, "`method`", _spec(method="pgd")),
    Case("missing dataset, download off", TRAIN, "dataset.download: true", _spec(**{"dataset.name": "cifar10", "dataset.root": "/nonexistent/data"})),
    Case("spec file missing", ["train", "{d}/nope.yaml", "--out", "{d}/out"], "does not exist"),
    Case("spec not YAML", TRAIN, "not valid YAML", "epochs: [1, 2\n"),
    Case("spec not a mapping", TRAIN, "mapping", "- 1\n- 2\n"),
    Case("--set without =", [*TRAIN, "--set", "epochs"], "key=value", _spec()),
    Case("--set value not YAML", [*TRAIN, "--set", "epochs=[1"], "not valid YAML", _spec()),
    Case("empty search range", RUN, "search.beta", _study_spec(search={"beta": [12.0, 1.0]})),
    Case("search over an unknown key", RUN, "search.lrr", _study_spec(search={"lrr": [0.1, 1.0]})),
    Case("unknown objective", RUN, "objective", _study_spec(objective="accuracy")),
    Case("zero samples", RUN, "`samples`", _study_spec(samples=0)),
    Case("early_stop not a bool", RUN, "early_stop.energy_divergence", _study_spec(early_stop={"energy_divergence": "maybe"})),
    Case("misspelt resource", RUN, "resources.gpus", _study_spec(resources={"cpu": 1, "gpus": 1})),
    Case("two GPUs for one trial", RUN, "resources.gpu", _study_spec(resources={"cpu": 1, "gpu": 2})),
    Case("a GPU share that does not divide", RUN, "use 1/k", _study_spec(resources={"cpu": 1, "gpu": 0.3})),
    Case("device cuda without a GPU", RUN, "`device: cuda`", _study_spec(device="cuda")),
    Case("an unknown sampler", RUN, "`sampler.name`", _study_spec(sampler={"name": "anneal"})),
    Case("an unknown logger", RUN, "`loggers`", _study_spec(loggers=["neptune"])),
    Case("negative max_failures", RUN, "`max_failures`", _study_spec(max_failures=-1)),
    Case("a hang_timeout of zero", RUN, "`hang_timeout`", _study_spec(hang_timeout=0)),
    Case("a logger option it does not take", RUN, "`loggers.mlflow.project`", _study_spec(loggers={"mlflow": {"project": "x"}})),
    Case("a sampler option that is a callable", RUN, "`sampler.gamma`", _study_spec(sampler={"name": "tpe", "gamma": 0.1})),
    Case(
        "cmaes for two objectives",
        RUN,
        "`sampler.name`",
        _study_spec(sampler={"name": "cmaes"}, objective=["best_val_robust_acc", "best_val_clean_acc"]),
    ),
    Case("PBT asked to change the AT method mid-run", RUN, "`search.method`", _study_spec(scheduler="pbt")),
    Case("PBT with an Optuna sampler", RUN, "`sampler`", _study_spec(scheduler="pbt", search={"lr": [0.01, 0.1]}, sampler={"name": "tpe"})),
    Case("a scheduler option it does not take", RUN, "`scheduler.max_t`", _study_spec(scheduler={"name": "asha", "max_t": 5})),
    Case("a grace period no trial reaches", RUN, "`scheduler.grace_period`", _study_spec(scheduler={"name": "asha", "grace_period": 500})),
    Case("a val_patience of zero", RUN, "`early_stop.val_patience`", _study_spec(early_stop={"val_patience": 0})),
    Case("a first point outside the search", RUN, "outside search.beta", _study_spec(points_to_evaluate=[{"method": "trades", "beta": 50.0}])),
    Case(
        "a first point with a parameter its method ignores",
        RUN,
        "not used by method sat",
        _study_spec(points_to_evaluate=[{"method": "sat", "beta": 6.0}]),
    ),
    # -- flags ------------------------------------------------------------------------------------
    Case("unknown flag", [*TRAIN, "--fast"], "unrecognized arguments: --fast", _spec()),
    Case("--stop-patience alone", [*TRAIN, "--stop-patience", "3"], "--stop-on-alarm", _spec()),
    Case("unknown --format", ["query", STUDY, "select 1", "--format", "xml"], "invalid choice: 'xml'"),
    Case("no command", [], "required: command"),
    # -- paths ------------------------------------------------------------------------------------
    Case("storage not writable", ["run", SMOKE, "--storage", "/proc/energyat-studies"], "/proc/energyat-studies"),
    Case("storage under a file", ["run", SMOKE, "--storage", "{d}/studies/s/spec.yaml/x"], "spec.yaml/x"),
    Case("unknown storage scheme", ["run", SMOKE, "--storage", "nope://bucket/studies"], "nope://bucket/studies"),
    Case("study directory missing", ["status", "{d}/nowhere"], "not a study directory"),
    Case("query a missing directory", ["query", "{d}/nowhere", "select 1"], "nowhere"),
    Case("report a missing directory", ["report", "{d}/nowhere"], "nowhere"),
    Case("resume a missing study", ["resume", "{d}/nowhere"], "not a study directory"),
    Case("resume without tune/", ["resume", STUDY], "no restorable Ray Tune experiment", prepare=_drop_tune),
    Case("run into an existing study", ["run", SMOKE, "--storage", "{d}/studies", "--name", "s"], "already holds a study"),
    Case("a study --name that climbs", ["run", SMOKE, "--storage", "{d}/studies", "--name", "../x"], "`name`"),
    Case("a study name with glob characters", RUN, "`name`", _study_spec(name="exp[1]")),
    Case("a study --name that is absolute", ["run", SMOKE, "--storage", "{d}/studies", "--name", "/tmp/x"], "`name`"),
    Case("a --trial-id that is absolute", [*TRAIN, "--trial-id", "/abs"], "--trial-id", _spec()),
    Case("a --trial-id with a newline", [*TRAIN, "--trial-id", "a\nb"], "--trial-id", _spec()),
    Case("a --trial that climbs", ["eval", "{d}/train", "--trial", "../train"], "--trial '../train'"),
    Case("train --out a URI", ["train", SMOKE, "--out", "s3://bucket/out"], "give a local directory"),
    Case("train a different spec into an output", ["train", "{d}/spec.yaml", "--out", "{d}/train"], "different spec", _spec(epochs=1, lr=0.2)),
    # -- stored data ------------------------------------------------------------------------------
    Case("unknown trial id", ["phases", STUDY, "--trial", "nope"], "no trial `nope`"),
    Case("bad SQL", ["query", STUDY, "selec count(*) from epochs"], "bad SQL"),
    Case("SQL that deletes", ["query", STUDY, "delete from epochs"], "SELECT"),
    Case("SQL that writes a file", ["query", STUDY, "copy epochs to '{d}/leak.csv'"], "SELECT"),
    Case("two SQL statements", ["query", STUDY, "select 1; select 2"], "exactly one"),
    # -- queries that try to leave the study's tables (analysis.query.sandboxed) --------------------
    Case("query reading /etc/passwd as CSV", ["query", STUDY, "select * from read_csv('/etc/passwd')"], "query refused"),
    Case("query reading a file as text", ["query", STUDY, "select * from read_text('/etc/hostname')"], "query refused"),
    Case("query reading a file as a blob", ["query", STUDY, "select * from read_blob('/etc/hostname')"], "query refused"),
    Case("query listing files", ["query", STUDY, "select * from glob('/etc/*')"], "query refused"),
    Case("query reading a JSON file", ["query", STUDY, "select * from read_json('/etc/hosts')"], "query refused"),
    Case("query naming a file after FROM", ["query", STUDY, "select * from '{d}/secret.csv'"], "query refused", prepare=_secret_csv),
    Case("query reading the study's spec", ["query", STUDY, "select * from read_text('{d}/studies/s/spec.yaml')"], "query refused"),
    Case("query climbing out of tables/", ["query", STUDY, "select * from read_text('{d}/studies/s/tables/../spec.yaml')"], "query refused"),
    Case(
        "query reading another output's tables", ["query", STUDY, "select * from read_parquet('{d}/train/tables/trials/*.parquet')"], "query refused"
    ),
    Case("query downloading over https", ["query", STUDY, "select * from read_parquet('https://127.0.0.1:9/x.parquet')"], "query refused"),
    Case("query reaching a bucket", ["query", STUDY, "select * from 's3://bucket/x.parquet'"], "query refused"),
    Case("query sniffing a CSV", ["query", STUDY, "select * from sniff_csv('/etc/passwd')"], "query refused"),
    Case("corrupted Parquet part, query", ["query", STUDY, "select count(*) from epochs"], "epochs/parts/part-", prepare=_corrupt_parquet),
    Case("corrupted Parquet part, status", ["status", STUDY], "epochs/parts/part-", prepare=_corrupt_parquet),
    Case("corrupted Parquet part, compact", ["compact", STUDY], "epochs/parts/part-", prepare=_corrupt_parquet),
    Case("corrupted epoch file, query", ["query", STUDY, "select count(*) from epochs"], "trial=zz/epoch-0000.parquet",
         prepare=_corrupt_loose_parquet),
    Case("corrupted epoch file, status", ["status", STUDY], "trial=zz/epoch-0000.parquet", prepare=_corrupt_loose_parquet),
    Case("compact a missing directory", ["compact", "{d}/nowhere"], "no energyat tables"),
    Case("truncated journal, status", ["status", STUDY], "optuna.journal", prepare=_truncate_journal),
    Case("truncated journal, resume", ["resume", STUDY], "optuna.journal", prepare=_truncate_journal),
    Case("truncated journal, report", ["report", STUDY], "optuna.journal", prepare=_truncate_journal),
    Case("garbled study spec.yaml", ["status", STUDY], "spec.yaml", prepare=_garble_study_spec),
    Case("sample a missing directory", ["sample", "{d}/nowhere", "--trial", "t"], "no spec.yaml"),
    Case("sample an unknown trial", ["sample", STUDY, "--trial", "nope"], "no trial `nope`"),
    Case("sample from a garbled spec.yaml", ["sample", STUDY, "--trial", "best"], "spec.yaml is not valid YAML", prepare=_garble_study_spec),
    Case("landscape with an unknown attack", ["landscape", STUDY, "--attacks", "pgd,cw"], "choose from pgd"),
    # -- evaluation (the validation split, the original AutoAttack, models from outside) ----------------
    Case("objective on a test-set number", RUN, "test-set number", _study_spec(objective="final_pgd_acc")),
    Case("no validation split", TRAIN, "`dataset.val_size`", _spec(**{"dataset.val_size": 0})),
    Case("L2 step that cannot reach eps", TRAIN, "`attack.step`", _spec(**{"attack.norm": "l2", "attack.eps": 0.5, "attack.step": 0.01})),
    Case("momentum cycling without onecycle", TRAIN, "`schedule.cycle_momentum`", _spec(**{"schedule.cycle_momentum": True})),
    Case("unknown crafting mode", TRAIN, "`attack.bn`", _spec(**{"attack.bn": "frozen"})),
    Case("eval with an unknown attack", ["eval", "{d}/train", "--trial", "train", "--attacks", "clean,cw"], "choose from clean"),
    Case("eval of no images", ["eval", "{d}/train", "--trial", "train", "--n", "0"], "--n must be at least 1"),
    Case(
        "eval of a trial and a RobustBench model",
        ["eval", "{d}/train", "--trial", "train", "--robustbench", "Wong2020Fast"],
        "not --trial and --robustbench",
    ),
    Case("eval with too few PGD steps", ["eval", "{d}/train", "--trial", "train", "--pgd-steps", "1"], "cannot reach eps"),
    Case("eval a checkpoint without --model", ["eval", "{d}/x", "--checkpoint", "{d}/train/checkpoints/train/best.pt"], "needs --model"),
    Case("eval a missing checkpoint", ["eval", "{d}/x", "--checkpoint", "{d}/nope.pt", "--model", "small_cnn"], "is not a file"),
    Case(
        "eval a garbage checkpoint",
        ["eval", "{d}/x", "--checkpoint", "{d}/garbage.pt", "--model", "small_cnn"],
        "garbage.pt",
        prepare=_garbage_checkpoint,
    ),
    Case(
        "eval a checkpoint of another architecture",
        ["eval", "{d}/x", "--checkpoint", "{d}/train/checkpoints/train/best.pt", "--model", "cnn_fc", "--dataset", "digits"],
        "missing keys",
    ),
    Case(
        "eval a checkpoint under an odd name",
        ["eval", "{d}/x", "--checkpoint", "{d}/train/checkpoints/train/best.pt", "--model", "small_cnn", "--dataset", "digits", "--name", "../up"],
        "--name '../up'",
    ),
    Case(
        "eval a checkpoint into a URI",
        ["eval", "s3://bucket/out", "--checkpoint", "{d}/train/checkpoints/train/best.pt", "--model", "small_cnn"],
        "local directory",
    ),
    Case("sample without a model", ["sample", "{d}/train"], "give --trial"),
    Case(
        "normalising a trial's inputs", ["eval", "{d}/train", "--trial", "train", "--normalize", "cifar10"], "--normalize does not apply to --trial"
    ),
    Case(
        "another eps for a trial",
        ["landscape", "{d}/train", "--trial", "train", "--eps", "0.3", "--dataset", "digits"],
        "--dataset, --eps do not apply to --trial",
    ),
    Case(
        "an architecture for a RobustBench model",
        ["eval", "{d}/x", "--robustbench", "Wong2020Fast", "--model", "resnet18"],
        "--model does not apply to --robustbench",
    ),
    Case("status of an older energyat's study", ["status", STUDY], "schema_version 1", prepare=_old_study_spec),
    Case("resume an older energyat's study", ["resume", STUDY], "schema_version 1", prepare=_old_study_spec),
    Case("query an older energyat's table", ["query", STUDY, "select count(*) from epochs"], "schema_version 1", prepare=_old_table_file),
    Case("eval an older energyat's output", ["eval", "{d}/train", "--trial", "train"], "schema_version 1", prepare=_old_train_spec),
    Case(
        "train on into an older energyat's output",
        ["train", "{d}/spec.yaml", "--out", "{d}/train"],
        "schema_version 1",
        _spec(epochs=1),
        prepare=_old_train_spec,
    ),
]


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir" for p in sorted(root.rglob("*"))}


def test_at_least_25_distinct_bad_inputs() -> None:
    assert len({c.name for c in CASES}) == len(CASES) >= 25


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(
    case: Case, pristine: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    d = tmp_path / "case"
    shutil.copytree(pristine, d)
    # the home folder inside the case, so the snapshot sees what lands there (DuckDB's ~/.duckdb
    # extensions, ~/.energyat journals); Ray's session folder inside it too, to see it never starts
    (d / "home").mkdir()
    monkeypatch.setenv("HOME", str(d / "home"))
    monkeypatch.setenv("RAY_TMPDIR", str(d / "home" / "ray"))
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "matplotlib"))  # matplotlib's font cache, not energyat's
    if isinstance(case.spec, dict):
        (d / "spec.yaml").write_text(yaml.safe_dump(case.spec))
    elif isinstance(case.spec, str):
        (d / "spec.yaml").write_text(case.spec)
    if case.prepare is not None:
        case.prepare(d)
    before = _snapshot(d)
    capfd.readouterr()
    argv = [a.replace("{d}", str(d)) for a in case.argv]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code
    out, err = capfd.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, f"exit {code}; stderr: {err[-2000:]}"
    assert len(lines) == 1 and lines[0].startswith("energyat: "), err
    assert case.expect.replace("{d}", str(d)) in lines[0], lines[0]
    assert out == ""
    assert _snapshot(d) == before, "a bad input changed files"
    assert not _ray_started(), "a bad input started Ray"


def _ray_started() -> bool:
    """Whether this process initialised Ray (the cases run in-process; Ray is never imported
    by a case that fails before it, and a study would initialise it here)."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()
