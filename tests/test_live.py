"""What a study and a trial show while they run (study.live), and the two dashboards: Ray's on
loopback with `--dashboard`, and optuna-dashboard on a study's journal, read through their HTTP
APIs, with the energy outcomes on each Optuna trial."""

from __future__ import annotations

import io
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, energyat_cmd

from study.live import Board, TrainProgress

ROW = {"method": "weat", "train_loss": 0.5, "val_robust_acc": 0.6, "probe_train_dE": 0.1, "alarm": False, "alarm_reason": None}


def _rows(epochs: int, *, alarm_at: int | None = None, phase2_at: int = 3) -> list[dict]:
    return [ROW | {"epoch": e, "best_val_robust_acc": 0.5 + e / 100, "phase": 2 if e >= phase2_at else 1,
                   "alarm": alarm_at is not None and e >= alarm_at, "alarm_reason": "dE diverges" if alarm_at is not None and e >= alarm_at else None}
            for e in range(epochs)]


def test_plain_board_prints_one_line_per_event_not_per_epoch() -> None:
    out = io.StringIO()
    board = Board(name="s", total=2, epochs=30, stream=out, live=False)
    board.started("a", "weat")
    board.started("b", "sat")
    for row in _rows(30, alarm_at=20):
        board.result("a", row)
    for row in _rows(12):
        board.result("b", row)
    board.finished("a", {"stop_reason": "completed", "best_val_robust_acc": 0.79})
    board.finished("b", {"stop_reason": "scheduler: asha", "best_val_robust_acc": 0.61})
    lines = out.getvalue().splitlines()
    # two starts, two phase changes, one alarm, two ends: 7 lines for 42 trial-epochs
    assert len(lines) == 7, lines
    assert "trial a (weat) energy alarm at epoch 20: dE diverges" in lines[3]
    assert lines[-1].endswith("trial b (sat) finished: scheduler: asha after 12/30 epochs, best val robust 0.6100")
    assert "trials 2/2 done, 0 running, 42 trial-epochs" in lines[-1]


def test_a_resumed_board_counts_the_trials_the_run_before_finished() -> None:
    # energyat resume: one trial finished before the driver died, one goes on from its epoch-5 checkpoint
    out = io.StringIO()
    board = Board(name="s", total=3, epochs=10, stream=out, live=False)
    board.restored("a", "sat", row={"epoch": 9, "best_val_robust_acc": 0.7, "stop_reason": "completed", "phase": 3}, state="TERMINATED", epochs=10)
    board.restored("b", "trades", row={"epoch": 7, "best_val_robust_acc": 0.6}, state="RUNNING", epochs=8)
    assert out.getvalue() == ""  # nothing happened in this run yet
    board.started("b", "trades")
    for row in _rows(10)[5:]:  # b re-trains epochs 5-7, then goes on
        board.result("b", row)
    board.finished("b", {"stop_reason": "completed", "best_val_robust_acc": 0.6})
    board.started("c", "sat")
    assert "trials 2/3 done, 1 running, 20 trial-epochs" in out.getvalue().splitlines()[-1]
    assert [t.stop for t in board.trials.values()] == ["completed", "completed", ""]


def test_live_board_redraws_one_table_in_place() -> None:
    out = io.StringIO()
    board = Board(name="s", total=3, epochs=10, stream=out, live=True)
    for trial in ("a", "b", "c"):
        board.started(trial, "sat")
    board.result("a", _rows(1)[0])
    board.draw()
    board.result("b", _rows(5)[4])
    board.finished("c", {"stop_reason": "energy_divergence", "best_val_robust_acc": 0.9})
    board.draw()
    text = out.getvalue()
    # each redraw moves back over exactly the lines drawn before, clears them, and draws anew
    parts = re.split(r"\x1b\[(\d+)F\x1b\[J", text)
    assert len(parts) >= 3
    for before, back in zip(parts[0::2], parts[1::2], strict=False):  # the text after the last redraw has no pair
        assert int(back) == before.count("\n")
    table = parts[-1].splitlines()
    assert table[0].startswith("energyat s: trials 1/3 done, 2 running, 6 trial-epochs, best val robust 0.9000 (c, sat)")
    # running trials first, best first; then the finished one with its stop reason
    assert [r.split()[0] for r in table[2:]] == ["b", "a", "c"] and table[-1].rstrip().endswith("energy_divergence")
    assert "1/10" in table[3] and "5/10" in table[2]


def test_a_table_taller_than_the_terminal_is_cut_with_a_pointer() -> None:
    board = Board(name="s", total=40, epochs=10, stream=io.StringIO(), live=True)
    for i in range(40):
        board.started(f"t{i:02d}", "sat")
    lines = board.table(12)
    assert len(lines) == 12 and lines[-1].startswith("... 31 more")


