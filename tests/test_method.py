"""MethodSpec: the module's, the data's and the online loop's options must agree, checked
before any model is built, with errors naming the options."""

import lightning as L
import pytest
import yaml

from sail_lightning.callbacks import PairGenerationCallback
from sail_lightning.labellers import PairwiseRankerLabeller
from sail_lightning.method import MethodSpec
from tests.conftest import CONFIGS
from tests.helpers import datamodule, module


def spec(**kw) -> MethodSpec:
    return MethodSpec(**kw)


@pytest.mark.parametrize("kw,names", [
    ({"mix_pr": 0.3}, ["data.mix_pr", "PairGenerationCallback"]),
    ({"pair_mode": "two_samples", "labeller": "OracleLabeller"},
     ["PairGenerationCallback", "data.mix_pp = data.mix_pr = 0"]),
    ({"coef_pr": 0.3}, ["model.coef_pr=0.3", "data.mix_pr=0"]),
    ({"coef_dp": 0.2}, ["model.coef_dp=0.2", "data.mix_dp=0"]),
    ({"mix_pp": 0.3, "pair_mode": "best_worst", "labeller": "X", "labeller_scores": True},
     ["data.mix_pp=0.3", "pair_mode=two_samples", "'best_worst'"]),
    ({"mix_pr": 1.0, "coef_pr": 0.3, "pair_mode": "selm", "labeller": "X",
      "labeller_scores": True, "bonus_alpha": 0.001}, ["model.coef_pr=0.3", "'selm'"]),
    ({"mix_pr": 0.3, "pair_mode": "two_samples"}, ["data.mix_pr=0.3", "labeller", "data.oracle"]),
    ({"mix_pr": 1.0, "pair_mode": "best_worst", "labeller": "PairwiseRankerLabeller"},
     ["pair_mode=best_worst", "PairwiseRankerLabeller has none"]),
    ({"mix_pr": 0.3, "pair_mode": "two_samples", "labeller": "X", "bonus_alpha": 1e-3},
     ["model.bonus_alpha=0.001", "'two_samples'"]),
    ({"mix_pr": 1.0, "pair_mode": "best_worst", "labeller": "X", "labeller_scores": True,
      "loss_type": "sppo"}, ["model.loss_type='sppo'", "pair_mode='best_worst'"]),
    ({"mix_pr": 1.0, "pair_mode": "sppo", "labeller": "X", "labeller_scores": True},
     ["model.loss_type='sigmoid'", "pair_mode='sppo'"]),
    ({"mix_pr": 1.0, "pair_mode": "spin", "loss_type": "ipo"}, ["pair_mode='spin'", "'ipo'"]),
    ({"mix_pr": 0.7, "mix_dp": 0.3, "pair_mode": "sppo", "labeller": "X",
      "labeller_scores": True, "loss_type": "sppo"}, ["model.loss_type='sppo'", "data.mix_dp=0.3"]),
    ({"mix_pr": 1.0, "pair_mode": "sppo", "labeller": "PairwiseRankerLabeller",
      "loss_type": "sppo"}, ["pair_mode=sppo", "PairwiseRankerLabeller has none"]),
    ({"mix_pr": 1.0, "pair_mode": "selm", "labeller": "X", "labeller_scores": True,
      "bonus_alpha": 1e-3, "bonus_form": "xpo"}, ["model.bonus_form='xpo'", "pair_mode='selm'"]),
])
def test_each_conflict_names_its_options(kw, names):
    problems = spec(**kw).conflicts()
    assert len(problems) == 1, problems
    assert all(name in problems[0] for name in names), problems[0]
    with pytest.raises(ValueError, match="disagree"):
        spec(**kw).check()


def every_method_config():
    quick = yaml.safe_load((CONFIGS / "quickstart.yaml").read_text())
    for path in sorted((CONFIGS / "method").glob("*.yaml")):
        cfg = yaml.safe_load(path.read_text())
        model = {**quick["model"], **cfg.get("model", {})}
        data = {**quick["data"], **cfg.get("data", {})}
        gen = next((c["init_args"] for c in cfg["trainer"]["callbacks"]
                    if c["class_path"].endswith("PairGenerationCallback")), None)
        labeller = None
        if gen is not None:
            labeller = (gen.get("labeller") or data["oracle"])["class_path"].rsplit(".", 1)[-1]
        yield path.stem, MethodSpec(
            **{k: model[k] for k in ("coef_dp", "coef_pp", "coef_pr") if k in model},
            **{k: model[k] for k in ("loss_type", "bonus_alpha", "bonus_form") if k in model},
            **{k: data[k] for k in ("mix_dp", "mix_pp", "mix_pr")},
            pair_mode=gen.get("pair_mode", "two_samples") if gen is not None else None,
            labeller=labeller, labeller_scores=True,
            update_reference=bool(gen and gen.get("update_reference")))


def test_every_shipped_method_config_agrees_and_is_named_after_itself():
    names = {}
    for stem, s in every_method_config():
        assert s.conflicts() == [], stem
        names[stem] = s.name
    assert names == {"dpo": "dpo", "ipo": "ipo", "sail_dp": "sail_dp", "sail_pp": "sail_pp",
                     "sail_pr": "sail_pr", "sail_pr_rm": "sail_pr", "online_dpo": "online_dpo",
                     "iterative_dpo": "iterative_dpo", "selm": "selm", "xpo": "xpo",
                     "spin": "spin", "sppo": "sppo", "sft": "sft"}


def test_special_cases_and_mixtures_are_named():
    assert spec(mix_pr=1.0, pair_mode="two_samples", labeller="X").name == "online_dpo"
    assert spec(mix_dp=0.2, mix_pp=0.2, mix_pr=0.2, coef_pr=0.1, pair_mode="two_samples",
                labeller="X").name == "sail_dp+sail_pp+sail_pr"
    assert spec(pair_mode="two_samples", update_reference=True).name == "dpo_ref_updates"
    assert spec(pair_mode="two_samples", update_reference=True).conflicts() == []


def test_a_fit_checks_the_method_before_building_any_model(tmp_path):
    m = module(configure=False, coef_pr=0.3)
    built = []
    real = m.configure_model
    m.configure_model = lambda: built.append(1) or real()
    # SAIL-PR with no labeller anywhere (no data.oracle): refused before configure_model.
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, default_root_dir=tmp_path,
                        reload_dataloaders_every_n_epochs=1, enable_progress_bar=False,
                        callbacks=[PairGenerationCallback(progress=False)])
    with pytest.raises(ValueError, match=r"(?s)data\.mix_pr=0\.3.*labeller.*data\.oracle"):
        trainer.fit(m, datamodule=datamodule(setup=False, mix_pr=0.3, oracle=None))
    assert built == []
    # A ranker cannot rank best_worst candidates: its class is named.
    cb = PairGenerationCallback(pair_mode="best_worst", progress=False,
                                labeller=PairwiseRankerLabeller(lambda p, a, b: [0.5] * len(p)))
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, default_root_dir=tmp_path,
                        reload_dataloaders_every_n_epochs=1, callbacks=[cb])
    with pytest.raises(ValueError, match="PairwiseRankerLabeller has none"):
        trainer.fit(module(configure=False), datamodule=datamodule(
            setup=False, mix_pr=1.0, online_pairs=16))


def test_a_missing_generation_callback_is_named_before_the_first_batch(tmp_path):
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="add it to trainer.callbacks"):
        trainer.fit(module(configure=False), datamodule=datamodule(setup=False, mix_pr=0.3))
