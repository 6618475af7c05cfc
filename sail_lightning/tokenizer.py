"""Tokenizer loading: the one entry point for the module, the data, labellers and export."""

from __future__ import annotations

from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from sail_lightning.synthetic import SyntheticTask

SYNTHETIC_TOKENIZER = "synthetic"
"""Built-in name of the embedded synthetic task's tokenizer (no file needed)."""
BUILT_IN = {SYNTHETIC_TOKENIZER: lambda: SyntheticTask().build_tokenizer()}
"""Tokenizers built in code, by name (no file needed)."""


def build_tokenizer(name_or_path: str, **kwargs: Any) -> PreTrainedTokenizerBase:
    """Loads a tokenizer by hub name, local folder, or built-in name.

    Args:
        name_or_path: a name of ``BUILT_IN`` (``"synthetic"``: the tokenizer of
            ``sail_lightning.synthetic.SyntheticTask()``); anything else goes to
            ``AutoTokenizer.from_pretrained``, which handles hub names and local folders
            alike (the same code path, so a saved copy loads exactly as the original).
        **kwargs: Passed to ``AutoTokenizer.from_pretrained``. For a built-in tokenizer only
            ``padding_side`` is honoured; the other (loading) options do not apply.

    Returns:
        The tokenizer, with a pad token guaranteed (``pad = eos`` when it had none).

    Raises:
        ValueError: If the tokenizer has neither a pad nor an eos token.
    """
    if name_or_path in BUILT_IN:
        tokenizer = BUILT_IN[name_or_path]()
        if "padding_side" in kwargs:
            tokenizer.padding_side = kwargs["padding_side"]
    else:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer {name_or_path!r} has neither a pad nor an eos token")
        # Reusing eos keeps the vocabulary (and so the model's embeddings) unchanged.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def decode_text(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> str:
    """``ids`` as text, special tokens dropped, and, for a byte-level BPE tokenizer (GPT-2's,
    Llama 3's, Qwen's, ``build-models``'), bytes that form no UTF-8 character dropped too.

    Such a tokenizer holds tokens of single bytes of a character (153 of the 4,096 of
    ``build-models``' policy), and a policy can sample them out of place: a lead byte with
    no continuation, a stray continuation byte, or a character cut by ``max_new_tokens``.
    ``tokenizer.decode`` renders each as U+FFFD, which no labeller was trained on (57% of the
    real-text example's samples had one). The pairs themselves are trained on their token
    ids; only their text (labelling, logs, round files) is affected.
    """
    text = tokenizer.decode(ids, skip_special_tokens=True)
    if "\ufffd" not in text or not _byte_level(tokenizer):
        return text
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    to_byte = {char: byte for byte, char in bytes_to_unicode().items()}
    special, added = set(tokenizer.all_special_ids), tokenizer.get_added_vocab()
    pieces = []
    for token_id, token in zip(ids, tokenizer.convert_ids_to_tokens(ids), strict=True):
        if token_id in special:
            continue
        if token in added or any(c not in to_byte for c in token):
            pieces.append(token.encode())  # an added token is stored as its text
        else:
            pieces.append(bytes(to_byte[c] for c in token))
    return b"".join(pieces).decode("utf-8", errors="ignore")


def _byte_level(tokenizer: PreTrainedTokenizerBase) -> bool:
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    return type(decoder).__name__ == "ByteLevel"
