"""The figures of a study, one function per figure, each writing one PNG.

Every function takes table rows (a pyarrow Table, a dict of columns, or anything indexable by
column name, such as a DuckDB result's ``.to_arrow_table()``) and a keyword-only ``path``, and
returns that path. Figures are :class:`matplotlib.figure.Figure` objects drawn on the Agg
canvas: nothing touches pyplot's global state, so the functions are safe to call from threads
and from a library.

A figure whose input holds nothing to draw raises :class:`NoData` (its message says what was
missing); the report turns that into a note instead of an image.

Energies follow docs/science.md section 1: E(x) = -logsumexp f(x), E(x,y) = -f(x)[y],
dE(x) = E(x) - E(x*).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from analysis.phases import PhaseResult
from analysis.trials import columns, online_alarm_epoch

PHASE_COLOURS = {1: "#dbe9f6", 2: "#e2f0d9", 3: "#f9dcdc"}  # light blue, green, red
PHASE_NAMES = {1: "phase 1: fast change", 2: "phase 2: flat dE", 3: "phase 3: divergence (RO)"}
# a learning-rate "drop" is a step to at most half the previous epoch's mean lr: piecewise
# schedules (gamma 0.1) qualify, the smooth per-batch decay of onecycle and cosine does not
_LR_DROP = 0.5
_METHOD_CYCLE = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive")
_DPI = 110


class NoData(ValueError):
    """The rows given to a figure hold nothing it can draw (the message says what is missing)."""


# -- input -----------------------------------------------------------------------------------------
def _float(cols: Mapping[str, np.ndarray], name: str, n: int) -> np.ndarray:
    """Column `name` as floats (NaN for nulls), or all NaN when the column is absent."""
    if name not in cols:
        return np.full(n, np.nan)
    if cols[name].dtype.kind == "f":
        return cols[name].astype(float, copy=False)
    return np.array([np.nan if v is None else float(v) for v in cols[name]], dtype=float)


def _first(cols: Mapping[str, np.ndarray], name: str, default: str = "?") -> str:
    values = [v for v in cols.get(name, []) if v is not None]
    return str(values[0]) if values else default


def _length(cols: Mapping[str, np.ndarray]) -> int:
    return len(next(iter(cols.values()))) if cols else 0


def _method_colours(methods: Sequence[str]) -> dict[str, str]:
    return {m: _METHOD_CYCLE[i % len(_METHOD_CYCLE)] for i, m in enumerate(sorted(set(methods)))}


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)  # Agg canvas on this figure only, no pyplot
    fig.savefig(path, dpi=_DPI)
    return path


# -- one trial ---------------------------------------------------------------------------------------
def _shade_phases(ax: Axes, epochs: np.ndarray, labels: np.ndarray) -> None:
    """Shade each run of equal phase labels, from half an epoch before to half an epoch after."""
    start = 0
    for i in range(1, len(labels) + 1):
        if i == len(labels) or labels[i] != labels[start]:
            ax.axvspan(epochs[start] - 0.5, epochs[i - 1] + 0.5, color=PHASE_COLOURS.get(int(labels[start]), "#eeeeee"), zorder=0, lw=0)
            start = i


def lr_drops(epoch: np.ndarray, lr: np.ndarray) -> list[int]:
    """The epochs whose lr is at most half the previous epoch's (`epoch` in order): where the phase figure draws 'lr drop'."""
    ok = np.isfinite(lr) & (lr > 0)
    e, v = epoch[ok], lr[ok]
    return [int(e[i]) for i in range(1, len(v)) if v[i] <= _LR_DROP * v[i - 1]]


def _plot_finite(ax: Axes, x: np.ndarray, y: np.ndarray, **kwargs: Any) -> bool:
    """Plot only the finite points, so epochs without a probe do not break the line."""
    ok = np.isfinite(y)
    if not ok.any():
        return False
    ax.plot(x[ok], y[ok], marker="o", ms=3, **kwargs)
    return True


