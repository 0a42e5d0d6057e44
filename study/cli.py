"""The `energyat` command line.

Every command: ``--help``; exit 0 on success; on bad input (an :class:`EnergyatError`) one
line on stderr and exit 2, before anything is written. Other exceptions are bugs and keep
their traceback.

Each command imports what it needs inside its function: torch, Ray and Optuna take seconds to
import, and `query`, `status` or `--help` need none of them.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from analysis.errors import EnergyatError
from analysis.phases import STOP_PATIENCE

if TYPE_CHECKING:
    from study.recovery import Interrupted


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line and exit 2 like every other bad input."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"energyat: {message} (see `{self.prog} --help`)\n")
        raise SystemExit(2)


def cmd_train(args: argparse.Namespace) -> int:
    from analysis.stopping import stop_rule_from_flags
    from analysis.store import is_uri
    from study.spec import load_spec
    from trainables.engine import run_trial

    if is_uri(args.out):
        raise EnergyatError(
            f"--out {args.out}: `energyat train` keeps checkpoints and spec.yaml beside its tables, "
            "give a local directory (a study takes a URI: `energyat run SPEC --storage URI`)"
        )
    cfg = load_spec(args.spec, args.set).trial
    out = Path(args.out)
    from study.live import TrainProgress

    progress = TrainProgress(cfg.epochs)
    result = run_trial(
        cfg,
        out=out,
        trial_id=args.trial_id,
        on_epoch=progress,
        stop=stop_rule_from_flags(stop_on_alarm=args.stop_on_alarm, stop_patience=args.stop_patience),
        spec_file=out / "spec.yaml",
        on_stage=progress.stage,
    )
    from analysis.compaction import compact

    compact(str(out), trials=[args.trial_id])  # its per-epoch files as one part per table
    print(
        f"{result['status']} ({result['stop_reason']}): {result['epochs_run']} epochs, best validation robust acc "
        f"{result['best_val_robust_acc']:.4f} at epoch {result['best_epoch']}; its test accuracy: clean {result['final_clean_acc']:.4f}, "
        f"PGD {result['final_pgd_acc']:.4f}, AutoAttack {result['final_autoattack_acc']:.4f}"
    )
    print(f"tables: {out / 'tables'}  (try: energyat query {out} \"select * from evals\")")
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    from analysis.query import run_query

    table = run_query(args.directory, args.sql, trial=args.trial)
    _write_table(table, args.format)
    return 0


def _write_table(table: Any, fmt: str) -> None:
    """A pyarrow table on stdout as `table`, `csv` or `json` (the --format of query and phases)."""
    if fmt == "csv":
        import json

        import pyarrow as pa
        import pyarrow.csv as pacsv

        # CSV has no lists or structs: such a column is written as JSON text, one cell each
        for i, field in enumerate(table.schema):
            if pa.types.is_nested(field.type):
                text = pa.array([None if v is None else json.dumps(v, default=str) for v in table.column(i).to_pylist()], pa.string())
                table = table.set_column(i, field.name, text)
        pacsv.write_csv(table, sys.stdout.buffer)
    elif fmt == "json":
        import json

        print(json.dumps(table.to_pylist(), default=str))
    else:
        _print_table(table)


def cmd_compact(args: argparse.Namespace) -> int:
    from analysis.compaction import compact_study

    print(compact_study(args.directory))
    return 0


def cmd_phases(args: argparse.Namespace) -> int:
    import pyarrow as pa

    from analysis.trials import phases_table

    rows = phases_table(args.directory, args.trial)
    _write_table(pa.Table.from_pylist(rows), args.format)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from analysis.report import write_report
    from study.importances import study_importances

    if args.top is not None and args.top < 0:
        raise EnergyatError(f"--top {args.top}: give how many trials get their own figures (0 for every trial)")
    if args.jobs is not None and args.jobs < 1:
        raise EnergyatError(f"--jobs {args.jobs}: give how many processes draw the figures (1: this one alone)")
    importances, note = study_importances(args.directory)
    top = {} if args.top is None else {"top": args.top or None}  # else the report's default, TOP_TRIALS
    index = write_report(args.directory, importances=importances, importances_note=note, jobs=args.jobs, **top)
    if note is not None:  # after the report: a directory without tables gets its one error line alone
        print(f"importances: {note}", file=sys.stderr)
    print(index)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from study.spec import load_spec

    study = load_spec(args.spec, args.set)
    from study.runner import run_study  # imports ray: only once the spec is valid

    port = _dashboard(args)
    return _finish(lambda: run_study(study, address=args.address, storage=args.storage, name=args.name, dashboard_port=port))


DASHBOARD_PORT = 8265  # Ray's own default


def _dashboard(args: argparse.Namespace) -> int | None:
    """The Ray dashboard's port when `--dashboard` asked for one, else None."""
    if args.dashboard_port is not None and not args.dashboard:
        raise EnergyatError("--dashboard-port only applies with --dashboard; add --dashboard")
    return (args.dashboard_port or DASHBOARD_PORT) if args.dashboard else None


def _dashboard_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dashboard",
        action="store_true",
        help=f"serve Ray's dashboard of the local Ray on 127.0.0.1 (port {DASHBOARD_PORT}) while the study runs; needs energyat[dashboard]",
    )
    parser.add_argument("--dashboard-port", type=int, default=None, metavar="PORT", help=f"its port (default {DASHBOARD_PORT})")


def cmd_resume(args: argparse.Namespace) -> int:
    from study.spec import load_study

    load_study(args.directory)  # a clear error before Ray starts
    from study.runner import resume_study  # imports ray

    port = _dashboard(args)
    return _finish(lambda: resume_study(args.directory, address=args.address, retry_errored=args.retry_errored, dashboard_port=port))


# The exit status of a study with failed trials: not 2, which means bad input and nothing done.
TRIALS_FAILED = 1


def _finish(fit: Callable[[], tuple[str, Sequence[Any]]]) -> int:
    """A study's run or resume, then its status; with failed trials, one line naming them on
    stderr and exit 1; stopped by SIGINT, one line naming `energyat resume` and exit 130."""
    from study.recovery import Interrupted

    try:
        study_dir, failed = fit()
    except Interrupted as stopped:
        return _interrupted(stopped)
    print(_status_text(study_dir))
    print(f"study: {study_dir}  (energyat status|query|phases|report {study_dir})")
    if not failed:
        return 0
    named = "; ".join(f"{f.trial_id} ({f.reason})" for f in failed)
    sys.stderr.write(f"energyat: {len(failed)} trial{'s' if len(failed) > 1 else ''} failed: {named}; "
                     f"`energyat resume {study_dir} --retry-errored` runs {'them' if len(failed) > 1 else 'it'} again from epoch 0\n")
    return TRIALS_FAILED


# The exit status of a study stopped by SIGINT (Ctrl-C) before it finished: the shell's 128 + SIGINT, so
# that a script or make rule does not go on as if the study had finished.
INTERRUPTED = 130


def _interrupted(stopped: Interrupted) -> int:
    """The status of the study as the interruption left it, then one line naming `energyat resume`."""
    print(_status_text(stopped.study_dir))
    sys.stderr.write(f"energyat: {stopped}\n")
    return INTERRUPTED


def _status_text(study_dir: str) -> str:
    import pyarrow as pa

    from analysis.query import open_tables
    from analysis.trials import phases_rows

    con = open_tables(study_dir, views=("trials", "epochs"))  # one open for the counts and the phases
    lines = []
    states = con.execute("select status, count(*) from trials group by 1 order by 1").fetchall()
    lines.append("trials: " + (", ".join(f"{n} {s}" for s, n in states) or "none yet"))
    best = con.execute(
        "select trial_id, method, best_val_robust_acc, best_epoch from trials "
        "where best_val_robust_acc = best_val_robust_acc order by best_val_robust_acc desc limit 1"
    ).fetchall()
    if best:
        t, m, acc, ep = best[0]
        lines.append(f"best so far: {t} ({m}) validation robust acc {acc:.4f} at epoch {ep}")
    reasons = {t: (s, r, e) for t, s, r, e in con.execute("select trial_id, status, stop_reason, epochs_run from trials").fetchall()}
    try:
        rows = phases_rows(con, recorded=True)  # a finished trial's phases as its row recorded them
    finally:
        con.close()
    for row in rows:
        status, reason, epochs_run = reasons.get(row["trial_id"], ("?", None, None))
        row.update(status=status, stop_reason=reason, epochs_run=epochs_run)
    if rows:
        keep = ["trial_id", "method", "status", "stop_reason", "epochs_run", "best_val_robust_acc", "phase2_start", "phase3_start", "alarm_epoch"]
        lines.append(_table_text(pa.Table.from_pylist([{k: r.get(k) for k in keep} for r in rows])))
    from study.journal import journal_copy, optuna_trial_states

    with journal_copy(study_dir) as journal:  # a study on object storage: its uploaded copy
        if journal is not None:
            lines.append("optuna: " + ", ".join(f"{n} {s}" for s, n in sorted(optuna_trial_states(journal).items())))
    return "\n".join(lines)


def _classes(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise EnergyatError(f"--classes expects class indices separated by commas (e.g. 0,3,7), got {text!r}") from None


def _subjects(args: argparse.Namespace, *, n: int | None, eval_steps: int) -> tuple[str, list[Any]]:
    """(where results go, the models asked for): `--trial` (repeatable; in DIR), `--checkpoint FILE
    --model ARCH`, or `--robustbench NAME[,NAME...]`; exactly one kind per command. `eval_steps`:
    the PGD steps of a model from outside (`--pgd-steps` or the command's default)."""
    from analysis.store import is_uri
    from trainables.config import parse_number
    from trainables.subjects import checkpoint_subject, outside_config, robustbench_subject, trial_ids, trial_subject

    kinds = [k for k, v in (("--trial", args.trial), ("--checkpoint", args.checkpoint), ("--robustbench", args.robustbench)) if v]
    if len(kinds) > 1:
        raise EnergyatError(f"give one of --trial, --checkpoint, --robustbench, not {' and '.join(kinds)}")
    kind = kinds[0] if kinds else "--trial"
    given = {flag for flag, value in _OUTSIDE_FLAGS.items() if getattr(args, value) not in (None, False)}
    misplaced = sorted(given - _APPLIES[kind])
    if misplaced:
        raise EnergyatError(f"{', '.join(misplaced)} {'does' if len(misplaced) == 1 else 'do'} not apply to {kind}: {_WHY[kind]}")
    if args.last and kind != "--trial":
        raise EnergyatError(f"--last applies to --trial (a trial's last epoch); {kind} names one set of weights")
    if args.checkpoint is not None and args.model is None:
        raise EnergyatError("--checkpoint needs --model ARCH (the architecture the state dict is for)")
    if kind == "--trial":  # energyat's own trials, in DIR: their own dataset, model and threat model
        if args.directory is None:
            raise EnergyatError("give a study or `energyat train --out` directory (with --trial), or --checkpoint / --robustbench")
        found = args.trial or (trial_ids(args.directory) if args.command == "landscape" else [])
        if not found:
            raise EnergyatError(
                f"{args.directory} has no trial with a best checkpoint yet" if args.command == "landscape" else "give --trial ID (or best)"
            )
        return args.directory, [trial_subject(args.directory, t, last=args.last) for t in found]
    out = args.directory or "."
    if is_uri(out):
        raise EnergyatError(f"{out}: results of models from outside are written to a local directory")
    eps = None if args.eps is None else parse_number("--eps", args.eps)
    norm = {"Linf": "linf", "L2": "l2"}[args.threat or "Linf"]
    study = Path(out).expanduser().resolve().name
    common = dict(dataset=args.dataset or "cifar10", root=args.data_root or "~/data", download=args.download, norm=norm, eps=eps, n=n,
                  eval_steps=eval_steps, batch_size=128)
    if args.checkpoint is not None:
        cfg = outside_config(**common, model=args.model, width=args.width or 1)  # type: ignore[arg-type]
        return out, [checkpoint_subject(args.checkpoint, architecture=args.model, cfg=cfg, name=args.name, study=study, normalize=args.normalize)]
    cfg = outside_config(**common)  # type: ignore[arg-type]
    names = [n.strip() for n in args.robustbench.split(",") if n.strip()]
    return out, [robustbench_subject(name, cfg=cfg, models_dir=args.models_dir or "./models", study=study) for name in names]


# The flags that describe a model from outside (flag -> argparse dest), and which source each
# applies to: a trial brings its own dataset, architecture, threat model and name, so they would
# do nothing there, and a flag that does nothing is refused rather than ignored.
_OUTSIDE_FLAGS = {
    "--model": "model", "--width": "width", "--name": "name", "--normalize": "normalize", "--models-dir": "models_dir",
    "--dataset": "dataset", "--data-root": "data_root", "--download": "download", "--threat": "threat", "--eps": "eps",
}
_COMMON = {"--dataset", "--data-root", "--download", "--threat", "--eps"}
_APPLIES = {
    "--trial": set(),
    "--checkpoint": _COMMON | {"--model", "--width", "--name", "--normalize"},
    "--robustbench": _COMMON | {"--models-dir"},
}
_WHY = {
    "--trial": "a trial brings its own dataset, architecture, threat model and name (its spec)",
    "--checkpoint": "--models-dir is where RobustBench weights live",
    "--robustbench": "a RobustBench model brings its own architecture, name and input normalisation",
}


def _check_pgd_steps(steps: int, cfg: Any) -> None:
    from trainables.config import can_reach

    if steps < 1 or not can_reach(steps=steps, step=cfg.attack.step, eps=cfg.attack.eps):
        raise EnergyatError(
            f"--pgd-steps {steps}: {steps} steps of {cfg.attack.step:.6g} cannot reach eps {cfg.attack.eps:.6g}; "
            f"give at least {math.ceil(cfg.attack.eps / cfg.attack.step - 1e-9)}"
        )


def _device(name: str) -> Any:
    from trainables.engine import select_device

    return select_device(name)


def cmd_eval(args: argparse.Namespace) -> int:
    import pyarrow as pa

    from trainables.data import load_dataset
    from trainables.engine import device_label
    from trainables.evaluate import evaluate, parse_attacks, write_evals

    attacks = parse_attacks(args.attacks)
    if args.n is not None and args.n < 1:
        raise EnergyatError(f"--n must be at least 1 test image, got {args.n}")
    if args.trial and len(args.trial) > 1:
        raise EnergyatError("energyat eval takes one --trial at a time")
    out, subjects = _subjects(args, n=args.n, eval_steps=args.pgd_steps or 50)
    device = _device(args.device)
    printed = []
    for subject in subjects:
        cfg = subject.cfg
        steps = args.pgd_steps or (cfg.final_eval.pgd_steps if subject.source == "trial" else 50)
        _check_pgd_steps(steps, cfg)
        seed = cfg.seed if args.seed is None else args.seed
        data = load_dataset(cfg.dataset).to(device)
        model = subject.model(data, device)
        results = evaluate(model, data, cfg, attacks=attacks, n=args.n, autoattack_n=args.n, pgd_steps=steps, seed=seed)
        write_evals(out, subject, results, seed=seed, evaluated_by="energyat eval", device=device_label(device))
        printed += [{"trial_id": subject.name, "attack": r.attack, "steps": r.steps, "eps": cfg.attack.eps, "n": r.n,
                     "accuracy": r.accuracy, "seconds": round(r.seconds, 1)} for r in results]
    _print_table(pa.Table.from_pylist(printed))
    print(f"evals: {Path(out) / 'tables' / 'evals'}  (energyat query {out} \"select * from evals\")")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from trainables.config import SgldConfig
    from trainables.generate import generate

    out, subjects = _subjects(args, n=None, eval_steps=20)
    for subject in subjects:
        result = generate(
            subject, out=out, classes=_classes(args.classes), n=args.n, init=args.init,
            sgld_cfg=SgldConfig(steps=args.steps, eta=args.eta, momentum=args.momentum), seed=args.seed, inception_weights=args.inception_weights,
            device=_device(args.device),
        )
        scores, start = result["scores"], result["start_scores"]
        print(
            f"{result['trial_id']} ({result['method']}), {args.init} start, {args.steps} SGLD steps: "
            f"judge acc {scores['judge_acc']:.3f} (start {start['judge_acc']:.3f}), "
            f"judge conf {scores['judge_conf']:.3f}, judge FD {scores['judge_fd']:.2f} (start {start['judge_fd']:.2f})"
            + (f", IS {scores['inception_score']:.2f}, FID {scores['fid']:.1f}" if "fid" in scores else "")
            + f"; judge's own test acc {result['judge_test_acc']:.3f}"
        )
        print(f"samples: {result['png']}  {result['npz']}")
    return 0


def cmd_landscape(args: argparse.Namespace) -> int:
    import pyarrow as pa

    from analysis.plots import landscape_violins
    from analysis.store import write_table_file
    from trainables.landscape import landscape, parse_attacks, summary

    attacks = parse_attacks(args.attacks)
    if args.n is not None and args.n < 1:
        raise EnergyatError(f"--n must be at least 1 test image, got {args.n}")
    out, subjects = _subjects(args, n=args.n, eval_steps=args.pgd_steps or 20)
    if args.pgd_steps is not None:  # a trial's own eval_attack.steps otherwise
        for s in subjects:
            _check_pgd_steps(args.pgd_steps, s.cfg)
        subjects = [dataclasses.replace(s, cfg=dataclasses.replace(s.cfg, eval_attack=dataclasses.replace(s.cfg.eval_attack, steps=args.pgd_steps)))
                    for s in subjects]
    if args.n is not None:  # a trial's own test probe otherwise
        subjects = [dataclasses.replace(s, cfg=dataclasses.replace(s.cfg, probe=dataclasses.replace(s.cfg.probe, test_size=args.n)))
                    for s in subjects]
    table = landscape(subjects, attacks=attacks, seed=args.seed, device=_device(args.device))
    folder = Path(out).expanduser() / "landscape"
    names = [s.name for s in subjects]
    write_table_file(
        table, folder / "landscape.parquet", config={"models": names, "weights": [s.weights for s in subjects], "attacks": attacks, "seed": args.seed}
    )
    png = landscape_violins(table, path=folder / "landscape.png")
    _print_table(pa.Table.from_pylist(summary(table)))
    print(f"landscape: {folder / 'landscape.parquet'}  {png}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from study.spec import load_study

    study_dir = load_study(args.directory).directory
    print(_status_text(study_dir))
    return 0


def _table_text(table: Any) -> str:
    names = table.column_names
    rows = [["" if v is None else (f"{v:.6g}" if isinstance(v, float) else str(v)) for v in r.values()] for r in table.to_pylist()]
    widths = [max([len(n)] + [len(r[i]) for r in rows]) for i, n in enumerate(names)]
    out = ["  ".join(n.ljust(w) for n, w in zip(names, widths, strict=True))]
    out += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def _print_table(table: Any) -> None:
    print(_table_text(table))


def _subject_flags(p: argparse.ArgumentParser, *, what: str) -> None:
    """Which model(s) a command studies: energyat's own trials, a state-dict file, or RobustBench models."""
    from trainables.config import MODEL_NAMES

    p.add_argument(
        "directory",
        type=str,
        nargs="?",
        default=None,
        help="a local study or `energyat train --out` directory (with --trial); with --checkpoint or --robustbench, where results go (default: .)",
    )
    g = p.add_argument_group(what)
    g.add_argument(
        "--trial",
        type=str,
        action="append",
        default=[],
        metavar="ID",
        help="a trial id of DIR, or `best` (the highest best validation robust accuracy); repeatable",
    )
    g.add_argument("--last", action="store_true",
                   help="with --trial: the weights of the trial's last epoch (last.pt) instead of its best (to measure robust overfitting)")
    g.add_argument("--checkpoint", type=Path, default=None, metavar="FILE", help="a plain state_dict (`module.` prefix stripped) for --model")
    g.add_argument(
        "--model",
        type=str,
        choices=MODEL_NAMES,
        default=None,
        help="the architecture of --checkpoint (reference parameter names: see docs/evaluation.md)",
    )
    # defaults None: given or not is what `_subjects` checks (each flag applies to some sources only)
    g.add_argument("--width", type=int, default=None, help="channel multiplier of small_cnn and cnn_fc (with --checkpoint; default 1)")
    g.add_argument("--name", type=str, default=None, help="how --checkpoint is named in the tables (default: its file stem)")
    g.add_argument(
        "--normalize",
        type=str,
        choices=("cifar10",),
        default=None,
        help="the input normalisation --checkpoint's training code applied: cifar10 = Rice et al.'s and Wong et al.'s mean and std "
        "(default: none, [0, 1] pixels)",
    )
    g.add_argument("--robustbench", type=str, default=None, metavar="NAME[,NAME...]", help="RobustBench model(s), through robustbench's load_model")
    g.add_argument(
        "--models-dir",
        type=str,
        default=None,
        help="robustbench's model_dir: weights are read from (or downloaded to) DIR/<dataset>/<threat>/<name>.pt (default ./models)",
    )
    g.add_argument("--dataset", type=str, default=None, help="dataset of a model from outside (default cifar10)")
    g.add_argument("--data-root", type=str, default=None, help="where that dataset's files live (default ~/data)")
    g.add_argument("--download", action="store_true", help="let torchvision download the dataset if missing")
    g.add_argument("--threat", type=str, choices=("Linf", "L2"), default=None, help="threat model of a model from outside (default Linf)")
    g.add_argument("--eps", type=str, default=None, help="its radius, e.g. 8/255 (default: RobustBench's, 8/255 for Linf and 0.5 for L2)")
    p.add_argument("--device", type=str, choices=("auto", "cpu", "cuda"), default="auto", help="where to run (default: a GPU if one is visible)")


def build_parser() -> argparse.ArgumentParser:
    from trainables.config import SgldConfig  # its defaults are the flags' defaults (no torch import)

    parser = _Parser(prog="energyat", description="Hyperparameter studies of adversarial training, read through energies.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = sub.add_parser("train", help="train one trial without Ray; writes the same tables as a study")
    train.add_argument("spec", type=str, help="spec YAML file")
    train.add_argument(
        "--set", type=str, action="append", default=[], metavar="KEY=VALUE", help="override a spec key (dotted, YAML-typed), repeatable"
    )
    train.add_argument("--out", type=str, required=True, help="output directory (tables/, checkpoints/, spec.yaml); run again to continue")
    train.add_argument("--trial-id", type=str, default="train", help="trial id in the tables (default: train)")
    train.add_argument(
        "--stop-on-alarm",
        action="store_true",
        help="stop once the online detector flags energy divergence and validation robust accuracy stops improving",
    )
    train.add_argument(
        "--stop-patience",
        type=int,
        default=None,
        metavar="N",
        help=f"with --stop-on-alarm: epochs without a new best validation robust accuracy to wait after the alarm "
        f"(default {STOP_PATIENCE}; 0 stops at the alarm)",
    )
    train.set_defaults(func=cmd_train)

    query = sub.add_parser("query", help="read-only SQL over the views epochs, samples, trials")
    query.add_argument("directory", type=str, help="study directory (local path or URI) or train --out directory")
    query.add_argument("sql", type=str, help='one SELECT, e.g. "select count(*) from epochs"')
    query.add_argument("--trial", type=str, default=None, metavar="ID",
                       help="only this trial's rows, in every view (read faster than a WHERE: only its files are opened)")
    query.add_argument("--format", type=str, choices=("table", "csv", "json"), default="table")
    query.set_defaults(func=cmd_query)

    compact = sub.add_parser(
        "compact", help="rewrite finished trials' per-epoch files as a few files per table (run and resume do it at their end)"
    )
    compact.add_argument("directory", type=str, help="study directory (local path or URI) or train --out directory")
    compact.set_defaults(func=cmd_compact)

    phases = sub.add_parser("phases", help="offline phase labels and robust-overfitting onset per trial")
    phases.add_argument("directory", type=str, help="study directory (local path or URI) or train --out directory")
    phases.add_argument("--trial", type=str, default=None, metavar="ID", help="only this trial id")
    phases.add_argument("--format", type=str, choices=("table", "csv", "json"), default="table")
    phases.set_defaults(func=cmd_phases)

    report = sub.add_parser("report", help="DIR/report/index.html with the study's and each trial's figures")
    report.add_argument("directory", type=str, help="study directory (local path or URI) or train --out directory")
    report.add_argument("--top", type=int, default=None, metavar="N",
                        help="each trial's own figures for the best N trials by validation robust accuracy (default 24; 0: every trial)")
    report.add_argument("--jobs", type=int, default=None, metavar="N",
                        help="processes drawing the figures (default: the usable CPUs, at most 8; 1: this process alone)")
    report.set_defaults(func=cmd_report)

    run = sub.add_parser("run", help="launch a study: Ray Tune trials searched by Optuna, stopped on energy divergence")
    run.add_argument("spec", type=str, help="study spec YAML (trial keys + samples, search, objective, ...)")
    run.add_argument("--set", type=str, action="append", default=[], metavar="KEY=VALUE", help="override a spec key, repeatable")
    run.add_argument("--address", type=str, default=None, help="join this Ray cluster (default: RAY_ADDRESS, else a local Ray)")
    run.add_argument(
        "--storage",
        type=str,
        default=None,
        help="where study directories live: a local path or a pyarrow URI, e.g. s3://bucket/studies (default: the spec's `storage`)",
    )
    run.add_argument("--name", type=str, default=None, help="study name (default: the spec's `name`)")
    _dashboard_flags(run)
    run.set_defaults(func=cmd_run)

    resume = sub.add_parser("resume", help="continue an interrupted study (Tuner.restore + the same Optuna study)")
    resume.add_argument("directory", type=str, help="study directory (local path or URI)")
    resume.add_argument("--address", type=str, default=None, help="join this Ray cluster (default: RAY_ADDRESS, else a local Ray)")
    resume.add_argument(
        "--retry-errored",
        action="store_true",
        help="run the trials that ended as ERROR (their restarts spent) again from epoch 0, as new Optuna trials with the same parameters",
    )
    _dashboard_flags(resume)
    resume.set_defaults(func=cmd_resume)

    evaluate = sub.add_parser("eval", help="test-set accuracy of a model (clean, PGD, the original AutoAttack) in fp32, into the `evals` table")
    _subject_flags(evaluate, what="the model to evaluate")
    evaluate.add_argument("--n", type=int, default=None, help="the first N test images (default: the whole test set, as published tables)")
    evaluate.add_argument(
        "--attacks", type=str, default="clean,pgd,autoattack", help="comma-separated, from clean, pgd, autoattack (default: all three)"
    )
    evaluate.add_argument("--pgd-steps", type=int, default=None, metavar="K",
                          help="PGD steps (default: the trial's final_eval.pgd_steps; 50 for a model from outside)")
    evaluate.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed of PGD's random starts and of AutoAttack (default: the trial's seed, so its final evaluation is reproduced; 0 otherwise)",
    )
    evaluate.set_defaults(func=cmd_eval)

    sample = sub.add_parser("sample", help="generate images from a model (SGLD on the joint energy)")
    _subject_flags(sample, what="the model to sample from")
    sample.add_argument("--classes", type=str, default=None, metavar="C,C,...", help="class indices, one grid row each (default: all)")
    sample.add_argument("--n", type=int, default=8, help="images per class (default 8)")
    sample.add_argument("--steps", type=int, default=SgldConfig.steps, help=f"SGLD steps (default {SgldConfig.steps})")
    sample.add_argument(
        "--eta", type=float, default=SgldConfig.eta, help=f"SGLD step size on grad E(x, y) (default {SgldConfig.eta}, the paper's code's)"
    )
    sample.add_argument("--momentum", type=float, default=SgldConfig.momentum, help=f"SGLD momentum zeta (default {SgldConfig.momentum})")
    sample.add_argument(
        "--init",
        type=str,
        choices=("pca", "gaussian", "noise"),
        default="pca",
        help="chain start (default pca: class-wise PCA of the training images)",
    )
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--inception-weights", type=Path, default=None, metavar="FILE",
                        help="torchvision Inception-v3 state dict: adds Inception Score and FID to the judge's proxy scores")
    sample.set_defaults(func=cmd_sample)

    land = sub.add_parser("landscape", help="per-sample energy shifts of a test probe under several attacks, per model (violins + table)")
    _subject_flags(land, what="the models to compare (default: every trial of DIR with a best checkpoint)")
    land.add_argument(
        "--attacks", type=str, default="pgd,targeted,trades,fgsm", help="comma-separated, from pgd, targeted, trades, fgsm (default: all four)"
    )
    land.add_argument("--n", type=int, default=None, help="test images probed (default: a trial's own test probe; 1,000 for a model from outside)")
    land.add_argument(
        "--pgd-steps",
        type=int,
        default=None,
        metavar="K",
        help="steps of the pgd and targeted attacks (default: a trial's eval_attack.steps; 20 otherwise)",
    )
    land.add_argument("--seed", type=int, default=0, help="seed of the attacks' random starts")
    land.set_defaults(func=cmd_landscape)

    status = sub.add_parser("status", help="trials by state, best so far, each trial's phases and stop reason")
    status.add_argument("directory", type=str, help="study directory (local path or URI)")
    status.set_defaults(func=cmd_status)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except EnergyatError as exc:
        sys.stderr.write(f"energyat: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("energyat: interrupted; run the same command again to continue\n")
        return INTERRUPTED


if __name__ == "__main__":
    raise SystemExit(main())
