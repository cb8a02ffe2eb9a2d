"""Subnet tensor math against brute force: encodings, byte counts, criteria, overlap, the linear autograd."""

import itertools
import math

import pytest
import torch

from peft_ext.subnet import ops


def brute_pack(mask: torch.Tensor) -> list[int]:
    bits = mask.reshape(-1).tolist()
    out = []
    for start in range(0, len(bits), 8):
        out.append(sum(1 << i for i, b in enumerate(bits[start : start + 8]) if b))
    return out


@pytest.mark.parametrize("numel", [1, 7, 8, 9, 64, 1001])
def test_pack_bits_matches_bit_by_bit_reference(numel):
    mask = torch.rand(numel, generator=torch.Generator().manual_seed(numel)) > 0.6
    packed = ops.pack_bits(mask)
    assert packed.dtype == torch.uint8
    assert packed.tolist() == brute_pack(mask)
    assert torch.equal(ops.unpack_bits(packed, numel), mask)


@pytest.mark.parametrize(("k", "numel"), [(0, 100), (1, 4096), (128, 4096), (129, 4096), (4096, 4096), (5, 13)])
def test_encoding_byte_counts_closed_form(k, numel):
    indices = torch.randperm(numel, generator=torch.Generator().manual_seed(0))[:k].sort().values
    encoding, tensor = ops.encode_indices(indices, numel)
    nbytes = tensor.numel() * tensor.element_size()
    assert nbytes == min(4 * k, math.ceil(numel / 8))
    assert encoding == ("indices" if 4 * k <= math.ceil(numel / 8) else "bitmap")
    assert torch.equal(ops.decode_indices(encoding, tensor, numel), indices)
    # at most 4 bytes of index per selected value, at any density
    assert k == 0 or nbytes <= 4 * k


