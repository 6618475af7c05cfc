"""Plots of runs and comparisons: learning curves, reward histograms per round, method bars.

Each function returns the ``Figure``; ``path`` also saves it as a PNG there, or, with
``path=True``, beside the logs it was drawn from. Without a display (headless Linux, CI) the
Agg backend is selected, unless ``MPLBACKEND`` names one (Jupyter's inline backend does).
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt  # headless, it falls back to Agg by itself
import numpy as np
from matplotlib.figure import Figure

PathLike = str | os.PathLike
SavePath = PathLike | bool | None
ScoreFn = Callable[[Sequence[str], Sequence[str]], Any]

DEFAULT_CURVES: tuple[str | tuple[str, ...], ...] = (
    ("train/loss", "val/loss"),
    ("train/rewards/accuracies", "val/rewards/accuracies"),
    "val/eval_reward",
    "val/win_rate_vs_ref",
    "gen/true_reward_mean",
)
"""Panels of :func:`learning_curves`: a key per panel, or a tuple of keys drawn together."""


def _save(fig: Figure, path: SavePath, beside: Path, name: str) -> None:
    if path is not None and path is not False:
        out = beside / name if path is True else Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=100, bbox_inches="tight")


def _grid(n: int, ncols: int, width: float = 4.2, height: float = 3.0) -> tuple[Figure, list]:
    """A figure with exactly ``n`` axes laid out ``ncols`` wide (extra cells removed)."""
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False)
    flat = list(axes.ravel())
    for ax in flat[n:]:
        fig.delaxes(ax)
    return fig, flat[:n]


def read_metrics(metrics_csv: PathLike) -> dict[str, np.ndarray]:
    """Columns of a CSVLogger ``metrics.csv`` (or of the folder holding one) as float arrays.

    Empty cells (a metric not logged on that row) become NaN.
    """
    path = Path(metrics_csv)
    if path.is_dir():
        path = path / "metrics.csv"
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    columns = rows[0].keys() if rows else []
    return {c: np.array([float(r[c]) if r.get(c) not in (None, "") else math.nan for r in rows],
                        dtype=float) for c in columns}


def learning_curves(metrics_csv: PathLike,
                    keys: Sequence[str | Sequence[str]] = DEFAULT_CURVES,
                    path: SavePath = None, ncols: int = 3) -> Figure:
    """Train and validation metrics against the optimizer step, one panel per key.

    Each metric is drawn from the rows that logged it (NaN elsewhere); sparse ones (validation,
    rounds) get markers. Keys never logged are skipped, and so are panels without any.

    Args:
        metrics_csv: a CSVLogger ``metrics.csv``, or its ``version_*`` folder.
        keys: panels: a metric name, or a tuple of names drawn in one panel with a legend.
        path: save the PNG there; ``True`` saves ``learning_curves.png`` beside the CSV.
        ncols: panels per row.

    Returns:
        The figure, one axes per drawn panel.

    Raises:
        ValueError: if none of ``keys`` was logged.
    """
    data = read_metrics(metrics_csv)
    step = data.get("step", np.arange(len(next(iter(data.values()), []))))
    panels = [[k] if isinstance(k, str) else list(k) for k in keys]
    panels = [[k for k in p if k in data and np.isfinite(data[k]).any()] for p in panels]
    panels = [p for p in panels if p]
    if not panels:
        raise ValueError(f"{metrics_csv}: none of {list(keys)} was logged")
    fig, axes = _grid(len(panels), ncols)
    for ax, panel in zip(axes, panels, strict=True):
        for key in panel:
            ok = np.isfinite(data[key]) & np.isfinite(step)
            x, y = step[ok], data[key][ok]
            order = np.argsort(x, kind="stable")
            ax.plot(x[order], y[order], marker="o" if ok.sum() <= 20 else None,
                    markersize=4, label=key)
        ax.set_title(" / ".join(panel) if len(panel) == 1 else panel[-1].split("/", 1)[-1])
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(panel) > 1:
            ax.legend(fontsize=8)
    fig.tight_layout()
    beside = Path(metrics_csv) if Path(metrics_csv).is_dir() else Path(metrics_csv).parent
    _save(fig, path, beside, "learning_curves.png")
    return fig


def _as_floats(values: Any) -> np.ndarray:
    if hasattr(values, "detach"):  # a torch tensor
        values = values.detach().cpu().tolist()
    return np.asarray(values, dtype=float).reshape(-1)


def reward_histograms(rounds: Iterable[PathLike | Mapping[str, Any]],
                      score: ScoreFn | None = None, path: SavePath = None,
                      bins: int = 20, ncols: int = 3) -> Figure:
    """One histogram per online round of the rewards of its chosen and rejected responses.

    Args:
        rounds: round files (``rounds/round_NNNN.jsonl``) or ``PreferenceDataModule.pool.rounds``.
        score: ``score(prompts, responses)`` giving a reward per response (e.g.
            ``SyntheticTask().score``, the true reward); ``None`` uses the labeller scores
            stored in each line's ``scores``.
        path: save the PNG there; ``True`` saves ``reward_histograms.png`` beside the rounds.
        bins: bins per histogram, shared by all rounds.
        ncols: panels per row.

    Returns:
        The figure, one axes per round, each with a chosen and a rejected histogram.

    Raises:
        ValueError: if no round is given, or with ``score=None`` a round has no scores.
    """
    files = [Path(r["path"]) if isinstance(r, Mapping) else Path(r) for r in rounds]
    if not files:
        raise ValueError("no round files given")
    values: list[tuple[str, int, np.ndarray, np.ndarray]] = []
    for file in files:
        with open(file, encoding="utf-8") as f:
            lines = [json.loads(line) for line in f if line.strip()]
        label = f"round {lines[0]['round']}" if lines and "round" in lines[0] else file.stem
        if score is None:
            scored = [x["scores"] for x in lines if x.get("scores")]
            if not scored:
                raise ValueError(f"{file}: no labeller scores stored; pass score=")
            chosen = np.array([s["chosen"] for s in scored], dtype=float)
            rejected = np.array([s["rejected"] for s in scored], dtype=float)
        else:
            prompts = [x["prompt"] for x in lines]
            chosen = _as_floats(score(prompts, [x["chosen"] for x in lines]))
            rejected = _as_floats(score(prompts, [x["rejected"] for x in lines]))
        values.append((label, len(lines), chosen, rejected))
    both = np.concatenate([np.concatenate([c, r]) for _, _, c, r in values])
    both = both[np.isfinite(both)]
    lo, hi = (float(both.min()), float(both.max())) if both.size else (0.0, 1.0)
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
    fig, axes = _grid(len(values), ncols)
    what = "labeller score" if score is None else "reward"
    for ax, (label, n, chosen, rejected) in zip(axes, values, strict=True):
        ax.hist(chosen, bins=edges, alpha=0.6, label=f"chosen (mean {np.mean(chosen):.3f})")
        ax.hist(rejected, bins=edges, alpha=0.6,
                label=f"rejected (mean {np.mean(rejected):.3f})")
        ax.set_title(f"{label}: {n} pairs")
        ax.set_xlabel(what)
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path, files[0].parent, "reward_histograms.png")
    return fig


def _mean_ci(entry: Mapping[str, Any], metric: str) -> tuple[float, tuple[float, float]]:
    """Mean and (low, high) 95% interval of ``metric`` in one method's results: from
    ``{metric: {"mean": m, "ci": [lo, hi] | half_width}}`` (or ``ci95``, ``ci_low``/``ci_high``,
    ``lo``/``hi``), ``{metric: m, metric_ci: ...}`` or ``{metric_mean: m, metric_ci: ...}``."""
    if metric not in entry and f"{metric}_mean" not in entry:
        raise KeyError(f"no {metric!r} (or {metric}_mean) in {sorted(entry)}")
    value = entry.get(metric, entry.get(f"{metric}_mean"))
    if isinstance(value, Mapping):
        mean, src, prefix = value.get("mean"), value, ""
    else:
        mean, src, prefix = value, entry, f"{metric}_"
    if mean is None:  # e.g. a run that diverged
        return math.nan, (math.nan, math.nan)
    mean = float(mean)
    ci = next((src[k] for k in (f"{prefix}ci", f"{prefix}ci95", f"{prefix}ci_95") if k in src),
              None)
    for low, high in ((f"{prefix}ci_low", f"{prefix}ci_high"), (f"{prefix}lo", f"{prefix}hi")):
        if ci is None and low in src and high in src:
            ci = (src[low], src[high])
    if ci is None:  # one seed: no interval, no error bar
        return mean, (math.nan, math.nan)
    if isinstance(ci, (int, float)):  # a half-width
        return mean, (mean - float(ci), mean + float(ci))
    return mean, (float(ci[0]), float(ci[1]))


def comparison_chart(results: Mapping[str, Any], metric: str = "win_rate",
                     path: SavePath = None, title: str | None = None) -> Figure:
    """Bars of one metric per method, with 95% confidence intervals as error bars.

    Args:
        results: what ``benchmarks.experiments.compare`` returns (its ``summary``:
            ``{method: {metric: {"mean", "ci95"}}}``, ``ci95`` a half-width or None, and
            ``methods``: method -> label), or just such a ``{method: {metric: ...}}`` dict
            (``_mean_ci`` lists other shapes). A None mean or ci95 draws no bar or error bar.
        metric: ``win_rate`` (against the base policy), ``true_reward``, ``wall_seconds``.
        path: save the PNG there (``True`` saves ``comparison_<metric>.png`` here).
        title: axes title; default: the metric.

    Returns:
        The figure: one axes, one bar per method.
    """
    summary = results.get("summary", results)
    labels = results.get("methods", {}) if "summary" in results else {}
    if not isinstance(summary, Mapping) or not summary:
        raise ValueError("results holds no methods")
    stats = [_mean_ci(summary[m], metric) for m in summary]
    means = np.array([m for m, _ in stats])
    err = np.array([[m - lo for m, (lo, _) in stats], [hi - m for m, (_, hi) in stats]])
    names = [str(labels.get(m, m)) for m in summary]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(names) + 1.5), 3.8))
    bars = ax.bar(names, np.nan_to_num(means), yerr=np.maximum(err, 0), capsize=5,
                  alpha=0.8, color=[f"C{i % 10}" for i in range(len(names))])
    ax.bar_label(bars, labels=["-" if np.isnan(m) else f"{m:.3f}" for m in means], padding=3,
                 fontsize=8)
    if metric.startswith("win_rate"):
        ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_ylabel(metric)
    ax.set_title(title or f"{metric} (95% CI)")
    if len(names) > 3:
        plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    _save(fig, path, Path.cwd(), f"comparison_{metric}.png")
    return fig
