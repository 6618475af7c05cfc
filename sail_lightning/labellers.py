"""Labellers: which of two sampled responses is chosen, in online DPO / SAIL rounds.

The interface is small (``label``, ``score``, ``to``) and kept stable, so that configs naming
a labeller by ``class_path`` keep working. Every labeller is built from YAML primitives, as
LightningCLI instantiates it from ``class_path`` / ``init_args``; callables go by import path::

    labeller:
      class_path: sail_lightning.labellers.RewardModelLabeller
      init_args: {name_or_path: path/to/reward_model, device: "cuda:1", batch_size: 32}
"""

from __future__ import annotations

import abc
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence

from sail_lightning.models import QuantizationOptions, resolve_quantization
from sail_lightning.synthetic import SyntheticTask

log = logging.getLogger("sail_lightning.labellers")

# Per example, the prompt as ``((role, content), ...)`` turns, as in ``PreferenceRecord``.
Messages = Sequence[Sequence[tuple[str, str]]]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_PATH_STARTS = tuple(p for p in (os.sep, os.altsep, ".", "~") if p)


@dataclass
class Labels:
    """The verdict on ``n`` pairs (CPU tensors).

    Attributes:
        a_preferred: Bool ``(n,)``: True where response ``a`` is chosen.
        scores_a: Float ``(n,)`` scores of the ``a`` responses, or None without scores.
        scores_b: The same for the ``b`` responses.
    """

    a_preferred: torch.Tensor
    scores_a: torch.Tensor | None = None
    scores_b: torch.Tensor | None = None


class Labeller(abc.ABC):
    """Given prompts and two responses each: which is chosen, plus scores where there are any."""

    @abc.abstractmethod
    def label(self, prompts: Sequence[str], responses_a: Sequence[str],
              responses_b: Sequence[str], *, messages: Messages | None = None) -> Labels:
        """Labels ``n`` pairs; responses are text only (no prompt).

        Args:
            messages: Optionally the prompts as chat turns, for labellers with a chat template.

        Raises:
            ValueError: If the inputs' lengths differ (the message gives every length).
        """

    def score(self, prompts: Sequence[str], responses: Sequence[str], *,
              messages: Messages | None = None) -> torch.Tensor | None:
        """Float32 CPU scores ``(n,)`` (best-of-n, eval reward), or None without scores."""
        return None

    def reseed(self, seed: int) -> None:
        """Restart the labeller's random draws (if any) from ``seed``. The online loop calls
        it before each round with a seed of (round, rank), so labels do not depend on how
        many rounds ran before in this process: a resumed run labels as an uninterrupted one.
        """
        if getattr(self, "generator", None) is not None:
            self.generator = torch.Generator().manual_seed(seed)

    def to(self, device: str | torch.device) -> Labeller:
        """Moves whatever the labeller runs on to ``device``; a no-op by default."""
        return self


def resolve_callable(path: str) -> Callable:
    """Imports ``"package.module:function"`` (attribute may be dotted) or ``"pkg.mod.function"``.

    Raises:
        ValueError: Not of either form. ImportError / AttributeError: no such module /
            attribute. TypeError: not callable. Every message names the path.
    """
    module_name, _, attr = path.partition(":") if ":" in path else path.rpartition(".")
    if not module_name.strip() or not attr.strip():
        raise ValueError(f"not an import path 'package.module:function': {path!r}")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise ImportError(f"cannot import module {module_name!r} of {path!r}: {e}") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise AttributeError(f"{path!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{path!r} is not callable (got {type(obj).__name__})")
    return obj


def _as_callable(fn: str | Callable, what: str) -> tuple[Callable, str]:
    """The callable and a name for messages; paths resolve now, before any model loads."""
    if isinstance(fn, str):
        return resolve_callable(fn), fn
    if not callable(fn):
        raise TypeError(f"{what} must be a callable or an import path, got {type(fn).__name__}")
    return fn, getattr(fn, "__qualname__", repr(fn))


