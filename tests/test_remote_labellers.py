"""RemoteRewardLabeller's failure handling against a scripted HTTP server on 127.0.0.1 (a
thread): bounded retries with backoff, errors naming the URL, no hang, nothing half-labelled;
and both service labellers built from YAML."""

import json
import pickle
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from sail_lightning.labellers import Labeller, RemoteRewardLabeller, RemoteServiceError
from tests.servers import free_port

PROMPTS = ["a =", "b =", "c =", "d =", "e ="]
RESPONSES = ["x", "y y", "z", "w", "v v v"]


class Scripted:
    """Answers POSTs in turn from ``script``: (status, body) pairs, the last one repeated; a
    body of None scores each item by its response's length. ``stop_after`` shuts the server
    down as it sends that many-th answer (a server stopped mid-labelling)."""

    def __init__(self, script, *, delay=0.0, stop_after=None):
        self.script, self.delay, self.stop_after = script, delay, stop_after
        self.requests = []
        scripted = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                scripted.requests.append(body)
                status, answer = scripted.script[min(len(scripted.requests),
                                                     len(scripted.script)) - 1]
                if answer is None:
                    answer = {"scores": [float(len(r)) for r in body["responses"]]}
                data = answer.encode() if isinstance(answer, str) else json.dumps(answer).encode()
                time.sleep(scripted.delay)
                if scripted.stop_after == len(scripted.requests):
                    # Stop listening before this answer leaves, so the client's next request
                    # is refused for certain. Stopping after answering raced with that request
                    # on a loaded machine (it was sometimes accepted and answered).
                    scripted.close()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/score"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,),
                                       daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def serve():
    started = []

    def start(script, **kwargs):
        started.append(Scripted(script, **kwargs))
        return started[-1]

    yield start
    for s in started:
        s.close()


def fast(url, **kwargs):
    return RemoteRewardLabeller(url, **{"timeout": 2, "retries": 2, "backoff": 0.05, **kwargs})


def test_batches_of_batch_size_in_order(serve):
    server = serve([(200, None)])
    scores = fast(server.url, batch_size=2).score(PROMPTS, RESPONSES,
                                                  messages=[[("user", p)] for p in PROMPTS])
    assert torch.equal(scores, torch.tensor([1.0, 3.0, 1.0, 1.0, 5.0]))
    assert [len(r["prompts"]) for r in server.requests] == [2, 2, 1]
    assert server.requests[0]["messages"] == [[["user", "a ="]], [["user", "b ="]]]
    assert server.requests[0]["responses"] == ["x", "y y"]


def test_5xx_is_retried_with_backoff_then_succeeds(serve):
    server = serve([(503, "busy"), (500, "oops"), (200, None)])
    start = time.monotonic()
    assert fast(server.url, backoff=0.2).score(PROMPTS[:1], RESPONSES[:1]).tolist() == [1.0]
    assert len(server.requests) == 3
    assert time.monotonic() - start >= 0.2 + 0.4  # waited backoff, then twice that


def test_5xx_every_time_raises_after_bounded_retries(serve):
    server = serve([(500, "Internal Server Error")])
    with pytest.raises(RemoteServiceError, match=rf"{server.url} failed after 3 attempts.*"
                                                 "HTTP 500"):
        fast(server.url).score(PROMPTS, RESPONSES)
    assert len(server.requests) == 3


def test_server_down_raises_naming_the_url_without_hanging():
    url = f"http://127.0.0.1:{free_port()}/score"  # nothing listens there
    start = time.monotonic()
    with pytest.raises(RemoteServiceError, match=rf"{url} failed after 3 attempts \(is it "
                                                 r"running\?\): cannot connect"):
        fast(url).label(PROMPTS, RESPONSES, RESPONSES[::-1])
    assert time.monotonic() - start < 5


def test_server_stopped_mid_labelling_raises_and_returns_nothing(serve):
    server = serve([(200, None)], stop_after=1)
    labeller = fast(server.url, batch_size=2)
    result = None
    with pytest.raises(RemoteServiceError, match=rf"{server.url} failed after 3 attempts"):
        result = labeller.label(PROMPTS, RESPONSES, RESPONSES[::-1])
    assert result is None and len(server.requests) == 1  # the first batch only was answered


