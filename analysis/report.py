"""A study's report: ``DIR/report/index.html`` with its PNG figures beside it.

Works on a study directory and on one ``energyat train`` output alike (both have ``tables/``),
also while trials are still running. The page holds, in order: the trials table (best validation
robust accuracy first), the test-set evaluations (`evals`: every trial's final evaluation and every
`energyat eval`), the study figures (Pareto front, delta energy against robustness,
hyperparameter importances when the caller gives them) and, per trial (best first), the phase
figure, energy histograms at the first, middle and last epochs with samples, and the arrow plot
of the last such epoch. A figure with nothing to draw is replaced by a note saying why.

The HTML is self-contained apart from its images, which it names by relative paths: the
``report/`` folder can be copied or served as it is.
"""

from __future__ import annotations

import html
import json
import multiprocessing
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import closing
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import duckdb
import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from analysis import plots, seeds
from analysis.errors import EnergyatError, StoreError, one_line
from analysis.query import open_tables
from analysis.store import filesystem, is_uri, join
from analysis.trials import epochs_by_trial, fetch, int_or_none, missing, online_alarm_epoch, phases_of, rows_of, trial_rows

# the trials table's columns, in this order (config columns weat_* are added after `beta`)
_TABLE_HEAD = ("trial_id", "status", "stop_reason", "method", "beta")
_TABLE_TAIL = (
    "epochs_run", "best_epoch", "best_val_robust_acc", "best_val_clean_acc", "final_clean_acc", "final_pgd_acc",
    "final_autoattack_acc", "phase2_start", "phase3_start", "alarm_epoch",
)


