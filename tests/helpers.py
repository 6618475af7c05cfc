"""Callbacks that tests put into CLI runs (importable as tests.helpers from the repo root),
and tensor comparisons that several test files share."""

import hashlib
import json
import os
import signal

import lightning as L
import torch
from lightning.pytorch.strategies import SingleDeviceStrategy


class KillAt(L.Callback):
    """SIGKILL this process after a given optimizer step: a crash, no clean-up."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class DumpPool(L.Callback):
    """Write each rank's view of the online pool and its per-step losses to `path`."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.losses: list[float] = []
        self.lrs: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, *args) -> None:
        self.losses.append(float(outputs["loss"]))
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_end(self, trainer, pl_module) -> None:
        dm = trainer.datamodule
        pool = [p.to_json() for p in dm.round_pairs]
        digest = hashlib.sha1(json.dumps(pool, sort_keys=True).encode()).hexdigest()
        os.makedirs(self.path, exist_ok=True)
        with open(os.path.join(self.path, f"rank{trainer.global_rank}.json"), "w") as f:
            json.dump({"rounds": dm.rounds, "pool_sha1": digest, "pairs": len(pool),
                       "world_size": trainer.world_size, "losses": self.losses,
                       "lrs": self.lrs}, f)


def snapshot(model) -> dict[str, torch.Tensor]:
    """Detached copies of a model's tensors, to compare before and after training."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if isinstance(v, torch.Tensor)}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    # Bytes, not values: packed 4-bit data stored as float32 can read as NaN (NaN != NaN).
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


class RestoreAfterSetup(SingleDeviceStrategy):
    """One CPU process that restores checkpoints after on_fit_start, as FSDPStrategy and
    ModelParallelStrategy do (both refuse or need more than one CPU process)."""

    def __init__(self) -> None:
        super().__init__(torch.device("cpu"))

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True
