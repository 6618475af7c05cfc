"""RewardModelLabeller: a sequence-classifier reward model with its own tokenizer and template."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence
from tqdm.auto import tqdm
from transformers import AutoModelForSequenceClassification

from sail_lightning.common import DTYPES, PATH_STARTS
from sail_lightning.labellers.base import Messages, ScoringLabeller, check_lengths, resolve_callable
from sail_lightning.models import QuantizationOptions, load_pretrained, resolve_quantization
from sail_lightning.tokenizer import build_tokenizer

log = logging.getLogger("sail_lightning.labellers")



def prompt_response_ids(tokenizer: Any, prompt: str, response: str,
                        verbose: bool = True) -> list[int]:
    """A reward model's input without a chat template: the prompt's ids (with any bos), then
    the response's. Also how ``experiments`` trains its reward model, so training and
    scoring see the same input. ``verbose=False``: no warning about ids longer than the
    tokenizer's ``model_max_length`` (for a caller that cuts them)."""
    return (tokenizer(prompt, verbose=verbose)["input_ids"]
            + tokenizer(response, add_special_tokens=False, verbose=verbose)["input_ids"])


class RewardModelLabeller(ScoringLabeller):
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
        lower_is_better: The model scores a cost (lower is better): ``score`` returns the
            negated costs, and the lower cost is chosen.
    """

    def __init__(self, name_or_path: str, *, device: str | None = None,
                 torch_dtype: str | None = None, quantization: QuantizationOptions | None = None,
                 batch_size: int = 16, max_length: int = 1024, progress: bool = True,
                 trust_remote_code: bool = False, model_class: str | None = None,
                 output_field: str = "logits", lower_is_better: bool = False) -> None:
        if torch_dtype is not None and torch_dtype not in DTYPES:
            raise ValueError(f"torch_dtype must be one of {sorted(DTYPES)}, got {torch_dtype!r}")
        self.trust_remote_code, self.output_field = trust_remote_code, output_field
        self.lower_is_better = bool(lower_is_better)
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
        path = self.name_or_path
        if path.startswith(PATH_STARTS) and not os.path.exists(os.path.expanduser(path)):
            raise FileNotFoundError(f"reward model: no such folder: {path}")
        remote = self.trust_remote_code
        try:
            tokenizer = build_tokenizer(path, trust_remote_code=remote)
            dtype = DTYPES.get(self.torch_dtype)
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
        # The ids are cut to max_length below: transformers' warning that they exceed the
        # model's length is then only noise, unless max_length itself exceeds it.
        verbose = self.max_length > (getattr(tok, "model_max_length", None) or float("inf"))
        if turns is not None and getattr(tok, "chat_template", None):
            chat = [*({"role": r, "content": c} for r, c in turns),
                    {"role": "assistant", "content": response}]
            text = tok.apply_chat_template(chat, tokenize=False)
            # The rendered text already holds any bos token: do not add it twice.
            ids = tok(text, add_special_tokens=False, verbose=verbose)["input_ids"]
        else:
            ids = prompt_response_ids(tok, prompt, response, verbose=verbose)
        return ids[-self.max_length :]

    @torch.no_grad()
    def score(self, prompts: Sequence[str], responses: Sequence[str], *,
              messages: Messages | None = None) -> torch.Tensor:
        n = check_lengths(prompts=prompts, responses=responses, messages=messages)
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
        return self.oriented(scores)


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
