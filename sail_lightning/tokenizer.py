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
