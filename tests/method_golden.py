"""A tiny fit of every shipped method config, reduced to bits: each training step's loss and
each round file's digest. ``tests/data/method_golden.json`` holds these values as the code
before the pair-mode refactor computed them; ``test_method_golden.py`` checks that today's
code still does, bit for bit.

Regenerate (only when a change of the numbers is intended, and say why in the commit)::

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python -m tests.method_golden
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import lightning as L
import torch
import yaml

from tests.conftest import CONFIGS

FIXTURE = Path(__file__).parent / "data" / "method_golden.json"
# sail_pr_rm is sail_pr with a hub reward model as labeller (not downloaded here).
METHODS = sorted(p.stem for p in (CONFIGS / "method").glob("*.yaml") if p.stem != "sail_pr_rm")
_MODEL_KEYS = ("beta", "loss_type", "coef_dp", "coef_pp", "coef_pr", "response_term",
               "baseline", "bonus_alpha", "bonus_form", "label_smoothing")


class _Record(L.Callback):
    def __init__(self) -> None:
        self.losses: list[str] = []
        self.val: list[str] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]).hex())

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self.val.append(float(trainer.callback_metrics["val/loss"]).hex())


def run_method(method: str, tmp_path: Path) -> dict:
    """Two epochs of three steps of ``configs/method/<method>.yaml``'s options on the tests'
    tiny model and data (the method's pair mode, sampling sizes and reference updates)."""
    from sail_lightning.callbacks import PairGenerationCallback
    from sail_lightning.generation import SamplingOptions
    from tests.helpers import datamodule, module

    torch.set_num_threads(1)
    cfg = yaml.safe_load((CONFIGS / "method" / f"{method}.yaml").read_text())
    model = {k: v for k, v in cfg.get("model", {}).items() if k in _MODEL_KEYS}
    data = {k: v for k, v in cfg.get("data", {}).items() if k.startswith("mix_")}
    gen = next((c["init_args"] for c in cfg.get("trainer", {}).get("callbacks", [])
                if c["class_path"].endswith("PairGenerationCallback")), None)
    L.seed_everything(0, verbose=False)
    callbacks = [_Record()]
    if gen is not None:
        s = gen.get("sampling", {})
        sampling = SamplingOptions(num_samples=s.get("num_samples", 2),
                                   greedy=s.get("greedy", False),
                                   temperature=s.get("temperature", 1.0), max_new_tokens=6,
                                   batch_size=32)
        callbacks.append(PairGenerationCallback(
            pair_mode=gen.get("pair_mode", "two_samples"), sampling=sampling,
            update_reference=bool(gen.get("update_reference", False)), prompts_per_round=12,
            progress=False, seed=5))
    m = module(configure=False, **model)
    only_online = data.get("mix_pp", 0) + data.get("mix_pr", 0) == 1
    dm = datamodule(setup=False, online_pairs=12 if only_online else None,
                    pool_dir=str(tmp_path / "rounds"), **data)
    trainer = L.Trainer(accelerator="cpu", max_epochs=2, limit_train_batches=3,
                        limit_val_batches=2, num_sanity_val_steps=0, logger=False,
                        enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        reload_dataloaders_every_n_epochs=1, default_root_dir=tmp_path,
                        callbacks=callbacks)
    trainer.fit(m, datamodule=dm)
    rounds = {}
    for r in dm.pool.rounds:
        lines = Path(r["path"]).read_text().splitlines()
        rounds[str(r["round"])] = hashlib.sha1("\n".join(
            json.dumps(json.loads(line), sort_keys=True) for line in lines).encode()).hexdigest()
    return {"losses": callbacks[0].losses, "val_losses": callbacks[0].val, "rounds": rounds}


def main() -> None:
    import tempfile

    out = {}
    for method in METHODS:
        with tempfile.TemporaryDirectory() as tmp:
            out[method] = run_method(method, Path(tmp))
        print(method, out[method])
    FIXTURE.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