def _check_lengths(**named: Sequence | None) -> int:
    """Returns the common length of the given sequences, or raises naming every length."""
    present = {k: v for k, v in named.items() if v is not None}
    if bad := [name for name, seq in present.items() if isinstance(seq, str)]:
        raise TypeError(f"{bad} must be sequences, got a single string (a forgotten list?)")
    lengths = {name: len(seq) for name, seq in present.items()}
    if len(set(lengths.values())) > 1:
        desc = ", ".join(f"{n} {name}" for name, n in lengths.items())
        raise ValueError(f"inputs must have equal lengths, got {desc}")
    return next(iter(lengths.values()))


def _as_vector(values: Any, n: int, source: str) -> torch.Tensor:
    """A user function's output as a float32 CPU tensor of shape ``(n,)``."""
    out = torch.as_tensor(values if torch.is_tensor(values) else list(values), dtype=torch.float32)
    out = out.detach().cpu().reshape(-1) if out.shape == (n, 1) else out.detach().cpu()
    if out.shape != (n,) or torch.isnan(out).any():
        raise ValueError(f"{source} returned shape {tuple(out.shape)} for {n} inputs, or NaN")
    return out


class _ScoringLabeller(Labeller):
    """Scores each response; the chosen one scores higher, ties going to ``a`` (argmax)."""

    def _score_pair(self, prompts: Sequence[str], responses_a: Sequence[str],
                    responses_b: Sequence[str], messages: Messages | None) -> tuple:
        return (self.score(prompts, responses_a, messages=messages),
                self.score(prompts, responses_b, messages=messages))

    def label(self, prompts: Sequence[str], responses_a: Sequence[str],
              responses_b: Sequence[str], *, messages: Messages | None = None) -> Labels:
        _check_lengths(prompts=prompts, responses_a=responses_a, responses_b=responses_b,
                       messages=messages)
        scores_a, scores_b = self._score_pair(prompts, responses_a, responses_b, messages)
        return Labels(scores_a >= scores_b, scores_a, scores_b)


def prompt_response_ids(tokenizer: Any, prompt: str, response: str) -> list[int]:
    """A reward model's input without a chat template: the prompt's ids (with any bos), then
    the response's. Also how ``experiments`` trains its reward model, so training and
    scoring see the same input."""
    return (tokenizer(prompt)["input_ids"]
            + tokenizer(response, add_special_tokens=False)["input_ids"])


