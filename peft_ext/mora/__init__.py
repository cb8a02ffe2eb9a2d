"""MoRA: high-rank updating with a square matrix (Jiang et al., 2024), as the PEFT type ``MORA``.

Importing this package registers the type, so that ``get_peft_model``, ``PeftModel.from_pretrained``
and ``AutoPeftModel*`` handle MoRA adapters like built-in ones.

Example:
    ```py
    >>> from peft import get_peft_model
    >>> from peft_ext import MoraConfig
    >>> model = get_peft_model(base_model, MoraConfig(r=8, target_modules="all-linear"))  # doctest: +SKIP
    ```
"""

from ..registration import register_tuner
from .callback import ReMoraCallback
from .config import MoraConfig
from .layer import MoraLayer, MoraLinear
from .model import MoraModel

__all__ = ["MoraConfig", "MoraLayer", "MoraLinear", "MoraModel", "ReMoraCallback"]

register_tuner(name="mora", config_cls=MoraConfig, model_cls=MoraModel, prefix="mora_")
