"""A reward model served over HTTP with LitServe: ``sail-lightning serve-reward``.

The server hosts one sequence-classifier reward model through ``RewardModelLabeller``, so the
model's own tokenizer and chat template are applied server-side exactly as a labeller in the
training process would apply them; clients send text. ``RemoteRewardLabeller`` is its client.

Route ``POST /score``; request and response JSON (``messages`` may be omitted or null)::

    {"prompts": ["2 + 2 =", ...], "responses": ["4", ...],
     "messages": [[["user", "2 + 2 ="]], ...]}
    -> {"scores": [1.25, ...]}

One score per (prompt, response), in request order, float32 precision; ``null`` where the
model's score is NaN. ``messages`` holds each prompt as ``[role, content]`` turns, rendered
with the reward model's chat template (if it has one) followed by the response as the
assistant's turn. A malformed request (lengths differ, wrong types) is refused with 422 and a
message naming the field. ``GET /health`` answers 200 once the model is loaded; LitServe's
``GET /info`` answers the served settings as ``{"model": {"name_or_path": ..., "max_length": ...,
"batch_size": ..., "output_field": ...}, "server": {...}}``, which ``RemoteRewardLabeller``
checks against its own.

SIGTERM (``kill PID``, how Docker, systemd and Kubernetes stop a service) shuts the server
down as Ctrl+C does: its LitServe workers are stopped and reaped, and the port is free again.
"""

# No ``from __future__ import annotations``: LitServe hands ``decode_request``'s annotation to
# FastAPI as the request model, which must then be the class itself, not a string.

import argparse
import inspect
import logging
import math
import os
import signal
from collections.abc import Sequence
from typing import Any

try:
    import litserve as ls
except ImportError as e:  # an optional dependency: only the server needs it
    raise ImportError("sail-lightning serve-reward and serve-judge need LitServe: "
                      "pip install 'sail-lightning[serve]'") from e
from pydantic import BaseModel, model_validator

from sail_lightning.common import DTYPES
from sail_lightning.labellers import RewardModelLabeller

log = logging.getLogger("sail_lightning.serving")

ROUTE = "/score"
# The settings LitServe's GET /info reports (as its "model"): those that change a score.
INFO_FIELDS = ("name_or_path", "max_length", "batch_size", "output_field")
# LitServe binds only these; a specific interface is not among its choices.
HOSTS = ("127.0.0.1", "0.0.0.0", "::")


class ScoreRequest(BaseModel):
    """A request body: ``n`` prompts and responses, and optionally the prompts as turns."""

    prompts: list[str]
    responses: list[str]
    messages: list[list[tuple[str, str]]] | None = None

    @model_validator(mode="after")
    def _same_lengths(self) -> "ScoreRequest":
        lengths = {"prompts": len(self.prompts), "responses": len(self.responses)}
        if self.messages is not None:
            lengths["messages"] = len(self.messages)
        if len(set(lengths.values())) > 1:
            raise ValueError(f"lengths differ: {lengths}")
        return self


class ScoreResponse(BaseModel):
    """A response body: one score per item, in request order (null for NaN)."""

    scores: list[float | None]


