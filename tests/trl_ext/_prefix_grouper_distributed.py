"""Loss and gradients of one GRPO batch split over the launched processes; launched by the tests (1 or 2 processes).

Usage: ``torchrun --nproc_per_node 2 _prefix_grouper_distributed.py OUT.safetensors 2`` (or ``python ... 1``).
The 8-row global batch interleaves three prompt groups, so each process's half holds partial groups.
"""

import os
import sys
import tempfile
from pathlib import Path

import torch.distributed as dist
from distributed_helpers import shutdown
from prefix_grouper_helpers import make_batch, make_trainer
from safetensors.torch import save_file

out, expected_world = sys.argv[1], int(sys.argv[2])
world = int(os.environ.get("WORLD_SIZE", "1"))
assert world == expected_world, f"expected {expected_world} processes, got {world}"

batch = make_batch(seed=11, rows="aabcbcab")
rows = batch["prompt_ids"].size(0)
results = {}
for grouped in (False, True):
    trainer = make_trainer(
        grouped, Path(tempfile.mkdtemp()), per_device_train_batch_size=rows // world, loss_type="dapo", beta=0.0
    )
    accelerator = trainer.accelerator
    assert accelerator.num_processes == world
    if world > 1:
        assert dist.is_initialized() and dist.get_world_size() == world and dist.get_backend() == "gloo"
    model = accelerator.prepare(trainer.model)  # DistributedDataParallel under several processes
    rank = accelerator.process_index
    local = {k: v[rank * rows // world : (rank + 1) * rows // world] if v.dim() else v for k, v in batch.items()}
    loss = trainer.compute_loss(model, local)
    accelerator.backward(loss)  # DDP averages the gradients over the processes
    name = "grouped" if grouped else "stock"
    # Each process's dapo loss is normalised by num_items_in_batch / num_processes: their mean is the global loss
    results[f"{name}/loss"] = accelerator.reduce(loss.detach(), reduction="mean").reshape(1)
    for param_name, param in accelerator.unwrap_model(model).named_parameters():
        results[f"{name}/grad/{param_name}"] = param.grad.detach().contiguous()
    accelerator.free_memory()

if world == 1 or dist.get_rank() == 0:
    save_file(results, out)
shutdown()
