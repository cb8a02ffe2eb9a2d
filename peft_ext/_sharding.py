"""Layer weights under the sharding engines: their full shape, and guards for code that needs the full tensor.

Two engines hand a tuner a weight that is not the full tensor:

- FSDP2 (``fully_shard``): a ``DTensor``; ``.shape`` is the full shape, the local data is a shard.
- DeepSpeed ZeRO-3: a parameter whose data is an empty (or partial) tensor outside the owning module's
  forward; the full shape and size are in ``ds_shape`` and ``ds_numel``. Models loaded under ZeRO-3
  init (``from_pretrained`` with a ZeRO-3 config) are partitioned before any tuner sees them.

Adapter tensors are built from :func:`full_shape` and :func:`full_numel` at their full size; the engine
then partitions them like any other parameter.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch build without distributed support
    DTensor = ()


def full_shape(weight: torch.Tensor) -> tuple[int, ...]:
    """Shape of the whole weight, also while DeepSpeed ZeRO-3 holds only a partition of it."""
    shape = getattr(weight, "ds_shape", None)
    return tuple(shape) if shape is not None else tuple(weight.shape)


def full_numel(weight: torch.Tensor) -> int:
    """Number of elements of the whole weight (see :func:`full_shape`)."""
    numel = getattr(weight, "ds_numel", None)
    return int(numel) if numel is not None else weight.numel()


def is_zero3_partitioned(weight: torch.Tensor) -> bool:
    """True for a DeepSpeed ZeRO-3 parameter whose full data is not gathered right now."""
    return hasattr(weight, "ds_numel") and weight.numel() != weight.ds_numel


def check_full_weight(weight: torch.Tensor, what: str) -> None:
    """Refuse a sharded base weight (FSDP2 ``DTensor`` or a partitioned ZeRO-3 parameter) for ``what``."""
    if isinstance(weight, DTensor):
        raise RuntimeError(
            f"{what} needs the full base weight, but it is a sharded DTensor (placements {weight.placements}). "
            "With FSDP2, call the model through the fully_shard-ed module that owns this layer (its forward gathers "
            "the weights); merge before sharding, or on a full state dict (torch.distributed.checkpoint.state_dict."
            "get_model_state_dict with StateDictOptions(full_state_dict=True))."
        )
    if is_zero3_partitioned(weight):
        raise RuntimeError(
            f"{what} needs the full base weight, but DeepSpeed ZeRO-3 holds only a partition of it here "
            f"({weight.numel()} of {weight.ds_numel} elements, full shape {full_shape(weight)}). Call the model "
            "through the DeepSpeed engine (its forward gathers the weights), or do this inside "
            "`with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0):` "
            "(as TRL does before merging adapters for vLLM); or merge on the full state dict that "
            "Trainer.save_model writes with stage3_gather_16bit_weights_on_model_save=true."
        )


def raise_partitioned_save(key: str, tensor: torch.Tensor, expected: tuple[int, ...]) -> None:
    """Refuse to save an adapter tensor that is not whole (a ZeRO-3 partition read outside a gather)."""
    raise RuntimeError(
        f"Cannot save {key!r}: the state dict holds a tensor of shape {tuple(tensor.shape)} where the adapter has "
        f"{expected}. Under DeepSpeed ZeRO-3 the parameters are partitioned; save with Trainer.save_model (with "
        "stage3_gather_16bit_weights_on_model_save=true), or pass the gathered state dict: "
        "model.save_pretrained(path, state_dict=accelerator.get_state_dict(deepspeed_engine))."
    )


@contextmanager
def gathered_weight(weight: torch.Tensor):
    """Yield the full value of ``weight`` (read-only): gathered under ZeRO-3, ``full_tensor()`` of a DTensor."""
    if isinstance(weight, DTensor):
        yield weight.full_tensor()
    elif is_zero3_partitioned(weight):
        import deepspeed  # only reachable when DeepSpeed partitioned the weight

        with deepspeed.zero.GatheredParameters([weight]):
            yield weight.data
    else:
        yield weight
