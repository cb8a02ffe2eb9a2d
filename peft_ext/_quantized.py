"""Quantised base layers: which ones a tuner can adapt, their dense weight, and merging into them.

A quantised layer keeps its own forward (the tuner adds its update to the layer's output), so the
only places that need the dense weight are merging and the checks before it. Supported formats:

- bitsandbytes 4-bit (``Linear4bit``: nf4 or fp4, with or without double quantisation): ``"bnb_4bit"``;
- bitsandbytes 8-bit (``Linear8bitLt``, LLM.int8): ``"bnb_8bit"``;
- torchao int8 weight-only (``Int8WeightOnlyConfig``: an ``Int8Tensor`` weight, no activation
  quantisation), per row or per tensor: ``"torchao_int8"``.

Merging dequantises the weight, adds the update and quantises the sum again in the same format, as
PEFT's LoRA does; the result carries that format's rounding error, so unmerging is not bit-exact.
Anything else that is quantised (other torchao formats, integer weights of other libraries) is
refused when the adapter is created, naming the layer type and the supported formats.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ._compat import unpack_cpu_4bit_weight, was_repacked_4bit

QUANTIZED_FORMATS = ("bnb_4bit", "bnb_8bit", "torchao_int8")
SUPPORTED_TEXT = (
    "bitsandbytes Linear4bit (nf4/fp4, double quant) and Linear8bitLt, and torchao int8 weight-only "
    "(Int8WeightOnlyConfig)"
)


def quantization_format(layer: nn.Module) -> str | None:
    """The quantisation format of ``layer``'s weight: one of :data:`QUANTIZED_FORMATS`, None for a plain
    floating-point weight, or ``"unsupported"`` for any other quantised or integer weight."""
    weight = getattr(layer, "weight", None)
    if weight is None:
        return None
    cls = type(weight)
    if cls.__module__.startswith("bitsandbytes"):
        if cls.__name__ == "Params4bit":
            return "bnb_4bit"
        if cls.__name__ == "Int8Params" and not getattr(weight, "has_fp16_weights", False):
            return "bnb_8bit"
        return "unsupported"
    if cls.__module__.startswith("torchao"):
        plain_int8 = cls.__name__ == "Int8Tensor" and getattr(weight, "act_quant_kwargs", None) is None
        return "torchao_int8" if plain_int8 and _torchao_granularity(weight) is not None else "unsupported"
    if not (weight.is_floating_point() or weight.numel() == 0):
        return "unsupported"
    return None


def quantized_compute_dtypes(model: nn.Module) -> set[torch.dtype]:
    """The dtypes ``model``'s quantised layers compute in; empty for a model without quantised weights.

    A bitsandbytes 4-bit layer computes in its ``compute_dtype`` (its dequantised dtype until one is set), a torchao
    int8 weight-only layer in its weight's float dtype. LLM.int8 (bitsandbytes 8-bit) quantises activations to int8
    in eval mode and on GPUs, and any other integer weight computes in some low precision: bf16 stands for both.
    """
    dtypes = set()
    for module in model.modules():
        fmt = quantization_format(module)
        if fmt == "bnb_4bit":
            if type(module).__module__.startswith("bitsandbytes"):  # not an adapter wrapping the layer
                dtypes.add(module.compute_dtype or module.weight.quant_state.dtype)
        elif fmt == "torchao_int8":
            dtypes.add(module.weight.dtype)
        elif fmt is not None:
            dtypes.add(torch.bfloat16)
        elif any(not param.is_floating_point() for param in module.parameters(recurse=False)):
            dtypes.add(torch.bfloat16)
    return dtypes


def describe(layer: nn.Module) -> str:
    """``Linear4bit (weight Params4bit)``: the layer type and its weight's type, for messages."""
    weight = getattr(layer, "weight", None)
    return f"{type(layer).__name__} (weight {type(weight).__name__}, dtype {getattr(weight, 'dtype', None)})"


