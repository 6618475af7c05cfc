"""JudgeLabeller against a scripted judge speaking the OpenAI chat-completions protocol
(LitServe's OpenAISpec, tests/judge_server.py) on 127.0.0.1: both orders, ties, unparseable
answers, token counts, failures; and the verdict parser, prompt rendering and options."""

import time

import pytest
import torch

from sail_lightning.labellers.judge import (
    DEFAULT_TEMPLATE,
    JudgeLabeller,
    RemoteServiceError,
    parse_verdict,
    render_prompt,
)
from tests.servers import free_port


def judge(judge_url, **kwargs):
    return JudgeLabeller("scripted", base_url=judge_url, require_api_key=False, timeout=10,
                         max_retries=0, **kwargs)


@pytest.mark.parametrize("text,verdict", [
    ("A", "A"), ("b", "B"), ("Response A.", "A"), ("**B**", "B"), ("Tie!", "tie"),
    ("'tie'", "tie"), ("Final verdict: [[A]]", "A"), ("  draw\n", "tie"), ("B is better", "B"),
    ("A or B", None), ("Both have their merits.", None), ("", None), (None, None),
    ("AB", None), ("tie, A", None),
])
def test_parse_verdict(text, verdict):
    assert parse_verdict(text) == verdict


def test_both_orders_ties_unparsed_and_usage(judge_url, caplog):
    # The scripted judge prefers the longer response; BIASED prompts always get "A" (a
    # position bias, which the second order cancels); GARBLE gets no verdict.
    prompts = ["p1", "p2", "p3", "p4 BIASED", "p5"]
    a = ["one two three", "one", "one two", "one", "one GARBLE"]
    b = ["one", "one two three", "uno dos", "one two three", "one"]
    j = judge(judge_url)
    outcome = j.compare(prompts, a, b)
    assert outcome.tolist() == [1.0, 0.0, 0.5, 0.5, 0.5]
    stats = j.stats()
    assert stats["judge_requests"] == 10 and stats["judge_pairs"] == 5
    assert stats["judge_ties"] == 3 and stats["judge_unparsed"] == 2  # GARBLE in both orders
    shown = [(p, x, y) for p, x, y in zip(prompts, a, b, strict=True)]
    shown += [(p, y, x) for p, x, y in zip(prompts, a, b, strict=True)]
    words = sum(len(DEFAULT_TEMPLATE.format(prompt=p, response_a=x, response_b=y).split())
                for p, x, y in shown)
    assert stats["judge_prompt_tokens"] == words  # the server counts words
    # Answers per pair, both orders: "Response A." (2 words) + "**B**" (1), "**B**" + "Response
    # A.", "Tie!" (1) twice, "Response A." twice, "Both have their merits." (4) twice.
    assert stats["judge_completion_tokens"] == 3 + 3 + 2 + 4 + 8
    unparsed = [r for r in caplog.records if "unparseable verdict" in r.getMessage()]
    assert len(unparsed) == 2 and "Both have their merits." in unparsed[0].getMessage()
    j.reset_stats()
    assert set(j.stats().values()) == {0}


def test_label_resolves_ties_to_a_or_by_seeded_draw(judge_url):
    prompts = [f"p{i}" for i in range(12)]
    same = ["one two"] * 12  # equal lengths: every pair a tie
    assert judge(judge_url).label(prompts, same, same).a_preferred.all()
    draws = [judge(judge_url, tie_break="random", seed=7).label(prompts, same, same).a_preferred
             for _ in range(2)]
    assert torch.equal(draws[0], draws[1]) and 0 < int(draws[0].sum()) < 12
    labels = judge(judge_url, tie_break="random").label(["x", "y"], ["a b", "a"], ["a", "a b"])
    assert labels.a_preferred.tolist() == [True, False] and labels.scores_a is None
    assert judge(judge_url).score(["x"], ["a"]) is None  # no scores: compare() gives win rates


def test_messages_are_what_the_judge_reads(judge_url):
    j = judge(judge_url)
    turns = [[("system", "be brief"), ("user", "p BIASED")], [("user", "p")]]
    # BIASED reaches the judge only through the rendered turns of the first pair.
    assert j.compare(["p", "p"], ["one", "one"], ["one two", "one two"],
                     messages=turns).tolist() == [0.5, 0.0]
    assert render_prompt("text", None) == "text"
    assert render_prompt("text", [("user", "hi")]) == "hi"
    assert render_prompt("t", turns[0]) == "system: be brief\nuser: p BIASED"


def test_server_error_raises_naming_the_api(judge_url):
    j = judge(judge_url)
    with pytest.raises(RemoteServiceError, match=rf"judge 'scripted' at {judge_url} failed"):
        j.compare(["ok", "CRASH"], ["a", "a"], ["b", "b"])
    assert j.stats()["judge_pairs"] == 0  # nothing counted: the call failed whole


def test_judge_down_raises_without_hanging():
    url = f"http://127.0.0.1:{free_port()}/v1"
    start = time.monotonic()
    with pytest.raises(RemoteServiceError, match=rf"at {url} failed.*Connection error"):
        JudgeLabeller("m", base_url=url, require_api_key=False, max_retries=1,
                      timeout=2).label(["p"], ["a"], ["b"])
    assert time.monotonic() - start < 10


def test_api_key_from_the_named_variable(monkeypatch):
    monkeypatch.delenv("MY_JUDGE_KEY", raising=False)
    with pytest.raises(ValueError, match=r"environment variable MY_JUDGE_KEY \(option "
                                         r"api_key_env\).*require_api_key: false"):
        JudgeLabeller("m", api_key_env="MY_JUDGE_KEY")
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-test")
    assert JudgeLabeller("m", api_key_env="MY_JUDGE_KEY").client.api_key == "sk-test"
    monkeypatch.delenv("MY_JUDGE_KEY")
    local = JudgeLabeller("m", api_key_env="MY_JUDGE_KEY", require_api_key=False)
    assert local.client.api_key  # a dummy: local servers want some header


def test_options_are_checked():
    with pytest.raises(ValueError, match=r"template must have exactly the fields.*got \['prompt'"):
        JudgeLabeller("m", require_api_key=False, template="Which is better? {prompt}")
    with pytest.raises(ValueError, match="tie_break"):
        JudgeLabeller("m", require_api_key=False, tie_break="b")
    custom = JudgeLabeller("m", require_api_key=False,
                           template="{prompt} | {response_a} | {response_b} {{literal}}")
    filled = custom.template.format(prompt="p", response_a="x", response_b="y")
    assert filled == "p | x | y {literal}"
