"""sail_lightning.plots: figures from small hand-made logs, rounds and comparison results."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.container import BarContainer  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from sail_lightning import plots  # noqa: E402

# A CSVLogger file: each row holds only what was logged at that step (the rest empty).
METRICS = """\
epoch,gen/true_reward_mean,step,train/loss,val/loss,val/rewards/accuracies
,-0.25,0,,,
0,,4,0.69,,
0,,9,0.61,,
0,,9,,0.60,0.70
,-0.10,10,,,
1,,14,0.55,,
1,,19,0.50,,
1,,19,,0.52,0.78
"""


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


@pytest.fixture
def metrics_csv(tmp_path):
    path = tmp_path / "version_0" / "metrics.csv"
    path.parent.mkdir()
    path.write_text(METRICS)
    return path


def round_file(path, round_index, scores):
    """A round file with one line per (chosen, rejected) score pair, as write_round writes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for i, (c, r) in enumerate(scores):
            line = {"round": round_index, "prompt_index": i, "route": "pr", "seed": 0,
                    "label": "a", "prompt": "b a =", "chosen": "a b" + " x" * i,
                    "rejected": "b", "scores": {"chosen": c, "rejected": r} if c is not None
                    else None}
            f.write(json.dumps(line) + "\n")
    return path


def assert_png(path):
    assert path.is_file() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_learning_curves_one_panel_per_logged_key_nan_rows_skipped(metrics_csv, tmp_path):
    out = tmp_path / "figs" / "curves.png"
    fig = plots.learning_curves(metrics_csv, path=out)
    assert isinstance(fig, Figure)
    # Default panels: loss (train + val), accuracies (val only: train not logged here),
    # eval reward and win rate (not logged: no panel), true reward of the rounds.
    assert len(fig.axes) == 3
    loss, acc, true_reward = fig.axes
    assert [line.get_label() for line in loss.get_lines()] == ["train/loss", "val/loss"]
    train = loss.get_lines()[0]
    assert list(train.get_xdata()) == [4, 9, 14, 19]
    assert list(train.get_ydata()) == [0.69, 0.61, 0.55, 0.50]
    assert list(acc.get_lines()[0].get_ydata()) == [0.70, 0.78]
    assert list(true_reward.get_lines()[0].get_xdata()) == [0, 10]
    assert_png(out)


def test_learning_curves_custom_keys_folder_input_and_save_beside(metrics_csv):
    fig = plots.learning_curves(metrics_csv.parent, keys=["val/loss", "missing", "train/loss"],
                                path=True)
    assert [ax.get_title() for ax in fig.axes] == ["val/loss", "train/loss"]
    assert all(len(ax.get_lines()) == 1 for ax in fig.axes)
    assert_png(metrics_csv.parent / "learning_curves.png")
    with pytest.raises(ValueError, match="none of"):
        plots.learning_curves(metrics_csv, keys=["val/eval_reward"])


def test_reward_histograms_from_stored_scores(tmp_path):
    rounds = tmp_path / "rounds"
    files = [round_file(rounds / "round_0000.jsonl", 0, [(0.1, -0.2), (0.3, 0.0), (0.5, 0.1)]),
             round_file(rounds / "round_0001.jsonl", 1, [(0.6, 0.2), (0.9, 0.4)])]
    fig = plots.reward_histograms(files, bins=10, path=True)
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    for ax, n in zip(fig.axes, (3, 2), strict=True):
        assert len(ax.patches) == 2 * 10  # chosen and rejected, 10 bars each
        heights = [p.get_height() for p in ax.patches]
        assert sum(heights[:10]) == n and sum(heights[10:]) == n
    assert fig.axes[0].get_title() == "round 0: 3 pairs"
    assert_png(rounds / "reward_histograms.png")


