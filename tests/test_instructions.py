"""The instructions task (sail_lightning.instructions): each constraint checked both ways on
hand-written responses, the safeguards, deterministic constraints, disjoint splits, the
oracle labeller, and the DataModule and a CLI fit on its prompts (test_instructions_fit.py)."""

import random

import pytest
import torch

from sail_lightning.data import samples
from sail_lightning.instructions import (
    KINDS,
    Constraint,
    InstructionsOracle,
    InstructionsTask,
    build_response,
    count_words,
    parse_constraints,
    render,
)
from sail_lightning.instructions.constraints import sample_constraints

TASK = InstructionsTask(seed=0)
WORDS_30 = " ".join(f"word{i}" for i in range(30))

# (constraint, a response that meets it, one that does not): written by hand, not built.
CASES = [
    (Constraint("min_words", 30), WORDS_30, " ".join(WORDS_30.split()[:29])),
    (Constraint("min_words", 30), "It's " + WORDS_30, "don't " * 29),  # "don't" is one word
    (Constraint("max_words", 50), "A short answer of seven words.", "many " * 51),
    (Constraint("no_commas"), "I like apples and pears.", "I like apples, pears."),
    (Constraint("no_commas"), "No comma here at all.", "Full-width\uff0ccomma."),
    (Constraint("lowercase"), "all of this is lowercase text.", "All of this is not."),
    (Constraint("lowercase"), "it is 42 degrees.", "1234 5678"),  # no letter: not met
    (Constraint("keyword", "river"), "We walked by the River at dawn.", "We saw rivers."),
    (Constraint("ending", "Any other questions?"), "Here it is. Any other questions?\n",
     "Here it is. Any other questions? Thanks."),
    (Constraint("ending", "Any other questions?"), "Done. Any other questions?",
     "Done. any other questions?"),  # exact, case included
    (Constraint("bullets", 3), "Intro:\n* one\n* two\n- three", "* one\n* two"),
    (Constraint("bullets", 3), "* a\n* b\n* c\n**bold** is not a bullet",
     "* a\n* b\n* c\n* d"),
    (Constraint("title"), "<<My Title>>\nThe body.", "<My Title>\nThe body."),
    (Constraint("title"), "Body then <<a title>> later.", "An empty one: <<>>"),
    (Constraint("json"), '```json\n{"answer": "yes"}\n```', '{"answer": "yes"'),
    (Constraint("json"), "[1, 2, 3]", '"just a string"'),  # a scalar is not enough
    (Constraint("paragraphs", 2), "First paragraph.\n\nSecond one.", "One line\nand another."),
    (Constraint("paragraphs", 2), "One.\n \nTwo.\n\n", "One.\n\nTwo.\n\nThree."),
    (Constraint("postscript"), "Body.\n\nP.S. remember this.", "The P.S. is mid-line."),
    (Constraint("postscript"), "body.\np.s. lowercase works", "Body with no postscript."),
    (Constraint("quotation"), '"Hello there."', 'Hello "there".'),
    (Constraint("placeholders", 2), "Send it to [name] at [address].", "Send it to [name]."),
]


@pytest.mark.parametrize(("constraint", "met", "unmet"), CASES,
                         ids=[f"{c.kind}-{i}" for i, (c, _, _) in enumerate(CASES)])
def test_each_constraint_both_ways(constraint, met, unmet):
    assert constraint.check(met)
    assert not constraint.check(unmet)


def test_every_kind_has_hand_written_cases():
    assert {c.kind for c, _, _ in CASES} == set(KINDS)


def test_score_is_the_fraction_of_the_prompts_constraints_met():
    prompt = render("Describe a river walk.", [Constraint("no_commas"), Constraint("lowercase"),
                                               Constraint("keyword", "river")])
    both = "we walked by the river at dawn and the light was soft and warm"
    one = "We walked by the river at dawn and the light was soft and warm"
    none = "We walked by the lake at dawn, and the light was soft and warm"
    assert TASK.score([prompt] * 3, [both, one, none]).tolist() == pytest.approx(
        [1.0, 2 / 3, 0.0])
    assert TASK.score([prompt], [both]).dtype == torch.float32


def test_every_kind_and_value_round_trips_through_the_prompt_text():
    for kind, spec in KINDS.items():
        for value in spec.values or (None,):
            c = Constraint(kind, value)
            assert parse_constraints(render("Say hi.\n\nIn two lines.", [c])) == [c]
    three = [Constraint("keyword", "ember"), Constraint("title"), Constraint("max_words", 80)]
    assert parse_constraints(render("Write a poem.", three)) == three


def test_a_prompt_without_constraints_is_refused():
    with pytest.raises(ValueError, match="not an instructions-task prompt"):
        TASK.score(["Write a poem about the sea."], ["the sea is wide and deep and blue"])
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        TASK.score(["a", "b"], ["c"])


# -- safeguards --------------------------------------------------------------------------

