"""REDI trainer: TRL's DPO trainer with the reference-free REDI loss."""

from __future__ import annotations

import torch
from trl import DPOTrainer

from .._args import convert_args
from .._compat import NO_REFERENCE_MODEL, dpo_metrics, log_dpo_policy_metrics, reference_free_ref_model
from ..prefix_sharing.trainer import PrefixSharingMixin
from .config import REDIConfig
from .loss import redi_loss, sequence_logps

_NON_MODEL_KEYS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}


class REDITrainer(PrefixSharingMixin, DPOTrainer):
    """Reinforcement distillation (REDI) on (prompt, chosen, rejected) preference data.

    A drop-in replacement for [`~trl.DPOTrainer`]: the same datasets (plain or conversational
    prompt/chosen/rejected), collator, PEFT and accelerate support, with the REDI loss of
    :func:`~trl_ext.redi.loss.redi_loss` instead of DPO's. No reference model is created or
    loaded and there is no beta, so each step is one forward over chosen and rejected.

    Example:
        ```py
        >>> from trl_ext import REDIConfig, REDITrainer
        >>> from peft_trl_testbed import make_reasoning_preferences, toy_args, pretrained_toy_model_path
        >>> args = toy_args(REDIConfig, "redi-out", redi_alpha=0.8, max_steps=10)
        >>> trainer = REDITrainer(model=pretrained_toy_model_path(), args=args,
        ...                       train_dataset=make_reasoning_preferences(64))
        >>> trainer.train()
        ```

    Logged metrics: ``logps/chosen`` and ``logps/rejected`` (summed, as DPO logs them),
    ``logps_norm/chosen``, ``logps_norm/rejected`` and ``logps_norm/margin`` (the quantities
    REDI optimises), ``rewards/accuracies`` (share of pairs with chosen_norm > rejected_norm),
    ``entropy``, ``mean_token_accuracy``, ``logits/chosen``, ``logits/rejected``, ``num_tokens``, and
    ``aux_loss`` on Mixture-of-Experts models. The policy metrics are computed as ``DPOTrainer`` computes them
    (:func:`trl_ext._compat.log_dpo_policy_metrics`); DPO's ``rewards/chosen``, ``rewards/rejected`` and
    ``rewards/margins`` need a reference model and are not logged.
    """

    _tag_names = ["trl", "redi", "peft-trl-ext"]
    _name = "REDI"
    loss_is_scaled_for_ga = False  # compute_loss returns each micro-batch's mean; Trainer divides by the accumulation
    ref_model = reference_free_ref_model("REDITrainer")

    def __init__(self, model, ref_model=None, args: REDIConfig | None = None, train_dataset=None, **kwargs):
        if ref_model is not None:
            raise ValueError(
                "REDITrainer got a ref_model, but REDI is reference-free: its loss uses only the policy's "
                "length-normalised log-likelihoods, so a reference model would cost memory and compute for nothing. "
                "Remove ref_model (use trl.DPOTrainer if you want a reference-regularised objective)."
            )
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "name_or_path", None)
            name = "model" if name is None else name
            args = REDIConfig(f"{str(name).rstrip('/').split('/')[-1]}-REDI")
        else:  # a plain DPOConfig/TrainingArguments converts, with redi_alpha at its default
            args = convert_args(args, REDIConfig, "REDITrainer")
        _check_preference_columns(train_dataset, "train_dataset")
        _check_preference_columns(kwargs.get("eval_dataset"), "eval_dataset")
        # Given a reference, DPOTrainer neither loads one nor copies a pretrained adapter into a "ref" adapter; the
        # ref_model attribute above keeps it None (see trl_ext._compat.reference_free_ref_model).
        super().__init__(model=model, ref_model=NO_REFERENCE_MODEL, args=args, train_dataset=train_dataset, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The REDI loss of one ``[chosen; rejected]`` batch (its own mean over pairs; ``num_items_in_batch`` is
        not used, as in ``DPOTrainer``), plus the MoE load-balancing loss as ``DPOTrainer`` adds it."""
        mode = "train" if self.model.training else "eval"
        model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        if self.aux_loss_enabled:
            model_kwargs["output_router_logits"] = True
        completion_mask = inputs["completion_mask"]
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        # The fused LM head returns per-token log-probs without materialising full-vocabulary logits.
        outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
        shift_mask = completion_mask[:, 1:]
        per_token_logps = outputs.log_probs[:, -shift_mask.size(1) :]  # prompt-learning PEFT prepends virtual tokens

        logps, lengths = sequence_logps(per_token_logps, shift_mask)
        chosen_logps, rejected_logps = logps.chunk(2, dim=0)  # the collator stacks [chosen; rejected]
        chosen_lengths, rejected_lengths = lengths.chunk(2, dim=0)
        loss, chosen_norm, rejected_norm = redi_loss(
            chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, alpha=self.args.redi_alpha
        )
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss

        log_dpo_policy_metrics(self, mode, inputs, outputs, shift_mask, per_token_logps)
        self._log_redi_metrics(mode, chosen_norm, rejected_norm)
        if return_outputs:
            with torch.no_grad():
                outputs = model(**{k: v for k, v in model_kwargs.items() if k != "output_router_logits"})
            return loss, outputs
        return loss

    @torch.no_grad()
    def _log_redi_metrics(self, mode, chosen_norm, rejected_norm):
        """The quantities REDI optimises, which DPO does not log: the length-normalised log-likelihoods, their
        margin, and the share of pairs the policy ranks right by them (``rewards/accuracies``)."""
        gather = self.accelerator.gather_for_metrics
        metrics = dpo_metrics(self, mode)
        margin = chosen_norm - rejected_norm
        metrics["logps_norm/chosen"].append(gather(chosen_norm).mean().item())
        metrics["logps_norm/rejected"].append(gather(rejected_norm).mean().item())
        metrics["logps_norm/margin"].append(gather(margin).mean().item())
        metrics["rewards/accuracies"].append(gather((margin > 0).float()).mean().item())


def _check_preference_columns(dataset, name: str) -> None:
    """Refuse a dataset that is not in preference format, naming what is missing."""
    if dataset is None:
        return
    datasets = dataset.values() if isinstance(dataset, dict) else [dataset]
    for ds in datasets:
        columns = getattr(ds, "column_names", None)
        if columns is None:
            continue
        missing = [c for c in ("chosen", "rejected") if c not in columns]
        if missing:
            raise ValueError(
                f"{name} is missing the column(s) {missing}; it has {columns}. REDI needs preference data: "
                "(prompt, chosen=correct trace, rejected=incorrect trace). Build it from labelled traces with "
                "trl_ext.redi.build_redi_pairs."
            )
