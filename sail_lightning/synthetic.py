"""An embedded synthetic preference task with an exact ground-truth reward.

The quickstart and the tests must run on CPU with nothing downloaded, and methods should be
comparable against an exact reward instead of a learned judge. This module provides both: a
tiny "sort the symbols" task, its tokenizer, a tiny Llama config sized to it, a Bradley-Terry
(BT) preference oracle, and an offline preference data set labelled by that oracle.

Task:
    The alphabet is the first ``num_symbols`` lowercase letters (``"a"``, ``"b"``, ...). A
    prompt ``x`` is ``L`` symbols (``min_prompt_len <= L <= max_prompt_len``, drawn uniformly
    with replacement, so repeats occur) separated by single spaces and followed by the separator
    token ``"="``, e.g. ``"d a c b ="``. The ideal response is the prompt's symbols sorted
    alphabetically (repeats kept), e.g. ``"a b c d"``. A response is a plain string of symbols
    separated by single spaces: no ``"="`` and no special tokens.

Reward:
    With ``y = response.split()`` and ``s = ideal_response(x).split()`` (``len(s) >= 1``)::

        r*(x, y) = #{i < min(|y|, |s|) : y_i == s_i} / |s|
                   - length_penalty * | |y| - |s| | / |s|

    so the ideal scores exactly 1.0, every wrong position costs ``1/|s|`` and every missing or
    extra token costs another ``length_penalty/|s|``. Tokens outside the alphabet (``"="``,
    ``"<unk>"``, anything else) never match but still count toward the length. The reward
    depends on the prompt only through its ideal response.

Preference oracle:
    ``P(a > b | x) = sigmoid((r*(x, a) - r*(x, b)) / temperature)``; ``prefer`` draws one
    Bernoulli sample from it per pair.

Example:
    >>> task = SyntheticTask()
    >>> task.ideal_response("d a c b =")
    'a b c d'
    >>> task.score(["d a c b ="], ["a b x d"]).tolist()
    [0.75]
"""

from __future__ import annotations

import random
import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from sail_lightning.interfaces import TaskOracle

SEPARATOR = "="
PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
# Fixed order, so the ids are stable across processes: pad=0, bos=1, eos=2, unk=3, "="=4,
# then the symbols from 5 on. Pad at 0 makes an all-zeros padded batch read as padding.
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)