def test_train_progress_plain_prints_tenths_and_events() -> None:
    out = io.StringIO()
    progress = TrainProgress(30, stream=out, live=False)
    rows = _rows(30, alarm_at=25)
    for row in rows[:-1]:
        progress(row, None)
    progress(rows[-1] | {"done": True}, None)
    lines = out.getvalue().splitlines()
    # the first epoch, every third (a tenth of 30), plus phase 2 and the alarm off that grid: 10 + 1 + 2
    assert len(lines) == 13, lines
    assert lines[-1].startswith("epoch 30/30") and any("energy alarm at epoch 25" in line for line in lines)


def test_train_progress_live_is_one_line_redrawn() -> None:
    out = io.StringIO()
    progress = TrainProgress(5, stream=out, live=True)
    rows = _rows(5)
    for row in rows[:-1]:
        progress(row, None)
    progress(rows[-1] | {"done": True}, None)
    text = out.getvalue()
    # five redraws of one line; the phase change stays above it as its own line; a newline at the end
    assert text.count("\r\x1b[K[") == 5 and text.endswith("\n") and text.count("\n") == 2
    assert "\r\x1b[Kphase 2 at epoch 3\n" in text
    assert "[####################] epoch 5/5" in text


def test_train_progress_shows_the_final_evaluation_with_an_eta() -> None:
    out = io.StringIO()
    progress = TrainProgress(5, stream=out, live=False)
    what = "PGD-20 on 10,000 test images"
    for done in range(128, 10_001, 128):
        progress.stage(what, done, 10_000)
    progress.stage(what, 10_000, 10_000)
    progress.stage("AutoAttack on 1,000 test images: apgd-ce on the images still robust", 1, 4)
    lines = out.getvalue().splitlines()
    # a line when a part starts, none in between (all within STAGE_LINE_SECONDS), one at its end
    assert lines[0] == "final evaluation: PGD-20 on 10,000 test images: 128/10,000"
    assert lines[1].startswith("final evaluation: PGD-20 on 10,000 test images: 10,000/10,000, eta 0 s")
    assert lines[2] == "final evaluation: AutoAttack on 1,000 test images: apgd-ce on the images still robust: 1/4"
    assert len(lines) == 3


def test_the_live_view_shows_a_running_trials_final_evaluation_from_its_stage_file(tmp_path: Path) -> None:
    from analysis.store import Stage, clear_stage, write_stage
    from study.callbacks import LiveView

    out = io.StringIO()
    board = Board(name="s", total=2, epochs=10, stream=out, live=False)
    board.started("a", "sat")
    board.started("b", "sat")
    view = LiveView(board, "sat", str(tmp_path))
    write_stage(str(tmp_path), "a", Stage("PGD-20 on 10,000 test images", 2048, 10_000, 180.0))
    view.on_step_end(0, [])
    assert out.getvalue().splitlines()[-1].endswith("trial a (sat) final evaluation: PGD-20 on 10,000 test images: 2,048/10,000, eta 180 s")
    assert any("final evaluation: PGD-20" in line and line.startswith("a ") for line in board.table(10))
    # the next poll of the same part updates the row and prints no new line; the end clears it
    write_stage(str(tmp_path), "a", Stage("PGD-20 on 10,000 test images", 4096, 10_000, 120.0))
    view._polled = -1e9
    view.on_step_end(0, [])
    assert len(out.getvalue().splitlines()) == 3 and any("4,096/10,000" in line for line in board.table(10))
    # each of AutoAttack's attacks is a new part: a line when it starts, none for its batches (an
    # hour of Square on a CPU must not look like an hour of apgd-ce)
    # (0 of 0 as an attack starts: its batches are counted from its first log line)
    for attack, done, total in (("apgd-ce", 0, 0), ("apgd-ce", 2, 4), ("apgd-t", 0, 0), ("square", 0, 0), ("square", 1, 2)):
        write_stage(str(tmp_path), "a", Stage(f"AutoAttack on 1,000 test images: {attack} on the images still robust", done, total, None))
        view._polled = -1e9
        view.on_step_end(0, [])
    assert [line.split(": ", 2)[-1] for line in out.getvalue().splitlines()[3:]] == [
        f"{attack} on the images still robust" for attack in ("apgd-ce", "apgd-t", "square")]
    clear_stage(str(tmp_path), "a")
    board.finished("a", {"stop_reason": "completed"})
    assert not any("final evaluation" in line for line in board.table(10))
    # a stage file is read from the study's storage: one that is not energyat's is ignored
    (tmp_path / "stages" / "b").write_text(json.dumps({"what": "\x1b[2J" * 3, "done": 1, "total": 2, "eta_seconds": None}))
    view._polled = -1e9
    view.on_step_end(0, [])
    assert len(out.getvalue().splitlines()) == 7  # only a's end


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening(port: int) -> set[str]:
    """The local addresses a socket listens on at `port` (from /proc/net/tcp, hex little-endian)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:  # LISTEN
            found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return found


def _get(url: str, timeout: float = 5.0, token: str | None = None) -> object:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as reply:
        return json.loads(reply.read())


def _ray_token() -> str | None:
    """The token Ray's token authentication reads (RAY_AUTH_TOKEN, else ~/.ray/auth_token), if any:
    with one, Ray's dashboard answers 401 to a request without it."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path("~/.ray/auth_token").expanduser()
    return path.read_text().strip() if path.is_file() else None