def test_reward_histograms_with_a_score_function_and_datamodule_rounds(tmp_path):
    path = round_file(tmp_path / "r.jsonl", 4, [(None, None)] * 4)
    seen = []

    def score(prompts, responses):  # the true reward's signature; returns a tensor
        seen.append(list(responses))
        return torch.tensor([float(len(r.split())) for r in responses])

    out = tmp_path / "hist.png"
    fig = plots.reward_histograms([{"round": 4, "path": str(path), "pairs": 4}], score=score,
                                  bins=5, path=out)
    assert len(fig.axes) == 1 and len(fig.axes[0].patches) == 10
    assert seen == [["a b", "a b x", "a b x x", "a b x x x"], ["b"] * 4]
    chosen = [p.get_height() for p in fig.axes[0].patches[:5]]
    assert sum(chosen) == 4
    assert_png(out)
    with pytest.raises(ValueError, match="no labeller scores"):
        plots.reward_histograms([path])


def bars_of(ax) -> BarContainer:
    return next(c for c in ax.containers if isinstance(c, BarContainer))


def compare_results():
    """The shape of benchmarks.experiments.compare()'s return value (the parts used)."""
    def stat(mean, ci95, n=3):
        return {"mean": mean, "ci95": ci95, "n": n, "values": []}

    return {
        "methods": {"dpo": "DPO", "sail_pr": "SAIL-PR", "sail_pr_released": "SAIL-PR (rc)"},
        "summary": {
            "dpo": {"win_rate": stat(0.55, 0.04), "true_reward": stat(0.30, 0.02)},
            "sail_pr": {"win_rate": stat(0.62, None, 1), "true_reward": stat(0.41, None, 1)},
            "sail_pr_released": {"win_rate": stat(None, None, 0),
                                 "true_reward": stat(None, None, 0)},
        },
    }


def test_comparison_chart_bars_with_ci_error_bars(tmp_path):
    out = tmp_path / "cmp.png"
    fig = plots.comparison_chart(compare_results(), path=out)
    assert isinstance(fig, Figure) and len(fig.axes) == 1
    ax = fig.axes[0]
    bars = bars_of(ax)
    assert len(bars) == 3
    assert [b.get_height() for b in bars] == pytest.approx([0.55, 0.62, 0.0])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["DPO", "SAIL-PR", "SAIL-PR (rc)"]
    # An error bar of half-width 0.04; none for one seed, none for a run that diverged.
    segments = bars.errorbar.lines[2][0].get_segments()
    assert [len(seg) for seg in segments] == [2, 0, 0]
    assert segments[0][1][1] - segments[0][0][1] == pytest.approx(0.08)
    assert [t.get_text() for t in ax.texts] == ["0.550", "0.620", "-"]
    assert_png(out)


def test_comparison_chart_other_result_shapes():
    results = {"a": {"true_reward": {"mean": 0.2, "ci": [0.1, 0.35]}},
               "b": {"true_reward": 0.5, "true_reward_ci": 0.1},
               "c": {"true_reward_mean": 0.4, "true_reward_ci_low": 0.3,
                     "true_reward_ci_high": 0.45},
               "d": {"true_reward": 0.1}}
    fig = plots.comparison_chart(results, metric="true_reward")
    ax = fig.axes[0]
    assert [b.get_height() for b in bars_of(ax)] == pytest.approx([0.2, 0.5, 0.4, 0.1])
    segments = bars_of(ax).errorbar.lines[2][0].get_segments()
    lows_highs = [(seg[0][1], seg[1][1]) for seg in segments if len(seg)]
    assert np.allclose(lows_highs, [(0.1, 0.35), (0.4, 0.6), (0.3, 0.45)])  # "d": no interval
    one_seed = {m: {"win_rate": {"mean": 0.4, "ci95": None}} for m in "xyz"}
    assert len(bars_of(plots.comparison_chart(one_seed).axes[0])) == 3
    with pytest.raises(KeyError, match="win_rate"):
        plots.comparison_chart(results)
    with pytest.raises(ValueError, match="no methods"):
        plots.comparison_chart({})
