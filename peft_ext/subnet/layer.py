from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from .._compat import BufferDict
from .._mixed_batch import check_layer_adapter_names, sub_batches
from .._sharding import check_full_weight, full_numel, full_shape
from . import ops


class SubnetLayer(BaseTunerLayer):
    """Tuner layer holding, per adapter, the sorted flat indices ``I`` of its mask and the trained values ``v``.

    The only trainable tensor of an adapter is ``subnet_values[adapter]`` of shape ``(k,)``, so an
    optimizer keeps state for ``k`` entries, not for the dense weight. Indices live in a
    non-persistent buffer: the adapter's saved form (compact indices or bitmap) is written by
    :meth:`SubnetModel._get_adapter_state_dict`.
    """

    adapter_layer_names = ("subnet_values",)
    other_param_names = ("subnet_indices",)

    def __init__(self, base_layer: nn.Module, **kwargs):
        self.base_layer = base_layer
        self.subnet_values = nn.ParameterDict({})
        self.subnet_indices = BufferDict({}, persistent=False)
        self._merge_backup: dict[str, torch.Tensor] = {}
        self._awaiting_masks: set[str] = set()
        self._disable_adapters = False
        self.merged_adapters = []
        self.kwargs = kwargs
        base = self.get_base_layer()
        # From the module, never the tensor: under DeepSpeed ZeRO-3 init the weight is an empty partition here.
        self.weight_shape = full_shape(base.weight)
        self.weight_numel = full_numel(base.weight)
        # PEFT's convention for every tuner layer (upstream tests read these).
        if isinstance(base, nn.Embedding):
            self.in_features, self.out_features = base.num_embeddings, base.embedding_dim
        elif isinstance(base, Conv1D):  # weight is (in_features, out_features)
            self.in_features, self.out_features = self.weight_shape
        else:
            self.in_features, self.out_features = base.in_features, base.out_features

    def update_layer(
        self,
        adapter_name: str,
        indices: torch.Tensor | None,
        init_weights: bool = True,
        seed: int = 0,
        inference_mode: bool = False,
    ) -> None:
        """Add adapter ``adapter_name`` with mask ``indices``; ``None`` reserves it for masks loaded later."""
        if indices is None:
            self._awaiting_masks.add(adapter_name)
            indices = torch.zeros(0, dtype=torch.int64)
        ops.check_indices(indices, self.weight_numel, where=f"mask of adapter {adapter_name!r}")
        self._set_mask(adapter_name, indices.to(torch.int64), init_weights, seed)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _set_mask(self, adapter_name: str, indices: torch.Tensor, init_weights: bool = True, seed: int = 0) -> None:
        weight = self.get_base_layer().weight
        old = self.subnet_values[adapter_name] if adapter_name in self.subnet_values else None
        dtype = old.dtype if old is not None else (weight.dtype if weight.dtype.is_floating_point else torch.float32)
        if init_weights:
            values = torch.zeros(indices.numel(), dtype=dtype)
        else:
            generator = torch.Generator().manual_seed(seed)
            values = (0.02 * torch.randn(indices.numel(), generator=generator)).to(dtype)
        requires_grad = old.requires_grad if old is not None else True
        device = weight.device if weight.device.type != "meta" else torch.device("cpu")
        self.subnet_indices[adapter_name] = indices.to(device)
        self.subnet_values[adapter_name] = nn.Parameter(values.to(device), requires_grad=requires_grad)

    def load_mask(self, adapter_name: str, indices: torch.Tensor) -> None:
        """Install a validated mask loaded from a saved adapter (resizes ``subnet_values``)."""
        if adapter_name in self.merged_adapters:
            raise ValueError(f"cannot load masks into adapter {adapter_name!r} while it is merged; unmerge first.")
        self._set_mask(adapter_name, indices.to(torch.int64))
        self._awaiting_masks.discard(adapter_name)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """Dense ``scatter(I, v)`` in the base weight's stored layout."""
        values = self.subnet_values[adapter]
        delta = torch.zeros(self.weight_numel, dtype=values.dtype, device=values.device)
        delta[self.subnet_indices[adapter]] = values
        return delta.view(self.weight_shape)

    def _subnets_to_apply(self) -> list[str]:
        """Adapters whose values must be added in this forward; empty when disabled or already merged."""
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return []
        return [] if self.merged else self._active_subnets()

    def _active_subnets(self) -> list[str]:
        names = [a for a in self.active_adapters if a in self.subnet_values]
        waiting = [a for a in names if a in self._awaiting_masks]
        if waiting:
            raise RuntimeError(
                f"adapter {waiting[0]!r} has mask_source='adapter' but no masks were loaded into it; load a saved "
                "adapter with PeftModel.from_pretrained(base_model, path) or model.load_adapter(path, name), or "
                "create a new one with mask_source='random', 'magnitude', a masks file or a dict of masks."
            )
        return names

    def _mixed_sub_batches(self, x: torch.Tensor, adapter_names: list[str]) -> dict[str, torch.Tensor]:
        """Rows per adapter of this layer for a mixed batch (rows of ``"__base__"`` and of absent adapters dropped)."""
        check_layer_adapter_names(self, x, adapter_names, "SUBNET")
        groups = {
            n: rows for n, rows in sub_batches(adapter_names, device=x.device).items() if n in self.subnet_values
        }
        waiting = [n for n in groups if n in self._awaiting_masks]
        if waiting:
            raise RuntimeError(f"adapter {waiting[0]!r} has no masks loaded yet; load a saved adapter into it first.")
        if groups:
            check_full_weight(self.get_base_layer().weight, "the SUBNET forward (it adds the values into the weight)")
        return groups

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Write ``W0[I] + v`` into the base weight; the overwritten entries are kept so unmerge is exact."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        weight = self.get_base_layer().weight
        if adapter_names:
            check_full_weight(weight, "merging a SUBNET adapter")
        for name in adapter_names:
            if name not in self.subnet_values:
                continue
            if name in self._awaiting_masks:
                raise RuntimeError(f"adapter {name!r} has no masks loaded yet; nothing to merge.")
            values = self.subnet_values[name].detach()
            if safe_merge:
                # Check the merged entries, not only v: an overflow of W0[I] + v in fp16 is just as broken.
                indices = self.subnet_indices[name]
                merged = (weight.detach().reshape(-1)[indices].to(values.dtype) + values).to(weight.dtype)
                if not torch.isfinite(merged).all():
                    raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
            with torch.no_grad():
                self._merge_backup[name] = ops.merge_subnet_(weight.data, self.subnet_indices[name], values)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Restore the entries the merged adapters overwrote, newest first (bit-exact)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        weight = self.get_base_layer().weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            with torch.no_grad():
                ops.unmerge_subnet_(weight.data, self.subnet_indices[name], self._merge_backup.pop(name))

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._awaiting_masks.discard(adapter_name)