def check_adaptable(layer: nn.Module, where: str, tuner: str, formats: tuple[str, ...] = QUANTIZED_FORMATS) -> None:
    """Raise ``TypeError`` if ``layer`` is quantised in a format ``tuner`` does not support (``formats``)."""
    fmt = quantization_format(layer)
    if fmt is None or fmt in formats:
        return
    supported = SUPPORTED_TEXT if formats == QUANTIZED_FORMATS else "no quantised layers (float weights only)"
    raise TypeError(
        f"{tuner} cannot adapt {where!r}: it is a quantised {describe(layer)}. {tuner} supports torch.nn.Linear and "
        f"transformers Conv1D with floating-point weights, and {supported}. Load the base model unquantised (or in a "
        "supported format), or remove this module from target_modules."
    )


def keep_4bit_training_layout(model: nn.Module) -> int:
    """Keep every bitsandbytes 4-bit layer of ``model`` in the layout it trains with, also through eval forwards.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a 4-bit weight for its bf16 inference kernel on the first
    eval-mode forward without gradients, and keeps it repacked. Repacking rounds the weight's block scales to bf16
    (the base model changes), and every later forward runs that kernel, training ones included: it passes no
    gradient to the layer's input, so the adapters of earlier layers silently stop learning. An evaluation, a
    generation in eval mode or a check run before or during training would trigger it.

    This hooks each 4-bit layer so that its forwards always take the path a training forward takes (eval mode
    changes nothing else in a ``Linear4bit``); eval forwards on CPU then skip bitsandbytes' bf16 kernel.
    Idempotent; returns the number of 4-bit layers of ``model``.

    Raises:
        ValueError: if bitsandbytes repacked a layer already, before this call: its weights are no longer the
            ones loaded, and training would start from another base model.

    Example:
        ```py
        >>> keep_4bit_training_layout(model)  # a model loaded with BitsAndBytesConfig(load_in_4bit=True)
        ```
    """
    layers = _bnb_4bit_layers(model)
    repacked = repacked_4bit_layers(model)
    if repacked:
        raise ValueError(
            f"bitsandbytes repacked the weights of {len(repacked)} 4-bit layer(s) (first: {repacked[0]!r}) for its bf16 "
            "CPU inference kernel, on an eval-mode forward or generate() before this model was set up for training. "
            "That rounded their block scales to bf16 for good (saving or unpacking the model does not undo it), so "
            "these are no longer the weights that were loaded; while repacked, they also pass no gradient. Reload the "
            "model, and build the trainer (or the MoRA adapter) before any eval-mode forward, or call "
            "peft_ext.keep_4bit_training_layout(model) right after loading."
        )
    for _, module in layers:
        if not getattr(module, _LAYOUT_KEPT, False):
            module.register_forward_pre_hook(_forward_as_in_training)
            module.register_forward_hook(_restore_mode, always_call=True)
            setattr(module, _LAYOUT_KEPT, True)
    return len(layers)


def repacked_4bit_layers(model: nn.Module) -> list[str]:
    """Names of ``model``'s bitsandbytes 4-bit layers whose weight bitsandbytes repacked for its CPU inference
    kernel (see :func:`keep_4bit_training_layout`), now or earlier: undoing it (as bitsandbytes does when it saves a
    state dict) leaves the block scales rounded to bf16."""
    return [name for name, module in _bnb_4bit_layers(model) if was_repacked_4bit(module.weight.quant_state)]


def _bnb_4bit_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    # bitsandbytes' own layer only: an adapter wrapping it may expose the same weight, and has dropout
    return [
        (name, module)
        for name, module in model.named_modules()
        if type(module).__module__.startswith("bitsandbytes") and quantization_format(module) == "bnb_4bit"
    ]


_LAYOUT_KEPT = "_peft_ext_keeps_4bit_training_layout"
_IN_EVAL = "_peft_ext_forward_in_eval_mode"


def _forward_as_in_training(module: nn.Module, args: tuple) -> None:
    if not module.training:
        module.training = True
        setattr(module, _IN_EVAL, True)


def _restore_mode(module: nn.Module, args: tuple, output) -> None:
    if module.__dict__.pop(_IN_EVAL, False):
        module.training = False


