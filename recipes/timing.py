"""Timing helpers the quickstart uses and the benchmarks reuse (run from the repository root, like every recipe).

- Prefix Grouper: :func:`logprob_speedup` times the log-prob forward+backward of the grouped
  trainer against the stock GRPO trainer on one synthetic group (process CPU time).
- REDI: :func:`step_time_ratio_vs_dpo` times REDI's training step against DPO's, which also
  runs a reference model.
- Q-Tuning: :func:`epoch_time` times one SFT epoch with Q-Tuning against the stock
  ``SFTTrainer`` on the same data.

Example:
    ```py
    >>> from recipes.timing import logprob_speedup
    >>> logprob_speedup(prompt_len=512, completion_len=32, group=8)["speedup"]
    ```
"""

from __future__ import annotations

import tempfile
import time

import torch
from transformers import TrainerCallback

from peft_trl_testbed import (
    ToyModelSpec,
    arithmetic_reward,
    build_toy_model,
    build_toy_tokenizer,
    make_arithmetic_dataset,
    make_reasoning_preferences,
    toy_args,
)


# ---------------------------------------------------------------------------- Prefix Grouper
def make_trainer(grouped: bool, spec: ToyModelSpec | torch.nn.Module, output_dir: str):
    """A stock or grouped GRPO trainer, in train mode, around ``spec``: a model built from a config (with the toy
    tokenizer's vocabulary), or a fresh random toy model of that spec (fp32, sdpa)."""
    from trl import GRPOConfig, GRPOTrainer

    from trl_ext import PrefixGrouperGRPOConfig, PrefixGrouperGRPOTrainer

    if isinstance(spec, torch.nn.Module):
        model = spec
    else:
        model = build_toy_model(spec)
        model.config._attn_implementation = "sdpa"
    config_cls, trainer_cls = (
        (PrefixGrouperGRPOConfig, PrefixGrouperGRPOTrainer) if grouped else (GRPOConfig, GRPOTrainer)
    )
    args = toy_args(config_cls, output_dir, per_device_train_batch_size=4, num_generations=4, disable_dropout=True)
    trainer = trainer_cls(
        model=model,
        reward_funcs=arithmetic_reward,
        args=args,
        train_dataset=make_arithmetic_dataset(8),
        processing_class=build_toy_tokenizer(),
    )
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
    from trl_ext.prefix_grouper.cost import ideal_speedup

    d = spec.hidden_size
    return ideal_speedup(
        prompt_len,
        completion_len,
        group,
        hidden_size=d,
        num_layers=spec.num_hidden_layers,
        intermediate_size=spec.intermediate_size or 4 * d,
        kv_size=d * spec.kv_heads // spec.num_attention_heads,
        vocab_size=vocab,
    )


def logprob_speedup(
    prompt_len: int = 512, completion_len: int = 32, group: int = 8, spec: ToyModelSpec | None = None, repeats: int = 3
) -> dict:
    """Stock / grouped process CPU time of one log-prob forward+backward, beside the ideal ratio.

    Returns ``{"stock_s", "grouped_s", "speedup", "ideal"}``; times are the fastest of
    ``repeats`` runs after one warm-up.
    """
    spec = spec or ToyModelSpec(
        arch="llama",
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=max(1024, prompt_len + completion_len),
    )
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


# ---------------------------------------------------------------------------- REDI
class StepTimer(TrainerCallback):
    """Records the wall time of every optimizer step."""

    def __init__(self):
        self.times: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def mean_step_time(
    trainer_cls,
    config_cls,
    model_path: str,
    steps: int = 4,
    warmup: int = 1,
    batch: int = 8,
    output_dir: str | None = None,
    **config,
) -> tuple[float, object]:
    """Mean step time of ``trainer_cls`` over ``steps`` timed steps after ``warmup``; returns (seconds, trainer).

    ``config`` goes to the trainer's config; its ``seed`` (default 0) also seeds the preference pairs.
    """
    timer = StepTimer()
    data = make_reasoning_preferences(batch * (steps + warmup), seed=config.get("seed", 0))
    with tempfile.TemporaryDirectory() as tmp:
        args = toy_args(
            config_cls,
            output_dir or tmp,
            max_steps=steps + warmup,
            per_device_train_batch_size=batch,
            disable_tqdm=True,
            learning_rate=1e-5,
            logging_steps=1000,
            **config,
        )
        trainer = trainer_cls(model=model_path, args=args, train_dataset=data, callbacks=[timer])
        trainer.train()
    timed = timer.times[warmup:]
    return sum(timed) / len(timed), trainer


def step_time_ratio_vs_dpo(model_path: str, steps: int = 4, batch: int = 8) -> float:
    """REDI step time / DPO step time on the same model path, pairs and batch size."""
    from trl import DPOConfig, DPOTrainer

    from trl_ext import REDIConfig, REDITrainer

    dpo, _ = mean_step_time(DPOTrainer, DPOConfig, model_path, steps=steps, batch=batch)
    redi, _ = mean_step_time(REDITrainer, REDIConfig, model_path, steps=steps, batch=batch)
    return redi / dpo


# ---------------------------------------------------------------------------- Q-Tuning
def epoch_time(
    model_path: str,
    dataset,
    scoring: str | None = None,
    sample_keep_ratio: float = 0.25,
    token_keep_ratio: float = 0.5,
    batch: int = 32,
) -> tuple[float, int]:
    """Training-loop seconds (``train_runtime``) of one epoch, and tokens that went through forward+backward.

    ``scoring=None`` runs the stock ``SFTTrainer``; ``"reuse"`` or ``"separate"`` runs
    :class:`~trl_ext.QTuningSFTTrainer` at the given ratios.
    """
    from trl import SFTConfig, SFTTrainer

    from trl_ext import QTuningConfig, QTuningSFTTrainer

    common = dict(
        num_train_epochs=1,
        per_device_train_batch_size=batch,
        disable_tqdm=True,
        learning_rate=1e-4,
        logging_steps=10_000,
        dataloader_drop_last=True,
    )
    with tempfile.TemporaryDirectory() as out:
        if scoring is None:
            trainer = SFTTrainer(model=model_path, args=toy_args(SFTConfig, out, **common), train_dataset=dataset)
        else:
            args = toy_args(
                QTuningConfig,
                out,
                scoring=scoring,
                sample_keep_ratio=sample_keep_ratio,
                token_keep_ratio=token_keep_ratio,
                eu_record_steps=0,
                **common,
            )
            trainer = QTuningSFTTrainer(model=model_path, args=args, train_dataset=dataset)
        output = trainer.train()
    return output.metrics["train_runtime"], trainer._total_train_tokens