class RewardModelLabeller(_ScoringLabeller):
    """A reward model (sequence classifier, one label); the higher score is chosen.

    The model has its own tokenizer and chat template and is frozen, in eval mode, on its own
    device if given. It loads on first use, so building the labeller is cheap and config
    errors come first; being no ``nn.Module`` attribute, it is never trained or checkpointed.
    The chosen response is the argmax, as in the SAIL authors' code; ties go to ``a``.

    Input: with a chat template and ``messages``, the ids of the rendered ``messages +
    [assistant: response]`` (no special tokens added twice); else the prompt's ids (special
    tokens included) then the response's (none added), as the policy sees them, so a prompt
    ending in ``"="`` never fuses with the response. Over ``max_length``, the left is cut.

    Args:
        name_or_path: Hub name or local folder holding the model and its tokenizer.
        device: Its own device (``"cuda:1"``), which ``to()`` leaves; default: ``to()``'s.
        torch_dtype: ``float32``, ``bfloat16`` or ``float16`` weights (default: as saved).
        quantization: Load the linear layers in 4-bit (bitsandbytes, as the policy's
            ``model.quantization``); the classifier head stays in float. The 4-bit storage
            and default compute dtype is ``torch_dtype`` (default float32).
        batch_size: Sequences per forward pass.
        max_length: Longest input in tokens.
        progress: Show a tqdm bar over batches.
        trust_remote_code: Run the Python code shipped in the model's folder (its
            ``config.json`` ``auto_map``: ``modeling_*.py``), as models of a class transformers
            does not know need. Off by default: that code runs with your permissions, so only
            turn it on for folders whose code you have read or whose authors you trust.
        model_class: Import path (``"my_pkg.models:ScoreModel"``) of a model class whose
            ``from_pretrained`` loads the model instead of ``AutoModelForSequenceClassification``
            (e.g. beaver's ``LlamaForScore``); its output need not have one label.
        output_field: The field of the model's output holding the scores: ``logits`` for
            transformers' classifiers, ``end_scores`` for safe-rlhf's (beaver) score models.
            The score is its first column, per sequence; a model whose forward returns a
            bare tensor is read as that tensor.
    """

    def __init__(self, name_or_path: str, *, device: str | None = None,
                 torch_dtype: str | None = None, quantization: QuantizationOptions | None = None,
                 batch_size: int = 16, max_length: int = 1024, progress: bool = True,
                 trust_remote_code: bool = False, model_class: str | None = None,
                 output_field: str = "logits") -> None:
        if torch_dtype is not None and torch_dtype not in _DTYPES:
            raise ValueError(f"torch_dtype must be one of {sorted(_DTYPES)}, got {torch_dtype!r}")
        self.trust_remote_code, self.output_field = trust_remote_code, output_field
        # Resolved now, so a wrong path fails when the config is read, not at the first round.
        self.model_class = None if model_class is None else resolve_callable(model_class)
        self.quantization = resolve_quantization(quantization, "RewardModelLabeller.quantization")
        if batch_size < 1 or max_length < 1:
            raise ValueError(f"batch_size and max_length must be >= 1, got {batch_size}, "
                             f"{max_length}")
        self.name_or_path, self.torch_dtype, self.progress = name_or_path, torch_dtype, progress
        self.batch_size, self.max_length = batch_size, max_length
        self.fixed_device = torch.device(device) if device is not None else None  # typos fail now
        self.device = self.fixed_device or torch.device("cpu")
        self.model: torch.nn.Module | None = None
        self.tokenizer: Any = None
        self._warned = False

    @classmethod
    def from_model(cls, model: torch.nn.Module, tokenizer: Any, **kwargs: Any
                   ) -> RewardModelLabeller:
        """A labeller scoring with a model already in memory, on the device it is on.

        The model is used as it is (train or eval mode, trainable or not): put it in eval
        mode first. Its config gets the tokenizer's ``pad_token_id`` if it has none.

        Args:
            kwargs: ``batch_size``, ``max_length``, ``progress``.
        """
        labeller = cls(getattr(model, "name_or_path", None) or type(model).__name__,
                       device=str(next(model.parameters()).device), **kwargs)
        _check_reward_model(model, tokenizer, labeller.name_or_path)
        labeller.model, labeller.tokenizer = model, tokenizer
        return labeller

    def to(self, device: str | torch.device) -> RewardModelLabeller:
        if self.fixed_device is None:
            self.device = torch.device(device)
            if self.model is not None:
                self.model.to(self.device)
        return self

    def load(self) -> RewardModelLabeller:
        """Loads the model and tokenizer now rather than on first use (a server's start-up)."""
        if self.model is None:
            self._load()
        return self

    def _load(self) -> None:
        from transformers import AutoModelForSequenceClassification

        from sail_lightning.models import load_pretrained
        from sail_lightning.synthetic import build_tokenizer

        path = self.name_or_path
        if path.startswith(_PATH_STARTS) and not os.path.exists(os.path.expanduser(path)):
            raise FileNotFoundError(f"reward model: no such folder: {path}")
        remote = self.trust_remote_code
        try:
            tokenizer = build_tokenizer(path, trust_remote_code=remote)
            dtype = _DTYPES.get(self.torch_dtype)
            # float_head: a head quantized to 4 bits would move every score; it is tiny.
            model = load_pretrained(self.model_class or AutoModelForSequenceClassification, path,
                                    dtype, self.quantization, float_head=True,
                                    trust_remote_code=remote)
        except (OSError, ValueError) as e:
            hint = ("; it ships its own modelling code: set the labeller's option "
                    "trust_remote_code: true to run it (read it first)"
                    if "trust_remote_code" in str(e) and not remote else "")
            raise OSError(f"reward model {path!r} could not be loaded: {e}{hint}") from e
        if self.model_class is None:  # another class's output need not have one label
            _check_reward_model(model, tokenizer, path)
        else:
            _set_pad_token_id(model, tokenizer)
        model.requires_grad_(False)
        self.model = model.eval().to(self.device)
        self.tokenizer = tokenizer

    def _encode(self, prompt: str, response: str, turns: Sequence[tuple[str, str]] | None) -> list:
        tok = self.tokenizer
        if turns is not None and getattr(tok, "chat_template", None):
            chat = [*({"role": r, "content": c} for r, c in turns),
                    {"role": "assistant", "content": response}]
            text = tok.apply_chat_template(chat, tokenize=False)
            # The rendered text already holds any bos token: do not add it twice.
            ids = tok(text, add_special_tokens=False)["input_ids"]
        else:
            ids = prompt_response_ids(tok, prompt, response)
        return ids[-self.max_length :]

    @torch.no_grad()
    def score(self, prompts: Sequence[str], responses: Sequence[str], *,
              messages: Messages | None = None) -> torch.Tensor:
        from tqdm.auto import tqdm

        n = _check_lengths(prompts=prompts, responses=responses, messages=messages)
        if self.model is None:
            self._load()
        if messages is None and getattr(self.tokenizer, "chat_template", None) and not self._warned:
            log.warning("reward model %r has a chat template but no messages were given: "
                        "scoring prompt + response text", self.name_or_path)
            self._warned = True
        turns = messages if messages is not None else [None] * n
        encoded = [self._encode(x, y, t) for x, y, t in zip(prompts, responses, turns, strict=True)]
        # Longest first, so batches hold similar lengths (little padding) and an
        # out-of-memory error comes on the first batch rather than the last.
        order = sorted(range(n), key=lambda i: -len(encoded[i]))
        scores = torch.empty(n, dtype=torch.float32)
        pad_id = self.tokenizer.pad_token_id
        starts = range(0, n, self.batch_size)
        for start in tqdm(starts, desc="reward model", disable=not self.progress, leave=False):
            idx = order[start : start + self.batch_size]
            rows = [torch.tensor(encoded[i], dtype=torch.long) for i in idx]
            # Right padding keeps each sequence's positions as in an unpadded forward; the
            # classifier pools at the last non-pad token, which right padding does not move.
            input_ids = pad_sequence(rows, batch_first=True, padding_value=pad_id)
            mask = pad_sequence([torch.ones_like(r) for r in rows], batch_first=True)
            out = self.model(input_ids=input_ids.to(self.device),
                             attention_mask=mask.to(self.device))
            scores[idx] = _output_scores(out, self.output_field, len(idx), self.name_or_path)
        return scores

    def _score_pair(self, prompts: Sequence[str], responses_a: Sequence[str],
                    responses_b: Sequence[str], messages: Messages | None) -> tuple:
        n = len(prompts)
        # One pass over both sets (full batches, sorted by length across pairs), each distinct
        # input once: identical responses tie exactly (-> a) instead of by batching noise.
        turns = [None] * n if messages is None else [tuple(map(tuple, m)) for m in messages]
        keys = [*zip(prompts, responses_a, turns, strict=True),
                *zip(prompts, responses_b, turns, strict=True)]
        unique = list(dict.fromkeys(keys))
        scores = self.score([k[0] for k in unique], [k[1] for k in unique],
                            messages=None if messages is None else [k[2] for k in unique])
        where = {k: i for i, k in enumerate(unique)}
        both = scores[[where[k] for k in keys]]
        return both[:n], both[n:]


