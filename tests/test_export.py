"""Export of the trained policy as a Hugging Face folder: full, merged LoRA, adapter only."""

import torch

from sail_lightning.module import SAILModule
from tests.conftest import TINY_CONFIG
from tests.helpers import collate, fit, synthetic_pairs
from tests.test_lora_qlora import LORA, QLORA, load_base


def a_batch(n=6):
    return collate(synthetic_pairs(n))


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"],
                     attention_mask=batch["attention_mask"]).logits


def fit_and_export(module, tmp_path, **callback_kw):
    from sail_lightning.export import ExportPolicyCallback

    callback = ExportPolicyCallback(**callback_kw)
    fit(module, tmp_path, steps=3, callbacks=[callback])
    return callback


def test_export_merged_lora_loads_as_a_plain_model(tiny_model_dir, tmp_path, synthetic_tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sail_lightning.export import export_policy

    m = SAILModule(model_name_or_path=str(tiny_model_dir), lora=LORA, lr=1e-2)
    cb = fit_and_export(m, tmp_path, dirpath=str(tmp_path / "policy"))
    assert cb.kind == "merged" and (tmp_path / "policy" / "model.safetensors").exists()
    batch = a_batch()
    m.pair.policy.eval()
    expected = logits(m.pair.policy, batch)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "policy").eval()
    torch.testing.assert_close(logits(exported, batch), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits(load_base(tiny_model_dir, False), batch), expected)
    # Merged into a copy: the module's policy still has its (unmerged) adapter.
    assert hasattr(m.pair.policy, "peft_config")
    torch.testing.assert_close(logits(m.pair.policy, batch), expected, rtol=0, atol=0)
    tok = AutoTokenizer.from_pretrained(tmp_path / "policy")
    assert tok("a b =")["input_ids"] == synthetic_tokenizer("a b =")["input_ids"]
    # With a reference adapter beside it (iterative methods), only the policy's is merged.
    m.pair.update_reference()
    with torch.no_grad():
        for n, p in m.pair.policy.named_parameters():
            if ".default." in n:
                p.add_(0.05)
    assert export_policy(m.pair, m.hparams.tokenizer, str(tmp_path / "policy2")) == "merged"
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "policy2").eval()
    m.pair.policy.eval()
    torch.testing.assert_close(logits(again, batch), logits(m.pair.policy, batch), atol=1e-5,
                               rtol=1e-5)


def test_export_lora_adapter_only_loads_with_peft(tiny_model_dir, tmp_path):
    from peft import PeftModel

    m = SAILModule(model_name_or_path=str(tiny_model_dir), lora=LORA, lr=1e-2)
    cb = fit_and_export(m, tmp_path, dirpath=str(tmp_path / "adapter"), merge_lora=False)
    assert cb.kind == "adapter"
    assert not (tmp_path / "adapter" / "model.safetensors").exists()
    loaded = PeftModel.from_pretrained(load_base(tiny_model_dir, False), tmp_path / "adapter")
    batch = a_batch()
    m.pair.policy.eval()
    torch.testing.assert_close(logits(loaded.eval(), batch), logits(m.pair.policy, batch))


def test_export_qlora_saves_the_adapter_and_says_why(tiny_model_dir, tmp_path, caplog):
    from peft import PeftModel

    m = SAILModule(model_name_or_path=str(tiny_model_dir), lora=LORA, quantization=QLORA,
                   lr=1e-2)
    with caplog.at_level("WARNING", logger="sail_lightning.export"):
        cb = fit_and_export(m, tmp_path, dirpath=str(tmp_path / "q"), merge_lora=True)
    assert cb.kind == "adapter" and "re-quantize" in caplog.text
    assert (tmp_path / "q" / "base_quantization.json").exists()
    loaded = PeftModel.from_pretrained(load_base(tiny_model_dir, True), tmp_path / "q").train()
    batch = a_batch()
    m.pair.policy.train()  # as load_base: bitsandbytes' standard (training) CPU path, dropout 0
    torch.testing.assert_close(logits(loaded, batch), logits(m.pair.policy, batch), rtol=0, atol=0)


def test_export_full_finetuning_to_the_default_folder(tmp_path):
    from transformers import AutoModelForCausalLM

    m = SAILModule(model_config=TINY_CONFIG, tokenizer="synthetic", lr=1e-2)
    cb = fit_and_export(m, tmp_path)
    assert cb.kind == "full" and cb.saved_to == str(tmp_path / "policy")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "policy").eval()
    batch = a_batch()
    m.pair.policy.eval()
    torch.testing.assert_close(logits(exported, batch), logits(m.pair.policy, batch), rtol=0,
                               atol=0)


def test_export_over_an_earlier_model_says_so(tmp_path, caplog):
    """A config reused for another run writes to the same folder: replaced, but not silently."""
    first = fit_and_export(SAILModule(model_config=TINY_CONFIG, tokenizer="synthetic"),
                           tmp_path / "a", dirpath=str(tmp_path / "out"))
    assert first.kind == "full"
    with caplog.at_level("WARNING", logger="sail_lightning.export"):
        fit_and_export(SAILModule(model_config=TINY_CONFIG, tokenizer="synthetic"),
                       tmp_path / "b", dirpath=str(tmp_path / "out"))
    assert f"replacing the model already in {tmp_path / 'out'}" in caplog.text
