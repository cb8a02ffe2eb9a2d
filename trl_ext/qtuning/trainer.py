"""Q-Tuning trainer: TRL's SFT trainer with joint sample and token pruning of every training batch."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch
from trl import SFTTrainer

from peft_ext._quantized import keep_4bit_training_layout

from .._args import convert_args
from .._compat import KeptTokensForward, fused_forward, sft_metrics
from .._peft import refuse_prompt_learning
from .batch import prune_labels, sample_ids_from_batch, select_samples
from .config import QTuningConfig
from .plot import EUPlaneRecord, plot_eu_plane
from .scoring import QuadrantAssignment, assign_quadrants, sample_ppl_entropy, token_keep_mask, token_scores


@dataclass
class BatchSelection:
    """What Q-Tuning keeps of one micro-batch (see :meth:`QTuningSFTTrainer.select`)."""

    assignment: QuadrantAssignment
    ppl: torch.Tensor  # (S,) per-sample perplexity
    entropy: torch.Tensor  # (S,) per-sample mean entropy
    sample_docs: torch.Tensor  # (S,) document index of each sample in the collated batch
    token_keep: torch.Tensor  # (rows, seq_len - 1) response tokens that get loss

    @property
    def keep_docs(self) -> torch.Tensor:
        return self.sample_docs[self.assignment.keep]


def _refuse_shift_labels(inputs: dict) -> None:
    if "shift_labels" in inputs:
        raise ValueError(
            "The training batch has shift_labels; Q-Tuning scores and prunes the tokens of `labels` (TRL's "
            "collators never add shift_labels). Drop shift_labels from the data collator's output."
        )


class QTuningSFTTrainer(SFTTrainer):
    """Supervised fine-tuning with Q-Tuning's joint sample and token pruning.

    A drop-in replacement for [`~trl.SFTTrainer`]: same datasets, collator, packing, PEFT and accelerate
    support. Only the training loss changes (:meth:`compute_loss`): each micro-batch is scored on the
    Error-Uncertainty plane (:mod:`trl_ext.qtuning.scoring`), ``round(sample_keep_ratio * B)`` samples are
    kept, high-perplexity tokens of the kept Q2 samples are pruned down to the token budget, and the loss
    is the mean NLL over the kept tokens. Evaluation is the stock SFT loss on whole batches.

    Selection is per process and per gradient-accumulation micro-batch: each process scores its own slice
    of the global batch (no communication), so ``N`` processes with ``per_device_train_batch_size=B`` select
    like one process running ``N`` micro-batches of ``B`` with ``gradient_accumulation_steps=N``. The loss of
    an optimizer step is normalised as SFTTrainer normalises it (``num_items_in_batch``), counting kept
    tokens: the sum of the kept tokens' NLL over the accumulation window and all processes, divided by
    the number of kept tokens there. Trainer prefetches each window's batches to count its tokens
    (:meth:`get_batch_samples`); Q-Tuning scores the window's micro-batches there and counts the kept tokens
    instead, so every backward already carries the final normalisation and gradients are never edited
    afterwards. This holds under DDP, DeepSpeed ZeRO-2/3 and FSDP2 alike. At
    ``sample_keep_ratio=token_keep_ratio=1.0`` every response token is kept and training is SFTTrainer's.

    With ``scoring="separate"`` (the default), the batch is scored by a forward pass without gradient, and
    forward and backward run on the kept samples only. With ``scoring="reuse"``, the training forward's
    outputs score the batch and the loss is masked (the paper's procedure); with gradient accumulation or
    several processes the window is scored first by forward passes without gradient (the kept-token count of
    the whole window and all processes must be known before the first backward) and the training forward
    applies that selection as a mask. The loss and SFT's metrics are always computed by
    ``SFTTrainer.compute_loss``, on the kept sub-batch (separate) or with the dropped tokens masked (reuse):
    ``num_tokens`` counts the tokens forwarded with gradient; ``entropy`` and ``mean_token_accuracy`` are over
    the kept tokens. Tensor, context and sequence parallelism are refused at construction.

    Packing: ``packing=True`` with the BFD strategies and ``padding_free=True`` work (each packed document
    is a sample); ``packing_strategy="wrapped"`` is refused by the config.

    Example:
        ```py
        >>> from trl_ext import QTuningConfig, QTuningSFTTrainer
        >>> from peft_trl_testbed import make_mixed_quality_sft, pretrained_toy_model_path, toy_args
        >>> args = toy_args(QTuningConfig, "qtuning-out", sample_keep_ratio=0.25, token_keep_ratio=0.5, max_steps=10)
        >>> trainer = QTuningSFTTrainer(model=pretrained_toy_model_path(), args=args,
        ...                             train_dataset=make_mixed_quality_sft(256))
        >>> trainer.train()
        >>> trainer.plot_eu_plane("eu_plane.png")
        ```

    Logged metrics (training, summed over processes and averaged over the logging interval):
    ``qtuning/q1`` .. ``qtuning/q4`` and ``qtuning/between`` (samples per quadrant; fillers count as Q2/Q4),
    ``qtuning/samples``, ``qtuning/kept_samples``, ``qtuning/filled_samples``, ``qtuning/kept_token_fraction``
    (kept / all response tokens of the batch) next to ``qtuning/kept_token_fraction_target``
    (``sample_keep_ratio * token_keep_ratio``), ``qtuning/a`` (the bisected quantile ratio), plus SFT's
    ``entropy``, ``mean_token_accuracy`` and ``num_tokens``.
    """

    _tag_names = ["trl", "sft", "q-tuning", "peft-trl-ext"]
    _name = "Q-Tuning"

    def __init__(self, model, args: QTuningConfig | None = None, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else getattr(model, "name_or_path", None) or "model"
            args = QTuningConfig(f"{str(name).rstrip('/').split('/')[-1]}-QTuning")
        else:  # a plain SFTConfig/TrainingArguments converts, with Q-Tuning's options at their defaults
            args = convert_args(args, QTuningConfig, "QTuningSFTTrainer")
        if args.scoring == "reuse" and (kwargs.get("compute_loss_func") is not None or args.label_smoothing_factor):
            raise ValueError(
                "scoring='reuse' masks the per-token log-probabilities of the fused LM head, which SFTTrainer does not "
                "use with compute_loss_func or label_smoothing_factor. Use scoring='separate', which trains the kept "
                "sub-batch through SFTTrainer's own loss, or drop those options."
            )
        refuse_prompt_learning(
            model,
            kwargs.get("peft_config"),
            "QTuningSFTTrainer",
            "they add virtual tokens to each sequence or to the attention cache, which Q-Tuning's per-token scores "
            "and token pruning do not account for",
        )
        super().__init__(model=model, args=args, **kwargs)
        keep_4bit_training_layout(self.model)  # evaluations must not change what trains
        sizes = {"tp_size": self.get_tp_size(), "cp_size": self.get_cp_size(), "sp_size": self.get_sp_size()}
        if any(size > 1 for size in sizes.values()):
            raise ValueError(
                f"QTuningSFTTrainer does not support tensor, context or sequence parallelism (got "
                f"{', '.join(f'{k}={v}' for k, v in sizes.items())}): context and sequence parallelism shard each "
                "sequence before the loss, so no process sees whole samples to score, and tensor-parallel ranks would "
                "count each sample once per rank. Train with data parallelism (DDP, DeepSpeed ZeRO or FSDP) instead."
            )
        self.eu_records: deque[EUPlaneRecord] = deque(maxlen=args.eu_record_steps)
        # (labels, selection) of each micro-batch of the current accumulation window, scored in get_batch_samples
        self._selections: deque[tuple[torch.Tensor, BatchSelection | None]] = deque()

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Trainer's prefetch of an accumulation window, plus Q-Tuning's selection of every micro-batch in it.

        The optimizer step's loss is the kept tokens' NLL summed over the window (and over processes) and divided
        by the number of kept tokens there, so that count must be known before the first backward. Each
        micro-batch is scored here by a forward pass without gradient (through the wrapped model, so ZeRO-3 and
        FSDP2 gather the weights as in training), and ``num_items_in_batch`` is Trainer's own count of the same
        batches with the dropped labels set to -100. :meth:`compute_loss` then trains on the recorded selections.
        One exception: ``scoring="reuse"`` with a one-batch window on one process scores with the training forward
        itself (see :meth:`compute_loss`).
        """
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._selections.clear()
        if self._scores_in_training_forward(len(batch_samples)):
            return batch_samples, num_items_in_batch
        model = self.model_wrapped
        model.train()  # score as the training forward would (dropout included)
        kept_batches = []
        for batch in batch_samples:
            inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            selection = self._score(model, inputs)
            self._selections.append((inputs["labels"], selection))
            labels = inputs["labels"] if selection is None else prune_labels(inputs["labels"], selection.token_keep)
            kept_batches.append({**inputs, "labels": labels})
        _, num_items_in_batch = super().get_batch_samples(iter(kept_batches), len(kept_batches), device)
        return batch_samples, num_items_in_batch

    def _scores_in_training_forward(self, window: int) -> bool:
        # Only there is the kept-token count that normalises the loss local to the training forward's own batch.
        return self.args.scoring == "reuse" and window == 1 and self.args.world_size == 1 and self.args.n_gpu <= 1

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Q-Tuning loss on training batches, through ``SFTTrainer.compute_loss``; SFT's loss otherwise (evaluation).

        ``scoring="separate"`` hands SFTTrainer the sub-batch of the samples that keep a token, with the pruned
        labels set to -100; ``scoring="reuse"`` hands it the whole batch and a model whose fused LM head outputs
        are zeroed outside the kept tokens (:class:`~trl_ext._compat.KeptTokensForward`). Either way SFTTrainer
        computes the loss, normalised by ``num_items_in_batch`` (the window's kept tokens, see
        :meth:`get_batch_samples`), and its metrics over the kept tokens. A batch that was not scored in
        :meth:`get_batch_samples` (``scoring="reuse"`` with a one-batch window on one process, or a direct call)
        is scored here and is its own kept-token mean.
        """
        if not self.model.training or return_outputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        _refuse_shift_labels(inputs)
        if self.args.scoring == "reuse" and not self._selections:

            def keep(outputs):
                selection = self.select(inputs, outputs.log_probs.detach(), outputs.entropy.detach())
                return selection.token_keep if selection is not None else torch.zeros_like(outputs.label_mask)

            return super().compute_loss(KeptTokensForward(model, keep), inputs)
        selection = self._recorded_selection(inputs) if self._selections else self._score(model, inputs)
        if selection is None:  # no response token anywhere: nothing to select
            return super().compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        if self.args.scoring == "reuse":
            forward = KeptTokensForward(model, lambda outputs: selection.token_keep)
            return super().compute_loss(forward, inputs, num_items_in_batch=num_items_in_batch)
        labels = prune_labels(inputs["labels"], selection.token_keep)
        # The documents that still carry a label: a kept Q2 sample can lose all its tokens to the budget.
        _, train_docs = sample_ids_from_batch({**inputs, "labels": labels})
        sub_batch = select_samples(inputs, train_docs, labels)
        return super().compute_loss(model, sub_batch, num_items_in_batch=num_items_in_batch)

    def _score(self, model, inputs) -> BatchSelection | None:
        _refuse_shift_labels(inputs)
        with torch.no_grad():
            outputs = fused_forward(model, inputs)
        return self.select(inputs, outputs.log_probs, outputs.entropy)

    def _recorded_selection(self, inputs) -> BatchSelection | None:
        labels, selection = self._selections.popleft()
        if labels.shape != inputs["labels"].shape or not torch.equal(labels, inputs["labels"].to(labels.device)):
            raise RuntimeError(
                "QTuningSFTTrainer.compute_loss got a training batch other than the next one scored in "
                "get_batch_samples; call it through Trainer's training loop, or clear trainer._selections first."
            )
        return selection

    @torch.no_grad()
    def select(self, inputs: dict, log_probs: torch.Tensor, entropy: torch.Tensor) -> BatchSelection | None:
        """Score a collated batch from per-token log-probabilities and entropies, and choose what to keep.

        ``log_probs`` and ``entropy`` are in the shifted layout of TRL's fused LM head, ``(rows, seq_len - 1)``.
        Logs the selection metrics and records the EU-plane scores. Returns ``None`` when the batch has no
        response token.
        """
        _refuse_shift_labels(inputs)
        sample_ids, sample_docs = sample_ids_from_batch(inputs)
        if log_probs.shape != sample_ids.shape:
            raise ValueError(
                f"The model returned per-token log-probabilities of shape {tuple(log_probs.shape)} for labels of shape "
                f"{tuple(inputs['labels'].shape)} (expected {tuple(sample_ids.shape)}). Q-Tuning scores the tokens of "
                "each sample, which prompt-learning adapters (prompt/prefix tuning) shift; use LoRA-style adapters."
            )
        if sample_docs.numel() == 0:
            return None
        args = self.args
        nll = -log_probs.float()
        ppl, mean_entropy, _ = sample_ppl_entropy(nll, entropy.float(), sample_ids, sample_docs.numel())
        assignment = assign_quadrants(ppl, mean_entropy, args.sample_keep_ratio)
        scores = token_scores(nll.double().exp(), sample_ids, args.neighbor_lambda)  # float32 exp overflows at 89
        token_keep = token_keep_mask(
            scores, sample_ids, assignment.quadrant, assignment.keep, args.sample_keep_ratio, args.token_keep_ratio
        )
        selection = BatchSelection(assignment, ppl, mean_entropy, sample_docs, token_keep)
        self._log_selection(selection, int((sample_ids >= 0).sum()))
        if self.eu_records.maxlen:
            self.eu_records.append(
                EUPlaneRecord(
                    step=self.state.global_step,
                    ppl=ppl.cpu(),
                    entropy=mean_entropy.cpu(),
                    quadrant=assignment.quadrant.cpu(),
                    a=assignment.a,
                    ppl_low=assignment.ppl_low,
                    ppl_high=assignment.ppl_high,
                    ent_low=assignment.ent_low,
                    ent_high=assignment.ent_high,
                    process_index=self.accelerator.process_index,
                )
            )
        return selection

    def _log_selection(self, selection: BatchSelection, num_response_tokens: int) -> None:
        assignment = selection.assignment
        quadrant = assignment.quadrant
        local = torch.tensor(
            [
                *((quadrant == q).sum().item() for q in (1, 2, 3, 4, 0)),
                quadrant.numel(),
                assignment.num_filled,
                int(selection.token_keep.sum()),
                num_response_tokens,
                assignment.a,
            ],
            dtype=torch.float64,
            device=self.accelerator.device,
        )
        total = self.accelerator.gather(local[None]).sum(0).tolist()
        q1, q2, q3, q4, between, samples, filled, kept_tokens, response_tokens, a_sum = total
        metrics = sft_metrics(self)
        for name, value in (("q1", q1), ("q2", q2), ("q3", q3), ("q4", q4), ("between", between)):
            metrics[f"qtuning/{name}"].append(value)
        metrics["qtuning/samples"].append(samples)
        metrics["qtuning/kept_samples"].append(q2 + q4)
        metrics["qtuning/filled_samples"].append(filled)
        metrics["qtuning/kept_token_fraction"].append(kept_tokens / max(response_tokens, 1))
        metrics["qtuning/kept_token_fraction_target"].append(self.args.sample_keep_ratio * self.args.token_keep_ratio)
        metrics["qtuning/a"].append(a_sum / self.accelerator.num_processes)

    def plot_eu_plane(self, path=None, steps: int | list[int] | None = None, title: str | None = None):
        """Plot the recorded EU-plane scores of this process (all recorded micro-batches, or those of ``steps``).

        Saves a PNG when ``path`` is given and returns the matplotlib figure; see
        :func:`~trl_ext.qtuning.plot.plot_eu_plane`.
        """
        records = list(self.eu_records)
        if steps is not None:
            wanted = {steps} if isinstance(steps, int) else set(steps)
            records = [r for r in records if r.step in wanted]
        if not records:
            raise ValueError(
                f"No EU-plane records for steps={steps!r} (recorded steps: {sorted({r.step for r in self.eu_records})}). "
                "Train first, with QTuningConfig(eu_record_steps > 0)."
            )
        return plot_eu_plane(records, path, title=title)
