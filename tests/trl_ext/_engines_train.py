"""One SGD step of every trainer and tuner under one engine; launched by test_engines.py on 2 CPU processes.

Usage: ``torchrun --nproc_per_node 2 _engines_train.py OUT_DIR ddp,zero2,zero3,fsdp2 [METHODS]``: the engines run
one after the other in the same processes, each method on the same seeded data. For each engine and method,
rank 0 writes ``OUT_DIR/<engine>/<method>.safetensors``: the trained parameters after the step (gathered from
the engine's shards) and the logged loss, and under ddp also ``<method>.init.safetensors`` (the parameters
before it). Under zero3 it also writes ``zero3_init.safetensors``/``.json`` (the adapters built on models
loaded under ZeRO-3 init, and the tuners' refusal to merge partitioned weights) and, for the tuners, the
adapter that ``Trainer.save_model`` wrote, the refusal of a direct ``save_pretrained`` of partitions, and the
weights that TRL's vLLM weight sync pushes (``<method>_vllm.safetensors``).
"""

import json
import os
import sys

import torch
import torch.distributed as dist
from distributed_helpers import check_engine, configure_engine, engine_args, shutdown
from safetensors.torch import save_file
from trl import SFTConfig, SFTTrainer
from vllm_helpers import pushed_weights

from peft_ext import MoraConfig, SubnetConfig
from peft_trl_testbed import (
    make_arithmetic_dataset,
    make_mixed_quality_sft,
    make_reasoning_preferences,
    pretrained_toy_model_path,
    toy_args,
    toy_model_path,
)
from trl_ext import (
    PrefixGrouperGRPOConfig,
    PrefixGrouperGRPOTrainer,
    PrefixSharingDPOConfig,
    PrefixSharingDPOTrainer,
    QTuningConfig,
    QTuningSFTTrainer,
    REDIConfig,
    REDITrainer,
)

