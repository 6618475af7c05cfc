"""Aggregation over seeds (mean and 95% confidence interval), the table and the chart."""

from __future__ import annotations

import math
from collections.abc import Sequence

# Two-sided 95% quantiles of Student's t, t_{0.975, df} (scipy may be missing here).
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
         9: 2.262, 10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131,
         16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086, 25: 2.060, 30: 2.042,
         40: 2.021, 60: 2.000, 120: 1.980}


def t_quantile_975(df: int) -> float:
    """``t_{0.975, df}`` from the table; between entries the next smaller df (conservative);
    beyond 120 the normal quantile 1.96."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    if df > 120:
        return 1.96
    return _T975[max(k for k in _T975 if k <= df)]


def mean_ci(values: Sequence[float]) -> dict:
    """Mean and the half-width of its 95% t-interval, ``t_{0.975, n-1} * s / sqrt(n)``.

    Returns:
        ``{"mean", "ci95", "n", "values"}``; ``ci95`` is None for a single value.
    """
    xs = [float(v) for v in values if v is not None and not math.isnan(v)]
    n = len(xs)
    if n == 0:
        return {"mean": None, "ci95": None, "n": 0, "values": []}
    mean = sum(xs) / n
    if n == 1:
        return {"mean": mean, "ci95": None, "n": 1, "values": xs}
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    return {"mean": mean, "ci95": t_quantile_975(n - 1) * sd / math.sqrt(n), "n": n,
            "values": xs}


def bootstrap_ci(values, *, resamples: int = 2000, seed: int = 0) -> float:
    """Half-width of the 95% percentile bootstrap interval of the mean of ``values`` (one per
    prompt): the interval of a single run, over prompts, where seeds are too costly."""
    import torch

    xs = torch.as_tensor(values, dtype=torch.float64).flatten()
    if xs.numel() < 2:
        return 0.0
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(xs.numel(), (resamples, xs.numel()), generator=g)
    means = xs[idx].mean(dim=1)
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64))
    return float(high - low) / 2


def _fmt(stat: dict, digits: int = 3) -> str:
    if stat["mean"] is None:
        return "diverged"
    text = f"{stat['mean']:.{digits}f}"
    return text if stat["ci95"] is None else f"{text} ± {stat['ci95']:.{digits}f}"


def markdown_table(summary: dict[str, dict], labels: dict[str, str]) -> str:
    """One row per method: win rate vs base, true reward, wall seconds (mean ± 95% CI), and
    where the task has them (instructions) the constraint rate and mean words."""
    extra = [k for k in ("constraint_rate", "mean_words")
             if any(k in s for s in summary.values())]
    names = {"constraint_rate": "constraints met", "mean_words": "words"}
    lines = ["| method | win rate vs base | true reward | "
             + "".join(f"{names[k]} | " for k in extra) + "wall time (s) | seeds |",
             "|---|---|---|" + "---|" * len(extra) + "---|---|"]
    for name, s in summary.items():
        cells = "".join(f"{_fmt(s[k], 1 if k == 'mean_words' else 3)} | " if k in s else " | "
                        for k in extra)
        lines.append(f"| {labels.get(name, name)} | {_fmt(s['win_rate'])} | "
                     f"{_fmt(s['true_reward'])} | {cells}{_fmt(s['wall_seconds'], 1)} | "
                     f"{s['win_rate']['n']} |")
    return "\n".join(lines)


def save_charts(results: dict, path: str, *, title: str = "") -> list[str]:
    """The comparison's PNGs (``plots.comparison_chart``): win rate at ``path``, true reward
    beside it."""
    import matplotlib.pyplot as plt

    from sail_lightning.plots import comparison_chart

    stem, ext = path.rsplit(".", 1)
    paths = [path, f"{stem}_true_reward.{ext}"]
    base = results["setup"]["base"]["eval_true_reward"]
    for metric, out in zip(("win_rate", "true_reward"), paths, strict=True):
        what = "win rate vs base (ties half)" if metric == "win_rate" else (
            f"true reward (base policy {base:.3f})")
        fig = comparison_chart(results, metric, path=out,
                               title=f"{what}\n{title}" if title else what)
        plt.close(fig)
    return paths


def label_table(results: dict) -> str:
    """Win rate vs base (mean ± 95% CI) per method (rows) and label source (columns), with
    each source's agreement with the true reward; ablations left out."""
    labels = list(results["labels"])
    head = " | ".join(f"{x} ({results['labels'][x]['agreement']:.2f})" for x in labels)
    lines = [f"| method | {head} |", "|---|" + "---|" * len(labels)]
    for m, name in results["methods"].items():
        if m in results.get("ablations", []):
            continue
        cells = [_fmt(results["by_label"][x]["summary"][m]["win_rate"])
                 if m in results["by_label"][x]["summary"] else "" for x in labels]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def label_plot(results: dict, path: str, *, title: str = "") -> str:
    """Win rate against the label source's agreement with the true reward: a line per
    method that uses the labeller, a dashed level per method that does not (95% CIs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from benchmarks.experiments.runs import uses_labeller

    labels = sorted(results["labels"], key=lambda x: results["labels"][x]["agreement"])
    xs = [results["labels"][x]["agreement"] for x in labels]
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    for i, (m, name) in enumerate((m, n) for m, n in results["methods"].items()
                                  if m not in results.get("ablations", [])):
        stats = [results["by_label"][x]["summary"].get(m, {}).get("win_rate") for x in labels]
        means = [s["mean"] if s and s["mean"] is not None else float("nan") for s in stats]
        errs = [s["ci95"] if s and s["ci95"] is not None else 0.0 for s in stats]
        flat = not uses_labeller(m)  # the same runs at every label source
        color = plt.get_cmap("tab20")(i % 20)  # more methods than the 10 default colours
        if flat:
            ax.axhline(means[0], color=color, linestyle="--", linewidth=1,
                       label=f"{name} (no labeller)")
        else:
            ax.errorbar(xs, means, yerr=errs, marker="o", capsize=3, color=color, label=name)
    ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("label source's agreement with the true reward (held-out pairs)")
    ax.set_ylabel("win rate vs base policy (ties half)")
    for x, name in zip(xs, labels, strict=True):
        ax.annotate(name, (x, ax.get_ylim()[0]), textcoords="offset points", xytext=(2, 4),
                    fontsize=7, color="grey")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    if title:
        ax.set_title(title, fontsize=9)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
