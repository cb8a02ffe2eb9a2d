from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer

from .._compat import set_peft_model_state_dict_arg
from .._loading import adapter_tensor_key, discard_new_adapter, take_pending_mark, warn_skipped
from .._loading import saved_key as _saved_key
from .._loading import strip_wrappers as _strip_wrappers
from .._merging import AtomicSafeMergeMixin
from .._mixed_batch import MixedBatchMixin
from .._quantized import check_adaptable
from .._sharding import full_numel, full_shape, gathered_weight, raise_partitioned_save
from . import ops
from .config import SubnetConfig
from .layer import SubnetLayer, subnet_layer_class
from .masks import MaskFile, find_mask_name

_ENCODED_KEYS = {"indices": "subnet_indices", "bitmap": "subnet_bitmap"}
_SAVED_ATTRS = ("subnet_values", "subnet_indices", "subnet_bitmap", "subnet_shape")


# Modules that wrap others and insert their attribute into names: FSDP1, activation checkpointing, torch.compile.
def _adaptable(module) -> bool:
    """Whether the tuner can adapt ``module`` (or, for an adapted layer, its base layer)."""
    if isinstance(module, BaseTunerLayer):
        module = module.get_base_layer()
    return subnet_layer_class(module) is not None


def _base_parameter_names(modules: dict) -> dict[str, tuple[str, str]]:
    """``{parameter name in the base model: (module name, parameter name)}`` of a possibly adapted model.

    An adapted layer's weight lives at ``<layer>.base_layer.weight``; it is listed as ``<layer>.weight``,
    its name in the base model, so masks name the same weights before and after the first adapter. The
    adapter parameters themselves are not listed. Wrapper segments (FSDP1, activation checkpointing,
    ``torch.compile``) are dropped from the names.
    """
    tuner_layers = {name for name, module in modules.items() if isinstance(module, BaseTunerLayer)}
    params = {}
    for module_name, module in modules.items():
        parts = module_name.split(".")
        if any(".".join(parts[:i]) in tuner_layers for i in range(1, len(parts))):
            continue  # inside an adapted layer: its base layer is listed under the layer's name
        owner = module.get_base_layer() if module_name in tuner_layers else module
        for param_name, _ in owner.named_parameters(recurse=False):
            full = _strip_wrappers(f"{module_name}.{param_name}" if module_name else param_name)
            params[full] = (module_name, param_name)
            if module_name in tuner_layers:  # also as the adapted model names it (masks built from that model)
                params[_strip_wrappers(f"{module_name}.base_layer.{param_name}")] = (module_name, param_name)
    return params


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


