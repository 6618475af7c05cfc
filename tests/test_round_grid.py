"""benchmarks/round_grid.py: the grid's parameter counts are the models' own, and its table
has one row per point with the speedup and generation share."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.round_grid import SIZES, markdown, parameters  # noqa: E402


@pytest.mark.parametrize("hidden,layers", [(h, n) for _, h, n, _ in SIZES])
def test_parameters_are_the_policy_models_count(hidden, layers):
    from transformers import AutoConfig, AutoModelForCausalLM

    from sail_lightning.synthetic import tiny_llama_config
    from sail_lightning.tokenizer import build_tokenizer

    config = tiny_llama_config(build_tokenizer("synthetic"), hidden_size=hidden,
                               num_hidden_layers=layers)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    assert parameters(hidden, layers) == sum(p.numel() for p in model.parameters())


def test_markdown_has_a_row_per_point_and_says_n_a_without_trl():
    ours = {"round_seconds": 1.0, "generation_seconds": 0.5, "label_seconds": 0.2,
            "reference_seconds": 0.2, "write_seconds": 0.01, "train_epoch_seconds": 2.0}
    rows = [{"size": "tiny", "hidden_size": 64, "layers": 2, "parameters": 133568,
             "pairs": 1024, "max_new_tokens": 12, "speedup_vs_trl": 1.79,
             "generation_share": 0.39, "ours_seconds": 2.9, "trl_seconds": 5.2, "ours": ours,
             "trl": {"generation_seconds": 2.6, "label_seconds": 0.5}},
            {"size": "25m", "hidden_size": 512, "layers": 6, "parameters": 25189888,
             "pairs": 128, "max_new_tokens": 64, "speedup_vs_trl": None,
             "generation_share": 0.5, "ours_seconds": 70.0, "trl_seconds": None, "ours": ours,
             "trl": {"generation_seconds": None, "label_seconds": None}}]
    table = markdown({"grid": rows}).splitlines()
    assert len(table) == 4
    assert "**1.79**" in table[2] and "0.1M" in table[2] and "| 0.39 |" in table[2]
    assert "25.2M" in table[3] and table[3].count("n/a") == 2
