"""Studies on object storage: a real S3-protocol server (moto's standalone server) on 127.0.0.1.

The server runs in its own process and energyat talks to it through pyarrow's S3 client, as it
would to AWS: tables, checkpoints, spec.yaml, the uploaded Optuna journal and the report land in
the bucket, and `status`, `query` and `report` read them from there.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

# No skip: without the server these guarantees would go untested while the suite still passed.
# `make test` installs moto[server] (the `test` extra); a missing one fails this module.
import moto.server  # noqa: E402, F401
import optuna
import pyarrow.fs as pafs
import pytest
from conftest import EXAMPLES, energyat_cmd
from test_store import _row
from test_study import assert_journal_matches_tune, assert_tables_consistent

from analysis.compaction import compact
from analysis.query import open_tables
from analysis.store import filesystem, read_files, table_files, write_epoch_rows, write_trial_row

BUCKET = "bucket"
# moto accepts any credentials; they live in the environment only, never in a file. Distinctive
# values, so that a scan of every file a study wrote can tell whether one leaked.
SECRET = "energyat-test-secret-q7Zr2"
KEY_ID = "EATKEYID4Q9TESTONLY"
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": KEY_ID,
    "AWS_SECRET_ACCESS_KEY": SECRET,
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # no instance-metadata lookups on a laptop or CI
}


class S3:
    def __init__(self, port: int, log: Path) -> None:
        self.endpoint = f"127.0.0.1:{port}"
        self.log = log
        self.fs = pafs.S3FileSystem(
            endpoint_override=self.endpoint, scheme="http", access_key="testing", secret_key="testing",
            region="us-east-1", allow_bucket_creation=True,
        )

    def uri(self, path: str) -> str:
        return f"s3://{BUCKET}/{path}?endpoint_override={self.endpoint}&scheme=http"

    def files(self, prefix: str) -> list[str]:
        found = self.fs.get_file_info(pafs.FileSelector(f"{BUCKET}/{prefix}", recursive=True, allow_not_found=True))
        return sorted(f.path[len(BUCKET) + len(prefix) + 2:] for f in found if f.type == pafs.FileType.File)

    def requests(self) -> list[str]:
        """Every request the server has logged so far, as "METHOD /path"."""
        return re.findall(r"(?:GET|HEAD|PUT|POST|DELETE) /\S*", self.log.read_text())


def _download(s3: S3, key: str, to: Path) -> Path:
    pafs.copy_files(f"{BUCKET}/{key}", str(to), source_filesystem=s3.fs, destination_filesystem=pafs.LocalFileSystem())
    return to


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3]:
    port = _free_port()
    log = tmp_path_factory.mktemp("moto") / "server.log"
    with log.open("w") as out:
        server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, f"moto did not start:\n{log.read_text()}"
                time.sleep(0.2)
        store = S3(port, log)
        store.fs.create_dir(BUCKET)
        yield store
    finally:
        server.kill()
        server.wait()


@pytest.fixture(autouse=True)
def credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)


def energyat(*args: str, cwd: Path, env: dict[str, str], timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*energyat_cmd(), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_open_tables_reads_a_uri_like_a_local_directory(s3: S3) -> None:
    root = s3.uri("unit")
    for trial, epochs in (("a", 3), ("b", 2)):
        for epoch in range(epochs):
            write_epoch_rows(root, table="epochs", trial_id=trial, epoch=epoch, columns=_row(trial, epoch, float(epoch)), provenance={})
    write_epoch_rows(root, table="epochs", trial_id="a", epoch=1, columns=_row("a", 1, 9.0), provenance={})  # a rewrite
    # trials with different config columns per method: the view unions them by name
    write_trial_row(root, trial_id="a", outcome={"trial_id": "a", "status": "TERMINATED"}, config={"method": "sat"}, provenance={})
    write_trial_row(root, trial_id="b", outcome={"trial_id": "b", "status": "TERMINATED"}, config={"method": "trades", "beta": 6.0}, provenance={})
    assert s3.files("unit/tables/epochs/trial=a") == [f"epoch-000{i}.parquet" for i in range(3)]
    con = open_tables(root)
    assert con.execute("select trial_id, count(*) from epochs group by 1 order by 1").fetchall() == [("a", 3), ("b", 2)]
    assert con.execute("select train_loss from epochs where trial_id = 'a' and epoch = 1").fetchall() == [(9.0,)]
    assert con.execute("select trial_id, beta from trials order by 1").fetchall() == [("a", None), ("b", 6.0)]
    assert con.execute("select count(*) from samples").fetchall() == [(0,)]  # no file yet: empty, with its columns
    only_b = open_tables(root, trial="b")
    assert only_b.execute("select distinct trial_id from epochs").fetchall() == [("b",)]
    # compacted in the bucket as on a disk: the same rows, from a part; a later write overrides it
    before = sorted(con.execute("select * from epochs").fetchall(), key=repr)
    compact(root)
    assert s3.files("unit/tables/epochs") == [f for f in s3.files("unit/tables/epochs") if f.startswith("parts/part-")] != []
    assert sorted(open_tables(root).execute("select * from epochs").fetchall(), key=repr) == before
    write_epoch_rows(root, table="epochs", trial_id="b", epoch=1, columns=_row("b", 1, 5.0), provenance={})
    assert open_tables(root, trial="b").execute("select epoch, train_loss from epochs order by 1").fetchall() == [(0, 0.0), (1, 5.0)]


def test_reads_open_files_at_their_listed_size_and_a_file_rewritten_since_is_read_again(s3: S3) -> None:
    root = s3.uri("sized")
    for epoch in range(3):
        write_epoch_rows(root, table="epochs", trial_id="a", epoch=epoch, columns=_row("a", epoch, float(epoch)), provenance={})
    write_trial_row(root, trial_id="a", outcome={"trial_id": "a", "status": "TERMINATED"}, config={"method": "sat"}, provenance={})
    fs, path = filesystem(root)
    listed = table_files(fs, path, "epochs").listed
    # epoch 1 trained again after the listing (a resume): its file now has another size
    row = _row("a", 1, 7.0)
    row["alarm_reason"] = ["rewritten with a longer row, so the file's size changes"]
    write_epoch_rows(root, table="epochs", trial_id="a", epoch=1, columns=row, provenance={})
    rows = read_files(fs, path, "epochs", listed, [])
    assert sorted(zip(rows.column("epoch").to_pylist(), rows.column("train_loss").to_pylist(), strict=True)) == [(0, 0.0), (1, 7.0), (2, 2.0)]

    compact(root)
    since = len(s3.requests())
    con = open_tables(root)
    assert con.execute("select count(*) from epochs").fetchall() == [(3,)]
    con.close()
    time.sleep(0.5)  # the server logs after it answers
    opened = [r for r in s3.requests()[since:] if ".parquet" in r]
    # one footer read per part at listing, then its rows: GETs, never a HEAD asking a file's size
    assert opened and all(r.startswith("GET") for r in opened), opened


@pytest.mark.parametrize(
    ("uri", "says"),
    [
        ("ftp://bucket/studies", "cannot open storage"),
        ("s3://nobucket/studies?endpoint_override={endpoint}&scheme=http", "bucket `nobucket` does not exist"),
        ("s3://bucket/studies?endpoint_override=127.0.0.1:{closed}&scheme=http", "cannot reach storage"),
        ("s3://EATKEY:hunter2@bucket/studies?endpoint_override={endpoint}&scheme=http", "carries credentials"),
        ("s3://bucket/studies?endpoint_override={endpoint}&scheme=http&secret_key=hunter2&access_key=EATKEY", "carries credentials"),
    ],
)
def test_a_bad_storage_uri_exits_2_with_one_line_before_ray_starts(s3: S3, uri: str, says: str, tmp_path: Path) -> None:
    uri = uri.format(endpoint=s3.endpoint, closed=_free_port())
    proc = energyat("run", str(EXAMPLES / "smoke.yaml"), "--storage", uri, cwd=tmp_path, env=os.environ.copy(), timeout=180)
    assert proc.returncode == 2 and says in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "Traceback" not in proc.stderr and not any(tmp_path.iterdir()) and "hunter2" not in proc.stderr


def test_query_of_a_missing_study_on_s3_exits_2_with_one_line(s3: S3, tmp_path: Path) -> None:
    proc = energyat("query", s3.uri("studies/nothing"), "select 1", cwd=tmp_path, env=os.environ.copy(), timeout=120)
    assert proc.returncode == 2 and "holds no energyat tables" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_a_damaged_parquet_file_on_s3_is_named_in_one_line_and_left_alone(s3: S3, tmp_path: Path) -> None:
    root = s3.uri("damaged")
    for epoch in range(2):
        write_epoch_rows(root, table="epochs", trial_id="a", epoch=epoch, columns=_row("a", epoch, 1.0), provenance={})
    with s3.fs.open_output_stream(f"{BUCKET}/damaged/tables/epochs/trial=a/epoch-0001.parquet") as f:
        f.write(b"PAR1 not a parquet file")
    proc = energyat("query", root, "select count(*) from epochs", cwd=tmp_path, env=os.environ.copy(), timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "trial=a/epoch-0001.parquet" in proc.stderr and "Traceback" not in proc.stderr
    assert s3.files("damaged/tables/epochs/trial=a") == ["epoch-0000.parquet", "epoch-0001.parquet"]


@pytest.fixture(scope="module")
def s3_study(s3: S3, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Path, dict[str, str]]:
    """The smoke study, 2 trials x 2 epochs, run from an empty working directory into the bucket."""
    cwd = tmp_path_factory.mktemp("cwd")
    journals = tmp_path_factory.mktemp("journals")
    env = os.environ | CREDENTIALS | {"ENERGYAT_JOURNAL_DIR": str(journals)}
    proc = energyat("run", str(EXAMPLES / "smoke.yaml"), "--storage", s3.uri("studies"), "--name", "remote",
                    "--set", "samples=2", "--set", "epochs=2", cwd=cwd, env=env)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    study = s3.uri("studies/remote")
    assert f"study: {study}" in proc.stdout
    return study, cwd, journals, env


def test_a_study_on_s3_writes_tables_checkpoints_spec_and_journal_to_the_bucket(s3: S3, s3_study: tuple[str, Path, Path, dict[str, str]]) -> None:
    _study, cwd, journals, _env = s3_study
    files = s3.files("studies/remote")
    assert "spec.yaml" in files and "optuna.journal" in files
    # the two finished trials, compacted at the study's end: one part per table
    for table in ("epochs", "samples", "trials", "evals"):
        (part,) = [f for f in files if f.startswith(f"tables/{table}/")]
        assert part.startswith(f"tables/{table}/parts/part-") and part.endswith(".parquet")
    # Tune's experiment state and the trials' checkpoints, uploaded by Ray Tune through the same filesystem
    assert any(f.startswith("tune/experiment_state") for f in files)
    assert any(f.startswith("tune/") and "/checkpoint_" in f and f.endswith("last.pt") for f in files)
    assert not any(cwd.iterdir())  # nothing lands in the working directory
    assert [p.suffix for p in journals.iterdir() if p.is_file() and not p.name.endswith(".lock")] == [".journal"]


def test_the_uploaded_journal_loads_with_plain_optuna_and_matches_the_trials_table(
    s3: S3, s3_study: tuple[str, Path, Path, dict[str, str]], tmp_path: Path
) -> None:
    study, *_ = s3_study
    local = _download(s3, "studies/remote/optuna.journal", tmp_path / "optuna.journal")
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(local)))
    (name,) = optuna.study.get_all_study_names(storage)
    optuna_trials = [t for t in optuna.load_study(study_name=name, storage=storage).get_trials() if "energyat_duplicate_of" not in t.user_attrs]
    rows = open_tables(study).execute("select best_val_robust_acc from trials").fetchall()
    # one Optuna trial per trials row, every one complete, with the trial's best robust accuracy
    assert len(optuna_trials) == len(rows) == 2
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in optuna_trials)
    assert sorted(round(t.values[0], 6) for t in optuna_trials) == sorted(round(r[0], 6) for r in rows)


def test_no_credential_reaches_any_file_a_study_on_s3_wrote(s3: S3, s3_study: tuple[str, Path, Path, dict[str, str]], tmp_path: Path) -> None:
    # the driver and its trials had the key id and the secret in their environment: no file in the
    # bucket (tables, spec.yaml, Tune's pickled experiment and checkpoints, the journal, the report)
    # nor on the driver's disk holds either
    _study, cwd, journals, _env = s3_study
    scanned = 0
    for name in s3.files("studies/remote"):
        with s3.fs.open_input_stream(f"{BUCKET}/studies/remote/{name}") as f:
            data = f.read()
        assert SECRET.encode() not in data and KEY_ID.encode() not in data, name
        scanned += 1
    for path in [*cwd.rglob("*"), *journals.rglob("*")]:
        if path.is_file():
            data = path.read_bytes()
            assert SECRET.encode() not in data and KEY_ID.encode() not in data, path
            scanned += 1
    assert scanned >= 20  # tables, checkpoints, Tune's files, the journal copies


def test_journals_that_disagree_are_refused_in_one_line_and_neither_changes(s3: S3, s3_study: tuple[str, Path, Path, dict[str, str]]) -> None:
    study, cwd, journals, env = s3_study
    (local,) = [p for p in journals.iterdir() if p.suffix == ".journal"]
    mine = local.read_bytes()
    with s3.fs.open_input_stream(f"{BUCKET}/studies/remote/optuna.journal") as f:
        uploaded = f.read()
    other = mine[:-40] + b'{"op_code": 0, "worker_id": "not this study"}\n'  # diverges 40 bytes before the end
    local.write_bytes(other)
    try:
        proc = energyat("resume", study, cwd=cwd, env=env, timeout=300)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "disagree" in proc.stderr, proc.stderr
        assert local.read_bytes() == other
        with s3.fs.open_input_stream(f"{BUCKET}/studies/remote/optuna.journal") as f:
            assert f.read() == uploaded
    finally:
        local.write_bytes(mine)


def test_status_query_and_report_read_a_study_on_s3(s3: S3, s3_study: tuple[str, Path, Path, dict[str, str]]) -> None:
    study, cwd, _journals, env = s3_study
    status = energyat("status", study, cwd=cwd, env=env, timeout=300)
    assert status.returncode == 0, status.stderr
    assert "2 TERMINATED" in status.stdout and "optuna: 2 COMPLETE" in status.stdout
    query = energyat("query", study, "select count(*) as n from epochs", "--format", "csv", cwd=cwd, env=env, timeout=300)
    assert query.returncode == 0 and query.stdout.split() == ['"n"', "4"], query.stderr
    report = energyat("report", study, cwd=cwd, env=env, timeout=300)
    assert report.returncode == 0, report.stderr
    assert report.stdout.strip().splitlines()[-1] == s3.uri("studies/remote/report/index.html")
    page = s3.files("studies/remote/report")
    assert "index.html" in page and any(name.endswith(".png") for name in page)
    with s3.fs.open_input_stream(f"{BUCKET}/studies/remote/report/index.html") as f:
        html = f.read().decode()
    assert "endpoint_override" not in html and f"s3://{BUCKET}/studies/remote" in html
    assert not any(cwd.iterdir())


def test_driver_killed_then_resumed_elsewhere_takes_the_uploaded_journal(s3: S3, tmp_path: Path) -> None:
    # the driver dies mid-study (SIGKILL to its process group, Ray included) and its local journal
    # is lost with its machine: `energyat resume` downloads the uploaded copy and finishes the
    # study with one row per (trial, epoch) and one complete Optuna trial per trial. The kill
    # waits for the worst moment: Tune's searcher checkpoint in the bucket holds an epoch's value,
    # which no trial event uploaded (the race CI hit on 2026-11-24)
    journals = tmp_path / "journals"
    env = os.environ | CREDENTIALS | {"ENERGYAT_JOURNAL_DIR": str(journals)}
    args = [*energyat_cmd(), "run", str(EXAMPLES / "smoke.yaml"), "--storage", s3.uri("studies"), "--name", "killed",
            "--set", "samples=2", "--set", "epochs=3"]
    log = tmp_path / "run.log"
    with log.open("w") as out:
        proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=out, stderr=out, start_new_session=True)
    deadline = time.monotonic() + 600
    try:
        while not _checkpoint_holds_a_report(s3, "studies/killed", tmp_path):
            assert proc.poll() is None, f"the study ended before it could be killed:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no epoch reached Tune's searcher checkpoint within 600 s"
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    shutil.rmtree(journals)  # another machine: only the bucket's copy is left
    _assert_uploaded_journal_holds_the_checkpointed_searcher(s3, "studies/killed", tmp_path)
    # whoever can write the bucket names a file for the driver to overwrite (spec.yaml's `journal`
    # key, which energyat once followed): the other machine keeps its journal where its own
    # settings say, and writes nothing there
    planted = tmp_path / "chosen-by-the-bucket.journal"
    with s3.fs.open_input_stream(f"{BUCKET}/studies/killed/spec.yaml") as f:
        spec = f.read().decode()
    with s3.fs.open_output_stream(f"{BUCKET}/studies/killed/spec.yaml") as f:
        f.write((spec + f"journal: {planted}\n").encode())
    elsewhere = tmp_path / "elsewhere"
    study = s3.uri("studies/killed")
    resumed = energyat("resume", study, cwd=tmp_path, env=env | {"ENERGYAT_JOURNAL_DIR": str(elsewhere)})
    assert resumed.returncode == 0, f"{resumed.stdout[-3000:]}\n{resumed.stderr[-5000:]}"
    assert not planted.exists() and not journals.exists() and [p.suffix for p in elsewhere.iterdir() if p.suffix == ".journal"] == [".journal"]
    assert_tables_consistent(study)
    con = open_tables(study)
    assert con.execute("select count(*), min(epochs_run) from trials").fetchall() == [(2, 3)]
    # the full match the local kill studies check: every Tune trial once in Optuna, with its value
    local = _download(s3, "studies/killed/optuna.journal", tmp_path / "copy.journal")
    (mine,) = [p for p in elsewhere.iterdir() if p.suffix == ".journal"]
    assert mine.read_bytes() == local.read_bytes()
    assert_journal_matches_tune(study, journal=local, tune_dir=f"{BUCKET}/studies/killed/tune", fs=s3.fs)


def _checkpointed_searcher(s3: S3, prefix: str, tmp_path: Path) -> dict:
    """The state of OptunaSearch in Tune's newest experiment checkpoint in the bucket ({} before
    the first), as a resume restores it."""
    states = [f for f in s3.files(f"{prefix}/tune") if f.startswith("searcher-state-")]
    if not states:
        return {}
    (state,) = states
    with _download(s3, f"{prefix}/tune/{state}", tmp_path / "searcher.pkl").open("rb") as f:
        return pickle.load(f)  # written by energyat's own run a moment ago


def _checkpoint_holds_a_report(s3: S3, prefix: str, tmp_path: Path) -> bool:
    try:
        searcher = _checkpointed_searcher(s3, prefix, tmp_path)
    except (pickle.UnpicklingError, EOFError):
        return False  # read while Tune replaced it: the next poll reads the whole file
    return any(t._cached_frozen_trial.intermediate_values for t in searcher.get("_ot_trials", {}).values())


def _assert_uploaded_journal_holds_the_checkpointed_searcher(s3: S3, prefix: str, tmp_path: Path) -> None:
    """Every Optuna trial in Tune's searcher checkpoint, with every value reported to it, is in
    the uploaded journal: what a resume elsewhere restores refers only to uploaded records."""
    searcher = _checkpointed_searcher(s3, prefix, tmp_path)
    journal = _download(s3, f"{prefix}/optuna.journal", tmp_path / "uploaded.journal")
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    uploaded = {t._trial_id: t for t in optuna.load_study(study_name=searcher["_study_name"], storage=storage).get_trials()}
    for ot_trial in searcher["_ot_trials"].values():
        assert ot_trial._trial_id in uploaded
        assert ot_trial._cached_frozen_trial.intermediate_values.items() <= uploaded[ot_trial._trial_id].intermediate_values.items()


def test_the_searcher_uploads_the_journal_before_it_saves_its_state(s3: S3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from study.callbacks import JournalUpload
    from study.journal import journal_storage
    from study.search import StudySearch

    monkeypatch.setenv("ENERGYAT_JOURNAL_DIR", str(tmp_path))
    journal = tmp_path / "driver.journal"
    searcher = StudySearch(
        upload=JournalUpload("driver", s3.uri("studies/searcher")), study_dir=s3.uri("studies/searcher"),
        space={"lr": optuna.distributions.FloatDistribution(0.01, 0.1)}, metric="acc", mode="max", storage=journal_storage(journal), study_name="s",
    )
    searcher.suggest("t1")
    searcher.on_trial_result("t1", {"acc": 0.5, "training_iteration": 1})  # a report: no callback uploads it
    searcher.save(str(tmp_path / "searcher-state-x.pkl"))
    uploaded = _download(s3, "studies/searcher/optuna.journal", tmp_path / "uploaded.journal")
    assert uploaded.read_bytes() == journal.read_bytes()