class Linear(nn.Module, SubnetLayer):
    """Subnet layer around ``nn.Linear`` or GPT-2's ``Conv1D`` (weight stored ``(in, out)``)."""

    def __init__(self, base_layer, adapter_name: str, indices, init_weights: bool = True, seed: int = 0, **kwargs):
        super().__init__()
        SubnetLayer.__init__(self, base_layer, **kwargs)
        self.fan_in_fan_out = isinstance(self.get_base_layer(), Conv1D)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, indices, init_weights=init_weights, seed=seed)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        names = self._subnets_to_apply()
        if not names:
            return self.base_layer(x, *args, **kwargs)
        base = self.get_base_layer()
        check_full_weight(base.weight, "the SUBNET forward (it adds the values into the weight in place)")
        return ops.subnet_linear(
            x,
            base.weight,
            base.bias,
            [self.subnet_indices[n] for n in names],
            [self.subnet_values[n] for n in names],
            fan_in_fan_out=self.fan_in_fan_out,
        )

    def _mixed_batch_forward(self, x: torch.Tensor, *args, adapter_names: list[str], **kwargs) -> torch.Tensor:
        """Row ``i`` with adapter ``adapter_names[i]`` only (``"__base__"``: the base layer alone)."""
        groups = self._mixed_sub_batches(x, adapter_names)
        result = self.base_layer(x, *args, **kwargs)
        base = self.get_base_layer()
        for name, rows in groups.items():
            out = ops.subnet_linear(
                x[rows],
                base.weight,
                base.bias,
                [self.subnet_indices[name]],
                [self.subnet_values[name]],
                fan_in_fan_out=self.fan_in_fan_out,
            )
            result[rows] = out.to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "subnet." + super().__repr__()


class Embedding(nn.Module, SubnetLayer):
    """Subnet layer around ``nn.Embedding``; the sparse row gradient is gathered at the mask."""

    def __init__(self, base_layer, adapter_name: str, indices, init_weights: bool = True, seed: int = 0, **kwargs):
        super().__init__()
        SubnetLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, indices, init_weights=init_weights, seed=seed)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        names = self._subnets_to_apply()
        if not names:
            return self.base_layer(x, *args, **kwargs)
        base = self.get_base_layer()
        check_full_weight(base.weight, "the SUBNET forward (it adds the values into the weight in place)")
        # F.embedding's backward needs only the token ids, so the rebuilt weight is freed after forward.
        weight = ops.subnet_weight(base.weight, [(self.subnet_indices[n], self.subnet_values[n]) for n in names])
        return F.embedding(
            x, weight, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse
        )

    def _mixed_batch_forward(self, x: torch.Tensor, *args, adapter_names: list[str], **kwargs) -> torch.Tensor:
        """Row ``i`` with adapter ``adapter_names[i]`` only (``"__base__"``: the base layer alone)."""
        groups = self._mixed_sub_batches(x, adapter_names)
        result = self.base_layer(x, *args, **kwargs)
        base = self.get_base_layer()
        for name, rows in groups.items():
            weight = ops.subnet_weight(base.weight, [(self.subnet_indices[name], self.subnet_values[name])])
            out = F.embedding(
                x[rows], weight, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse
            )
            result[rows] = out.to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "subnet." + super().__repr__()


def subnet_layer_class(module: nn.Module):
    """The subnet layer class for a base module, or None if the module type is not supported."""
    if isinstance(module, (nn.Linear, Conv1D)):
        return Linear
    if isinstance(module, nn.Embedding):
        return Embedding
    return None
