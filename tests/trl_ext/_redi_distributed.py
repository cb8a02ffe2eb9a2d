"""Run one REDI step with SGD and save the updated weights; launched by the tests (1 or 2 processes)."""

import os
import sys

from distributed_helpers import save_trained_state, shutdown

from peft_trl_testbed import make_reasoning_preferences, pretrained_toy_model_path, toy_args
from trl_ext import REDIConfig, REDITrainer

out, expected_world = sys.argv[1], int(sys.argv[2])
world = int(os.environ.get("WORLD_SIZE", "1"))
assert world == expected_world, f"expected {expected_world} processes, got {world}"
per_device = 4 // world
args = toy_args(
    REDIConfig,
    os.path.dirname(out),
    max_steps=1,
    per_device_train_batch_size=per_device,
    optim="sgd",
    learning_rate=0.5,
    lr_scheduler_type="constant",
    max_grad_norm=0.0,
    disable_tqdm=True,
)
trainer = REDITrainer(
    model=pretrained_toy_model_path(), args=args, train_dataset=make_reasoning_preferences(4, seed=5)
)
assert trainer.accelerator.num_processes == world
trainer.train()
save_trained_state(trainer, out)
shutdown()
