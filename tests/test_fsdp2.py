"""FSDP2 (fully_shard under ModelParallelStrategy) on CPU with 2 processes over gloo."""

import json
import os

import lightning as L
import pytest
import torch
import yaml

from sail_lightning.module import SAILModule
from tests.conftest import CONFIGS
from tests.helpers import assert_ranks_average_to
from tests.helpers import run_cli as run

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


def test_fsdp2_shard_training_matches_one_process(sharded, one_process_dpo):
    one = one_process_dpo[0]["losses"]
    two = sharded[1]
    assert two[0]["world_size"] == 2 and len(two[0]["losses"]) == len(one) == 12
    assert_ranks_average_to(one, two)


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
    reference = {k for k in full if k.startswith("pair.reference.")}
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
    adapter = {f"pair.policy.{n}" for n, p in module.pair.policy.named_parameters()
               if p.requires_grad}
    assert adapter and kept == adapter  # the base weights are rebuilt from init_seed
    weights = module.state_dict()
    assert sum(weights[k].numel() for k in kept) < 0.1 * sum(w.numel() for w in weights.values())


class ReferenceAtUpdate(L.Callback):
    """Listed after a PairGenerationCallback that updates the reference: at each update,
    the policy's and the reference's log-probs of the first offline pairs, and the
    reference log-probs that the pool cached for them; written to `path`/rank<r>.json."""

    def __init__(self, path: str, pairs: int = 8) -> None:
        self.path, self.pairs, self.updates = path, pairs, []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch + 1 >= trainer.max_epochs:
            return  # no update after the last epoch
        dm = trainer.datamodule
        policy, reference = pl_module.pair.pair_logprobs(dm.train_pairs[: self.pairs])
        self.updates.append({"policy": policy.tolist(), "reference": reference.tolist(),
                             "cached": dm.pool.offline_ref[: self.pairs].tolist()})

    def on_train_end(self, trainer, pl_module) -> None:
        os.makedirs(self.path, exist_ok=True)
        with open(os.path.join(self.path, f"rank{trainer.global_rank}.json"), "w") as f:
            json.dump(self.updates, f)


def reference_updates(tmp, name: str, *args: str, callbacks: tuple = ()) -> tuple[dict, dict]:
    """Offline DPO under LoRA for 3 epochs, the reference set to the policy after epochs 0
    and 1 (iterative DPO's update, without the sampling): each rank's losses (`run`), and
    each rank's log-probs at the updates (ReferenceAtUpdate)."""
    updates = tmp / name / "updates"
    callbacks = [{"class_path": "sail_lightning.callbacks.PairGenerationCallback",
                  "init_args": {"update_reference": True, "progress": False}},
                 {"class_path": f"{__name__}.ReferenceAtUpdate",
                  "init_args": {"path": str(updates)}}, *callbacks]
    ranks = run(tmp, name, "dpo", LORA, "--trainer.max_epochs=3", *args, callbacks=callbacks)
    return ranks, {int(p.stem[4:]): json.loads(p.read_text()) for p in updates.glob("*.json")}


def assert_reference_is_the_policy(updates: list[dict], count: int) -> None:
    """At each update the reference's log-probs, and those the pool cached, are the
    policy's: the second adapter holds the whole policy adapter, not this rank's shard."""
    assert len(updates) == count
    for update in updates:
        policy = torch.tensor(update["policy"])
        for key in ("reference", "cached"):
            torch.testing.assert_close(torch.tensor(update[key]), policy, atol=1e-5, rtol=1e-5)


def test_fsdp2_shard_lora_reference_update_copies_the_whole_adapter(tmp_path):
    # The update copies the policy's adapter into a second adapter, added after fully_shard:
    # the policy's is sharded (DTensor), the new one is not.
    ranks, updates = reference_updates(tmp_path, "two", "--data.batch_size=4", *FSDP2,
                                       "--data.num_synthetic_pairs=100", NO_CHECKPOINTS,
                                       "--trainer.limit_train_batches=2",
                                       "--trainer.limit_val_batches=0")
    assert ranks[0]["world_size"] == 2 and len(ranks[0]["losses"]) == 6
    for rank in (0, 1):
        assert_reference_is_the_policy(updates[rank], count=2)  # after epochs 0 and 1
    assert updates[0] == updates[1]  # one model, whichever rank computes


@pytest.mark.slow
def test_fsdp2_shard_lora_reference_update_matches_one_process_and_resumes_exactly(tmp_path):
    one, one_updates = reference_updates(tmp_path, "one", "--data.batch_size=8", NO_CHECKPOINTS)
    two, two_updates = reference_updates(tmp_path, "two", "--data.batch_size=4", *FSDP2,
                                         callbacks=[SAVE_EVERY_EPOCH])
    assert two[0]["world_size"] == 2 and len(two[0]["losses"]) == len(one[0]["losses"]) == 18
    assert_ranks_average_to(one[0]["losses"], two)
    for updates in (one_updates[0], two_updates[0], two_updates[1]):
        assert_reference_is_the_policy(updates, count=2)
        for ours, theirs in zip(updates, one_updates[0], strict=True):
            torch.testing.assert_close(torch.tensor(ours["policy"]),
                                       torch.tensor(theirs["policy"]), atol=1e-4, rtol=1e-4)
    # The epoch-0 checkpoint comes after the first update: it holds the reference adapter,
    # and a resumed run trains against it (its cache is rebuilt from it) as the
    # uninterrupted run did.
    [ckpt] = (tmp_path / "two").rglob("epoch=0-*.ckpt")
    assert any(".reference." in k for k in saved_weights(ckpt))
    resumed, resumed_updates = reference_updates(tmp_path, "resumed", "--data.batch_size=4",
                                                 *FSDP2, NO_CHECKPOINTS, f"--ckpt_path={ckpt}")
    for rank in (0, 1):
        assert resumed[rank]["losses"] == pytest.approx(two[rank]["losses"][6:], rel=1e-4,
                                                        abs=1e-5), rank
        assert_reference_is_the_policy(resumed_updates[rank], count=1)  # after epoch 1
        torch.testing.assert_close(torch.tensor(resumed_updates[rank][0]["policy"]),
                                   torch.tensor(two_updates[rank][1]["policy"]),
                                   atol=1e-4, rtol=1e-4)
