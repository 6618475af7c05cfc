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
