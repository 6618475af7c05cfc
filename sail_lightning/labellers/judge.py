"""An LLM judge over an OpenAI-compatible chat API (OpenAI, vLLM, LitServe's ``OpenAISpec``):
pairwise verdicts asked in both orders, as the SAIL paper judged win rates with GPT-4.

In YAML, under ``PairGenerationCallback``'s ``labeller:``::

    labeller:
      class_path: sail_lightning.labellers.JudgeLabeller
      init_args: {model: gpt-4o-mini, api_key_env: OPENAI_API_KEY}
"""

from __future__ import annotations

import logging
import os
import re
import string
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from sail_lightning.interfaces import PairwiseJudge
from sail_lightning.labellers.base import Labeller, Labels, Messages, check_lengths
from sail_lightning.labellers.remote import RemoteServiceError

log = logging.getLogger("sail_lightning.labellers")

DEFAULT_TEMPLATE = """\
Which of the two responses below answers the prompt better: more helpful, more accurate, \
and harmless? Judge the content, not the order or the length.

[Prompt]
{prompt}

[Response A]
{response_a}

[Response B]
{response_b}

[End]
Answer with exactly one of: A, B or tie."""

_FIELDS = {"prompt", "response_a", "response_b"}
# Words a judge may wrap its verdict in ("Response A.", "Final verdict: tie").
_FILLER = {"response", "answer", "verdict", "final", "my", "the", "is", "better", "winner",
           "assistant", "output", "option"}
_TIES = {"tie", "draw", "equal", "tied"}


def parse_verdict(text: str | None) -> str | None:
    """``"A"``, ``"B"``, ``"tie"``, or None where the answer says none of them alone.

    Case, punctuation, markdown and filler words are ignored: ``"**B**"``, ``"Response A."``,
    ``"Tie!"`` and ``"Final verdict: tie"`` parse; ``"A or B"`` and ``"Both are fine"`` do not.
    """
    words = [w for w in re.findall(r"[a-z]+", (text or "").lower()) if w not in _FILLER]
    if words in (["a"], ["b"]):
        return words[0].upper()
    if len(words) == 1 and words[0] in _TIES:
        return "tie"
    return None


def render_prompt(prompt: str, turns: Sequence[Sequence[str]] | None) -> str:
    """The prompt as the judge reads it: the text, or ``role: content`` lines of the turns."""
    if not turns:
        return prompt
    if len(turns) == 1 and turns[0][0] == "user":
        return turns[0][1]
    return "\n".join(f"{role}: {content}" for role, content in turns)


