"""The MoRA tuner layer: one square matrix M per adapter around a linear layer."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from .._mixed_batch import BASE, check_layer_adapter_names, sub_batches
from .._quantized import add_to_weight_, describe, float_dtype, quantization_format
from .._sharding import check_full_weight, full_shape
from .config import MoraConfig
from .ops import mora_delta_weight, mora_delta_y, mora_rank, num_chunks, resolve_mora_type, rope_cos_sin

SUPPORTED_LAYERS = (nn.Linear, Conv1D)


def layer_shape(base_layer: nn.Module) -> tuple[int, int, bool]:
    """``(in_features, out_features, fan_in_fan_out)`` of a supported layer, else a ``TypeError``."""
    if isinstance(base_layer, nn.Linear):
        return base_layer.in_features, base_layer.out_features, False
    if isinstance(base_layer, Conv1D):  # weight is (in_features, out_features); partitioned under ZeRO-3 init
        in_features, out_features = full_shape(base_layer.weight)
        return in_features, out_features, True
    raise TypeError(
        f"MoRA cannot adapt a {type(base_layer).__name__}; it supports torch.nn.Linear and transformers Conv1D. "
        "Remove this module from target_modules (or add it to exclude_modules)."
    )


class MoraLayer(BaseTunerLayer):
    """Adapter state of MoRA on one layer, for any number of named adapters.

    Per adapter: ``mora_M[name]``, the only trainable tensor (r_hat x r_hat, zeros at init);
    ``r`` (LoRA-equivalent rank), ``mora_r_hat`` and ``mora_type``; and a dropout. RoPE tables
    for ``rotation`` are cached per adapter, dtype and device, outside the state dict. With
    ``exact_unmerge``, the base weight before a merge is kept until the unmerge restores it.
    """

    adapter_layer_names = ("mora_M",)
    other_param_names = ("r", "mora_r_hat", "mora_type", "mora_dropout", "mora_rope_cache", "mora_exact_unmerge")

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.mora_r_hat: dict[str, int] = {}
        self.mora_type: dict[str, str] = {}
        self.mora_dropout = nn.ModuleDict({})
        self.mora_M = nn.ParameterDict({})
        self.mora_rope_cache: dict[str, dict[tuple, tuple[torch.Tensor, torch.Tensor]]] = {}
        self.mora_exact_unmerge: dict[str, bool] = {}
        self._mora_merge_backup: dict[str, torch.Tensor] = {}  # base weight before merging an exact_unmerge adapter
        self._disable_adapters = False
        self.merged_adapters = []
        self.kwargs = kwargs
        self.in_features, self.out_features, self.fan_in_fan_out = layer_shape(self.get_base_layer())

    def update_layer(self, adapter_name: str, config: MoraConfig, inference_mode: bool = False, **kwargs) -> None:
        """Add (or re-create) adapter ``adapter_name`` with the sizes and operator of ``config``."""
        mora_type = resolve_mora_type(config.mora_type)
        r_hat = mora_rank(self.in_features, self.out_features, config.r, mora_type)
        self.r[adapter_name] = config.r
        self.mora_r_hat[adapter_name] = r_hat
        self.mora_type[adapter_name] = mora_type
        exact_unmerge = bool(getattr(config, "exact_unmerge", False))
        if exact_unmerge and quantization_format(self.get_base_layer()) is not None:
            raise ValueError(
                f"exact_unmerge=True cannot restore a quantised {describe(self.get_base_layer())} bit for bit (its "
                "quantisation state changes when the merge quantises again); set exact_unmerge=False for a quantised "
                "base."
            )
        self.mora_exact_unmerge[adapter_name] = exact_unmerge
        self.mora_dropout[adapter_name] = nn.Dropout(config.mora_dropout) if config.mora_dropout > 0 else nn.Identity()
        weight = torch.zeros(r_hat, r_hat)
        if not config.init_weights:
            nn.init.normal_(weight, std=1.0 / r_hat)
        self.mora_M[adapter_name] = nn.Parameter(weight)
        self.mora_rope_cache.pop(adapter_name, None)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _rope(self, adapter_name: str, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Cached (cos, sin) of a rotation adapter in the dtype and device of ``like``; None otherwise."""
        if self.mora_type[adapter_name] != "rotation":
            return None
        r_hat = self.mora_r_hat[adapter_name]
        cache = self.mora_rope_cache.setdefault(adapter_name, {})
        key = (r_hat, like.dtype, like.device)
        if key not in cache:
            cache[key] = rope_cos_sin(r_hat, num_chunks(self.in_features, r_hat), dtype=like.dtype, device=like.device)
        return cache[key]

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """Dense update of ``adapter_name`` in the layout and dtype of the base weight.

        Half-precision weights on CPU are computed in float32 (slow or missing half kernels).
        """
        M = self.mora_M[adapter_name]
        dtype = float_dtype(self.get_base_layer())  # a quantised weight's dequantised dtype
        if M.device.type == "cpu" and M.dtype in (torch.float16, torch.bfloat16):
            M = M.float()
        delta = mora_delta_weight(M, self.in_features, self.out_features, self.mora_type[adapter_name])
        if self.fan_in_fan_out:
            delta = delta.T
        return delta.to(dtype)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the active (or the named) adapters' delta to the base weight.

        For an adapter with ``exact_unmerge``, the base weight is copied first, so that :meth:`unmerge`
        restores it bit for bit.

        Args:
            safe_merge (`bool`): merge into a copy first and raise if the result is not finite.
            adapter_names (`list[str]`, *optional*): adapters to merge; all active ones if None.
        """
        for name in check_adapters_to_merge(self, adapter_names):
            if name not in self.mora_M:
                continue
            weight = self.get_base_layer().weight
            check_full_weight(weight, "merging a MoRA adapter")
            delta = self.get_delta_weight(name)
            if quantization_format(self.get_base_layer()) is not None:  # dequantise, add, quantise again
                add_to_weight_(self.get_base_layer(), delta, safe_merge, name)
                self.merged_adapters.append(name)
                continue
            if safe_merge:
                merged = weight.data + delta
                if not torch.isfinite(merged).all():  # PEFT's wording: M may be finite and the sum overflow
                    raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
            if self.mora_exact_unmerge.get(name):
                self._mora_merge_backup[name] = weight.detach().clone()
            if safe_merge:
                weight.data = merged
            else:
                weight.data += delta
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Undo every merge, newest first: restore the saved base weight (``exact_unmerge``, bit-exact) or
        subtract the adapter's delta again (exact up to rounding in the weight's dtype)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        weight = self.get_base_layer().weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            backup = self._mora_merge_backup.pop(name, None)
            if backup is not None:
                with torch.no_grad():
                    weight.data.copy_(backup)
            elif name in self.mora_M:
                self._add_to_base_weight(-self.get_delta_weight(name))

    def _add_to_base_weight(self, delta: torch.Tensor) -> None:
        base = self.get_base_layer()
        if quantization_format(base) is not None:
            add_to_weight_(base, delta)
        else:
            base.weight.data += delta

    @torch.no_grad()
    def merge_and_reset(self, adapter_name: str, mora_type: str | int | None = None) -> None:
        """ReMoRA restart: fold M into the base weight for good, set M to zero, optionally switch operator.

        Unlike [`merge`], nothing is recorded as merged: the base weight now carries the update and
        the adapter starts again from zero. The new operator must keep r_hat (M's shape) unchanged.
        """
        if adapter_name in self.merged_adapters:
            raise ValueError(f"Adapter {adapter_name!r} is merged; call unmerge() before merge_and_reset.")
        check_full_weight(self.get_base_layer().weight, "MoRA's merge_and_reset")
        self._add_to_base_weight(self.get_delta_weight(adapter_name))
        self.mora_M[adapter_name].zero_()
        if mora_type is None:
            return
        mora_type = resolve_mora_type(mora_type)
        r_hat = mora_rank(self.in_features, self.out_features, self.r[adapter_name], mora_type)
        if r_hat != self.mora_r_hat[adapter_name]:
            raise ValueError(
                f"Switching adapter {adapter_name!r} from mora_type={self.mora_type[adapter_name]!r} to "
                f"{mora_type!r} would change r_hat from {self.mora_r_hat[adapter_name]} to {r_hat}; switch between "
                "operators of the same size (e.g. 'sharing' <-> 'group_interleave')."
            )
        self.mora_type[adapter_name] = mora_type


class MoraLinear(nn.Module, MoraLayer):
    """MoRA on an ``nn.Linear`` or a transformers ``Conv1D`` (whose weight is stored transposed).

    Example:
        ```py
        >>> import torch
        >>> from peft_ext.mora.config import MoraConfig
        >>> from peft_ext.mora.layer import MoraLinear
        >>> layer = MoraLinear(torch.nn.Linear(32, 16), "default", MoraConfig(r=2, mora_type="sharing"))
        >>> layer.mora_M["default"].shape  # r_hat = floor(sqrt((32 + 16) * 2))
        torch.Size([9, 9])
        ```
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: MoraConfig, **kwargs) -> None:
        super().__init__()
        MoraLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, **kwargs)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        for name in self.active_adapters:
            if name not in self.mora_M:
                continue
            result = result + self._adapter_delta(name, x).to(result.dtype)
        return result

    def _adapter_delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        M = self.mora_M[name]
        h = self._cast_input_dtype(self.mora_dropout[name](x), M.dtype)
        return mora_delta_y(h, M, self.out_features, self.mora_type[name], self._rope(name, M))

    def _mixed_batch_forward(
        self, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any
    ) -> torch.Tensor:
        """Row ``i`` with adapter ``adapter_names[i]`` only (``"__base__"``: the base layer alone)."""
        check_layer_adapter_names(self, x, adapter_names, "MoRA")
        # A copy: quantised base layers may return a view made under no_grad, which autograd forbids editing
        result = self.base_layer(x, *args, **kwargs).clone()
        for name, rows in sub_batches(adapter_names, device=x.device).items():
            if name == BASE or name not in self.mora_M:
                continue
            result[rows] = result[rows] + self._adapter_delta(name, x[rows]).to(result.dtype)
        return result

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Fail with the cause and the fix instead of torch's bare "size mismatch".
        for name, param in self.mora_M.items():
            key = f"{prefix}mora_M.{name}"
            if key in state_dict and state_dict[key].shape != param.shape:
                saved = tuple(state_dict[key].shape)
                raise ValueError(
                    f"Cannot load MoRA weight {key!r}: the checkpoint has M of shape {saved}, but this "
                    f"{self.in_features}->{self.out_features} layer with r={self.r[name]}, "
                    f"mora_type={self.mora_type[name]!r} needs {tuple(param.shape)}. The adapter was saved with "
                    "another r or mora_type, or trained on a base model with different layer sizes; load it with its "
                    "own adapter_config.json onto the base model named by base_model_name_or_path there, or pass "
                    "ignore_mismatched_sizes=True to skip these weights."
                )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def __repr__(self) -> str:
        return "mora." + super().__repr__()
