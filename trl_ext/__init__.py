"""TRL trainer and collator subclasses for Prefix Grouper, prefix-shared DPO, REDI and Q-Tuning.

Swap the stock trainer for the subclass; configs, datasets and callbacks stay as they are.
The offline toy testbed is the separate package :mod:`peft_trl_testbed`.

The names below are imported on first use, so ``import trl_ext``
loads neither TRL's trainers nor this package's trainer modules.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> submodule that defines it
_LAZY = {
    "PrefixGrouperGRPOConfig": "prefix_grouper",
    "PrefixGrouperGRPOTrainer": "prefix_grouper",
    "PrefixSharingDPOConfig": "prefix_sharing",
    "PrefixSharingDPOTrainer": "prefix_sharing",
    "QTuningConfig": "qtuning",
    "QTuningSFTTrainer": "qtuning",
    "REDIConfig": "redi",
    "REDITrainer": "redi",
}

__all__ = sorted(_LAZY)

if TYPE_CHECKING:
    from .prefix_grouper import PrefixGrouperGRPOConfig, PrefixGrouperGRPOTrainer
    from .prefix_sharing import PrefixSharingDPOConfig, PrefixSharingDPOTrainer
    from .qtuning import QTuningConfig, QTuningSFTTrainer
    from .redi import REDIConfig, REDITrainer


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
