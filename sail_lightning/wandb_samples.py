"""GenerationSamplesCallback: a W&B table of each online round's sample generations."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.loggers import WandbLogger

from sail_lightning.common import Route
from sail_lightning.data.pool import OnlinePair

COLUMNS: list[str] = ["round", "route", "prompt", "chosen", "rejected", "score_chosen",
                      "score_rejected"]


class GenerationSamplesCallback(L.Callback):
    """Logs up to ``n`` pairs of every new online round as a ``wandb.Table``.

    At the start of each training epoch, if the DataModule holds a round newer than the last
    one logged (``PairGenerationCallback`` builds round 0 in ``on_fit_start`` and round k+1
    at the end of epoch k), ``n`` of its pairs, evenly spread over the round (so that both
    PP and PR routes show when the round mixes them), are logged under ``key`` to every
    ``WandbLogger`` in ``trainer.loggers``. Only global rank 0 logs.

    Without a ``WandbLogger``, or without online rounds (offline methods), it does nothing.
    Add it on the command line, so that it appends to the config's callbacks::

        --trainer.callbacks+=sail_lightning.wandb_samples.GenerationSamplesCallback

    Args:
        n: pairs per round in the table (at most the round's size).
        key: the W&B key the table is logged under.
    """

    def __init__(self, n: int = 8, key: str = "gen/samples") -> None:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        self.n = n
        self.key = key
        self.last_logged_round = -1

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Logs the current round's samples if it is new (rank 0, W&B loggers only)."""
        pool = getattr(trainer.datamodule, "pool", None)
        current = pool.current_round if pool is not None else -1
        if current <= self.last_logged_round:
            return
        self.last_logged_round = current
        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        pairs: list[OnlinePair] = pool.pairs if pool is not None else []
        if not trainer.is_global_zero or not loggers or not pairs:
            return
        rows = sample_rows(pairs, self.n)
        for logger in loggers:
            logger.log_table(self.key, columns=COLUMNS, data=rows, step=trainer.global_step)


def sample_rows(pairs: list[OnlinePair], n: int) -> list[list]:
    """Table rows of ``n`` pairs evenly spread over ``pairs`` (all of them if fewer).

    Args:
        pairs: one round's pairs, in prompt order.
        n: how many rows at most.

    Returns:
        One row per pair, in the order of ``COLUMNS``; scores are ``None`` when the
        labeller gave none.
    """
    k = min(n, len(pairs))
    picked = [pairs[i * len(pairs) // k] for i in range(k)]
    rows = []
    for p in picked:
        scores = p.scores or {}
        rows.append([p.round, _route_name(p.route), p.prompt, p.chosen, p.rejected,
                     scores.get("chosen"), scores.get("rejected")])
    return rows


def _route_name(route: int) -> str:
    try:
        return Route(route).name.lower()
    except ValueError:
        return str(route)
