"""build_tokenizer: the built-in name, a saved folder, and the pad token guarantee."""

from sail_lightning.synthetic import SyntheticTask
from sail_lightning.tokenizer import SYNTHETIC_TOKENIZER, build_tokenizer

TASK = SyntheticTask()


def test_build_tokenizer(tmp_path):
    tok = build_tokenizer(SYNTHETIC_TOKENIZER)
    assert tok.get_vocab() == TASK.build_tokenizer().get_vocab()
    assert build_tokenizer("synthetic", padding_side="left").padding_side == "left"
    tok.save_pretrained(tmp_path)
    loaded = build_tokenizer(str(tmp_path))
    assert loaded.get_vocab() == tok.get_vocab()
    assert loaded.pad_token_id == 0


def test_build_tokenizer_sets_pad_from_eos(tmp_path):
    tok = TASK.build_tokenizer()
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    loaded = build_tokenizer(str(tmp_path))
    assert loaded.pad_token == "<eos>" and loaded.pad_token_id == 2


def test_decode_drops_bytes_that_form_no_character():
    """Byte-level BPE: a sampled lone byte of a character (or one cut by max_new_tokens) is
    dropped from a response's text instead of becoming U+FFFD; valid text, a literal U+FFFD
    included, decodes as before, and the special tokens are dropped."""
    from sail_lightning.data.bpe import train_tokenizer
    from sail_lightning.generation import decode

    tok = train_tokenizer(["plain words and more words"] * 3, vocab_size=300)
    cafe = tok("café \ufffd ok", add_special_tokens=False)["input_ids"]
    assert decode(tok, cafe) == "café \ufffd ok" == tok.decode(cafe)
    e_bytes = tok("é", add_special_tokens=False)["input_ids"]
    assert len(e_bytes) == 2  # never merged: one token per byte of the character
    stray = tok("a", add_special_tokens=False)["input_ids"] + e_bytes[:1] + tok(
        " b", add_special_tokens=False)["input_ids"]
    assert "\ufffd" in tok.decode(stray)
    assert decode(tok, stray) == "a b"
    cut = [tok.bos_token_id, *tok("ok ", add_special_tokens=False)["input_ids"], e_bytes[0],
           tok.eos_token_id]
    assert decode(tok, cut) == "ok "