def _check_reward_model(model: torch.nn.Module, tokenizer: Any, name: str) -> None:
    """Requires one output, and gives the model the tokenizer's pad id if it has none."""
    if model.config.num_labels != 1:
        raise ValueError(f"reward model {name!r} has num_labels={model.config.num_labels}; "
                         "a reward model has one output")
    _set_pad_token_id(model, tokenizer)


def _set_pad_token_id(model: torch.nn.Module, tokenizer: Any) -> None:
    # HF classifiers pool at the last token that is not pad_token_id; without it they
    # refuse batches, so take the tokenizer's (build_tokenizer guarantees one).
    config = model.config.get_text_config()
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id


def _output_scores(out: Any, field: str, n: int, name: str) -> torch.Tensor:
    """Column 0 of the output's ``field`` (``(n,)`` or ``(n, k)``), or of the output itself
    where the model returns a bare tensor, as float32 on the CPU."""
    if torch.is_tensor(out):
        values = out
    else:
        values = out.get(field) if isinstance(out, dict) else getattr(out, field, None)
    if not torch.is_tensor(values) or values.shape[0] != n:
        raise ValueError(f"reward model {name!r}: its output has no tensor {field!r} with one "
                         f"row per sequence (option output_field; got {type(values).__name__})")
    return values.reshape(n, -1)[:, 0].float().cpu()


