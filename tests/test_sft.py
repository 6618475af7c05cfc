"""The SFT stage: the loss on chosen response tokens only (against a hand computation), no
reference model, the method's name and conflicts, a fit through the CLI; and length-bucketed
batches (deterministic per seed and epoch, less padding than the same examples unbucketed)."""

import csv

import pytest
import torch

from sail_lightning.cli import main
from sail_lightning.data.mixture import bucket_by_length
from sail_lightning.data.tokenize import TokenizedPair
from sail_lightning.method import MethodSpec
from sail_lightning.objectives import sft_loss
from tests.conftest import CONFIGS
from tests.helpers import collate, datamodule, module


def test_sft_loss_is_the_nll_per_response_token():
    # Two responses: log-probs -3 over 2 tokens and -5 over 3 tokens: (3 + 5) / 5 tokens.
    loss = sft_loss(torch.tensor([-3.0, -5.0]), torch.tensor([2, 3]))
    assert loss.item() == pytest.approx(1.6)
    assert sft_loss(torch.zeros(2), torch.zeros(2, dtype=torch.long)).item() == 0.0


def hand_nll(model, prompt: list[int], response: list[int]) -> tuple[float, int]:
    """-sum log p(response token | everything before it), one unpadded sequence at a time,
    prompt tokens not predicted."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    total = -sum(logp[len(prompt) + k - 1, t].item() for k, t in enumerate(response))
    return total, len(response)


def test_sft_step_counts_the_chosen_response_tokens_only():
    m = module(loss_type="sft")
    # Prompts and responses of different lengths; the rejected rows are longer than the
    # chosen ones (the batch is padded to them) and must not count.
    pairs = [TokenizedPair([5, 6, 7], [8, 9, 2], [10, 11, 12, 13, 14, 2]),
             TokenizedPair([5], [12, 13, 14, 15, 2], [8, 2])]
    batch = collate(pairs)
    lp, counts = m.pair.chosen_logprobs(batch)
    loss = sft_loss(lp, counts)
    hand = [hand_nll(m.pair.policy, p.prompt_ids, p.chosen_ids) for p in pairs]
    expected = sum(t for t, _ in hand) / sum(n for _, n in hand)
    assert counts.tolist() == [3, 5]
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # The prompt is context, not a target: a different prompt token changes the loss only
    # through the conditioning, and a different rejected response not at all.
    other = collate([TokenizedPair(p.prompt_ids, p.chosen_ids, [3, 2]) for p in pairs])
    assert sft_loss(*m.pair.chosen_logprobs(other)).item() == pytest.approx(loss.item(),
                                                                          rel=1e-6)
    loss.backward()
    assert all(p.grad is not None for p in m.pair.policy.parameters() if p.requires_grad)


def test_sft_builds_no_reference():
    m = module(loss_type="sft")
    assert not m.pair.has_reference and m.pair.reference is None
    assert not [k for k in m.state_dict() if ".reference." in k]
    with pytest.raises(RuntimeError, match="without a reference"):
        with m.pair.reference_model():
            pass
    with pytest.raises(ValueError, match="model.ref_model_name_or_path"):
        module(loss_type="sft", ref_model_name_or_path="x", configure=False)


def test_method_spec_names_sft_and_refuses_online_parts():
    assert MethodSpec(loss_type="sft").name == "sft"
    assert MethodSpec(loss_type="sft").conflicts() == []
    (problem,) = MethodSpec(loss_type="sft", mix_pr=0.3, pair_mode="two_samples",
                            labeller="X").conflicts()
    assert "model.loss_type=sft" in problem and "data.mix_pr" in problem


def test_sft_fit_through_the_cli(tmp_path):
    main(["fit", "-c", str(CONFIGS / "quickstart.yaml"), "-c", str(CONFIGS / "method" / "sft.yaml"),
          f"--trainer.default_root_dir={tmp_path}", "--trainer.max_epochs=2",
          "--trainer.limit_train_batches=8", "--trainer.limit_val_batches=2",
          "--trainer.enable_progress_bar=false", "--trainer.log_every_n_steps=1",
          "--data.num_synthetic_pairs=300"])
    (path,) = tmp_path.glob("sft/version_0/metrics.csv")
    rows = list(csv.DictReader(path.open()))
    train = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    val = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    assert len(train) == 16 and train[-1] < train[0]
    assert len(val) == 2 and val[1] < val[0]
    keys = {k for r in rows for k, v in r.items() if v}
    assert "val/win_rate_vs_chosen" in keys and "val/eval_reward" in keys
    assert not keys & {"val/kl", "val/win_rate_vs_ref"}  # no reference to compare with


def test_bucket_by_length_is_a_seeded_permutation_with_the_short_batch_last():
    lengths = [int(x) for x in torch.randint(1, 100, (83,), generator=torch.Generator()
                                             .manual_seed(0))]
    order = bucket_by_length(lengths, 8, 4, seed=1, epoch=0)
    assert sorted(order) == list(range(83))
    assert order == bucket_by_length(lengths, 8, 4, seed=1, epoch=0)
    assert order != bucket_by_length(lengths, 8, 4, seed=1, epoch=1)
    assert order != bucket_by_length(lengths, 8, 4, seed=2, epoch=0)
    # 83 = 10 full batches + 3: the short batch is last, the 3 longest of the last window.
    last_window = sorted(range(64, 83), key=lengths.__getitem__)
    assert order[-3:] == last_window[-3:]
    # Each full batch comes from one window of 4 batches, sorted there by length.
    for b in range(10):
        batch = order[8 * b : 8 * b + 8]
        assert len({i // 32 for i in batch}) == 1
        window = sorted(range(32 * (batch[0] // 32), min(83, 32 * (batch[0] // 32 + 1))),
                        key=lengths.__getitem__)
        assert batch in [window[k : k + 8] for k in range(0, len(window), 8)]


def padding(dm, epoch: int) -> int:
    items = dm.compose_epoch(epoch)
    total = 0
    for start in range(0, len(items), dm.hparams.batch_size):
        batch = dm.train_dataloader().collate_fn(items[start : start + dm.hparams.batch_size])
        total += int((batch["attention_mask"] == 0).sum())
    return total


def test_length_buckets_pad_less_than_random_batches_of_the_same_examples():
    kw = {"num_synthetic_pairs": 400, "batch_size": 8}
    plain, bucketed = datamodule(**kw), datamodule(length_buckets=8, **kw)
    for epoch in (0, 1):
        a, b = plain.compose_epoch(epoch), bucketed.compose_epoch(epoch)
        key = [(x["prompt_ids"], x["chosen_ids"], x["rejected_ids"]) for x in a]
        assert sorted(key) == sorted((x["prompt_ids"], x["chosen_ids"], x["rejected_ids"])
                                     for x in b)  # the same examples, reordered
        assert padding(bucketed, epoch) < 0.6 * padding(plain, epoch)
    assert bucketed.compose_epoch(1) == datamodule(length_buckets=8, **kw).compose_epoch(1)
    with pytest.raises(ValueError, match="data.length_buckets"):
        datamodule(length_buckets=-1, setup=False)


def test_sft_resumes_from_its_checkpoint_and_validates(tmp_path):
    """A lean SFT checkpoint (no reference in it, none rebuilt) resumes and validates."""
    args = ["-c", str(CONFIGS / "quickstart.yaml"), "-c", str(CONFIGS / "method" / "sft.yaml"),
            "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=1",
            "--trainer.log_every_n_steps=1",
            "--trainer.enable_progress_bar=false", "--data.num_synthetic_pairs=200"]
    main(["fit", *args, f"--trainer.default_root_dir={tmp_path / 'a'}", "--trainer.max_epochs=1"])
    (ckpt,) = (tmp_path / "a").rglob("*.ckpt")
    assert not [k for k in torch.load(ckpt, weights_only=True)["state_dict"] if "reference" in k]
    main(["fit", *args, f"--trainer.default_root_dir={tmp_path / 'b'}", "--trainer.max_epochs=2",
          f"--ckpt_path={ckpt}"])
    (path,) = (tmp_path / "b").glob("sft/version_0/metrics.csv")
    epochs = {int(r["epoch"]) for r in csv.DictReader(path.open()) if r.get("train/loss")}
    assert epochs == {1}
    main(["validate", *args, f"--trainer.default_root_dir={tmp_path / 'c'}", f"--ckpt_path={ckpt}"])
    (path,) = (tmp_path / "c").glob("sft/version_0/metrics.csv")
    assert {k for r in csv.DictReader(path.open()) for k, v in r.items() if v} >= {
        "val/loss", "val/eval_reward"}
