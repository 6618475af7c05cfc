"""LoRA and QLoRA (4-bit base, bitsandbytes on CPU): what trains, what stays, the reference."""

import bitsandbytes as bnb
import pytest
import torch
import yaml

from sail_lightning.data.tokenize import PreferenceCollator
from sail_lightning.logprobs import concatenated_logprobs
from sail_lightning.models import LoraOptions, QuantizationOptions
from sail_lightning.module import SAILModule
from tests.conftest import TINY_CONFIG, assert_reference_becomes_the_policy, save_tiny_llama
from tests.helpers import fit, same_bits, snapshot, synthetic_pairs

LORA = LoraOptions(r=4, alpha=8, dropout=0.0)
QLORA = QuantizationOptions(quant_type="nf4", double_quant=True, compute_dtype="float32")
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def a_batch(n=6):
    return PreferenceCollator(0)([p.example(0) for p in synthetic_pairs(n)])


def load_base(path, quantized: bool):
    """The base model loaded on its own, with the QLoRA recipe spelled out (not our code)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    # Train mode (dropout is 0): in eval mode bitsandbytes would take its CPU inference path,
    # which repacks the weights (see sail_lightning.models._no_cpu_inference_repack).
    if not quantized:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).train()
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                           bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32,
                           bnb_4bit_quant_storage=torch.float32)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                quantization_config=q).train()


@pytest.mark.parametrize("quantized,checkpointing", [(False, False), (True, False), (True, True)],
                         ids=["lora", "qlora", "qlora_gradient_checkpointing"])
def test_lora_and_qlora_train_only_the_adapters(tiny_model_dir, tmp_path, quantized,
                                                checkpointing):
    m = SAILModule(model_name_or_path=str(tiny_model_dir), lora=LORA, lr=1e-2,
                   quantization=QLORA if quantized else None,
                   gradient_checkpointing=checkpointing)
    m.configure_model()
    before = snapshot(m.pair.policy)
    fit(m, tmp_path, steps=3)
    after = snapshot(m.pair.policy)
    assert before.keys() == after.keys()
    changed = {k for k in before if not same_bits(before[k], after[k])}
    # Only adapter weights moved; every lora_B left its zero init.
    assert changed and all("lora_" in k for k in changed)
    assert {k for k in before if "lora_B" in k} <= changed
    # The frozen base, 4-bit packed data and quantization constants included, is bit-identical.
    frozen = [k for k in before if "lora_" not in k]
    assert frozen and all(same_bits(before[k], after[k]) for k in frozen)

    layers = [mod for name, mod in m.pair.policy.named_modules() if name.endswith(LINEARS)]
    assert len(layers) == len(LINEARS) * 2
    for layer in layers:
        base = layer.base_layer
        if quantized:
            assert isinstance(base, bnb.nn.Linear4bit)
            assert base.weight.quant_state.quant_type == "nf4"
            assert base.weight.dtype == torch.float32  # storage = the model's float dtype
        else:
            assert type(base) is torch.nn.Linear

    # Reference = the policy with its adapters off = the base loaded separately.
    batch = a_batch()
    ref, _ = m.pair.reference_logprobs(batch)
    with torch.no_grad():
        expected, _ = concatenated_logprobs(load_base(tiny_model_dir, quantized), batch)
    torch.testing.assert_close(ref, expected, rtol=0, atol=0)
    m.pair.policy.eval()
    with torch.no_grad():
        pol, _ = concatenated_logprobs(m.pair.policy, batch)
    assert not torch.allclose(pol, expected)


def test_qlora_is_an_approximation_of_the_full_precision_base(tiny_model_dir):
    # A sanity check that the 4-bit model is really quantized, and still close.
    batch = a_batch()
    with torch.no_grad():
        full, _ = concatenated_logprobs(load_base(tiny_model_dir, False), batch)
        four, _ = concatenated_logprobs(load_base(tiny_model_dir, True), batch)
    assert not torch.equal(full, four)
    assert (full - four).abs().max() < 0.1 * full.abs().max()


def test_qlora_update_reference_copies_the_adapter_without_merging(tiny_model_dir):
    m = SAILModule(model_name_or_path=str(tiny_model_dir), lora=LORA, quantization=QLORA)
    m.configure_model()
    with torch.no_grad():
        for p in m.pair.policy.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    base = {k: v for k, v in snapshot(m.pair.policy).items() if "lora_" not in k}
    assert_reference_becomes_the_policy(m, synthetic_pairs(6))
    params = dict(m.pair.policy.named_parameters())
    trainable = [n for n, p in params.items() if p.requires_grad]
    assert trainable and all(".default." in n for n in trainable)
    for name in trainable:
        assert torch.equal(params[name], params[name.replace(".default.", ".reference.")])
    after = snapshot(m.pair.policy)
    assert all(same_bits(v, after[k]) for k, v in base.items())  # nothing merged
    assert all(isinstance(mod.base_layer, bnb.nn.Linear4bit)
               for n, mod in m.pair.policy.named_modules() if n.endswith(LINEARS))


def test_qlora_eval_forwards_leave_the_weights_trainable(tiny_model_dir):
    # Online rounds and validation run eval-mode forwards between training steps.
    m = SAILModule(model_name_or_path=str(tiny_model_dir), lora=LORA, quantization=QLORA)
    m.configure_model()
    before = snapshot(m.pair.policy)
    batch = a_batch()

    def train_forward():
        m.pair.policy.train()
        m.pair.policy.zero_grad()
        lp, _ = concatenated_logprobs(m.pair.policy, batch)
        lp.sum().backward()
        grads = [p.grad.clone() for n, p in m.pair.policy.named_parameters() if "lora_B" in n]
        return lp.detach(), grads

    lp0, grads0 = train_forward()
    _, ref = m.pair.pair_logprobs(synthetic_pairs(6), policy=False)  # eval mode, no grad
    m.pair.policy.eval()
    with torch.no_grad():
        lp_eval, _ = concatenated_logprobs(m.pair.policy, batch)
    lp1, grads1 = train_forward()
    torch.testing.assert_close(lp_eval, lp0, rtol=0, atol=0)
    torch.testing.assert_close(lp1, lp0, rtol=0, atol=0)
    assert all(g.abs().sum() > 0 for g in grads1)
    for a, b in zip(grads0, grads1, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    after = snapshot(m.pair.policy)
    assert all(same_bits(v, after[k]) for k, v in before.items())


def test_qlora_separate_reference_is_4bit_frozen_and_left_out_of_checkpoints(tiny_model_dir):
    m = SAILModule(model_name_or_path=str(tiny_model_dir), ref_model_name_or_path=str(
        tiny_model_dir), lora=LORA, quantization=QLORA)
    m.configure_model()
    layers = [mod for n, mod in m.pair.reference.named_modules() if n.endswith(LINEARS)]
    assert layers and all(isinstance(x, bnb.nn.Linear4bit) for x in layers)
    assert not any(p.requires_grad for p in m.pair.reference.parameters())
    batch = a_batch()
    ref, _ = m.pair.reference_logprobs(batch)
    separate, m.pair.reference = m.pair.reference, None  # now the policy with its adapters off
    torch.testing.assert_close(ref, m.pair.reference_logprobs(batch)[0], rtol=0, atol=0)
    m.pair.reference = separate
    checkpoint = {"state_dict": m.state_dict()}
    assert any(k.startswith("pair.reference.") for k in checkpoint["state_dict"])
    m.on_save_checkpoint(checkpoint)
    assert checkpoint["state_dict"]
    assert all(".lora_" in k and k.startswith("pair.policy.") for k in checkpoint["state_dict"])


@pytest.mark.parametrize("kwargs,names", [
    ({"lora": None}, ("model.quantization", "model.lora")),
    ({"model_name_or_path": None, "model_config": TINY_CONFIG, "tokenizer": "synthetic"},
     ("model.quantization", "model.model_config")),
    ({"quantization": QuantizationOptions(quant_type="int4")}, ("quant_type",)),
    ({"quantization": {"compute_dtype": "float64"}}, ("compute_dtype",)),
], ids=["qlora_needs_lora", "qlora_needs_a_path", "qlora_quant_type", "qlora_compute_dtype"])
def test_qlora_bad_options_name_the_options(kwargs, names):
    kw = {"model_name_or_path": "unused", "lora": LORA, "quantization": QLORA, **kwargs}
    with pytest.raises(ValueError) as err:
        SAILModule(**kw)
    assert all(name in str(err.value) for name in names), str(err.value)


QLORA_YAML = """
model:
  model_name_or_path: {path}
  tokenizer: synthetic
  lr: 0.01
  lora: {{r: 4, alpha: 8, dropout: 0.0, target_modules: all-linear}}
  quantization: {{quant_type: nf4, double_quant: true, compute_dtype: float32}}
