"""MoRA's pure tensor math against slow references built from the formulas."""

import math

import pytest
import torch
from mora_reference import reference_code_forward, reference_delta_weight, reference_rotation_forward

from peft_ext.mora import ops

# (d_in, d_out, r): square, non-square both ways, r_hat > d_in, d_out < r_hat, tiny, capped.
SHAPES = [
    (32, 32, 4),
    (64, 48, 4),
    (48, 64, 2),
    (7, 13, 3),
    (4, 64, 8),  # r_hat = 23 > d_in
    (64, 4, 8),  # d_out < r_hat
    (3, 50, 2),  # r_hat = 10, wraps x more than twice
    (1, 1, 1),
    (2, 3, 1),
    (3, 2, 16),  # r_hat capped at max(d_in, d_out)
]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("mora_type", ops.MORA_TYPES)
@pytest.mark.parametrize("d_in,d_out,r", SHAPES)
def test_delta_weight_matches_loop_reference(mora_type, d_in, d_out, r):
    r_hat = ops.mora_rank(d_in, d_out, r, mora_type)
    M = torch.randn(r_hat, r_hat, dtype=torch.float64, generator=torch.Generator().manual_seed(r_hat))
    expected = reference_delta_weight(M, d_in, d_out, mora_type)
    actual = ops.mora_delta_weight(M, d_in, d_out, mora_type)
    assert actual.shape == (d_out, d_in)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mora_type", ops.MORA_TYPES)
@pytest.mark.parametrize("d_in,d_out,r", SHAPES)
def test_forward_equals_dense_reference(mora_type, d_in, d_out, r):
    r_hat = ops.mora_rank(d_in, d_out, r, mora_type)
    gen = torch.Generator().manual_seed(0)
    M = torch.randn(r_hat, r_hat, dtype=torch.float64, generator=gen)
    x = torch.randn(2, 5, d_in, dtype=torch.float64, generator=gen)
    expected = x @ reference_delta_weight(M, d_in, d_out, mora_type).T
    assert rel_err(ops.mora_delta_y(x, M, d_out, mora_type), expected) < 1e-12


@pytest.mark.parametrize("code,mora_type", [(1, "sharing"), (6, "rotation")])
@pytest.mark.parametrize("d_in,d_out,r", [(64, 48, 4), (48, 64, 2), (32, 96, 4), (100, 30, 8), (64, 64, 8)])
def test_forward_matches_reference_code(code, mora_type, d_in, d_out, r):
    r_hat = ops.mora_rank(d_in, d_out, r, mora_type)
    gen = torch.Generator().manual_seed(1)
    M = torch.randn(r_hat, r_hat, dtype=torch.float64, generator=gen)
    x = torch.randn(3, d_in, dtype=torch.float64, generator=gen)
    expected = reference_code_forward(x, M, d_out, code)
    assert rel_err(ops.mora_delta_y(x, M, d_out, ops.resolve_mora_type(code)), expected) < 1e-12


def test_rank_sizing_follows_paper_and_never_exceeds_lora_budget():
    assert ops.mora_rank(4096, 4096, 8, "sharing") == 256  # paper: r=8 on 4096x4096 -> 256
    assert ops.mora_rank(512, 512, 8, "sharing") == math.floor(math.sqrt(1024 * 8)) == 90
    assert ops.mora_rank(64, 48, 4, "sharing") == 21  # the reference's round-to-nearest gives 22 > budget
    assert ops.mora_rank(64, 48, 4, "rotation") == 20
    for d_in in (1, 2, 3, 5, 16, 33, 64, 100):
        for d_out in (1, 2, 7, 16, 64, 257):
            for r in (1, 2, 3, 8, 64):
                for mora_type in ops.MORA_TYPES:
                    r_hat = ops.mora_rank(d_in, d_out, r, mora_type)
                    assert 1 <= r_hat <= max(d_in, d_out)
                    assert r_hat**2 <= r * (d_in + d_out)
                    if mora_type == "rotation" and r_hat > 1:
                        assert r_hat % 2 == 0


def test_reference_integer_codes_and_errors():
    assert [ops.resolve_mora_type(c) for c in (1, 2, 3, 4, 6)] == [
        "sharing",
        "group_interleave",
        "group_tile",
        "wrap_interleave",
        "rotation",
    ]
    assert ops.resolve_mora_type("Rotation") == "rotation"
    for bad in ("rope", 5, 0, True, None):
        with pytest.raises(ValueError, match="mora_type="):
            ops.resolve_mora_type(bad)
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match=f"r={bad}"):
            ops.mora_rank(8, 8, bad)