class JudgeLabeller(Labeller, PairwiseJudge):
    """Pairwise verdicts of an LLM behind an OpenAI-compatible chat API (official ``openai``
    client); it has no scores (``score`` returns None).

    Each pair is asked twice, with the responses in both orders, to cancel position bias: ``a``
    is chosen when it wins both times, ``b`` likewise; a split verdict, a tie in either order or
    an unparseable answer (see ``parse_verdict``; logged and counted) make the pair a tie.
    ``compare`` returns those outcomes (1 / 0.5 / 0, a win rate's terms); ``label`` resolves
    ties to ``a`` (``tie_break="a"``, as the reward labellers' argmax does) or by a seeded draw
    (``tie_break="random"``; the online loop reseeds it per round and rank).

    Counters since construction or ``reset_stats()`` (``stats()``): API requests, the API's
    ``usage`` prompt and completion tokens, pairs judged, ties and unparseable answers.

    Args:
        model: The model name the API serves (``gpt-4o``, a vLLM model's name).
        base_url: The API's base URL (``http://127.0.0.1:8000/v1``); default: OpenAI's.
        api_key_env: The environment variable holding the API key (never put a key in YAML).
        require_api_key: False lets a local server without keys run with the variable unset
            (a dummy key is sent).
        template: The user message, a ``str.format`` template with exactly the fields
            ``{prompt}``, ``{response_a}`` and ``{response_b}``; default ``DEFAULT_TEMPLATE``.
        system_prompt: An optional system message before it.
        tie_break: ``"a"`` or ``"random"``: how ``label`` resolves a tie.
        seed: Seed of the ``random`` tie-break draws.
        max_tokens: Completion token limit per answer; None sends none (reasoning models
            refuse ``max_tokens``).
        temperature: Sampling temperature; None sends none.
        timeout: Seconds per API request.
        max_retries: The client's retries (exponential backoff) of connection errors, 408,
            429 and 5xx answers, after which the call raises.
        concurrency: API requests in flight at once.
    """

    def __init__(self, model: str, *, base_url: str | None = None,
                 api_key_env: str = "OPENAI_API_KEY", require_api_key: bool = True,
                 template: str | None = None, system_prompt: str | None = None,
                 tie_break: str = "a", seed: int = 0, max_tokens: int | None = 16,
                 temperature: float | None = 0.0, timeout: float = 60.0, max_retries: int = 2,
                 concurrency: int = 4) -> None:
        self.template = DEFAULT_TEMPLATE if template is None else template
        fields = {f for _, f, _, _ in string.Formatter().parse(self.template) if f is not None}
        if fields != _FIELDS:
            raise ValueError(f"JudgeLabeller template must have exactly the fields "
                             f"{sorted(_FIELDS)}, got {sorted(fields)}")
        if tie_break not in ("a", "random"):
            raise ValueError(f"JudgeLabeller tie_break must be 'a' or 'random', got {tie_break!r}")
        if concurrency < 1:
            raise ValueError(f"JudgeLabeller concurrency must be >= 1, got {concurrency}")
        if not os.environ.get(api_key_env) and require_api_key:
            raise ValueError(f"JudgeLabeller: the environment variable {api_key_env} (option "
                             "api_key_env) holds no API key; set it, or require_api_key: false "
                             "for a local server that needs none")
        self.model, self.base_url, self.api_key_env = model, base_url, api_key_env
        self.system_prompt, self.tie_break = system_prompt, tie_break
        self.max_tokens, self.temperature = max_tokens, temperature
        self.timeout, self.max_retries, self.concurrency = timeout, max_retries, concurrency
        self.generator = torch.Generator().manual_seed(seed)
        self._client: Any = None
        self.reset_stats()

    def __getstate__(self) -> dict[str, Any]:
        # The client holds connections and locks: each process (a DDP worker) makes its own.
        return {**self.__dict__, "_client": None}

    @property
    def where(self) -> str:
        """The API and model, as error messages name them."""
        return f"judge {self.model!r} at {self.base_url or 'the OpenAI API'}"

    @property
    def client(self) -> Any:
        if self._client is None:
            try:
                from openai import OpenAI
            except ImportError as e:  # an optional dependency: only the judge needs it
                raise ImportError("JudgeLabeller needs the openai client: "
                                  "pip install 'sail-lightning[judge]'") from e

            self._client = OpenAI(base_url=self.base_url, timeout=self.timeout,
                                  max_retries=self.max_retries,
                                  api_key=os.environ.get(self.api_key_env) or "no-key")
        return self._client

    def reset_stats(self) -> None:
        """Zeroes the counters of ``stats()`` (e.g. at the start of each round)."""
        self.usage = {"prompt_tokens": 0, "completion_tokens": 0, "requests": 0}
        self.counts = {"pairs": 0, "ties": 0, "unparsed": 0}

    def stats(self) -> dict[str, int]:
        """The counters, named for logging under a prefix (``gen/judge_prompt_tokens``)."""
        return {f"judge_{k}": v for k, v in {**self.usage, **self.counts}.items()}

    def _ask(self, client: Any, prompt: str, first: str, second: str
             ) -> tuple[str | None, str, Any]:
        messages = [{"role": "user", "content": self.template.format(
            prompt=prompt, response_a=first, response_b=second)}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        options = {k: v for k, v in (("max_tokens", self.max_tokens),
                                     ("temperature", self.temperature)) if v is not None}
        from openai import OpenAIError

        try:
            answer = client.chat.completions.create(model=self.model, messages=messages,
                                                    **options)
            text = answer.choices[0].message.content or ""
        except (OpenAIError, IndexError, AttributeError) as e:
            # The client's message holds an OpenAI-shaped body's {"error": ...} only; a
            # server's other body (LitServe's {"detail": ...}) is what says why.
            body = getattr(e, "body", None)
            why = f"{e} {body}" if body is not None and str(body) not in str(e) else str(e)
            raise RemoteServiceError(f"{self.where} failed (after {self.max_retries} retries "
                                     f"of connection errors and 5xx): {why}") from e
        return parse_verdict(text), text, answer.usage

    def compare(self, prompts: Sequence[str], responses_a: Sequence[str],
                responses_b: Sequence[str], *, messages: Messages | None = None) -> torch.Tensor:
        """Float64 CPU outcomes ``(n,)``: 1 where ``a`` wins in both orders, 0 where ``b`` does,
        0.5 otherwise (their mean is ``a``'s win rate, ties counting half).

        Raises:
            RemoteServiceError: The API failed; no outcome of the call is returned.
        """
        n = check_lengths(prompts=prompts, responses_a=responses_a, responses_b=responses_b,
                           messages=messages)
        shown = [render_prompt(p, None if messages is None else messages[i])
                 for i, p in enumerate(prompts)]
        asks = [(shown[i], responses_a[i], responses_b[i]) for i in range(n)]
        asks += [(shown[i], responses_b[i], responses_a[i]) for i in range(n)]
        client = self.client  # made here, once, not by several threads at a time
        with ThreadPoolExecutor(self.concurrency) as pool:
            futures = [pool.submit(self._ask, client, *ask) for ask in asks]
            try:
                answers = [f.result() for f in futures]
            except BaseException:
                pool.shutdown(cancel_futures=True)  # fail whole and soon: ask no more
                raise
        for verdict, text, usage in answers:
            self.usage["requests"] += 1
            if usage is not None:
                self.usage["prompt_tokens"] += usage.prompt_tokens or 0
                self.usage["completion_tokens"] += usage.completion_tokens or 0
            if verdict is None:
                self.counts["unparsed"] += 1
                log.warning("%s: unparseable verdict %r counted as a tie", self.where, text[:80])
        verdicts = [v for v, _, _ in answers]
        first, second = verdicts[:n], verdicts[n:]
        outcome = torch.full((n,), 0.5, dtype=torch.float64)
        for i in range(n):
            if (first[i], second[i]) == ("A", "B"):
                outcome[i] = 1.0
            elif (first[i], second[i]) == ("B", "A"):
                outcome[i] = 0.0
        self.counts["pairs"] += n
        self.counts["ties"] += int((outcome == 0.5).sum())
        return outcome

    def label(self, prompts: Sequence[str], responses_a: Sequence[str],
              responses_b: Sequence[str], *, messages: Messages | None = None) -> Labels:
        outcome = self.compare(prompts, responses_a, responses_b, messages=messages)
        tie = outcome == 0.5
        if self.tie_break == "random":
            broken = torch.rand(len(outcome), generator=self.generator) < 0.5
        else:
            broken = torch.ones(len(outcome), dtype=torch.bool)
        return Labels(a_preferred=torch.where(tie, broken, outcome == 1.0))
