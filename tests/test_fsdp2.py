"""FSDP2 (fully_shard under ModelParallelStrategy) on CPU with 2 processes over gloo."""

import pytest
import torch
import yaml

from sail_lightning.module import SAILModule
from tests.conftest import CONFIGS
from tests.test_distributed import run

FSDP2 = ["-c", str(CONFIGS / "strategy" / "fsdp2.yaml"), "--trainer.devices=2"]
NO_CHECKPOINTS = "--trainer.enable_checkpointing=false"
# A checkpoint at the end of every epoch, kept (by default a distributed one: a folder).
SAVE_EVERY_EPOCH = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"save_top_k": -1}}
LORA = "--model.lora={r: 2, alpha: 4, dropout: 0.0}"  # no dropout: resumed runs draw the same
ONE_FILE = "--trainer.strategy.init_args.save_distributed_checkpoint=false"


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """Sharded DPO, 2 epochs of 6 steps on 2 processes x 4 pairs, saving every epoch: the
    uninterrupted run of both the one-process comparison and the resume test."""
    tmp = tmp_path_factory.mktemp("fsdp2")
    return tmp, run(tmp, "two", "dpo", "--data.batch_size=4", *FSDP2,
                    callbacks=[SAVE_EVERY_EPOCH])


def test_fsdp2_shard_training_matches_one_process(tmp_path, sharded):
    one = run(tmp_path, "one", "dpo", "--data.batch_size=8", NO_CHECKPOINTS)[0]["losses"]
    two = sharded[1]
    assert two[0]["world_size"] == 2 and len(two[0]["losses"]) == len(one) == 12
    for step, (a, b0, b1) in enumerate(zip(one, two[0]["losses"], two[1]["losses"],
                                           strict=True)):
        assert (b0 + b1) / 2 == pytest.approx(a, rel=1e-4, abs=1e-5), step


def test_fsdp2_shard_online_generation_with_uneven_lengths_does_not_deadlock(tmp_path):
    # Ranks sample different responses for different prompts: lengths differ, and without
    # synced generation the rank that stops first would leave the other in a collective.
    ranks = run(tmp_path, "online", "sail_pr", *FSDP2, NO_CHECKPOINTS)
    assert ranks[0]["pool_sha1"] == ranks[1]["pool_sha1"]
    assert [r["round"] for r in ranks[0]["rounds"]] == [0, 1]


def saved_weights(path) -> set[str]:
    """Weight names in a checkpoint: a distributed one (folder) or one file."""
    if path.is_dir():
        from torch.distributed.checkpoint import FileSystemReader

        stored = FileSystemReader(path).read_metadata().state_dict_metadata
        return {k.removeprefix("state_dict.") for k in stored if k.startswith("state_dict.")}
    return set(torch.load(path, weights_only=True)["state_dict"])


def full_model(lora: bool) -> SAILModule:
    """The quickstart's model, unsharded: what a checkpoint without filtering would hold."""
    model = yaml.safe_load((CONFIGS / "quickstart.yaml").read_text())["model"]
    options = {"r": 2, "alpha": 4, "dropout": 0.0} if lora else None
    module = SAILModule(model_config=model["model_config"], tokenizer="synthetic", lora=options)
    module.configure_model()
    return module


def resume_matches(tmp, uninterrupted, *args) -> set[str]:
    """Resumes on 2 processes from the epoch-0 checkpoint; the second epoch's losses equal
    the uninterrupted run's on both ranks (weights and optimizer state restored). Returns
    the checkpoint's weight names."""
    [ckpt] = (tmp / "two").rglob("epoch=0-*.ckpt")
    resumed = run(tmp, "resumed", "dpo", "--data.batch_size=4", *FSDP2, *args, NO_CHECKPOINTS,
                  f"--ckpt_path={ckpt}")
    for rank in (0, 1):
        assert resumed[rank]["losses"] == pytest.approx(uninterrupted[rank]["losses"][6:],
                                                        rel=1e-4, abs=1e-5), rank
    return saved_weights(ckpt)


def test_fsdp2_shard_checkpoint_leaves_out_the_reference_and_resumes_exactly(sharded):
    tmp, uninterrupted = sharded
    kept = resume_matches(tmp, uninterrupted)
    full = set(full_model(lora=False).state_dict())
    reference = {k for k in full if k.startswith("reference.")}
    assert reference and kept == full - reference  # the reference is rebuilt from init_seed


@pytest.mark.slow
@pytest.mark.parametrize("one_file", [False, True], ids=["folder", "file"])
def test_fsdp2_shard_lora_checkpoint_holds_the_adapter_only_and_resumes_exactly(tmp_path,
                                                                               one_file):
    args = [LORA, *([ONE_FILE] if one_file else [])]
    uninterrupted = run(tmp_path, "two", "dpo", "--data.batch_size=4", *FSDP2, *args,
                        callbacks=[SAVE_EVERY_EPOCH])
    kept = resume_matches(tmp_path, uninterrupted, *args)
    module = full_model(lora=True)
    adapter = {f"policy.{n}" for n, p in module.policy.named_parameters() if p.requires_grad}
    assert adapter and kept == adapter  # the base weights are rebuilt from init_seed
    weights = module.state_dict()
    assert sum(weights[k].numel() for k in kept) < 0.1 * sum(w.numel() for w in weights.values())
