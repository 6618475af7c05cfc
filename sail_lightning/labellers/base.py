"""Helpers of the labellers: callables by import path, user scores checked. The interface
itself (``Labeller``, ``Labels``, ``ScoringLabeller``...) is ``sail_lightning.interfaces``."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch

from sail_lightning.interfaces import Labeller, Labels, Messages, ScoringLabeller, check_lengths

__all__ = ["Labeller", "Labels", "Messages", "ScoringLabeller", "as_callable", "as_scores",
           "check_lengths", "resolve_callable"]


def resolve_callable(path: str) -> Callable:
    """Imports ``"package.module:function"`` (attribute may be dotted) or ``"pkg.mod.function"``.

    Raises:
        ValueError: Not of either form. ImportError / AttributeError: no such module /
            attribute. TypeError: not callable. Every message names the path.
    """
    module_name, _, attr = path.partition(":") if ":" in path else path.rpartition(".")
    if not module_name.strip() or not attr.strip():
        raise ValueError(f"not an import path 'package.module:function': {path!r}")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        # A file beside the user's config is not importable from the console script unless
        # its folder is on the path: the usual stumble with a first labeller of one's own.
        raise ImportError(f"cannot import module {module_name!r} of {path!r}: {e} (a module "
                          "in a folder of your own needs that folder on PYTHONPATH, e.g. "
                          "PYTHONPATH=examples sail-lightning fit ...)") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise AttributeError(f"{path!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{path!r} is not callable (got {type(obj).__name__})")
    return obj


def as_callable(fn: str | Callable, what: str) -> tuple[Callable, str]:
    """The callable and a name for messages; paths resolve now, before any model loads."""
    if isinstance(fn, str):
        return resolve_callable(fn), fn
    if not callable(fn):
        raise TypeError(f"{what} must be a callable or an import path, got {type(fn).__name__}")
    return fn, getattr(fn, "__qualname__", repr(fn))


def as_scores(values: Any, n: int, source: str) -> torch.Tensor:
    """A user function's output as a float32 CPU tensor of shape ``(n,)``."""
    out = torch.as_tensor(values if torch.is_tensor(values) else list(values), dtype=torch.float32)
    out = out.detach().cpu().reshape(-1) if out.shape == (n, 1) else out.detach().cpu()
    if out.shape != (n,) or torch.isnan(out).any():
        raise ValueError(f"{source} returned shape {tuple(out.shape)} for {n} inputs, or NaN")
    return out
