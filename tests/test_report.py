"""Figures, the HTML report and `energyat phases` / `energyat report` on a real two-trial study."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import ROOT, TINY, energyat_cmd

from analysis import plots
from analysis.errors import StoreError
from analysis.phases import detect
from analysis.query import open_tables
from analysis.report import write_report
from analysis.trials import columns, phases_table

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A study directory holding two real 3-epoch trials, `t-sat` and `t-trades`, as a study writes them."""
    from trainables.config import parse_trial
    from trainables.engine import run_trial

    root = tmp_path_factory.mktemp("report") / "study"
    for method in ("sat", "trades"):
        run_trial(parse_trial({**TINY, "epochs": 3, "method": method}), out=root, trial_id=f"t-{method}")
    return root


def _rows(root: Path, sql: str) -> dict:
    con = open_tables(root)
    try:
        return columns(con.sql(sql).to_arrow_table())
    finally:
        con.close()


def assert_png(path: Path) -> None:
    # a real figure: the PNG signature, and more bytes than an empty canvas takes
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert len(data) > 5_000, (path, len(data))


def test_phase_figure_writes_a_png(study: Path, tmp_path: Path) -> None:
    epochs = _rows(study, "select * from epochs where trial_id = 't-sat' order by epoch")
    assert_png(plots.phase_figure(epochs, detect(epochs), path=tmp_path / "phases.png"))


def test_energy_histograms_write_a_png(study: Path, tmp_path: Path) -> None:
    samples = _rows(study, "select * from samples where trial_id = 't-sat'")
    assert_png(plots.energy_histograms(samples, epochs=[0, 2], path=tmp_path / "hist.png"))


def test_arrow_plot_writes_a_png(study: Path, tmp_path: Path) -> None:
    samples = _rows(study, "select * from samples where trial_id = 't-trades' and epoch = 2")
    assert_png(plots.arrow_plot(samples, path=tmp_path / "arrows.png"))


def test_study_figures_write_pngs(study: Path, tmp_path: Path) -> None:
    trials, epochs = _rows(study, "select * from trials"), _rows(study, "select * from epochs")
    assert_png(plots.pareto_front(trials, path=tmp_path / "pareto.png"))
    assert_png(plots.delta_energy_vs_robust(epochs, trials, path=tmp_path / "de.png"))
    assert_png(plots.param_importances({"beta": 0.6, "method": 0.3, "weat.power": 0.1}, path=tmp_path / "imp.png"))


def test_figures_without_data_raise_no_data(tmp_path: Path) -> None:
    # the report turns NoData into a note; anything else would be a bug and must surface
    one = {"trial_id": ["a"], "method": ["sat"], "best_val_clean_acc": [0.9], "best_val_robust_acc": [0.5]}
    with pytest.raises(plots.NoData, match="at least 2 trials"):
        plots.pareto_front(one, path=tmp_path / "p.png")
    with pytest.raises(plots.NoData, match="no training-probe samples"):
        plots.energy_histograms({"epoch": [], "split": [], "E": []}, epochs=[0], path=tmp_path / "h.png")
    with pytest.raises(plots.NoData):
        plots.param_importances({}, path=tmp_path / "i.png")
    assert not list(tmp_path.iterdir())


def test_single_trial_report_notes_the_skipped_study_figures(study: Path, tmp_path: Path) -> None:
    # one trial and no `samples` table: every figure but the phase figure becomes a note
    page = write_report(_one_trial(study, tmp_path / "one")).read_text()
    assert "skipped: Pareto front" in page and "skipped: delta energy" in page
    assert "no `samples` rows" in page
    assert page.count("<img") == 1  # the phase figure only


def test_the_phases_a_finished_trial_recorded_are_the_phases_detected_now(study: Path, tmp_path: Path) -> None:
    # `energyat status` reads a TERMINATED trial's phases from its trials row instead of its epochs
    assert phases_table(study, recorded=True) == phases_table(study)
    # and it does read them from there: a trial whose epochs are gone still shows them
    copy = Path(shutil.copytree(study, tmp_path / "study"))
    shutil.rmtree(copy / "tables" / "epochs")
    (copy / "tables" / "epochs").mkdir()
    assert phases_table(copy, recorded=True) == phases_table(study)
    row = copy / "tables" / "trials" / "trial=t-sat.parquet"
    table = pq.read_table(row)
    for name, value in (("phase2_start", 1), ("phase3_start", 2), ("alarm_epoch", 2)):
        table = table.set_column(table.column_names.index(name), name, pa.array([value], table.schema.field(name).type))
    pq.write_table(table, row)
    shown = {r["trial_id"]: r for r in phases_table(copy, recorded=True)}["t-sat"]
    assert (shown["phase2_start"], shown["phase3_start"], shown["alarm_epoch"], shown["epochs"]) == (1, 2, 2, 3)


def test_phases_table_names_known_ids_for_an_unknown_trial(study: Path) -> None:
    assert [r["trial_id"] for r in phases_table(study)] == ["t-sat", "t-trades"]
    with pytest.raises(StoreError, match="known trial ids: t-sat, t-trades"):
        phases_table(study, "nope")


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*energyat_cmd(), *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_report_cli_writes_index_with_existing_images(study: Path) -> None:
    proc = run_cli("report", str(study))
    assert proc.returncode == 0, proc.stderr
    index = Path(proc.stdout.strip().splitlines()[-1])
    assert index == study / "report" / "index.html"
    sources = re.findall(r'<img src="([^"]+)"', index.read_text())
    assert len(sources) >= 3
    for src in sources:
        assert_png(index.parent / src)  # relative paths, next to the page


