"""A reward model of another class than transformers' classifiers, as beaver's
(safe-rlhf ``LlamaForScore``): its output holds ``end_scores``, not ``logits``. Tests load it
through ``RewardModelLabeller(model_class="tests.score_models:TinyScoreModel")``."""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import LlamaConfig, LlamaModel, LlamaPreTrainedModel
from transformers.utils import ModelOutput


@dataclass
class ScoreOutput(ModelOutput):
    """Per-token scores ``(batch, length, 1)`` and the score at each last token ``(batch, 1)``."""

    scores: torch.Tensor | None = None
    end_scores: torch.Tensor | None = None


class TinyScoreModel(LlamaPreTrainedModel):
    """A Llama body and a linear score head read at the last attended token."""

    config_class = LlamaConfig

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__(config)
        self.model = LlamaModel(config)
        self.score_head = nn.Linear(config.hidden_size, 1)
        self.post_init()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> ScoreOutput:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        scores = self.score_head(hidden)
        last = attention_mask.sum(-1) - 1  # right padding: the last attended position
        return ScoreOutput(scores=scores, end_scores=scores[torch.arange(len(last)), last])


class TinyTensorScoreModel(TinyScoreModel):
    """The same, returning the end scores as a bare tensor."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return super().forward(input_ids, attention_mask).end_scores
