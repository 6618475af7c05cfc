"""Callbacks that tests put into CLI runs (importable as tests.helpers from the repo root),
and tensor comparisons that several test files share."""

import hashlib
import json
import os
import signal
from pathlib import Path

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


class RaiseAt(L.Callback):
    """Raise on every rank after optimizer step ``step`` (before its checkpoint is saved) or
    at the end of epoch ``epoch_end`` (after its last batch, before the next round): a crash
    that, unlike SIGKILL of one rank, does not leave the other rank waiting in a collective."""

    def __init__(self, step: int | None = None, epoch_end: int | None = None) -> None:
        self.step, self.epoch_end = step, epoch_end

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"killed after step {self.step}")

    def on_train_epoch_end(self, trainer, *args) -> None:
        if trainer.current_epoch == self.epoch_end:
            raise RuntimeError(f"killed at the end of epoch {self.epoch_end}")


class StepLog(L.Callback):
    """Append each global step's input-ids hash and loss to ``<path>/rank<r>.jsonl`` (a line
    per step, written at once: a killed run keeps the steps it trained)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.ids = ""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.ids = hashlib.sha1(batch["input_ids"].cpu().numpy().tobytes()).hexdigest()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        os.makedirs(self.path, exist_ok=True)
        line = {"step": trainer.global_step - 1, "ids": self.ids, "loss": float(outputs["loss"])}
        with open(os.path.join(self.path, f"rank{trainer.global_rank}.jsonl"), "a") as f:
            f.write(json.dumps(line) + "\n")


def step_log(path) -> dict[int, dict[int, tuple[str, float]]]:
    """Per rank, per global step: (ids hash, loss), later lines (a resumed run's) winning."""
    out: dict[int, dict[int, tuple[str, float]]] = {}
    for file in sorted(os.listdir(path)):
        rank = int(file[4:].split(".")[0])
        with open(os.path.join(path, file)) as f:
            for line in f:
                d = json.loads(line)
                out.setdefault(rank, {})[d["step"]] = (d["ids"], d["loss"])
    return out


class PoisonOnRank(L.Callback):
    """Make one rank's batch at global step ``step`` non-finite (NaN reference log-probs);
    on the exception that follows, each rank writes to ``<path>/rank<r>.json`` whether its
    policy weights are those it had before that step, and the error."""

    def __init__(self, step: int, rank: int, path: str) -> None:
        self.step, self.rank, self.path = step, rank, path
        self.before: dict | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step != self.step:
            return
        self.before = snapshot(pl_module.pair.policy)
        if trainer.global_rank == self.rank:
            n = batch["route"].shape[0]
            batch["ref_logps"] = torch.full((2 * n,), float("nan"))

    def on_exception(self, trainer, pl_module, exception) -> None:
        after = snapshot(pl_module.pair.policy)
        unchanged = self.before is not None and all(
            torch.equal(after[k], v) for k, v in self.before.items())
        os.makedirs(self.path, exist_ok=True)
        with open(os.path.join(self.path, f"rank{trainer.global_rank}.json"), "w") as f:
            json.dump({"unchanged": unchanged, "error": f"{type(exception).__name__}: "
                                                       f"{exception}"}, f)


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
        pool = [p.to_json() for p in dm.pool.pairs]
        digest = hashlib.sha1(json.dumps(pool, sort_keys=True).encode()).hexdigest()
        os.makedirs(self.path, exist_ok=True)
        with open(os.path.join(self.path, f"rank{trainer.global_rank}.json"), "w") as f:
            json.dump({"rounds": dm.pool.rounds, "pool_sha1": digest, "pairs": len(pool),
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


def datamodule(*, setup: bool = True, **kw):
    """The small synthetic preference data that tests train and score on (64 pairs, batches
    of 8, the task's oracle as ground truth); ``kw`` overrides ``PreferenceDataModule``'s
    options. Set up unless ``setup=False`` (a Trainer sets it up itself)."""
    from sail_lightning.data.datamodule import PreferenceDataModule
    from sail_lightning.synthetic import OracleLabeller

    kw = {"tokenizer": "synthetic", "num_synthetic_pairs": 64, "batch_size": 8,
          "max_prompt_length": 16, "max_response_length": 16, "oracle": OracleLabeller(), **kw}
    dm = PreferenceDataModule(**kw)
    if setup:
        dm.setup("fit")
    return dm


def module(*, configure: bool = True, **kw):
    """A tiny fresh SAILModule over the synthetic tokenizer (``tests.conftest.TINY_CONFIG``,
    lr 1e-3); ``kw`` overrides its options. Its models are built unless ``configure=False``."""
    from sail_lightning.module import SAILModule
    from tests.conftest import TINY_CONFIG

    if "model_name_or_path" not in kw:
        kw = {"model_config": TINY_CONFIG, "tokenizer": "synthetic", **kw}
    m = SAILModule(**{"lr": 1e-3, **kw})
    if configure:
        m.configure_model()
    return m


def collate(pairs, route: int = 0) -> dict:
    """A training batch of tokenized pairs, all on one route."""
    from sail_lightning.data.tokenize import PreferenceCollator

    return PreferenceCollator(0)([p.example(int(route)) for p in pairs])


def synthetic_pairs(n: int) -> list:
    """The first ``n`` training pairs of :func:`datamodule`."""
    return datamodule().train_pairs[:n]


def fit(module, tmp_path, steps=2, epochs=1, ckpt_path=None, callbacks=(), **trainer_kw):
    """A quiet CPU fit of ``module`` on :func:`datamodule`: ``steps`` batches per
    epoch, no validation, logger or checkpoints unless ``trainer_kw`` says otherwise."""
    trainer = L.Trainer(accelerator="cpu", max_epochs=epochs, limit_train_batches=steps,
                        limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, callbacks=list(callbacks), **trainer_kw)
    trainer.fit(module, datamodule=datamodule(setup=False), ckpt_path=ckpt_path)
    return trainer


def fit_command(tmp_path, name: str, method: str, *, trainer: dict | None = None,
                callbacks: tuple = ()) -> tuple[Path, list[str]]:
    """The run folder and the arguments after ``python -m sail_lightning`` of a ``fit`` of
    the quickstart with ``configs/method/<method>.yaml``: 2 epochs of 6 steps, each rank's
    ``DumpPool`` record under ``<run folder>/pool`` (read by ``dumped_pools``). ``trainer``
    overrides the overlay's trainer options (the logger, say)."""
    import yaml

    from tests.conftest import CONFIGS

    root = tmp_path / name
    cfg = {"trainer": {
        "default_root_dir": str(root), "max_epochs": 2, "limit_train_batches": 6,
        "limit_val_batches": 2, "enable_progress_bar": False, "log_every_n_steps": 1,
        "callbacks": [{"class_path": "tests.helpers.DumpPool",
                       "init_args": {"path": str(root / "pool")}}, *callbacks],
        **(trainer or {})}}
    if method != "dpo":
        cfg["trainer"]["callbacks"].insert(0, {
            "class_path": "sail_lightning.callbacks.PairGenerationCallback",
            "init_args": {"progress": False, "sampling": {"num_samples": 2, "max_new_tokens": 8,
                                                           "batch_size": 32}}})
    overlay = tmp_path / f"{name}.yaml"
    overlay.write_text(yaml.safe_dump(cfg))
    return root, ["fit", "-c", str(CONFIGS / "quickstart.yaml"),
                  "-c", str(CONFIGS / "method" / f"{method}.yaml"), "-c", str(overlay),
                  "--data.num_synthetic_pairs=400"]


def dumped_pools(root: Path) -> dict:
    """Each rank's ``DumpPool`` record of a ``fit_command`` run, by rank."""
    return {int(p.stem[4:]): json.loads(p.read_text()) for p in (root / "pool").glob("rank*.json")}


def run_cli(tmp_path, name: str, method: str, *args: str, callbacks: tuple = ()) -> dict:
    """``fit_command`` in a subprocess (CSV logs under the run folder); each rank's
    ``DumpPool`` record (losses, pool...)."""
    import subprocess
    import sys

    from tests.conftest import REPO

    logger = {"class_path": "lightning.pytorch.loggers.CSVLogger",
              "init_args": {"save_dir": str(tmp_path / name), "name": "csv"}}
    root, fit_args = fit_command(tmp_path, name, method, trainer={"logger": logger},
                                 callbacks=callbacks)
    cmd = [sys.executable, "-m", "sail_lightning", *fit_args, *args]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    return dumped_pools(root)


def assert_ranks_average_to(one: list[float], two: dict) -> None:
    """Equal local batches: the global batch's loss (one process) is the mean of the two
    ranks' losses, step by step."""
    import pytest

    for step, (a, b0, b1) in enumerate(zip(one, two[0]["losses"], two[1]["losses"],
                                           strict=True)):
        assert (b0 + b1) / 2 == pytest.approx(a, rel=1e-4, abs=1e-5), step
