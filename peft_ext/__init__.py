"""PEFT tuner types for MoRA and RL-selected sparse subnetworks.

Importing this package registers the tuner types with PEFT, so ``get_peft_model``,
``PeftModel.from_pretrained`` and ``AutoPeftModel*`` handle them like built-in types.
"""

from .mora import MoraConfig, MoraModel, ReMoraCallback
from .registration import register_tuner
from .subnet import SubnetConfig, SubnetModel, SubnetWarmupCallback, diff_checkpoints

__all__ = [
    "MoraConfig",
    "MoraModel",
    "ReMoraCallback",
    "register_tuner",
    "SubnetConfig",
    "SubnetModel",
    "SubnetWarmupCallback",
    "diff_checkpoints",
]
__version__ = "0.1.0"
