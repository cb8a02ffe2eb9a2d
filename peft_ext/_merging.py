"""All-or-nothing ``safe_merge`` for the tuners of this package.

PEFT's tuners check each layer's merged weight for NaN or inf as they merge it, so a broken adapter
in a later layer raises after earlier layers were merged (and, in ``merge_and_unload``, unloaded).
:class:`AtomicSafeMergeMixin` checks every layer first and merges only when all of them are finite.
"""

from __future__ import annotations

import torch

from ._quantized import dense_weight


def check_merged_weights_finite(tuner, adapter_names: list[str] | None = None) -> None:
    """Raise PEFT's ``ValueError("NaNs detected ...")`` if merging would make any base weight non-finite.

    ``tuner`` is a ``BaseTuner``; the merged weight of each layer is its base weight plus the delta of
    every adapter that a merge of ``adapter_names`` (default: the active ones) would add to it. Nothing
    is modified.
    """
    for module in tuner.model.modules():
        if not isinstance(module, tuner.tuner_layer_cls):
            continue
        names = module.active_adapters if adapter_names is None else adapter_names
        names = [
            n for n in names if n not in module.merged_adapters and n in getattr(module, module.adapter_layer_names[0])
        ]
        if not names:
            continue
        weight = dense_weight(module.get_base_layer()).detach()
        merged = weight.clone()
        with torch.no_grad():
            for name in names:
                merged += module.get_delta_weight(name).to(weight.dtype)
                if not bool(torch.isfinite(merged).all()):
                    raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")


class AtomicSafeMergeMixin:
    """Mixin for a ``BaseTuner``: with ``safe_merge=True``, check every layer before merging any."""

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """PEFT's ``merge_adapter``; with ``safe_merge=True`` nothing is merged unless every layer stays finite."""
        if safe_merge:
            check_merged_weights_finite(self, adapter_names)
        super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False, adapter_names=None):
        """PEFT's ``merge_and_unload``; with ``safe_merge=True`` the model is left as it was if a layer would break."""
        if safe_merge:
            check_merged_weights_finite(self, adapter_names)
        return super().merge_and_unload(progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names)