@dataclass(frozen=True)
class SyntheticTask:
    """The sorting task, its ground-truth reward and its Bradley-Terry oracle.

    Attributes:
        num_symbols: Alphabet size; the symbols are ``"a"``, ``"b"``, ... (at most 26).
        min_prompt_len: Fewest symbols in a prompt (at least 1).
        max_prompt_len: Most symbols in a prompt.
        length_penalty: Reward lost per token of length mismatch, relative to the ideal length.
        temperature: Bradley-Terry temperature of the oracle; lower is closer to argmax.
    """

    num_symbols: int = 12
    min_prompt_len: int = 4
    max_prompt_len: int = 8
    length_penalty: float = 0.5
    temperature: float = 0.1

    def __post_init__(self) -> None:
        if not 1 <= self.num_symbols <= 26:
            raise ValueError(f"num_symbols must be in [1, 26], got {self.num_symbols}")
        if not 1 <= self.min_prompt_len <= self.max_prompt_len:
            raise ValueError(
                "need 1 <= min_prompt_len <= max_prompt_len, got "
                f"{self.min_prompt_len}, {self.max_prompt_len}"
            )
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")

    def symbols(self) -> list[str]:
        """Returns the alphabet, ``["a", "b", ...]`` of length ``num_symbols``."""
        return list(string.ascii_lowercase[: self.num_symbols])

    def build_tokenizer(self) -> PreTrainedTokenizerFast:
        """Builds the word-level tokenizer of the task.

        Vocabulary (ids in order): ``<pad>``=0, ``<bos>``=1, ``<eos>``=2, ``<unk>``=3, ``"="``=4,
        then the symbols from 5. Text is split on whitespace; single sequences get ``<bos>``
        prepended (no ``<eos>`` appended, so a prompt ends at ``"="`` ready for generation).
        Padding is on the right and there is no chat template. Decoding with
        ``skip_special_tokens=True`` joins the remaining tokens with single spaces, so a
        generated response decodes to a string that ``score`` understands (note that ``<unk>``
        is special and therefore dropped by that decode).

        Returns:
            A fast tokenizer that round-trips through ``save_pretrained`` /
            ``AutoTokenizer.from_pretrained``.
        """
        vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, SEPARATOR, *self.symbols()])}
        backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
        backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        backend.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
        )
        # No decoder is set: the tokenizers default joins tokens with single spaces, which is
        # exactly the response format; clean-up would only risk altering it.
        return PreTrainedTokenizerFast(
            tokenizer_object=backend,
            pad_token=PAD,
            bos_token=BOS,
            eos_token=EOS,
            unk_token=UNK,
            padding_side="right",
            clean_up_tokenization_spaces=False,
        )

    def sample_prompts(self, n: int, seed: int) -> list[str]:
        """Samples ``n`` prompts, deterministically for a given ``seed``.

        Args:
            n: Number of prompts.
            seed: Seed of a private ``random.Random`` (the global RNG is never touched).

        Returns:
            Strings like ``"d a c b ="``: a uniform length in ``[min_prompt_len,
            max_prompt_len]``, symbols uniform with replacement, then ``"="``.
        """
        rng = random.Random(seed)
        alphabet = self.symbols()
        prompts = []
        for _ in range(n):
            length = rng.randint(self.min_prompt_len, self.max_prompt_len)
            prompts.append(" ".join([*rng.choices(alphabet, k=length), SEPARATOR]))
        return prompts

    def ideal_response(self, prompt: str) -> str:
        """Returns the prompt's symbols sorted alphabetically, joined by single spaces.

        Raises:
            ValueError: If the prompt does not end with the ``"="`` separator or has no symbol.
        """
        tokens = prompt.split()
        if len(tokens) < 2 or tokens[-1] != SEPARATOR or SEPARATOR in tokens[:-1]:
            raise ValueError(f"not a synthetic prompt (expected 'x y ... ='): {prompt!r}")
        return " ".join(sorted(tokens[:-1]))

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        """Computes the ground-truth reward ``r*(x, y)`` (see the module docstring).

        Args:
            prompts: Prompts, as produced by ``sample_prompts``.
            responses: One response per prompt; tokens are ``response.split()``.

        Returns:
            A float32 tensor of shape ``(n,)``; 1.0 is the maximum (the ideal response).
        """
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        rewards = []
        for prompt, response in zip(prompts, responses, strict=True):
            ideal = self.ideal_response(prompt).split()
            tokens = response.split()
            matches = sum(a == b for a, b in zip(tokens, ideal, strict=False))
            mismatch = abs(len(tokens) - len(ideal))
            rewards.append((matches - self.length_penalty * mismatch) / len(ideal))
        return torch.tensor(rewards, dtype=torch.float32)

    def preference_prob(
        self, prompts: Sequence[str], responses_a: Sequence[str], responses_b: Sequence[str]
    ) -> torch.Tensor:
        """Returns ``P(a preferred over b) = sigmoid((r*(x, a) - r*(x, b)) / temperature)``.

        Returns:
            A float32 tensor of shape ``(n,)``; exactly 0.5 where the rewards are equal.
        """
        margin = self.score(prompts, responses_a) - self.score(prompts, responses_b)
        return torch.sigmoid(margin / self.temperature)

    def prefer(
        self,
        prompts: Sequence[str],
        responses_a: Sequence[str],
        responses_b: Sequence[str],
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Draws one Bradley-Terry preference per pair.

        Args:
            prompts: Prompts.
            responses_a: First response of each pair.
            responses_b: Second response of each pair.
            generator: Source of randomness; ``None`` uses torch's global generator. Pass a
                seeded (CPU) generator for reproducible labels.

        Returns:
            A bool tensor of shape ``(n,)``, True where ``a`` is preferred, i.e. where
            ``u < preference_prob`` for ``u ~ Uniform(0, 1)``.
        """
        prob = self.preference_prob(prompts, responses_a, responses_b)
        return torch.rand(prob.shape, generator=generator) < prob

    def corrupt(self, response: str, level: float, rng: random.Random) -> str:
        """Returns a noisy copy of ``response`` (used to build offline pairs).

        Each position is replaced by a uniformly random symbol (possibly the same one) with
        probability ``level``; then, with probability ``level / 2``, the length changes by one:
        the last symbol is dropped or a random symbol is appended (even odds, but never
        dropping the only symbol, so the result is never empty).

        Args:
            response: A response (symbols separated by whitespace).
            level: Corruption level in ``[0, 1]``; 0 returns the response unchanged.
            rng: Random source, so that callers control determinism.
        """
        alphabet = self.symbols()
        tokens = [rng.choice(alphabet) if rng.random() < level else t for t in response.split()]
        if rng.random() < level / 2:
            if len(tokens) > 1 and rng.random() < 0.5:
                tokens.pop()
            else:
                tokens.append(rng.choice(alphabet))
        return " ".join(tokens)

    def make_pairs(self, n: int, seed: int) -> list[dict[str, str]]:
        """Builds ``n`` offline preference pairs labelled by the Bradley-Terry oracle.

        Prompts come from ``sample_prompts(n, seed)``. For each, two levels ``q ~ U(0, 1)`` are
        drawn and the ideal response is corrupted once with each; while the second equals the
        first, both its level and its corruption are redrawn (redrawing only the corruption
        could loop for a long time when both levels are near 0). The pair is then labelled by
        ``prefer`` with a ``torch.Generator`` seeded with ``seed``. Deterministic per seed.

        Returns:
            ``[{"prompt", "chosen", "rejected"}]``, chosen being the oracle's draw (so, like a
            human label, it is occasionally the lower-reward response); never identical.
        """
        prompts = self.sample_prompts(n, seed)
        # A separate, string-seeded stream (str seeds are hashed with SHA-512, so this is
        # stable across processes) so the corruptions are not correlated with prompt sampling.
        rng = random.Random(f"sail_lightning.synthetic.make_pairs:{seed}")
        first, second = [], []
        for prompt in prompts:
            ideal = self.ideal_response(prompt)
            a = self.corrupt(ideal, rng.random(), rng)
            b = self.corrupt(ideal, rng.random(), rng)
            while b == a:
                b = self.corrupt(ideal, rng.random(), rng)
            first.append(a)
            second.append(b)
        generator = torch.Generator().manual_seed(seed)
        a_wins = self.prefer(prompts, first, second, generator=generator).tolist()
        return [
            {"prompt": x, "chosen": a if win else b, "rejected": b if win else a}
            for x, a, b, win in zip(prompts, first, second, a_wins, strict=True)
        ]



def tiny_llama_config(
    tokenizer: PreTrainedTokenizerBase,
    *,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 64,
) -> dict[str, Any]:
    """Returns a config dict for a tiny Llama sized to ``tokenizer``.

    Build the model with
    ``AutoModelForCausalLM.from_config(AutoConfig.for_model(**tiny_llama_config(tok)))``.

    Args:
        tokenizer: Sets ``vocab_size`` (``len(tokenizer)``, added tokens included) and the
            pad/bos/eos token ids.
        hidden_size: Model width; must be divisible by ``num_attention_heads``.
        num_hidden_layers: Number of decoder layers.
        num_attention_heads: Attention heads (also the key/value heads: no GQA).
        intermediate_size: MLP width; defaults to ``4 * hidden_size``.
        max_position_embeddings: Longest sequence (prompt + response) the model handles.

    Returns:
        A plain dict with ``model_type="llama"``, serialisable to YAML/JSON.
    """
    if hidden_size % num_attention_heads:
        raise ValueError(
            f"hidden_size {hidden_size} not divisible by num_attention_heads {num_attention_heads}"
        )
    return {
        "model_type": "llama",
        "vocab_size": len(tokenizer),
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size or 4 * hidden_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_attention_heads,
        "max_position_embeddings": max_position_embeddings,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "tie_word_embeddings": False,
    }


class OracleLabeller(TaskOracle):
    """The synthetic task's ground truth: scores are ``r*``, labels its Bradley-Terry draws.

    The task's configs name it as ``data.oracle`` (``configs/data/synthetic.yaml``): it then
    labels online pairs, judges the evaluation and scores each round's true reward.

    Args:
        task: The synthetic task (default ``SyntheticTask()``).
        sample: True draws from the task's Bradley-Terry oracle (``SyntheticTask.prefer``),
            as a human would; False takes the higher ``r*`` (ties: ``a``).
        seed: Seed of the draws' generator, as in ``PairwiseRankerLabeller``.
    """

    def __init__(self, task: SyntheticTask | None = None, *, sample: bool = True,
                 seed: int = 0) -> None:
        super().__init__(task if task is not None else SyntheticTask(), sample=sample,
                         seed=seed)