def test_empty_or_too_short_answers_score_zero_even_where_they_meet_every_constraint():
    prompt = render("Name a colour.", [Constraint("no_commas"), Constraint("max_words", 50)])
    short = "blue is nice"
    assert Constraint("no_commas").check(short) and Constraint("max_words", 50).check(short)
    assert TASK.score([prompt] * 3, ["", "   \n", short]).tolist() == [0.0, 0.0, 0.0]
    enough = "blue is a colour that many people like a lot"  # 10 words: min_response_words
    assert count_words(enough) == TASK.min_response_words
    assert TASK.score([prompt], [enough]).tolist() == [1.0]


def test_endless_answers_lose_their_score_linearly_past_the_cap():
    prompt = render("Tell me everything.", [Constraint("min_words", 30)])
    rng = random.Random(0)

    def text(n):  # distinct words: no repetition penalty
        return " ".join(f"w{rng.randrange(10**9)}" for _ in range(n))

    cap = TASK.max_response_words
    scores = TASK.score([prompt] * 3, [text(cap), text(cap * 3 // 2), text(2 * cap)]).tolist()
    assert scores == pytest.approx([1.0, 0.5, 0.0])


def test_answers_that_loop_are_penalised():
    prompt = render("Tell me a story.", [Constraint("min_words", 30)])
    loop = "the cat sat on the mat " * 20  # 120 words: 6 distinct trigrams of 118
    assert Constraint("min_words", 30).check(loop)
    assert TASK.score([prompt], [loop]).item() == pytest.approx(6 / 118 / TASK.min_distinct)
    story = ("once upon a time a small fox lived near the old mill by the water and every "
             "morning it walked to the hill to watch the sun rise over the quiet town below "
             "where the baker was already making bread for the day")
    assert TASK.score([prompt], [story]).item() == 1.0


def test_an_answer_that_echoes_the_constraints_scores_zero():
    cs = [Constraint("title"), Constraint("placeholders", 1)]
    prompt = render("Write about spring.", cs)
    echo = "Sure. " + " ".join(c.text() for c in cs) + " Spring is a season of new growth."
    assert all(c.check(echo) for c in cs)  # the sentences' own examples meet both
    assert TASK.score([prompt], [echo]).tolist() == [0.0]
    answer = "<<spring>> Spring brings [flowers] and longer days to the northern half."
    assert TASK.score([prompt], [answer]).tolist() == [1.0]


# -- prompts, splits, determinism --------------------------------------------------------

def test_splits_are_disjoint_and_the_heldout_set_has_at_least_128_prompts():
    train = {p.rpartition("\n\n")[0] for p in TASK.train_prompts}
    held = {p.rpartition("\n\n")[0] for p in TASK.heldout_prompts}
    assert len(TASK.heldout_prompts) == len(held) == TASK.num_heldout >= 128
    assert not train & held
    assert len(train) + len(held) == len(TASK.instructions) > 1000
    other = InstructionsTask(seed=1)
    assert not set(other.train_prompts) & set(other.heldout_prompts)
    assert set(other.heldout_prompts) != set(TASK.heldout_prompts)  # a seed, its split


def test_constraints_are_a_function_of_the_seed_and_the_instruction_alone():
    again = InstructionsTask(seed=0)
    assert again.train_prompts == TASK.train_prompts
    assert again.heldout_prompts == TASK.heldout_prompts
    # Not of the pool: the same instruction gets the same constraints from a smaller task.
    small = InstructionsTask(seed=0, prompt_sets=("vicuna",), num_heldout=16)
    for prompt in small.train_prompts + small.heldout_prompts:
        assert TASK.prompt(prompt.rpartition("\n\n")[0]) == prompt
    other = InstructionsTask(seed=1)
    texts = TASK.instructions[:50]
    assert [other.prompt(t) for t in texts] != [TASK.prompt(t) for t in texts]
    counts = [len(parse_constraints(p)) for p in TASK.train_prompts]
    assert set(counts) == {1, 2, 3}


def test_the_prompt_sets_are_packaged_and_can_be_read_from_a_folder(tmp_path):
    from sail_lightning.instructions import read_instructions

    assert len(read_instructions("alpaca_eval")) == 805
    assert len(read_instructions("vicuna")) == 80
    assert len(read_instructions("ultrafeedback")) == 668  # those of <= 100 words, of 1000
    import shutil

    shutil.copy(samples.path("vicuna-bench"), tmp_path)
    task = InstructionsTask(prompt_sets=("vicuna",), num_heldout=16, data_dir=str(tmp_path))
    assert len(task.heldout_prompts) == 16
    with pytest.raises(FileNotFoundError, match="data_dir: no alpaca-eval"):
        _ = InstructionsTask(data_dir=str(tmp_path)).instructions
    with pytest.raises(ValueError, match="prompt_sets: unknown set 'mmlu'"):
        InstructionsTask(prompt_sets=("mmlu",))


def test_every_assigned_combination_can_be_met_and_each_constraint_broken():
    """The built responses: a witness that no prompt asks for the impossible, and the pairs'
    rejected side breaks exactly what it is asked to."""
    for prompt in TASK.train_prompts + TASK.heldout_prompts:
        assert TASK.score([prompt], [build_response(parse_constraints(prompt),
                                                    random.Random(prompt))]).item() == 1.0
    rng = random.Random(0)
    for _ in range(500):
        cs = sample_constraints(rng, rng.randint(1, 3))
        kinds = {c.kind for c in cs}
        for kind in kinds:
            text = build_response(cs, rng, meet=kinds - {kind})
            assert [c.check(text) for c in cs] == [c.kind != kind for c in cs], (cs, text)


def test_built_pairs_prefer_the_response_that_meets_more():
    for split in ("train", "heldout"):
        rows = TASK.make_pairs(split)
        assert [r["prompt"] for r in rows] == TASK.prompts(split)
        chosen = TASK.score([r["prompt"] for r in rows], [r["chosen"] for r in rows])
        rejected = TASK.score([r["prompt"] for r in rows], [r["rejected"] for r in rows])
        assert (chosen == 1.0).all() and (rejected < 1.0).all()
    assert TASK.make_pairs("heldout", limit=40) == TASK.make_pairs("test", limit=40)


# -- the oracle labeller -----------------------------------------------------------------

def pairs_of_known_scores():
    prompt = render("Describe a river walk.", [Constraint("no_commas"), Constraint("lowercase")])
    good = "we walked by the river at dawn and the light was soft"
    half = "We walked by the river at dawn and the light was soft"
    bad = "We walked by the river at dawn, and the light was soft"
    return [prompt] * 4, [good, bad, half, good], [half, good, bad, good]


def test_the_oracle_orients_chosen_and_rejected_by_the_true_score():
    prompts, a, b = pairs_of_known_scores()
    labels = InstructionsOracle(sample=False).label(prompts, a, b)
    assert labels.scores_a.tolist() == pytest.approx([1.0, 0.0, 0.5, 1.0])
    assert labels.scores_b.tolist() == pytest.approx([0.5, 1.0, 0.0, 1.0])
    assert labels.a_preferred.tolist() == [True, False, True, True]  # a tie goes to a
    rows = TASK.label_pairs(prompts, a, b, sample=False)
    assert all(r["metadata"]["score_chosen"] >= r["metadata"]["score_rejected"] for r in rows)
    assert [r["chosen"] for r in rows] == [a[0], b[1], a[2], a[3]]


def test_the_oracles_bradley_terry_draws_follow_the_margin_and_its_seed():
    prompts, a, b = pairs_of_known_scores()
    n = 400
    oracle = InstructionsOracle(InstructionsTask(temperature=0.5), seed=3)
    draws = oracle.label(prompts[:2] * n, a[:2] * n, b[:2] * n).a_preferred.view(n, 2)
    # P(a) = sigmoid(0.5 / 0.5) = 0.73 on the first pair, sigmoid(-2) = 0.12 on the second.
    assert draws[:, 0].double().mean() == pytest.approx(0.731, abs=0.07)
    assert draws[:, 1].double().mean() == pytest.approx(0.119, abs=0.05)
    oracle.reseed(3)
    again = oracle.label(prompts[:2] * n, a[:2] * n, b[:2] * n).a_preferred.view(n, 2)
    assert torch.equal(draws, again)
    sharp = InstructionsOracle(seed=0).label(prompts[:3], a[:3], b[:3]).a_preferred
    assert sharp.tolist() == [True, False, True]  # temperature 0.1: margins of 0.5 and 1


def test_the_doc_lists_every_constraint_as_the_prompt_states_it():
    from tests.conftest import REPO

    doc = (REPO / "docs" / "instructions_task.md").read_text()
    for kind, spec in KINDS.items():
        placeholder = "N" if spec.values and isinstance(spec.values[0], int) else "X"
        sentence = spec.template.replace("{v}", placeholder)
        assert f"| `{kind}` | {sentence} |" in doc, kind


def test_the_oracle_and_its_task_are_built_from_yaml_as_the_cli_builds_labellers():
    from jsonargparse import ArgumentParser

    from sail_lightning.labellers import Labeller

    parser = ArgumentParser()
    parser.add_argument("--labeller", type=Labeller)
    cfg = parser.parse_string("""
labeller:
  class_path: sail_lightning.instructions.InstructionsOracle
  init_args:
    task: {seed: 2, min_response_words: 5, prompt_sets: [vicuna]}
    sample: false
""")
    oracle = parser.instantiate(cfg).labeller
    assert isinstance(oracle, InstructionsOracle) and not oracle.sample
    assert oracle.task == InstructionsTask(seed=2, min_response_words=5, prompt_sets=("vicuna",))