@pytest.mark.parametrize("answer,match", [
    ({"scores": [1.0]}, r"answered 1 scores for 2 items"),
    ('{"scores": [1.0, NaN]}', r"answered no number \(NaN, null or other\) for items \[1\]"),
    ({"scores": [None, 2.0]}, r"answered no number .* for items \[0\]"),
    ({"scores": ["1", 2.0]}, r"answered no number .* for items \[0\]"),
    ({"rewards": [1.0, 2.0]}, r"answered \{'rewards'"),
    ("<html>hello</html>", r"answered with no JSON"),
])
def test_garbled_answers_raise_naming_the_url(serve, answer, match):
    server = serve([(200, answer)])
    with pytest.raises(RemoteServiceError, match=rf"reward server {server.url} {match}"):
        fast(server.url).score(PROMPTS[:2], RESPONSES[:2])
    assert len(server.requests) == 1  # a garbled answer is not retried


def test_4xx_is_not_retried(serve):
    server = serve([(422, '{"detail": "lengths differ"}')])
    with pytest.raises(RemoteServiceError, match=r"refused the request \(HTTP 422.*lengths"):
        fast(server.url).score(PROMPTS, RESPONSES)
    assert len(server.requests) == 1


def test_slow_server_times_out_without_retrying(serve):
    server = serve([(200, None)], delay=1.5)
    start = time.monotonic()
    with pytest.raises(RemoteServiceError, match=rf"{server.url} sent no answer within "
                                                 r"timeout=0.3 s"):
        fast(server.url, timeout=0.3).score(PROMPTS, RESPONSES)
    assert time.monotonic() - start < 1.5 and len(server.requests) == 1


def test_options_checked_and_url_completed():
    assert RemoteRewardLabeller("http://127.0.0.1:8000").url == "http://127.0.0.1:8000/score"
    assert RemoteRewardLabeller("http://h:1/v1/rm").url == "http://h:1/v1/rm"
    with pytest.raises(ValueError, match="url must be"):
        RemoteRewardLabeller("127.0.0.1:8000/score")
    with pytest.raises(ValueError, match="retries >= 0"):
        RemoteRewardLabeller("http://h:1", retries=-1)
    with pytest.raises(ValueError, match="lengths"):
        RemoteRewardLabeller("http://h:1").score(["a"], ["b", "c"])


def test_pickles_without_its_session(serve):
    server = serve([(200, None)])
    labeller = fast(server.url)
    labeller.score(PROMPTS[:1], RESPONSES[:1])
    assert labeller._session is not None
    copy = pickle.loads(pickle.dumps(labeller))
    assert copy._session is None and copy.score(PROMPTS[:1], RESPONSES[:1]).tolist() == [1.0]


@pytest.mark.parametrize("config", [
    {"class_path": "sail_lightning.labellers.RemoteRewardLabeller",
     "init_args": {"url": "http://127.0.0.1:8000/score", "timeout": 5, "retries": 1,
                   "backoff": 0.5, "batch_size": 8}},
    {"class_path": "sail_lightning.labellers.JudgeLabeller",
     "init_args": {"model": "judge", "base_url": "http://127.0.0.1:8000/v1",
                   "require_api_key": False, "tie_break": "random", "seed": 3}},
])
def test_built_from_yaml_primitives(config):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(Labeller, "labeller")
    built = parser.instantiate_classes(parser.parse_object({"labeller": config})).labeller
    assert type(built).__name__ == config["class_path"].rsplit(".", 1)[1]
    for key, value in config["init_args"].items():
        if key not in ("require_api_key", "seed"):
            assert getattr(built, key) == value


def test_a_served_cost_model_is_read_lower_is_better(serve):
    # The scripted server scores by response length: as costs, the shorter response wins.
    server = serve([(200, None)])
    cost = fast(server.url, lower_is_better=True)
    assert torch.equal(cost.score(PROMPTS, RESPONSES), -torch.tensor([1.0, 3.0, 1.0, 1.0, 5.0]))
    labels = cost.label(PROMPTS[:2], ["x x x", "y"], ["x", "y y"])
    assert labels.a_preferred.tolist() == [False, True]
