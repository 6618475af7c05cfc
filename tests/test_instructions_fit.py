"""The instructions task in the DataModule and in a CLI fit: its training prompts feed the
online rounds, its held-out prompts are the validation set, its oracle labels and judges
(on a tiny real-text policy that ``build-models`` makes in seconds)."""

import csv
import json

import pytest
import yaml

from sail_lightning.instructions import InstructionsOracle, InstructionsTask
from tests.conftest import CONFIGS

TASK = InstructionsTask(seed=0)


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    from sail_lightning.build_models import main

    out = tmp_path_factory.mktemp("instructions_models")
    main(["--output", str(out), "--limit", "40", "--vocab-size", "512", "--no-reward"])
    return out / "policy"


def test_the_datamodule_reads_the_tasks_prompts_and_holds_out_its_heldout_set(policy_dir):
    from sail_lightning.data.datamodule import PreferenceDataModule

    dm = PreferenceDataModule(source="instructions", tokenizer=str(policy_dir), limit=32,
                              max_prompt_length=64, max_response_length=32,
                              oracle=InstructionsOracle())
    dm.setup("fit")
    train = [r.prompt for r in dm.train_records]
    assert train == TASK.train_prompts[:32]
    assert [r.prompt for r in dm.val_records] == TASK.heldout_prompts  # all 256, none dropped
    assert not set(train) & {r.prompt for r in dm.val_records}
    assert dm.val_records[0].messages == (("user", TASK.heldout_prompts[0]),)
    with pytest.raises(ValueError, match="split must be 'train' or one of"):
        TASK.prompts("dev")


def test_the_task_seed_is_the_sources_not_the_data_seed(policy_dir):
    from sail_lightning.data.datamodule import PreferenceDataModule

    def prompts(source, seed):
        dm = PreferenceDataModule(source=source, tokenizer=str(policy_dir), limit=8, seed=seed,
                                  max_prompt_length=64, max_response_length=32)
        dm.setup("fit")
        return [r.prompt for r in dm.train_records], [r.prompt for r in dm.val_records]

    assert prompts("instructions", 5) == (TASK.train_prompts[:8], TASK.heldout_prompts)
    seed_1 = InstructionsTask(seed=1)
    assert prompts("instructions:1", 0) == (seed_1.train_prompts[:8], seed_1.heldout_prompts)
    with pytest.raises(ValueError, match="'instructions:<seed>'"):
        prompts("instructions:x", 0)


def test_a_sail_pr_fit_on_the_instructions_prompts_labelled_by_the_oracle(policy_dir, tmp_path):
    from sail_lightning.cli import main

    root = tmp_path / "run"
    overlay = {
        "trainer": {"default_root_dir": str(root), "max_epochs": 2, "limit_train_batches": 3,
                    "limit_val_batches": 1, "enable_progress_bar": False,
                    "log_every_n_steps": 1, "callbacks": [
                        {"class_path": "sail_lightning.callbacks.PairGenerationCallback",
                         "init_args": {"progress": False, "sampling": {
                             "num_samples": 2, "max_new_tokens": 16, "batch_size": 32}}},
                        {"class_path": "sail_lightning.evaluation.EvaluationCallback",
                         "init_args": {"num_prompts": 8, "max_new_tokens": 16}}]},
        "model": {"model_name_or_path": str(policy_dir), "model_config": None,
                  "tokenizer": None},
        "data": {"limit": 48, "max_prompt_length": 64, "max_response_length": 32,
                 "oracle": {"class_path": "sail_lightning.instructions.InstructionsOracle",
                            "init_args": {"sample": False}}},
    }
    path = tmp_path / "overlay.yaml"
    path.write_text(yaml.safe_dump(overlay))
    main(["fit", "-c", str(CONFIGS / "trainer" / "cpu.yaml"),
          "-c", str(CONFIGS / "data" / "instructions.yaml"),
          "-c", str(CONFIGS / "method" / "sail_pr.yaml"), "-c", str(path)])
    (run,) = root.glob("sail_pr/version_0")
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    logged = {k for r in rows for k, v in r.items() if v}
    assert {"val/eval_reward", "val/win_rate_vs_ref", "gen/true_reward_mean"} <= logged
    pairs = [json.loads(line) for f in sorted((run / "rounds").glob("round_*.jsonl"))
             for line in f.read_text().splitlines()]
    assert len({p["round"] for p in pairs}) == 2 and pairs
    train = set(TASK.train_prompts)
    for p in pairs:  # the oracle (argmax) labelled each pair by the task's true score
        assert p["prompt"] in train
        truth = TASK.score([p["prompt"]] * 2, [p["chosen"], p["rejected"]]).tolist()
        assert [p["scores"]["chosen"], p["scores"]["rejected"]] == pytest.approx(truth)
        assert truth[0] >= truth[1]
