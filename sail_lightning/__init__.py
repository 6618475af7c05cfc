"""SAIL and the online DPO family as PyTorch Lightning modules."""

__version__ = "0.1.0"
