"""Run by test_fsdp2.py under ``torchrun --nproc_per_node 2``: 2 optimizer steps of an adapter under FSDP2.

Every rank also trains an unsharded copy on the whole batch (the 1-process reference); rank 0 writes
the largest differences in loss, trained values and base weights to the JSON file given as argv[2].
"""

import copy
import json
import os
import sys

import torch
import torch.distributed as dist
from peft import get_peft_model
from torch.distributed.fsdp import fully_shard

from peft_ext import MoraConfig, SubnetConfig
from peft_trl_testbed.models import build_toy_model

STEPS = 2


def build(method):
    base = build_toy_model(arch="llama", hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    torch.manual_seed(1)
    if method == "subnet":
        config = SubnetConfig(target_modules=["q_proj", "up_proj", "down_proj"], density=0.1, init_weights=False)
    else:
        config = MoraConfig(r=2, target_modules=["q_proj", "up_proj", "down_proj"], init_weights=False)
    return get_peft_model(base, config)


def train(model, batches):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for ids in batches:
        loss = model(input_ids=ids, labels=ids).loss  # equal-length rows: the batch mean is the mean of halves
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
    return losses


def full(tensor):
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def main():
    method, out = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    assert world == 2, f"run with torchrun --nproc_per_node 2 (world size is {world})"
    model = build(method)
    reference = copy.deepcopy(model)
    batches = [torch.randint(5, 60, (4, 12), generator=torch.Generator().manual_seed(s)) for s in range(STEPS)]

    ref_losses = train(reference, batches)

    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    losses = train(model, [ids.chunk(world)[rank] for ids in batches])
    for loss in losses:
        dist.all_reduce(loss)
        loss /= world

    ref_params = dict(reference.named_parameters())
    trained_gap = base_gap = 0.0
    for name, param in model.named_parameters():
        gap = float((full(param.detach()) - ref_params[name].detach()).abs().max())
        if param.requires_grad:
            trained_gap = max(trained_gap, gap)
        else:
            base_gap = max(base_gap, gap)
    moved = max(
        float((ref_params[n].detach() - p.detach()).abs().max())
        for n, p in build(method).named_parameters()
        if p.requires_grad
    )
    # Outside the owning module's forward the weights stay sharded: the tuners must refuse them clearly.
    refusals = {}
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    attempts = {"merge": model.merge_adapter}
    if method == "subnet":  # a MoRA layer calls its (sharded) base layer first, which torch refuses itself
        attempts["forward"] = lambda: layer(torch.randn(3, 32))
    for what, attempt in attempts.items():
        try:
            attempt()
            refusals[what] = None
        except RuntimeError as err:
            refusals[what] = str(err)
    if rank == 0:
        result = {
            "refusals": refusals,
            "losses": [float(x) for x in losses],
            "reference_losses": [float(x) for x in ref_losses],
            "trained_gap": trained_gap,
            "base_gap": base_gap,
            "moved": moved,
        }
        with open(out, "w") as f:
            json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()
    # Skip the interpreter's teardown: a C++ thread alive as it unloads modules can abort a finished worker.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