def _best_first(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    def key(r: dict[str, Any]) -> tuple[bool, float, str]:
        acc = r.get("best_val_robust_acc")
        absent = missing(acc)
        return (absent, 0.0 if absent else -float(cast(float, acc)), str(r["trial_id"]))

    return sorted(rows, key=key)


# -- HTML ----------------------------------------------------------------------------------------
def _cell(value: Any) -> str:
    if missing(value):
        return "&ndash;"
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def _safe_name(index: int, trial_id: str) -> str:
    """A file-name stem for a trial: its rank plus its id with odd characters replaced."""
    return f"{index:03d}-{re.sub(r'[^A-Za-z0-9_.-]', '_', trial_id)[:60]}"


class _Page:
    """The page's body, in order; its figures are drawn by `jobs` processes while the page is built.

    A report of many trials is mostly matplotlib (each trial's three figures), and each figure is
    independent of the others, so they are drawn in parallel; the page is assembled in its own order
    once every figure is back, and a figure without data becomes a note saying why.
    """

    def __init__(self, folder: Path, *, jobs: int) -> None:
        self.folder = folder
        self.parts: list[str | tuple[str, Future[Path]]] = []
        self._pool: ProcessPoolExecutor | None = None
        if jobs > 1:
            # forkserver: workers are forked from a fresh server that has imported matplotlib once,
            # not from this process, whose DuckDB threads a fork could catch holding a lock
            methods = multiprocessing.get_all_start_methods()
            context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
            if "forkserver" in methods:
                context.set_forkserver_preload(["analysis.plots"])
            self._pool = ProcessPoolExecutor(max_workers=jobs, mp_context=context)

    def add(self, text: str) -> None:
        self.parts.append(text)

    def figure(self, name: str, caption: str, draw: Callable[..., Path], /, *args: Any, **kwargs: Any) -> None:
        """`draw(*args, path=folder/name, **kwargs)`, in a worker when there are several."""
        path = self.folder / name
        if self._pool is not None:
            future = self._pool.submit(draw, *args, path=path, **kwargs)
        else:
            future = Future()
            try:
                future.set_result(draw(*args, path=path, **kwargs))
            except plots.NoData as exc:
                future.set_exception(exc)
        self.parts.append((caption, future))

    def html(self) -> str:
        """The body, every figure drawn (a drawing's error other than NoData is raised here)."""
        out = []
        for part in self.parts:
            if isinstance(part, str):
                out.append(part)
                continue
            caption, future = part
            try:
                path = future.result()
            except plots.NoData as exc:
                out.append(f'<p class="note">skipped: {html.escape(str(exc))}</p>')  # the message names the figure
                continue
            out.append(f'<figure><img src="{html.escape(path.name, quote=True)}" alt="{html.escape(caption, quote=True)}">'
                       f"<figcaption>{html.escape(caption)}</figcaption></figure>")
        return "\n".join(out)

    def __enter__(self) -> _Page:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:  # on an error, the figures not yet drawn are dropped
            self._pool.shutdown(cancel_futures=True)


def default_jobs() -> int:
    """Processes that draw a report's figures: the CPUs this process may use, at most 8."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(usable, 8))


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1200px; }
table { border-collapse: collapse; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: right; }
th { background: #f0f0f0; } td:first-child, td:nth-child(2), td:nth-child(3), td:nth-child(4) { text-align: left; }
figure { margin: 1em 0; } img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.85em; color: #555; } .note { color: #8a6d3b; font-style: italic; }
"""


def _trials_table(rows: Sequence[dict[str, Any]]) -> str:
    uses_weat = any(r.get("method") == "weat" for r in rows)  # weat_* are noise for the other methods
    weat = sorted({k for r in rows for k in r if k.startswith("weat_")}) if uses_weat else []
    head = [*_TABLE_HEAD, *weat, *_TABLE_TAIL]
    lines = ["<table>", "<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>"]
    for r in rows:
        tid = str(r["trial_id"])
        cells = [f'<td><a href="#trial-{html.escape(tid, quote=True)}">{html.escape(tid)}</a></td>']
        cells += [f"<td>{_cell(r.get(c))}</td>" for c in head[1:]]
        lines.append("<tr>" + "".join(cells) + "</tr>")
    lines.append("</table>")
    return "\n".join(lines)


_SEED_METRICS = ("best_val_robust_acc", *seeds.FINAL_METRICS)


def _seeds(page: _Page, trials: Sequence[dict[str, Any]]) -> None:
    """Arms run under several seeds: mean and 95% t interval over seeds (analysis.seeds)."""
    finished = [r for r in trials if r.get("status") == "TERMINATED"]
    try:
        rows = seeds.summarize(finished, metrics=_SEED_METRICS)
    except EnergyatError as exc:  # two trials of one arm with one seed: no summary, and why
        page.add(f'<p class="note">arms over seeds: skipped, {html.escape(str(exc))}</p>')
        return
    if not any(len(r["seeds"]) > 1 for r in rows):
        return
    lines = ["<h2>Arms over seeds</h2>",
             "<p>Each arm (a configuration but for its seed): mean over its finished seeds and, in brackets, the 95% "
             "Student t interval. The validation column selected; the final_* columns are the test set's.</p>", "<table>",
             "<tr><th>arm</th><th>seeds</th>" + "".join(f"<th>{html.escape(m)}</th>" for m in _SEED_METRICS) + "</tr>"]
    for r in rows:
        cells = "".join(f"<td>{html.escape(str(r[m]))}</td>" for m in _SEED_METRICS)
        # the page reads every number column as float64 (columns): seed 1.0 is shown as 1
        shown = ", ".join(str(int_or_none(s)) if not missing(s) and float(s).is_integer() else str(s) for s in r["seeds"])
        lines.append(f"<tr><td>{html.escape(r['arm'])}</td><td>{html.escape(shown)}</td>{cells}</tr>")
    lines.append("</table>")
    page.add("\n".join(lines))


_EVAL_COLUMNS = ("trial_id", "source", "model", "attack", "steps", "norm", "eps", "n", "accuracy", "evaluated_by", "evaluated_at")


def _evals(page: _Page, con: duckdb.DuckDBPyConnection) -> None:
    """The `evals` rows, newest first: test-set accuracy in fp32 (docs/evaluation.md)."""
    page.add("<h2>Test-set evaluations</h2>")
    rows = rows_of(fetch(con, f"select {', '.join(_EVAL_COLUMNS)} from evals order by evaluated_at desc, trial_id, attack"))
    if not rows:
        page.add('<p class="note">no evaluations yet: each trial writes its final evaluation; `energyat eval DIR --trial ID` adds more</p>')
        return
    lines = ["<table>", "<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in _EVAL_COLUMNS) + "</tr>"]
    for r in rows:
        lines.append("<tr>" + "".join(f"<td>{_cell(r.get(c))}</td>" for c in _EVAL_COLUMNS) + "</tr>")
    lines.append("</table>")
    page.add("\n".join(lines))


def _sample_epochs(con: duckdb.DuckDBPyConnection, trial_id: str) -> list[int]:
    cols = fetch(con, "select distinct epoch from samples where trial_id = $id and split = 'train' order by epoch", id=trial_id)
    return [int(e) for e in cols.get("epoch", [])]


def _first_middle_last(values: Sequence[int]) -> list[int]:
    if not values:
        return []
    return list(dict.fromkeys([values[0], values[len(values) // 2], values[-1]]))


def _copied(src: Path, *, path: Path) -> Path:
    """`src` copied to `path` (a figure the page takes as it is)."""
    return Path(shutil.copyfile(src, path))


def _generation(page: _Page, local: Path | None, methods: Mapping[str, str]) -> None:
    """The landscape violins (`energyat landscape`) and the sample grids (`energyat sample`), by method."""
    page.add("<h2>Generation and energy landscape</h2>")
    if local is None:
        page.add('<p class="note">`energyat sample` and `energyat landscape` work on a local copy of the study</p>')
        return
    landscape = local / "landscape" / "landscape.parquet"
    if landscape.is_file():
        rows = pq.read_table(landscape)
        page.figure("landscape.png", "per-sample energy shifts of the test probe under each attack, by trial (energyat landscape)",
                    plots.landscape_violins, rows)
    else:
        page.add(f'<p class="note">energy landscape: none yet; `energyat landscape {html.escape(str(local))}` draws it</p>')
    grids = []
    for png in sorted((local / "samples").glob("*.png")):
        record = _sample_record(png.with_suffix(".npz"))
        trial = str(record.get("trial_id", png.stem.rsplit("-", 1)[0]))
        grids.append((methods.get(trial, str(record.get("method", "?"))), trial, png, record))
    if not grids:
        page.add(f'<p class="note">samples: none yet; `energyat sample {html.escape(str(local))} --trial ID` draws them</p>')
    for method, trial, png, record in sorted(grids, key=lambda g: (g[0], g[1], g[2].name)):
        scores = record.get("scores", {})
        judged = f", judge acc {scores['judge_acc']:.2f}, judge FD {scores['judge_fd']:.1f}" if "judge_acc" in scores else ""
        caption = f"{method}: samples of trial {trial}, {record.get('init', '?')} start{judged}"
        page.figure(f"samples-{png.name}", caption, _copied, png)


def _sample_record(npz: Path) -> dict[str, Any]:
    """The JSON record `energyat sample` stores beside its grid ({} when the npz is gone)."""
    if not npz.is_file():
        return {}
    with np.load(npz) as archive:
        return json.loads(str(archive["record"])) if "record" in archive else {}


# Trials whose own figures a report draws by default: three figures each, so a study of 1,000
# trials would be 3,000 figures (and as many minutes of matplotlib) in one page.
TOP_TRIALS = 24


def write_report(
    directory: str | os.PathLike[str],
    *,
    importances: Mapping[str, float] | None = None,
    importances_note: str | None = None,
    top: int | None = TOP_TRIALS,
    jobs: int | None = None,
) -> Path | str:
    """Write ``directory/report/index.html`` and its PNG figures; returns the HTML's path.

    Args:
        directory: a study directory or an ``energyat train --out`` directory; or a URI
            (s3://...), for which the report is drawn in a temporary folder, uploaded to
            ``<URI>/report/`` (figures first, the page last) and its URI returned.
        importances: hyperparameter importances (name -> importance) to draw, computed by the
            caller (``study/`` uses Optuna; analysis does not import it).
        importances_note: shown instead of the importances figure when they could not be
            computed (for example, too few finished trials).
        top: draw each trial's own figures (phases, histograms, arrows) for the best `top`
            trials by validation robust accuracy (None: every trial); the table lists them all.
        jobs: processes drawing the figures (None: :func:`default_jobs`; 1: this process alone).
            The figures are the same whatever the number.

    Raises:
        StoreError: `directory` holds no energyat tables.

    Example::

        index = write_report("studies/quickstart")   # studies/quickstart/report/index.html
    """
    if jobs is not None and jobs < 1:
        raise EnergyatError(f"report: jobs must be at least 1, got {jobs}")
    jobs = default_jobs() if jobs is None else jobs
    if not is_uri(directory):
        root = Path(directory).expanduser()
        folder = root / "report"
        return _render(open_tables(root), folder, shown=str(root.resolve()), name=root.name,
                       importances=importances, importances_note=importances_note, local=root, top=top, jobs=jobs)
    con = open_tables(directory)
    fs, path = filesystem(directory)
    url = urlsplit(str(directory))
    shown = f"{url.scheme}://{path}"  # no query, no user info: nothing that could hold a secret
    with tempfile.TemporaryDirectory(prefix="energyat-report-") as tmp:
        index = _render(con, Path(tmp), shown=shown, name=path.rsplit("/", 1)[-1],
                        importances=importances, importances_note=importances_note, local=None, top=top, jobs=jobs)
        try:
            for item in sorted(Path(tmp).iterdir(), key=lambda p: p == index):  # the page last
                pafs.copy_files(str(item), f"{path}/report/{item.name}",
                                source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        except OSError as exc:
            raise StoreError(f"cannot upload the report to {join(directory, 'report')}: {one_line(exc)}") from exc
    return join(directory, "report", "index.html")


def _render(
    con: duckdb.DuckDBPyConnection,
    folder: Path,
    *,
    shown: str,
    name: str,
    importances: Mapping[str, float] | None,
    importances_note: str | None,
    local: Path | None,
    top: int | None,
    jobs: int,
) -> Path:
    """Draw the report of the tables behind `con` into `folder`; returns index.html's path.
    `local`: the directory itself when it is local (its samples/ and landscape/ are shown)."""
    folder.mkdir(parents=True, exist_ok=True)
    with closing(con), _Page(folder, jobs=jobs) as page:
        trials = trial_rows(con)
        epochs_of_trial = epochs_by_trial(con, [str(r["trial_id"]) for r in trials])
        phases_by_trial = {t: phases_of(e) for t, e in epochs_of_trial.items()}
        for r in trials:  # the table shows the phases the figures show: this detector's, now
            e, p = epochs_of_trial[str(r["trial_id"])], phases_by_trial[str(r["trial_id"])]
            r.update(phase2_start=p.phase2_start, phase3_start=p.phase3_start, alarm_epoch=online_alarm_epoch(e, p))
        trials = _best_first(trials)
        study = next((str(r["study"]) for r in trials if not missing(r.get("study"))), name)

        page.add(f"<h1>energyat report: {html.escape(study)}</h1>")
        page.add(f"<p>{len(trials)} trial(s) in <code>{html.escape(shown)}</code>, best validation robust accuracy first "
                 "(the validation split selects; the test set only reports).</p>")
        if not trials:
            page.add('<p class="note">no trials yet: nothing to show.</p>')
        else:
            page.add(_trials_table(trials))
            _seeds(page, trials)
        _evals(page, con)

        page.add("<h2>Study</h2>")
        trial_cols = fetch(con, "select * from trials")
        all_epochs = fetch(con, "select trial_id, epoch, probe_train_dE from epochs")
        page.figure("study-pareto.png", "clean vs robust accuracy (Pareto front)", plots.pareto_front, trial_cols)
        page.figure("study-delta-energy.png", "final delta energy vs best robust accuracy",
                    plots.delta_energy_vs_robust, all_epochs, trial_cols)
        if importances:
            page.figure("study-importances.png", "hyperparameter importances", plots.param_importances, importances)
        else:
            why = importances_note or "no Optuna study to compute them from (not given)"
            page.add(f'<p class="note">hyperparameter importances: skipped, {html.escape(why)}</p>')

        _generation(page, local, {str(r["trial_id"]): str(r.get("method")) for r in trials})

        shown_trials = trials if top is None else trials[:top]
        if len(shown_trials) < len(trials):
            page.add(f'<p class="note">each trial\'s figures: the best {len(shown_trials)} of {len(trials)} trials by validation robust '
                     "accuracy (`energyat report DIR --top N`, 0 for every trial); the table above lists them all.</p>")
        for rank, r in enumerate(shown_trials):
            tid = str(r["trial_id"])
            stem = _safe_name(rank, tid)
            page.add(f'<h2 id="trial-{html.escape(tid, quote=True)}">trial {html.escape(tid)} ({html.escape(str(r.get("method")))})</h2>')
            epochs, phases = epochs_of_trial[tid], phases_by_trial[tid]
            page.figure(f"{stem}-phases.png", f"phases of trial {tid}", plots.phase_figure, epochs, phases)
            with_samples = _sample_epochs(con, tid)
            if not with_samples:
                page.add(f'<p class="note">energy histograms and arrow plot of trial {html.escape(tid)}: skipped, no `samples` rows</p>')
                continue
            chosen = _first_middle_last(with_samples)
            samples = fetch(
                con,
                "select * from samples where trial_id = $id and split = 'train' and list_contains($ep, epoch) order by epoch, index",
                id=tid, ep=chosen,
            )
            page.figure(f"{stem}-histograms.png", f"per-sample energies of trial {tid} at epochs {', '.join(map(str, chosen))}",
                        plots.energy_histograms, samples, epochs=chosen)
            last = chosen[-1]
            at_last = {k: v[samples["epoch"] == last] for k, v in samples.items()}
            page.figure(f"{stem}-arrows.png", f"natural to adversarial energies of trial {tid} at epoch {last}",
                        plots.arrow_plot, at_last)
        body = ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
                f"<title>energyat report: {html.escape(study)}</title><style>{_CSS}</style></head><body>\n"
                + page.html() + "\n</body></html>\n")
    index = folder / "index.html"
    tmp = index.with_name(".index.html.tmp")
    tmp.write_text(body, encoding="utf-8")
    tmp.replace(index)  # atomic: a reader sees the old page or the new one
    return index

