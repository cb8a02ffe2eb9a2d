"""Measure the log-prob forward+backward of Prefix Grouper against the stock GRPO trainer.

Both sides run the trainers' own ``_get_per_token_logps_and_entropies`` (TRL's fused LM head,
entropies on) on one synthetic group, a ``P``-token prompt and ``G`` completions of ``R``
tokens, then backpropagate the summed log-probs. Used by ``benchmarks/prefix_grouper_logps.py``
and the quickstart; handy to check the gain on your own model size.

Example:
    ```py
    >>> from trl_ext.prefix_grouper.timing import logprob_speedup
    >>> logprob_speedup(prompt_len=512, completion_len=32, group=8)["speedup"]
    ```
"""

from __future__ import annotations

import tempfile
import time

import torch
from trl import GRPOConfig, GRPOTrainer

from ..toy import ToyModelSpec, arithmetic_reward, build_toy_model, build_toy_tokenizer, make_arithmetic_dataset
from ..toy.args import toy_args
from .config import PrefixGrouperGRPOConfig
from .cost import ideal_speedup
from .trainer import PrefixGrouperGRPOTrainer


def make_trainer(grouped: bool, spec: ToyModelSpec, output_dir: str):
    """A stock or grouped GRPO trainer around a fresh random toy model (fp32, sdpa), in train mode."""
    model = build_toy_model(spec)
    model.config._attn_implementation = "sdpa"
    config_cls, trainer_cls = (
        (PrefixGrouperGRPOConfig, PrefixGrouperGRPOTrainer) if grouped else (GRPOConfig, GRPOTrainer)
    )
    args = toy_args(config_cls, output_dir, per_device_train_batch_size=4, num_generations=4, disable_dropout=True)
    trainer = trainer_cls(model=model, reward_funcs=arithmetic_reward, args=args,
                          train_dataset=make_arithmetic_dataset(8), processing_class=build_toy_tokenizer())  # fmt: skip
    trainer.model.train()
    return trainer


def one_group(prompt_len: int, completion_len: int, group: int, vocab: int, eos: int):
    """Input ids and attention mask of one synthetic group: a shared prompt and G completions ending in EOS."""
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(10, vocab, (1, prompt_len), generator=gen).expand(group, -1)
    completions = torch.randint(10, vocab, (group, completion_len), generator=gen)
    completions[:, -1] = eos
    input_ids = torch.cat([prompt, completions], dim=1)
    return input_ids, torch.ones_like(input_ids)


def logprob_step(trainer, input_ids, attention_mask, completion_len: int) -> None:
    """One log-prob forward (with entropies) and backward through ``trainer``'s own hook."""
    logps, _, _ = trainer._get_per_token_logps_and_entropies(
        trainer.model, input_ids, attention_mask, completion_len, compute_entropy=True
    )
    logps.sum().backward()
    trainer.model.zero_grad(set_to_none=True)


def spec_ideal_speedup(spec: ToyModelSpec, vocab: int, prompt_len: int, completion_len: int, group: int) -> float:
    """:func:`~trl_ext.prefix_grouper.cost.ideal_speedup` for a toy model spec."""
    d = spec.hidden_size
    return ideal_speedup(prompt_len, completion_len, group, hidden_size=d, num_layers=spec.num_hidden_layers,
                         intermediate_size=spec.intermediate_size or 4 * d,
                         kv_size=d * spec.kv_heads // spec.num_attention_heads, vocab_size=vocab)  # fmt: skip


def logprob_speedup(
    prompt_len: int = 512, completion_len: int = 32, group: int = 8, spec: ToyModelSpec | None = None, repeats: int = 3
) -> dict:
    """Stock / grouped process CPU time of one log-prob forward+backward, beside the ideal ratio.

    Returns ``{"stock_s", "grouped_s", "speedup", "ideal"}``; times are the fastest of
    ``repeats`` runs after one warm-up.
    """
    spec = spec or ToyModelSpec(arch="llama", hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                max_position_embeddings=max(1024, prompt_len + completion_len))  # fmt: skip
    with tempfile.TemporaryDirectory() as out:
        trainers = {name: make_trainer(name == "grouped", spec, out) for name in ("stock", "grouped")}
    vocab = trainers["stock"].model.config.vocab_size
    eos = trainers["stock"].processing_class.eos_token_id
    input_ids, mask = one_group(prompt_len, completion_len, group, vocab, eos)
    seconds = {}
    for name, trainer in trainers.items():
        logprob_step(trainer, input_ids, mask, completion_len)
        seconds[name] = float("inf")
        for _ in range(repeats):
            start = time.process_time()
            logprob_step(trainer, input_ids, mask, completion_len)
            seconds[name] = min(seconds[name], time.process_time() - start)
    return {
        "stock_s": seconds["stock"],
        "grouped_s": seconds["grouped"],
        "speedup": seconds["stock"] / seconds["grouped"],
        "ideal": spec_ideal_speedup(spec, vocab, prompt_len, completion_len, group),
    }
