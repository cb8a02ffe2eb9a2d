"""TRL trainer and collator subclasses for Prefix Grouper, REDI and Q-Tuning.

Swap the stock trainer for the subclass; configs, datasets and callbacks stay as they are.
The offline toy testbed lives in :mod:`trl_ext.toy`.
"""

from .prefix_grouper import PrefixGrouperGRPOConfig, PrefixGrouperGRPOTrainer
from .qtuning import QTuningConfig, QTuningSFTTrainer
from .redi import REDIConfig, REDITrainer

__version__ = "0.1.0"