class PairwiseRankerLabeller(Labeller):
    """A PairRM-style ranker comparing the two responses directly; it has no scores.

    Args:
        ranker: ``compare(prompts, responses_a, responses_b) -> P(a > b)`` per pair (floats in
            [0, 1], a tensor, or bools; no messages), or its import path ``"pkg.mod:fn"``.
        sample: False chooses ``a`` where ``p >= 0.5``; True draws ``Bernoulli(p)``.
        seed: Seed of the draws' generator, which advances across calls (a run's labels are
            reproducible); give each rank its own seed under DDP.
    """

    def __init__(self, ranker: str | Callable, *, sample: bool = False, seed: int = 0) -> None:
        self.compare, self.ranker_name = _as_callable(ranker, "ranker")
        self.sample = sample
        self.generator = torch.Generator().manual_seed(seed)

    def label(self, prompts: Sequence[str], responses_a: Sequence[str],
              responses_b: Sequence[str], *, messages: Messages | None = None) -> Labels:
        n = _check_lengths(prompts=prompts, responses_a=responses_a, responses_b=responses_b,
                           messages=messages)
        prob = _as_vector(self.compare(prompts, responses_a, responses_b), n,
                          f"ranker {self.ranker_name!r}")
        if ((prob < 0) | (prob > 1)).any():
            raise ValueError(f"ranker {self.ranker_name!r} returned values outside [0, 1]")
        if self.sample:
            return Labels(torch.rand(n, generator=self.generator) < prob)
        return Labels(prob >= 0.5)


class CallableLabeller(_ScoringLabeller):
    """A plain Python function scoring responses; the chosen one scores higher (ties: ``a``).

    Args:
        fn: ``fn(prompts, responses) -> floats`` (or a tensor; no messages), or its import
            path ``"package.module:function"``, as named in YAML.
    """

    def __init__(self, fn: str | Callable) -> None:
        self.fn, self.fn_name = _as_callable(fn, "fn")

    def score(self, prompts: Sequence[str], responses: Sequence[str], *,
              messages: Messages | None = None) -> torch.Tensor:
        n = _check_lengths(prompts=prompts, responses=responses, messages=messages)
        return _as_vector(self.fn(list(prompts), list(responses)), n, f"fn {self.fn_name!r}")


