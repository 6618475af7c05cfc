"""benchmarks/round_grid.py and online_round.py's options: the grid's parameter counts are
the models' own, its table has one row per point and engine, ``--engine`` takes a comma list
of the library's engines, and each engine's round is reported beside TRL's."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import benchmarks.round_grid as round_grid  # noqa: E402
from benchmarks.online_round import main, parse_args  # noqa: E402
from benchmarks.round_grid import SIZES, markdown, parameters, points  # noqa: E402

OURS = {"round_seconds": 1.0, "generation_seconds": 0.5, "label_seconds": 0.2,
        "reference_seconds": 0.2, "write_seconds": 0.01, "train_epoch_seconds": 2.0}


@pytest.mark.parametrize("hidden,layers", [(s[1], s[2]) for s in SIZES])
def test_parameters_are_the_policy_models_count(hidden, layers):
    from transformers import AutoConfig, AutoModelForCausalLM

    from sail_lightning.synthetic import tiny_llama_config
    from sail_lightning.tokenizer import build_tokenizer

    config = tiny_llama_config(build_tokenizer("synthetic"), hidden_size=hidden,
                               num_hidden_layers=layers)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    assert parameters(hidden, layers) == sum(p.numel() for p in model.parameters())


def test_markdown_has_a_row_per_point_and_says_n_a_without_trl():
    rows = [{"size": "tiny", "hidden_size": 64, "layers": 2, "parameters": 133568,
             "pairs": 1024, "max_new_tokens": 12, "speedup_vs_trl": 1.79,
             "generation_share": 0.39, "ours_seconds": 2.9, "trl_seconds": 5.2, "ours": OURS,
             "trl": {"generation_seconds": 2.6, "label_seconds": 0.5}},
            {"size": "25m", "hidden_size": 512, "layers": 6, "parameters": 25189888,
             "pairs": 128, "max_new_tokens": 64, "speedup_vs_trl": None, "engine": "vllm",
             "generation_share": 0.5, "ours_seconds": 70.0, "trl_seconds": None,
             "ours": {**OURS, "generated_tokens_per_second": 321.0},
             "trl": {"generation_seconds": None, "label_seconds": None}}]
    table = markdown({"grid": rows}).splitlines()
    assert len(table) == 4
    assert "**1.79**" in table[2] and "0.1M" in table[2] and "| 0.39 |" in table[2]
    assert "| hf |" in table[2]  # rows of the first grid (no engine) were HF's
    assert "25.2M" in table[3] and "| vllm |" in table[3] and "| 321 |" in table[3]
    assert table[3].count("n/a") == 3  # TRL's seconds, TRL's tokens/s, the speedup


def test_engine_takes_a_comma_list_of_the_librarys_engines(capsys):
    assert parse_args([]).engines == ["hf"]
    assert parse_args(["--engine", "hf, vllm"]).engines == ["hf", "vllm"]
    for bad, says in (("hf,tgi", "'tgi' is not one of hf, vllm"),
                      ("hf,hf", "distinct engines"), (",", "distinct engines")):
        with pytest.raises(SystemExit):
            parse_args(["--engine", bad])
        assert says in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--hidden-size", "64", "--heads", "3"])
    assert "divisible by --heads 3" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--model-dir", "/nonexistent"])
    assert "--model-dir /nonexistent: no config.json" in capsys.readouterr().err


def test_grid_points_carry_the_engines_and_a_model_dir_point(tiny_model_dir):
    args = parse_args(["--grid", "--engine", "hf,vllm", "--model-dir", str(tiny_model_dir),
                       "--grid-sizes", "tiny"])
    grid = points(args)
    assert [(p["size"], p["max_new_tokens"]) for p in grid[:2]] == [("tiny", 12), ("tiny", 64)]
    assert len(grid) == 3 and grid[2]["size"].endswith(" LoRA")
    for p in grid:
        argv = p["argv"]
        assert argv[argv.index("--engine") + 1] == "hf,vllm"
    # vLLM's CPU attention takes head sizes of 32 and more: every synthetic point runs on it.
    assert all(p["hidden_size"] // p["heads"] >= 32 for p in grid[:2])
    smol = grid[2]["argv"]
    assert smol[smol.index("--model-dir") + 1] == str(tiny_model_dir)
    assert smol[smol.index("--pairs") + 1] == "32"
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert grid[2]["parameters"] == sum(p.numel() for p in model.parameters())


def test_run_grid_writes_a_row_per_engine_to_the_engines_files(tmp_path, monkeypatch):
    monkeypatch.setattr(round_grid, "RESULTS", str(tmp_path))
    args = parse_args(["--grid", "--engine", "hf,vllm", "--grid-sizes", "25m"])

    def run_point(argv):
        by = {e: {"speedup_vs_trl": s, "generation_share": 0.5, "ours_seconds": 10 / s,
                  "ours": {**OURS, "warmup_seconds": 1.0}} for e, s in (("hf", 2.5),
                                                                        ("vllm", 1.5))}
        return {"by_engine": by, "trl_seconds": 25.0,
                "trl": {"generation_seconds": 9.0, "label_seconds": 1.0}}

    result = round_grid.run_grid(args, run_point)
    assert [(r["max_new_tokens"], r["engine"]) for r in result["grid"]] == [
        (12, "hf"), (12, "vllm"), (64, "hf"), (64, "vllm")]
    assert result["target_met_by_engine"] == {"hf": True, "vllm": False}
    assert not result["target_met"]
    saved = json.loads((tmp_path / "online_round_grid_engines.json").read_text())
    assert saved["grid"] == result["grid"]
    assert not (tmp_path / "online_round_grid.json").exists()  # the first grid's figures stay


def test_a_round_per_engine_is_reported_with_its_tokens_per_second():
    out = main(["--quick", "--pairs", "8", "--batch-size", "4", "--max-new-tokens", "4",
                "--skip-trl"])
    assert list(out["by_engine"]) == ["hf"] and out["ours"]["engine"] == "hf"
    ours = out["by_engine"]["hf"]["ours"]
    assert ours["same_prompts"] and ours["steps"] == 2
    assert ours["generated_tokens"] > 0 and ours["generated_tokens_per_second"] > 0
    assert out["speedup_vs_trl"] is None and out["trl_error"] == "skipped (--skip-trl)"


def test_a_model_dir_round_trains_a_lora_adapter_on_the_instructions_prompts(tmp_path):
    from sail_lightning.build_models import main as build_models
    from sail_lightning.instructions import InstructionsTask

    build_models(["--output", str(tmp_path), "--limit", "40", "--vocab-size", "512",
                  "--no-reward"])
    out = main(["--quick", "--pairs", "4", "--batch-size", "4", "--max-new-tokens", "4",
                "--gen-batch-size", "4", "--model-dir", str(tmp_path / "policy"),
                "--skip-trl"])
    assert out["lora"] == {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"}
    ours = out["ours"]
    assert ours["steps"] == 1 and ours["same_prompts"] and ours["generated_tokens"] > 0
    assert ours["label_seconds"] >= 0  # labelled by data.oracle, the exact reward
    # The round's prompts are the instructions task's training prompts.
    from benchmarks.online_round import parse_args
    from benchmarks.round_setup import round_prompts

    prompts = round_prompts(parse_args(["--model-dir", str(tmp_path / "policy"),
                                        "--batch-size", "4"]), 4)
    assert {p["prompt"] for p in prompts} <= set(InstructionsTask(seed=0).train_prompts)
