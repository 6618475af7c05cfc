"""Each pair mode's selection and orientation, on scripted samples and a scripted labeller
(no model: ``PairMode.select`` on ``RoundInputs``), what each generates, and the registry:
a mode added by one class works through ``build_round`` and ``MethodSpec``."""

import contextlib

import pytest
import torch

from sail_lightning import pair_modes
from sail_lightning.common import Route
from sail_lightning.data.records import PreferenceRecord
from sail_lightning.data.tokenize import TokenizedPair
from sail_lightning.generation import SamplingOptions
from sail_lightning.labellers import Labeller, Labels, PolicyLabeller
from sail_lightning.method import MethodSpec
from sail_lightning.objectives import win_probabilities
from sail_lightning.pair_modes import PairMode, RoundInputs, Selected, get_pair_mode
from sail_lightning.pair_modes.base import _REGISTRY, make_pair, register


class Scripted(Labeller):
    """Scores a response by a table of its text; labels ``a`` chosen where ``prefer_a``."""

    def __init__(self, scores=None, prefer_a=None) -> None:
        self.scores, self.prefer_a, self.calls = scores or {}, prefer_a, []

    def label(self, prompts, responses_a, responses_b, *, messages=None) -> Labels:
        self.calls.append(("label", list(responses_a), list(responses_b)))
        a = torch.tensor(self.prefer_a[: len(prompts)])
        sa = torch.tensor([self.scores.get(t, 0.0) for t in responses_a])
        sb = torch.tensor([self.scores.get(t, 0.0) for t in responses_b])
        return Labels(a, sa, sb)

    def score(self, prompts, responses, *, messages=None):
        self.calls.append(("score", list(responses)))
        return torch.tensor([self.scores[t] for t in responses], dtype=torch.float32)


class Words:
    """A tokenizer whose token ``i`` decodes to the word ``w<i>``."""

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(f"w{i}" for i in ids)


def text(ids):
    return Words().decode(ids)


def inputs(samples, labeller=None, routes=None, offline=None, pair=None):
    n = len(samples)
    offline = offline or [TokenizedPair([1, 2], [50 + k], [60 + k]) for k in range(n)]
    records = [PreferenceRecord(f"p{k}", (("user", f"p{k}"),), text(o.chosen_ids),
                                text(o.rejected_ids), f"test:{k}") for k, o in enumerate(offline)]
    return RoundInputs(pair, Words(), records, offline, labeller, samples,
                       [[text(s) for s in group] for group in samples],
                       routes or [int(Route.PR)] * n, beta=0.1, seed=0, score_batch_size=8)


def test_best_worst_pairs_the_highest_with_the_lowest_score():
    samples = [[[3], [4], [5], [6]], [[7], [8], [9], [10]]]
    scores = {"w3": 0.1, "w4": 2.0, "w5": -1.0, "w6": 0.5,
              "w7": -3.0, "w8": -2.0, "w9": 1.0, "w10": 4.0}
    out = get_pair_mode("best_worst").select(inputs(samples, Scripted(scores)))
    assert [(p.pair.chosen_ids, p.pair.rejected_ids) for p in out] == [([4], [5]), ([10], [7])]
    assert [p.label for p in out] == ["best=1,worst=2", "best=3,worst=0"]
    assert out[0].scores == {"chosen": 2.0, "rejected": -1.0}
    assert (out[0].chosen, out[0].rejected) == ("w4", "w5")
    assert out[0].pair.bonus_ids is None and out[0].pair.win_chosen is None


def test_best_worst_of_equal_scores_keeps_the_first_sample_on_both_sides():
    out = get_pair_mode("best_worst").select(inputs([[[3], [4]]], Scripted({"w3": 1, "w4": 1})))
    assert out[0].label == "best=0,worst=0" and out[0].pair.chosen_ids == [3]


def test_best_worst_refuses_a_labeller_without_scores():
    class NoScores(Scripted):
        def score(self, prompts, responses, *, messages=None):
            return None

    with pytest.raises(ValueError, match="needs a labeller with scores"):
        get_pair_mode("best_worst").select(inputs([[[3], [4]]], NoScores()))
    with pytest.raises(ValueError, match="ranks candidates"):
        get_pair_mode("best_worst").select(inputs([[[3], [4]]], None))


