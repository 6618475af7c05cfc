"""The reward server (``sail-lightning serve-reward``, LitServe) on 127.0.0.1 and its client
``RemoteRewardLabeller``: the client's scores are the in-process labeller's on the same folder,
with and without messages, whose tokenizer and chat template differ from the policy's."""

import threading

import pytest
import requests
import torch

from sail_lightning.cli import main
from sail_lightning.labellers import RemoteRewardLabeller, RemoteServiceError, RewardModelLabeller
from sail_lightning.synthetic import SyntheticTask
from tests.servers import free_port, running

TASK = SyntheticTask()
PROMPTS = TASK.sample_prompts(10, seed=0)
RESP_A = [TASK.ideal_response(p) for p in PROMPTS]
RESP_B = [" ".join(TASK.ideal_response(p).split()[: 1 + i % 3]) for i, p in enumerate(PROMPTS)]
RESP_B[3] = RESP_A[3]  # identical responses: an exact tie, a chosen
MESSAGES = [[("system", "answer briefly"), ("user", p)] for p in PROMPTS]
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} "
                 "{% endfor %}{{ eos_token }}")


def reward_tokenizer():
    """A BPE tokenizer with its own vocabulary, specials and chat template: not the policy's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()  # merges across symbols, unlike the policy's
    corpus = TASK.sample_prompts(300, seed=1) + [TASK.ideal_response(p) for p in PROMPTS]
    backend.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=120, special_tokens=specials, show_progress=False))
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", backend.token_to_id("<s>"))])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                  eos_token="</s>", unk_token="<unk>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    path = tmp_path_factory.mktemp("served_rm")
    tok = reward_tokenizer()
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "llama", vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=128, num_labels=1,
        pad_token_id=tok.pad_token_id)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def direct(reward_dir):
    return RewardModelLabeller(str(reward_dir), batch_size=4, progress=False)


@pytest.fixture(scope="module")
def url(reward_dir, tmp_path_factory):
    """One server for the module: merges requests arriving within 50 ms (LitServe batching)."""
    port = free_port()
    args = ["-m", "sail_lightning", "serve-reward", "--model", str(reward_dir), "--port",
            str(port), "--device", "cpu", "--batch-size", "4", "--max-batch-size", "4",
            "--batch-timeout", "0.05", "--log-level", "warning"]
    with running(args, port, tmp_path_factory.mktemp("logs") / "reward_server.log"):
        yield f"http://127.0.0.1:{port}/score"


def test_reward_tokenizer_is_not_the_policys(reward_dir, synthetic_tokenizer, direct):
    direct.load()
    text = PROMPTS[0] + " " + RESP_A[0]
    assert direct.tokenizer(text)["input_ids"] != synthetic_tokenizer(text)["input_ids"]
    assert direct.tokenizer.chat_template == CHAT_TEMPLATE


@pytest.mark.parametrize("messages", [None, MESSAGES], ids=["text", "messages"])
def test_remote_scores_are_the_direct_scores(url, direct, messages):
    # One request of all items, the server's batch size the direct one's: the same batches,
    # so the very same numbers.
    remote = RemoteRewardLabeller(url, batch_size=64, timeout=30)
    expected = direct.score(PROMPTS, RESP_A, messages=messages)
    assert torch.equal(remote.score(PROMPTS, RESP_A, messages=messages), expected)
    # The chat template is applied server-side: with messages the input, so the score, differ.
    other = direct.score(PROMPTS, RESP_A, messages=None if messages else MESSAGES)
    assert not torch.allclose(expected, other)


@pytest.mark.parametrize("messages", [None, MESSAGES], ids=["text", "messages"])
def test_remote_labels_are_the_direct_labels(url, direct, messages):
    remote = RemoteRewardLabeller(url, batch_size=3, timeout=30)  # several requests per call
    got = remote.label(PROMPTS, RESP_A, RESP_B, messages=messages)
    want = direct.label(PROMPTS, RESP_A, RESP_B, messages=messages)
    # Other batches pad differently: equal up to float noise.
    torch.testing.assert_close(got.scores_a, want.scores_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.scores_b, want.scores_b, atol=1e-5, rtol=1e-5)
    assert torch.equal(got.a_preferred, want.a_preferred)
    assert got.scores_a[3] == got.scores_b[3] and got.a_preferred[3]  # scored once: exact tie


def test_concurrent_requests_are_merged_and_answered_in_order(url, direct):
    """Two clients at once, one with messages: each gets its own items' scores."""
    results = {}

    def run(name, messages):
        results[name] = RemoteRewardLabeller(url, timeout=30).score(PROMPTS, RESP_B,
                                                                   messages=messages)

    threads = [threading.Thread(target=run, args=(name, m))
               for name, m in (("text", None), ("messages", MESSAGES))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for name, messages in (("text", None), ("messages", MESSAGES)):
        torch.testing.assert_close(results[name], direct.score(PROMPTS, RESP_B, messages=messages),
                                   atol=1e-5, rtol=1e-5)


def test_an_online_round_is_labelled_through_the_server(url, direct):
    """SAIL-PR pairs of a round (policy samples, the records' messages) scored remotely: each
    pair's scores are the reward model's on its chosen and rejected text."""
    from sail_lightning import rounds
    from sail_lightning.common import Route
    from sail_lightning.generation import SamplingOptions
    from tests.helpers import datamodule, module

    policy, dm, n = module(), datamodule(num_synthetic_pairs=40), 6
    pairs, _ = rounds.build_round(
        policy.pair, dm.tokenizer, dm.train_records[:n], dm.train_pairs[:n],
        RemoteRewardLabeller(url, timeout=30),
        SamplingOptions(num_samples=2, max_new_tokens=6, batch_size=32), beta=0.1,
        pair_mode="two_samples", round_index=0, routes=[int(Route.PR)] * n,
        prompt_positions=list(range(n)), seed=3, progress=False)
    assert len(pairs) == n
    for k, p in enumerate(pairs):
        turns = dm.train_records[k].messages
        want = direct.score([p.prompt] * 2, [p.chosen, p.rejected], messages=[turns] * 2)
        got = torch.tensor([p.scores["chosen"], p.scores["rejected"]])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert got[0] >= got[1]


def test_malformed_request_is_refused_naming_the_field(url):
    answer = requests.post(url, json={"prompts": ["a ="], "responses": ["b", "c"]}, timeout=30)
    assert answer.status_code == 422 and "lengths differ" in answer.text
    remote = RemoteRewardLabeller(url, retries=3, backoff=5)  # a 4xx is never retried
    with pytest.raises(RemoteServiceError, match=rf"{url} refused the request \(HTTP 422.*"
                                                 "responses"):
        remote._post({"prompts": ["a ="]})
    assert requests.post(url, json={"prompts": [], "responses": []}, timeout=30).json() == {
        "scores": []}


def test_api_scores_merged_requests_of_both_kinds(reward_dir, direct):
    """The server's predict in-process: merged requests (with and without messages) and one."""
    from sail_lightning.serving import RewardModelAPI, ScoreRequest

    kwargs = {"name_or_path": str(reward_dir), "batch_size": 4}
    merged = RewardModelAPI(kwargs, max_batch_size=3)
    merged.setup("cpu")
    requests_ = [ScoreRequest(prompts=PROMPTS[:4], responses=RESP_A[:4], messages=MESSAGES[:4]),
                 ScoreRequest(prompts=PROMPTS[4:], responses=RESP_A[4:]),
                 ScoreRequest(prompts=[], responses=[])]
    out = merged.predict(requests_)
    torch.testing.assert_close(torch.tensor(out[0]), direct.score(
        PROMPTS[:4], RESP_A[:4], messages=MESSAGES[:4]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.tensor(out[1]), direct.score(PROMPTS[4:], RESP_A[4:]),
                               atol=1e-5, rtol=1e-5)
    assert out[2] == []
    single = RewardModelAPI(kwargs)
    single.setup("cpu")
    assert single.predict(requests_[1]) == out[1]
    assert single.encode_response([1.5, float("nan")]).scores == [1.5, None]


def test_serve_reward_help_documents_the_server(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["serve-reward", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for part in ("POST http://HOST:PORT/score", '"prompts": [str, ...]', '"responses"',
                 '"messages": [[[role, content], ...], ...] | null', '{"scores": [float',
                 "GET http://HOST:PORT/health", "RemoteRewardLabeller", "--trust-remote-code",
                 "--batch-size", "--max-batch-size", "--device", "127.0.0.1 (default"):
        assert part in text, part


def test_serve_reward_bad_options_fail_before_loading(tmp_path, capsys):
    with pytest.raises(SystemExit, match="--model: no such folder"):
        main(["serve-reward", "--model", str(tmp_path / "missing")])
    with pytest.raises(ValueError, match="--device must be"):
        main(["serve-reward", "--model", str(tmp_path), "--device", "gpu"])
    with pytest.raises(SystemExit):  # argparse: the host must be one LitServe binds
        main(["serve-reward", "--model", str(tmp_path), "--host", "localhost"])
    assert "invalid choice: 'localhost'" in capsys.readouterr().err


def _group_alive(pgid: int) -> bool:
    import os

    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of another user holds the id: none of ours
        return False
    return True


def test_sigterm_stops_the_server_and_its_workers(reward_dir, tmp_path):
    """`kill PID` (SIGTERM, as Docker, systemd and Kubernetes stop a service) shuts the
    server down as Ctrl+C does: its LitServe workers reaped and the port free again."""
    import signal
    import socket
    import time

    port = free_port()
    args = ["-m", "sail_lightning", "serve-reward", "--model", str(reward_dir), "--port",
            str(port), "--device", "cpu", "--log-level", "warning"]
    with running(args, port, tmp_path / "server.log") as proc:
        proc.send_signal(signal.SIGTERM)  # the main process only, as `kill PID` sends it
        proc.wait(60)
        deadline = time.monotonic() + 30
        while _group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _group_alive(proc.pid), "LitServe workers outlived the server"
        with socket.socket() as s:  # no worker listens on the port
            # As uvicorn binds: the /health connections' TIME_WAIT does not count, a listener does.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
    assert proc.returncode == 0, (tmp_path / "server.log").read_text()[-2000:]


def test_info_reports_the_served_settings_and_the_client_checks_them(url, reward_dir):
    """The url fixture's server runs with the default --max-length (1024) and --batch-size 4:
    a client configured as the real-text configs' in-process labeller (256) is refused,
    naming both values, before anything is scored."""
    info = requests.get(url.replace("/score", "/info"), timeout=30).json()
    assert info["model"] == {"name_or_path": str(reward_dir), "max_length": 1024,
                             "batch_size": 4, "output_field": "logits"}
    with pytest.raises(ValueError, match=r"max_length=256 here, 1024 served.*--max-length 256"):
        RemoteRewardLabeller(url, max_length=256).score(PROMPTS[:2], RESP_A[:2])
    with pytest.raises(ValueError, match=r"model='other/rm' here"):
        RemoteRewardLabeller(url, model="other/rm").score(PROMPTS[:2], RESP_A[:2])
    agreed = RemoteRewardLabeller(url, max_length=1024, model=str(reward_dir))
    assert agreed.score(PROMPTS[:2], RESP_A[:2]).shape == (2,)
    assert agreed.check_served_settings() is None  # asked once per labeller


SHARED = {"--port": 8000, "--host": "127.0.0.1", "--device": "auto", "--torch-dtype": None,
          "--timeout": 300.0, "--trust-remote-code": False, "--log-level": "info"}


def test_serve_reward_and_serve_judge_share_the_server_options():
    import argparse

    from sail_lightning import judge_serving, serving

    shared = serving.add_server_options(argparse.ArgumentParser())
    options = {a.option_strings[-1]: (a.default, a.help, a.choices) for a in shared._actions
               if a.dest != "help"}
    assert {k: v[0] for k, v in options.items()} == SHARED
    for command in (serving.parser(), judge_serving.parser()):
        mine = {a.option_strings[-1]: (a.default, a.help, a.choices) for a in command._actions}
        for name, spec in options.items():
            assert mine.get(name) == spec, (command.prog, name)
        args = command.parse_args(["--model", "m", "--port", "8123", "--host", "::",
                                   "--device", "cpu", "--torch-dtype", "bfloat16",
                                   "--timeout", "5", "--trust-remote-code",
                                   "--log-level", "debug"])
        assert (args.port, args.host, args.device, args.torch_dtype, args.timeout,
                args.trust_remote_code, args.log_level) == (
            8123, "::", "cpu", "bfloat16", 5.0, True, "debug"), command.prog
