"""Pure tensor math of the subnetwork tuner: masks, their storage encodings and the subnet update.

A mask over a weight ``W0`` (any shape, flattened row-major in its storage layout) is kept as
sorted flat ``int64`` indices ``I`` of its ``k`` selected entries. The tuner trains ``k``
values ``v`` and uses ``W = W0 + scatter(I, v)``.

On disk a mask costs the smaller of

- sorted flat indices: 4 bytes per entry as ``int32`` (8 bytes as ``int64`` once
  ``numel >= 2**31``), i.e. ``4k`` bytes;
- a packed bitmap: 1 bit per *parameter*, i.e. ``ceil(numel / 8)`` bytes, smaller as soon as
  the density ``k / numel`` exceeds 1/32 (1/64 for int64-sized tensors).

Nothing here knows about PEFT, configs or files; everything is testable against brute force.
"""

from __future__ import annotations

import zlib
from contextlib import contextmanager

import torch
import torch.nn.functional as F

INT32_LIMIT = 2**31
ENCODINGS = ("indices", "bitmap")
_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


# --------------------------------------------------------------------------- sizes and encodings
def index_dtype(numel: int) -> torch.dtype:
    """Dtype of stored flat indices for a tensor of ``numel`` entries: int32, or int64 once numel >= 2**31."""
    return torch.int32 if numel < INT32_LIMIT else torch.int64


def index_nbytes(k: int, numel: int) -> int:
    """Bytes of ``k`` stored flat indices into a tensor of ``numel`` entries."""
    return k * (4 if numel < INT32_LIMIT else 8)


def bitmap_nbytes(numel: int) -> int:
    """Bytes of a packed bitmap (1 bit per entry, padded to whole bytes) over ``numel`` entries."""
    return (numel + 7) // 8


def choose_encoding(k: int, numel: int) -> str:
    """The smaller storage encoding for ``k`` selected entries out of ``numel``: "indices" or "bitmap".

    Example:
        ```py
        >>> choose_encoding(k=10, numel=4096), choose_encoding(k=1000, numel=4096)
        ('indices', 'bitmap')
        ```
    """
    return "indices" if index_nbytes(k, numel) <= bitmap_nbytes(numel) else "bitmap"


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a boolean tensor (flattened) into uint8: entry ``i`` is bit ``i % 8`` (LSB first) of byte ``i // 8``."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = F.pad(flat, (0, pad))
    return (flat.view(-1, 8) * _BIT_WEIGHTS.to(flat.device)).sum(dim=1, dtype=torch.uint8)