def test_selm_ranks_its_reference_sample_with_the_dataset_pair_and_carries_its_bonus():
    offline = [TokenizedPair([1], [50], [60]), TokenizedPair([1], [51], [61])]
    labeller = Scripted({"w3": 0.0, "w50": 1.0, "w60": -1.0,   # the dataset's chosen wins
                         "w4": 5.0, "w51": 0.0, "w61": 1.0})   # the sample wins, chosen loses
    out = get_pair_mode("selm").select(inputs([[[3]], [[4]]], labeller, offline=offline))
    assert labeller.calls == [("score", ["w3", "w50", "w60", "w4", "w51", "w61"])]
    assert (out[0].pair.chosen_ids, out[0].pair.rejected_ids) == ([50], [60])
    assert (out[1].pair.chosen_ids, out[1].pair.rejected_ids) == ([4], [51])
    assert [p.pair.bonus_ids for p in out] == [[3], [4]]  # the reference sample, always
    assert [p.label for p in out] == ["best=1,worst=2", "best=0,worst=1"]
    assert (out[0].chosen, out[0].rejected) == ("w50", "w60")  # decoded from the tokens


def test_sppo_pairs_the_extreme_win_probabilities_and_carries_them():
    scores = {"w3": 0.0, "w4": 2.0, "w5": -1.0}
    out = get_pair_mode("sppo").select(inputs([[[3], [4], [5]]], Scripted(scores)))
    win = win_probabilities(torch.tensor([[0.0, 2.0, -1.0]]).double())[0]
    p = out[0]
    assert (p.pair.chosen_ids, p.pair.rejected_ids, p.label) == ([4], [5], "best=1,worst=2")
    assert (p.pair.win_chosen, p.pair.win_rejected) == (float(win[1]), float(win[2]))
    assert p.pair.win_chosen > 0.5 > p.pair.win_rejected
    assert p.scores == {"chosen": 2.0, "rejected": -1.0}  # the labeller's, not the estimates


@pytest.mark.parametrize("name", ["two_samples", "xpo"])
def test_two_samples_and_xpo_orient_each_pair_by_the_label(name):
    samples = [[[3], [4]], [[5], [6]]]
    labeller = Scripted({"w3": 1.0, "w4": 0.0, "w5": 0.0, "w6": 2.0}, prefer_a=[True, False])
    out = get_pair_mode(name).select(inputs(samples, labeller))
    assert labeller.calls == [("label", ["w3", "w5"], ["w4", "w6"])]  # a = first sample
    assert [(p.pair.chosen_ids, p.pair.rejected_ids, p.label) for p in out] == [
        ([3], [4], "a"), ([6], [5], "b")]
    assert [(p.chosen, p.rejected) for p in out] == [("w3", "w4"), ("w6", "w5")]
    assert [p.scores for p in out] == [{"chosen": 1.0, "rejected": 0.0},
                                       {"chosen": 2.0, "rejected": 0.0}]
    # XPO's second sample is the reference's: its bonus response whichever side it is on.
    want = [[4], [6]] if name == "xpo" else [None, None]
    assert [p.pair.bonus_ids for p in out] == want


def test_two_samples_pr_pairs_need_a_labeller():
    with pytest.raises(ValueError, match="need a labeller"):
        get_pair_mode("two_samples").select(inputs([[[3], [4]]], None))


def test_two_samples_labels_pp_pairs_by_the_policy_with_the_shard_seed():
    from tests.helpers import module

    m = module()
    samples = [[[5, 6], [7]], [[8], [9, 10]], [[11], [12]]]
    routes = [int(Route.PP), int(Route.PR), int(Route.PP)]
    labeller = Scripted(prefer_a=[False])
    ins = inputs(samples, labeller, routes=routes, pair=m.pair)
    ins.seed = 11
    out = get_pair_mode("two_samples").select(ins)
    assert labeller.calls == [("label", ["w8"], ["w9 w10"])]  # the PR prompt only
    want = PolicyLabeller(m.pair, 0.1, seed=11, batch_size=8).label_ids(
        [[1, 2], [1, 2]], [[5, 6], [11]], [[7], [12]]).a_preferred.tolist()
    for k, a in zip((0, 2), want, strict=True):
        assert out[k].label == ("a" if a else "b")
        assert out[k].pair.chosen_ids == samples[k][0 if a else 1]
        assert out[k].scores is None  # the policy's label has no scores
    assert out[1].pair.chosen_ids == [9, 10] and out[1].label == "b"


def test_spin_pairs_the_demonstration_against_the_sample_without_a_labeller():
    offline = [TokenizedPair([1], [50, 51], [60]), TokenizedPair([1], [52], [61])]
    out = get_pair_mode("spin").select(inputs([[[3]], [[4]]], None, offline=offline))
    assert [(p.pair.chosen_ids, p.pair.rejected_ids, p.label) for p in out] == [
        ([50, 51], [3], "demonstration"), ([52], [4], "demonstration")]
    assert (out[0].chosen, out[0].rejected, out[0].scores) == ("w50 w51", "w3", None)


