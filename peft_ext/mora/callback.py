"""ReMoRA: periodically merge MoRA's update into the base weights and restart it."""

from __future__ import annotations

import os

import torch
from transformers import TrainerCallback

from .layer import MoraLayer
from .model import MoraModel
from .ops import resolve_mora_type


class ReMoraCallback(TrainerCallback):
    """Every ``every_n_steps`` optimizer steps: merge M into W0, reset M to zero, switch operator.

    This is ReMoRA from the MoRA paper: the rank of the accumulated update can grow
    beyond r_hat because successive updates use different compressions. The operator cycles
    through ``cycle`` (default ``sharing`` <-> ``group_interleave``, the reference codes 1 <-> 2);
    a one-element cycle only merges and restarts. Optimizer moments of M are zeroed at each
    restart (``reset_optimizer_state``), since they describe the previous operator's coordinates.

    The base weights change during training, so save the result with ``merge_and_unload()``
    and ``save_pretrained`` of the merged model, not as an adapter alone.

    Args:
        every_n_steps (`int`): restart period T in optimizer steps.
        cycle (`tuple`): operators to cycle through, names or reference codes; all must give the same r_hat.
        adapter_name (`str`, *optional*): the adapter to restart; the active one if None.
        reset_optimizer_state (`bool`, defaults to `True`): zero the optimizer's state tensors of M.

    Example:
        ```py
        >>> from peft import get_peft_model
        >>> from transformers import Trainer, TrainingArguments
        >>> from peft_ext import MoraConfig, ReMoraCallback
        >>> model = get_peft_model(model, MoraConfig(r=8, mora_type="sharing", target_modules="all-linear"))
        >>> trainer = Trainer(
        ...     model=model,
        ...     args=TrainingArguments(output_dir="out"),
        ...     train_dataset=tokenized_dataset,
        ...     callbacks=[ReMoraCallback(every_n_steps=100)],
        ... )  # doctest: +SKIP
        ```
    """

    def __init__(
        self,
        every_n_steps: int,
        cycle: tuple = ("sharing", "group_interleave"),
        adapter_name: str | None = None,
        reset_optimizer_state: bool = True,
    ):
        if not isinstance(every_n_steps, int) or every_n_steps <= 0:
            raise ValueError(f"every_n_steps={every_n_steps!r} must be a positive integer number of optimizer steps.")
        if not cycle:
            raise ValueError("cycle=() is empty; pass at least one mora_type, e.g. ('sharing', 'group_interleave').")
        self.every_n_steps = every_n_steps
        self.cycle = tuple(resolve_mora_type(t) for t in cycle)
        self.adapter_name = adapter_name
        self.reset_optimizer_state = reset_optimizer_state
        self.num_restarts = 0

    @staticmethod
    def _find_tuner(model: torch.nn.Module) -> MoraModel:
        for module in model.modules():
            if isinstance(module, MoraModel):
                return module
        raise ValueError(
            f"ReMoraCallback found no MoRA adapter in {type(model).__name__}; train with peft_config=MoraConfig(...)."
        )

    def next_type(self, current: str) -> str:
        """The operator after ``current`` in the cycle (``current`` must be in the cycle)."""
        if current not in self.cycle:
            raise ValueError(
                f"The adapter uses mora_type={current!r}, which is not in cycle={self.cycle}; "
                f"start training with mora_type={self.cycle[0]!r} or include {current!r} in the cycle."
            )
        return self.cycle[(self.cycle.index(current) + 1) % len(self.cycle)]

    def restart(self, model: torch.nn.Module, optimizer=None) -> str:
        """Merge, reset and switch now; returns the new operator."""
        tuner = self._find_tuner(model)
        name = self.adapter_name or tuner.active_adapters[0]
        new_type = self.next_type(tuner.peft_config[name].mora_type)
        tuner.merge_and_reset(name, new_type)
        if self.reset_optimizer_state and optimizer is not None:
            state = optimizer.state
            for module in tuner.model.modules():
                if isinstance(module, MoraLayer) and name in module.mora_M:
                    for value in state.get(module.mora_M[name], {}).values():
                        if torch.is_tensor(value) and value.shape == module.mora_M[name].shape:
                            value.zero_()
        self.num_restarts += 1
        return new_type

    def on_train_begin(self, args, state, control, **kwargs):
        """Refuse, before the first step, engines whose restarts could not be exact."""
        engine = None
        if getattr(args, "deepspeed", None) or getattr(args, "deepspeed_plugin", None) is not None:
            engine = "DeepSpeed"
        elif getattr(args, "fsdp", None) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
            engine = "FSDP"
        if engine is not None:
            raise ValueError(
                f"ReMoraCallback cannot restart under {engine}: a restart adds M's update into the frozen base "
                "weights and zeroes M's optimizer moments in place, and the engine keeps both partitioned or "
                "flattened outside its forward and optimizer step. Train ReMoRA with DDP "
                "(recipes/accelerate_configs/multi_gpu.yaml), or plain MoRA (no ReMoraCallback) under this engine."
            )

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step > 0 and state.global_step % self.every_n_steps == 0:
            self.restart(model, optimizer)