def unpack_bits(bitmap: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: a flat boolean tensor of ``numel`` entries."""
    bits = (bitmap.reshape(-1, 1) & _BIT_WEIGHTS.to(bitmap.device)) != 0
    return bits.reshape(-1)[:numel]


def mask_to_indices(mask: torch.Tensor) -> torch.Tensor:
    """Sorted flat int64 indices of the True entries of a mask of any shape."""
    return torch.nonzero(mask.reshape(-1), as_tuple=False).reshape(-1)


def indices_to_mask(indices: torch.Tensor, shape) -> torch.Tensor:
    """Dense boolean mask of ``shape`` with the flat ``indices`` set."""
    numel = 1
    for d in shape:
        numel *= int(d)
    mask = torch.zeros(numel, dtype=torch.bool, device=indices.device)
    mask[indices.long()] = True
    return mask.reshape(tuple(shape))


def encode_indices(indices: torch.Tensor, numel: int, encoding: str = "auto") -> tuple[str, torch.Tensor]:
    """Encode sorted flat indices for storage; returns ``(encoding, tensor)``.

    ``encoding="auto"`` picks the smaller of :func:`choose_encoding`'s two formats.
    """
    if encoding == "auto":
        encoding = choose_encoding(indices.numel(), numel)
    if encoding == "indices":
        return "indices", indices.to(index_dtype(numel)).contiguous()
    if encoding == "bitmap":
        return "bitmap", pack_bits(indices_to_mask(indices, (numel,)))
    raise ValueError(f"encoding={encoding!r} is unknown; use 'auto', 'indices' or 'bitmap'.")


def check_indices(indices: torch.Tensor, numel: int, where: str = "mask") -> None:
    """Raise ``ValueError`` unless ``indices`` are 1-D integer, strictly increasing and inside ``[0, numel)``.

    Called on every loaded mask *before* the indices touch a weight, so a corrupt or foreign file
    fails with a message instead of writing out of bounds.
    """
    if indices.dtype not in (torch.int32, torch.int64) or indices.dim() != 1:
        raise ValueError(
            f"{where}: indices must be a 1-D int32/int64 tensor, got dtype={indices.dtype} shape={tuple(indices.shape)}."
        )
    if indices.numel() == 0:
        return
    low, high = int(indices.min()), int(indices.max())
    if low < 0 or high >= numel:
        bad = low if low < 0 else high
        raise ValueError(
            f"{where}: index {bad} is out of bounds for a weight with {numel} entries (valid: 0..{numel - 1}). "
            "The mask was made for a different (larger) weight; load it on the base model it was created for."
        )
    if indices.numel() > 1 and not bool((indices[1:] > indices[:-1]).all()):
        raise ValueError(
            f"{where}: indices are not strictly increasing (duplicates or unsorted); "
            "re-create the mask with peft_ext.subnet selectors, which write sorted unique indices."
        )


def decode_indices(encoding: str, tensor: torch.Tensor, numel: int, where: str = "mask") -> torch.Tensor:
    """Decode a stored mask to sorted flat int64 indices, validating it against a weight of ``numel`` entries."""
    if encoding == "indices":
        check_indices(tensor, numel, where)
        return tensor.to(torch.int64)
    if encoding == "bitmap":
        if tensor.dtype != torch.uint8 or tensor.dim() != 1 or tensor.numel() != bitmap_nbytes(numel):
            raise ValueError(
                f"{where}: a bitmap for a weight with {numel} entries must be a 1-D uint8 tensor of "
                f"{bitmap_nbytes(numel)} bytes, got dtype={tensor.dtype} shape={tuple(tensor.shape)}; "
                "the mask was made for a weight of a different size."
            )
        bits = unpack_bits(tensor, bitmap_nbytes(numel) * 8)
        if bool(bits[numel:].any()):
            raise ValueError(
                f"{where}: bitmap has bits set past entry {numel - 1} (out of bounds); "
                "the mask was made for a different weight."
            )
        return mask_to_indices(bits[:numel])
    raise ValueError(f"{where}: unknown mask encoding {encoding!r}; expected 'indices' or 'bitmap'.")


# --------------------------------------------------------------------------- baselines
def num_selected(numel: int, density: float) -> int:
    """Entries a density budget keeps in a tensor: ``round(density * numel)``, at least 1."""
    return min(numel, max(1, round(density * numel)))


def stable_seed(seed: int, name: str) -> int:
    """A per-tensor seed that depends only on ``seed`` and ``name`` (not on Python's hash randomisation)."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


def random_indices(numel: int, density: float, seed: int = 0, name: str = "") -> torch.Tensor:
    """Uniformly random mask with exactly :func:`num_selected` entries, reproducible from ``(seed, name)``."""
    generator = torch.Generator().manual_seed(stable_seed(seed, name))
    k = num_selected(numel, density)
    return torch.randperm(numel, generator=generator)[:k].sort().values


def magnitude_indices(weight: torch.Tensor, density: float) -> torch.Tensor:
    """Mask of the :func:`num_selected` largest-|w| entries of ``weight`` (ties broken by position)."""
    k = num_selected(weight.numel(), density)
    scores = weight.detach().reshape(-1).abs().float()
    return torch.topk(scores, k, sorted=False).indices.sort().values.cpu()


# --------------------------------------------------------------------------- what changed
def changed_mask(before: torch.Tensor, after: torch.Tensor, tol: float = 1e-5, relative: bool = False) -> torch.Tensor:
    """Entries that an update changed, computed in float32.

    - absolute (paper): changed iff ``|w' - w| > tol``;
    - relative ("The Path Not Taken"): changed iff ``|w' - w| > tol * max(|w|, |w'|)`` (use tol=1e-3).
    """
    w0, w1 = before.float(), after.float()
    delta = (w1 - w0).abs_()
    if relative:
        return delta > tol * torch.maximum(w0.abs(), w1.abs())
    return delta > tol


def update_rank(delta: torch.Tensor, rtol: float | None = None) -> int:
    """Numerical rank of a 2-D update ``W1 - W0`` (``torch.linalg.matrix_rank`` in float32)."""
    if delta.dim() != 2:
        raise ValueError(f"update_rank needs a matrix, got shape {tuple(delta.shape)}.")
    return int(torch.linalg.matrix_rank(delta.float(), rtol=rtol))


def mask_overlap(intersection: int, size1: int, size2: int) -> dict[str, float]:
    """One-sided overlaps and Jaccard from set sizes.

    ``o1 = |I1 ∩ I2| / |I1|``, ``o2 = |I1 ∩ I2| / |I2|``, ``jaccard = |I1 ∩ I2| / |I1 ∪ I2|``
    (paper Sec. 5); 0 where a denominator is empty.
    """
    union = size1 + size2 - intersection
    return {
        "o1": intersection / size1 if size1 else 0.0,
        "o2": intersection / size2 if size2 else 0.0,
        "jaccard": intersection / union if union else 0.0,
    }


def random_overlap(density1: float, density2: float) -> dict[str, float]:
    """Expected :func:`mask_overlap` of two independent uniformly random masks of the given densities."""
    both = density1 * density2
    union = density1 + density2 - both
    return {"o1": density2, "o2": density1, "jaccard": both / union if union else 0.0}


# --------------------------------------------------------------------------- the subnet update
def subnet_weight(weight: torch.Tensor, deltas) -> torch.Tensor:
    """``W0 + scatter(I_a, v_a)`` for each ``(I_a, v_a)`` in ``deltas``, out of place (differentiable in ``v``).

    Each masked entry is updated as ``(w.to(v.dtype) + v).to(w.dtype)``: the sum is taken in the
    precision of ``v`` and rounded once, exactly as :func:`merge_subnet_` does it in place, so
    merged and unmerged outputs are bitwise identical.
    """
    flat = weight.reshape(-1)
    for indices, values in deltas:
        updated = (flat[indices].to(values.dtype) + values).to(weight.dtype)
        flat = flat.index_put((indices,), updated)
    return flat.view(weight.shape)


def merge_subnet_(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """In place ``W[I] = W[I] + v`` (rounded once, as in :func:`subnet_weight`); returns the old ``W[I]``.

    Writing the returned values back (:func:`unmerge_subnet_`) restores ``W`` bit for bit,
    which subtraction in floating point would not.
    """
    flat = weight.view(-1)
    old = flat[indices].clone()
    flat[indices] = (old.to(values.dtype) + values).to(weight.dtype)
    return old


def unmerge_subnet_(weight: torch.Tensor, indices: torch.Tensor, old: torch.Tensor) -> None:
    """Undo :func:`merge_subnet_` exactly by restoring the saved entries."""
    weight.view(-1)[indices] = old


@contextmanager
def patched_weight(weight: torch.Tensor, indices, values):
    """Temporarily write ``W[I_a] + v_a`` into ``weight`` in place; restore the saved entries bit for bit on exit.

    Costs O(k) instead of the O(numel) copy that building ``W0 + scatter(I, v)`` out of place needs.
    Works on ``weight.data`` (the base weight is frozen) and restores before returning, so it is safe
    for ops issued in order on one device/stream; not for a model shared by concurrent threads.
    """
    data = weight.data
    saved = []
    try:
        for idx, v in zip(indices, values):
            saved.append((idx, merge_subnet_(data, idx, v.detach())))
        yield data
    finally:
        for idx, old in reversed(saved):
            unmerge_subnet_(data, idx, old)


class SubnetLinearFunction(torch.autograd.Function):
    """``y = x W^T + b`` with ``W = W0 + sum_a scatter(I_a, v_a)``; gradients flow to the ``v_a`` only.

    SHiRA builds ``W`` with autograd (a dense copy plus a sparse add) and keeps it alive until
    backward. Here forward and backward patch the ``k`` masked entries of the frozen base weight in
    place and restore them exactly (:func:`patched_weight`): O(k) extra work per pass and no dense
    copy kept for backward. ``dL/dv_a = (dL/dW)[I_a]``. ``fan_in_fan_out`` means the weight is
    stored ``(in, out)`` as in GPT-2's ``Conv1D``; indices refer to the stored layout.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, fan_in_fan_out, indices, *values):
        ctx.fan_in_fan_out = fan_in_fan_out
        ctx.indices = indices
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight, *values)
        with _effective_weight(weight, indices, values) as w:
            return F.linear(x, w.t() if fan_in_fan_out else w, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, *values = ctx.saved_tensors
        dtype = grad_out.dtype
        needs = ctx.needs_input_grad
        grad_x = grad_weight = grad_bias = None
        if needs[0]:
            with _effective_weight(weight, ctx.indices, values) as w:
                w = w.to(dtype)
                grad_x = (grad_out @ (w.t() if ctx.fan_in_fan_out else w)).to(x.dtype)
        grad_values = [None] * len(values)
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        k_total = sum(idx.numel() for idx in ctx.indices)
        if not needs[1] and g2.shape[0] * k_total <= weight.numel():
            # few tokens: k sampled dot products are cheaper than the dense dL/dW
            grad_values = [
                masked_weight_grad(x2, g2, idx, weight.shape, ctx.fan_in_fan_out).to(v.dtype) if need else None
                for idx, v, need in zip(ctx.indices, values, needs[5:])
            ]
        elif needs[1] or any(needs[5:]):
            dense = x2.t() @ g2 if ctx.fan_in_fan_out else g2.t() @ x2  # dL/dW in the stored layout
            flat = dense.reshape(-1)
            grad_values = [
                flat[idx].to(v.dtype) if need else None for idx, v, need in zip(ctx.indices, values, needs[5:])
            ]
            if needs[1]:
                grad_weight = dense.to(weight.dtype)
        if ctx.has_bias and needs[2]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return (grad_x, grad_weight, grad_bias, None, None, *grad_values)


def masked_weight_grad(x2, g2, indices, shape, fan_in_fan_out: bool = False) -> torch.Tensor:
    """Entries ``I`` of ``dL/dW`` for ``y = x W^T`` (or ``x W`` when ``fan_in_fan_out``) without forming it.

    ``dL/dW[r, c] = sum_t g[t, r] x[t, c]`` (Linear, W is (out, in)) or ``sum_t x[t, r] g[t, c]``
    (Conv1D, W is (in, out)): one sampled dot product per masked entry, O(tokens * k).
    """
    rows, cols = indices // shape[1], indices % shape[1]
    if fan_in_fan_out:
        return (x2[:, rows] * g2[:, cols]).sum(0)
    return (g2[:, rows] * x2[:, cols]).sum(0)


@contextmanager
def _effective_weight(weight, indices, values):
    if weight.is_contiguous():
        with patched_weight(weight, indices, values) as w:
            yield w
    else:  # a view we cannot patch through: build the copy
        yield subnet_weight(weight.detach(), list(zip(indices, values)))


def subnet_linear(x, weight, bias, indices, values, fan_in_fan_out: bool = False) -> torch.Tensor:
    """Functional form of :class:`SubnetLinearFunction` for lists of per-adapter ``indices`` and ``values``.

    Example:
        ```py
        >>> w = torch.zeros(2, 3); idx = torch.tensor([1, 5]); v = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> subnet_linear(torch.ones(1, 3), w, None, [idx], [v])
        tensor([[1., 2.]], grad_fn=<SubnetLinearFunctionBackward>)
        ```
    """
    return SubnetLinearFunction.apply(x, weight, bias, fan_in_fan_out, list(indices), *values)
