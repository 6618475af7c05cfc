"""Resume matrix: a run killed at each point (mid-epoch 0 and 1, after an epoch's last batch,
during generation, labelling, writing and evaluation (EvaluationCallback's judge); a
finished run extended) and resumed
from its last checkpoint trains the same batches, logs the same losses and builds the same
rounds, byte for byte, as an uninterrupted run, for checkpoints every n steps and every epoch.

Kills are exceptions raised in-process at the chosen point (tests/test_resume.py keeps a real
SIGKILL through the CLI); the 2-process DDP variants run through the CLI and are slow.
"""

import csv
import hashlib
import shutil
from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

import sail_lightning.callbacks as callbacks_module
import sail_lightning.data.pool as pool_module
from sail_lightning.callbacks import PairGenerationCallback
from sail_lightning.evaluation import EvaluationCallback
from sail_lightning.generation import SamplingOptions
from sail_lightning.run_folder import RunCSVLogger, checkpoint_step
from sail_lightning.synthetic import OracleLabeller
from tests.helpers import datamodule, module

EPOCHS = 3


class Killed(RuntimeError):
    """Stands for a crash at a chosen point."""


class Record(L.Callback):
    """Per global step: a hash of the batch's input ids and the loss (a resumed run's
    steps overwrite those the killed run trained after its last checkpoint)."""

    def __init__(self, steps: dict, losses: dict) -> None:
        self.steps, self.losses = steps, losses

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        ids = batch["input_ids"].numpy().tobytes()
        self.steps[trainer.global_step] = hashlib.sha1(ids).hexdigest()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses[trainer.global_step - 1] = float(outputs["loss"])


class KillAtStep(L.Callback):
    """Raises after the given optimizer step, before its checkpoint could be saved."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            raise Killed(f"step {self.step}")


class KillAtEpochEnd(L.Callback):
    """Raises at the end of an epoch, after its last batch (and any checkpoint saved on it),
    before the next round is generated."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, *args) -> None:
        if trainer.current_epoch == self.epoch:
            raise Killed(f"end of epoch {self.epoch}")


class KillingJudge(OracleLabeller):
    """The synthetic oracle as EvaluationCallback's judge, raising while it scores the
    evaluation of a given epoch (armed per run)."""

    def __init__(self, trainer_epoch=None, epoch: int | None = None) -> None:
        super().__init__()
        self.trainer_epoch, self.epoch = trainer_epoch, epoch

    def score(self, *args, **kw):
        if self.epoch is not None and self.trainer_epoch() == self.epoch:
            raise Killed(f"evaluation of epoch {self.epoch}")
        return super().score(*args, **kw)


class KillingOracle(OracleLabeller):
    """The synthetic oracle, raising while it labels a given round (armed per run)."""

    armed_round: int | None = None
    current_round = -1

    def reseed(self, seed: int) -> None:
        super().reseed(seed)
        self.current_round = seed // 100_003  # the callback's seed: seed + 100_003 * round

    def label(self, *args, **kw):
        if self.current_round == self.armed_round:
            raise Killed(f"labelling round {self.current_round}")
        return super().label(*args, **kw)