GPT2 = dict(arch="gpt2", hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
MORA = dict(r=2, target_modules=["c_attn", "c_proj", "c_fc"])  # GPT-2's Conv1D layers
SUBNET = dict(mask_source="magnitude", density=0.05, target_modules=["q_proj", "up_proj", "down_proj"])
ZERO3_MODELS = {"llama": {}, "gpt2": GPT2}
ZERO3_TUNERS = {
    "mora": lambda arch: MoraConfig(
        r=2, target_modules=["c_attn", "c_fc"] if arch == "gpt2" else ["q_proj", "up_proj"]
    ),
    "subnet": lambda arch: SubnetConfig(
        mask_source="magnitude",
        density=0.05,
        target_modules=["c_attn", "c_fc"] if arch == "gpt2" else ["q_proj", "up_proj"],
    ),
}


def distinct_characters(completions, **kwargs):
    """A reward that differs between the random toy model's samples, so that every group has advantages."""
    return [float(len(set(c))) for c in completions]


def build(method, engine, out_dir):
    """The trainer of ``method``; every model is passed by path, so ZeRO-3 loads it partitioned."""
    common = dict(
        max_steps=1,
        optim="sgd",
        learning_rate=0.5,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        disable_tqdm=True,
        **engine_args(engine),
    )
    out = os.path.join(out_dir, method)
    if method == "prefix_grouper":
        args = toy_args(
            PrefixGrouperGRPOConfig,
            out,
            per_device_train_batch_size=4,
            num_generations=4,
            max_completion_length=6,
            disable_dropout=True,
            beta=0.0,
            model_init_kwargs={"dtype": torch.float32},
            **common,
        )
        return PrefixGrouperGRPOTrainer(
            model=toy_model_path(),
            reward_funcs=distinct_characters,
            args=args,
            train_dataset=make_arithmetic_dataset(8, seed=3),
        )
    if method == "redi":
        args = toy_args(REDIConfig, out, per_device_train_batch_size=2, **common)
        return REDITrainer(
            model=pretrained_toy_model_path(), args=args, train_dataset=make_reasoning_preferences(4, seed=5)
        )
    if method == "prefix_sharing_dpo":  # automatic: ZeRO-3's partitioned weights fall back to the stock forward
        args = toy_args(
            PrefixSharingDPOConfig,
            out,
            per_device_train_batch_size=2,
            prefix_sharing=None,
            prefix_sharing_min_prompt_ratio=0.0,
            **common,
        )
        return PrefixSharingDPOTrainer(
            model=pretrained_toy_model_path(), args=args, train_dataset=make_reasoning_preferences(4, seed=5)
        )
    if method == "qtuning":  # 2 accumulated micro-batches of 2 per process: the window normalisation matters
        args = toy_args(
            QTuningConfig,
            out,
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
            sample_keep_ratio=0.5,
            token_keep_ratio=0.5,
            **common,
        )
        return QTuningSFTTrainer(
            model=pretrained_toy_model_path(), args=args, train_dataset=make_mixed_quality_sft(8, seed=5)
        )
    args = toy_args(SFTConfig, out, per_device_train_batch_size=2, **common)
    if method == "sft_mora":
        model, peft_config = toy_model_path(**GPT2), MoraConfig(**MORA)
    else:
        model, peft_config = pretrained_toy_model_path(), SubnetConfig(**SUBNET)
    return SFTTrainer(model=model, args=args, train_dataset=make_mixed_quality_sft(8, seed=5), peft_config=peft_config)


def trainable(trainer) -> dict:
    """Full values of the trained parameters (gathered from ZeRO-3 or FSDP2 shards), on every rank's call."""
    model = trainer.accelerator.unwrap_model(trainer.model_wrapped)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    state = trainer.accelerator.get_state_dict(trainer.model_wrapped)  # a collective: every rank calls it
    if dist.get_rank() != 0:
        return {}
    missing = names - set(state)
    assert not missing, f"parameters missing from the gathered state dict: {sorted(missing)[:3]}"
    return {n: state[n].detach().float().cpu().contiguous() for n in names}


def zero3_init_adapters(out_dir):
    """Adapters on models loaded under ZeRO-3 init (built full-size from ``ds_shape``; the engine partitions them
    later), and the refusal to merge into partitioned base weights."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, TrainingArguments
    from transformers.integrations import is_deepspeed_zero3_enabled

    from peft_ext._sharding import full_shape

    args = TrainingArguments(
        os.path.join(out_dir, "zero3_init"), report_to="none", **engine_args("zero3")
    )  # ZeRO-3 init on
    assert is_deepspeed_zero3_enabled()
    tensors, info = {}, {}
    for arch, sizes in ZERO3_MODELS.items():
        path = toy_model_path(**sizes) if sizes else pretrained_toy_model_path()
        for tuner, make_config in ZERO3_TUNERS.items():
            base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            weight = base.get_output_embeddings().weight
            assert weight.numel() == 0 and hasattr(weight, "ds_shape"), "the model was not loaded under ZeRO-3 init"
            model = get_peft_model(base, make_config(arch))
            key = f"{arch}/{tuner}"
            info[key] = {"shapes": {n: list(full_shape(p)) for n, p in model.named_parameters() if p.requires_grad}}
            for name, buffer in model.named_buffers():
                if "subnet_indices" in name:
                    tensors[f"{key}/{name}"] = buffer.cpu().contiguous()
            try:  # the base weights are partitioned: merging must be refused
                model.merge_adapter()
                info[key]["merge"] = None
            except RuntimeError as err:
                info[key]["merge"] = str(err)
    del args
    if dist.get_rank() == 0:
        save_file(tensors, os.path.join(out_dir, "zero3_init.safetensors"))
        with open(os.path.join(out_dir, "zero3_init.json"), "w") as f:
            json.dump(info, f)


def mora_recipe(out_dir):
    """``recipes.mora_sft`` from its command line under ZeRO-3: evaluation and the update's rank need gathers."""
    from recipes import mora_sft

    files = {}
    for name, value in engine_args("zero3").items():
        files[name] = os.path.join(out_dir, f"recipe_{name}.json")
        with open(files[name], "w") as f:
            json.dump(value, f)
    argv = [
        "--output_dir",
        os.path.join(out_dir, "mora_recipe"),
        "--max_steps",
        "2",
        "--num_eval_prompts",
        "8",
        "--per_device_train_batch_size",
        "2",
        "--mora_r",
        "4",
        "--report_to",
        "none",
        "--disable_tqdm",
        "true",
        "--save_strategy",
        "no",
        "--deepspeed",
        files["deepspeed"],
        "--accelerator_config",
        files["accelerator_config"],
    ]
    results = mora_sft.main(*mora_sft.make_parser().parse_args_and_config(args=argv))
    if dist.get_rank() == 0:
        keys = ("accuracy_before", "accuracy_after", "update_rank", "lora_rank_same_params", "trainable_params")
        with open(os.path.join(out_dir, "mora_recipe.json"), "w") as f:
            json.dump({k: results[k] for k in keys}, f)


METHODS = ["prefix_grouper", "prefix_sharing_dpo", "redi", "qtuning", "sft_mora", "sft_subnet"]


def train_one(method, engine, out_dir):
    trainer = build(method, engine, out_dir)
    if engine == "ddp":
        init = {n: p.detach().float().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        if dist.get_rank() == 0:
            save_file(init, os.path.join(out_dir, f"{method}.init.safetensors"))
    torch.manual_seed(1)  # the same sampling stream for GRPO's generations on every engine
    trainer.train()
    check_engine(trainer, engine)
    if method == "prefix_sharing_dpo":  # packed where the weights were whole when built; stock under ZeRO-3
        packed = trainer.state.log_history[0].get("prefix_sharing/packed_forwards")
        assert packed == (None if engine == "zero3" else 1.0), (engine, packed)
    state = trainable(trainer)
    if dist.get_rank() == 0:
        state["loss"] = torch.tensor([trainer.state.log_history[0]["loss"]])
        save_file(state, os.path.join(out_dir, f"{method}.safetensors"))
    if engine == "zero3" and method.startswith("sft_"):
        trainer.save_model(os.path.join(out_dir, f"{method}_adapter"))  # gathers the partitioned adapter
        # TRL's vLLM weight sync (gather, merge, read, unmerge); the engine's weights must be as before after it.
        before = trainer.accelerator.get_state_dict(trainer.model_wrapped)
        pushed = pushed_weights(trainer.model, trainer.accelerator)
        after = trainer.accelerator.get_state_dict(trainer.model_wrapped)
        still_merged = [n for n, m in trainer.model.named_modules() if getattr(m, "merged", False)]
        if dist.get_rank() == 0:
            save_file(pushed, os.path.join(out_dir, f"{method}_vllm.safetensors"))
            gap = max(float((after[k] - before[k]).abs().max()) for k in before)
            with open(os.path.join(out_dir, f"{method}_vllm.json"), "w") as f:
                json.dump({"still_merged": still_merged, "state_gap": gap}, f)
        try:
            trainer.model.save_pretrained(os.path.join(out_dir, f"{method}_direct"))  # partitions: refused
            refusal = None
        except RuntimeError as err:
            refusal = str(err)
        if dist.get_rank() == 0:
            with open(os.path.join(out_dir, f"{method}_direct_save.json"), "w") as f:
                json.dump({"refusal": refusal}, f)
    trainer.accelerator.free_memory()


def main():
    root, engines = sys.argv[1], sys.argv[2].split(",")
    methods = sys.argv[3].split(",") if len(sys.argv) > 3 else METHODS
    for engine in engines:
        out_dir = os.path.join(root, engine)
        os.makedirs(out_dir, exist_ok=True)
        for method in methods:
            configure_engine(engine)
            train_one(method, engine, out_dir)
        if engine == "zero3":
            configure_engine(engine)
            zero3_init_adapters(out_dir)
            configure_engine(engine)
            mora_recipe(out_dir)
    shutdown()


if __name__ == "__main__":
    main()
