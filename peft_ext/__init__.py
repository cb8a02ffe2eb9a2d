"""PEFT tuner types for MoRA and RL-selected sparse subnetworks.

Importing this package registers the tuner types with PEFT, so ``get_peft_model``,
``PeftModel.from_pretrained`` and ``AutoPeftModel*`` handle them like built-in types.
An unsupported peft, transformers or accelerate release is refused here, before PEFT is imported
(the supported range is in :mod:`peft_ext._versions`).
"""

from ._versions import require_supported_versions

require_supported_versions(("peft", "transformers", "accelerate"), package="peft_ext")

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