def _torchao_granularity(weight) -> str | None:
    block = tuple(weight.block_size)
    if block == (1, weight.shape[-1]):
        return "per_row"
    if block == tuple(weight.shape):
        return "per_tensor"
    return None


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as a floating-point tensor in its stored layout (dequantised if quantised)."""
    fmt = quantization_format(layer)
    weight = layer.weight
    if fmt is None:
        return weight
    if fmt == "bnb_4bit":
        import bitsandbytes as bnb

        unpack_cpu_4bit_weight(weight)
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    if fmt == "bnb_8bit":
        import bitsandbytes as bnb

        scb = weight.SCB if getattr(layer.state, "SCB", None) is None else layer.state.SCB
        return bnb.functional.int8_vectorwise_dequant(weight.data, scb.to(weight.device))
    if fmt == "torchao_int8":
        return weight.dequantize()
    raise TypeError(f"cannot dequantise the weight of a {describe(layer)}; supported: {SUPPORTED_TEXT}.")


def float_dtype(layer: nn.Module) -> torch.dtype:
    """The dtype the layer's weight has once dequantised (its own dtype for a float weight)."""
    fmt = quantization_format(layer)
    if fmt == "bnb_4bit":
        unpack_cpu_4bit_weight(layer.weight)
        return layer.weight.quant_state.dtype
    if fmt == "bnb_8bit":
        return torch.float16 if layer.weight.device.type == "cuda" else torch.float32
    return layer.weight.dtype


def _torchao_config(weight):
    from torchao.quantization import Int8WeightOnlyConfig, PerRow, PerTensor

    granularity = PerRow() if _torchao_granularity(weight) == "per_row" else PerTensor()
    return Int8WeightOnlyConfig(granularity=granularity)


def check_mergeable(layer: nn.Module, where: str = "layer") -> None:
    """Raise before anything changes if an update cannot be merged into ``layer``'s (quantised) weight."""
    fmt = quantization_format(layer)
    if fmt == "unsupported":
        raise TypeError(f"cannot merge into {where!r}, a {describe(layer)}; supported: {SUPPORTED_TEXT}.")


def replace_dense_weight(layer: nn.Module, dense: torch.Tensor) -> None:
    """Store ``dense`` as ``layer``'s weight, quantised again in the layer's format (plain: copied in place)."""
    fmt = quantization_format(layer)
    weight = layer.weight
    if fmt is None:
        weight.data.copy_(dense.to(weight.dtype))
        return
    check_mergeable(layer)
    device = weight.device
    if fmt == "bnb_4bit":
        import bitsandbytes as bnb

        new = bnb.nn.Params4bit(
            dense.to(float_dtype(layer)).to("cpu"),
            requires_grad=False,
            quant_type=weight.quant_type,
            blocksize=weight.blocksize,
            compress_statistics=weight.compress_statistics,
            quant_storage=weight.quant_storage,
            module=layer,
        )
        layer.weight = new.to(device)  # moving an unquantised Params4bit quantises it
    elif fmt == "bnb_8bit":
        import bitsandbytes as bnb

        new = bnb.nn.Int8Params(dense.to(torch.float16).to("cpu"), requires_grad=False, has_fp16_weights=False)
        layer.weight = new.to(device)  # moving an unquantised Int8Params quantises it
        layer.state.reset_grads()
        layer.state.SCB = None
    else:  # torchao int8 weight-only: quantize_ works on modules, so re-quantise the layer itself
        from torchao.quantization import quantize_

        config = _torchao_config(weight)
        del layer.weight
        layer.weight = nn.Parameter(dense.to(weight.dtype), requires_grad=False)
        quantize_(layer, config)


def add_to_weight_(layer: nn.Module, delta: torch.Tensor, safe_merge: bool = False, adapter: str = "") -> None:
    """``W <- W + delta`` for a quantised layer (dequantise, add, quantise again); refuses a non-finite sum."""
    merged = dense_weight(layer).detach().float() + delta.float()
    if safe_merge and not bool(torch.isfinite(merged).all()):
        raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
    warnings.warn(
        f"Merging into a quantised {type(layer).__name__} re-quantises the merged weight: outputs carry its rounding "
        "error, and unmerging does not restore the original weight bit for bit.",
        stacklevel=3,
    )
    replace_dense_weight(layer, merged)