trainer:
  callbacks:
    - class_path: sail_lightning.export.ExportPolicyCallback
      init_args: {{dirpath: {out}/policy, merge_lora: true}}
"""


def test_qlora_and_export_are_expressible_in_yaml(tiny_model_dir, tmp_path):
    from sail_lightning.cli import main

    config = tmp_path / "qlora.yaml"
    config.write_text(QLORA_YAML.format(path=tiny_model_dir, out=tmp_path))
    assert yaml.safe_load(config.read_text())["model"]["quantization"]["quant_type"] == "nf4"
    main(["fit", "-c", str(config), "--trainer.accelerator=cpu", "--trainer.max_epochs=1",
          "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=0",
          "--trainer.logger=false", "--trainer.enable_checkpointing=false",
          "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}",
          "--data.num_synthetic_pairs=64", "--data.batch_size=8",
          "--data.max_prompt_length=16", "--data.max_response_length=16"])
    # QLoRA exports the adapter only (never merged into 4-bit weights).
    assert (tmp_path / "policy" / "adapter_model.safetensors").exists()
    assert (tmp_path / "policy" / "base_quantization.json").exists()
    assert not (tmp_path / "policy" / "model.safetensors").exists()


# -- QLoRA in bf16 ------------------------------------------------------------------------------


def bf16_qlora(path) -> SAILModule:
    module = SAILModule(model_name_or_path=str(path), tokenizer="synthetic",
                        torch_dtype="bfloat16", lora=LORA, quantization=QuantizationOptions())
    module.configure_model()
    return module


def peft_prepared_bf16(path):
    """The QLoRA recipe with peft's preparation alone (embeddings upcast to float32)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                           bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16,
                           bnb_4bit_quant_storage=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, quantization_config=q)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = LoraConfig(r=LORA.r, lora_alpha=LORA.alpha, lora_dropout=0.0,
                        target_modules="all-linear", task_type="CAUSAL_LM")
    return get_peft_model(model, config).train()


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_qlora_bf16_keeps_the_embeddings_in_bf16(tmp_path, synthetic_tokenizer, tied):
    # peft's k-bit preparation upcasts them to float32: twice their bf16 size, for a frozen
    # layer whose values are bf16 values (Llama-3-8B: 4.2 GB instead of 2.1 GB).
    save_tiny_llama(tmp_path, synthetic_tokenizer, hidden_size=32, seed=0,
                    tie_word_embeddings=tied)
    policy = bf16_qlora(tmp_path).pair.policy
    embed, head = policy.get_input_embeddings(), policy.get_output_embeddings()
    assert embed.weight.dtype == head.weight.dtype == torch.bfloat16
    assert (embed.weight is head.weight) == tied  # casting kept the tie (one tensor)
    dtypes = {name: p.dtype for name, p in policy.named_parameters()}
    assert {d for n, d in dtypes.items() if "norm" in n} == {torch.float32}  # peft's upcast
    assert {d for n, d in dtypes.items() if "lora_" in n} == {torch.float32}