class FakePair:
    """Records which model generates, and with what options."""

    policy, ref = "policy", "reference"

    @contextlib.contextmanager
    def reference_model(self):
        yield self.ref


@pytest.mark.parametrize("name,calls", [
    ("two_samples", [("policy", 3, False, 7)]),
    ("best_worst", [("policy", 3, False, 7)]),
    ("sppo", [("policy", 3, False, 7)]),
    ("spin", [("policy", 1, False, 7)]),
    ("selm", [("reference", 1, True, 7)]),
    ("xpo", [("policy", 1, False, 7), ("reference", 1, False, 8)]),
])
def test_what_each_mode_samples_and_from_which_model(name, calls, monkeypatch):
    seen = []

    def fake_generate(model, prompt_ids, sampling, *, seed, **gen):
        seen.append((model, sampling.num_samples, sampling.greedy, seed))
        return [[[len(seen)]] * sampling.num_samples for _ in prompt_ids]

    mode = get_pair_mode(name)
    # The policy's samples come from the engine (HF by default); a reference's from HF itself.
    monkeypatch.setattr("sail_lightning.engines.HFEngine.generate", staticmethod(fake_generate))
    for where in ("selm", "xpo"):  # the modules that generate from the reference
        monkeypatch.setattr(f"sail_lightning.pair_modes.{where}.generate_responses",
                            fake_generate)
    out = mode.generate(FakePair(), [[1], [2]], SamplingOptions(num_samples=3), seed=7)
    assert seen == calls
    if name == "xpo":  # the policy's sample first, the reference's second
        assert out == [[[1], [2]], [[1], [2]]]


def test_a_mode_refuses_too_few_samples_naming_the_option():
    get_pair_mode("sppo").check_sampling(SamplingOptions(num_samples=2))
    with pytest.raises(ValueError, match="pair_mode=sppo.*sampling.num_samples must be >= 2"):
        get_pair_mode("sppo").check_sampling(SamplingOptions(num_samples=1))
    with pytest.raises(ValueError, match="pair_mode must be one of"):
        get_pair_mode("nope")


def test_a_mode_can_set_only_known_per_pair_fields():
    class Unknown(PairMode):
        name = "unknown_fields"
        pair_fields = ("confidence",)

    with pytest.raises(ValueError, match="confidence.*PAIR_FIELDS"):
        register(Unknown)
    assert "unknown_fields" not in pair_modes.pair_mode_names()


def test_every_shipped_mode_is_registered_from_its_own_file():
    names = set(pair_modes.pair_mode_names())
    assert names == {"two_samples", "best_worst", "selm", "xpo", "spin", "sppo"}
    for name in names:
        assert type(get_pair_mode(name)).__module__ == f"sail_lightning.pair_modes.{name}"


@pytest.fixture
def shortest_first():
    """A mode added by one class: the shortest of two samples is chosen, no labeller."""

    @register
    class ShortestFirst(PairMode):
        name = "shortest_first"
        method = "shortest"
        needs_labeller = False
        min_samples = 2

        def select(self, inputs):
            out = []
            for k, (a, b) in enumerate(s[:2] for s in inputs.samples):
                c, r = (a, b) if len(a) <= len(b) else (b, a)
                out.append(Selected(make_pair(inputs.prompt_ids[k], c, r), text(c), text(r),
                                    "shortest"))
            return out

    yield ShortestFirst
    del _REGISTRY["shortest_first"]


def test_a_new_mode_is_one_class_asked_by_the_method_and_the_round(shortest_first, tmp_path):
    from sail_lightning import rounds
    from tests.helpers import datamodule, module

    spec = MethodSpec(mix_pr=1.0, pair_mode="shortest_first")
    assert spec.name == "shortest" and spec.conflicts() == []  # no labeller needed
    assert "data.mix_pp=0.3" in MethodSpec(mix_pp=0.3, mix_pr=0.7,
                                           pair_mode="shortest_first").conflicts()[0]
    with pytest.raises(ValueError, match="register"):
        register(shortest_first)
    m, dm, n = module(), datamodule(), 4
    out, _ = rounds.build_round(
        m.pair, dm.tokenizer, dm.train_records[:n], dm.train_pairs[:n], None,
        SamplingOptions(num_samples=2, max_new_tokens=6, batch_size=8), beta=0.1,
        pair_mode="shortest_first", round_index=0, routes=[int(Route.PR)] * n,
        prompt_positions=list(range(n)), seed=1, progress=False)
    assert all(len(p.pair.chosen_ids) <= len(p.pair.rejected_ids) for p in out)
    assert all(p.label == "shortest" and p.pair.ref_chosen is not None for p in out)