def test_building_blocks():
    x = torch.arange(5.0)
    assert ops.wrap_to(x, 12).tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]
    assert ops.wrap_to(x, 3).tolist() == [0, 1, 2]
    assert ops.group_index(7, 3).tolist() == [0, 0, 0, 1, 1, 2, 2]
    assert ops.group_index(2, 4).tolist() == [0, 1]
    assert ops.group_sum(torch.arange(7.0), 3).tolist() == [0 + 1 + 2, 3 + 4, 5 + 6]
    assert ops.group_sum(torch.arange(2.0), 4).tolist() == [0, 1, 0, 0]
    assert ops.group_expand(torch.tensor([1.0, 2.0, 3.0]), 7).tolist() == [1, 1, 1, 2, 2, 3, 3]
    cos, sin = ops.rope_cos_sin(4, 3, dtype=torch.float64)
    assert cos.shape == (3, 2) and torch.equal(cos[0], torch.ones(2)) and torch.equal(sin[0], torch.zeros(2))
    assert math.isclose(sin[2, 1].item(), math.sin(2 * 10000 ** (-2 / 4)))
    quarter = torch.tensor([0.0, math.pi / 2])  # pair (0, 2) unrotated, pair (1, 3) by 90 degrees
    rotated = ops.rotate(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]), quarter.cos(), quarter.sin())
    torch.testing.assert_close(rotated, torch.tensor([1.0, -4.0, 3.0, 2.0, 5.0]))  # odd size: last dim kept


def test_delta_weight_is_differentiable():
    M = torch.randn(10, 10, dtype=torch.float64, requires_grad=True)
    W = ops.mora_delta_weight(M, 64, 32, "rotation")
    W.sum().backward()
    eps, i, j = 1e-6, 3, 7
    bumped = M.detach().clone()
    bumped[i, j] += eps
    fd = (ops.mora_delta_weight(bumped, 64, 32, "rotation").sum() - W.detach().sum()) / eps
    assert math.isclose(M.grad[i, j].item(), fd.item(), rel_tol=1e-5)


# (d_in, d_out, r_hat, leading dims of x); r_hat is set directly, so it may be odd. With fewer tokens
# than r_hat, the chunks are rotated; with more, M's blocks: each shape is run with both.
ROTATION_SHAPES = [
    (10, 7, 4, (3,)),  # d_in not a multiple of r_hat; d_out < n * r_hat
    (10, 29, 4, (2, 3)),  # d_out > n * r_hat: tiled
    (13, 20, 5, (1,)),  # odd r_hat (its last dim is not rotated), one token
    (13, 9, 5, (2, 1, 4)),
    (3, 50, 10, (4,)),  # r_hat > d_in: x wrapped more than once
    (64, 64, 16, (2, 5)),  # exact fit
    (7, 3, 1, (3,)),  # r_hat = 1: nothing rotates
    (12, 12, 6, ()),  # a single vector
    (9, 5, 2, (0,)),  # no tokens
]


@pytest.mark.parametrize("tokens", ["as listed", "at least r_hat"])
@pytest.mark.parametrize("cached_tables", [False, True])
@pytest.mark.parametrize("d_in,d_out,r_hat,lead", ROTATION_SHAPES)
def test_rotation_equals_rotating_the_activations(d_in, d_out, r_hat, lead, cached_tables, tokens):
    if tokens == "at least r_hat":
        lead = (*lead[:-1], 2, r_hat) if lead else (r_hat,)
    gen = torch.Generator().manual_seed(d_in * 100 + r_hat)
    M = torch.randn(r_hat, r_hat, dtype=torch.float64, generator=gen, requires_grad=True)
    x = torch.randn(*lead, d_in, dtype=torch.float64, generator=gen, requires_grad=True)
    n = ops.num_chunks(d_in, r_hat)
    rope = ops.rope_cos_sin(r_hat, n, dtype=torch.float64) if cached_tables else None
    actual = ops.mora_delta_y(x, M, d_out, "rotation", rope)
    expected = reference_rotation_forward(x, M, d_out)
    assert actual.shape == (*lead, d_out)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)
    grad_y = torch.randn(expected.shape, dtype=torch.float64, generator=gen)
    actual_grads = torch.autograd.grad(actual, (x, M), grad_y)
    expected_grads = torch.autograd.grad(expected, (x, M), grad_y)
    for a, e in zip(actual_grads, expected_grads):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", ["transposed", "expanded", "strided"])
