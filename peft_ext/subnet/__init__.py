"""RL-selected sparse subnetworks as a PEFT tuner type (``SUBNET``), with mask selectors and analysis.

Example:
    ```py
    >>> from peft import get_peft_model
    >>> import peft_ext  # registers SUBNET with PEFT
    >>> model = get_peft_model(base_model, peft_ext.SubnetConfig(target_modules=["q_proj", "up_proj"], density=0.05))
    ```
"""

from ..registration import register_tuner
from .config import SubnetConfig
from .layer import Embedding, Linear, SubnetLayer
from .masks import CheckpointReader, MaskFile, load_masks, save_masks
from .model import SubnetModel
from .selectors import (
    CheckpointDiff,
    SubnetWarmupCallback,
    TensorDiff,
    diff_checkpoints,
    magnitude_masks,
    random_masks,
    top_fraction_masks,
)

register_tuner(name="subnet", config_cls=SubnetConfig, model_cls=SubnetModel, prefix="subnet_")

__all__ = [
    "CheckpointDiff",
    "CheckpointReader",
    "Embedding",
    "Linear",
    "MaskFile",
    "SubnetConfig",
    "SubnetLayer",
    "SubnetModel",
    "SubnetWarmupCallback",
    "TensorDiff",
    "diff_checkpoints",
    "load_masks",
    "magnitude_masks",
    "random_masks",
    "save_masks",
    "top_fraction_masks",
]
