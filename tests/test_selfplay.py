"""SPIN and SPPO as configurations of the same machinery: objectives against hand-derived
values, their pairs from a round, their batches, and a tiny fit of each shipped config."""

import json
import math

import pytest
import torch

import sail_lightning.rounds as rounds
from sail_lightning.cli import main
from sail_lightning.data.pool import OnlinePair
from sail_lightning.data.tokenize import PreferenceCollator, TokenizedPair
from sail_lightning.generation import SamplingOptions
from sail_lightning.method import MethodSpec
from sail_lightning.objectives import (
    LossOptions,
    Route,
    dpo_loss,
    sail_loss,
    sppo_loss,
    win_probabilities,
)
from sail_lightning.synthetic import OracleLabeller
from tests.conftest import CONFIGS
from tests.helpers import datamodule, module

D = torch.float64


def test_win_probabilities_by_hand():
    # sigmoid(ln 3) = 3/4: sample 1 beats each other one with 3/4; samples 0 and 2 tie
    # (1/2) with each other and lose 1/4 to sample 1: (1/4 + 1/2) / 2 = 3/8.
    p = win_probabilities(torch.tensor([[0.0, math.log(3.0), 0.0]], dtype=D))
    assert p[0].tolist() == pytest.approx([0.375, 0.75, 0.375], abs=1e-15)
    two = win_probabilities(torch.tensor([[1.0, -1.0]], dtype=D))
    assert two[0].tolist() == pytest.approx([1 / (1 + math.exp(-2.0)), 1 / (1 + math.exp(2.0))])
    with pytest.raises(ValueError, match="K >= 2"):
        win_probabilities(torch.zeros(3, 1))


def test_sppo_loss_value_and_gradient_by_hand():
    # a = 0.2, b = -0.1, P_c = 0.8, P_r = 0.3, beta = 0.5: targets 0.6 and -0.4;
    # loss = ((0.2 - 0.6)^2 + (-0.1 + 0.4)^2) / 2 = (0.16 + 0.09) / 2 = 0.125;
    # d/d lp_c = a - 0.6 = -0.4, d/d lp_r = b + 0.4 = 0.3.
    lp_c = torch.tensor([-1.8], dtype=D, requires_grad=True)
    lp_r = torch.tensor([-3.1], dtype=D, requires_grad=True)
    ref_c, ref_r = torch.tensor([-2.0], dtype=D), torch.tensor([-3.0], dtype=D)
    loss = sppo_loss(lp_c, lp_r, ref_c, ref_r, torch.tensor([0.8], dtype=D),
                     torch.tensor([0.3], dtype=D), beta=0.5)
    assert loss.item() == pytest.approx(0.125, abs=1e-14)
    loss.sum().backward()
    assert lp_c.grad.item() == pytest.approx(-0.4, abs=1e-14)
    assert lp_r.grad.item() == pytest.approx(0.3, abs=1e-14)
    # Without estimates: the hard form, P_c = 1 and P_r = 0 (targets 1 and -1 at beta 0.5).
    hard = sppo_loss(lp_c.detach(), lp_r.detach(), ref_c, ref_r, None, None, beta=0.5)
    assert hard.item() == pytest.approx(((0.2 - 1.0) ** 2 + (-0.1 + 1.0) ** 2) / 2)


def test_sail_loss_trains_sppo_on_the_pairs_win_probabilities():
    g = torch.Generator().manual_seed(0)
    lp_c, lp_r, ref_c, ref_r = (-(torch.rand(4, generator=g, dtype=D) * 5 + 1) for _ in range(4))
    win_c, win_r = torch.tensor([0.9, 0.6, 0.7, 0.55], dtype=D), torch.tensor(
        [0.1, 0.4, 0.5, 0.2], dtype=D)
    loss, m = sail_loss(lp_c, lp_r, ref_c, ref_r, torch.full((4,), int(Route.PR)),
                        LossOptions(beta=0.1, loss_type="sppo"), fields={"win_chosen": win_c,
                        "win_rejected": win_r})
    a, b = lp_c - ref_c, lp_r - ref_r
    by_hand = (((a - (win_c - 0.5) * 10) ** 2 + (b - (win_r - 0.5) * 10) ** 2) / 2).mean()
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-14)
    assert "rewards/accuracies" in m
    with pytest.raises(ValueError, match="win probabilities"):
        dpo_loss(lp_c, lp_r, ref_c, ref_r, beta=0.1, loss_type="sppo")