class OracleLabeller(_ScoringLabeller):
    """The synthetic task's ground truth: scores are ``r*``, labels its Bradley-Terry draws.

    Args:
        task: The synthetic task (default ``SyntheticTask()``).
        sample: True draws from the task's Bradley-Terry oracle (``SyntheticTask.prefer``),
            as a human would; False takes the higher ``r*`` (ties: ``a``).
        seed: Seed of the draws' generator, as in ``PairwiseRankerLabeller``.
    """

    def __init__(self, task: SyntheticTask | None = None, *, sample: bool = True,
                 seed: int = 0) -> None:
        self.task = task if task is not None else SyntheticTask()
        self.sample = sample
        self.generator = torch.Generator().manual_seed(seed)

    def score(self, prompts: Sequence[str], responses: Sequence[str], *,
              messages: Messages | None = None) -> torch.Tensor:
        _check_lengths(prompts=prompts, responses=responses, messages=messages)
        return self.task.score(prompts, responses)

    def label(self, prompts: Sequence[str], responses_a: Sequence[str],
              responses_b: Sequence[str], *, messages: Messages | None = None) -> Labels:
        labels = super().label(prompts, responses_a, responses_b, messages=messages)
        if self.sample:
            # The task's own oracle, so labels stay exactly its draws if it ever changes.
            g = self.generator
            labels.a_preferred = self.task.prefer(prompts, responses_a, responses_b, g)
        return labels


class PolicyLabeller(Labeller):
    """The policy's own implicit Bradley-Terry model (SAIL-PP): ``a`` is chosen with
    probability ``sigmoid(beta * h)``, ``h`` the log-ratio margin under the policy and
    reference of this moment, drawn from a seeded generator.

    Args:
        module: the ``SAILModule`` (its ``pair_logprobs`` and ``hparams.beta``).
        tokenizer: the policy's tokenizer, to label text; the online loop passes token ids
            to :meth:`label_ids` instead (exact, no re-tokenization).
        seed: seed of the draws (the online loop reseeds it per round and rank).
        batch_size: pairs per scoring forward.
    """

    def __init__(self, module: Any, tokenizer: Any = None, *, seed: int = 0,
                 batch_size: int = 32) -> None:
        self.module = module
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def probabilities(self, prompt_ids: Sequence[list[int]], ids_a: Sequence[list[int]],
                      ids_b: Sequence[list[int]]) -> torch.Tensor:
        """``sigmoid(beta * h)`` per pair, in float64 on the CPU."""
        from sail_lightning.data.tokenize import TokenizedPair

        n = _check_lengths(prompts=prompt_ids, responses_a=ids_a, responses_b=ids_b)
        pairs = [TokenizedPair(list(prompt_ids[k]), list(ids_a[k]), list(ids_b[k]))
                 for k in range(n)]
        pol, ref = self.module.pair_logprobs(pairs, policy=True, batch_size=self.batch_size)
        h = (pol[:, 0] - ref[:, 0]) - (pol[:, 1] - ref[:, 1])
        return torch.sigmoid(self.module.hparams.beta * h.double())

    def label_ids(self, prompt_ids: Sequence[list[int]], ids_a: Sequence[list[int]],
                  ids_b: Sequence[list[int]]) -> Labels:
        p = self.probabilities(prompt_ids, ids_a, ids_b)
        return Labels(a_preferred=torch.bernoulli(p, generator=self.generator).bool())

    def label(self, prompts: Sequence[str], responses_a: Sequence[str],
              responses_b: Sequence[str], *, messages: Messages | None = None) -> Labels:
        _check_lengths(prompts=prompts, responses_a=responses_a, responses_b=responses_b)
        if self.tokenizer is None:
            raise ValueError("PolicyLabeller.label needs the policy's tokenizer to label text")
        from sail_lightning.data.tokenize import encode_responses

        tok = self.tokenizer
        prompt_ids = tok(list(prompts))["input_ids"]
        # As the DataModule encodes responses, without a length limit.
        a = encode_responses(tok, responses_a, sys.maxsize)
        b = encode_responses(tok, responses_b, sys.maxsize)
        return self.label_ids(prompt_ids, a, b)
