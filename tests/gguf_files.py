"""Tiny GGUF files written here, as llama.cpp's converter writes them, so that the default
suite converts a GGUF model without the 98 MB SmolLM2 file.

``write_gguf`` takes a Hugging Face Llama and its byte-level BPE tokenizer and writes them
with gguf's own writer: llama.cpp's tensor names, its row permutation of the query and key
projections (transformers undoes it on load), the vocabulary, merges, token types, special
token ids and chat template as tokenizer metadata. Reading the file back must give the
original model's logits, which is what the tests check.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch

from sail_lightning.build_models import ModelSpec, build_model

_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _permute(weight: np.ndarray, heads: int) -> np.ndarray:
    # llama.cpp's rotary layout: each head's rows interleaved in halves.
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def rope_theta(config) -> float:
    """The rotary base: ``rope_parameters["rope_theta"]`` in transformers 5, the
    ``rope_theta`` attribute in 4.x (the vLLM environment's)."""
    parameters = getattr(config, "rope_parameters", None) or {}
    if "rope_theta" in parameters:
        return float(parameters["rope_theta"])
    return float(config.rope_theta)  # neither: an AttributeError naming it


def _tensors(model, config) -> dict[str, np.ndarray]:
    out = {}
    for name, tensor in model.state_dict().items():
        array = tensor.float().numpy()
        if name == "model.embed_tokens.weight":
            out["token_embd.weight"] = array
        elif name == "model.norm.weight":
            out["output_norm.weight"] = array
        elif name == "lm_head.weight":
            if not config.tie_word_embeddings:
                out["output.weight"] = array
        else:
            _, _, layer, rest = name.split(".", 3)
            part = rest.removesuffix(".weight")
            if part == "self_attn.q_proj":
                array = _permute(array, config.num_attention_heads)
            elif part == "self_attn.k_proj":
                array = _permute(array, config.num_key_value_heads)
            out[f"blk.{layer}.{_LAYER_NAMES[part]}.weight"] = array
    return out


def write_gguf(path: Path, model, tokenizer, *, quantize: bool = False) -> Path:
    """Write ``model`` (a ``LlamaForCausalLM``) and ``tokenizer`` as one GGUF file.

    ``quantize``: store the matrices as Q8_0 (llama.cpp's 8-bit blocks), as real files store
    most of theirs, so that reading dequantizes; the norms stay float32.
    """
    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-test-llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_vocab_size(config.vocab_size)
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    added = {t["content"]: t["id"] for t in backend["added_tokens"]}
    vocab = {**backend["model"]["vocab"], **added}
    tokens = sorted(vocab, key=vocab.get)
    special = set(added)  # control tokens: kept whole
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in special else 1 for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m)
                             for m in backend["model"]["merges"]])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id)
    writer.add_chat_template(tokenizer.chat_template)
    for name, array in _tensors(model, config).items():
        if quantize and array.ndim == 2 and array.shape[1] % 32 == 0:
            kind = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(name, gguf.quants.quantize(array, kind), raw_dtype=kind)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tiny_gguf(folder: Path, *, texts: list[str], tied: bool = True, seed: int = 0,
              quantize: bool = False):
    """A tiny chatml Llama (BPE vocabulary trained on ``texts``) written to
    ``folder/tiny.gguf``; returns the path, the model and its tokenizer."""
    spec = ModelSpec(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4,
                     num_kv_heads=2, max_positions=256)
    tokenizer, model = build_model(spec, texts, reward=False, seed=seed)
    if tied:
        model.config.tie_word_embeddings = True
        model.tie_weights()
    with torch.no_grad():  # norms away from 1, so a mix-up of them would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    folder.mkdir(parents=True, exist_ok=True)
    return write_gguf(folder / "tiny.gguf", model, tokenizer, quantize=quantize), model, tokenizer