def phase_figure(epochs: Any, phases: PhaseResult, *, path: Path) -> Path:
    """The phases of one trial (docs/science.md, section 2, finding 2), in three panels over epochs.

    Top: mean E(x), E(x*) (the method's attack) and E(x*) under a targeted attack on the
    training probe. Middle: mean dE(x) and dE(x,y), with the band between the median and the
    90th percentile of abs(dE(x)). Bottom: test clean and robust accuracy, test robust loss on
    a twin axis. Phases are shaded in every panel; the offline onset, the online alarm and the
    learning-rate drops are vertical lines.

    Args:
        epochs: one trial's `epochs` rows, in any order.
        phases: :func:`analysis.phases.detect` of the same rows.
        path: the PNG to write.
    """
    cols = columns(epochs)
    n = _length(cols)
    if n == 0 or "epoch" not in cols:
        raise NoData("phase figure: the trial has no `epochs` rows")
    order = np.argsort(_float(cols, "epoch", n), kind="stable")
    cols = {k: v[order] for k, v in cols.items()}
    epoch = _float(cols, "epoch", n)

    def f(name: str) -> np.ndarray:
        return _float(cols, name, n)

    labels = np.asarray(phases.labels)
    label_epochs = np.asarray(phases.epochs, dtype=float)
    online_alarm = online_alarm_epoch(cols, phases)

    fig = Figure(figsize=(9.5, 9.0), layout="constrained")
    top, mid, bottom = fig.subplots(3, 1, sharex=True)
    for ax in (top, mid, bottom):
        _shade_phases(ax, label_epochs, labels)
        ax.grid(True, alpha=0.3, lw=0.5)

    # top: energies on the training probe
    _plot_finite(top, epoch, f("probe_train_E"), color="tab:blue", label="E(x) natural")
    _plot_finite(top, epoch, f("probe_train_E_adv"), color="tab:red", label="E(x*) untargeted (method's attack)")
    _plot_finite(top, epoch, f("probe_train_E_tgt"), color="tab:green", label="E(x*) targeted PGD")
    top.set_ylabel("mean energy (train probe)")
    top.set_title("energies of the training probe")

    # middle: delta energy and its spread
    d_e = f("probe_train_dE")
    # the |dE| band is drawn on the side of the mean dE (usually below 0), so the two overlap
    sign = -1.0 if np.isfinite(d_e).any() and np.nanmedian(d_e) < 0 else 1.0
    p50, p90 = f("probe_train_dE_abs_p50"), f("probe_train_dE_abs_p90")
    band = np.isfinite(p50) & np.isfinite(p90)
    if band.any():
        mid.fill_between(epoch[band], sign * p50[band], sign * p90[band], color="tab:purple", alpha=0.25, lw=0,
                         label=f"{'-' if sign < 0 else ''}|dE(x)| p50 to p90")
    _plot_finite(mid, epoch, d_e, color="tab:purple", label="mean dE(x) = E(x) - E(x*)")
    _plot_finite(mid, epoch, f("probe_train_dEy"), color="tab:gray", ls="--", label="mean dE(x,y)")
    mid.axhline(0.0, color="black", lw=0.6)
    mid.set_ylabel("delta energy (train probe)")
    mid.set_title("delta energy: the phase signal")

    # bottom: test accuracy (the paper's curve), validation robust accuracy (what selects the best
    # epoch), test robust loss on a twin axis
    _plot_finite(bottom, epoch, f("test_clean_acc"), color="tab:blue", label="test clean acc")
    _plot_finite(bottom, epoch, f("test_robust_acc"), color="tab:red", label="test robust acc (PGD)")
    _plot_finite(bottom, epoch, f("val_robust_acc"), color="tab:green", ls="--", label="validation robust acc (selects)")
    bottom.set_ylabel("accuracy")
    bottom.set_ylim(-0.02, 1.02)
    loss_ax = bottom.twinx()
    has_loss = _plot_finite(loss_ax, epoch, f("test_robust_loss"), color="tab:orange", ls=":", label="test robust loss")
    loss_ax.set_ylabel("robust CE loss", color="tab:orange" if has_loss else "black")
    bottom.set_xlabel("epoch")
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    bottom.set_title("test and validation accuracy, test robust loss")

    # vertical markers on every panel
    drops = lr_drops(epoch, f("lr"))
    for ax in (top, mid, bottom):
        for e in drops:
            ax.axvline(e - 0.5, color="dimgray", ls=(0, (2, 2)), lw=1.0)
        if phases.phase3_start is not None:
            ax.axvline(phases.phase3_start, color="black", lw=1.6)
        if online_alarm is not None:
            ax.axvline(online_alarm, color="crimson", ls="--", lw=1.4)
    for e in drops:
        top.annotate("lr drop", (e - 0.5, 1.0), xycoords=("data", "axes fraction"), xytext=(2, -10),
                     textcoords="offset points", fontsize=8, color="dimgray")

    # legends: series per panel, phases and markers once beside the top panel
    top.legend(loc="best", fontsize=8)
    mid.legend(loc="best", fontsize=8)
    handles, names = bottom.get_legend_handles_labels()
    more, more_names = loss_ax.get_legend_handles_labels()
    bottom.legend(handles + more, names + more_names, loc="best", fontsize=8)
    keys: list[Any] = [Patch(color=PHASE_COLOURS[p], label=PHASE_NAMES[p]) for p in sorted(set(labels.tolist()) or {1})]
    onset = phases.phase3_start
    keys.append(Line2D([], [], color="black", lw=1.6, label=f"RO onset (offline): {onset if onset is not None else 'none'}"))
    keys.append(Line2D([], [], color="crimson", ls="--", lw=1.4, label=f"online alarm: {online_alarm if online_alarm is not None else 'none'}"))
    if drops:
        keys.append(Line2D([], [], color="dimgray", ls=(0, (2, 2)), lw=1.0, label="lr drop"))
    fig.legend(handles=keys, loc="outside lower center", ncols=3, fontsize=8, frameon=False)
    fig.suptitle(f"trial {_first(cols, 'trial_id')} ({_first(cols, 'method')}): phases of adversarial training")
    return _save(fig, path)