class SubnetModel(MixedBatchMixin, AtomicSafeMergeMixin, BaseTuner):
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
    mixed_batch_kind = "SUBNET"
    tuner_layer_cls = SubnetLayer
    target_module_mapping: dict = {}

    def _prepare_adapter_config(self, peft_config: SubnetConfig, model_config: dict) -> SubnetConfig:
        if peft_config.target_modules is not None:
            return peft_config
        source = peft_config.mask_source
        if isinstance(source, dict) or source not in ("random", "magnitude", "adapter"):
            targets = set(self._masked_modules(peft_config, self.model))
            if targets:
                peft_config.target_modules = targets
                return peft_config
        raise ValueError(
            "SubnetConfig(target_modules=None) needs masks that name the modules to adapt; set target_modules, "
            "e.g. ['q_proj', 'v_proj', 'up_proj'] or 'all-linear'."
        )

    def _masked_modules(self, config: SubnetConfig, model, check_shapes: bool = True) -> dict[str, str]:
        """``{module name: mask name}`` of the masks that belong to weights the tuner can adapt.

        Every mask must name a parameter of ``model``: a mask for a weight the model lacks (a typo, or
        masks from another model) raises instead of being dropped. A mask for a weight of a supported
        layer must have that weight's shape (``check_shapes``). Masks of other parameters (norms, biases, as a checkpoint
        diff writes them) are not targets and are skipped.
        """
        masks = self._mask_source(config)
        modules = dict(model.named_modules())
        params = _base_parameter_names(modules)
        targets, unknown = {}, []
        for mask_name in masks.names():
            stem = _strip_wrappers(mask_name)
            hits = [p for p in (stem, f"{stem}.weight") if p in params]
            if not hits:
                hits = [p for p in params if p.endswith("." + stem) or p.endswith(f".{stem}.weight")]
            if not hits:
                unknown.append(mask_name)
                continue
            module_name, param_name = params[hits[0]]
            module = modules[module_name]
            if isinstance(module, BaseTunerLayer):  # an adapted layer: its base layer holds the weight
                module = module.get_base_layer()
            if param_name != "weight" or subnet_layer_class(module) is None:
                continue
            check_adaptable(module, module_name, "SUBNET", formats=())
            shape, expected = masks.shape(mask_name), full_shape(module.weight)
            if check_shapes and shape != expected:
                raise ValueError(
                    f"mask {mask_name!r} has shape {shape} but the weight of {module_name!r} has shape {expected}; "
                    f"a mask must have the weight's shape as stored, {expected} here (Conv1D weights are (in, out)). "
                    "Build it from this model's weights, e.g. with peft_ext.subnet selectors."
                )
            targets[module_name] = mask_name
        if unknown:
            canonical = {}  # one name per weight: the base model's (the adapted model's alias comes second)
            for p, owner in params.items():
                canonical.setdefault(owner, p)
            adaptable = [p for (m, n), p in canonical.items() if n == "weight" and _adaptable(modules[m])]
            examples = (adaptable or list(canonical.values()))[:2]
            raise ValueError(
                f"{len(unknown)} mask(s) name weights this model does not have, e.g. {unknown[:3]}; masks are keyed by "
                f"this model's parameter names, such as {examples}. Remove them or fix their names (masks from "
                "another model do not fit this one)."
            )
        return targets

    def _mask_source(self, config: SubnetConfig):
        cache = self.__dict__.setdefault("_subnet_mask_sources", {})
        key = id(config)
        if key not in cache:
            source = config.mask_source
            cache[key] = _DictMasks(source) if isinstance(source, dict) else MaskFile(source)
        return cache[key]

    def inject_adapter(self, model, adapter_name: str, *args, **kwargs) -> None:
        try:
            config = self.peft_config[adapter_name]
            source = config.mask_source
            if isinstance(source, dict) or source not in ("random", "magnitude", "adapter"):
                # refuse masks of weights the model lacks before changing anything; with target_modules set,
                # only the targets' masks must fit (checked per module in _resolve_indices)
                targets = self._masked_modules(config, model, check_shapes=config.target_modules is None)
                self.__dict__["_subnet_mask_names"] = targets
            super().inject_adapter(model, adapter_name, *args, **kwargs)
        finally:  # masks are copied into the layers; do not keep a large mask source alive
            self.__dict__.pop("_subnet_mask_sources", None)
            self.__dict__.pop("_subnet_mask_names", None)

    def _resolve_indices(self, config: SubnetConfig, module_name: str, base_layer) -> torch.Tensor | None:
        """Mask of one target weight as sorted flat indices (None: to be loaded from a saved adapter)."""
        weight = base_layer.weight
        source = config.mask_source
        if source == "adapter":
            return None
        if source == "random":
            return ops.random_indices(full_numel(weight), config.density, config.seed, module_name)
        if source == "magnitude":
            with gathered_weight(weight) as full:  # a collective under ZeRO-3: every process builds the same model
                return ops.magnitude_indices(full, config.density)
        masks = self._mask_source(config)
        name = self.__dict__.get("_subnet_mask_names", {}).get(module_name)  # resolved by _masked_modules
        if name is None:
            by_base_name = {_strip_wrappers(n): n for n in masks.names()}
            name = find_mask_name(by_base_name, _strip_wrappers(module_name))
            name = by_base_name.get(name, name)
        if name is None:
            known = masks.names()
            raise KeyError(
                f"no mask for target module {module_name!r} in the mask source ({len(known)} masks, e.g. "
                f"{known[:3]}); add a mask for it or remove it from target_modules."
            )
        if masks.shape(name) != full_shape(weight):
            raise ValueError(
                f"mask {name!r} has shape {masks.shape(name)} but the weight of {module_name!r} has shape "
                f"{full_shape(weight)}; masks must match the weight as stored (Conv1D weights are (in, out)) "
                "and come from the same base model."
            )
        return masks.indices(name).to(weight.device)

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **optional_kwargs):
        if current_key is None:
            raise ValueError("current_key must not be None.")
        base_layer = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        check_adaptable(base_layer, current_key, "SUBNET", formats=())
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
            values_key = adapter_tensor_key(
                to_return,
                state_dict,
                name,
                f"subnet_values.{adapter_name}",
                f"values of the SUBNET adapter {adapter_name!r}",
            )
            expected = (module.subnet_indices[adapter_name].numel(),)
            if tuple(to_return[values_key].shape) != expected:
                raise_partitioned_save(values_key, to_return[values_key], expected)
            encoding, tensor = ops.encode_indices(
                module.subnet_indices[adapter_name].cpu(), module.weight_numel, storage
            )
            to_return[f"{name}.{_ENCODED_KEYS[encoding]}.{adapter_name}"] = tensor
            # The weight's shape, so a load onto a base of another shape fails instead of scattering wrongly.
            to_return[f"{name}.subnet_shape.{adapter_name}"] = torch.tensor(module.weight_shape, dtype=torch.int64)
        # Keys as an unwrapped PeftModel names them: module names of an FSDP1-, checkpoint- or compile-wrapped
        # model carry wrapper segments that its state dict (the values) may or may not carry.
        return {_saved_key(key): tensor for key, tensor in to_return.items()}

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Validate every saved mask, shape and value first, then install the masks and remap the values.

        Nothing in the model changes until the whole file has passed, so a bad adapter raises with the
        model as it was; an adapter that this failed load had just added is removed again.
        """
        fresh = take_pending_mark(config)
        try:
            state_dict, plan, skipped = _check_saved_adapter(
                model,
                adapter_name,
                dict(state_dict),
                ignore_mismatched_sizes=set_peft_model_state_dict_arg("ignore_mismatched_sizes"),
            )
        except Exception:
            if fresh:
                discard_new_adapter(model, adapter_name)
            raise
        warn_skipped(skipped)
        for module, indices in plan:
            module.load_mask(adapter_name, indices.to(module.get_base_layer().weight.device))
        # The values go to the keys the model's own state dict uses (wrapped models differ from the saved keys).
        suffix = f".subnet_values.{adapter_name}"
        model_keys = {_strip_wrappers(k): k for k in model.state_dict() if k.endswith(suffix)}
        renamed = {}
        for key, tensor in state_dict.items():
            if key.endswith(".subnet_values"):
                key = model_keys.get(_strip_wrappers(key) + f".{adapter_name}", key)
            renamed[key] = tensor
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, renamed)


def _check_saved_adapter(model, adapter_name: str, state_dict: dict, ignore_mismatched_sizes: bool = False):
    """Decode and check a saved SUBNET adapter against ``model`` without changing the model.

    Returns the state dict without the mask entries, the ``(layer, indices)`` pairs to install and
    the modules skipped under ``ignore_mismatched_sizes``. Raises ``ValueError`` naming the key for
    entries of modules the model lacks, missing masks or values, a weight shape other than the
    saved one, corrupt masks, and NaN or inf values.
    """
    layers, stems = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, SubnetLayer) and adapter_name in module.subnet_values:
            layers[name] = module
            stems[_strip_wrappers(name)] = name
    entries: dict[str, dict[str, tuple[str, torch.Tensor]]] = {name: {} for name in layers}
    for key, tensor in state_dict.items():
        stem, _, attr = key.rpartition(".")
        if attr not in _SAVED_ATTRS:
            continue
        stem = _strip_wrappers(stem)
        if stem not in stems:
            raise ValueError(
                f"The saved adapter has {key!r}, but this model has no module {stem!r} "
                f"with a SUBNET adapter {adapter_name!r}. The adapter was made for another base model (or other "
                "target_modules); load it onto the base model named by base_model_name_or_path in adapter_config.json."
            )
        entries[stems[stem]][attr] = (key, tensor)

    plan, skipped = [], []
    for name, module in layers.items():
        found = entries[name]
        stem = next(k for k, _ in found.values()).rpartition(".")[0] if found else name
        if "subnet_values" not in found:
            raise ValueError(
                f"The saved adapter has no {stem}.subnet_values (the trained values of {name!r}); the file is "
                "incomplete or belongs to an adapter with other target_modules."
            )
        masks = [(enc, *found[attr]) for enc, attr in _ENCODED_KEYS.items() if attr in found]
        if not masks:
            raise ValueError(
                f"The saved adapter has no mask for {name!r}: expected {stem}.subnet_indices or {stem}.subnet_bitmap "
                "next to its subnet_values. Re-save the adapter with peft_ext (save_pretrained writes the masks)."
            )
        if len(masks) > 1:
            raise ValueError(f"{name}: the adapter stores several masks ({[k for _, k, _ in masks]}); keep one.")
        encoding, mask_key, mask_tensor = masks[0]
        if "subnet_shape" in found:
            shape_key, shape = found["subnet_shape"]
            if shape.dim() != 1 or shape.dtype not in (torch.int32, torch.int64):
                raise ValueError(f"{shape_key} must be a 1-D integer tensor, got {shape.dtype} {tuple(shape.shape)}.")
            saved_shape = tuple(int(d) for d in shape)
            if saved_shape != module.weight_shape:
                if ignore_mismatched_sizes:
                    skipped.append(f"{name}: saved for shape {saved_shape}, weight has {module.weight_shape}")
                    for key, _ in found.values():
                        state_dict.pop(key)
                    if adapter_name in module._awaiting_masks:  # nothing loaded here: an empty mask, no update
                        plan.append((module, torch.zeros(0, dtype=torch.int64)))
                    continue
                raise ValueError(
                    f"{shape_key}: the adapter was trained on a weight of shape {saved_shape}, but {name!r} has shape "
                    f"{module.weight_shape}. Load it onto the base model it was trained on (base_model_name_or_path "
                    "in adapter_config.json), or pass ignore_mismatched_sizes=True to skip these modules."
                )
        indices = ops.decode_indices(encoding, mask_tensor, module.weight_numel, where=f"saved adapter {mask_key}")
        values_key, values = found["subnet_values"]
        if values.dim() != 1 or values.numel() != indices.numel():
            raise ValueError(
                f"{values_key} has shape {tuple(values.shape)} but its mask selects {indices.numel()} entries; "
                "the adapter file is corrupt."
            )
        if not values.is_floating_point():
            raise ValueError(
                f"{values_key} has dtype {values.dtype}; trained values are floating point. The file is corrupt."
            )
        if not bool(torch.isfinite(values).all()):
            raise ValueError(
                f"{values_key} holds NaN or inf values; the adapter is broken. Load an earlier checkpoint, or retrain "
                "with a lower learning rate or in float32."
            )
        plan.append((module, indices))
        for attr in ("subnet_shape", *_ENCODED_KEYS.values()):
            if attr in found:
                state_dict.pop(found[attr][0])
    return state_dict, plan, skipped