def test_report_draws_each_trials_figures_for_the_best_top_trials_only(study: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(study, tmp_path / "study"))
    proc = run_cli("report", str(copy), "--top", "1")
    assert proc.returncode == 0, proc.stderr
    page = (copy / "report" / "index.html").read_text()
    best = max(phases_table(copy), key=lambda r: r["best_val_robust_acc"])["trial_id"]
    other = ({"t-sat", "t-trades"} - {best}).pop()
    assert f"{best}-phases.png" in page and f"{other}-phases.png" not in page
    assert "the best 1 of 2 trials" in page and f"<td>{other}</td>" in page  # still in the table
    assert run_cli("report", str(copy), "--top", "-1").returncode == 2


def _one_trial(study: Path, dest: Path) -> Path:
    """`study`'s trial t-sat alone, without `samples`: every figure but its phase figure has no data."""
    shutil.copytree(study / "tables" / "epochs" / "trial=t-sat", dest / "tables" / "epochs" / "trial=t-sat")
    (dest / "tables" / "trials").mkdir(parents=True)
    shutil.copy(study / "tables" / "trials" / "trial=t-sat.parquet", dest / "tables" / "trials")
    return dest


def test_figures_drawn_in_parallel_are_the_figures_drawn_in_one_process(study: Path, tmp_path: Path) -> None:
    # the page in its order and every PNG byte for byte, whatever the number of drawing processes;
    # a figure without data is the same note in both (NoData crosses the process boundary)
    for layout in ("study", "one trial"):
        pages = {}
        for jobs in (1, 2):
            dest = tmp_path / layout / str(jobs)
            copy = Path(shutil.copytree(study, dest)) if layout == "study" else _one_trial(study, dest)
            write_report(copy, jobs=jobs)
            pages[jobs] = {p.name: p.read_bytes().replace(str(copy.resolve()).encode(), b"DIR") for p in (copy / "report").iterdir()}
        assert pages[1] == pages[2], layout
        figures = len([n for n in pages[1] if n.endswith(".png")])
        assert figures == (8 if layout == "study" else 1), (layout, sorted(pages[1]))  # 3 per trial and 2 of the study, or the phases
        if layout == "one trial":
            assert b"skipped: Pareto front" in pages[2]["index.html"] and b"skipped: delta energy" in pages[2]["index.html"]
    assert run_cli("report", str(study), "--jobs", "0").returncode == 2


def test_phases_cli_prints_one_row_per_trial(study: Path) -> None:
    proc = run_cli("phases", str(study), "--format", "csv")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith('"trial_id","method","epochs","phase2_start","phase3_start","alarm_epoch"')
    assert sorted(line.split(",")[0] for line in lines[1:]) == ['"t-sat"', '"t-trades"']


def test_phases_cli_unknown_trial_exits_2_with_one_line(study: Path) -> None:
    proc = run_cli("phases", str(study), "--trial", "nope")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "known trial ids: t-sat, t-trades" in proc.stderr
    assert proc.stdout == ""


def test_importances_need_a_journal_and_two_finished_trials(tmp_path: Path) -> None:
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    from study.importances import study_importances

    importances, note = study_importances(tmp_path)
    assert importances is None and note is not None and "no optuna.journal" in note
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = JournalStorage(JournalFileBackend(str(tmp_path / "optuna.journal")))
    study = optuna.create_study(storage=storage, study_name="s", direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))

    def objective(trial: optuna.Trial) -> float:
        return trial.suggest_float("beta", 1.0, 12.0) + (1.0 if trial.suggest_categorical("method", ["sat", "trades"]) == "trades" else 0.0)

    study.optimize(objective, n_trials=1)
    importances, note = study_importances(tmp_path)
    assert importances is None and note is not None and "1 finished trial" in note
    study.optimize(objective, n_trials=5)
    importances, note = study_importances(tmp_path)
    assert importances is not None and set(importances) == {"beta", "method"} and note is None


@pytest.mark.parametrize("command", [["query", "select count(*) from epochs"], ["phases"], ["compact"]])
def test_a_command_that_reads_tables_imports_neither_ray_nor_matplotlib_nor_torch(study: Path, command: list[str], tmp_path: Path) -> None:
    # `status`, `query` and `phases` start in the time their imports take: Ray, matplotlib (and
    # scipy through the report) and torch are seconds each, and none of them reads a table. Nor
    # does pandas (0.3 s) for `query`, whose rows go from DuckDB to the screen; pyarrow loads it at
    # its first conversion or cast, which `phases` (columns to numpy) and `compact` make
    heavy = ("ray", "matplotlib", "torch", "scipy", *(("pandas",) if command[0] == "query" else ()))
    code = ("import sys; from study.cli import main; code = main([sys.argv[1], sys.argv[2], *sys.argv[4:]]); "
            "print(sorted(m for m in sys.argv[3].split(',') if m in sys.modules)); sys.exit(code)")
    if command[0] == "compact":  # it rewrites the files: of a copy, the other tests read the module's study
        study = Path(shutil.copytree(study, tmp_path / "study"))
    proc = subprocess.run([sys.executable, "-c", code, command[0], str(study), ",".join(heavy), *command[1:]],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout
