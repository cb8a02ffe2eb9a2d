"""Mask selectors: which entries of each weight form the subnetwork.

- :func:`diff_checkpoints`: entries that differ between a base and a tuned checkpoint (the paper's
  criterion), streamed tensor by tensor, chunk by chunk;
- :class:`SubnetWarmupCallback`: update or gradient statistics gathered while any ``transformers`` /
  TRL trainer runs (e.g. a short GRPO warm-up), exported at a density budget or a tolerance;
- :func:`random_masks`, :func:`magnitude_masks`: baselines.

Every selector returns ``{parameter name: bool tensor}``, which :class:`~peft_ext.subnet.SubnetConfig`
accepts as ``mask_source`` and :func:`~peft_ext.subnet.save_masks` writes to a file.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm
from transformers import TrainerCallback

from . import ops
from .masks import CheckpointReader, save_encoded_masks

DEFAULT_CHUNK_NUMEL = 2**22  # 4M entries per read: 16 MB per side in fp32, bounded however large a tensor is


@dataclass
class TensorDiff:
    """How one tensor changed: ``changed`` of ``numel`` entries moved beyond the tolerance; ``rank`` if computed."""

    name: str
    shape: tuple[int, ...]
    numel: int
    changed: int
    rank: int | None = None

    @property
    def fraction(self) -> float:
        return self.changed / self.numel if self.numel else 0.0


@dataclass
class CheckpointDiff:
    """Result of :func:`diff_checkpoints`: per-tensor statistics and, unless written to a file only, the masks."""

    tensors: list[TensorDiff]
    tol: float
    relative: bool
    masks: dict[str, torch.Tensor] | None = None
    stored_bytes: dict[str, int] = field(default_factory=dict)

    @property
    def numel(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def changed(self) -> int:
        return sum(t.changed for t in self.tensors)

    @property
    def fraction_changed(self) -> float:
        return self.changed / self.numel if self.numel else 0.0


def _check_same_layout(base: CheckpointReader, tuned: CheckpointReader) -> None:
    names0, names1 = set(base.names()), set(tuned.names())
    if names0 != names1:
        only0, only1 = sorted(names0 - names1), sorted(names1 - names0)
        raise ValueError(
            f"checkpoints {base.path!r} and {tuned.path!r} have different parameter names: "
            f"{len(only0)} only in the base (e.g. {only0[:3]}), {len(only1)} only in the tuned one "
            f"(e.g. {only1[:3]}). Diff a tuned model against the base it was trained from, both saved with "
            "save_pretrained (merge adapters first with merge_and_unload)."
        )
    for name in base.names():
        if base.dtype(name) != tuned.dtype(name):
            raise ValueError(
                f"parameter {name!r} is {base.dtype(name)} in {base.path!r} but {tuned.dtype(name)} in {tuned.path!r}; "
                "casting alone would count as an update. Save the base in the tuned dtype first, e.g. "
                "AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).save_pretrained(...)."
            )
        if base.shape(name) != tuned.shape(name):
            raise ValueError(
                f"parameter {name!r} has shape {base.shape(name)} in {base.path!r} but {tuned.shape(name)} in "
                f"{tuned.path!r}; the checkpoints are not the same architecture (was the vocabulary resized?)."
            )


def diff_checkpoints(
    base: str | os.PathLike,
    tuned: str | os.PathLike,
    tol: float = 1e-5,
    relative: bool = False,
    out: str | os.PathLike | None = None,
    keep_masks: bool | None = None,
    compute_rank: bool = False,
    include: Iterable[str] | None = None,
    chunk_numel: int = DEFAULT_CHUNK_NUMEL,
    progress: bool = True,
) -> CheckpointDiff:
    """Masks of the entries a fine-tuning run changed, from two (sharded) safetensors checkpoints.

    Changed means ``|w' - w| > tol`` (absolute, paper: 1e-5) or, with ``relative=True``,
    ``|w' - w| > tol * max(|w|, |w'|)`` (use ``tol=1e-3``). Tensors are read one chunk of
    ``chunk_numel`` entries at a time from each file (no memory mapping), and each mask is kept
    packed (1 bit per entry, or 4 bytes per changed entry when smaller), so peak memory is two
    chunks plus the packed masks (at most 1/16 of a bf16 checkpoint), not a shard or a model.

    Args:
        base, tuned: checkpoint folders (``model.safetensors`` or a sharded index) or files.
        tol, relative: the tolerance and its kind.
        out: write the masks file here (the ``mask_source`` format of :class:`SubnetConfig`).
        keep_masks: return dense boolean masks in ``.masks`` (default: only when ``out`` is None).
        compute_rank: also compute the rank of each 2-D update (loads that matrix whole, in float32).
        include: keep only parameters whose name contains one of these substrings.
        chunk_numel: entries per read.

    Example:
        ```py
        >>> diff = diff_checkpoints("base_dir", "grpo_dir", tol=1e-5, out="masks.safetensors")
        >>> print(f"{diff.fraction_changed:.1%} of parameters updated")
        ```
    """
    if tol < 0:
        raise ValueError(f"tol={tol} must be >= 0 (paper: 1e-5 absolute; 1e-3 with relative=True).")
    chunk_numel = max(8, chunk_numel - chunk_numel % 8)  # whole bitmap bytes per chunk
    reader0, reader1 = CheckpointReader(base), CheckpointReader(tuned)
    _check_same_layout(reader0, reader1)
    names = [n for n in reader0.names() if include is None or any(s in n for s in include)]
    keep_masks = out is None if keep_masks is None else keep_masks
    encoded, tensors, masks = {}, [], {} if keep_masks else None
    bar = tqdm(names, desc="diff", unit="tensor", disable=not progress)
    for name in bar:
        bar.set_postfix_str(reader0.file_of(name).name, refresh=False)
        numel, shape, dtype = reader0.numel(name), reader0.shape(name), reader0.dtype(name)
        # Preallocated read buffers and bitmap: no long-lived allocation lands between per-chunk
        # temporaries, so the heap does not ratchet up chunk after chunk.
        buffers = [torch.empty(min(chunk_numel, numel), dtype=dtype) for _ in range(2)]
        bitmap = torch.zeros(ops.bitmap_nbytes(numel), dtype=torch.uint8)
        changed = 0
        for start in range(0, numel, chunk_numel):
            size = min(chunk_numel, numel - start)
            before = reader0.read_into(name, start, buffers[0][:size])
            after = reader1.read_into(name, start, buffers[1][:size])
            mask = ops.changed_mask(before, after, tol, relative)
            changed += int(mask.sum())
            bitmap[start // 8 : start // 8 + ops.bitmap_nbytes(size)] = ops.pack_bits(mask)
        del buffers
        rank = None
        if compute_rank and len(shape) == 2:
            rank = ops.update_rank(reader1.tensor(name).float() - reader0.tensor(name).float())
        tensors.append(TensorDiff(name, shape, numel, changed, rank))
        if ops.choose_encoding(changed, numel) == "indices":
            indices = ops.decode_indices("bitmap", bitmap, numel, where=name)
            encoded[name] = ("indices", indices.to(ops.index_dtype(numel)), shape)
        else:
            encoded[name] = ("bitmap", bitmap, shape)
        if masks is not None:
            masks[name] = ops.unpack_bits(bitmap, numel).view(shape)
    result = CheckpointDiff(tensors=tensors, tol=tol, relative=relative, masks=masks)
    result.stored_bytes = {n: t.numel() * t.element_size() for n, (_, t, _) in encoded.items()}
    if out is not None:
        info = {"selector": "diff", "base": str(base), "tuned": str(tuned), "tol": tol, "relative": relative}
        save_encoded_masks(encoded, out, info)
    return result


# --------------------------------------------------------------------------- baselines
def _weights(model_or_state, include: Iterable[str] | None, only_matrices: bool) -> dict[str, torch.Tensor]:
    if isinstance(model_or_state, Mapping):
        items = model_or_state.items()
    else:
        items = model_or_state.named_parameters()
    include = list(include) if include is not None else None
    return {
        n: w
        for n, w in items
        if (not only_matrices or w.dim() == 2) and (include is None or any(s in n for s in include))
    }


def random_masks(
    model_or_state, density: float, seed: int = 0, include: Iterable[str] | None = None, only_matrices: bool = True
) -> dict[str, torch.Tensor]:
    """Uniformly random masks with ``round(density * numel)`` entries per weight (a baseline).

    Example:
        ```py
        >>> masks = random_masks(model, density=0.05, include=["q_proj", "up_proj"])
        ```
    """
    _check_density(density)
    return {
        n: ops.indices_to_mask(ops.random_indices(w.numel(), density, seed, n), w.shape)
        for n, w in _weights(model_or_state, include, only_matrices).items()
    }


def magnitude_masks(
    model_or_state, density: float, include: Iterable[str] | None = None, only_matrices: bool = True
) -> dict[str, torch.Tensor]:
    """Masks of the ``round(density * numel)`` largest-magnitude entries of each weight (a baseline)."""
    _check_density(density)
    return {
        n: ops.indices_to_mask(ops.magnitude_indices(w, density), w.shape)
        for n, w in _weights(model_or_state, include, only_matrices).items()
    }


def _check_density(density: float) -> None:
    if not 0 < density <= 1:
        raise ValueError(f"density={density} is outside (0, 1]; pass the fraction of entries to keep, e.g. 0.05.")


def top_fraction_masks(
    scores: Mapping[str, torch.Tensor], density: float, per_tensor: bool = False
) -> dict[str, torch.Tensor]:
    """Keep the highest-scoring ``density`` fraction of entries, over all tensors at once or per tensor.

    Global selection (the default) lets the budget flow to the weights that moved most, as a full
    run's update does; ``per_tensor=True`` spends the same fraction on every weight.
    """
    _check_density(density)
    if per_tensor:
        out = {}
        for name, s in scores.items():
            k = ops.num_selected(s.numel(), density)
            out[name] = ops.indices_to_mask(torch.topk(s.reshape(-1).float(), k).indices.sort().values, s.shape)
        return out
    flat = torch.cat([s.reshape(-1).float() for s in scores.values()])
    k = ops.num_selected(flat.numel(), density)
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[torch.topk(flat, k).indices] = True
    out, start = {}, 0
    for name, s in scores.items():
        out[name] = keep[start : start + s.numel()].view(s.shape)
        start += s.numel()
    return out


# --------------------------------------------------------------------------- warm-up callback
class SubnetWarmupCallback(TrainerCallback):
    """Collect per-parameter update statistics during any ``Trainer`` run (GRPO, DPO, SFT ...) and export masks.

    Statistics (``statistic``):

    - ``"update"``: the displacement ``|theta_t - theta_0|`` since training began (a snapshot of the
      tracked weights is kept); a tolerance export is exactly the checkpoint-diff criterion;
    - ``"grad"``: the accumulated ``sum_t |g_t|`` of the (clipped) gradients seen by the optimizer.

    Args:
        statistic: ``"update"`` or ``"grad"``.
        include: track only parameters whose name contains one of these substrings (default: all).
        only_matrices: track only 2-D weights (the ones the subnet tuner adapts).

    Example:
        ```py
        >>> warmup = SubnetWarmupCallback()
        >>> GRPOTrainer(model=model, args=GRPOConfig(max_steps=20, ...), callbacks=[warmup], ...).train()
        >>> masks = warmup.masks(density=0.2)  # or tol=1e-5
        >>> config = SubnetConfig(mask_source=masks)
        ```
    """

    def __init__(self, statistic: str = "update", include: Iterable[str] | None = None, only_matrices: bool = True):
        if statistic not in ("update", "grad"):
            raise ValueError(f"statistic={statistic!r} is unknown; use 'update' or 'grad'.")
        self.statistic = statistic
        self.include = list(include) if include is not None else None
        self.only_matrices = only_matrices
        self.params: dict[str, torch.nn.Parameter] = {}
        self.initial: dict[str, torch.Tensor] = {}
        self.grad_sums: dict[str, torch.Tensor] = {}
        self.optimizer_steps = 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise RuntimeError("SubnetWarmupCallback needs the trainer to pass `model` to its callbacks.")
        if self.params:  # resumed or second train() call: keep the original reference point
            return
        self.params = {
            n: p
            for n, p in model.named_parameters()
            if p.requires_grad
            and (not self.only_matrices or p.dim() == 2)
            and (self.include is None or any(s in n for s in self.include))
        }
        if not self.params:
            raise ValueError(
                f"SubnetWarmupCallback found no trainable parameters to track (include={self.include}); "
                "train the full model (not an adapter) and check `include`."
            )
        self.initial = {n: p.detach().clone() for n, p in self.params.items()}
        if self.statistic == "grad":
            self.grad_sums = {
                n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in self.params.items()
            }

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.statistic == "grad":
            for n, p in self.params.items():
                if p.grad is not None:
                    self.grad_sums[n] += p.grad.detach().float().abs()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.optimizer_steps += 1

    def scores(self) -> dict[str, torch.Tensor]:
        """Per-entry scores on CPU in float32: displacement (``"update"``) or summed |gradient| (``"grad"``)."""
        if not self.params:
            raise RuntimeError("no statistics yet: pass the callback to a trainer and call train() first.")
        if self.statistic == "grad":
            return {n: s.cpu() for n, s in self.grad_sums.items()}
        return {n: (p.detach().float() - self.initial[n].float()).abs().cpu() for n, p in self.params.items()}

    def masks(
        self, density: float | None = None, tol: float | None = None, relative: bool = False, per_tensor: bool = False
    ) -> dict[str, torch.Tensor]:
        """Export masks at a density budget (top entries by score) or a tolerance (score > tol).

        With ``statistic="update"``, ``relative=True`` applies ``|dw| > tol * max(|w0|, |w|)``.
        """
        if (density is None) == (tol is None):
            raise ValueError(f"pass exactly one of density={density} and tol={tol}.")
        if density is not None:
            return top_fraction_masks(self.scores(), density, per_tensor=per_tensor)
        if self.statistic == "update":
            return {
                n: ops.changed_mask(self.initial[n], p.detach(), tol, relative).cpu() for n, p in self.params.items()
            }
        if relative:
            raise ValueError("relative=True applies to statistic='update' only.")
        return {n: s > tol for n, s in self.scores().items()}
