"""The MoRA tuner: injects [`MoraLinear`] layers into a model."""

from __future__ import annotations

import warnings

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from .._compat import set_peft_model_state_dict_arg
from .._loading import (
    adapter_tensor_key,
    discard_new_adapter,
    saved_key,
    take_pending_mark,
    warn_skipped,
)
from .._merging import AtomicSafeMergeMixin
from .._mixed_batch import MixedBatchMixin
from .._quantized import check_adaptable, keep_4bit_training_layout
from .._sharding import raise_partitioned_save
from .config import MoraConfig
from .layer import SUPPORTED_LAYERS, MoraLayer, MoraLinear
from .ops import resolve_mora_type


class MoraModel(MixedBatchMixin, AtomicSafeMergeMixin, BaseTuner):
    """MoRA model (Jiang et al., 2024, https://huggingface.co/papers/2405.12130), built by `get_peft_model`.

    Every target ``nn.Linear``/``Conv1D`` gets one trainable square matrix per adapter. All of
    PEFT's adapter operations apply: several adapters, `set_adapter`, `disable_adapter()`, mixed-adapter
    batches (``model(x, adapter_names=[...])``, also in ``generate``),
    `merge_and_unload`, `unmerge_adapter`, `delete_adapter`, `save_pretrained`/`from_pretrained`.

    Args:
        model (`torch.nn.Module`): the model to adapt.
        config ([`MoraConfig`]): the adapter configuration.
        adapter_name (`str`): name of the adapter, `"default"` by default.
        low_cpu_mem_usage (`bool`): accepted for API compatibility; M is small and always materialised.

    Example:
        ```py
        >>> from transformers import AutoModelForCausalLM, GPT2Config
        >>> from peft import get_peft_model
        >>> from peft_ext import MoraConfig
        >>> base = AutoModelForCausalLM.from_config(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128))
        >>> model = get_peft_model(base, MoraConfig(r=8, target_modules=["c_attn", "c_proj"]))
        >>> merged = model.merge_and_unload()  # a plain GPT-2 again, with the update folded in
        ```
    """

    prefix: str = "mora_"
    mixed_batch_kind = "MoRA"
    tuner_layer_cls = MoraLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def _create_and_replace(
        self,
        mora_config: MoraConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs,
    ) -> None:
        if not getattr(self, "_4bit_layout_kept", False):
            # Before the first layer is replaced: refuses a base bitsandbytes repacked (nothing changed yet), and keeps
            # every 4-bit layer the gradient passes through, targeted or not, in its training layout
            keep_4bit_training_layout(self.model)
            self._4bit_layout_kept = True
        if isinstance(target, MoraLayer):
            target.update_layer(adapter_name, mora_config)
            return
        base_layer = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not isinstance(base_layer, SUPPORTED_LAYERS):
            raise TypeError(
                f"Target module {current_key!r} has type {type(base_layer).__name__}, which MoRA cannot adapt; it supports "
                f"torch.nn.Linear and transformers Conv1D. Remove it from target_modules={mora_config.target_modules!r} "
                "or add it to exclude_modules."
            )
        check_adaptable(base_layer, current_key, "MoRA")
        new_module = MoraLinear(target, adapter_name, mora_config)
        if new_module.fan_in_fan_out != mora_config.fan_in_fan_out:
            warnings.warn(
                f"fan_in_fan_out={mora_config.fan_in_fan_out} does not match the {type(base_layer).__name__} "
                f"target layers; using fan_in_fan_out={new_module.fan_in_fan_out} for them.",
                stacklevel=2,
            )
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added, inactive adapter is not trained
        self._replace_module(parent, target_name, new_module, target)

    def merge_and_reset(self, adapter_name: str | None = None, mora_type: str | int | None = None) -> None:
        """ReMoRA restart on every layer: fold M into the base weights, zero M, optionally switch operator.

        Also records the new operator in the adapter's config, so that a saved adapter loads with it.

        Args:
            adapter_name (`str`, *optional*): the adapter to restart; the active one if None.
            mora_type (`str` or `int`, *optional*): operator to continue with (same r_hat); unchanged if None.
        """
        adapter_name = adapter_name or self.active_adapters[0]
        if adapter_name not in self.peft_config:
            raise ValueError(f"adapter_name={adapter_name!r} does not exist; choose from {list(self.peft_config)}.")
        for module in self.model.modules():
            if isinstance(module, MoraLayer) and adapter_name in module.mora_M:
                module.merge_and_reset(adapter_name, mora_type)
        if mora_type is not None:
            self.peft_config[adapter_name].mora_type = resolve_mora_type(mora_type)

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        """M of every layer plus the layer's ``(in_features, out_features)``, so a load onto a base whose layer
        sizes differ fails even where r_hat happens to coincide; a partitioned (DeepSpeed ZeRO-3) M is refused
        instead of saved."""
        to_return = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        for name, module in model.named_modules():
            if not (isinstance(module, MoraLayer) and adapter_name in module.mora_M):
                continue
            key = adapter_tensor_key(
                to_return, state_dict, name, f"mora_M.{adapter_name}", f"M of the MoRA adapter {adapter_name!r}"
            )
            r_hat = module.mora_r_hat[adapter_name]
            if tuple(to_return[key].shape) != (r_hat, r_hat):
                raise_partitioned_save(key, to_return[key], (r_hat, r_hat))
            shape = torch.tensor([module.in_features, module.out_features], dtype=torch.int64)
            to_return[f"{name}.{SHAPE_KEY}.{adapter_name}"] = shape
        # Keys as an unwrapped PeftModel names them (FSDP1, activation checkpointing, torch.compile).
        return {saved_key(key): tensor for key, tensor in to_return.items()}

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Check every saved M and layer shape before anything is loaded, so a bad file leaves the model as it was.

        An adapter that this failed load had just added is removed again. Under
        ``ignore_mismatched_sizes=True``, a layer saved for other sizes is skipped with a warning, and M of
        another shape is left to PEFT, which skips it with a warning. Adapters saved without layer shapes
        (by earlier versions) load as before, checked by M's shape alone.
        """
        fresh = take_pending_mark(config)
        try:
            state_dict, skipped = _check_saved_adapter(
                model, adapter_name, dict(state_dict), set_peft_model_state_dict_arg("ignore_mismatched_sizes")
            )
        except Exception:
            if fresh:
                discard_new_adapter(model, adapter_name)
            raise
        warn_skipped(skipped)
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)


SHAPE_KEY = "mora_shape"
"""Saved next to each layer's M: the layer's ``(in_features, out_features)`` as an int64 tensor."""


def _check_saved_adapter(model, adapter_name: str, state_dict: dict, ignore_mismatched_sizes: bool = False):
    """Check a saved MoRA adapter against ``model`` without changing the model.

    Raises ``ValueError`` naming the key for a saved M or shape of a module the model lacks, a layer
    saved for other sizes or an M of the wrong shape (both unless ``ignore_mismatched_sizes``), or M
    holding NaN or inf. Returns the state dict without the shape entries (and without the entries of
    layers skipped for their sizes) and the skipped layers.
    """
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, MoraLayer) and adapter_name in module.mora_M:
            layers[name] = module
            layers.setdefault(f"base_model.model.{name}", module)

    def layer_of(key: str, stem: str):
        module = layers.get(stem)
        if module is None:
            raise ValueError(
                f"The saved adapter has {key!r}, but this model has no module {stem.removeprefix('base_model.model.')!r} "
                f"with a MoRA adapter {adapter_name!r}. The adapter was made for another base model (or other "
                "target_modules); load it onto the base model named by base_model_name_or_path in adapter_config.json."
            )
        return module

    saved_shapes, skipped = {}, []
    for key, tensor in list(state_dict.items()):
        stem, _, attr = key.rpartition(".")
        if attr != SHAPE_KEY:
            continue
        module = layer_of(key, stem)
        state_dict.pop(key)
        if tensor.dim() != 1 or tensor.numel() != 2 or tensor.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"{key} must hold (in_features, out_features) as 2 integers, got {tensor.dtype} "
                f"{tuple(tensor.shape)}; the adapter file is corrupt."
            )
        saved = tuple(int(d) for d in tensor)
        saved_shapes[stem] = saved
        if saved != (module.in_features, module.out_features):
            name = stem.removeprefix("base_model.model.")
            if ignore_mismatched_sizes:
                skipped.append(
                    f"{name}: saved for a {saved[0]}->{saved[1]} layer, this one is "
                    f"{module.in_features}->{module.out_features}"
                )
                state_dict.pop(f"{stem}.mora_M", None)
                continue
            raise ValueError(
                f"{key}: the adapter was trained on a {saved[0]}->{saved[1]} layer (in_features->out_features), but "
                f"{name!r} is {module.in_features}->{module.out_features}. Load it onto the base model it was trained "
                "on (base_model_name_or_path in adapter_config.json), or pass ignore_mismatched_sizes=True to skip "
                "these modules."
            )
    for key, tensor in state_dict.items():
        stem, _, attr = key.rpartition(".")
        if attr != "mora_M":
            continue
        module = layer_of(key, stem)
        expected = tuple(module.mora_M[adapter_name].shape)
        if tuple(tensor.shape) != expected and not ignore_mismatched_sizes:
            here = (
                f"this {module.in_features}->{module.out_features} layer with r={module.r[adapter_name]}, "
                f"mora_type={module.mora_type[adapter_name]!r} needs {expected}"
            )
            if stem in saved_shapes:  # same layer sizes: the adapter settings differ
                cause = (
                    "The layer sizes match, so the adapter was saved with another r or mora_type than this model's "
                    f"adapter {adapter_name!r}; load it with its own adapter_config.json (PeftModel.from_pretrained "
                    "or load_adapter under a new adapter name), or create the adapter with the saved r and mora_type."
                )
            else:
                cause = (
                    "The adapter was saved with another r or mora_type, or trained on a base model with different layer "
                    "sizes; load it with its own adapter_config.json onto the base model named by "
                    "base_model_name_or_path there, or pass ignore_mismatched_sizes=True to skip these weights."
                )
            raise ValueError(
                f"Cannot load MoRA weight {key!r}: the checkpoint has M of shape {tuple(tensor.shape)}, but {here}. "
                + cause
            )
        if not tensor.is_floating_point():
            raise ValueError(f"{key} has dtype {tensor.dtype}; M is floating point. The file is corrupt.")
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(
                f"{key} holds NaN or inf values; the adapter is broken. Load an earlier checkpoint, or retrain with a "
                "lower learning rate or in float32."
            )
    return state_dict, skipped
