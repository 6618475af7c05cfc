"""The online pool: generated, labelled pairs, persisted so that a resume loses none."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field

import torch

from sail_lightning.common import PAIR_FIELDS, Route
from sail_lightning.data.mixture import OFFLINE
from sail_lightning.data.tokenize import TokenizedPair


@dataclass
class OnlinePair:
    """One generated pair with its provenance, as written to the round's jsonl file.

    Attributes:
        prompt: prompt text (as the labeller saw it).
        chosen, rejected: response texts.
        pair: the token ids (and cached reference log-probs) used for training.
        route: ``Route.PP`` or ``Route.PR``.
        round: generation round.
        prompt_index: position of the prompt in the round (stable order across ranks).
        seed: sampling seed of the shard that generated it.
        label: ``"a"`` if the first sample was chosen, else ``"b"``; ``"best_worst"`` etc.
            for pairs selected from several candidates.
        scores: labeller scores of chosen and rejected, when it has scores.
    """

    prompt: str
    chosen: str
    rejected: str
    pair: TokenizedPair
    route: int
    round: int
    prompt_index: int
    seed: int
    label: str
    scores: dict[str, float] | None = None
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        p = self.pair
        return {
            "round": self.round, "prompt_index": self.prompt_index,
            "route": Route(self.route).name.lower(), "seed": self.seed, "label": self.label,
            "prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected,
            "scores": self.scores, "prompt_ids": p.prompt_ids, "chosen_ids": p.chosen_ids,
            "rejected_ids": p.rejected_ids, "ref_chosen": p.ref_chosen,
            "ref_rejected": p.ref_rejected, "bonus_ids": p.bonus_ids, "ref_bonus": p.ref_bonus,
            **{k: getattr(p, k) for k in PAIR_FIELDS if getattr(p, k) is not None},
            **self.extra,
        }

    @classmethod
    def from_json(cls, d: dict) -> OnlinePair:
        pair = TokenizedPair(d["prompt_ids"], d["chosen_ids"], d["rejected_ids"],
                             d.get("ref_chosen"), d.get("ref_rejected"), d.get("bonus_ids"),
                             d.get("ref_bonus"), **{k: d.get(k) for k in PAIR_FIELDS})
        known = {"round", "prompt_index", "route", "seed", "label", "prompt", "chosen",
                 "rejected", "scores", "prompt_ids", "chosen_ids", "rejected_ids", "ref_chosen",
                 "ref_rejected", "bonus_ids", "ref_bonus", *PAIR_FIELDS}
        return cls(prompt=d["prompt"], chosen=d["chosen"], rejected=d["rejected"], pair=pair,
                   route=int(Route[d["route"].upper()]), round=d["round"],
                   prompt_index=d["prompt_index"], seed=d["seed"], label=d["label"],
                   scores=d.get("scores"), extra={k: v for k, v in d.items() if k not in known})


def round_path(pool_dir: str, round_index: int) -> str:
    return os.path.join(pool_dir, f"round_{round_index:04d}.jsonl")


def write_round(path: str, pairs: list[OnlinePair]) -> None:
    """Write atomically: a crash mid-write leaves the previous file, never half of one."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for p in pairs:
            f.write(json.dumps(p.to_json()) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_round(path: str) -> list[OnlinePair]:
    """The pairs of a round file written by :func:`write_round`.

    Raises:
        FileNotFoundError: The file is missing.
        ValueError: A line is not a pair (a file cut off by a full disk or an interrupted
            copy, or edited by hand); the message names the file and the line.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"online round file {path} (named in the checkpoint's data "
                                "state) is missing: the generated pairs cannot be restored")
    pairs = []
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                pairs.append(OnlinePair.from_json(json.loads(line.decode("utf-8"))))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ValueError(f"{path}:{number}: malformed JSON in an online round file "
                                 f"(cut off or corrupt?): {exc}") from exc
            except (KeyError, TypeError, AttributeError, ValueError) as exc:
                raise ValueError(f"{path}:{number}: not an online pair "
                                 f"({type(exc).__name__}: {exc})") from exc
    return pairs


class OnlinePool:
    """The online pairs of a run, owned by the DataModule.

    Every round is written to ``<directory>/round_NNNN.jsonl`` before it is trained on, the
    latest round is held in memory (an epoch trains on it), and the offline pairs' reference
    log-probs are kept beside it. Its state, saved in checkpoints, holds paths, not pairs:
    the pairs are on disk, written before the state was saved.

    Args:
        directory: where round files go (the DataModule sets the run's default).
    """

    def __init__(self, directory: str = "rounds") -> None:
        self.directory = directory
        self.rounds: list[dict] = []  # {"round", "path", "pairs"} of every persisted round
        self.pairs: list[OnlinePair] = []  # the latest round, trained on this epoch
        self.offline_ref: torch.Tensor | None = None  # (n_offline, 2) reference log-probs

    @property
    def current_round(self) -> int:
        return self.rounds[-1]["round"] if self.rounds else -1

    def add_round(self, round_index: int, pairs: list[OnlinePair], *, write: bool = True) -> str:
        """Stores a round's pairs (identical on every rank); ``write`` on one rank only."""
        path = os.path.abspath(round_path(self.directory, round_index))
        if write:
            write_round(path, pairs)
        self.rounds.append({"round": round_index, "path": path, "pairs": len(pairs)})
        self.pairs = pairs
        return path

    def check_writable(self) -> None:
        """Creates the rounds folder and a file in it, or raises naming ``data.pool_dir`` and
        the folder: checked at setup, before training, not after an epoch that a failed
        write of its round would lose (the epoch's checkpoint comes after the round)."""
        try:
            os.makedirs(self.directory, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.directory, prefix=".write-check-"):
                pass
        except OSError as exc:
            raise PermissionError(
                f"data.pool_dir: cannot write round files to {os.path.abspath(self.directory)} "
                f"({exc.strerror or exc}); set data.pool_dir or trainer.default_root_dir to a "
                "writable folder") from exc

    def set_offline_reference(self, logprobs: torch.Tensor | None) -> None:
        """Reference log-probs ``(n_offline, 2)`` of the offline pairs (chosen, rejected), or
        None when they must be computed again (after a reference update or a restore)."""
        self.offline_ref = logprobs

    def examples(self, plan: list[tuple[str, int, int]], offline: list[TokenizedPair]
                 ) -> list[dict]:
        """The examples of an epoch plan (``data.mixture.plan_epoch``): ``(kind, i, route)``
        names offline pair ``i`` of ``offline`` (with its cached reference log-probs when the
        pool holds them) or pair ``i`` of the latest round."""
        items = []
        for kind, i, route in plan:
            if kind != OFFLINE:
                items.append(self.pairs[i].pair.example(route))
                continue
            pair = offline[i]
            if self.offline_ref is not None:
                ref = self.offline_ref[i].tolist()
                pair = TokenizedPair(pair.prompt_ids, pair.chosen_ids, pair.rejected_ids,
                                     ref[0], ref[1])
            items.append(pair.example(route))
        return items

    def state_dict(self) -> dict:
        return {"rounds": list(self.rounds)}

    def load_state_dict(self, state: dict) -> None:
        """Restores the rounds and reads the latest one back from its file."""
        self.rounds = list(state.get("rounds", []))
        self.pairs = read_round(self.rounds[-1]["path"]) if self.rounds else []
        if self.rounds and len(self.pairs) != self.rounds[-1]["pairs"]:
            raise ValueError(f"{self.rounds[-1]['path']}: {len(self.pairs)} pairs, the "
                             f"checkpoint recorded {self.rounds[-1]['pairs']}")
