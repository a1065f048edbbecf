"""Triton projection kernels (fastattr/kernels/triton/projection.py) against the reference.

Without a GPU these run in the Triton interpreter (TRITON_INTERPRET=1, set by conftest.py) on
CPU tensors, which is slow: shapes stay tiny. Rademacher rows must be bit-identical to the
reference; Gaussian rows agree to a few ulp (fp32 formulas vs the float64 definition);
projections agree to fp32 summation rounding.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not 1", allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import fastattr  # noqa: E402
from fastattr import rng  # noqa: E402
from fastattr.kernels.triton import projection as tp  # noqa: E402
from fastattr.kernels.triton.projection import _neg2log_uniform, _sincos_2pi_uniform  # noqa: E402
from fastattr.reference import projection as reference  # noqa: E402

KINDS = ["rademacher", "gaussian"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KEY = (0x9E3779B9, 0x7F4A7C15)  # both words >= 2**31: exercises the uint32 key path
BIG = 2**32 + 12345  # a row offset whose counter word c1 (hi32) is 1


@pytest.fixture(autouse=True)
def _poison_outputs(poison_outputs):
    poison_outputs(tp)


def rand(*shape, dtype=torch.float32):
    return (torch.randn(*shape) + 0.1).to(dtype)  # random, never zeros


def dense(layers, offsets, k, kind, key=KEY, stream=0):
    """float64 sum_l x_l @ R[rows_l] from the reference matrix, and the bound sum |x||R|."""
    out = bound = 0
    for x, offset in zip(layers, offsets):
        rows = torch.arange(offset, offset + x.shape[1], dtype=torch.int64)
        mat = reference.materialize(rows, k, kind, key, stream).double()
        out = out + x.cpu().double() @ mat
        bound = bound + x.cpu().double().abs() @ mat.abs()
    return out, bound


def assert_projection_close(got, layers, offsets, k, kind, key=KEY, stream=0):
    """fp32 accumulation: error within a few ulp of sum |x||R| (summation order differs)."""
    assert got.dtype == torch.float32 and got.shape == (layers[0].shape[0], k)
    assert got.device.type == layers[0].device.type
    expected, bound = dense(layers, offsets, k, kind, key, stream)
    got = got.cpu().double()
    assert torch.isfinite(got).all()
    err = (got - expected).abs()
    tol = 1e-5 * expected.abs() + 1e-6 * bound
    assert (err <= tol).all(), f"max err {err.max():.3g}, worst ratio {(err / tol).max():.3g}"
    # And against the reference backend itself (it rounds in fp32 too).
    ref = reference.project([x.cpu() for x in layers], offsets, k, kind, key, stream)
    torch.testing.assert_close(got.float(), ref, rtol=1e-5, atol=2e-6 * float(bound.max()))


# --------------------------------------------------------------------------------------------
# materialize
# --------------------------------------------------------------------------------------------

ROWS = [0, 1, 2, 7, 31, 1000, 2**31 - 1, 2**31, 2**32 - 1, 2**32, BIG, 2**40 + 3, 2**63 - 1]


@pytest.mark.parametrize("k", [1, 3, 130])
@pytest.mark.parametrize("stream", [0, 3])
def test_materialize_rademacher_bit_identical(k, stream):
    rows = torch.tensor(ROWS, dtype=torch.int64, device=DEVICE)
    got = tp.materialize(rows, k, "rademacher", KEY, stream)
    expected = rng.matrix_rows(rows.cpu(), k, "rademacher", KEY, stream)
    assert got.shape == (len(ROWS), k) and got.dtype == torch.float32
    assert torch.equal(got.cpu(), expected)


@pytest.mark.parametrize("k", [1, 3, 130])
@pytest.mark.parametrize("stream", [0, 3])
def test_materialize_gaussian_close(k, stream):
    rows = torch.tensor(ROWS, dtype=torch.int64, device=DEVICE)
    got = tp.materialize(rows, k, "gaussian", KEY, stream)
    expected = rng.matrix_rows(rows.cpu(), k, "gaussian", KEY, stream)
    scale = rng.projection_scale(k)
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-5, atol=1e-6 * scale)


def test_materialize_many_gaussian_rows_few_ulp():
    """4096 entries: every one within 4 ulp of the float64 definition (or 1e-7 absolute)."""
    rows = torch.arange(256, dtype=torch.int64, device=DEVICE) * 7919 + 2**33
    got = tp.materialize(rows, 16, "gaussian", KEY, 0).cpu()
    exact = rng.matrix_rows(rows.cpu(), 16, "gaussian", KEY, 0, scale=1.0).double()
    scale = rng.projection_scale(16)
    err = (got.double() / scale - exact).abs()
    ulp = torch.finfo(torch.float32).eps * exact.abs()
    assert (err <= 4 * ulp + 1e-7).all(), f"max err {err.max():.3g}"


def test_materialize_hi_word_and_key_matter():
    rows = torch.tensor([5, 2**32 + 5], dtype=torch.int64, device=DEVICE)
    for kind in KINDS:
        mat = tp.materialize(rows, 64, kind, KEY, 0)
        assert not torch.equal(mat[0], mat[1])  # c1 = hi32(i) enters the counter
        other = tp.materialize(rows, 64, kind, (KEY[0] ^ 1, KEY[1]), 0)
        assert not torch.equal(mat, other)


def test_materialize_empty_and_noncontiguous_rows():
    assert tp.materialize(torch.empty(0, dtype=torch.int64, device=DEVICE), 5, "gaussian", KEY,
                          0).shape == (0, 5)
    rows = torch.arange(40, dtype=torch.int64, device=DEVICE)[::3]
    got = tp.materialize(rows, 5, "rademacher", KEY, 0)
    assert torch.equal(got.cpu(), rng.matrix_rows(rows.cpu(), 5, "rademacher", KEY, 0))


# The Gaussian entry formulas on chosen words: the extremes of u and the quadrant edges.
@triton.jit
def _formulas_kernel(w_ptr, out_ptr, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    w = tl.load(w_ptr + offs, mask=mask, other=0).to(tl.uint32)
    s, c = _sincos_2pi_uniform(w)
    tl.store(out_ptr + offs, _neg2log_uniform(w), mask=mask)
    tl.store(out_ptr + N + offs, s, mask=mask)
    tl.store(out_ptr + 2 * N + offs, c, mask=mask)


def test_gaussian_entry_formulas_on_edge_words():
    edges = [0, 1, 0xFF, 0x100, 0x1FF, 0x7FFFFF00, 0x7FFFFFFF, 0x80000000, 0x800000FF,
             0xFFFFFE00, 0xFFFFFF00, 0xFFFFFFFF]
    for q in range(5):  # m near the quadrant boundaries q * 2**22 (rounding of 4u)
        for dm in (-2**21 - 1, -2**21, -1, 0, 1, 2**21 - 1, 2**21):
            m = q * 2**22 + dm
            if 0 <= m < 2**24:
                edges.append(m << 8 | 0x5A)
    words = torch.tensor(edges + torch.randint(0, 2**32, (500,)).tolist(), dtype=torch.int64)
    n = words.numel()
    out = torch.full((3 * n,), float("nan"), dtype=torch.float32, device=DEVICE)
    _formulas_kernel[(triton.cdiv(n, 128),)](words.to(DEVICE), out, n, BLOCK=128)
    neg2log, sin, cos = out.cpu().double().reshape(3, n)
    u = ((words >> 8).double() + 0.5) * 2.0**-24
    eps = torch.finfo(torch.float32).eps
    exact = -2.0 * torch.log(u)
    assert ((neg2log - exact).abs() <= 4 * eps * exact).all()
    assert ((sin - torch.sin(2 * math.pi * u)).abs() <= 2 * eps).all()
    assert ((cos - torch.cos(2 * math.pi * u)).abs() <= 2 * eps).all()


# --------------------------------------------------------------------------------------------
# project
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("B,p,k", [(1, 1, 1), (5, 7, 3), (5, 200, 130), (1, 200, 3), (5, 1, 130)])
def test_project_fp32_matches_reference(kind, B, p, k):
    x = rand(B, p).to(DEVICE)
    got = tp.project([x], [0], k, kind, KEY, 0)
    assert_projection_close(got, [x], [0], k, kind)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,p,k", [(5, 7, 3), (5, 200, 130)])
def test_project_low_precision_inputs(kind, dtype, B, p, k):
    """bf16/fp16 are upcast exactly: the result is the projection of the rounded input."""
    x = rand(B, p, dtype=dtype).to(DEVICE)
    got = tp.project([x], [0], k, kind, KEY, 0)
    assert_projection_close(got, [x.float()], [0], k, kind)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_project_noncontiguous_inputs(kind, dtype):
    base = rand(40, 5, dtype=dtype).to(DEVICE)
    x = base.T  # [5, 40], strides (1, 5)
    y = rand(5, 90, dtype=dtype).to(DEVICE)[:, 3::2]  # [5, 44], strides (90, 2)
    assert not x.is_contiguous() and not y.is_contiguous()
    got = tp.project([x, y], [0, 40], 33, kind, KEY, 0)
    assert_projection_close(got, [x.float(), y.float()], [0, 40], 33, kind)


@pytest.mark.parametrize("kind", KINDS)
def test_project_layers_with_large_offsets(kind):
    """Two layers, the second past 2**32: its counters carry hi32(i) = 1 (and the rows cross
    the 2**32 boundary for the first)."""
    x1, x2 = rand(3, 37).to(DEVICE), rand(3, 21, dtype=torch.bfloat16).to(DEVICE)
    offsets = [2**32 - 20, BIG]
    got = tp.project([x1, x2], offsets, 130, kind, KEY, 0)
    assert_projection_close(got, [x1, x2.float()], offsets, 130, kind)
    # Dropping the high word would make rows BIG + i alias rows 12345 + i.
    aliased = tp.project([x2], [BIG - 2**32], 130, kind, KEY, 0)
    assert not torch.allclose(tp.project([x2], [BIG], 130, kind, KEY, 0), aliased)


@pytest.mark.parametrize("kind", KINDS)
def test_project_layers_equal_flat_concatenation(kind):
    x = rand(4, 60).to(DEVICE)
    flat = tp.project([x], [0], 40, kind, KEY, 0)
    split = tp.project([x[:, :25], x[:, 25:]], [0, 25], 40, kind, KEY, 0)
    torch.testing.assert_close(split, flat, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("splits", [2, 5])
def test_project_split_p_reduction(kind, splits):
    """The GPU's split-p path (partial buffer + fixed-order sum), forced on here."""
    x1, x2 = rand(5, 150).to(DEVICE), rand(5, 70, dtype=torch.float16).to(DEVICE)
    got = tp.project([x1, x2], [0, 150], 70, kind, KEY, 1, splits=splits)
    assert_projection_close(got, [x1, x2.float()], [0, 150], 70, kind, stream=1)
    again = tp.project([x1, x2], [0, 150], 70, kind, KEY, 1, splits=splits)
    assert torch.equal(got, again)  # deterministic


