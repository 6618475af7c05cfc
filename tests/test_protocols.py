"""The protocols between the pieces are explicit: labellers and judges are moved to the
policy's device by the callbacks (``Labeller.to``), the evaluation asks a judge without
scores for the ``PairwiseJudge`` interface, and the CLI finds the generation callback by
type."""

import lightning as L
import torch

from sail_lightning.callbacks import PairGenerationCallback, is_pair_generation
from sail_lightning.evaluation import EvaluationCallback
from sail_lightning.generation import SamplingOptions
from sail_lightning.interfaces import Labeller, Labels, PairwiseJudge
from sail_lightning.synthetic import OracleLabeller
from tests.helpers import datamodule, module


class Moved(OracleLabeller):
    """The task's oracle, recording where it is moved."""

    def __init__(self) -> None:
        super().__init__()
        self.devices = []

    def to(self, device):
        self.devices.append(torch.device(device))
        return self


def test_the_callbacks_move_their_labellers_and_judge_to_the_policys_device(tmp_path):
    labeller, oracle, judge = Moved(), Moved(), Moved()
    gen = PairGenerationCallback(labeller=labeller, progress=False, prompts_per_round=4,
                                 sampling=SamplingOptions(max_new_tokens=4, batch_size=8))
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=1,
                        limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        reload_dataloaders_every_n_epochs=1, default_root_dir=tmp_path,
                        callbacks=[gen, EvaluationCallback(judge=judge, num_prompts=2)])
    trainer.fit(module(configure=False, coef_pr=0.3),
                datamodule=datamodule(setup=False, mix_pr=0.3, oracle=oracle,
                                      pool_dir=str(tmp_path / "rounds")))
    cpu = trainer.strategy.root_device
    assert labeller.devices == oracle.devices == judge.devices == [cpu]


class Counting(Labeller, PairwiseJudge):
    """A pairwise judge of its own (not ``JudgeLabeller``): ``a`` always wins."""

    def __init__(self) -> None:
        self.requests = 0

    def label(self, prompts, responses_a, responses_b, *, messages=None):
        return Labels(torch.ones(len(prompts), dtype=torch.bool))

    def compare(self, prompts, responses_a, responses_b, *, messages=None):
        self.requests += len(prompts)
        return torch.ones(len(prompts), dtype=torch.float64)

    def stats(self):
        return {"judge_requests": self.requests, "judge_prompt_tokens": 0,
                "judge_completion_tokens": 0, "judge_unparsed": 0}


def test_the_evaluation_asks_any_pairwise_judge_by_its_interface():
    judge = Counting()
    metrics = EvaluationCallback(judge=judge, num_prompts=3, max_new_tokens=4).evaluate(
        datamodule(), module().pair)
    assert metrics["val/judge_win_rate"] == 1.0 and metrics["gen/judge_requests"] == 3.0
    assert "val/eval_reward" not in metrics  # no scores


class MyGeneration(PairGenerationCallback):
    pass


class NotAPairGenerationCallback(L.Callback):
    pass


def test_the_generation_callback_is_found_by_type_not_by_name():
    assert is_pair_generation("sail_lightning.callbacks.PairGenerationCallback")
    assert is_pair_generation("tests.test_protocols.MyGeneration")
    assert not is_pair_generation("tests.test_protocols.NotAPairGenerationCallback")
    assert not is_pair_generation("no_such_package.PairGenerationCallback")
    assert not is_pair_generation("PairGenerationCallback")