def test_spin_is_the_logistic_loss_on_demonstration_vs_sample():
    # SPIN's loss l(lambda log p(y)/p_t(y) - lambda log p(y')/p_t(y')), l(t) = log(1 + e^-t):
    # with h = 2 and lambda = beta = 0.1, log(1 + e^-0.2) = 0.598138869...
    lp_c = torch.tensor([-3.0], dtype=D, requires_grad=True)
    lp_r = torch.tensor([-6.0], dtype=D, requires_grad=True)
    ref_c, ref_r = torch.tensor([-4.0], dtype=D), torch.tensor([-5.0], dtype=D)
    loss, _ = sail_loss(lp_c, lp_r, ref_c, ref_r, torch.tensor([int(Route.PR)]),
                        LossOptions(beta=0.1))
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.2)), abs=1e-15)
    loss.backward()  # d/d lp_c = -beta sigmoid(-beta h) = -0.1 * sigmoid(-0.2)
    assert lp_c.grad.item() == pytest.approx(-0.1 / (1 + math.exp(0.2)), abs=1e-15)
    assert lp_r.grad.item() == pytest.approx(0.1 / (1 + math.exp(0.2)), abs=1e-15)


@pytest.fixture(scope="module")
def tiny():
    return module(), datamodule()


def build(tiny, pair_mode, num_samples, labeller=None, n=6):
    m, dm = tiny
    out, stats = rounds.build_round(
        m.pair, dm.tokenizer, dm.train_records[:n], dm.train_pairs[:n], labeller,
        SamplingOptions(num_samples=num_samples, max_new_tokens=6, batch_size=32), beta=0.1,
        pair_mode=pair_mode, round_index=0, routes=[int(Route.PR)] * n,
        prompt_positions=list(range(n)), seed=3, progress=False)
    return out, stats


def test_spin_round_pairs_the_demonstration_with_the_policys_sample(tiny):
    m, dm = tiny
    out, stats = build(tiny, "spin", num_samples=2)  # one sample per prompt whatever is set
    assert stats["generated"] == 6
    for p, offline in zip(out, dm.train_pairs[:6], strict=True):
        assert p.pair.chosen_ids == offline.chosen_ids and p.label == "demonstration"
        assert p.rejected == dm.tokenizer.decode(p.pair.rejected_ids, skip_special_tokens=True)
        assert p.pair.ref_chosen is not None and p.pair.win_chosen is None


def test_sppo_round_keeps_the_extreme_win_probabilities(tiny):
    m, dm = tiny
    oracle = OracleLabeller(seed=0)
    out, stats = build(tiny, "sppo", num_samples=4, labeller=oracle)
    assert stats["generated"] == 24
    for p in out:
        assert 0.0 <= p.pair.win_rejected <= p.pair.win_chosen <= 1.0
        assert p.scores["chosen"] >= p.scores["rejected"]  # monotone in the score
        best, worst = (int(x.split("=")[1]) for x in p.label.split(","))
        assert best != worst or p.pair.win_chosen == p.pair.win_rejected
    # A round file keeps the estimates (resume), and a batch carries them to the loss.
    again = OnlinePair.from_json(json.loads(json.dumps(out[0].to_json())))
    assert again.pair == out[0].pair
    batch = PreferenceCollator(0)([out[0].pair.example(int(Route.PR)),
                                   TokenizedPair([1], [2], [3]).example(int(Route.PR))])
    assert batch["win_chosen"].tolist() == [out[0].pair.win_chosen, 1.0]  # hard without
    assert batch["win_rejected"].tolist() == [out[0].pair.win_rejected, 0.0]


@pytest.mark.parametrize("method", ["spin", "sppo"])
def test_shipped_self_play_config_fits_through_the_cli(method, tmp_path):
    main(["fit", "-c", str(CONFIGS / "quickstart.yaml"), "-c", str(CONFIGS / "method" /
          f"{method}.yaml"), f"--trainer.default_root_dir={tmp_path}", "--trainer.max_epochs=2",
          "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
          "--trainer.log_every_n_steps=1", "--data.num_synthetic_pairs=120",
          "--data.online_pairs=16", "--data.batch_size=8"])
    run = tmp_path / method / "version_0"  # named after the method
    rows = [json.loads(line) for line in (run / "rounds" / "round_0001.jsonl").open()]
    assert len(rows) == 16 and all(r["route"] == "pr" for r in rows)
    if method == "sppo":
        assert all(r["win_chosen"] >= r["win_rejected"] for r in rows)
    else:
        assert all(r["label"] == "demonstration" for r in rows)
    import csv
    losses = [float(r["train/loss"]) for r in csv.DictReader((run / "metrics.csv").open())
              if r.get("train/loss")]
    assert losses and all(math.isfinite(x) for x in losses)


def test_method_spec_names_and_checks_spin_and_sppo():
    spin = MethodSpec(mix_pr=1.0, pair_mode="spin", update_reference=True)
    assert spin.name == "spin" and spin.conflicts() == []  # no labeller needed
    sppo = MethodSpec(mix_pr=1.0, pair_mode="sppo", loss_type="sppo", labeller="X",
                      labeller_scores=True, update_reference=True)
    assert sppo.name == "sppo" and sppo.conflicts() == []
