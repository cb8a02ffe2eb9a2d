"""Every private upstream name that ``trl_ext`` touches, in one place.

When TRL, transformers, accelerate or torch release, this is the file to check. Each entry names the upstream
version and file it mirrors and the test that pins it (most in ``tests/trl_ext/test_trl_ext_compat.py``). Entries are
grouped by upstream library, and within TRL by the trainer they extend.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# ============================================================================================ TRL: every trainer

# trl 1.16.0, ``trl/trainer/base_trainer.py``, ``BaseTrainer``: the class attributes ``_tag_names`` (tags added to the
# model and its card) and ``_name`` (the trainer named in the card), which each trainer subclass here sets. Pinned by
# ``tests/trl_ext/test_trainer_contracts.py::test_model_card_tags``.

# ============================================================================================ TRL: DPOTrainer (REDI)


class _NoReferenceModel:
    """The ``ref_model`` argument that tells ``DPOTrainer.__init__`` a reference exists, so it builds none."""

    def __repr__(self) -> str:
        return "NO_REFERENCE_MODEL"


NO_REFERENCE_MODEL = _NoReferenceModel()


def reference_free_ref_model(trainer_name: str) -> property:
    """A ``ref_model`` attribute that is always ``None``, for a ``DPOTrainer`` subclass without a reference model.

    trl 1.16.0, ``trl/trainer/dpo_trainer.py``, ``DPOTrainer.__init__``: a reference model is built (loaded with
    ``create_model_from_path``, or a frozen ``"ref"`` copy of a pretrained PEFT adapter) only when the ``ref_model``
    argument is ``None``. A given ``ref_model`` is only compared with ``model`` and stored as ``self.ref_model``;
    every later use (dropout, fused LM head, DeepSpeed/FSDP/accelerate preparation, the loss) is guarded by
    ``self.ref_model is not None``. So a subclass that declares ``ref_model = reference_free_ref_model(...)`` and
    passes ``ref_model=NO_REFERENCE_MODEL`` gets no reference built, loaded or prepared, and ``self.ref_model`` reads
    ``None`` everywhere. Pinned by ``tests/trl_ext/test_trl_ext_compat.py::test_dpo_builds_no_reference_for_a_given_one``
    and ``tests/trl_ext/test_redi_trainer.py::test_no_reference_model_is_created_or_loaded``.
    """

    def get(self):
        return None

    def set(self, value):
        if value is not None and value is not NO_REFERENCE_MODEL:
            raise ValueError(
                f"{trainer_name} is reference-free, but something set its ref_model to a {type(value).__name__}. "
                "Use trl.DPOTrainer for a reference-regularised objective."
            )

    return property(get, set, doc=f"Always None: {trainer_name} has no reference model.")


def dpo_vision_dataset(trainer) -> bool:
    """Whether a ``DPOTrainer`` was given image preference data (its rows go through a processor, not the text rows
    prefix sharing packs).

    trl 1.16.0, ``trl/trainer/dpo_trainer.py``, ``DPOTrainer.__init__`` sets ``self._is_vision_dataset`` from the
    first training example (an ``"image"`` or ``"images"`` key). Pinned by
    ``tests/trl_ext/test_trl_ext_compat.py::test_dpo_records_whether_the_data_has_images``.
    """
    return trainer._is_vision_dataset


def dpo_metrics(trainer, mode: str):
    """The ``defaultdict(list)`` of metrics that ``trainer.log`` averages for ``mode`` (``"train"``/``"eval"``).

    trl 1.16.0, ``trl/trainer/dpo_trainer.py``: ``DPOTrainer.__init__`` sets ``self._metrics = {"train":
    defaultdict(list), "eval": defaultdict(list)}`` and ``DPOTrainer.log`` logs each key's mean, then clears them.
    Pinned by ``tests/trl_ext/test_trl_ext_compat.py::test_dpo_builds_no_reference_for_a_given_one``.
    """
    return trainer._metrics[mode]


@torch.no_grad()
def log_dpo_policy_metrics(trainer, mode: str, inputs, outputs, completion_mask, per_token_logps) -> None:
    """Log the metrics ``DPOTrainer`` computes from the policy's forward alone, as it computes them.

    trl 1.16.0, ``trl/trainer/dpo_trainer.py``, ``DPOTrainer._compute_loss`` ("Log the metrics"), line for line:
    ``aux_loss`` (MoE models), ``entropy``, ``num_tokens`` (divided by the tensor-parallel size, ``_tp_size``, whose
    ranks see the same batch), ``logits/chosen``, ``logits/rejected``, ``mean_token_accuracy``, ``logps/chosen`` and
    ``logps/rejected``. The ``rewards/*`` metrics need a reference model and are left out. Pinned by
    ``tests/trl_ext/test_redi_trainer.py::test_policy_metrics_match_dpo_trainer_on_one_batch``.

    Args:
        trainer: a ``DPOTrainer`` (or subclass) after ``__init__``.
        mode: ``"train"`` or ``"eval"``.
        inputs: the collated batch (``[chosen; rejected]`` rows, with ``attention_mask``).
        outputs: the fused-LM-head output of the policy (``entropy``, ``mean_logits``, ``is_top1``, ``aux_loss``).
        completion_mask: ``(2B, T - 1)`` completion mask of the target tokens (``completion_mask[:, 1:]``).
        per_token_logps: ``(2B, T - 1)`` log-probs of the target tokens, 0 outside the completion.
    """
    metrics = trainer._metrics[mode]
    gather_for_metrics = trainer.accelerator.gather_for_metrics
    seq_len = completion_mask.size(1)
    if trainer.aux_loss_enabled:
        metrics["aux_loss"].append(gather_for_metrics(outputs.aux_loss).mean().item())

    entropy_sum = gather_for_metrics((outputs.entropy[:, -seq_len:] * completion_mask).sum()).sum()
    num_completion_tokens = gather_for_metrics(completion_mask.sum()).sum()
    metrics["entropy"].append((entropy_sum / num_completion_tokens).item() if num_completion_tokens > 0 else 0.0)

    if mode == "train":
        num_tokens = gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
        trainer._total_train_tokens += num_tokens // trainer._tp_size
    metrics["num_tokens"] = [trainer._total_train_tokens]

    chosen_mask, rejected_mask = completion_mask.chunk(2, dim=0)
    chosen_logits, rejected_logits = outputs.mean_logits[:, -seq_len:].chunk(2, dim=0)
    sums = [chosen_logits[chosen_mask.bool()].sum(), chosen_mask.sum()]
    sums += [rejected_logits[rejected_mask.bool()].sum(), rejected_mask.sum()]
    chosen_sum, chosen_count, rejected_sum, rejected_count = (gather_for_metrics(x).sum().item() for x in sums)
    metrics["logits/chosen"].append(chosen_sum / chosen_count if chosen_count > 0 else 0.0)
    metrics["logits/rejected"].append(rejected_sum / rejected_count if rejected_count > 0 else 0.0)

    chosen_top1, _ = outputs.is_top1[:, -seq_len:].chunk(2, dim=0)
    correct = gather_for_metrics((chosen_top1 & chosen_mask.bool()).sum())
    total = gather_for_metrics(chosen_mask.sum()).sum()
    metrics["mean_token_accuracy"].append((correct.sum() / total).item() if total > 0 else 0.0)

    chosen_logps, rejected_logps = per_token_logps.sum(dim=1).chunk(2, dim=0)
    metrics["logps/chosen"].append(trainer.accelerator.gather(chosen_logps).mean().item())
    metrics["logps/rejected"].append(trainer.accelerator.gather(rejected_logps).mean().item())


# ======================================================================= TRL: GRPOTrainer (Prefix Grouper)

# trl 1.16.0, ``trl/trainer/grpo_trainer.py``: the one method through which GRPOTrainer computes the policy's, the
# old policy's and the reference model's per-token log-probs (and entropies). Prefix Grouper overrides it. Its
# parameters are these, then the defaulted ones below, then multimodal inputs defaulting to None (the override takes
# them as ``**multimodal_inputs`` and refuses any that is given).
# Pinned by ``tests/trl_ext/test_trl_ext_compat.py::test_grpo_log_prob_hook_has_the_overridden_signature`` and, for what it
# returns, by the stock-vs-grouped tests in ``tests/trl_ext/test_prefix_grouper.py``.
GRPO_LOGPS_HOOK = "_get_per_token_logps_and_entropies"
GRPO_LOGPS_HOOK_PARAMETERS = ("self", "model", "input_ids", "attention_mask", "logits_to_keep")
GRPO_LOGPS_HOOK_DEFAULTS = {"batch_size": None, "compute_entropy": False, "compute_aux_loss": False}


def stock_grpo_logps(trainer, model, input_ids, attention_mask, logits_to_keep, batch_size=None) -> torch.Tensor:
    """GRPOTrainer's own per-token log-probs of ``model`` (bypassing a subclass's override of ``GRPO_LOGPS_HOOK``).

    trl 1.16.0, ``trl/trainer/grpo_trainer.py``, ``GRPOTrainer._get_per_token_logps_and_entropies``: returns
    ``(logps, entropies, aux_loss)``, ``logps`` of shape ``(B, logits_to_keep)``. Pinned by
    ``tests/trl_ext/test_trl_ext_compat.py::test_grpo_stock_log_probs_and_tokenizer``.
    """
    from trl import GRPOTrainer

    hook = getattr(GRPOTrainer, GRPO_LOGPS_HOOK)
    return hook(trainer, model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size)[0]


def grpo_tokenizer(trainer):
    """The text tokenizer GRPOTrainer pads with: ``processing_class`` itself, or a processor's ``tokenizer``.

    trl 1.16.0, ``trl/trainer/grpo_trainer.py``, ``GRPOTrainer.__init__`` sets ``self._tokenizer`` (with its
    ``pad_token`` defaulted to the EOS token). Pinned by ``tests/trl_ext/test_trl_ext_compat.py::test_grpo_stock_log_probs_and_tokenizer``.
    """
    return trainer._tokenizer


# ==================================================================================================== transformers


def attn_implementation(config) -> str | None:
    """The attention implementation a model's config selects (``"sdpa"``, ``"eager"``, a registered name).

    transformers 5.25.0, ``src/transformers/configuration_utils.py``: ``PretrainedConfig._attn_implementation``, a
    property with no public reader (``set_attn_implementation`` on the model is the public writer). Pinned by
    ``tests/trl_ext/test_trl_ext_compat.py::test_attn_implementation_follows_set_attn_implementation``.
    """
    return config._attn_implementation


def unmask_tokens(values: dict, args) -> dict:
    """``values`` (from ``args.to_dict()``) with the masked ``*_token`` fields given back their values from ``args``.

    transformers 5.25.0, ``src/transformers/training_args.py``, ``TrainingArguments.to_dict``: every field whose
    name ends in ``_token`` is replaced by the placeholder ``"<FIELD_NAME_UPPER>"`` (meant for ``hub_token``, but it
    also hits e.g. ``SFTConfig.eos_token``). Pinned by ``tests/trl_ext/test_trl_ext_compat.py::test_to_dict_masks_tokens``.
    """
    values = dict(values)
    for key, value in values.items():
        if key.endswith("_token") and value == f"<{key.upper()}>":
            values[key] = getattr(args, key)
    return values


# =========================================================================================================== torch

# torch 2.13.0, ``aten/src/ATen/native/native_functions.yaml``: the CPU flash-attention kernels behind
# ``F.scaled_dot_product_attention`` on CPU, which also return the log-sum-exp (``(N, H, L)``, at least fp32) and take
# it back in the backward. Prefix Grouper's merged split attention relies on: GQA (query heads a multiple of key
# heads) handled natively; ``is_causal`` aligned top-left; an additive float ``attn_mask``; and a backward that uses
# the ``out`` and ``logsumexp`` it is given, so passing the merged output and log-sum-exp of several key sets yields
# the exact gradient of the joint softmax restricted to this call's keys. Pinned by
# ``tests/trl_ext/test_trl_ext_compat.py::test_cpu_flash_attention_forward`` and
# ``tests/trl_ext/test_trl_ext_compat.py::test_cpu_flash_attention_backward_uses_the_given_logsumexp``.
cpu_flash_attention = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
cpu_flash_attention_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


# ======================================================================================================= DeepSpeed


def zero3_partitioned(param: torch.Tensor) -> bool:
    """Whether ``param`` is a DeepSpeed ZeRO-3 parameter (its local tensor is an empty shard until gathered).

    deepspeed 0.19.8, ``deepspeed/runtime/zero/partition_parameters.py``: ``zero.Init`` gives each parameter a
    ``ds_id`` and a ``ds_status`` (``ZeroParamStatus``), and leaves a local tensor of 0 elements while partitioned.
    Pinned by ``tests/trl_ext/test_trl_ext_compat.py::test_zero3_parameter_attributes``.
    """
    return hasattr(param, "ds_id") and getattr(param, "ds_status", None) is not None


def zero3_full_shape(param: torch.Tensor | None):
    """The full shape of a ZeRO-3 partitioned parameter (``ds_shape``); ``None`` for any other tensor or ``None``.

    deepspeed 0.19.8, ``deepspeed/runtime/zero/partition_parameters.py``: ``zero.Init`` keeps the unpartitioned
    shape in ``ds_shape``. Pinned by ``tests/trl_ext/test_trl_ext_compat.py::test_zero3_parameter_attributes``.
    """
    return getattr(param, "ds_shape", None)


# ============================================================================================ TRL: SFTTrainer (Q-Tuning)

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
