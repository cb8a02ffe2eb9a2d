"""One DPO step with SGD in 2 processes, stock or prefix-shared; saves the weights before and after.

Launched by ``test_prefix_sharing_trainer.py``; asserts the world size, accelerate's distributed type and the DDP
wrapper inside the run, so a run that silently fell back to one process cannot pass.
"""

import os
import sys

import torch
from accelerate.utils import DistributedType
from distributed_helpers import save_trained_state, shutdown
from prefix_grouper_helpers import sharpen_, tiny_model
from safetensors.torch import load_file, save_file
from test_prefix_sharing_trainer import long_prompts
from transformers import TrainerCallback

from peft_trl_testbed import build_toy_tokenizer, toy_args
from trl_ext import PrefixSharingDPOConfig, PrefixSharingDPOTrainer

out, mode = sys.argv[1], sys.argv[2]
world = int(os.environ.get("WORLD_SIZE", "1"))
assert world == 2, f"expected 2 processes, got {world}"


class CheckWrapper(TrainerCallback):
    def on_step_begin(self, args, state, control, model=None, **kwargs):
        assert isinstance(trainer.model_wrapped, torch.nn.parallel.DistributedDataParallel), type(
            trainer.model_wrapped
        )


args = toy_args(
    PrefixSharingDPOConfig,
    os.path.dirname(out),
    max_steps=1,
    per_device_train_batch_size=2,
    optim="sgd",
    learning_rate=1000.0,
    lr_scheduler_type="constant",
    max_grad_norm=0.0,
    disable_tqdm=True,
    prefix_sharing=mode == "shared",
    prefix_sharing_min_prompt_ratio=0.0,
)
model = tiny_model("llama", num_key_value_heads=2)
trainer = PrefixSharingDPOTrainer(
    model=model,
    ref_model=sharpen_(tiny_model("llama", num_key_value_heads=2), seed=7),
    args=args,
    train_dataset=long_prompts(4),
    processing_class=build_toy_tokenizer(),
    callbacks=[CheckWrapper()],
)
assert trainer.accelerator.num_processes == 2
assert trainer.accelerator.distributed_type == DistributedType.MULTI_CPU, trainer.accelerator.distributed_type
before = {n: p.detach().clone().contiguous() for n, p in trainer.model.named_parameters()}
trainer.train()
save_trained_state(trainer, out)
if trainer.accelerator.is_main_process:
    save_file(before, os.path.join(os.path.dirname(out), "before.safetensors"))
    packed = trainer.state.log_history[0].get("prefix_sharing/packed_forwards", 0.0)
    state = load_file(out)
    state["packed"] = torch.tensor([packed])
    save_file(state, out)
shutdown()
