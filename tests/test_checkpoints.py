"""Lean checkpoints: frozen weights that configure_model rebuilds are left out, and resuming
restores the very same policy and reference."""

import lightning as L
import pytest
import torch

from sail_lightning.models import LoraOptions, QuantizationOptions
from sail_lightning.module import SAILModule
from tests.conftest import TINY_CONFIG, save_tiny_llama
from tests.helpers import RestoreAfterSetup, fit, same_bits, snapshot, synthetic_pairs

LORA = LoraOptions(r=2, alpha=4, dropout=0.0)


@pytest.fixture(scope="module")
def model64_dir(tmp_path_factory, synthetic_tokenizer):
    """Hidden size 64: LoRA r=2 is then a small share of the weights, as in real models."""
    return save_tiny_llama(tmp_path_factory.mktemp("llama64"), synthetic_tokenizer,
                           hidden_size=64, seed=1)


class Capture(L.Callback):
    """Policy and reference weights as training (re)starts, after any checkpoint restore."""

    def on_train_start(self, trainer, pl_module):
        self.step = trainer.global_step
        self.policy = snapshot(pl_module.pair.policy)
        ref = pl_module.pair.reference
        self.reference = None if ref is None else snapshot(ref)


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not same_bits(a[k], b[k])]
    assert not different, different[:5]


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def train_save_resume(make, tmp_path):
    """Fits one epoch, saves, resumes for one more; returns the checkpoint, the module as
    saved, its weights then, and what the resumed run started from."""
    m = make()
    trainer = fit(m, tmp_path)
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    saved_policy = snapshot(m.pair.policy)
    saved_ref = None if m.pair.reference is None else snapshot(m.pair.reference)
    cap = Capture()
    torch.manual_seed(1234)  # whatever the global generator holds, the rebuild is the same
    fit(make(), tmp_path, epochs=2, ckpt_path=ckpt, callbacks=[cap])
    assert cap.step == 2  # resumed after the saved epoch
    return torch.load(ckpt, weights_only=True), m, saved_policy, saved_ref, cap


@pytest.mark.parametrize("quantized", [False, True], ids=["lora", "qlora"])
def test_lora_checkpoint_holds_the_adapter_only_and_resumes_exactly(model64_dir, tmp_path,
                                                                    quantized):
    def make():
        return SAILModule(model_name_or_path=str(model64_dir), lora=LORA, lr=1e-2,
                          quantization=QuantizationOptions() if quantized else None)

    ckpt, m, saved_policy, _, cap = train_save_resume(make, tmp_path)
    kept = ckpt["state_dict"]
    assert kept and all(".lora_" in k and ".default." in k for k in kept)
    assert set(kept) == {f"pair.policy.{n}" for n, p in m.pair.policy.named_parameters()
                         if p.requires_grad}
    full = SAILModule(model_name_or_path=str(model64_dir))
    full.configure_model()
    full_bytes = nbytes(full.pair.policy.state_dict().values())
    assert nbytes(kept.values()) < 0.25 * full_bytes
    assert (tmp_path / "last.ckpt").stat().st_size < 0.25 * full_bytes  # optimizer state too
    # The resumed run starts from the saved policy: base rebuilt from the path, adapter
    # restored from the checkpoint, bit for bit.
    assert_same(cap.policy, saved_policy)


def test_full_finetuning_checkpoint_drops_the_reference_loaded_by_path(model64_dir, tmp_path):
    def make():
        return SAILModule(model_name_or_path=str(model64_dir), lr=1e-3)

    ckpt, m, saved_policy, saved_ref, cap = train_save_resume(make, tmp_path)
    keys = set(ckpt["state_dict"])
    assert not any(k.startswith("pair.reference.") for k in keys)
    assert keys == {f"pair.policy.{k}" for k in saved_policy}
    assert_same(cap.policy, saved_policy)
    assert_same(cap.reference, saved_ref)
    assert not all(torch.equal(saved_policy[k], saved_ref[k]) for k in saved_ref)  # it trained