def test_rotation_on_inputs_that_are_not_contiguous(layout):
    gen = torch.Generator().manual_seed(0)
    M = torch.randn(6, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    x = {
        "transposed": torch.randn(3, 14, 5, dtype=torch.float64, generator=gen).transpose(-1, -2),
        "expanded": torch.randn(1, 14, dtype=torch.float64, generator=gen).expand(9, 14),
        "strided": torch.randn(4, 30, dtype=torch.float64, generator=gen)[:, ::2][:, :14],  # fewer tokens than r_hat
    }[layout].requires_grad_(True)
    actual, expected = ops.mora_delta_y(x, M, 30, "rotation"), reference_rotation_forward(x, M, 30)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)
    grad_y = torch.randn(expected.shape, dtype=torch.float64, generator=gen)
    for a, e in zip(torch.autograd.grad(actual, (x, M), grad_y), torch.autograd.grad(expected, (x, M), grad_y)):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"do not fit 3 chunks of size 6; pass rope_cos_sin\(6, 3\)"):
        ops.mora_delta_y(x, M, 30, "rotation", ops.rope_cos_sin(6, 2, dtype=torch.float64))


def test_chunk_matmul_and_its_gradients():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(2, 3, 4, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    blocks = torch.randn(4, 6, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    expected = torch.stack([z[:, :, i] @ blocks[i].T for i in range(4)], dim=2)
    torch.testing.assert_close(ops.chunk_matmul(z, blocks), expected, rtol=1e-12, atol=1e-12)
    flat = z.detach()[0].clone().requires_grad_(True)  # (T, n, r) as the autograd function sees it
    assert torch.autograd.gradcheck(ops.chunk_matmul, (flat, blocks))
    assert torch.autograd.gradgradcheck(ops.chunk_matmul, (flat, blocks))
    with pytest.raises(ValueError, match=r"does not fit 4 blocks of shape \(6, 5\)"):
        ops.chunk_matmul(z[..., :4], blocks)
    with pytest.raises(RuntimeError, match="cast the input to M's dtype"):
        ops.chunk_matmul(z.float(), blocks)


def test_rotated_chunk_matmul_double_backward_and_saved_tensors():
    gen = torch.Generator().manual_seed(0)
    M = torch.randn(5, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    for tokens in (2, 6):  # rotating the chunks, rotating M
        z = torch.randn(tokens, 3, 5, dtype=torch.float64, generator=gen, requires_grad=True)
        expected = torch.einsum("tni,noi->tno", z, ops.rotated_blocks(M, 3))
        torch.testing.assert_close(ops.rotated_chunk_matmul(z, M), expected, rtol=1e-12, atol=1e-12)
        assert torch.autograd.gradcheck(ops.rotated_chunk_matmul, (z, M))
        assert torch.autograd.gradgradcheck(ops.rotated_chunk_matmul, (z, M))
    # For backward, rotation keeps the input (a view of it when d_in is a multiple of r_hat) and
    # parameter-sized tensors only: no rotated copy of the activations, no blocks.
    x = torch.randn(64, 48, requires_grad=True)
    M = torch.randn(16, 16, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ops.mora_delta_y(x, M, 48, "rotation")
    kept = {t.untyped_storage().data_ptr(): t.numel() for t in saved}
    assert x.untyped_storage().data_ptr() in kept
    assert all(ptr == x.untyped_storage().data_ptr() or numel <= M.numel() for ptr, numel in kept.items())


@pytest.mark.parametrize("tokens", [4, 16])  # fewer than r_hat = 8, and more
def test_rotation_in_half_precision_and_under_autocast(tokens):
    gen = torch.Generator().manual_seed(0)
    M = torch.randn(8, 8, generator=gen) / 8
    x = torch.randn(tokens, 20, generator=gen)
    exact = reference_rotation_forward(x.double(), M.double(), 12)
    for dtype in (torch.bfloat16, torch.float16):
        low = ops.mora_delta_y(x.to(dtype), M.to(dtype), 12, "rotation")
        assert low.dtype == dtype
        torch.testing.assert_close(low.double(), exact, rtol=0.05, atol=0.05)
    M.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ops.mora_delta_y(x, M, 12, "rotation")
    assert out.dtype == torch.bfloat16  # as torch.matmul under autocast
    torch.testing.assert_close(out.double(), exact, rtol=0.05, atol=0.05)
    out.float().sum().backward()
    assert M.grad.dtype == torch.float32 and M.grad.abs().sum() > 0
