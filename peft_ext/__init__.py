"""PEFT tuner types for MoRA and RL-selected sparse subnetworks.

Importing this package registers the tuner types with PEFT, so ``get_peft_model``,
``PeftModel.from_pretrained`` and ``AutoPeftModel*`` handle them like built-in types. That (two new
``PeftType`` members and their entries in PEFT's ``PEFT_TYPE_TO_*`` mappings) is the only effect of the
import: no method of PEFT, transformers or torch is replaced. :func:`push_to_hub` and
:func:`save_pretrained` write a model card that tells readers to install and import this package.
An unsupported peft, transformers or accelerate release is refused here, before PEFT is imported
(the supported range is in :mod:`peft_ext._versions`).
"""

from ._versions import require_supported_versions

require_supported_versions(("peft", "transformers", "accelerate"), package="peft_ext")

from ._quantized import keep_4bit_training_layout
from .hub import push_to_hub, save_pretrained
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
    "keep_4bit_training_layout",
    "push_to_hub",
    "save_pretrained",
]
__version__ = "0.1.0"