def test_qlora_bf16_log_probs_match_peft_preparation_and_run_without_autocast(tiny_model_dir):
    batch = a_batch()
    ours, theirs = bf16_qlora(tiny_model_dir).pair.policy, peft_prepared_bf16(tiny_model_dir)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected, _ = concatenated_logprobs(theirs, batch)
        mixed, _ = concatenated_logprobs(ours, batch)
        chunked, _ = concatenated_logprobs(ours, batch, chunk_size=5)
    # bf16 embedding outputs instead of float32 ones with the same values: bf16 rounding only.
    torch.testing.assert_close(mixed, expected, rtol=2e-2, atol=0.1)
    torch.testing.assert_close(chunked, mixed, rtol=1e-2, atol=0.05)
    # Without autocast (precision 32-true) the float32 hidden states meet a bf16 output layer,
    # which casts its input (F.linear refuses mixed dtypes).
    with torch.no_grad():
        plain, _ = concatenated_logprobs(ours, batch)
        plain_chunked, _ = concatenated_logprobs(ours, batch, chunk_size=5)
    torch.testing.assert_close(plain, expected, rtol=2e-2, atol=0.1)
    torch.testing.assert_close(plain_chunked, plain, rtol=1e-2, atol=0.05)


def test_qlora_bf16_trains_the_adapters_under_bf16_mixed(tiny_model_dir, tmp_path):
    module = SAILModule(model_name_or_path=tiny_model_dir, tokenizer="synthetic",
                        torch_dtype="bfloat16", lora=LoraOptions(r=4, alpha=8, dropout=0.0),
                        quantization=QuantizationOptions(), gradient_checkpointing=True,
                        logprob_chunk_size=8, lr=1e-2)
    module.configure_model()
    before = snapshot(module.pair.policy)
    fit(module, tmp_path, steps=2, precision="bf16-mixed")
    after = snapshot(module.pair.policy)
    changed = {n for n in before if not same_bits(before[n], after[n])}
    assert changed and all("lora_" in n for n in changed), sorted(changed)[:5]
    assert any("lora_B" in n for n in changed)


@pytest.mark.parametrize("offline", ["", "1"])
def test_importing_the_library_and_bitsandbytes_prints_no_kernels_notice(offline):
    # bitsandbytes logs a notice about the optional `kernels` package at import on CPUs with
    # AVX512-BF16, on every run (peft imports it); the library drops that one message, and
    # the kernels package's own under HF_HUB_OFFLINE=1.
    import os
    import subprocess
    import sys

    code = "import sail_lightning.cli, peft, bitsandbytes"
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env={**env, **({"HF_HUB_OFFLINE": offline} if offline
                                                     else {})})
    assert out.returncode == 0 and "kernels" not in out.stderr + out.stdout

