"""The paper's kinds of reward model: one whose folder ships its own modelling code
(``trust_remote_code``) and a score model of another class (``model_class``, ``output_field``),
both saved locally and loaded by path."""

import json
import shutil

import pytest
import torch

from sail_lightning.labellers import RewardModelLabeller

PROMPTS = ["d a c b =", "b a =", "e e f c a b d g ="]
RESPONSES = ["a b c d", "a", "g f e"]

CONFIGURATION = '''
from transformers import LlamaConfig


class TinyRemoteConfig(LlamaConfig):
    model_type = "tiny_remote_score"
'''

MODELING = '''
import torch
from torch import nn
from transformers import LlamaModel, LlamaPreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutputWithPast

from .configuration_tiny_remote import TinyRemoteConfig


class TinyRemoteScoreModel(LlamaPreTrainedModel):
    """LlamaForSequenceClassification's weights, read at the last attended token."""

    config_class = TinyRemoteConfig

    def __init__(self, config):
        super().__init__(config)
        self.model = LlamaModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()

    def forward(self, input_ids, attention_mask, **kwargs):
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        last = attention_mask.sum(-1) - 1
        logits = self.score(hidden)[torch.arange(len(last)), last]
        return SequenceClassifierOutputWithPast(logits=logits)
'''


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory, synthetic_tokenizer):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from sail_lightning.synthetic import tiny_llama_config

    path = tmp_path_factory.mktemp("plain_rm")
    torch.manual_seed(0)
    cfg = tiny_llama_config(synthetic_tokenizer, hidden_size=32, num_hidden_layers=2)
    AutoModelForSequenceClassification.from_config(
        AutoConfig.for_model(**cfg, num_labels=1)).save_pretrained(path)
    synthetic_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def remote_code_dir(tmp_path_factory, plain_dir):
    """The plain classifier's weights under a model type only the folder's own code knows."""
    path = tmp_path_factory.mktemp("remote_code_rm")
    for item in plain_dir.iterdir():
        shutil.copy(item, path)
    (path / "configuration_tiny_remote.py").write_text(CONFIGURATION)
    (path / "modeling_tiny_remote.py").write_text(MODELING)
    config = json.loads((path / "config.json").read_text())
    config.update(model_type="tiny_remote_score", architectures=["TinyRemoteScoreModel"],
                  auto_map={"AutoConfig": "configuration_tiny_remote.TinyRemoteConfig",
                            "AutoModelForSequenceClassification":
                                "modeling_tiny_remote.TinyRemoteScoreModel"})
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_remote_code_needs_the_option_and_then_scores_as_the_plain_model(remote_code_dir,
                                                                         plain_dir):
    refused = RewardModelLabeller(str(remote_code_dir), progress=False)
    with pytest.raises(OSError, match=r"option trust_remote_code: true") as error:
        refused.score(PROMPTS, RESPONSES)
    assert str(remote_code_dir) in str(error.value) and refused.model is None

    trusted = RewardModelLabeller(str(remote_code_dir), trust_remote_code=True, progress=False)
    scores = trusted.score(PROMPTS, RESPONSES)
    assert type(trusted.model).__name__ == "TinyRemoteScoreModel"  # the folder's own class
    plain = RewardModelLabeller(str(plain_dir), progress=False).score(PROMPTS, RESPONSES)
    torch.testing.assert_close(scores, plain)


@pytest.fixture(scope="module")
def score_model_dir(tmp_path_factory, synthetic_tokenizer):
    from transformers import LlamaConfig

    from sail_lightning.synthetic import tiny_llama_config
    from tests.score_models import TinyScoreModel

    path = tmp_path_factory.mktemp("score_model")
    torch.manual_seed(1)
    cfg = tiny_llama_config(synthetic_tokenizer, hidden_size=32, num_hidden_layers=2)
    cfg.pop("model_type")
    TinyScoreModel(LlamaConfig(**cfg)).save_pretrained(path)
    synthetic_tokenizer.save_pretrained(path)
    return path


def test_model_class_with_its_own_output_field(score_model_dir):
    labeller = RewardModelLabeller(str(score_model_dir), model_class="tests.score_models:"
                                   "TinyScoreModel", output_field="end_scores", batch_size=2,
                                   progress=False)
    scores = labeller.score(PROMPTS, RESPONSES)
    from tests.score_models import TinyScoreModel

    assert type(labeller.model) is TinyScoreModel
    assert labeller.model.config.num_labels != 1  # no one-label check for another class
    tok = labeller.tokenizer
    for i, (x, y) in enumerate(zip(PROMPTS, RESPONSES, strict=True)):
        ids = torch.tensor([tok(x)["input_ids"] + tok(y, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():  # one sequence alone: no padding
            alone = labeller.model(input_ids=ids, attention_mask=torch.ones_like(ids))
        assert scores[i].item() == pytest.approx(alone.end_scores[0, 0].item(), abs=1e-5)


def test_model_class_returning_a_bare_tensor(score_model_dir):
    by_field = RewardModelLabeller(str(score_model_dir), model_class="tests.score_models:"
                                   "TinyScoreModel", output_field="end_scores", progress=False)
    bare = RewardModelLabeller(str(score_model_dir), model_class="tests.score_models:"
                               "TinyTensorScoreModel", progress=False)
    assert torch.equal(bare.score(PROMPTS, RESPONSES), by_field.score(PROMPTS, RESPONSES))


def test_wrong_output_field_and_model_class_are_named(score_model_dir):
    labeller = RewardModelLabeller(str(score_model_dir), model_class="tests.score_models:"
                                   "TinyScoreModel", progress=False)  # output_field: logits
    with pytest.raises(ValueError, match=r"no tensor 'logits'.*option output_field"):
        labeller.score(PROMPTS, RESPONSES)
    with pytest.raises(AttributeError, match="NoSuchModel"):
        RewardModelLabeller("/never/read", model_class="tests.score_models:NoSuchModel")
