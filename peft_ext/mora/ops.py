"""The tensor math of MoRA, as pure functions.

MoRA (Jiang et al., 2024, "MoRA: High-Rank Updating for Parameter-Efficient Fine-Tuning")
replaces LoRA's two low-rank factors with one trainable square matrix ``M`` of size
``r_hat x r_hat``. Because ``M`` is smaller than the layer, a fixed, parameter-free
compression ``f_comp: R^d_in -> R^r_hat`` and decompression ``f_decomp: R^r_hat -> R^d_out``
surround it (paper Eq. 3)::

    delta_y = f_decomp(M @ f_comp(x))

Every operator here is linear in ``x``, so there is an exact dense ``delta_W`` (d_out x d_in)
with ``delta_W @ x == delta_y``; :func:`mora_delta_weight` builds it for merging.

Operators (``mora_type``; integers are the reference implementation's aliases):

| name | alias | compress d_in -> r_hat | decompress -> d_out |
|---|---|---|---|
| ``truncation`` (Eq. 4) | | keep the first r_hat inputs | zero-pad |
| ``sharing`` (Eq. 6) | 1 | wrap x to a multiple of r_hat, sum the r_hat-chunks | tile |
| ``decoupling`` (Eq. 8) | | wrap x, apply M to each r_hat-chunk | concatenate, tile/truncate |
| ``rotation`` (Eq. 9) | 6 | as decoupling, chunk i first rotated by RoPE angles i*theta (folded into M) | as decoupling |
| ``group_interleave`` | 2 | sum runs of adjacent inputs | repeat each output (repeat_interleave) |
| ``group_tile`` | 3 | sum runs of adjacent inputs | tile |
| ``wrap_interleave`` | 4 | as sharing | repeat each output |

Rotation does not rotate the activations of a training step: the rotation R_i of chunk i is a
fixed linear map, so chunk i is multiplied by the block ``M @ R_i`` (:func:`rotated_blocks`, built
from M once per call) in one batched matmul (:func:`rotated_chunk_matmul`). Its cost over the frozen
layer is then that of decoupling, ``r_hat / d_out`` of the frozen layer's multiply-adds. With fewer
tokens than r_hat (decoding) the blocks would outnumber the activations, and the chunks are rotated.

"Wrap" pads by wrapping around: position j of the padded vector holds ``x[j % d_in]``, so
it also works when ``r_hat > d_in``. "Runs" split d_in into r_hat contiguous groups whose
sizes differ by at most one, the larger groups first. The last three operators are the
reference code's grouping variants, used by ReMoRA, which alternates sharing <-> group_interleave.

Example:
    ```py
    >>> import torch
    >>> from peft_ext.mora.ops import mora_delta_weight, mora_delta_y, mora_rank
    >>> r_hat = mora_rank(in_features=64, out_features=48, r=4, mora_type="rotation")
    >>> r_hat
    20
    >>> M = torch.randn(r_hat, r_hat, dtype=torch.float64)
    >>> x = torch.randn(3, 64, dtype=torch.float64)
    >>> delta_W = mora_delta_weight(M, 64, 48, "rotation")
    >>> torch.allclose(mora_delta_y(x, M, 48, "rotation"), x @ delta_W.T)
    True
    ```
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MORA_TYPES = (
    "truncation",
    "sharing",
    "decoupling",
    "rotation",
    "group_interleave",
    "group_tile",
    "wrap_interleave",
)
# Integer codes of the reference implementation (kongds/MoRA, `mora_type=`).
MORA_TYPE_ALIASES = {1: "sharing", 2: "group_interleave", 3: "group_tile", 4: "wrap_interleave", 6: "rotation"}

# How each operator compresses (before M) and decompresses (after M).
_COMPRESS = {
    "truncation": "truncate",
    "sharing": "wrap_sum",
    "decoupling": "chunk",
    "rotation": "chunk",  # the rotation of each chunk is folded into M (rotated_blocks)
    "group_interleave": "group_sum",
    "group_tile": "group_sum",
    "wrap_interleave": "wrap_sum",
}
_DECOMPRESS = {
    "truncation": "zero_pad",
    "sharing": "tile",
    "decoupling": "tile",
    "rotation": "tile",
    "group_interleave": "interleave",
    "group_tile": "tile",
    "wrap_interleave": "interleave",
}
ROPE_BASE = 10000.0


def resolve_mora_type(mora_type: str | int) -> str:
    """Canonical operator name for a name or a reference integer code (1, 2, 3, 4, 6).

    Example:
        ```py
        >>> resolve_mora_type(6), resolve_mora_type("sharing")
        ('rotation', 'sharing')
        ```
    """
    if isinstance(mora_type, int) and not isinstance(mora_type, bool) and mora_type in MORA_TYPE_ALIASES:
        return MORA_TYPE_ALIASES[mora_type]
    if isinstance(mora_type, str):
        name = mora_type.strip().lower()
        if name in MORA_TYPES:
            return name
        if name.isdigit() and int(name) in MORA_TYPE_ALIASES:
            return MORA_TYPE_ALIASES[int(name)]
    raise ValueError(
        f"mora_type={mora_type!r} is unknown; use one of {list(MORA_TYPES)} "
        f"or a reference code {sorted(MORA_TYPE_ALIASES)} ({MORA_TYPE_ALIASES})."
    )


def is_chunked(mora_type: str) -> bool:
    """Whether M is applied to every r_hat-chunk of the input separately (decoupling, rotation)."""
    return _COMPRESS[mora_type] == "chunk"


def mora_rank(in_features: int, out_features: int, r: int, mora_type: str = "rotation") -> int:
    """Side ``r_hat`` of the square matrix M for a LoRA-equivalent rank ``r`` (paper Sec. 3).

    ``r_hat = floor(sqrt((d_in + d_out) * r))``, so that ``r_hat**2 <= r * (d_in + d_out)``: MoRA
    never trains more parameters than LoRA of rank r on the same layer. Two adjustments keep
    every shape valid: r_hat is capped at ``max(d_in, d_out)`` (a larger M cannot express
    more), and for ``rotation`` it is rounded down to an even number (RoPE rotates pairs).
    The result is at least 1.

    Example:
        ```py
        >>> mora_rank(4096, 4096, 8, "sharing"), mora_rank(4096, 4096, 8, "rotation")
        (256, 256)
        >>> mora_rank(512, 512, 8, "sharing"), mora_rank(512, 512, 8, "rotation")
        (90, 90)
        >>> mora_rank(16, 16, 64, "sharing")  # capped at max(d_in, d_out)
        16
        ```
    """
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ValueError(f"r={r!r} must be a positive integer (the LoRA rank whose parameter budget MoRA matches).")
    if in_features <= 0 or out_features <= 0:
        raise ValueError(f"Layer shape in_features={in_features}, out_features={out_features} must be positive.")
    r_hat = math.isqrt((in_features + out_features) * r)
    r_hat = min(r_hat, max(in_features, out_features))
    if mora_type == "rotation" and r_hat >= 2:
        r_hat -= r_hat % 2
    return max(r_hat, 1)


def num_chunks(in_features: int, r_hat: int) -> int:
    """Number n of r_hat-chunks that the wrapped input is cut into: ``ceil(d_in / r_hat)``."""
    return -(-in_features // r_hat)


# ----------------------------------------------------------------------------- building blocks
def wrap_to(x: torch.Tensor, length: int) -> torch.Tensor:
    """Last dim cyclically extended (or cut) to ``length``: ``out[..., j] = x[..., j % d]``.

    This is the reference code's "pad by wrapping around" for compression and its "tile, then
    truncate" for decompression, valid for any ``length`` (also ``length > 2 * d``).
    """
    d = x.shape[-1]
    if length == d:
        return x
    full, rest = divmod(length, d)
    parts = [x] * full + ([x[..., :rest]] if rest else [])
    return torch.cat(parts, dim=-1)


def group_index(length: int, groups: int, device=None) -> torch.Tensor:
    """Group of each of ``length`` positions split into ``groups`` contiguous runs.

    With ``q, m = divmod(length, groups)`` the first m runs have q + 1 positions and the others
    q (zero positions when ``length < groups``).

    Example:
        ```py
        >>> group_index(7, 3).tolist()
        [0, 0, 0, 1, 1, 2, 2]
        ```
    """
    q, m = divmod(length, groups)
    i = torch.arange(length, device=device)
    head = m * (q + 1)
    return torch.where(i < head, i // (q + 1), m + (i - head) // max(q, 1))


def group_sum(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Sum of each run of :func:`group_index` over the last dim: (..., d) -> (..., groups)."""
    d = x.shape[-1]
    q, m = divmod(d, groups)
    head = m * (q + 1)
    sums = [x[..., :head].unflatten(-1, (m, q + 1)).sum(-1)]
    if q > 0:
        sums.append(x[..., head:].unflatten(-1, (groups - m, q)).sum(-1))
    else:
        sums.append(x.new_zeros(*x.shape[:-1], groups - m))
    return torch.cat(sums, dim=-1)


