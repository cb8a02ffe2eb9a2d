"""Time REDI's training step against DPO's (which also runs a reference model) on the same data.

Example:
    ```py
    >>> from trl_ext.redi.timing import step_time_ratio_vs_dpo
    >>> step_time_ratio_vs_dpo("path/to/sft-model", steps=4)  # < 1 means REDI is faster
    ```
"""

from __future__ import annotations

import tempfile
import time

from transformers import TrainerCallback

from ..toy import make_reasoning_preferences
from ..toy.args import toy_args


class StepTimer(TrainerCallback):
    """Records the wall time of every optimizer step."""

    def __init__(self):
        self.times: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def mean_step_time(trainer_cls, config_cls, model_path: str, steps: int = 4, warmup: int = 1, batch: int = 8,
                   output_dir: str | None = None, **config) -> tuple[float, object]:  # fmt: skip
    """Mean step time of ``trainer_cls`` over ``steps`` timed steps after ``warmup``; returns (seconds, trainer)."""
    timer = StepTimer()
    data = make_reasoning_preferences(batch * (steps + warmup), seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        args = toy_args(config_cls, output_dir or tmp, max_steps=steps + warmup, per_device_train_batch_size=batch,
                        disable_tqdm=True, learning_rate=1e-5, logging_steps=1000, **config)  # fmt: skip
        trainer = trainer_cls(model=model_path, args=args, train_dataset=data, callbacks=[timer])
        trainer.train()
    timed = timer.times[warmup:]
    return sum(timed) / len(timed), trainer


def step_time_ratio_vs_dpo(model_path: str, steps: int = 4, batch: int = 8) -> float:
    """REDI step time / DPO step time on the same model path, pairs and batch size."""
    from trl import DPOConfig, DPOTrainer

    from .config import REDIConfig
    from .trainer import REDITrainer

    dpo, _ = mean_step_time(DPOTrainer, DPOConfig, model_path, steps=steps, batch=batch)
    redi, _ = mean_step_time(REDITrainer, REDIConfig, model_path, steps=steps, batch=batch)
    return redi / dpo
