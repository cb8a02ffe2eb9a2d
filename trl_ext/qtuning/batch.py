"""Batch layout helpers for Q-Tuning: which sample each token belongs to, and the kept sub-batch.

They read and write the dictionaries of TRL's stock ``DataCollatorForLanguageModeling``, so Q-Tuning
needs no collator of its own:

- padded batches (``input_ids``, ``attention_mask``, ``labels``; right padding): one sample per row;
- padding-free or BFD-packed batches (``input_ids``, ``position_ids``, ``labels`` and the flash-attention
  boundaries ``cu_seq_lens_*``, ``max_length_*``, ``seq_idx``; no ``attention_mask``): every document of
  the flattened row, i.e. every run of ``position_ids`` starting at 0, is a sample.

A sample is a document with at least one label that is not ``-100``; documents without one take no
part in Q-Tuning (they carry no loss).
"""

from __future__ import annotations

import torch


def is_padding_free(inputs: dict) -> bool:
    """True for the flattened layout of ``padding_free=True`` / BFD packing (position ids, no attention mask)."""
    return "position_ids" in inputs and "attention_mask" not in inputs


def document_ids(inputs: dict) -> torch.Tensor:
    """``(rows, seq_len)`` index of the document each token belongs to, numbered row-major from 0.

    Padded batches: the row index. Padding-free batches: a new document starts wherever ``position_ids``
    is 0 (trailing padding from ``pad_to_multiple_of`` forms documents without labels).
    """
    input_ids = inputs["input_ids"]
    if is_padding_free(inputs):
        starts = (inputs["position_ids"] == 0).reshape(-1).long()
        return (starts.cumsum(0) - 1).view_as(input_ids)
    rows = torch.arange(input_ids.size(0), device=input_ids.device)
    return rows[:, None].expand_as(input_ids)


def sample_ids_from_batch(inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample index of every response token in the shifted layout, and the document of each sample.

    Returns:
        ``(sample_ids, sample_docs)``: ``sample_ids`` has shape ``(rows, seq_len - 1)``; position ``t`` is
        the sample of label ``labels[:, t + 1]``, or ``-1`` when that label is ``-100``. Samples are numbered
        ``0..S-1`` in document order; ``sample_docs[j]`` is the :func:`document_ids` value of sample ``j``.

    Example:
        ```py
        >>> batch = {"input_ids": torch.ones(2, 4, dtype=torch.long),
        ...          "labels": torch.tensor([[-100, 5, 6, -100], [-100, -100, 7, 8]])}
        >>> sample_ids_from_batch(batch)[0].tolist()
        [[0, 0, -1], [-1, 1, 1]]
        ```
    """
    docs = document_ids(inputs)[:, 1:]
    labelled = inputs["labels"][:, 1:] != -100
    sample_docs, inverse = torch.unique(docs[labelled], sorted=True, return_inverse=True)
    sample_ids = torch.full_like(docs, -1)
    sample_ids[labelled] = inverse
    return sample_ids, sample_docs


def prune_labels(labels: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Copy of ``labels`` with ``-100`` at every label that the shifted ``(rows, seq_len - 1)`` mask ``keep`` drops."""
    labels = labels.clone()
    labels[:, 1:] = labels[:, 1:].masked_fill(~keep, -100)
    return labels


def select_samples(inputs: dict, keep_docs: torch.Tensor, labels: torch.Tensor) -> dict:
    """The sub-batch holding only the documents ``keep_docs`` (sorted :func:`document_ids` values).

    ``labels`` replaces ``inputs["labels"]`` (pass :func:`prune_labels` output so pruned tokens stay as
    context without loss). Padded batches keep the selected rows and are cut after the last column that
    still carries a label in any of them: later tokens cannot influence earlier ones under causal
    attention, so this trims padding and trailing pruned tokens without changing any kept token's loss.
    Padding-free batches are re-flattened from the kept documents, whole, and the boundary tensors are
    rebuilt the way TRL's collator builds them. Tensors of other keys that are laid out per row or per
    token are selected the same way; anything else is passed through.
    """
    input_ids = inputs["input_ids"]
    rows, seq_len = input_ids.shape
    out = {}
    if is_padding_free(inputs):
        token_keep = torch.isin(document_ids(inputs), keep_docs)
        for key, value in inputs.items():
            if key == "labels":
                value = labels
            if torch.is_tensor(value) and value.dim() >= 2 and value.shape[:2] == (rows, seq_len):
                out[key] = value[token_keep].unsqueeze(0)
            elif key not in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx"):
                out[key] = value
        starts = (out["position_ids"][0] == 0).nonzero().flatten()
        cu_seq_lens = torch.cat([starts, starts.new_tensor([out["position_ids"].size(1)])]).to(torch.int32)
        if "cu_seq_lens_q" in inputs:
            out["cu_seq_lens_q"] = out["cu_seq_lens_k"] = cu_seq_lens
        if "max_length_q" in inputs:
            out["max_length_q"] = out["max_length_k"] = int(cu_seq_lens.diff().max())
        if "seq_idx" in inputs:
            lengths = cu_seq_lens.diff()
            out["seq_idx"] = torch.repeat_interleave(
                torch.arange(lengths.numel(), dtype=torch.int32, device=lengths.device), lengths
            )[None]
        return out
    keep_rows = keep_docs.to(input_ids.device)
    labelled_cols = (labels[keep_rows] != -100).any(0).nonzero()
    length = int(labelled_cols.max()) + 1 if labelled_cols.numel() else 1
    for key, value in inputs.items():
        if key == "labels":
            value = labels
        if torch.is_tensor(value) and value.dim() >= 2 and value.shape[:2] == (rows, seq_len):
            out[key] = value[keep_rows, :length]
        elif torch.is_tensor(value) and value.dim() >= 1 and value.size(0) == rows:
            out[key] = value[keep_rows]
        else:
            out[key] = value
    return out