class RewardModelAPI(ls.LitAPI):
    """LitServe API scoring (prompt, response) pairs with a ``RewardModelLabeller``.

    Each request carries a list of items, scored in the model's batches of ``batch_size``
    sequences (longest first). With ``max_batch_size > 1`` LitServe also merges requests that
    arrive within ``batch_timeout`` seconds (several ranks labelling at once) into one pass.

    Args:
        labeller_kwargs: ``RewardModelLabeller`` arguments (``name_or_path``, ``batch_size``,
            ``max_length``, ``torch_dtype``, ``trust_remote_code``, ``model_class``,
            ``output_field``); ``device`` pins the model to one device (``"cuda:1"``), else
            it goes where LitServe places the worker.
        max_batch_size: Requests merged into one pass at most.
        batch_timeout: Seconds to wait for more requests to merge.
    """

    def __init__(self, labeller_kwargs: dict[str, Any], *, max_batch_size: int = 1,
                 batch_timeout: float = 0.0) -> None:
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout,
                         api_path=ROUTE)
        self.labeller_kwargs = dict(labeller_kwargs)
        self.labeller: RewardModelLabeller | None = None

    def setup(self, device: str) -> None:
        kwargs = {"device": device, **self.labeller_kwargs, "progress": False}
        # Loaded here, before the worker reports ready: /health is 200 once requests can run.
        self.labeller = RewardModelLabeller(**kwargs).load()
        log.info("reward model %r loaded on %s", kwargs["name_or_path"], self.labeller.device)

    def decode_request(self, request: ScoreRequest) -> ScoreRequest:
        return request

    def predict(self, x: ScoreRequest | list[ScoreRequest]) -> Any:
        requests = x if self.max_batch_size > 1 else [x]
        scores = self._score_requests(requests)
        return scores if self.max_batch_size > 1 else scores[0]

    def _score_requests(self, requests: Sequence[ScoreRequest]) -> list[list[float]]:
        """Scores all requests' items in one pass per kind (with and without messages)."""
        out: list[list[float]] = [[] for _ in requests]
        for with_messages in (False, True):
            group = [i for i, r in enumerate(requests) if (r.messages is not None) == with_messages]
            if not group or not any(requests[i].prompts for i in group):
                continue
            prompts = [p for i in group for p in requests[i].prompts]
            responses = [y for i in group for y in requests[i].responses]
            messages = [m for i in group for m in requests[i].messages] if with_messages else None
            scores = self.labeller.score(prompts, responses, messages=messages).tolist()
            start = 0
            for i in group:
                n = len(requests[i].prompts)
                out[i], start = scores[start : start + n], start + n
        return out

    def encode_response(self, output: list[float]) -> ScoreResponse:
        # JSON has no NaN: null tells the client the model failed on that item.
        return ScoreResponse(scores=[None if math.isnan(s) else s for s in output])


def build_server(labeller_kwargs: dict[str, Any], *, device: str = "auto",
                 max_batch_size: int = 1, batch_timeout: float = 0.0,
                 timeout: float = 300.0) -> ls.LitServer:
    """A ``LitServer`` with one worker hosting the reward model; ``server.run(...)`` serves it.

    Args:
        labeller_kwargs: As ``RewardModelAPI``'s (without ``device``).
        device: ``auto`` (a GPU if there is one), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        timeout: Seconds a request may wait for the worker before a 504.

    Raises:
        ValueError: ``device`` is none of those.
    """
    kind, pinned = parse_device(device)
    kwargs = dict(labeller_kwargs)
    if pinned:
        kwargs["device"] = pinned
    api = RewardModelAPI(kwargs, max_batch_size=max_batch_size, batch_timeout=batch_timeout)
    # LitServe's own GET /info shows model_metadata as its "model".
    return ls.LitServer(api, accelerator=kind, devices=1, timeout=timeout,
                        model_metadata=served_settings(labeller_kwargs))


def parse_device(device: str) -> tuple[str, str | None]:
    """``--device`` as LitServe's accelerator and the one device to pin the model to, if any
    (``cuda:1``: LitServe numbers the devices it is given, so the one asked for is pinned).

    Raises:
        ValueError: ``device`` is none of auto, cpu, cuda, cuda:N, mps.
    """
    kind, _, index = device.partition(":")
    if kind not in ("auto", "cpu", "cuda", "mps") or (index and kind != "cuda"):
        raise ValueError(f"--device must be auto, cpu, cuda, cuda:N or mps, got {device!r}")
    return kind, device if index else None


