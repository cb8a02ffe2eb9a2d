"""Slow, obvious references for MoRA, written from the paper's formulas with explicit loops.

They share no code with ``peft_ext.mora`` so that tests compare two independent derivations:
- :func:`reference_delta_weight` builds the dense update D @ K @ C entry by entry;
- :func:`reference_code_forward` follows the forward pass of the public reference
  implementation (types 1 = sharing and 6 = rotation) step by step;
- :func:`reference_rotation_forward` rotates the activations chunk by chunk and then applies M,
  for any shape (differentiable, for gradient checks).
"""

import math

import torch


def _groups(length: int, r: int) -> list[list[int]]:
    """Split range(length) into r contiguous runs, the first ``length % r`` runs one longer."""
    sizes = [length // r + 1] * (length % r) + [length // r] * (r - length % r)
    runs, start = [], 0
    for size in sizes:
        runs.append(list(range(start, start + size)))
        start += size
    return runs


def _rotation_matrix(r: int, chunk: int) -> torch.Tensor:
    """R_i of Eq. 9 with rotate-half pairing (j, j + r/2), angle chunk * 10000^(-2j/r)."""
    R = torch.eye(r, dtype=torch.float64)
    h = r // 2
    for j in range(h):
        a = chunk * 10000.0 ** (-2.0 * j / r)
        R[j, j], R[j, j + h] = math.cos(a), -math.sin(a)
        R[j + h, j], R[j + h, j + h] = math.sin(a), math.cos(a)
    return R


def reference_delta_weight(M: torch.Tensor, d_in: int, d_out: int, mora_type: str) -> torch.Tensor:
    """Dense delta_W (float64) of each operator, from the definitions in the method spec."""
    M = M.detach().double()
    r = M.shape[0]
    if mora_type in ("decoupling", "rotation"):
        n = math.ceil(d_in / r)
        P = torch.zeros(n * r, d_in, dtype=torch.float64)  # pad by wrapping around
        for j in range(n * r):
            P[j, j % d_in] = 1.0
        K = torch.zeros(n * r, n * r, dtype=torch.float64)  # blockdiag(M R_0, M R_1, ...)
        for i in range(n):
            R = _rotation_matrix(r, i) if mora_type == "rotation" else torch.eye(r, dtype=torch.float64)
            K[i * r : (i + 1) * r, i * r : (i + 1) * r] = M @ R
        T = torch.zeros(d_out, n * r, dtype=torch.float64)  # concatenate, then truncate or tile
        for o in range(d_out):
            T[o, o % (n * r)] = 1.0
        return T @ K @ P

    C = torch.zeros(r, d_in, dtype=torch.float64)
    if mora_type == "truncation":
        for k in range(min(r, d_in)):
            C[k, k] = 1.0
    elif mora_type in ("sharing", "wrap_interleave"):
        n = math.ceil(d_in / r)
        for j in range(n * r):  # padded x[j] = x[j % d_in] is summed into slot j % r
            C[j % r, j % d_in] += 1.0
    else:  # group_interleave, group_tile
        for g, run in enumerate(_groups(d_in, r)):
            for i in run:
                C[g, i] = 1.0

    D = torch.zeros(d_out, r, dtype=torch.float64)
    if mora_type == "truncation":
        for o in range(min(r, d_out)):
            D[o, o] = 1.0
    elif mora_type in ("sharing", "group_tile"):
        for o in range(d_out):
            D[o, o % r] = 1.0
    else:  # group_interleave, wrap_interleave: repeat each output over a run
        for g, run in enumerate(_groups(d_out, r)):
            for o in run:
                D[o, g] = 1.0
    return D @ M @ C


def reference_code_forward(x: torch.Tensor, M: torch.Tensor, d_out: int, code: int) -> torch.Tensor:
    """delta_y as the reference implementation computes it for type 1 (sharing) or 6 (rotation).

    Valid where that code runs: the wrap-around padding must fit in one copy of x.
    """
    r = M.shape[0]
    d_in = x.shape[-1]
    chunks = d_in // r
    if d_in % r:
        pad = r - d_in % r
        assert pad <= d_in, "the reference code cannot pad this shape"
        x = torch.cat([x, x[..., :pad]], dim=-1)
        chunks += 1
    z = x.view(*x.shape[:-1], chunks, r)
    if code == 1:
        z = z.sum(dim=-2)
    else:
        inv_freq = 1.0 / (10000 ** (torch.arange(0, r, 2, dtype=torch.float64) / r))
        freqs = torch.outer(torch.arange(chunks, dtype=torch.float64), inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        z_rot = torch.cat([-z[..., r // 2 :], z[..., : r // 2]], dim=-1)
        z = z * emb.cos().to(z.dtype) + z_rot * emb.sin().to(z.dtype)
    y = z @ M.T  # the reference applies M as an nn.Linear weight
    if code == 1:
        reps = math.ceil(d_out / r)
        return torch.cat([y] * reps, dim=-1)[..., :d_out]
    y = y.reshape(*y.shape[:-2], -1)[..., :d_out]
    if y.shape[-1] < d_out:
        reps = math.ceil(d_out / y.shape[-1])
        y = torch.cat([y] * reps, dim=-1)[..., :d_out]
    return y


def reference_rotation_forward(x: torch.Tensor, M: torch.Tensor, d_out: int) -> torch.Tensor:
    """``rotation``'s delta_y by rotating each activation chunk, then multiplying by M (Eqs. 8, 9).

    Chunk i of the wrapped input is rotated by R_i (:func:`_rotation_matrix`, an odd r leaves its last
    dim alone), multiplied by M, and the chunk outputs are concatenated and tiled (or cut) to d_out.
    Any shape: d_in not a multiple of r, r > d_in, any leading dims. Differentiable in x and M.
    """
    r = M.shape[0]
    d_in = x.shape[-1]
    n = math.ceil(d_in / r)
    outputs = []
    for i in range(n):
        chunk = x[..., [(i * r + k) % d_in for k in range(r)]]  # wrap around: padded x[j] = x[j % d_in]
        rotated = chunk @ _rotation_matrix(r, i).to(x).T
        outputs.append(rotated @ M.T)
    y = torch.cat(outputs, dim=-1)
    return y[..., [o % (n * r) for o in range(d_out)]]
