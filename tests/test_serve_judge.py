"""``sail-lightning serve-judge`` (LitServe's OpenAISpec serving a causal LM) on 127.0.0.1,
and ``JudgeLabeller`` labelling through it: the real server beside tests/judge_server.py's
scripted one. The model is a tiny Llama converted from a GGUF file (tests/gguf_files.py,
SmolLM2's ChatML template): its verdicts are nonsense, so the test checks the protocol and
that each served answer is exactly HF's greedy generation of the same chat prompt."""

import pytest
import torch
from fastapi import HTTPException
from litserve.specs.openai import ChatCompletionRequest
from transformers import AutoModelForCausalLM, AutoTokenizer

from sail_lightning.cli import main
from sail_lightning.judge_serving import refuse_unsupported, sampling_for
from sail_lightning.labellers.judge import (
    DEFAULT_TEMPLATE,
    JudgeLabeller,
    RemoteServiceError,
    parse_verdict,
)
from sail_lightning.tokenizer import decode_text
from tests.servers import free_port, running

NAME = "tiny-judge"
MAX_TOKENS = 12
SEED = 5
CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Give three tips for sleep."}]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    from sail_lightning.data import samples
    from sail_lightning.data.bpe import record_texts
    from sail_lightning.data.records import read_preference_records
    from sail_lightning.gguf import convert_gguf
    from tests.gguf_files import tiny_gguf

    texts = list(record_texts(read_preference_records(samples.path("ultrafeedback"),
                                                      limit=60)[0]))
    gguf_file = tiny_gguf(tmp_path_factory.mktemp("gguf"), texts=texts)[0]
    out = tmp_path_factory.mktemp("judge_model") / "model"
    convert_gguf(str(gguf_file), str(out))
    return out


def hf_answer(model, tok, messages: list[dict], seed: int | None = None
              ) -> tuple[int, list[int]]:
    """The prompt's token count and HF's answer ids (cut after eos) for a chat: greedy, or
    sampled at temperature 1 (no top-k) from the CPU generator seeded with ``seed``; plain
    ``generate`` here, independently of the server's code path."""
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt = tok(text, add_special_tokens=False)["input_ids"]
    sampling = ({"do_sample": False} if seed is None else
                {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0})
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                             dtype=torch.long), max_new_tokens=MAX_TOKENS,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                             **sampling)
    ids = out[0, len(prompt):].tolist()
    if tok.eos_token_id in ids:
        ids = ids[: ids.index(tok.eos_token_id) + 1]
    return len(prompt), ids


def test_judge_labeller_through_a_real_served_model(chat_model, tmp_path):
    from openai import BadRequestError, OpenAI

    prompts = ["Give three tips for sleep.", "What is 2 + 2?", "Name a colour."]
    a = ["Go to bed early and avoid screens.", "4", "Blue."]
    b = ["Sleep.", "It is four.", "Red, like a tomato."]
    port = free_port()
    args = ["-m", "sail_lightning", "serve-judge", "--model", str(chat_model), "--port",
            str(port), "--device", "cpu", "--served-model-name", NAME, "--seed", str(SEED),
            "--log-level", "warning"]
    with running(args, port, tmp_path / "serve_judge.log"):
        url = f"http://127.0.0.1:{port}/v1"
        client = OpenAI(base_url=url, api_key="none", max_retries=0, timeout=60)
        # The server's first answer: sampled (no temperature sent: 1.0) with seed --seed.
        sampled = client.chat.completions.create(model=NAME, messages=CHAT,
                                                 max_tokens=MAX_TOKENS)
        judge = JudgeLabeller(NAME, base_url=url, require_api_key=False, max_tokens=MAX_TOKENS,
                              timeout=60, max_retries=0, concurrency=2)
        labels = judge.label(prompts, a, b)
        stats = judge.stats()
        direct = client.chat.completions.create(model=NAME, messages=CHAT, temperature=0,
                                                max_tokens=MAX_TOKENS)
        with pytest.raises(RemoteServiceError, match=r"'other' is not served here.*tiny-judge"):
            JudgeLabeller("other", base_url=url, require_api_key=False, max_retries=0,
                          timeout=60).compare(prompts[:1], a[:1], b[:1])
        refused = []
        for options in ({"stop": ["\n"]}, {"messages": [{"role": "user", "content": "a " * 400}]}):
            with pytest.raises(BadRequestError) as error:
                client.chat.completions.create(
                    **{"model": NAME, "messages": [{"role": "user", "content": "hi"}], **options})
            refused.append(error.value.body["detail"])

    assert refused == ["stop: not supported by sail-lightning serve-judge",
                       "the prompt fills the model's context: no token is left for the answer"]
    # What the same model gives in this process, greedy, for each request the judge made
    # (both orders of every pair), as the server renders it: the model's chat template.
    model = AutoModelForCausalLM.from_pretrained(chat_model).eval()
    tok = AutoTokenizer.from_pretrained(chat_model)
    asks = [(p, x, y) for p, x, y in zip(prompts, a, b, strict=True)]
    asks += [(p, y, x) for p, x, y in zip(prompts, a, b, strict=True)]
    expected = [hf_answer(model, tok, [{"role": "user", "content": DEFAULT_TEMPLATE.format(
        prompt=p, response_a=x, response_b=y)}]) for p, x, y in asks]
    # The served answer is HF's greedy answer, token for token, and usage counts its tokens.
    n_prompt, ids = hf_answer(model, tok, CHAT)
    assert direct.choices[0].message.content == decode_text(tok, ids)
    assert (direct.usage.prompt_tokens, direct.usage.completion_tokens) == (n_prompt, len(ids))
    assert direct.model == NAME
    # A sampled answer is HF's sample from the seed the server documents (varied text: the
    # tiny model's greedy answers are newlines).
    n_prompt, ids = hf_answer(model, tok, CHAT, seed=SEED)
    assert len(set(ids)) > 3 and sampled.choices[0].message.content == decode_text(tok, ids)
    assert (sampled.usage.prompt_tokens, sampled.usage.completion_tokens) == (n_prompt, len(ids))
    # The protocol through JudgeLabeller: every request made and its usage counted.
    assert stats["judge_requests"] == 2 * len(prompts) and stats["judge_pairs"] == len(prompts)
    assert stats["judge_prompt_tokens"] == sum(n for n, _ in expected)
    assert stats["judge_completion_tokens"] == sum(len(i) for _, i in expected)
    # Verdicts as the labeller documents them: unparsed answers counted and made ties, ties
    # resolved to a (tie_break "a").
    verdicts = [parse_verdict(decode_text(tok, i)) for _, i in expected]
    assert stats["judge_unparsed"] == verdicts.count(None) > 0  # a tiny model's nonsense
    first, second = verdicts[: len(prompts)], verdicts[len(prompts):]
    wins = [(f, s) == ("A", "B") for f, s in zip(first, second, strict=True)]
    losses = [(f, s) == ("B", "A") for f, s in zip(first, second, strict=True)]
    assert stats["judge_ties"] == sum(not w and not lo for w, lo in zip(wins, losses,
                                                                         strict=True))
    assert labels.a_preferred.tolist() == [not lo for lo in losses]