def served_settings(labeller_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The settings that change a score, as ``GET /info`` reports them under ``"model"``
    (``name_or_path`` as given to ``--model``)."""
    defaults = {k: v.default
                for k, v in inspect.signature(RewardModelLabeller).parameters.items()}
    merged = {**defaults, **{k: v for k, v in labeller_kwargs.items() if v is not None}}
    return {k: merged.get(k) for k in INFO_FIELDS}


HELP = f"""\
Serve a reward model (a sequence classifier with one output, loaded with its own tokenizer
and chat template, as RewardModelLabeller loads it) over HTTP with LitServe.

route: POST http://HOST:PORT{ROUTE}
request JSON: {{"prompts": [str, ...], "responses": [str, ...],
                "messages": [[[role, content], ...], ...] | null}}
  (equal lengths; messages optional: each prompt as chat turns, rendered with the model's
  chat template, the response appended as the assistant turn)
response JSON: {{"scores": [float | null, ...]}}  (one per item, in order; null = NaN)
errors: 422 for a malformed request (the message names the field), 5xx on server errors.
health: GET http://HOST:PORT/health answers 200 once the model is loaded.
info: GET http://HOST:PORT/info answers the served settings (name_or_path, max_length, ...),
  which
  RemoteRewardLabeller(max_length=...) checks: pass the --max-length of in-process runs.
stop: SIGTERM (kill PID) or Ctrl+C; the workers are reaped and the port freed.
client: sail_lightning.labellers.RemoteRewardLabeller(url="http://HOST:PORT{ROUTE}")
"""


def add_server_options(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the options every ``sail-lightning serve-*`` command shares (where it listens,
    where the model runs, how long a request may wait, logging) to ``p``; returns ``p``.
    ``run_server`` reads them back."""
    p.add_argument("--port", type=int, default=8000, help="port (1024-65535; default 8000)")
    p.add_argument("--host", default="127.0.0.1", choices=HOSTS,
                   help="interface: 127.0.0.1 (default, this machine only) or all (0.0.0.0, ::)"
                   "; the server has no authentication")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--torch-dtype", choices=tuple(DTYPES),
                   help="weights' dtype (default: as saved)")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds a request may wait for the model before a 504")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run the Python code in the model's folder (read it first)")
    p.add_argument("--log-level", default="info",
                   choices=("critical", "error", "warning", "info", "debug"))
    return p


def run_server(server: ls.LitServer, args: argparse.Namespace) -> None:
    """Serves ``server`` on ``add_server_options``' --host/--port until SIGTERM or Ctrl+C."""
    sigterm_as_interrupt()
    # No client.py written to the working directory; one API server process suffices.
    server.run(host=args.host, port=args.port, log_level=args.log_level,
               generate_client_file=False, num_api_servers=1)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sail-lightning serve-reward", description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="local folder or hub name of the reward model and its tokenizer")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    p.add_argument("--max-length", type=int, default=1024,
                   help="longest input in tokens (the left is cut; default 1024, as "
                   "RewardModelLabeller's; configs/real_text uses 256: pass the same)")
    p.add_argument("--max-batch-size", type=int, default=1,
                   help="merge up to this many concurrent requests into one pass (LitServe)")
    p.add_argument("--batch-timeout", type=float, default=0.0,
                   help="seconds to wait for requests to merge (with --max-batch-size > 1)")
    p.add_argument("--model-class", help="import path 'pkg.mod:Class' of another model class")
    p.add_argument("--output-field", default="logits",
                   help="output field holding the scores (beaver's score models: end_scores)")
    return add_server_options(p)


def serve_reward(argv: Sequence[str] | None = None) -> None:
    """Runs ``sail-lightning serve-reward`` with ``argv`` (the arguments after the command)
    until interrupted. Options are checked before anything loads."""
    args = parser().parse_args(argv)
    kwargs = {"name_or_path": args.model, "batch_size": args.batch_size,
              "max_length": args.max_length, "torch_dtype": args.torch_dtype,
              "trust_remote_code": args.trust_remote_code, "model_class": args.model_class,
              "output_field": args.output_field}
    RewardModelLabeller(**kwargs)  # validates the options here, not in the worker
    path = os.path.expanduser(args.model)
    if args.model.startswith(("/", ".", "~")) and not os.path.isdir(path):  # else a hub name
        raise SystemExit(f"serve-reward: --model: no such folder: {args.model}")
    server = build_server(kwargs, device=args.device, max_batch_size=args.max_batch_size,
                          batch_timeout=args.batch_timeout, timeout=args.timeout)
    run_server(server, args)


def sigterm_as_interrupt() -> None:
    """SIGTERM to the main process raises KeyboardInterrupt there, LitServe's one path to a
    clean shutdown (it stops and reaps its workers); without this the default action kills
    the main process alone and its workers go on serving on the port. The processes LitServe
    forks inherit the handler: in them it falls back to SIGTERM's default action, so
    LitServe's own ``terminate()`` of a worker still ends it."""
    main_pid = os.getpid()

    def handler(signum: int, frame: Any) -> None:
        if os.getpid() != main_pid:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