def group_expand(y: torch.Tensor, length: int) -> torch.Tensor:
    """Inverse layout of :func:`group_sum`: ``out[..., o] = y[..., group_index(length, r)[o]]``."""
    groups = y.shape[-1]
    q, m = divmod(length, groups)
    if q == 0:
        return y[..., :length]
    return torch.cat([y[..., :m].repeat_interleave(q + 1, dim=-1), y[..., m:].repeat_interleave(q, dim=-1)], dim=-1)


def rope_cos_sin(
    r_hat: int, n: int, dtype: torch.dtype = torch.float32, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables of shape (n, r_hat // 2) for rotating chunk i by angles ``i * theta_j`` (Eq. 9).

    ``theta_j = 10000^(-2j / r_hat)`` for ``j < r_hat // 2``. Computed in float64, then cast.
    """
    half = r_hat // 2
    theta = ROPE_BASE ** (-2.0 * torch.arange(half, dtype=torch.float64) / r_hat)
    angles = torch.outer(torch.arange(n, dtype=torch.float64), theta)
    return angles.cos().to(device=device, dtype=dtype), angles.sin().to(device=device, dtype=dtype)


def rotate(z: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE rotation of the last dim in the rotate-half convention: dim j pairs with j + r // 2.

    ``(z1, z2) -> (z1 cos - z2 sin, z2 cos + z1 sin)`` with ``cos``/``sin`` of size r // 2
    (broadcast over leading dims); an odd r leaves its last dim unrotated.
    """
    half = z.shape[-1] // 2
    if half == 0:
        return z
    z1, z2, rest = z[..., :half], z[..., half : 2 * half], z[..., 2 * half :]
    parts = [z1 * cos - z2 * sin, z2 * cos + z1 * sin] + ([rest] if rest.shape[-1] else [])
    return torch.cat(parts, dim=-1)


# ----------------------------------------------------------------------------- forward path
def compress(x: torch.Tensor, r_hat: int, mora_type: str) -> torch.Tensor:
    """``f_comp`` (Eqs. 4, 6, 8): (..., d_in) -> (..., n, r_hat), n = 1 unless chunked.

    For ``rotation`` these are the unrotated chunks of Eq. 8: the rotation R_i of Eq. 9 is applied
    by the blocks ``M @ R_i`` of :func:`rotated_blocks`, never to the activations.
    """
    kind = _COMPRESS[mora_type]
    d_in = x.shape[-1]
    if kind == "truncate":
        z = x[..., :r_hat] if d_in >= r_hat else F.pad(x, (0, r_hat - d_in))
        return z.unsqueeze(-2)
    if kind == "group_sum":
        return group_sum(x, r_hat).unsqueeze(-2)
    n = num_chunks(d_in, r_hat)
    z = wrap_to(x, n * r_hat).unflatten(-1, (n, r_hat))
    if kind == "wrap_sum":
        return z.sum(-2, keepdim=True)
    return z


def decompress(y: torch.Tensor, out_features: int, mora_type: str) -> torch.Tensor:
    """``f_decomp``: (..., n, r_hat) -> (..., d_out); chunk outputs are concatenated first."""
    y = y.flatten(-2)
    kind = _DECOMPRESS[mora_type]
    if kind == "tile":
        return wrap_to(y, out_features)
    if kind == "interleave":
        return group_expand(y, out_features)
    length = y.shape[-1]  # zero_pad
    return y[..., :out_features] if length >= out_features else F.pad(y, (0, out_features - length))


def _rope_tables(
    r_hat: int, n: int, rope: tuple[torch.Tensor, torch.Tensor] | None, like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``rope`` checked against (n, r_hat // 2), or computed in the dtype and device of ``like``."""
    h = r_hat // 2
    cos, sin = rope if rope is not None else rope_cos_sin(r_hat, n, dtype=like.dtype, device=like.device)
    if cos.shape != (n, h) or sin.shape != (n, h):
        raise ValueError(
            f"RoPE tables of shapes {tuple(cos.shape)}, {tuple(sin.shape)} do not fit {n} chunks of size {r_hat}; "
            f"pass rope_cos_sin({r_hat}, {n}) (or rope=None)."
        )
    return cos, sin


def _rope_columns(cos: torch.Tensor, sin: torch.Tensor, r_hat: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Column factors (n, 1, r_hat) with ``M @ R_i = M * cos_cols[i] + swap_halves(M) * sin_cols[i]``.

    From the rotate-half form of R_i (:func:`rotate`): with ``M_1``, ``M_2`` the first and second
    h = r_hat // 2 columns of M, ``M @ R_i = [M_1 cos_i + M_2 sin_i | M_2 cos_i - M_1 sin_i | M_odd]``,
    ``M_odd`` being the unrotated last column when r_hat is odd.
    """
    n, h = cos.shape
    odd = r_hat - 2 * h
    cos_cols = torch.cat([cos, cos, cos.new_ones(n, odd)], dim=-1)[:, None, :]
    sin_cols = torch.cat([sin, -sin, sin.new_zeros(n, odd)], dim=-1)[:, None, :]
    return cos_cols, sin_cols


def swap_halves(M: torch.Tensor) -> torch.Tensor:
    """Columns ``(M_2, M_1, M_odd)`` of ``(M_1, M_2, M_odd)`` (halves of size r // 2); its own inverse."""
    h = M.shape[-1] // 2
    return torch.cat([M[..., h : 2 * h], M[..., :h], M[..., 2 * h :]], dim=-1)


def _blocks(M: torch.Tensor, cos_cols: torch.Tensor, sin_cols: torch.Tensor) -> torch.Tensor:
    return torch.addcmul(M * cos_cols, swap_halves(M), sin_cols)


def rotated_blocks(M: torch.Tensor, n: int, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The n diagonal blocks ``M @ R_i`` of rotation's core (Eq. 9), shape (n, r_hat, r_hat).

    R_i rotates chunk i by ``i * theta`` (:func:`rotate`); two elementwise passes over the blocks,
    differentiable in M. ``rope`` is the (cos, sin) pair of :func:`rope_cos_sin` for (r_hat, n) in M's
    dtype; it is computed when omitted.
    """
    r_hat = M.shape[0]
    return _blocks(M, *_rope_columns(*_rope_tables(r_hat, n, rope, M), r_hat))


def _autocast_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype ``torch.bmm`` would compute ``t`` in under the autocast state of its device type."""
    device_type = t.device.type
    eligible = t.is_floating_point() and t.dtype != torch.float64  # autocast leaves float64 alone
    if eligible and torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return t.dtype


def _bmm_chunks(z: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``y[t, i] = blocks[i] @ z[t, i]``: (T, n, r_in) x (n, r_out, r_in) -> (T, n, r_out), one batched matmul.

    z and y are read and written through transposed views, which BLAS takes as strided operands:
    no activation-sized copy.
    """
    y = z.new_empty(z.shape[0], z.shape[1], blocks.shape[1])
    torch.bmm(z.transpose(0, 1), blocks.transpose(1, 2), out=y.transpose(0, 1))
    return y


class _ChunkMatmul(torch.autograd.Function):
    """:func:`_bmm_chunks` with its gradients; the input gradient is this function again (blocks
    transposed), so double backward works too."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(z, blocks)
        return _bmm_chunks(z, blocks)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        z, blocks = ctx.saved_tensors
        grad_z = grad_blocks = None
        if ctx.needs_input_grad[0]:
            grad_z = _ChunkMatmul.apply(grad_y, blocks.transpose(1, 2))
        if ctx.needs_input_grad[1]:  # sum over tokens of grad_y[t, i] (outer) z[t, i]
            grad_blocks = torch.bmm(grad_y.permute(1, 2, 0), z.transpose(0, 1))
        return grad_z, grad_blocks


class _RotatedChunkMatmul(torch.autograd.Function):
    """``y[t, i] = (M @ R_i) @ z[t, i]``, keeping only z and M for backward: the blocks are rebuilt
    there (two passes over them) rather than held from forward to backward.

    ``grad_M = sum_i grad_B_i * cos_cols[i] + swap_halves(sum_i grad_B_i * sin_cols[i])``, the transpose
    of :func:`_blocks`. The backward is made of differentiable operations, so double backward works.
    """

    @staticmethod
    def forward(ctx, z, M, cos_cols, sin_cols):
        ctx.save_for_backward(z, M, cos_cols, sin_cols)
        return _bmm_chunks(z, _blocks(M, cos_cols, sin_cols).to(z.dtype))

    @staticmethod
    def backward(ctx, grad_y):
        z, M, cos_cols, sin_cols = ctx.saved_tensors
        grad_z = grad_M = None
        if ctx.needs_input_grad[0]:
            blocks = _blocks(M, cos_cols, sin_cols).to(z.dtype)
            grad_z = _ChunkMatmul.apply(grad_y, blocks.transpose(1, 2))
        if ctx.needs_input_grad[1]:
            grad_blocks = torch.bmm(grad_y.permute(1, 2, 0), z.transpose(0, 1)).to(M.dtype)
            grad_M = (grad_blocks * cos_cols).sum(0) + swap_halves((grad_blocks * sin_cols).sum(0))
        return grad_z, grad_M, None, None


def _check_chunks(z: torch.Tensor, n: int, r_out: int, r_in: int) -> None:
    if z.shape[-2:] != (n, r_in):
        raise ValueError(f"z of shape {tuple(z.shape)} does not fit {n} blocks of shape ({r_out}, {r_in}).")


def chunk_matmul(z: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """Block i applied to chunk i: (..., n, r_in) x (n, r_out, r_in) -> (..., n, r_out).

    Equal to ``torch.einsum("...ni,noi->...no", z, blocks)`` in one batched matmul over the chunks
    without copying the activations. Under autocast, both operands are cast as ``torch.bmm`` would
    cast them.
    """
    n, r_out, r_in = blocks.shape
    _check_chunks(z, n, r_out, r_in)
    z, blocks = z.to(_autocast_dtype(z)), blocks.to(_autocast_dtype(blocks))
    if z.dtype != blocks.dtype:
        raise RuntimeError(f"z is {z.dtype} but the blocks are {blocks.dtype}; cast the input to M's dtype first.")
    y = _ChunkMatmul.apply(z.reshape(-1, n, r_in), blocks)
    return y.reshape(*z.shape[:-2], n, r_out)


def rotated_chunk_matmul(
    z: torch.Tensor, M: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None
) -> torch.Tensor:
    """Rotation's core on the unrotated chunks: ``y[..., i] = M @ R_i @ z[..., i]`` (Eq. 9).

    Whichever is smaller gets rotated. With at least r_hat tokens (training, prefill), M's n blocks
    ``M @ R_i`` (:func:`rotated_blocks`, n * r_hat**2 numbers) are applied to the chunks in one batched
    matmul; the blocks are built from M in its own dtype (then cast as ``torch.bmm`` under autocast
    would cast them) and rebuilt for backward rather than kept. With fewer tokens (decoding), the
    chunks themselves (tokens * n * r_hat numbers) are rotated and multiplied by M. Same math either way.
    """
    r_hat = M.shape[0]
    n = z.shape[-2]
    _check_chunks(z, n, r_hat, r_hat)
    cos, sin = _rope_tables(r_hat, n, rope, M)
    if z.numel() < n * r_hat * r_hat:  # fewer tokens than r_hat
        return rotate(z, cos, sin) @ M.T
    cos_cols, sin_cols = _rope_columns(cos.to(M.dtype), sin.to(M.dtype), r_hat)
    z = z.to(_autocast_dtype(z))
    compute = _autocast_dtype(M)
    if z.dtype != compute:
        raise RuntimeError(f"The input is {z.dtype} but M is {compute}; cast the input to M's dtype first.")
    y = _RotatedChunkMatmul.apply(z.reshape(-1, n, r_hat), M, cos_cols, sin_cols)
    return y.reshape(*z.shape[:-2], n, r_hat)


def mora_delta_y(
    x: torch.Tensor,
    M: torch.Tensor,
    out_features: int,
    mora_type: str,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The adapter's output ``delta_y = f_decomp(M f_comp(x))`` (Eq. 3), M of shape (r_hat, r_hat).

    M acts like an ``nn.Linear`` weight (output index first), on each chunk when chunked; for
    ``rotation``, chunk i meets ``M @ R_i`` (:func:`rotated_chunk_matmul`, ``rope`` its cached tables).
    """
    z = compress(x, M.shape[0], mora_type)
    if mora_type == "rotation":
        y = rotated_chunk_matmul(z, M, rope)
    else:
        y = z @ M.T
    return decompress(y, out_features, mora_type)


# ----------------------------------------------------------------------------- dense delta_W
def compression_index(in_features: int, r_hat: int, mora_type: str, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``f_comp`` as (slot, source) index pairs: ``z[slot[j]] += x[source[j]]`` for every j.

    Slots index the flattened (n, r_hat) compressed tensor.
    """
    kind = _COMPRESS[mora_type]
    if kind == "truncate":
        source = torch.arange(min(r_hat, in_features), device=device)
        return source, source
    if kind == "group_sum":
        return group_index(in_features, r_hat, device=device), torch.arange(in_features, device=device)
    j = torch.arange(num_chunks(in_features, r_hat) * r_hat, device=device)
    slot = j % r_hat if kind == "wrap_sum" else j
    return slot, j % in_features


def decompression_index(out_features: int, length: int, mora_type: str, device=None) -> torch.Tensor:
    """``f_decomp`` as a source index per output: ``out[o] = y[src[o]]``, or 0 where ``src[o] == -1``.

    ``length`` is the size of the flattened M output (n * r_hat).
    """
    kind = _DECOMPRESS[mora_type]
    o = torch.arange(out_features, device=device)
    if kind == "tile":
        return o % length
    if kind == "interleave":
        return group_index(out_features, length, device=device)
    return torch.where(o < length, o, -1)


def mora_delta_weight(M: torch.Tensor, in_features: int, out_features: int, mora_type: str) -> torch.Tensor:
    """Dense ``delta_W`` (d_out x d_in) with ``delta_W @ x == mora_delta_y(x, ...)`` exactly.

    ``delta_W = D @ K @ C``, with C and D the 0/1 matrices of compression and decompression and
    K the core: M, or for chunked operators the block-diagonal ``diag(M R_0, ..., M R_{n-1})``
    (R_i = I for decoupling; Eqs. 8, 9). C and D are applied as index operations
    (:func:`compression_index`, :func:`decompression_index`), never as loops over chunks.
    """
    r_hat = M.shape[0]
    if is_chunked(mora_type):
        n = num_chunks(in_features, r_hat)
        blocks = rotated_blocks(M, n) if mora_type == "rotation" else M.expand(n, r_hat, r_hat)
        eye = torch.eye(n, dtype=M.dtype, device=M.device)
        core = torch.einsum("ij,iab->iajb", eye, blocks).reshape(n * r_hat, n * r_hat)
    else:
        core = M
    slot, source = compression_index(in_features, r_hat, mora_type, device=M.device)
    core_by_input = core.new_zeros(core.shape[0], in_features).index_add(1, source, core[:, slot])
    src = decompression_index(out_features, core.shape[0], mora_type, device=M.device)
    padded = torch.cat([core_by_input, core_by_input.new_zeros(1, in_features)])  # row -1: zero output
    return padded[src]
