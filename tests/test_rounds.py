"""build_round: each pair mode's pairs, their texts and their cached reference log-probs."""

import pytest

import sail_lightning.rounds as rounds
from sail_lightning.common import Route
from sail_lightning.generation import SamplingOptions
from sail_lightning.pair_modes import best_worst
from sail_lightning.synthetic import OracleLabeller
from tests.helpers import datamodule, module


@pytest.mark.parametrize("pair_mode", ["two_samples", "best_worst", "selm", "xpo"])
def test_round_decodes_each_sample_once_and_records_its_pair_texts(pair_mode, monkeypatch):
    decoded = []

    def counting_decode(tok, ids):
        decoded.append(list(ids))
        return tok.decode(ids, skip_special_tokens=True)

    monkeypatch.setattr(rounds, "decode", counting_decode)
    monkeypatch.setattr(best_worst, "decode", counting_decode)  # selm's dataset responses
    m, dm, n = module(), datamodule(), 6
    sampling = SamplingOptions(num_samples=3 if pair_mode == "best_worst" else 2,
                               max_new_tokens=6, batch_size=32)
    routes = [int(Route.PP)] * 2 + [int(Route.PR)] * (n - 2)
    out, stats = rounds.build_round(
        m.pair, dm.tokenizer, dm.train_records[:n], dm.train_pairs[:n], OracleLabeller(seed=0),
        sampling, beta=0.1, pair_mode=pair_mode, round_index=0,
        routes=routes if pair_mode == "two_samples" else [int(Route.PR)] * n,
        prompt_positions=list(range(n)), seed=3, progress=False)
    tok = dm.tokenizer
    for p in out:  # the texts are those of the pair's token ids, as when decoded again
        assert p.chosen == tok.decode(p.pair.chosen_ids, skip_special_tokens=True)
        assert p.rejected == tok.decode(p.pair.rejected_ids, skip_special_tokens=True)
        assert p.pair.ref_chosen is not None and p.pair.ref_rejected is not None
        assert (p.pair.ref_bonus is not None) == (pair_mode in ("selm", "xpo"))
    # Each sample decoded once; selm also decodes the dataset responses it picks (index >= 1).
    picked = 0
    if pair_mode == "selm":
        picked = sum(int(x.split("=")[1]) >= 1 for p in out for x in p.label.split(","))
        assert picked < 2 * n  # some picks are the sample: the old code decoded 3 per prompt
    assert len(decoded) == stats["generated"] + picked
