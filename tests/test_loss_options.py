"""LossOptions: the objective's options, checked once on construction (each error names the
``model.`` option), built once by the module and handed whole to the objective and guard."""

import dataclasses

import pytest

from sail_lightning.objectives import LossOptions


@pytest.mark.parametrize("bad,option", [
    ({"beta": 0.0}, "model.beta"), ({"beta": float("nan")}, "model.beta"),
    ({"loss_type": "kto"}, "model.loss_type"), ({"label_smoothing": 0.5}, "model.label_smoothing"),
    ({"coef_dp": -0.1}, "model.coef_dp"), ({"coef_pp": float("nan")}, "model.coef_pp"),
    ({"coef_pr": -1.0}, "model.coef_pr"), ({"response_term": "hook"}, "model.response_term"),
    ({"baseline": "median"}, "model.baseline"), ({"bonus_alpha": -1e-3}, "model.bonus_alpha"),
    ({"bonus_form": "dpo"}, "model.bonus_form"),
    ({"loss_type": "ipo", "coef_pr": 0.3}, "model.loss_type=sigmoid"),
    ({"loss_type": "sppo", "coef_dp": 0.3}, "model.loss_type=sigmoid"),
])
def test_each_bad_option_is_refused_naming_it(bad, option):
    with pytest.raises(ValueError, match=option.replace(".", r"\.")):
        LossOptions(**bad)


def test_options_are_frozen_and_read_from_a_mapping():
    options = LossOptions.from_mapping({"beta": 0.2, "coef_pr": 0.3, "lr": 1.0, "lora": None})
    assert options == LossOptions(beta=0.2, coef_pr=0.3)
    assert options.loss.name == "sigmoid" and LossOptions(loss_type="sft").loss is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.beta = 0.3


def test_the_module_builds_them_once_and_hands_them_whole_to_the_objective(monkeypatch,
                                                                         tmp_path):
    import lightning as L

    import sail_lightning.module as module_file
    from tests.helpers import collate, module, synthetic_pairs

    m = module(coef_pr=0.3, baseline="mean")
    assert m.loss_options == LossOptions(coef_pr=0.3, baseline="mean")
    seen = []
    real = module_file.sail_loss
    monkeypatch.setattr(module_file, "sail_loss",
                        lambda *a, **k: seen.append(a[5]) or real(*a, **k))
    m.logging_step = lambda: False
    m.trainer = L.Trainer(accelerator="cpu", logger=False, default_root_dir=tmp_path)
    m.training_step(collate(synthetic_pairs(4), route=3), 0)
    assert seen == [m.loss_options] and seen[0] is m.loss_options