def _train_split(cols: Mapping[str, np.ndarray]) -> np.ndarray:
    n = _length(cols)
    if "split" not in cols:
        return np.ones(n, dtype=bool)
    return np.array([s == "train" for s in cols["split"]], dtype=bool)


def energy_histograms(samples: Any, *, epochs: Sequence[int], path: Path) -> Path:
    """Per chosen epoch, histograms of per-sample E(x), E(x*) untargeted and E(x*) targeted.

    The training probe only (``split == "train"``). docs/science.md finding 1: an untargeted attack
    moves E(x*) below E(x), a targeted one above it.

    Args:
        samples: one trial's `samples` rows (other epochs and the test split are ignored).
        epochs: the epochs to draw, one panel each; epochs without rows are left out.
        path: the PNG to write.
    """
    cols = columns(samples)
    n = _length(cols)
    train = _train_split(cols)
    epoch = _float(cols, "epoch", n)
    chosen = [int(e) for e in dict.fromkeys(epochs) if (train & (epoch == e)).any()]
    if not chosen:
        raise NoData(f"energy histograms: no training-probe samples at epochs {list(epochs)}")
    series = (("E", "E(x) natural", "tab:blue"), ("E_adv", "E(x*) untargeted", "tab:red"), ("E_tgt", "E(x*) targeted", "tab:green"))
    fig = Figure(figsize=(4.2 * len(chosen) + 0.6, 3.8), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(chosen), sharey=False))
    for ax, e in zip(axes, chosen, strict=True):
        pick = train & (epoch == e)
        values = {name: _float(cols, name, n)[pick] for name, _, _ in series}
        finite = np.concatenate([v[np.isfinite(v)] for v in values.values()])
        bins = np.histogram_bin_edges(finite, bins=30) if finite.size else 30
        natural = values["E"][np.isfinite(values["E"])]
        for name, label, colour in series:
            v = values[name][np.isfinite(values[name])]
            if v.size:
                shift = f", shift {v.mean() - natural.mean():+.3f}" if name != "E" and natural.size else ""
                ax.hist(v, bins=bins, histtype="stepfilled", alpha=0.35, color=colour, edgecolor=colour,
                        label=f"{label}: mean {v.mean():.3f}{shift}")
                ax.axvline(v.mean(), color=colour, lw=1.2)
        ax.set_ylim(0, ax.get_ylim()[1] * 1.3)  # headroom: the legend sits above the bars
        ax.set_title(f"epoch {e}  (n={int(pick.sum())})")
        ax.set_xlabel("energy")
        ax.legend(fontsize=7, loc="upper left")
    axes[0].set_ylabel("samples")
    fig.suptitle(f"trial {_first(cols, 'trial_id')}: per-sample energies of the training probe")
    return _save(fig, path)


def arrow_plot(samples: Any, *, path: Path, max_arrows: int = 200, seed: int = 0) -> Path:
    """Arrows from (E(x), E(x,y)) to (E(x*), E(x*,y)) for training-probe samples at one epoch.

    Coloured by whether the prediction on x* is still right. Points lie above the line
    E(x,y) = E(x) (cross-entropy is E(x,y) - E(x) >= 0); an attack that raises the loss moves a
    point away from it.

    Args:
        samples: `samples` rows of one trial at one epoch (the test split is ignored).
        path: the PNG to write.
        max_arrows: at most this many samples, chosen at random (seeded) when there are more.
        seed: seeds that choice.
    """
    cols = columns(samples)
    n = _length(cols)
    train = _train_split(cols)
    epoch = _float(cols, "epoch", n)
    epochs_present = sorted({int(e) for e in epoch[train] if np.isfinite(e)})
    if len(epochs_present) > 1:
        raise ValueError(f"arrow_plot draws one epoch; the rows hold epochs {epochs_present}")
    x0, y0, x1, y1 = (_float(cols, name, n) for name in ("E", "Ey", "E_adv", "Ey_adv"))
    ok = train & np.isfinite(x0) & np.isfinite(y0) & np.isfinite(x1) & np.isfinite(y1)
    idx = np.flatnonzero(ok)
    if idx.size == 0:
        raise NoData("arrow plot: no training-probe samples with finite energies")
    total = idx.size
    if total > max_arrows:
        idx = np.sort(np.random.default_rng(seed).choice(idx, size=max_arrows, replace=False))
    correct = np.array([bool(v) for v in cols.get("correct_adv", np.ones(n, dtype=bool))], dtype=bool)

    fig = Figure(figsize=(7.0, 6.0), layout="constrained")
    ax = fig.subplots()
    for value, colour, label in ((True, "tab:green", "x* still classified right"), (False, "tab:red", "x* misclassified")):
        sel = idx[correct[idx] == value]
        if sel.size == 0:
            continue
        ax.quiver(x0[sel], y0[sel], x1[sel] - x0[sel], y1[sel] - y0[sel], angles="xy", scale_units="xy", scale=1,
                  color=colour, alpha=0.55, width=0.0025, headwidth=4, headlength=5)
        ax.scatter(x0[sel], y0[sel], s=9, color=colour, edgecolor="none", label=f"{label} ({sel.size})")
    # limits from the data on each axis; the CE = 0 diagonal is clipped to them
    xs, ys = np.concatenate([x0[idx], x1[idx]]), np.concatenate([y0[idx], y1[idx]])
    xlim, ylim = _padded(xs), _padded(ys)
    lo, hi = min(xlim[0], ylim[0]), max(xlim[1], ylim[1])
    ax.plot([lo, hi], [lo, hi], color="black", lw=0.8, ls="--", label="E(x,y) = E(x): CE = 0")
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    ax.set_xlabel("marginal energy E(x)  (arrow head: E(x*))")
    ax.set_ylabel("joint energy E(x,y)  (arrow head: E(x*,y))")
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(True, alpha=0.3, lw=0.5)
    shown = f"{idx.size} of {total}" if idx.size < total else f"all {total}"
    e = epochs_present[0] if epochs_present else "?"
    ax.set_title(f"trial {_first(cols, 'trial_id')}, epoch {e}: natural -> adversarial ({shown} training-probe samples)", fontsize=10)
    return _save(fig, path)


