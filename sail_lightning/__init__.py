"""SAIL and the online DPO family as PyTorch Lightning modules."""

from sail_lightning.objectives import Route, dpo_loss, exploration_bonus, sail_loss

__version__ = "0.1.0"

__all__ = ["Route", "dpo_loss", "exploration_bonus", "sail_loss"]