SPEC = {
    "name": "watched", "dataset": {"name": "digits", "train_size": 200}, "model": "small_cnn", "method": "sat", "epochs": 6,
    "batch_size": 64, "attack": {"eps": 0.15, "steps": 2}, "eval_attack": {"steps": 3}, "probe": {"train_size": 32, "test_size": 32},
    "final_eval": {"n": 64, "pgd_steps": 3, "autoattack_n": 0}, "device": "cpu", "samples": 2, "max_concurrent": 1,
    "search": {"lr": [0.01, 0.1, "log"]}, "early_stop": {"energy_divergence": True, "patience": 0},
}


@pytest.fixture(scope="module")
def watched(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, set[str], object]:
    """A study run with `--dashboard`: Ray's dashboard API read while it runs."""
    base = tmp_path_factory.mktemp("watched")
    (base / "spec.yaml").write_text(yaml.safe_dump(SPEC))
    port = _free_port()
    proc = subprocess.Popen([*energyat_cmd(), "run", str(base / "spec.yaml"), "--storage", str(base), "--dashboard", "--dashboard-port", str(port)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    version: object = None
    listening: set[str] = set()
    deadline = time.monotonic() + 240
    while version is None and proc.poll() is None and time.monotonic() < deadline:
        try:
            version = _get(f"http://127.0.0.1:{port}/api/version", token=_ray_token())
            listening = _listening(port)
        except OSError:
            time.sleep(1)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return base / "watched", out + err, listening, version


def test_the_ray_dashboard_serves_on_loopback_only_while_the_study_runs(watched: tuple[Path, str, set[str], object]) -> None:
    _study, err, listening, version = watched
    assert isinstance(version, dict) and "ray_version" in version, version
    assert listening == {"127.0.0.1"}
    assert "Ray dashboard at http://127.0.0.1:" in err


def test_study_output_has_events_and_no_repeated_warnings(watched: tuple[Path, str, set[str], object]) -> None:
    _study, err, _listening, _version = watched
    # Tune's snapshot warning (fixed at its cause: a checkpoint every CHECKPOINT_SECONDS, not every
    # epoch) and its TensorBoard hint into Ray's temporary folder (stdout) are gone
    assert "snapshotting has been triggered" not in err and "To visualize your results with TensorBoard" not in err
    events = [line for line in err.splitlines() if "] trials " in line]
    assert len(events) <= 2 * 4 and sum("finished:" in line for line in events) == 2, events  # start, phase, alarm, end per trial


def test_optuna_dashboard_reads_the_journal_with_the_energy_outcomes(watched: tuple[Path, str, set[str], object]) -> None:
    study, _err, _l, _v = watched
    port = _free_port()
    # the command docs/design.md and the README give
    command = str(Path(sys.executable).parent / "optuna-dashboard")  # the venv's, as `make test` installs it
    server = subprocess.Popen([command, str(study / "optuna.journal"), "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT, env=None)
    try:
        listing = None
        deadline = time.monotonic() + 60
        while listing is None and server.poll() is None and time.monotonic() < deadline:
            try:
                listing = _get(f"http://127.0.0.1:{port}/api/studies")
            except OSError:
                time.sleep(0.5)
        assert isinstance(listing, dict), server.stderr.read().decode()[-2000:] if server.poll() is not None else listing
        (summary,) = listing["study_summaries"]
        detail = _get(f"http://127.0.0.1:{port}/api/studies/{summary['study_id']}")
    finally:
        server.terminate()
        server.wait(timeout=30)
    from analysis.query import open_tables

    rows = {r[0]: r[1:] for r in open_tables(study).execute("select trial_id, stop_reason, epochs_run, alarm_epoch from trials").fetchall()}
    seen = {}
    for trial in detail["trials"]:
        attrs = {a["key"]: a["value"] for a in trial["user_attrs"]}
        seen[attrs["tune_trial_id"]] = (attrs["energyat_stop_reason"], int(attrs["energyat_epochs_run"]),
                                        int(attrs["energyat_alarm_epoch"]) if "energyat_alarm_epoch" in attrs else None)
    assert seen == rows
