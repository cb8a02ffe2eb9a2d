"""Pretrain a toy model on the arithmetic task so that RL has a policy that sometimes succeeds.

A plain PyTorch loop (no Trainer, for speed) trains on a mix of the plain prompt/completion
form and the chat-template form of :func:`~peft_trl_testbed.data.make_arithmetic_dataset`, with
loss on completion tokens only. The result is cached on disk keyed by the whole
configuration, so later runs reuse it.

Example:
    ```py
    >>> from peft_trl_testbed.pretrain import pretrained_toy_model_path
    >>> path = pretrained_toy_model_path(arch="llama")  # about a minute the first time, then cached
    ```
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .data import DEFAULT_MAX_OPERAND, arithmetic_reward, make_arithmetic_dataset
from .models import ToyModelSpec, build_once, build_toy_model, cache_dir
from .tokenizer import build_toy_tokenizer


@dataclass(frozen=True)
class PretrainConfig:
    """Settings of the toy pretraining run; every field is part of the cache key."""

    model: ToyModelSpec = field(default_factory=ToyModelSpec)
    max_operand: int = DEFAULT_MAX_OPERAND
    num_train: int = 800
    num_eval: int = 200
    steps: int = 1500
    batch_size: int = 64
    learning_rate: float = 3e-3
    seed: int = 0

    def key(self) -> str:
        import hashlib

        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def _rendered(tokenizer, prompt: str, completion: str, chat: bool) -> tuple[list[int], int]:
    """Token ids of one example and the number of prompt tokens (no loss on those)."""
    if chat:
        p = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        c = completion + "<|im_end|>"
    else:
        p, c = prompt, completion
    p_ids = tokenizer(p, add_special_tokens=False)["input_ids"]
    c_ids = tokenizer(c, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return p_ids + c_ids, len(p_ids)


def _batch(examples, pad_id):
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id)
    labels = torch.full((len(examples), width), -100)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (ids, n_prompt) in enumerate(examples):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])
        attention[i, : len(ids)] = 1
    return input_ids, attention, labels


@torch.no_grad()
def generation_accuracy(
    model, tokenizer, dataset, reward_fn, max_new_tokens: int = 5, chat: bool = False, batch_size: int = 128
) -> float:
    """Mean ``reward_fn`` score of greedy completions of ``dataset["prompt"]`` against ``dataset["answer"]``.

    Example:
        ```py
        >>> from peft_trl_testbed import arithmetic_reward, make_arithmetic_dataset
        >>> acc = generation_accuracy(model, tokenizer, make_arithmetic_dataset(100), arithmetic_reward)
        ```
    """
    was_training = model.training
    model.eval()
    tokenizer.padding_side = "left"
    total = 0.0
    for start in range(0, len(dataset), batch_size):
        rows = dataset[start : start + batch_size]
        prompts = rows["prompt"]
        if chat:
            prompts = [
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
                )
                for p in prompts
            ]
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        total += sum(reward_fn(texts, rows["answer"]))
    model.train(was_training)
    return total / len(dataset)


def arithmetic_accuracy(model, tokenizer, dataset, batch_size: int = 128, chat: bool = False) -> float:
    """Greedy held-out accuracy of ``model`` on an arithmetic dataset (plain prompts by default)."""
    return generation_accuracy(
        model, tokenizer, dataset, arithmetic_reward, max_new_tokens=5, chat=chat, batch_size=batch_size
    )


def pretrain_datasets(config: PretrainConfig | None = None):
    """The (train, held-out) arithmetic sets of a pretraining run; held-out problems never appear in training.

    Example:
        ```py
        >>> train, held_out = pretrain_datasets()
        >>> arithmetic_accuracy(model, tokenizer, held_out)
        ```
    """
    config = config or PretrainConfig()
    train = make_arithmetic_dataset(config.num_train, seed=config.seed, max_operand=config.max_operand)
    held_out = make_arithmetic_dataset(
        config.num_eval, seed=config.seed + 1, max_operand=config.max_operand, exclude=train
    )
    return train, held_out


def train_loop(model, examples: list, pad_token_id: int, config, desc: str, progress: bool = True) -> torch.Tensor:
    """AdamW with a one-cycle schedule over random batches of tokenized ``examples``; returns the last loss.

    ``config`` gives ``learning_rate``, ``steps``, ``batch_size`` and ``seed`` (the batch order).
    """
    from tqdm.auto import tqdm

    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.learning_rate, total_steps=config.steps)
    generator = torch.Generator().manual_seed(config.seed)
    model.train()
    bar = tqdm(range(config.steps), desc=desc, disable=not progress)
    for _ in bar:
        idx = torch.randint(len(examples), (config.batch_size,), generator=generator).tolist()
        input_ids, attention, labels = _batch([examples[i] for i in idx], pad_token_id)
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return loss


def pretrain_toy_model(config: PretrainConfig, output_dir: str | os.PathLike, progress: bool = True) -> dict:
    """Train a toy model on arithmetic and save it with its tokenizer; return its metrics.

    The metrics record the held-out accuracy before and after training, the wall and CPU
    seconds of the training loop and torch's thread count.
    """

    torch.manual_seed(config.seed)
    tokenizer = build_toy_tokenizer()
    model = build_toy_model(config.model)
    train, held_out = pretrain_datasets(config)
    accuracy_before = arithmetic_accuracy(model, tokenizer, held_out)
    examples = [
        _rendered(tokenizer, p, c, chat) for p, c in zip(train["prompt"], train["completion"]) for chat in (0, 1)
    ]
    start, start_cpu = time.perf_counter(), time.process_time()
    loss = train_loop(model, examples, tokenizer.pad_token_id, config, "pretraining toy model", progress)
    train_seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    metrics = {
        "train_seconds": round(train_seconds, 1),
        "train_cpu_seconds": round(cpu_seconds, 1),
        "threads": torch.get_num_threads(),
        "heldout_accuracy_before": accuracy_before,
        "final_loss": round(loss.item(), 4),
        "train_accuracy": arithmetic_accuracy(model, tokenizer, train),
        "heldout_accuracy": arithmetic_accuracy(model, tokenizer, held_out),
        "heldout_accuracy_chat": arithmetic_accuracy(model, tokenizer, held_out, chat=True),
        "config": asdict(config),
    }
    return save_trained(model, tokenizer, output_dir, "toy_pretrain_metrics.json", metrics)


def save_trained(model, tokenizer, output_dir: str | os.PathLike, metrics_file: str, metrics: dict) -> dict:
    """Save a trained toy model like a Hub repo (padding set for ``generate``) with its metrics; return them."""
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    (Path(output_dir) / metrics_file).write_text(json.dumps(metrics, indent=2))
    return metrics


def pretrained_toy_model_path(config: PretrainConfig | None = None, progress: bool = True, **model_sizes) -> str:
    """Path of a toy model pretrained on arithmetic, trained once and cached by its configuration.

    ``model_sizes`` are :class:`~peft_trl_testbed.models.ToyModelSpec` fields (e.g. ``arch="qwen2"``)
    and are used only when ``config`` is not given.
    """
    config = config or PretrainConfig(model=ToyModelSpec(**model_sizes))
    path = cache_dir() / "models" / f"{config.model.arch}-arith-{config.key()}"
    return build_once(
        path, "toy_pretrain_metrics.json", lambda tmp: pretrain_toy_model(config, tmp, progress=progress)
    )


def pretrain_metrics(path: str | os.PathLike) -> dict:
    """Metrics recorded when the cached model at ``path`` was trained."""
    return json.loads((Path(path) / "toy_pretrain_metrics.json").read_text())


def load_pretrained_toy(config: PretrainConfig | None = None, **model_sizes):
    """Load (model, tokenizer) of the cached pretrained toy model."""
    path = pretrained_toy_model_path(config, **model_sizes)
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
