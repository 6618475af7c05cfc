"""What the CLI says when a first run goes wrong: the line that matters last, every command
in the help, no option ignored silently."""

import pytest

from sail_lightning.cli import main
from tests.conftest import CONFIGS

QUICK = str(CONFIGS / "quickstart.yaml")


def _labeller_config(tmp_path, labeller: str) -> str:
    path = tmp_path / "labeller.yaml"
    path.write_text(f"""\
trainer:
  callbacks:
    - class_path: sail_lightning.callbacks.PairGenerationCallback
      init_args:
        pair_mode: two_samples
        labeller: {labeller}
""")
    return str(path)


def test_unimportable_labeller_class_ends_the_parse_error(tmp_path, capsys):
    """A class of one's own without PYTHONPATH: the parse error's last line says so."""
    config = _labeller_config(tmp_path, "{class_path: no_such_labellers_mod.MyLabeller}")
    with pytest.raises(SystemExit):
        main(["fit", "-c", QUICK, "-c", config, f"--trainer.default_root_dir={tmp_path}"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "cannot import class_path 'no_such_labellers_mod.MyLabeller'" in last
    assert "no module named 'no_such_labellers_mod'" in last and "PYTHONPATH" in last


def test_unimportable_labeller_function_is_raised_alone(tmp_path):
    """`CallableLabeller(fn="my_module:score")` fails as the classes are built: its own
    ImportError, not the union errors jsonargparse wraps it in (150 lines, it at line 40)."""
    config = _labeller_config(
        tmp_path, "{class_path: sail_lightning.labellers.CallableLabeller, "
                  "init_args: {fn: 'no_such_labeller_mod:score'}}")
    with pytest.raises(ImportError) as error:
        main(["fit", "-c", QUICK, "-c", config, f"--trainer.default_root_dir={tmp_path}"])
    assert "cannot import module 'no_such_labeller_mod'" in str(error.value)
    assert "PYTHONPATH" in str(error.value)
    assert error.value.__cause__ is None and error.value.__suppress_context__


def test_online_pairs_below_a_full_mixture_is_not_ignored_silently(recwarn):
    from tests.helpers import datamodule

    with pytest.warns(UserWarning, match=r"data.online_pairs=64 is ignored.*data.mix_pp \+ "
                                         r"data.mix_pr = 1 \(here 0.3\)"):
        datamodule(setup=False, mix_pr=0.3, online_pairs=64)
    recwarn.clear()
    datamodule(setup=False, mix_pr=1.0, online_pairs=64)  # it sets the epoch's size here
    assert not [w for w in recwarn if "online_pairs" in str(w.message)]


def test_no_too_long_warning_for_texts_that_are_cut_anyway(synthetic_tokenizer):
    """transformers warns "Token indices sequence length is longer than the specified maximum
    ... will result in indexing errors" for ids past ``model_max_length``; prompts and
    responses are cut to data.max_*_length right after, so that warning only alarms."""
    import copy

    from sail_lightning.data.formats import PreferenceRecord
    from sail_lightning.data.tokenize import encode_prompts, encode_responses

    key = "sequence-length-is-longer-than-the-specified-maximum"
    tok = copy.deepcopy(synthetic_tokenizer)
    tok.model_max_length = 4
    long = " ".join(["1 + 2 ="] * 5)
    record = PreferenceRecord(prompt=long, messages=(("user", long),), chosen="3",
                              rejected="4", location="test:1")
    assert len(encode_prompts(tok, [record], 3)[0]) == 3
    assert len(encode_responses(tok, [long], 3)[0]) == 3
    assert not tok.deprecation_warnings.get(key)
    from sail_lightning.labellers import RewardModelLabeller

    labeller = RewardModelLabeller("unused", max_length=3, progress=False)
    labeller.tokenizer = tok  # _encode only needs the tokenizer
    assert len(labeller._encode(long, long, None)) == 3
    assert not tok.deprecation_warnings.get(key)
    tok(long)  # the check does fire on a call that does not cut
    assert tok.deprecation_warnings.get(key)
