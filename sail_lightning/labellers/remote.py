"""A labeller whose reward model runs elsewhere: the client of ``sail-lightning serve-reward``.

The reward model then lives in its own process (another GPU, another machine), loaded once
and shared by every rank and run; the training process sends text only. In YAML, under
``PairGenerationCallback``'s (or ``EvaluationCallback``'s) ``labeller:``/``judge:``::

    labeller:
      class_path: sail_lightning.labellers.RemoteRewardLabeller
      init_args: {url: "http://127.0.0.1:8000/score", timeout: 60, retries: 3, max_length: 256}

``max_length`` (and ``model``) are checked against what the server reports on ``GET /info``
before the first request: a server started with another ``--max-length`` cuts inputs
elsewhere and scores differently from the in-process labeller the config had before.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlparse

import requests
import torch

from sail_lightning.labellers.base import Messages, ScoringLabeller, check_lengths

log = logging.getLogger("sail_lightning.labellers")


class RemoteServiceError(RuntimeError):
    """A scoring or judging service failed: down, too slow, an error, or a garbled answer.

    The message names the URL. Nothing is returned half-done: a round whose labelling
    fails raises as a whole.
    """


class RemoteRewardLabeller(ScoringLabeller):
    """Scores with a reward model served by ``sail-lightning serve-reward``; the higher score
    is chosen, ties going to ``a`` (as ``RewardModelLabeller``, whose scores the server sends).

    Each call sends its items in requests of ``batch_size`` (prompt, response) pairs, one after
    another; ``label`` scores both responses of every pair in one pass and each distinct input
    once, so identical responses tie exactly. The server applies the reward model's own
    tokenizer and chat template to the text (``messages`` are sent as ``[role, content]``).

    Failures: a connection error or a 5xx answer is retried ``retries`` times, waiting
    ``backoff * 2**k`` seconds before retry ``k``; then, or at once on a 4xx answer, a read
    timeout (the server may still be working: asking again would only queue more work) or a
    garbled answer (not JSON, the wrong number of scores, NaN), ``RemoteServiceError`` naming
    the URL is raised and no score of the call is returned.

    Args:
        url: The server's scoring route, ``http://HOST:PORT/score``; a URL without a path
            gets ``/score``.
        timeout: Seconds to wait for the connection and then for each answer.
        retries: Retries of a request after a connection error or a 5xx answer.
        backoff: Seconds before the first retry; doubled at each next one.
        batch_size: (prompt, response) pairs per request.
        lower_is_better: The server scores a cost: ``score`` returns the negated costs.
        max_length: The ``--max-length`` the server must score with (the in-process
            ``RewardModelLabeller``'s ``max_length`` this replaces); None: not checked.
        model: The ``--model`` the server must host, as given to it; None: not checked.

    Raises:
        ValueError: On the first call, when the server reports another ``max_length`` or
            ``model`` than the ones given (the message names both and the URL).
    """

    def __init__(self, url: str, *, timeout: float = 60.0, retries: int = 3,
                 backoff: float = 1.0, batch_size: int = 64,
                 lower_is_better: bool = False, max_length: int | None = None,
                 model: str | None = None) -> None:
        parsed = urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"url must be http(s)://HOST:PORT[/score], got {url!r}")
        if timeout <= 0 or retries < 0 or backoff < 0 or batch_size < 1:
            raise ValueError("need timeout > 0, retries >= 0, backoff >= 0, batch_size >= 1; "
                             f"got {timeout}, {retries}, {backoff}, {batch_size}")
        self.url = url if parsed.path not in ("", "/") else url.rstrip("/") + "/score"
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.batch_size = batch_size
        self.lower_is_better = bool(lower_is_better)
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.max_length, self.model = max_length, model
        self._session: requests.Session | None = None
        self._settings_checked = False

    def __getstate__(self) -> dict[str, Any]:
        # A session holds sockets: each process (a spawned DDP worker) opens its own.
        return {**self.__dict__, "_session": None}

    @property
    def session(self) -> requests.Session:
        if self._session is None:
            self._session = requests.Session()
        return self._session

    def score(self, prompts: Sequence[str], responses: Sequence[str], *,
              messages: Messages | None = None) -> torch.Tensor:
        """Float32 CPU scores ``(n,)``, one request per ``batch_size`` items.

        Raises:
            RemoteServiceError: The server could not score them (the message names the URL).
        """
        n = check_lengths(prompts=prompts, responses=responses, messages=messages)
        self.check_served_settings()
        scores: list[float] = []
        for start in range(0, n, self.batch_size):
            stop = start + self.batch_size
            payload = {"prompts": list(prompts[start:stop]),
                       "responses": list(responses[start:stop]),
                       "messages": None if messages is None else
                       [[list(turn) for turn in m] for m in messages[start:stop]]}
            scores.extend(self._checked_scores(self._post(payload), len(payload["prompts"])))
        return self.oriented(torch.tensor(scores, dtype=torch.float32))
    def check_served_settings(self) -> dict[str, Any] | None:
        """The server's ``GET /info`` (once per labeller), checked against ``max_length`` and
        ``model``; None where the server has no such route (an older one) or cannot be
        reached now (the scoring request then reports it).

        Raises:
            ValueError: The server reports other settings than the ones given.
        """
        if self._settings_checked:
            return None
        info_url = self.url.rsplit("/", 1)[0] + "/info"
        try:
            answer = self.session.get(info_url, timeout=self.timeout)
        except requests.RequestException:
            return None  # not marked checked: asked again on the next call
        self._settings_checked = True
        try:
            info = answer.json().get("model") if answer.status_code == 200 else None
        except (ValueError, AttributeError):
            info = None
        if not isinstance(info, dict):
            log.debug("reward server %s reports no settings (HTTP %d)", info_url,
                      answer.status_code)
            return None
        wanted = {"max_length": self.max_length, "name_or_path": self.model}
        differ = {k: (v, info.get(k)) for k, v in wanted.items()
                  if v is not None and info.get(k) != v}
        if differ:
            names = {"max_length": "max_length", "name_or_path": "model"}
            detail = "; ".join(f"{names[k]}={mine!r} here, {theirs!r} served"
                               for k, (mine, theirs) in differ.items())
            raise ValueError(
                f"RemoteRewardLabeller: the reward server {self.url} scores with other "
                f"settings than configured ({detail}): restart it with "
                f"`sail-lightning serve-reward --model {self.model or info.get('name_or_path')} "
                f"--max-length {self.max_length or info.get('max_length')}`, or change the "
                "labeller's max_length / model")
        log.info("reward server %s: model %r, max_length %s", self.url, info.get("name_or_path"),
                 info.get("max_length"))
        return info

    def _post(self, payload: dict[str, Any]) -> Any:
        """The answer's JSON, after bounded retries of connection errors and 5xx answers."""
        for attempt in range(self.retries + 1):
            try:
                answer = self.session.post(self.url, json=payload, timeout=self.timeout)
            except requests.ReadTimeout as e:
                raise RemoteServiceError(f"reward server {self.url} sent no answer within "
                                         f"timeout={self.timeout} s") from e
            except requests.ConnectionError as e:
                problem: str = f"cannot connect ({type(e).__name__}: {e})"
            else:
                if answer.status_code < 400:
                    try:
                        return answer.json()
                    except ValueError as e:
                        raise RemoteServiceError(f"reward server {self.url} answered with no "
                                                 f"JSON: {answer.text[:200]!r}") from e
                problem = f"HTTP {answer.status_code}: {answer.text[:300]}"
                if answer.status_code < 500:  # the request is at fault: it would fail again
                    raise RemoteServiceError(f"reward server {self.url} refused the request "
                                             f"({problem})")
            if attempt < self.retries:
                wait = self.backoff * 2**attempt
                log.warning("reward server %s: %s; retry %d/%d in %.1f s", self.url, problem,
                            attempt + 1, self.retries, wait)
                time.sleep(wait)
        raise RemoteServiceError(f"reward server {self.url} failed after {self.retries + 1} "
                                 f"attempts (is it running?): {problem}")

    def _checked_scores(self, answer: Any, n: int) -> list[float]:
        scores = answer.get("scores") if isinstance(answer, dict) else None
        if not isinstance(scores, list) or len(scores) != n:
            got = f"{len(scores)} scores" if isinstance(scores, list) else repr(answer)[:200]
            raise RemoteServiceError(f"reward server {self.url} answered {got} for {n} items; "
                                     'expected {"scores": [one number per item]}')
        bad = [i for i, s in enumerate(scores) if not isinstance(s, (int, float))
               or isinstance(s, bool) or math.isnan(s)]
        if bad:
            raise RemoteServiceError(f"reward server {self.url} answered no number (NaN, null "
                                     f"or other) for items {bad[:10]} of {n}")
        return [float(s) for s in scores]