def test_project_empty_batch():
    x = torch.empty(0, 7, device=DEVICE)
    assert tp.project([x], [0], 3, "gaussian", KEY, 0).shape == (0, 3)


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_projector_triton_matches_reference_backend(kind):
    grads = {"a": rand(3, 4, 5).to(DEVICE), "b": rand(3, 17, dtype=torch.bfloat16).to(DEVICE)}
    tri = fastattr.Projector(70, kind=kind, seed=5, ensemble_id=2, backend="triton")
    ref = fastattr.Projector(70, kind=kind, seed=5, ensemble_id=2, backend="reference")
    got = tri.project(grads)
    expected = ref.project({name: g.cpu() for name, g in grads.items()})
    bound = sum(g.cpu().float().reshape(3, -1).abs().sum(1).max() for g in grads.values())
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-5, atol=5e-6 * float(bound))
    rows = torch.tensor([0, 3, 2**35 + 1])
    got_rows = tri.materialize(rows, device=DEVICE).cpu()
    if kind == "rademacher":
        assert torch.equal(got_rows, ref.materialize(rows))
    else:
        torch.testing.assert_close(got_rows, ref.materialize(rows), rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------------------------
# GPU only: a realistic size through the automatic split choice
# --------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_project_cuda_medium(kind, dtype):
    x = rand(24, 5000, dtype=dtype).cuda()
    got = tp.project([x[:, :3000], x[:, 3000:]], [7, 2**32], 1000, kind, KEY, 0)
    assert_projection_close(got, [x[:, :3000].float(), x[:, 3000:].float()], [7, 2**32], 1000,
                            kind)