def test_model_config_checkpoint_rebuilds_the_reference_from_init_seed(tmp_path):
    def make():
        return SAILModule(model_config=TINY_CONFIG, tokenizer="synthetic", init_seed=7, lr=1e-3)

    torch.manual_seed(99)
    ckpt, m, saved_policy, saved_ref, cap = train_save_resume(make, tmp_path)
    assert not any(k.startswith("pair.reference.") for k in ckpt["state_dict"])
    assert_same(cap.reference, saved_ref)
    assert_same(cap.policy, saved_policy)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_an_updated_reference_is_kept_and_restored(tiny_model_dir, tmp_path, lora):
    m = SAILModule(model_name_or_path=str(tiny_model_dir), lr=1e-2,
                   lora=LORA if lora else None)
    trainer = fit(m, tmp_path)
    m.pair.update_reference()  # iterative DPO: the reference is now a trained policy
    with torch.no_grad():  # move the policy on, away from that reference
        for p in m.pair.policy.parameters():
            if p.requires_grad:
                p.add_(0.01)
    ckpt_path = tmp_path / "updated.ckpt"
    trainer.save_checkpoint(ckpt_path)
    keys = set(torch.load(ckpt_path, weights_only=True)["state_dict"])
    ref_keys = {k for k in keys
                if (".reference." in k if lora else k.startswith("pair.reference."))}
    assert ref_keys
    restored = SAILModule.load_from_checkpoint(ckpt_path)
    assert_same(snapshot(restored.pair.policy), snapshot(m.pair.policy))
    if lora:
        assert restored.pair.has_reference_adapter
        params = dict(restored.pair.policy.named_parameters())
        assert not any(p.requires_grad for n, p in params.items() if ".reference." in n)
    else:
        assert_same(snapshot(restored.pair.reference), snapshot(m.pair.reference))
    pairs = synthetic_pairs(4)
    torch.testing.assert_close(restored.pair.pair_logprobs(pairs), m.pair.pair_logprobs(pairs))


def test_a_missing_weight_that_cannot_be_rebuilt_is_an_error_naming_it(tiny_model_dir,
                                                                       tmp_path):
    m = SAILModule(model_name_or_path=str(tiny_model_dir), lora=LORA, lr=1e-2)
    trainer = fit(m, tmp_path)
    path = tmp_path / "broken.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    lost = sorted(ckpt["state_dict"])[0]
    del ckpt["state_dict"][lost]
    torch.save(ckpt, path)
    with pytest.raises(RuntimeError, match=lost.replace(".", r"\.")):
        SAILModule.load_from_checkpoint(path)
    # Weights that the model lacks would be ignored by non-strict loading: a warning names them.
    ckpt["state_dict"][lost] = torch.zeros(1)
    ckpt["state_dict"]["pair.policy.bogus_layer"] = torch.zeros(1)
    torch.save(ckpt, tmp_path / "extra.ckpt")
    with pytest.warns(UserWarning, match="bogus_layer"):
        with pytest.raises(RuntimeError):  # the zeros(1) stand-in has the wrong shape
            SAILModule.load_from_checkpoint(tmp_path / "extra.ckpt")
    with pytest.raises(RuntimeError, match="cannot be rebuilt"):
        fit(SAILModule(model_name_or_path=str(tiny_model_dir), lora=LORA), tmp_path, epochs=2,
            ckpt_path=path)


class CachedReference(L.Callback):
    """The pool's cached reference log-probs of the first pairs as training (re)starts,
    and the reference's own, computed then (after any restore)."""

    def on_train_start(self, trainer, pl_module):
        dm = trainer.datamodule
        self.cached = dm.pool.offline_ref[:8].clone()
        _, self.reference = pl_module.pair.pair_logprobs(dm.train_pairs[:8], policy=False)


@pytest.mark.parametrize("strategy", [None, RestoreAfterSetup()],
                         ids=["restore_before_setup", "restore_after_setup"])
def test_resume_caches_the_restored_updated_reference(tiny_model_dir, tmp_path, strategy):
    # A checkpoint saved after a reference update: on resume the cached reference log-probs
    # must be the restored reference's, also where the checkpoint is restored after
    # on_fit_start (which would otherwise cache those of the freshly built model).
    from sail_lightning.callbacks import PairGenerationCallback

    def make():
        return SAILModule(model_name_or_path=str(tiny_model_dir), lr=1e-2, lora=LORA)

    def generation():
        return PairGenerationCallback(update_reference=True, progress=False)

    kw = {"reload_dataloaders_every_n_epochs": 1}
    trainer = fit(make(), tmp_path, epochs=2, callbacks=[generation()], **kw)  # update after 0
    ckpt = tmp_path / "updated.ckpt"
    trainer.save_checkpoint(ckpt)
    cap = CachedReference()
    fit(make(), tmp_path, epochs=3, ckpt_path=ckpt, callbacks=[generation(), cap], **kw,
        **({"strategy": strategy} if strategy else {}))
    torch.testing.assert_close(cap.cached, cap.reference)
