"""A run's log folder across a resume, and no empty folder from a run that failed early.

The CLI's default logger writes ``<trainer.default_root_dir>/<method>/version_N``. A run
resumed with ``--ckpt_path`` from a checkpoint in such a folder
(``.../version_N/checkpoints/*.ckpt``) continues that folder: its ``metrics.csv`` keeps the
rows logged up to the checkpoint and the resumed run appends to it, and its checkpoints and
rounds go beside the earlier ones. Lightning's ``CSVLogger`` would delete an existing
``metrics.csv`` (hence ``RunCSVLogger``), and a new ``version_N`` would split one run's
metrics and rounds across folders.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import warnings
from typing import Any

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

_VERSION = re.compile(r"version_(\d+)$")
# What a run writes before its first step: a folder holding only these is the trace of a
# run that failed while starting (an option error, a model that would not load).
_STARTUP_FILES = {"config.yaml", "hparams.yaml"}


def run_dir(trainer: Any) -> str:
    """The folder of this run: where Lightning's ``ModelCheckpoint`` puts its ``checkpoints/``
    (``<save_dir>/<name>/<version>``, a CSV or TensorBoard logger's ``log_dir``). The online
    rounds and the CLI's ``config.yaml`` go there too: for a W&B logger, whose ``log_dir`` is
    its ``save_dir`` shared by every run, ``<save_dir>/<project>/<run id>``."""
    from lightning.pytorch.loggers import TensorBoardLogger

    if not trainer.loggers:
        return trainer.default_root_dir
    logger = trainer.loggers[0]
    if isinstance(logger, (CSVLogger, TensorBoardLogger)):
        return trainer.log_dir
    save_dir = logger.save_dir if logger.save_dir is not None else trainer.default_root_dir
    version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
    return os.path.join(save_dir, str(logger.name), version)


def resumed_version(ckpt_path: str | None, save_dir: str, name: str) -> int | None:
    """N when ``ckpt_path`` lies in ``<save_dir>/<name>/version_N/checkpoints/``, else None
    (no checkpoint, a Lightning alias such as ``last``, or one from elsewhere)."""
    if not ckpt_path or not os.path.isfile(ckpt_path):
        return None
    checkpoints = os.path.dirname(os.path.abspath(ckpt_path))
    version_dir = os.path.dirname(checkpoints)
    match = _VERSION.match(os.path.basename(version_dir))
    if (os.path.basename(checkpoints) != "checkpoints" or match is None
            or os.path.dirname(version_dir) != os.path.abspath(os.path.join(save_dir, name))):
        return None
    return int(match[1])


def expect_earlier_checkpoints() -> None:
    """Silences ModelCheckpoint's "Checkpoint directory ... exists and is not empty": a run
    continuing its folder writes beside its earlier checkpoints on purpose."""
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")


def checkpoint_step(ckpt_path: str) -> int:
    """The global step a checkpoint was saved at (memory-mapped: the weights are not read)."""
    import torch

    return int(torch.load(ckpt_path, map_location="cpu", mmap=True,
                          weights_only=False)["global_step"])


class RunCSVLogger(CSVLogger):
    """``CSVLogger`` that continues a resumed run's ``metrics.csv`` instead of deleting it.

    Args:
        resume_step: the checkpoint's global step: rows logged at steps before it are kept
            (the resumed run logs the others again, with the same values).
        **kwargs: ``CSVLogger``'s (``save_dir``, ``name``, ``version``...).
    """

    def __init__(self, *args: Any, resume_step: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.resume_step = resume_step

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is not None:
            return self._experiment
        path = os.path.join(self.log_dir, ExperimentWriter.NAME_METRICS_FILE)
        kept: list[dict[str, str]] = []
        if self.resume_step is not None and os.path.isfile(path):
            with open(path, newline="") as f:
                kept = [{k: v for k, v in row.items() if v != ""} for row in csv.DictReader(f)
                        if int(row["step"]) < self.resume_step]
        with warnings.catch_warnings():
            # "...exists and is not empty. Previous log files ... will be deleted": the rows
            # up to the checkpoint are written back at once.
            warnings.filterwarnings("ignore", message="Experiment logs directory")
            self._experiment = ExperimentWriter(log_dir=self.log_dir)  # deletes metrics.csv
        if kept:
            self._experiment.metrics = kept
            self._experiment.save()
        return self._experiment


def holds_step(logger: Any, step: int) -> bool:
    """Whether ``logger`` already holds the rows a resumed run's earlier attempt logged at
    ``step``: a ``RunCSVLogger`` continuing the run's folder keeps those before its
    ``resume_step``."""
    if not isinstance(logger, RunCSVLogger) or logger.resume_step is None:
        return False
    return step < logger.resume_step


def remove_if_unused(folder: str | None) -> bool:
    """Removes a version folder that holds nothing but what a run writes while starting
    (``config.yaml``, ``hparams.yaml``, empty folders); returns whether it did."""
    if not folder or not os.path.isdir(folder) or not _VERSION.search(folder.rstrip(os.sep)):
        return False
    for root, _, files in os.walk(folder):
        if any(root != folder or f not in _STARTUP_FILES for f in files):
            return False
    shutil.rmtree(folder)
    return True
