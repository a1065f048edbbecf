"""The C++/OpenMP curvature kernels (fastattr.kernels.cpu.covariance / ekfac_lambda) on the
shapes that cross their tile edges, in every SIMD variant, against float64 oracles.

Edges of csrc/cpu/curvature_impl.inc: micro-tiles MR x NR (8 x 32 / 6 x 16 / 4 x 8 for
avx512 / avx2 / generic), row chunks of kc = 256 rows (fewer when F > 1024), row splits of
~4M multiply-adds (so F = 129 splits a few hundred rows), strips of at most 256 rows of S,
conv output rows that straddle chunk and image boundaries, taps that always fall in the
padding; ekfac_lambda's positions in chunks of 256 (one chunk: squared in registers), O x F
tiles of 8*MR x 4*NR and data splits. tests/test_factor_ops.py covers the op contract on
small shapes, bad input and mixed dtypes; this file covers what the kernel's blocking could
get wrong, and its determinism: bit-identical results for repeated calls and for any thread
count (row / data splits depend on the shape only).
"""

from __future__ import annotations

import pytest
import torch

from fastattr.backends import backends
from fastattr.reference import curvature as ref

pytestmark = pytest.mark.skipif(not backends()["cpu"].available,
                                reason="fastattr._C is not built")

SIMD = ["avx512", "avx2", "generic"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# name -> (x shape, conv geometry (kh, kw, sh, sw, ph, pw, dh, dw, groups) or ())
COV_CASES = {
    "lin_7": ((3, 7, 7), ()),
    "lin_129_two_chunks": ((2, 129, 129), ()),
    "lin_129_row_splits": ((5, 200, 129), ()),
    "lin_300_strips": ((4, 3, 300), ()),
    "lin_1031_short_chunks": ((1, 300, 1031), ()),
    "conv_3x3_chunk_straddle": ((2, 16, 13, 11), (3, 3, 1, 1, 1, 1, 1, 1, 1)),
    "conv_stride2_F333": ((3, 37, 9, 7), (3, 3, 2, 2, 1, 1, 1, 1, 1)),
    "conv_groups_dilation": ((5, 6, 17, 19), (3, 2, 1, 2, 2, 0, 2, 1, 3)),
    "conv_1x1_big_image": ((2, 4, 23, 29), (1, 1, 1, 1, 0, 0, 1, 1, 1)),
    "conv_kernel_over_image": ((2, 3, 2, 3), (5, 5, 1, 1, 2, 2, 1, 1, 1)),
}

# (N, P, F, O)
LAMBDA_CASES = [
    (3, 300, 37, 13),   # positions in two chunks: the tile-buffer path
    (70, 5, 129, 67),   # two O tiles and two F tiles (avx512), ragged panels, two data splits
    (2, 7, 1, 70),      # one feature
    (9, 1, 257, 3),     # one position
]


def rand(*shape, dtype=torch.float32):
    return (torch.randn(*shape) + 0.3).to(dtype)


def cov_exact(x, conv, reduce):
    """float64 (S, s) of the reference's rows (inputs upcast exactly)."""
    rows = ref.covariance_rows(x, conv, reduce).to(torch.float64)
    return rows.transpose(1, 2) @ rows, rows.sum(dim=1)


def lambda_exact(a, g):
    a, g = a.to(torch.float64), g.to(torch.float64)
    return (g.transpose(1, 2) @ a).square().sum(dim=0)


def assert_close(actual, expected, tol=3e-6):
    """fp32 accumulation against float64: within tol of the result's scale."""
    assert actual.dtype == torch.float32 and actual.shape == expected.shape
    assert torch.isfinite(actual).all(), "an output entry was never written"
    scale = expected.abs().max().clamp_min(1e-30)
    err = (actual.to(torch.float64) - expected).abs().max()
    assert err <= tol * scale, f"max error {float(err):.3e} > {tol} x {float(scale):.3e}"


@pytest.fixture
def cpu(poison_outputs):
    import fastattr.kernels.cpu as module

    poison_outputs(module)
    return module


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduce", [False, True])
@pytest.mark.parametrize("case", list(COV_CASES))
def test_covariance_tile_edges(cpu, case, reduce, dtype):
    shape, conv = COV_CASES[case]
    x = rand(*shape, dtype=dtype)
    S, s = cpu.covariance(x, conv, reduce)
    S_ref, s_ref = cov_exact(x, conv, reduce)
    assert_close(S, S_ref)
    assert_close(s, s_ref)
    assert torch.equal(S, S.transpose(1, 2)), "S must be exactly symmetric"


@pytest.mark.parametrize("simd", SIMD)
@pytest.mark.parametrize("case", ["lin_129_row_splits", "conv_stride2_F333",
                                  "conv_groups_dilation"])
def test_covariance_every_simd_variant(cpu, monkeypatch, simd, case):
    monkeypatch.setenv("FASTATTR_CPU_SIMD", simd)
    shape, conv = COV_CASES[case]
    x = rand(*shape)
    for reduce in (False, True):
        S, s = cpu.covariance(x, conv, reduce)
        S_ref, s_ref = cov_exact(x, conv, reduce)
        assert_close(S, S_ref)
        assert_close(s, s_ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", LAMBDA_CASES)
def test_ekfac_lambda_tile_edges(cpu, shape, dtype):
    n, p, f, o = shape
    a, g = rand(n, p, f, dtype=dtype), rand(n, p, o, dtype=dtype)
    assert_close(cpu.ekfac_lambda(a, g), lambda_exact(a, g))


@pytest.mark.parametrize("simd", SIMD)
def test_ekfac_lambda_every_simd_variant(cpu, monkeypatch, simd):
    monkeypatch.setenv("FASTATTR_CPU_SIMD", simd)
    for n, p, f, o in LAMBDA_CASES[:2]:
        a, g = rand(n, p, f), rand(n, p, o)
        assert_close(cpu.ekfac_lambda(a, g), lambda_exact(a, g))


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_bitwise_deterministic_for_any_thread_count(cpu, restore_threads):
    """Row / data splits depend on the shape only; the work split between threads changes
    which thread computes an entry, never its arithmetic."""
    cases = [COV_CASES[c] for c in ("lin_129_row_splits", "lin_300_strips",
                                    "conv_stride2_F333", "conv_groups_dilation")]
    inputs = [(rand(*shape), conv) for shape, conv in cases]
    lam_inputs = [(rand(n, p, f), rand(n, p, o)) for n, p, f, o in LAMBDA_CASES[:2]]

    def run_all():
        out = [t for x, conv in inputs for reduce in (False, True)
               for t in cpu.covariance(x, conv, reduce)]
        return out + [cpu.ekfac_lambda(a, g) for a, g in lam_inputs]

    torch.set_num_threads(1)
    base = run_all()
    assert all(torch.equal(u, v) for u, v in zip(base, run_all())), "repeat differs"
    for threads in (2, 3, 8):
        torch.set_num_threads(threads)
        for u, v in zip(base, run_all()):
            assert torch.equal(u, v), f"{threads} threads differ from 1"


def test_bad_shapes_raise_in_the_extension():
    """The extension re-checks what it is given: a bad call raises, never crashes."""
    from fastattr.backends import load_extension

    ext, _ = load_extension("_C")
    buf = torch.zeros(64)
    ptr = buf.data_ptr()
    with pytest.raises(ValueError, match="conv"):
        ext.covariance(ptr, ptr, 0, 0, ptr, 0, [1, 2, 3, 3], [3, 3, 1, 1], False, 1)
    with pytest.raises(ValueError, match="no output position"):
        ext.covariance(ptr, ptr, 0, 0, ptr, 0, [1, 1, 2, 2], [3, 3, 1, 1, 0, 0, 1, 1, 1], False, 1)
    with pytest.raises(ValueError, match="groups"):
        ext.covariance(ptr, ptr, 0, 0, ptr, 0, [1, 3, 4, 4], [1, 1, 1, 1, 0, 0, 1, 1, 2], False, 1)
    with pytest.raises(ValueError, match="empty"):
        ext.covariance(ptr, ptr, 0, 0, ptr, 0, [0, 2, 3], [], False, 1)
    with pytest.raises(ValueError, match="acc_s"):
        ext.covariance(0, 0, ptr, 0, ptr, 0, [1, 2, 3], [], False, 1)
    with pytest.raises(ValueError, match="dtype"):
        ext.ekfac_lambda(ptr, ptr, 5, [1, 2, 3], ptr, 0, [1, 2, 3], 1)
    with pytest.raises(ValueError, match="N, P"):
        ext.ekfac_lambda(ptr, ptr, 0, [1, 2, 3], ptr, 0, [1, 3, 3], 1)
