"""Pair modes: how an online round turns prompts into training pairs (``base.PairMode``).

Every module of this package is imported here, so that a mode registers by being a file in
it: adding one is a new file (and a config that names it), nothing else.
"""

import importlib
import pkgutil

from sail_lightning.pair_modes.base import (
    PairMode,
    RoundInputs,
    Selected,
    get_pair_mode,
    pair_mode_names,
    register,
)

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["PairMode", "RoundInputs", "Selected", "get_pair_mode", "pair_mode_names",
           "register"]