def _padded(values: np.ndarray, fraction: float = 0.05) -> tuple[float, float]:
    lo, hi = float(values.min()), float(values.max())
    pad = fraction * (hi - lo) if hi > lo else 0.5
    return lo - pad, hi + pad


# -- one study -----------------------------------------------------------------------------------------
def _non_dominated(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Indices of the points no other point beats in both x and y (both maximised), by x."""
    keep = [i for i in range(len(x)) if not np.any((x >= x[i]) & (y >= y[i]) & ((x > x[i]) | (y > y[i])))]
    return np.array(sorted(keep, key=lambda i: (x[i], -y[i])), dtype=int)


def pareto_front(trials: Any, *, path: Path, robust: str = "best_val_robust_acc", clean: str = "best_val_clean_acc") -> Path:
    """Clean against robust accuracy, one point per trial, the non-dominated trials connected.

    Args:
        trials: the `trials` table (one row per trial).
        path: the PNG to write.
        robust: the robust-accuracy column: ``best_val_robust_acc`` (what a study searches on) or
            the test set's ``final_pgd_acc``.
        clean: the clean-accuracy column: ``best_val_clean_acc`` or the test set's ``final_clean_acc``.
    """
    cols = columns(trials)
    n = _length(cols)
    x, y = _float(cols, clean, n), _float(cols, robust, n)
    ok = np.flatnonzero(np.isfinite(x) & np.isfinite(y))
    if ok.size < 2:
        raise NoData(f"Pareto front: needs at least 2 trials with `{clean}` and `{robust}`, got {ok.size}")
    methods = [str(m) for m in cols.get("method", np.array(["?"] * n, dtype=object))]
    ids = [str(t) for t in cols.get("trial_id", np.array([str(i) for i in range(n)], dtype=object))]
    colours = _method_colours([methods[i] for i in ok])
    fig = Figure(figsize=(7.0, 5.5), layout="constrained")
    ax = fig.subplots()
    for m, colour in colours.items():
        sel = [i for i in ok if methods[i] == m]
        ax.scatter(x[sel], y[sel], s=36, color=colour, alpha=0.8, label=m, zorder=3)
    front = ok[_non_dominated(x[ok], y[ok])]
    # the boundary of what the front dominates: a staircase, since points between two front
    # trials are not attainable on a straight line
    ax.step(x[front], y[front], where="pre", color="black", lw=1.2, zorder=2, label="Pareto front")
    # trials at the same point (a configuration drawn twice) share one label instead of overprinting
    labels: dict[tuple[float, float], list[str]] = {}
    for i in front:
        labels.setdefault((float(x[i]), float(y[i])), []).append(f"{methods[i]} ({ids[i]})")
    for point, names in labels.items():
        ax.annotate(", ".join(names), point, xytext=(5, 4), textcoords="offset points", fontsize=8)
    ax.margins(0.1)
    ax.set_xlabel(f"clean accuracy ({clean})")
    ax.set_ylabel(f"robust accuracy ({robust})")
    ax.grid(True, alpha=0.3, lw=0.5)
    ax.legend(fontsize=8, title="method", title_fontsize=8)
    ax.set_title(f"clean vs robust accuracy: {ok.size} trials, {front.size} non-dominated")
    return _save(fig, path)


def _final_abs_delta_energy(epochs: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Per trial, abs(probe_train_dE) at its last probed epoch."""
    n = _length(epochs)
    ids = [str(t) for t in epochs.get("trial_id", [])]
    epoch, d_e = _float(epochs, "epoch", n), _float(epochs, "probe_train_dE", n)
    last: dict[str, tuple[float, float]] = {}
    for t, e, v in zip(ids, epoch, d_e, strict=True):
        if np.isfinite(v) and (t not in last or e > last[t][0]):
            last[t] = (e, abs(v))
    return {t: v for t, (_, v) in last.items()}


def delta_energy_vs_robust(epochs: Any, trials: Any, *, path: Path) -> Path:
    """Final abs(dE(x)) on the training probe against best validation robust accuracy, per trial.

    docs/science.md findings 2 and 4: methods whose delta energy grows (SAT) overfit, those that keep
    it near 0 (TRADES) stay robust.

    Args:
        epochs: the `epochs` rows of the study's trials.
        trials: the `trials` table.
        path: the PNG to write.
    """
    final = _final_abs_delta_energy(columns(epochs))
    cols = columns(trials)
    n = _length(cols)
    ids = [str(t) for t in cols.get("trial_id", [])]
    methods = [str(m) for m in cols.get("method", np.array(["?"] * n, dtype=object))]
    robust = _float(cols, "best_val_robust_acc", n)
    points = [(ids[i], methods[i], final[ids[i]], robust[i]) for i in range(n) if ids[i] in final and np.isfinite(robust[i])]
    if len(points) < 2:
        raise NoData(f"delta energy vs robust accuracy: needs at least 2 trials with a probed epoch, got {len(points)}")
    colours = _method_colours([p[1] for p in points])
    fig = Figure(figsize=(7.0, 5.5), layout="constrained")
    ax = fig.subplots()
    for m, colour in colours.items():
        sel = [p for p in points if p[1] == m]
        ax.scatter([p[2] for p in sel], [p[3] for p in sel], s=36, color=colour, alpha=0.8, label=m)
    if len(points) <= 30:  # beyond that, labels only hide the points
        for t, _, xv, yv in points:
            ax.annotate(t, (xv, yv), xytext=(4, 3), textcoords="offset points", fontsize=7, color="dimgray")
    ax.set_xlabel("final |mean dE(x)| on the training probe (last probed epoch)")
    ax.set_ylabel("best validation robust accuracy")
    ax.grid(True, alpha=0.3, lw=0.5)
    ax.legend(fontsize=8, title="method", title_fontsize=8)
    ax.set_title(f"delta energy vs robustness: {len(points)} trials")
    return _save(fig, path)


def param_importances(importances: Mapping[str, float], *, path: Path) -> Path:
    """Horizontal bars of hyperparameter importances, largest on top.

    The caller computes them (``study/`` with Optuna's ``get_param_importances``): analysis
    never imports optuna.
    """
    items = sorted(((str(k), float(v)) for k, v in importances.items() if np.isfinite(v)), key=lambda kv: kv[1])
    if not items:
        raise NoData("parameter importances: none given")
    fig = Figure(figsize=(7.0, 1.2 + 0.45 * len(items)), layout="constrained")
    ax = fig.subplots()
    names, values = [k for k, _ in items], [v for _, v in items]
    bars = ax.barh(names, values, color="tab:blue", alpha=0.8)
    ax.bar_label(bars, labels=[f"{v:.3f}" for v in values], padding=3, fontsize=8)
    ax.set_xlim(0, max(values) * 1.18 or 1.0)
    ax.set_xlabel("importance (sums to 1 over the parameters)")
    ax.set_title("hyperparameter importance for the objective")
    ax.grid(True, axis="x", alpha=0.3, lw=0.5)
    return _save(fig, path)


def sample_grid(images: np.ndarray, labels: np.ndarray, *, path: Path, title: str, class_names: Sequence[str] | None = None) -> Path:
    """Generated images as a grid, one row per class in order of first appearance.

    Args:
        images: (N, C, H, W) floats in [0, 1] (C = 1 grey or 3 RGB).
        labels: (N,) the class each image was generated for.
    """
    images, labels = np.asarray(images), np.asarray(labels)
    if len(images) == 0:
        raise NoData("no images to draw")
    classes = list(dict.fromkeys(labels.tolist()))
    per_row = max(int((labels == c).sum()) for c in classes)
    fig = Figure(figsize=(0.9 * per_row + 0.8, 0.9 * len(classes) + 0.5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(classes), per_row, squeeze=False)
    for r, c in enumerate(classes):
        row = images[labels == c]
        for j in range(per_row):
            ax = axes[r][j]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if j < len(row):
                img = np.clip(row[j].transpose(1, 2, 0), 0.0, 1.0)
                ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        axes[r][0].set_ylabel(class_names[c] if class_names else str(c), rotation=0, ha="right", va="center")
    fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(wspace=0.05, hspace=0.05, left=0.08, right=0.99, bottom=0.01, top=0.9)
    return _save(fig, path)


def _half_violin(ax: Axes, values: np.ndarray, pos: float, *, left: bool, colour: str) -> None:
    """One half of a violin at `pos`: the left half for one quantity, the right for the other."""
    if np.ptp(values) == 0:  # a KDE needs spread: a flat line instead
        ax.hlines(values[0], pos - 0.35 if left else pos, pos if left else pos + 0.35, colors=colour)
        return
    # matplotlib types "bodies" a Collection; it is a list of PolyCollections
    body = cast("list[Any]", ax.violinplot([values], positions=[pos], widths=0.8, showextrema=False)["bodies"])[0]
    vertices = body.get_paths()[0].vertices
    vertices[:, 0] = np.minimum(vertices[:, 0], pos) if left else np.maximum(vertices[:, 0], pos)
    body.set_facecolor(colour)
    body.set_edgecolor("black")
    body.set_linewidth(0.5)
    body.set_alpha(0.75)


def landscape_violins(rows: Any, *, path: Path) -> Path:
    """Per-sample dE(x) (left halves) and dE(x,y) (right halves) of the test probe, one panel per
    attack, one split violin per trial: the paper's smoothness comparison (docs/science.md section 2).

    Input: rows of ``analysis.schema.LANDSCAPE`` (``energyat landscape``).
    """
    cols = columns(rows)
    n = _length(cols)
    if n == 0:
        raise NoData("no landscape rows")
    trial, method, attack = cols["trial_id"].astype(str), cols["method"].astype(str), cols["attack"].astype(str)
    d_e, d_ey = _float(cols, "dE", n), _float(cols, "dEy", n)
    trials, attacks = list(dict.fromkeys(trial.tolist())), list(dict.fromkeys(attack.tolist()))
    # one row per attack, trials side by side: the figure grows down, not sideways
    fig = Figure(figsize=(max(5.0, 0.9 * len(trials) + 1.5), 2.6 * len(attacks) + 0.6))
    axes = fig.subplots(len(attacks), 1, squeeze=False)[:, 0]
    for ax, name in zip(axes, attacks, strict=True):
        for i, t in enumerate(trials):
            keep = (trial == t) & (attack == name)
            if keep.any():
                _half_violin(ax, d_e[keep], i, left=True, colour="tab:blue")
                _half_violin(ax, d_ey[keep], i, left=False, colour="tab:orange")
        ax.axhline(0.0, color="grey", linewidth=0.6)
        ax.set_xticks(range(len(trials)))
        ax.set_xticklabels([f"{t}\n{method[trial == t][0]}" for t in trials], fontsize=7)
        ax.set_title(f"attack: {name}", fontsize=9)
    for ax in axes:
        ax.set_ylabel("clean - adversarial", fontsize=8)
    axes[0].legend(handles=[Patch(color="tab:blue", label="dE(x) = E(x) - E(x*)"), Patch(color="tab:orange", label="dE(x,y) = E(x,y) - E(x*,y)")],
                    fontsize=7, loc="best")
    fig.suptitle("Energy landscape of the test probe: narrow, near-zero violins = smoother", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)
