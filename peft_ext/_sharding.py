"""Guards for tuner code that needs a layer's full (unsharded) base weight."""

from __future__ import annotations

import torch

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch build without distributed support
    DTensor = ()


def check_full_weight(weight: torch.Tensor, what: str) -> None:
    """Refuse a sharded (DTensor) base weight, which in-place and dense updates cannot address correctly."""
    if isinstance(weight, DTensor):
        raise RuntimeError(
            f"{what} needs the full base weight, but it is a sharded DTensor (placements {weight.placements}). "
            "With FSDP2, call the model through the fully_shard-ed module that owns this layer (its forward gathers "
            "the weights); merge before sharding, or on a full state dict (torch.distributed.checkpoint.state_dict."
            "get_model_state_dict with StateDictOptions(full_state_dict=True))."
        )