def run(tmp: Path, name: str, log: dict, *, cadence: str, kill: list | None = None,
        ckpt: str | None = None, epochs: int = EPOCHS, oracle=None, judge_epoch=None,
        logger=False) -> L.Trainer:
    """One fit of the tiny SAIL-PR run; ``log`` collects steps, losses and rounds."""
    L.seed_everything(0, verbose=False)
    attempt = log.setdefault("attempts", 0)
    log["attempts"] += 1
    dm = datamodule(setup=False, mix_pr=0.3, num_synthetic_pairs=48, batch_size=8,
                    pool_dir=str(tmp / name / f"rounds{attempt}"))
    model = module(configure=False, coef_pr=0.3, baseline="mean",
                   scheduler="constant_with_warmup", warmup_ratio=0.0)
    # (save_top_k=0 writes last.ckpt at step saves only: epoch saves need a top-k file.)
    every = ({"every_n_train_steps": 2, "save_top_k": 0} if cadence == "steps" else
             {"every_n_epochs": 1, "save_top_k": -1})
    checkpoint = ModelCheckpoint(dirpath=tmp / name / "ckpt", save_last=True, **every)
    generation = PairGenerationCallback(
        labeller=oracle or OracleLabeller(), progress=False,
        sampling=SamplingOptions(num_samples=2, max_new_tokens=6, batch_size=64))
    judge = KillingJudge(lambda: trainer.current_epoch, judge_epoch)
    evaluation = EvaluationCallback(judge=judge, num_prompts=8, max_new_tokens=4)
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=epochs, reload_dataloaders_every_n_epochs=1,
        limit_val_batches=1, num_sanity_val_steps=0, logger=logger, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp / name,
        callbacks=[evaluation, generation, Record(log.setdefault("steps", {}),
                                                  log.setdefault("losses", {})),
                   *(kill or []), checkpoint])
    try:
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt)
    except Killed as exc:
        log["killed"] = str(exc)
    log["rounds"] = {r["round"]: Path(r["path"]).read_bytes() for r in dm.pool.rounds}
    return trainer


def last(tmp: Path, name: str) -> str:
    path = tmp / name / "ckpt" / "last.ckpt"
    assert path.exists(), f"no checkpoint was saved before the kill in {name}"
    return str(path)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    log: dict = {}
    trainer = run(tmp, "full", log, cadence="epochs")
    log["steps_per_epoch"] = trainer.num_training_batches
    assert sorted(log["rounds"]) == list(range(EPOCHS))
    return log


def assert_same(log: dict, reference: dict) -> None:
    assert log["steps"] == reference["steps"]  # the same batches at every global step
    assert log["losses"] == reference["losses"]
    assert sorted(log["rounds"]) == sorted(reference["rounds"])
    for r, content in reference["rounds"].items():
        assert log["rounds"][r] == content, f"round {r} differs"


KILL_POINTS = ["mid_epoch_0", "mid_epoch_1", "last_batch", "generation", "labelling",
               "writing", "evaluation"]


