"""Byte-level BPE tokenizers trained on local text, with the special tokens and chat
template of a model family: real tokenizers for real text, without a download."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from sail_lightning.data.records import PreferenceRecord


@dataclass(frozen=True)
class ChatFormat:
    """Special tokens and a Jinja chat template in the style of a model family.

    ``eos`` ends an assistant turn: a prompt rendered with the generation prompt, then a
    response and eos (as ``data/tokenize.py`` encodes a pair, the response's leading
    whitespace stripped) is the rendered conversation, and generation stops at the turn's end.
    """

    bos: str
    eos: str
    pad: str
    extra: tuple[str, ...]
    template: str


CHAT_FORMATS = {
    "chatml": ChatFormat(  # Qwen / ChatML
        "<|startoftext|>", "<|im_end|>", "<|endoftext|>", ("<|im_start|>",),
        "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
        "{% endif %}"),
    "llama3": ChatFormat(  # Llama 3
        "<|begin_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>",
        ("<|start_header_id|>", "<|end_header_id|>", "<|end_of_text|>"),
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
        "<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n"
        "{% endif %}"),
    "zephyr": ChatFormat(  # Zephyr
        "<s>", "</s>", "<pad>", ("<|system|>", "<|user|>", "<|assistant|>"),
        "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
        "{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"),
}


def record_texts(records: Iterable[PreferenceRecord]) -> Iterable[str]:
    """The turns and both responses of each record: what the models will read."""
    for r in records:
        yield from (content for _, content in r.messages)
        yield r.chosen
        yield r.rejected


def train_tokenizer(
    texts: Iterable[str], *, vocab_size: int, chat_format: str = "chatml",
    min_frequency: int = 2, max_length: int = 1024,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (GPT-2's pre-tokenization: no unknown tokens).

    Args:
        texts: Training text; the result depends on it and its order only (no seed).
        vocab_size: Target size, special tokens included; smaller if the text runs out of
            pairs to merge.
        chat_format: A key of :data:`CHAT_FORMATS`: its special tokens and template.
        min_frequency: A pair is merged only if it occurs at least this often.
        max_length: The tokenizer's ``model_max_length``.

    Returns:
        A fast tokenizer with bos/eos/pad set, bos prepended to single sequences (as Llama
        does) and the chat template set; decoding returns the text exactly.
    """
    fmt = CHAT_FORMATS[chat_format]
    specials = list(dict.fromkeys((fmt.pad, fmt.bos, fmt.eos, *fmt.extra)))
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(texts, trainer=trainer)
    bos_id = backend.token_to_id(fmt.bos)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{fmt.bos} $A", pair=f"{fmt.bos} $A $B", special_tokens=[(fmt.bos, bos_id)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=fmt.bos, eos_token=fmt.eos, pad_token=fmt.pad,
        additional_special_tokens=list(fmt.extra), padding_side="right",
        model_max_length=max_length, clean_up_tokenization_spaces=False)
    tokenizer.chat_template = fmt.template
    return tokenizer