def request(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], **fields)


def test_requests_sampling_options():
    greedy = sampling_for(request(temperature=0, max_tokens=5), 256, room=100)
    assert greedy.greedy and greedy.max_new_tokens == 5 and greedy.num_samples == 1
    # No temperature sent: OpenAI's default 1.0 (LitServe's request model would say 0.7).
    assert sampling_for(request(), 256, room=100).temperature == 1.0
    sampled = sampling_for(request(temperature=0.5, top_p=0.9), 256, room=100)
    assert (sampled.greedy, sampled.temperature, sampled.top_p) == (False, 0.5, 0.9)
    # --max-tokens when none is asked; max_completion_tokens before max_tokens; the context
    # left bounds either.
    assert sampling_for(request(), 256, room=1000).max_new_tokens == 256
    assert sampling_for(request(max_tokens=9, max_completion_tokens=7), 256,
                        room=100).max_new_tokens == 7
    assert sampling_for(request(max_tokens=50), 256, room=20).max_new_tokens == 20
    for fields, room, message in (({"temperature": -1}, 10, "temperature must be >= 0"),
                                  ({"max_tokens": 0}, 10, "max_tokens must be >= 1"),
                                  ({}, 0, "fills the model's context")):
        with pytest.raises(HTTPException, match=message) as error:
            sampling_for(request(**fields), 256, room=room)
        assert error.value.status_code == 400
    refuse_unsupported(request(presence_penalty=0.0))
    for fields, name in (({"stop": "x"}, "stop"), ({"frequency_penalty": 0.5},
                                                   "frequency_penalty"),
                         ({"response_format": {"type": "json_object"}}, "json_object")):
        with pytest.raises(HTTPException, match=name):
            refuse_unsupported(request(**fields))


def test_serve_judge_help_and_bad_options_fail_before_loading(tmp_path, capsys,
                                                               synthetic_tokenizer):
    with pytest.raises(SystemExit) as exit_:
        main(["serve-judge", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for part in ("POST http://HOST:PORT/v1/chat/completions", "chat template", "usage",
                 "temperature (0: greedy", "JudgeLabeller(model=NAME", "--served-model-name",
                 "--max-tokens", "--seed", "127.0.0.1 (default"):
        assert part in text, part
    with pytest.raises(SystemExit, match="--model: no such folder"):
        main(["serve-judge", "--model", str(tmp_path / "missing")])
    synthetic_tokenizer.save_pretrained(tmp_path / "plain")  # a tokenizer without a template
    with pytest.raises(SystemExit, match="its tokenizer has no chat template"):
        main(["serve-judge", "--model", str(tmp_path / "plain")])
    with pytest.raises(ValueError, match="--device must be"):
        main(["serve-judge", "--model", str(tmp_path / "plain"), "--device", "gpu"])
    with pytest.raises(SystemExit, match="--max-tokens must be >= 1"):
        main(["serve-judge", "--model", str(tmp_path / "plain"), "--max-tokens", "0"])
