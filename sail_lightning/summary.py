"""One line of results per epoch and one at the end of a fit, on the console.

The metrics otherwise reach only the logger (a sparse CSV by default) and the progress bar,
which shows a few and, in a narrow terminal, cuts their names. ``ConsoleSummary`` prints the
headline metrics that exist in the run (the others are left out), and where the logs and
the checkpoint are::

    epoch 1/3  train/loss 0.6474  val/rewards/accuracies 0.8500  (round 1)  gen/reward_mean ...
    fit done after 3 epochs  train/loss 0.6372  val/rewards/accuracies 0.8500  ...
      logs: runs/sail_pr/version_0 (metrics.csv)  checkpoint: runs/.../epoch=2-step=282.ckpt

The gen/ figures are the latest online round's: the one built at the end of that epoch for
the next (none after the last epoch).

The CLI adds it to every ``fit`` (``--summary.enabled=false`` turns it off; ``--summary.metrics``
sets the list); in Python, add it to ``Trainer(callbacks=[...])``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from sail_lightning.run_folder import run_dir

HEADLINE_METRICS = (
    "train/loss", "val/loss", "val/rewards/accuracies", "gen/reward_mean",
    "gen/true_reward_mean", "val/eval_reward", "val/win_rate_vs_chosen",
    "val/judge_win_rate",
)
"""The default metrics of a summary line, in order: those a run has."""


class ConsoleSummary(Callback):
    """Prints a line of headline metrics after each training epoch (after its validation and
    the next online round) and a closing line naming the logs and the checkpoint.

    Args:
        metrics: Metric names in the order shown; only those the run logs appear.
        enabled: False prints nothing (the CLI's ``--summary.enabled=false``).
    """

    def __init__(self, metrics: Sequence[str] = HEADLINE_METRICS, enabled: bool = True) -> None:
        self.metrics = list(metrics)
        self.enabled = enabled

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        total = f"/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
        # Counted from 1 here (the logs' epoch column counts from 0).
        self._print(trainer, f"epoch {trainer.current_epoch + 1}{total}  {self.line(trainer)}")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        where = [f"logs: {log_dir(trainer)}"] if log_dir(trainer) else []
        checkpoint = getattr(trainer.checkpoint_callback, "last_model_path", "") or getattr(
            trainer.checkpoint_callback, "best_model_path", "")
        if checkpoint:
            where.append(f"checkpoint: {checkpoint}")
        epochs = f"{trainer.current_epoch} epoch" + ("" if trainer.current_epoch == 1 else "s")
        self._print(trainer, f"fit done after {epochs}  "
                             f"{self.line(trainer)}\n  " + "  ".join(where))

    def line(self, trainer: L.Trainer) -> str:
        """The headline metrics the run has now, ``name value`` each."""
        values = {k: _number(v) for k, v in trainer.callback_metrics.items()}
        # An online round's metrics go to the loggers directly, not through the module.
        for callback in trainer.callbacks:
            values.update({k: _number(v) for k, v in
                           (getattr(callback, "last_round_metrics", None) or {}).items()})
        parts = [f"{name} {values[name]:.4f}" for name in self.metrics
                 if name in values and values[name] is not None]
        first_gen = next((i for i, p in enumerate(parts) if p.startswith("gen/")), None)
        if first_gen is not None and values.get("gen/round") is not None:
            # Which round the gen/ figures are of: the latest, built for the next epoch.
            parts.insert(first_gen, f"(round {int(values['gen/round'])})")
        return "  ".join(parts) or "(no metrics logged yet)"

    def _print(self, trainer: L.Trainer, text: str) -> None:
        if not self.enabled or not trainer.is_global_zero:
            return
        bar = trainer.progress_bar_callback
        if bar is not None and hasattr(bar, "print"):
            bar.print(text)  # above the bar, not through it
        else:
            print(text, flush=True)


def log_dir(trainer: L.Trainer) -> str | None:
    """The run's folder (``run_folder.run_dir``: a CSV logger's holds metrics.csv), or None
    without a logger."""

    if not trainer.loggers:
        return None
    folder = run_dir(trainer)
    relative = os.path.relpath(folder)
    shown = folder if relative.startswith("..") else relative
    csv = type(trainer.loggers[0]).__name__ in ("CSVLogger", "RunCSVLogger")
    return shown + (" (metrics.csv)" if csv else "")


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError):  # a tensor of several values, a string
        return None
