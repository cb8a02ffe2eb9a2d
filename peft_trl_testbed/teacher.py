"""A toy teacher for the reasoning task: good, but imperfect, so its own mistakes can be REDI's negatives.

The teacher is the pretrained toy model (:func:`~peft_trl_testbed.pretrain.pretrained_toy_model_path`)
fine-tuned briefly on correct step-by-step traces of :func:`~peft_trl_testbed.data.make_reasoning_traces`
with a plain PyTorch loop (loss on completion tokens only). It is cached on disk keyed by its whole
configuration, like the pretrained model, so later runs reuse it.

Example:
    ```py
    >>> from peft_trl_testbed import toy_teacher_path, teacher_metrics
    >>> path = toy_teacher_path()  # about a minute the first time, then cached
    >>> teacher_metrics(path)["heldout_accuracy_sampled"]
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

from .data import make_reasoning_traces, reasoning_reward
from .models import build_once, cache_dir
from .pretrain import (
    PretrainConfig,
    _rendered,
    generation_accuracy,
    pretrained_toy_model_path,
    save_trained,
    train_loop,
)

TEACHER_SEED_OFFSET = 50_000  # the teacher's training prompts come from seeds far from the benchmarks' ones


@dataclass(frozen=True)
class TeacherConfig:
    """Settings of the toy teacher's fine-tuning; every field is part of the cache key.

    The defaults give a teacher that is right on about two traces in three at temperature 0.8 (about 3 in 4 greedy).
    """

    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    num_train_prompts: int = 2048
    num_eval_prompts: int = 200
    steps: int = 800
    batch_size: int = 32
    learning_rate: float = 3e-3
    temperature: float = 0.8
    seed: int = 0

    def key(self) -> str:
        import hashlib

        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


@torch.no_grad()
def sampled_accuracy(model, tokenizer, dataset, temperature: float, seed: int = 0, batch_size: int = 128) -> float:
    """Fraction of sampled traces (one per prompt, at ``temperature``) whose answer is right."""
    model.eval()
    tokenizer.padding_side = "left"
    torch.manual_seed(seed)
    total = 0.0
    for start in range(0, len(dataset), batch_size):
        rows = dataset[start : start + batch_size]
        enc = tokenizer(rows["prompt"], return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(
            **enc,
            max_new_tokens=48,
            do_sample=True,
            temperature=temperature,
            top_p=1.0,
            top_k=0,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        total += sum(reasoning_reward(texts, rows["answer"]))
    return total / len(dataset)


def train_toy_teacher(config: TeacherConfig, output_dir: str | os.PathLike, progress: bool = True) -> dict:
    """Fine-tune the pretrained toy model on correct reasoning traces, save it, and return its metrics.

    The metrics record greedy and sampled (at ``config.temperature``) held-out accuracy and the
    seconds spent training.
    """

    start = time.perf_counter()
    torch.manual_seed(config.seed)
    base = pretrained_toy_model_path(config.pretrain, progress=progress)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    seed = TEACHER_SEED_OFFSET + config.seed
    train = make_reasoning_traces(config.num_train_prompts, seed=seed, traces_per_prompt=1, p_correct=1.0)
    held_out = make_reasoning_traces(config.num_eval_prompts, seed=seed + 1, traces_per_prompt=1)
    examples = [_rendered(tokenizer, p, c, chat=False) for p, c in zip(train["prompt"], train["completion"])]
    loss = train_loop(model, examples, tokenizer.pad_token_id, config, "training toy teacher", progress)
    train_seconds = time.perf_counter() - start
    metrics = {
        "train_seconds": round(train_seconds, 1),
        "threads": torch.get_num_threads(),
        "final_loss": round(loss.item(), 4),
        "heldout_accuracy_greedy": generation_accuracy(model, tokenizer, held_out, reasoning_reward, 48),
        "heldout_accuracy_sampled": sampled_accuracy(model, tokenizer, held_out, config.temperature, config.seed),
        "temperature": config.temperature,
        "config": asdict(config),
    }
    return save_trained(model, tokenizer, output_dir, "toy_teacher_metrics.json", metrics)


def toy_teacher_path(config: TeacherConfig | None = None, progress: bool = True) -> str:
    """Path of the toy teacher, trained once and cached by its configuration.

    Example:
        ```py
        >>> from trl_ext.redi import generate_traces
        >>> from peft_trl_testbed import check_reasoning_answer, make_reasoning_traces, toy_teacher_path
        >>> prompts = make_reasoning_traces(64, traces_per_prompt=1).select_columns(["prompt", "answer"])
        >>> traces, report = generate_traces(toy_teacher_path(), prompts, check_reasoning_answer)
        ```
    """
    config = config or TeacherConfig()
    path = cache_dir() / "models" / f"{config.pretrain.model.arch}-teacher-{config.key()}"
    return build_once(path, "toy_teacher_metrics.json", lambda tmp: train_toy_teacher(config, tmp, progress=progress))


def teacher_metrics(path: str | os.PathLike) -> dict:
    """Metrics recorded when the cached teacher at ``path`` was trained."""
    return json.loads((Path(path) / "toy_teacher_metrics.json").read_text())