def kill_setup(point: str, steps: int, cadence: str, monkeypatch
               ) -> tuple[list, OracleLabeller, int | None]:
    """The callbacks and the labeller of a run killed at ``point``. Labelling and writing
    fail in round 1 (built after epoch 0, before the epoch's checkpoint: with epoch
    checkpoints nothing would be left to resume) or round 2."""
    oracle = KillingOracle()
    round_index = 1 if cadence == "steps" else 2
    if point == "mid_epoch_0":
        return [KillAtStep(steps // 2 + 1)], oracle, None
    if point == "mid_epoch_1":
        return [KillAtStep(steps + steps // 2 + 1)], oracle, None
    if point == "last_batch":
        return [KillAtEpochEnd(1)], oracle, None  # step 18: a checkpoint on the last batch
    if point == "evaluation":
        return [], oracle, 1  # EvaluationCallback's judge, at the end of epoch 1
    if point == "labelling":
        oracle.armed_round = round_index
        return [], oracle, None
    if point == "generation":
        real = callbacks_module.build_round

        def build_round(*args, round_index, **kw):
            if round_index == 2:
                raise Killed("generating round 2")
            return real(*args, round_index=round_index, **kw)

        monkeypatch.setattr(callbacks_module, "build_round", build_round)
        return [], oracle, None
    if point == "writing":
        real_write = pool_module.write_round

        def write_round(path, pairs):
            if path.endswith(f"round_{round_index:04d}.jsonl"):
                with open(f"{path}.tmp-crash", "w") as f:  # half a file, never renamed
                    f.write("{\"round\": 1, \"prom")
                raise Killed(f"writing round {round_index}")
            return real_write(path, pairs)

        monkeypatch.setattr(pool_module, "write_round", write_round)
        return [], oracle, None
    raise AssertionError(point)


def kill_and_resume(tmp: Path, point: str, cadence: str, steps: int, monkeypatch) -> dict:
    log: dict = {}
    with monkeypatch.context() as patch:
        kill, oracle, judge_epoch = kill_setup(point, steps, cadence, patch)
        run(tmp, "run", log, cadence=cadence, kill=kill, oracle=oracle, judge_epoch=judge_epoch)
    assert "killed" in log, f"the run was not killed at {point}"
    run(tmp, "run", log, cadence=cadence, ckpt=last(tmp, "run"))
    return log


# Every kill point with checkpoints every 2 steps (9 steps an epoch: epoch 0 ends between two
# checkpoints, epoch 1 on one) and every epoch (no checkpoint exists inside epoch 0 then).
CASES = [pytest.param(p, "steps", id=f"{p}-steps") for p in KILL_POINTS] + [
    pytest.param(p, "epochs", id=f"{p}-epochs") for p in KILL_POINTS if p != "mid_epoch_0"]


@pytest.mark.parametrize(("point", "cadence"), CASES)
def test_killed_run_resumes_exactly(tmp_path, reference, point, cadence, monkeypatch):
    log = kill_and_resume(tmp_path, point, cadence, reference["steps_per_epoch"], monkeypatch)
    assert_same(log, reference)


@pytest.mark.parametrize("cadence", ["steps", "epochs"])
def test_finished_run_extended_builds_the_next_round(tmp_path, reference, cadence):
    log: dict = {}
    run(tmp_path, "run", log, cadence=cadence, epochs=EPOCHS - 1)
    assert sorted(log["rounds"]) == list(range(EPOCHS - 1))
    run(tmp_path, "run", log, cadence=cadence, epochs=EPOCHS, ckpt=last(tmp_path, "run"))
    assert_same(log, reference)


def gen_rows(folder: Path) -> list[dict]:
    """The gen/* rows of a CSV log folder's metrics.csv, their empty cells dropped."""
    with open(folder / "metrics.csv", newline="") as f:
        return [{k: v for k, v in row.items() if v != "" and k.startswith(("gen/", "step"))}
                for row in csv.DictReader(f) if row.get("gen/round")]


def test_resumed_run_logs_the_gen_row_of_the_round_it_restored(tmp_path):
    """Killed in epoch 1, resumed from epoch 0's checkpoint, whose round 1 was built (and its
    gen/* row logged) at that checkpoint's step: restored, not built again, it is logged
    again, so the run's log has every round's row once, as the uninterrupted run's has."""
    log: dict = {}
    first = CSVLogger(tmp_path, name="run", version=0)
    run(tmp_path, "run", log, cadence="epochs", kill=[KillAtStep(14)], logger=first)
    assert log.get("killed") == "step 14"
    ckpt = str(shutil.copy(last(tmp_path, "run"), tmp_path / "epoch0.ckpt"))
    assert checkpoint_step(ckpt) == 9  # epoch 0's 9 steps: round 1 was logged at step 9
    before = gen_rows(tmp_path / "run" / "version_0")
    assert [r["gen/round"] for r in before] == ["0.0", "1.0"]
    # A new log folder (a logger the config names): the restored round's row, as logged.
    run(tmp_path, "run", log, cadence="epochs", ckpt=ckpt,
        logger=CSVLogger(tmp_path, name="run", version=1))
    new = gen_rows(tmp_path / "run" / "version_1")
    assert [r["gen/round"] for r in new] == ["1.0", "2.0"]
    assert new[0] == before[1]
    # The run's own folder continued (the CLI's RunCSVLogger): every round once.
    run(tmp_path, "run", log, cadence="epochs", ckpt=ckpt,
        logger=RunCSVLogger(tmp_path, name="run", version=0, resume_step=9))
    rows = gen_rows(tmp_path / "run" / "version_0")
    assert [float(r["gen/round"]) for r in rows] == list(range(EPOCHS))
    assert rows[1] == before[1] and [r["step"] for r in rows] == ["0", "9", "18"]
