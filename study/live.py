"""What a running study or trial shows while it runs.

On a terminal, a study keeps one compact table redrawn in place (:class:`Board`: trials by
state, method, epoch of epochs, best validation robust accuracy, phase, alarm, stop reason) and
`energyat train` one progress line (:class:`TrainProgress`). When the output is not a terminal
(a log file, CI, a pipe), both print one line per event that matters instead: a trial starts,
enters a new phase, raises the energy alarm, finishes (with its stop reason) or fails, and for
`energyat train` every tenth of the epochs. ``ENERGYAT_PROGRESS=live`` or ``plain`` overrides
the choice. Nothing here imports Ray: the Ray Tune callback that feeds a Board is in study.callbacks.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TextIO

from analysis.store import Stage, StageClock

ENV = "ENERGYAT_PROGRESS"
REDRAW_SECONDS = 1.0  # a terminal table redrawn at most once a second: the eye needs no more
STAGE_LINE_SECONDS = 30.0  # in a log, a long stage's progress line at most this often


def live_output(stream: TextIO) -> bool:
    """Redraw in place? ``ENERGYAT_PROGRESS`` (live or plain) if set, else whether `stream` is a terminal."""
    choice = os.environ.get(ENV, "").strip().lower()
    if choice in ("live", "plain"):
        return choice == "live"
    return stream.isatty() and os.environ.get("TERM") != "dumb"


def _acc(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) and math.isfinite(value) else "-"


@dataclass
class TrialLine:
    trial_id: str
    method: str
    state: str = "RUNNING"  # RUNNING, TERMINATED or ERROR
    epoch: int = 0  # epochs done
    best: float = math.nan
    phase: int | None = None
    alarm: bool = False
    stop: str = ""
    stage: str = ""  # what runs after the last epoch (the final evaluation), while it runs
    stage_what: str = ""  # its part (PGD-20, each of AutoAttack's attacks): a new one is a line in a log


class Board:
    """A study's trials as the driver sees them; events become lines, or the table is redrawn."""

    def __init__(self, *, name: str, total: int, epochs: int, stream: TextIO | None = None, live: bool | None = None) -> None:
        self.name = name
        self.total = total
        self.epochs = epochs
        self.stream = stream or sys.stderr
        self.live = live_output(self.stream) if live is None else live
        self.trials: dict[str, TrialLine] = {}
        self._drawn = 0  # lines of the last table drawn
        self._last_draw = -math.inf
        self._dirty = False

    # -- events ------------------------------------------------------------------------------
    def restored(self, trial_id: str, method: str, *, row: Mapping[str, Any] | None, state: str, epochs: int) -> None:
        """A trial a resumed study already has (`energyat resume`): counted as it stands, silently,
        so that the counts cover the whole study and not only what this driver runs."""
        row = row or {}
        phase = row.get("phase")
        self.trials[trial_id] = TrialLine(trial_id, method, state=state, epoch=epochs,
                                          best=float(row.get("best_val_robust_acc", math.nan)),
                                          phase=phase if isinstance(phase, int) else None, alarm=bool(row.get("alarm")),
                                          stop="" if state == "RUNNING" else str(row.get("stop_reason") or "completed"))
        self._dirty = True

    def started(self, trial_id: str, method: str) -> None:
        known = self.trials.get(trial_id)  # a restored trial goes on from its checkpoint's epoch
        self.trials[trial_id] = TrialLine(trial_id, method, epoch=known.epoch, best=known.best, phase=known.phase,
                                          alarm=known.alarm) if known else TrialLine(trial_id, method)
        self._event(f"trial {trial_id} ({method}) started")

    def result(self, trial_id: str, row: Mapping[str, Any]) -> None:
        line = self.trials.setdefault(trial_id, TrialLine(trial_id, str(row.get("method", "?"))))
        line.epoch = int(row.get("epoch", line.epoch - 1)) + 1
        line.best = float(row.get("best_val_robust_acc", math.nan))
        phase = row.get("phase")
        if isinstance(phase, int) and phase != line.phase:
            if line.phase is not None:
                self._event(f"trial {trial_id} ({line.method}) entered phase {phase} at epoch {line.epoch - 1}")
            line.phase = phase
        if row.get("alarm") and not line.alarm:
            line.alarm = True
            reason = row.get("alarm_reason")
            self._event(f"trial {trial_id} ({line.method}) energy alarm at epoch {line.epoch - 1}" + (f": {reason}" if reason else ""))
        self._dirty = True

    def staged(self, trial_id: str, stage: Stage) -> None:
        """A running trial's stage after its last epoch (its stage file, read by the driver):
        shown in its row; in a log, a line when a new part of it starts."""
        line = self.trials.get(trial_id)
        if line is None or line.state != "RUNNING":
            return
        text = stage.text()
        if stage.what != line.stage_what:
            self._event(f"trial {trial_id} ({line.method}) {text}")
        line.stage, line.stage_what = text, stage.what
        self._dirty = True

    def finished(self, trial_id: str, row: Mapping[str, Any] | None, *, error: str | None = None) -> None:
        line = self.trials.setdefault(trial_id, TrialLine(trial_id, "?"))
        line.stage = line.stage_what = ""
        row = row or {}
        line.state = "ERROR" if error else "TERMINATED"
        line.stop = error or str(row.get("stop_reason") or "completed")
        if isinstance(row.get("best_val_robust_acc"), (int, float)):
            line.best = float(row["best_val_robust_acc"])
        verb = "failed" if error else "finished"
        self._event(f"trial {trial_id} ({line.method}) {verb}: {line.stop} after {line.epoch}/{self.epochs} epochs, "
                    f"best val robust {_acc(line.best)}")

    def running(self) -> list[str]:
        return [t.trial_id for t in self.trials.values() if t.state == "RUNNING"]

    def tick(self) -> None:
        """Redraw the table when something changed and a redraw is due (live output only)."""
        if self.live and self._dirty and time.monotonic() - self._last_draw >= REDRAW_SECONDS:
            self.draw()

    def close(self) -> None:
        if self.live:
            self.draw()

    # -- output ------------------------------------------------------------------------------
    @property
    def trial_epochs(self) -> int:
        """Epochs done, summed over trials: a trial restarted from its checkpoint counts the
        epochs it trains again once."""
        return sum(t.epoch for t in self.trials.values())

    def counts(self) -> str:
        done = sum(t.state != "RUNNING" for t in self.trials.values())
        running = len(self.trials) - done
        return f"trials {done}/{self.total} done, {running} running, {self.trial_epochs} trial-epochs"

    def _event(self, text: str) -> None:
        if self.live:
            self._dirty = True
            self.tick()
            return
        print(f"[{time.strftime('%H:%M:%S')}] {self.counts()} | {text}", file=self.stream, flush=True)

    def table(self, height: int) -> list[str]:
        """The table's lines, at most `height`: running trials first, then the rest by best accuracy."""
        best = max(self.trials.values(), key=lambda t: t.best if math.isfinite(t.best) else -1.0, default=None)
        lead = f"energyat {self.name}: {self.counts()}"
        if best is not None and math.isfinite(best.best):
            lead += f", best val robust {_acc(best.best)} ({best.trial_id}, {best.method})"
        head = f"{'trial':<10} {'state':<10} {'method':<8} {'epoch':>7} {'best val':>8} {'phase':>5} {'alarm':>5}  stop"
        order = sorted(self.trials.values(), key=lambda t: (t.state != "RUNNING", -(t.best if math.isfinite(t.best) else -1.0), t.trial_id))
        rows = [
            f"{t.trial_id:<10} {t.state:<10} {t.method:<8} {f'{t.epoch}/{self.epochs}':>7} {_acc(t.best):>8} "
            f"{t.phase if t.phase is not None else '-':>5} {'yes' if t.alarm else '-':>5}  {t.stop or t.stage}"
            for t in order
        ]
        room = max(height - 2, 1)
        if len(rows) > room:
            rows = rows[: room - 1] + [f"... {len(rows) - room + 1} more (energyat status DIR lists every trial)"]
        return [lead, head, *rows]

    def draw(self) -> None:
        height = shutil.get_terminal_size((100, 24)).lines - 1
        lines = self.table(height)
        # back to the first line of the previous table, clear to the end, draw anew
        prefix = f"\x1b[{self._drawn}F\x1b[J" if self._drawn else ""
        self.stream.write(prefix + "\n".join(lines) + "\n")
        self.stream.flush()
        self._drawn = len(lines)
        self._last_draw = time.monotonic()
        self._dirty = False