def test_int64_indices_for_huge_tensors_and_density_threshold():
    assert ops.index_dtype(2**31 - 1) == torch.int32
    assert ops.index_dtype(2**31) == torch.int64
    assert ops.index_nbytes(10, 2**31) == 80
    # bitmap wins above density 1/32 (int32) and 1/64 (int64)
    assert ops.choose_encoding(4096 // 32, 4096) == "indices"
    assert ops.choose_encoding(4096 // 32 + 1, 4096) == "bitmap"
    assert ops.choose_encoding(2**31 // 64, 2**31) == "indices"
    assert ops.choose_encoding(2**31 // 64 + 1, 2**31) == "bitmap"


@pytest.mark.parametrize(
    ("encoding", "tensor", "message"),
    [
        ("indices", torch.tensor([0, 5, 100], dtype=torch.int32), "out of bounds"),
        ("indices", torch.tensor([-1, 5], dtype=torch.int32), "out of bounds"),
        ("indices", torch.tensor([5, 3], dtype=torch.int32), "strictly increasing"),
        ("indices", torch.tensor([3, 3], dtype=torch.int32), "strictly increasing"),
        ("indices", torch.tensor([1.0, 2.0]), "int32/int64"),
        ("bitmap", torch.zeros(12, dtype=torch.uint8), "13 bytes"),
        ("bitmap", torch.tensor([0] * 12 + [0b10000], dtype=torch.uint8), "past entry"),
        ("magic", torch.zeros(1), "unknown mask encoding"),
    ],
)
def test_decode_rejects_corrupt_masks(encoding, tensor, message):
    with pytest.raises(ValueError, match=message):
        ops.decode_indices(encoding, tensor, numel=100)


def test_changed_mask_absolute_and_relative_match_elementwise_definition():
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(50, generator=g)
    w1 = w0 + torch.randn(50, generator=g) * torch.tensor([1e-7, 1e-4, 1e-2, 0.0, 1.0]).repeat(10)
    absolute = ops.changed_mask(w0, w1, tol=1e-5)
    relative = ops.changed_mask(w0, w1, tol=1e-3, relative=True)
    for i, (a, b) in enumerate(zip(w0.tolist(), w1.tolist())):
        assert bool(absolute[i]) == (abs(b - a) > 1e-5)
        assert bool(relative[i]) == (abs(b - a) > 1e-3 * max(abs(a), abs(b)))


def test_overlap_matches_python_sets_and_random_expectation():
    g = torch.Generator().manual_seed(1)
    m1, m2 = torch.rand(400, generator=g) < 0.3, torch.rand(400, generator=g) < 0.5
    s1, s2 = set(torch.nonzero(m1).flatten().tolist()), set(torch.nonzero(m2).flatten().tolist())
    o = ops.mask_overlap(len(s1 & s2), len(s1), len(s2))
    assert o["o1"] == pytest.approx(len(s1 & s2) / len(s1))
    assert o["o2"] == pytest.approx(len(s1 & s2) / len(s2))
    assert o["jaccard"] == pytest.approx(len(s1 & s2) / len(s1 | s2))
    # the random expectation: o1 of independent masks is the density of the second
    r = ops.random_overlap(0.3, 0.5)
    assert r["o1"] == 0.5 and r["jaccard"] == pytest.approx(0.15 / 0.65)


def test_baseline_selectors_exact_counts_and_reproducible():
    a = ops.random_indices(1000, 0.05, seed=3, name="w")
    assert a.numel() == 50 and torch.equal(a, ops.random_indices(1000, 0.05, seed=3, name="w"))
    assert not torch.equal(a, ops.random_indices(1000, 0.05, seed=3, name="other"))
    w = torch.randn(10, 10, generator=torch.Generator().manual_seed(0))
    top = ops.magnitude_indices(w, 0.1)
    expected = sorted(range(100), key=lambda i: -abs(w.reshape(-1)[i].item()))[:10]
    assert top.tolist() == sorted(expected)


def test_update_rank():
    u, v = torch.randn(8, 2), torch.randn(2, 6)
    assert ops.update_rank(u @ v) == 2


def test_merge_then_unmerge_is_bit_exact_even_in_bf16():
    w = torch.randn(16, 8).to(torch.bfloat16)
    original = w.clone()
    idx = torch.tensor([0, 3, 17, 127])
    v = torch.randn(4) * 1e-3
    # Independent reference: a dense masked update, each entry summed in fp32 and rounded once to bf16.
    dense_v, mask = torch.zeros(w.numel()), torch.zeros(w.numel(), dtype=torch.bool)
    for k, i in enumerate(idx.tolist()):
        dense_v[i], mask[i] = v[k], True
    flat = w.reshape(-1)
    expected = torch.where(mask, (flat.float() + dense_v).to(torch.bfloat16), flat).view(w.shape)
    assert not torch.equal(expected, w)
    old = ops.merge_subnet_(w, idx, v)
    assert torch.equal(w, expected)
    ops.unmerge_subnet_(w, idx, old)
    assert torch.equal(w, original)


@pytest.mark.parametrize(
    ("fan_in_fan_out", "bias", "adapters", "weight_grad"),
    itertools.product([False, True], [False, True], [1, 2], [False, True]),
)
def test_subnet_linear_matches_dense_autograd_reference(fan_in_fan_out, bias, adapters, weight_grad):
    """Both gradient paths: the dense dL/dW (weight_grad) and sampled dot products (few tokens, frozen W)."""
    g = torch.Generator().manual_seed(0)
    shape = (5, 7) if fan_in_fan_out else (7, 5)  # (in, out) for Conv1D, (out, in) for Linear
    weight = torch.randn(*shape, generator=g, requires_grad=weight_grad)
    original = weight.detach().clone()
    b = torch.randn(7, generator=g, requires_grad=True) if bias else None
    x = torch.randn(2, 3, 5, generator=g, requires_grad=True)
    idxs = [torch.randperm(35, generator=g)[:2].sort().values for _ in range(adapters)]
    vals = [torch.randn(2, generator=g, requires_grad=True) for _ in range(adapters)]

    out = ops.subnet_linear(x, weight, b, idxs, vals, fan_in_fan_out=fan_in_fan_out)
    inputs = [x, *vals] + ([weight] if weight_grad else []) + ([b] if bias else [])
    grads = torch.autograd.grad(out.square().sum(), inputs)
    assert torch.equal(weight.detach(), original)  # patched in place, restored exactly

    # reference: dense W = W0 + sum of scatters, plain autograd
    dense = weight.reshape(-1)
    for i, v in zip(idxs, vals):
        dense = dense.index_put((i,), dense[i] + v)
    dense = dense.view(shape)
    ref = torch.nn.functional.linear(x, dense.t() if fan_in_fan_out else dense, b)
    ref_grads = torch.autograd.grad(ref.square().sum(), inputs)
    torch.testing.assert_close(out, ref)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)
