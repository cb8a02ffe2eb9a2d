from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer

from . import ops
from .config import SubnetConfig
from .layer import SubnetLayer, subnet_layer_class
from .masks import MaskFile, find_mask_name

_WRAPPER_PREFIXES = ("base_model.model.", "_orig_mod.", "module.")
_ENCODED_KEYS = {"indices": "subnet_indices", "bitmap": "subnet_bitmap"}


def _strip_wrappers(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix) :], True
    return name


class _DictMasks:
    """Adapter giving a dict of boolean masks the :class:`MaskFile` interface used during injection."""

    def __init__(self, masks: dict):
        self._masks = masks

    def names(self):
        return list(self._masks)

    def shape(self, name):
        return tuple(self._masks[name].shape)

    def indices(self, name):
        mask = self._masks[name]
        if mask.dtype != torch.bool:
            if not bool(((mask == 0) | (mask == 1)).all()):
                raise ValueError(f"mask {name!r} must be boolean (or 0/1), got dtype {mask.dtype} with other values.")
            mask = mask.bool()
        return ops.mask_to_indices(mask.cpu())


class SubnetModel(BaseTuner):
    """Train a sparse subnetwork of a pretrained model: ``W = W0 + scatter(m, v)`` with only ``v`` trainable.

    Args:
        model ([`~transformers.PreTrainedModel`]): The model to adapt.
        config ([`SubnetConfig`]): The configuration.
        adapter_name (`str`): The adapter's name, defaults to ``"default"``.

    Example:
        ```py
        >>> from peft import get_peft_model
        >>> from peft_ext.subnet import SubnetConfig, diff_checkpoints
        >>> masks = diff_checkpoints("base_model_dir", "rl_tuned_model_dir", tol=1e-5).masks
        >>> model = get_peft_model(base_model, SubnetConfig(mask_source=masks))  # targets = the masked modules
        >>> model.save_pretrained("subnet-adapter")  # values + compact masks
        ```
    """

    prefix: str = "subnet_"
    tuner_layer_cls = SubnetLayer
    target_module_mapping: dict = {}

    def _prepare_adapter_config(self, peft_config: SubnetConfig, model_config: dict) -> SubnetConfig:
        if peft_config.target_modules is not None:
            return peft_config
        source = peft_config.mask_source
        if isinstance(source, dict) or source not in ("random", "magnitude", "adapter"):
            masks = self._mask_source(peft_config)
            targets = {_strip_wrappers(n).removesuffix(".weight") for n in masks.names() if len(masks.shape(n)) == 2}
            if targets:
                peft_config.target_modules = targets
                return peft_config
        raise ValueError(
            "SubnetConfig(target_modules=None) needs masks that name the modules to adapt; set target_modules, "
            "e.g. ['q_proj', 'v_proj', 'up_proj'] or 'all-linear'."
        )

    def _mask_source(self, config: SubnetConfig):
        cache = self.__dict__.setdefault("_subnet_mask_sources", {})
        key = id(config)
        if key not in cache:
            source = config.mask_source
            cache[key] = _DictMasks(source) if isinstance(source, dict) else MaskFile(source)
        return cache[key]

    def inject_adapter(self, *args, **kwargs) -> None:
        try:
            super().inject_adapter(*args, **kwargs)
        finally:  # masks are copied into the layers; do not keep a large mask source alive
            self.__dict__.pop("_subnet_mask_sources", None)

    def _resolve_indices(self, config: SubnetConfig, module_name: str, base_layer) -> torch.Tensor | None:
        """Mask of one target weight as sorted flat indices (None: to be loaded from a saved adapter)."""
        weight = base_layer.weight
        source = config.mask_source
        if source == "adapter":
            return None
        if source == "random":
            return ops.random_indices(weight.numel(), config.density, config.seed, module_name)
        if source == "magnitude":
            return ops.magnitude_indices(weight, config.density)
        masks = self._mask_source(config)
        name = find_mask_name(masks.names(), module_name)
        if name is None:
            known = masks.names()
            raise KeyError(
                f"no mask for target module {module_name!r} in the mask source ({len(known)} masks, e.g. "
                f"{known[:3]}); add a mask for it or remove it from target_modules."
            )
        if masks.shape(name) != tuple(weight.shape):
            raise ValueError(
                f"mask {name!r} has shape {masks.shape(name)} but the weight of {module_name!r} has shape "
                f"{tuple(weight.shape)}; masks must match the weight as stored (Conv1D weights are (in, out)) "
                "and come from the same base model."
            )
        return masks.indices(name).to(weight.device)

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **optional_kwargs):
        if current_key is None:
            raise ValueError("current_key must not be None.")
        base_layer = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if subnet_layer_class(base_layer) is None:
            raise TypeError(
                f"target module {current_key!r} is a {type(base_layer).__name__}; the subnet tuner supports "
                "torch.nn.Linear, transformers Conv1D and torch.nn.Embedding. Narrow target_modules."
            )
        indices = self._resolve_indices(config, current_key, base_layer)
        if isinstance(target, SubnetLayer):
            target.update_layer(
                adapter_name,
                indices,
                init_weights=config.init_weights,
                seed=ops.stable_seed(config.seed, current_key),
                inference_mode=config.inference_mode,
            )
            return
        if isinstance(target, BaseTunerLayer):
            raise TypeError(
                f"module {current_key!r} is already adapted by another tuner type; nesting is unsupported."
            )
        layer_cls = subnet_layer_class(base_layer)
        new_module = layer_cls(
            target,
            adapter_name,
            indices,
            init_weights=config.init_weights,
            seed=ops.stable_seed(config.seed, current_key),
        )
        if adapter_name not in self.active_adapter:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    # ------------------------------------------------------------------ storage
    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        """Values from the model state dict plus each layer's mask as int32/int64 indices or a bitmap."""
        to_return = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        storage = getattr(config, "storage", "auto")
        for name, module in model.named_modules():
            if not isinstance(module, SubnetLayer) or adapter_name not in module.subnet_indices:
                continue
            if adapter_name in module._awaiting_masks:
                raise RuntimeError(f"adapter {adapter_name!r} of {name!r} has no masks loaded; nothing to save.")
            encoding, tensor = ops.encode_indices(
                module.subnet_indices[adapter_name].cpu(), module.weight_numel, storage
            )
            to_return[f"{name}.{_ENCODED_KEYS[encoding]}.{adapter_name}"] = tensor
        return to_return

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Decode and validate the saved masks (before any scatter), install them, then remap the values."""
        state_dict = dict(state_dict)
        for name, module in model.named_modules():
            if not isinstance(module, SubnetLayer) or adapter_name not in module.subnet_values:
                continue
            found = []
            for encoding, attr in _ENCODED_KEYS.items():
                for key in (f"{name}.{attr}", f"base_model.model.{name}.{attr}"):
                    if key in state_dict:
                        found.append((encoding, key, state_dict.pop(key)))
            if not found:
                continue
            if len(found) > 1:
                raise ValueError(f"{name}: the adapter stores several masks ({[k for _, k, _ in found]}); keep one.")
            encoding, key, tensor = found[0]
            indices = ops.decode_indices(encoding, tensor, module.weight_numel, where=f"saved adapter {key}")
            values_key = key.rsplit(".", 1)[0] + ".subnet_values"
            values = state_dict.get(values_key)
            if values is not None and values.numel() != indices.numel():
                raise ValueError(
                    f"{values_key} has {values.numel()} values but its mask selects {indices.numel()} entries; "
                    "the adapter file is corrupt."
                )
            module.load_mask(adapter_name, indices.to(module.get_base_layer().weight.device))
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