class TrainProgress:
    """`energyat train`'s epoch callback: a progress line redrawn in place on a terminal; elsewhere
    a line at every tenth of the epochs, each phase change, the alarm and the end."""

    def __init__(self, epochs: int, *, stream: TextIO | None = None, live: bool | None = None) -> None:
        self.epochs = epochs
        self.stream = stream or sys.stderr
        self.live = live_output(self.stream) if live is None else live
        self.started = time.monotonic()
        self.first_epoch: int | None = None
        self.phase: int | None = None
        self.alarm = False
        self.clock = StageClock(every=STAGE_LINE_SECONDS)
        self.evaluating_since: float | None = None

    def __call__(self, row: dict[str, Any], _ckpt: Any) -> None:
        epoch = int(row["epoch"])
        if self.first_epoch is None:
            self.first_epoch = epoch  # a continued run starts past 0: its rate counts from here
        done = epoch + 1
        trained = (self.evaluating_since or time.monotonic()) - self.started  # the final evaluation is no epoch's
        rate = trained / max(done - self.first_epoch, 1)
        eta = rate * (self.epochs - done)
        status = (f"epoch {done}/{self.epochs}  loss {row.get('train_loss', math.nan):.3f}  val robust {_acc(row.get('val_robust_acc'))}"
                  f"  best {_acc(row.get('best_val_robust_acc'))}  dE {row.get('probe_train_dE', math.nan):.3f}  phase {row.get('phase')}"
                  f"{'  ALARM' if row.get('alarm') else ''}  {rate:.1f}s/epoch  eta {eta:.0f}s")
        events = []
        if row.get("phase") != self.phase:
            if self.phase is not None:
                events.append(f"phase {row.get('phase')} at epoch {epoch}")
            self.phase = row.get("phase")
        if row.get("alarm") and not self.alarm:
            self.alarm = True
            events.append(f"energy alarm at epoch {epoch}" + (f": {row['alarm_reason']}" if row.get("alarm_reason") else ""))
        if self.live:
            width = shutil.get_terminal_size((100, 24)).columns - 1
            bar_width = 20
            filled = round(bar_width * done / self.epochs)
            for event in events:  # events stay on screen above the bar
                self.stream.write(f"\r\x1b[K{event}\n")
            self.stream.write(f"\r\x1b[K[{'#' * filled}{'.' * (bar_width - filled)}] {status}"[: width + 4])
            if row.get("done"):  # the trial's last epoch (reported with its outcome): keep the line
                self.stream.write("\n")
            self.stream.flush()
            return
        tenth = max(self.epochs // 10, 1)
        if events or done % tenth == 0 or row.get("done") or epoch == self.first_epoch:
            print(status + "".join(f"  | {e}" for e in events), file=self.stream, flush=True)

    def stage(self, what: str, done: int, total: int) -> None:
        """The final evaluation's progress (the engine's `on_stage`): redrawn in place on a
        terminal; elsewhere a line when a new part of it starts and then every STAGE_LINE_SECONDS."""
        stage, due = self.clock(what, done, total)
        if self.evaluating_since is None:
            self.evaluating_since = time.monotonic()
        if self.live:
            width = shutil.get_terminal_size((100, 24)).columns - 1
            self.stream.write(f"\r\x1b[K{stage.text()}"[: width + 4])
            self.stream.flush()
        elif due:
            print(stage.text(), file=self.stream, flush=True)
