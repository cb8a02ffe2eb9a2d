"""One Q-Tuning step with SGD per scoring mode; launched by the tests on 1 process (2 accumulated micro-batches) or 2.

For each mode in the comma-separated third argument, writes the updated weights and logged loss (rank 0) to
``<out>.<mode>`` and each process's EU-plane records to ``<out>.<mode>.rank<r>.json``.
"""

import json
import os
import sys

import torch.distributed as dist
from distributed_helpers import save_trained_state, shutdown

from peft_trl_testbed import make_mixed_quality_sft, pretrained_toy_model_path, toy_args
from trl_ext import QTuningConfig, QTuningSFTTrainer

out, expected_world, scorings = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(",")
world = int(os.environ.get("WORLD_SIZE", "1"))
assert world == expected_world, f"expected {expected_world} processes, got {world}"
for scoring in scorings:
    args = toy_args(
        QTuningConfig,
        os.path.join(os.path.dirname(out), scoring),
        max_steps=1,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2 // world,
        optim="sgd",
        learning_rate=0.5,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        disable_tqdm=True,
        scoring=scoring,
        sample_keep_ratio=0.5,
        token_keep_ratio=0.5,
    )
    trainer = QTuningSFTTrainer(
        model=pretrained_toy_model_path(), args=args, train_dataset=make_mixed_quality_sft(8, seed=5)
    )
    assert trainer.accelerator.num_processes == world
    trainer.train()
    rank = dist.get_rank() if dist.is_initialized() else 0
    records = [{"ppl": r.ppl.tolist(), "quadrant": r.quadrant.tolist()} for r in trainer.eu_records]
    with open(f"{out}.{scoring}.rank{rank}.json", "w") as f:
        json.dump({"records": records, "log": trainer.state.log_history[0]}, f)
    save_trained_state(trainer, f"{out}.{scoring}")
shutdown()
