"""Every private upstream name that ``trl_ext`` touches, in one place.

When TRL, transformers, accelerate or torch release, this is the file to check. Each entry names the upstream
version and file it mirrors and the test that pins it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# --- Q-Tuning ---

# transformers 5.25.0, ``transformers/trainer.py``, ``Trainer.get_batch_samples(epoch_iterator, num_batches, device)``:
# returns one optimizer step's micro-batches and ``num_items_in_batch``, the window's label tokens counted over
# ``labels[..., 1:]`` (summed over processes, divided by the tensor/context/sequence-parallel sizes), which
# ``_inner_training_loop`` passes to every ``compute_loss`` of the window after setting
# ``current_gradient_accumulation_steps = len(batch_samples)``. ``QTuningSFTTrainer.get_batch_samples`` overrides it
# (same signature) and has the parent count the same batches with the dropped labels set to -100. Pinned by
# ``tests/trl_ext/test_qtuning_metrics.py::test_window_metrics_equal_sft_on_the_pruned_batches`` and the Q-Tuning
# gradient-accumulation tests (``test_qtuning_window_loss_is_normalised_by_kept_tokens``).


def fused_forward(model, inputs: dict):
    """The model's forward through the fused LM head that ``SFTTrainer`` installs, as ``SFTTrainer`` calls it.

    trl 1.16.0, ``trl/trainer/utils.py``, ``add_fused_lm_head`` (installed by ``SFTTrainer.__init__`` with
    ``outputs=("log_probs", "entropy", "is_top1")``): ``model(..., labels=labels, fused_lm_head=True)`` returns a
    ``FusedCausalLMOutput`` whose per-token fields have shape ``(rows, seq_len - 1)`` (position ``t`` predicts
    ``labels[:, t + 1]``) and are zero where the label is -100. Pinned by
    ``tests/trl_ext/test_qtuning_metrics.py::test_reuse_metrics_equal_sft_on_the_pruned_batch``.
    """
    return model(**{**inputs, "use_cache": False}, fused_lm_head=True)


class KeptTokensForward:
    """Wraps the model passed to ``SFTTrainer.compute_loss`` so that only the kept tokens carry loss and metrics.

    trl 1.16.0, ``trl/trainer/sft_trainer.py``, ``SFTTrainer.compute_loss``: without ``compute_loss_func``, label
    smoothing or DeepSpeed sequence parallelism, it calls ``model(**inputs, fused_lm_head=True)`` once and computes
    the loss from ``log_probs`` (``dft`` also from ``log_probs``), the ``entropy`` and ``mean_token_accuracy`` metrics
    from ``entropy``, ``is_top1`` and ``label_mask``, and the MoE metric from ``aux_loss``; ``num_tokens`` comes from
    the inputs. Per ``FusedCausalLMOutput``, every per-token field is zero where the label is -100, so zeroing them
    outside ``keep`` is what the fused head returns for the same batch with the dropped labels set to -100 (each
    token's values do not depend on the other labels); ``loss`` is cleared so that a future reader fails loudly.
    ``keep`` maps the model outputs to a ``(rows, seq_len - 1)`` bool mask (it may score the batch from them).
    Pinned by ``tests/trl_ext/test_qtuning_metrics.py::test_reuse_metrics_equal_sft_on_the_pruned_batch``.
    """

    PER_TOKEN_FIELDS = ("log_probs", "entropy", "is_top1", "log_sum_sq_probs", "mean_logits")

    def __init__(self, model, keep: Callable[[object], torch.Tensor]):
        self.model = model
        self.keep = keep
        self.calls = 0

    def __call__(self, *args, **kwargs):
        if not kwargs.get("fused_lm_head") or self.calls:
            raise RuntimeError(
                "SFTTrainer.compute_loss called the model other than once with fused_lm_head=True, which Q-Tuning's "
                "scoring='reuse' relies on (trl 1.16). Use scoring='separate', or a TRL version this package supports."
            )
        self.calls += 1
        outputs = self.model(*args, **kwargs)
        keep = self.keep(outputs)
        for name in self.PER_TOKEN_FIELDS:
            value = getattr(outputs, name, None)
            if value is not None:
                setattr(outputs, name, value.masked_fill(~keep, 0))
        outputs.label_mask = outputs.label_mask & keep
        outputs.loss = None
        return outputs


def sft_metrics(trainer, mode: str = "train"):
    """The ``defaultdict(list)`` of metrics that ``SFTTrainer.log`` averages over the logging interval for ``mode``.

    trl 1.16.0, ``trl/trainer/sft_trainer.py``: ``SFTTrainer.__init__`` sets ``self._metrics = {"train":
    defaultdict(list), "eval": defaultdict(list)}``; ``SFTTrainer.log`` logs the mean of each list and clears them.
    Pinned by ``tests/trl_ext/test_qtuning.py::test_training_logs_selection_metrics_and_plots`` and
    ``tests/trl_ext/test_qtuning_metrics.py``.
    """
    return trainer._metrics[mode]
