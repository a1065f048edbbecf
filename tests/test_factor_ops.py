"""The curvature accumulation ops (fastattr.factor_ops) against explicit definitions and
against the reference backend.

- The reference covariance equals sums of outer products of explicitly gathered patch
  vectors (a loop over output positions, not unfold), per channel group, for expand and
  reduce; the reference ekfac_lambda equals squared explicit per-datum products.
- Every compiled backend available here equals the reference on odd shapes, every input
  dtype, conv geometries (stride, padding, dilation, groups, 1x1), with outputs poisoned.
- Bad input raises errors that name the argument.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from fastattr import factor_ops
from fastattr.backends import backends
from fastattr.reference import curvature as ref

COMPILED = [name for name in ("cpu", "triton") if backends()[name].available]
LAUNCHERS = {"cpu": "fastattr.kernels.cpu", "triton": "fastattr.kernels.triton.curvature",
             "cuda": "fastattr.kernels.cuda"}
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}  # inputs are upcast exactly

# (input shape, conv geometry) -- odd sizes on purpose
CONV_CASES = {
    "stride2_pad": ((3, 5, 7, 6), (3, 3, 2, 2, 1, 1, 1, 1, 1)),
    "dil_groups": ((2, 6, 9, 7), (3, 2, 1, 2, 2, 1, 2, 1, 2)),
    "depthwise_1x1": ((4, 4, 3, 5), (1, 1, 1, 1, 0, 0, 1, 1, 4)),
    "grad_layout": ((3, 17, 5, 3), (1, 1, 1, 1, 0, 0, 1, 1, 1)),
    "wide": ((2, 3, 11, 13), (5, 5, 3, 2, 2, 0, 1, 1, 3)),
}
LINEAR_CASES = {"tokens": (5, 7, 13), "single": (1, 1, 1), "wide": (3, 2, 129)}


def assert_rel(actual: torch.Tensor, expected: torch.Tensor, tol: float):
    """max |actual - expected| <= tol * max |expected| (the scale of the result)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.dtype == torch.float32
    assert torch.isfinite(actual).all(), "non-finite entries (an unwritten poisoned output?)"
    scale = expected.abs().max().clamp_min(1e-30)
    err = (actual.to(torch.float64) - expected.to(torch.float64)).abs().max()
    assert err <= tol * scale, f"max error {float(err):.3e} > {tol} x {float(scale):.3e}"


def rand(*shape, dtype=torch.float32):
    # an offset so that sums and column sums are not near zero
    return (torch.randn(*shape) + 0.3).to(dtype)


def explicit_patch_rows(x: torch.Tensor, conv, reduce: bool) -> torch.Tensor:
    """[G, M, F] patch vectors gathered one output position at a time (float64)."""
    kh, kw, sh, sw, ph, pw, dh, dw, groups = conv
    n, c, h, w = x.shape
    x = x.to(torch.float64)
    h_out = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    w_out = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    cg = c // groups
    out = []
    for gi in range(groups):
        rows = []
        for ni in range(n):
            per_pos = []
            for oy in range(h_out):
                for ox in range(w_out):
                    v = torch.zeros(cg, kh, kw, dtype=torch.float64)
                    for i in range(kh):
                        for j in range(kw):
                            y, xx = oy * sh - ph + i * dh, ox * sw - pw + j * dw
                            if 0 <= y < h and 0 <= xx < w:
                                v[:, i, j] = x[ni, gi * cg:(gi + 1) * cg, y, xx]
                    per_pos.append(v.reshape(-1))
            if reduce:
                rows.append(torch.stack(per_pos).sum(0, keepdim=True))
            else:
                rows.append(torch.stack(per_pos))
        out.append(torch.cat(rows))
    return torch.stack(out)


@pytest.mark.parametrize("reduce", [False, True])
@pytest.mark.parametrize("case", list(CONV_CASES))
def test_reference_conv_covariance_is_the_patch_definition(case, reduce):
    shape, conv = CONV_CASES[case]
    x = rand(*shape)
    rows = explicit_patch_rows(x, conv, reduce)
    S, s = ref.covariance(x, conv, reduce)
    assert_rel(S, rows.transpose(1, 2) @ rows, 1e-5)
    assert_rel(s, rows.sum(1), 1e-5)


@pytest.mark.parametrize("reduce", [False, True])
def test_reference_linear_covariance(reduce):
    x = rand(4, 3, 6).to(torch.float64)
    rows = x.sum(1) if reduce else x.reshape(-1, 6)
    S, s = ref.covariance(x.float(), (), reduce)
    assert_rel(S, (rows.T @ rows)[None], 1e-6)
    assert_rel(s, rows.sum(0)[None], 1e-6)


def test_reference_ekfac_lambda_is_squared_per_datum_products():
    a, g = rand(70, 3, 5), rand(70, 3, 4)  # more data than one oracle chunk
    expected = sum((g[n].double().T @ a[n].double()) ** 2 for n in range(70))
    assert_rel(ref.ekfac_lambda(a, g), expected, 1e-6)


# ------------------------------------------------------------------- compiled vs reference


def _poisoned(backend, poison_outputs):
    poison_outputs(importlib.import_module(LAUNCHERS[backend]))


def check_covariance(backend, x, conv, reduce, dtype):
    x = x.to(dtype)
    S, s = factor_ops.covariance(x, conv, reduce, backend=backend)
    S_ref, s_ref = ref.covariance(x.cpu(), conv, reduce)
    assert_rel(S.cpu(), S_ref, TOL[dtype])
    assert_rel(s.cpu(), s_ref, TOL[dtype])
    assert torch.equal(S, S.transpose(1, 2)), "S must be exactly symmetric"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduce", [False, True])
@pytest.mark.parametrize("case", list(CONV_CASES))
@pytest.mark.parametrize("backend", COMPILED)
def test_conv_covariance_matches_reference(backend, case, reduce, dtype, poison_outputs):
    _poisoned(backend, poison_outputs)
    shape, conv = CONV_CASES[case]
    check_covariance(backend, rand(*shape), conv, reduce, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduce", [False, True])
@pytest.mark.parametrize("case", list(LINEAR_CASES))
@pytest.mark.parametrize("backend", COMPILED)
def test_linear_covariance_matches_reference(backend, case, reduce, dtype, poison_outputs):
    _poisoned(backend, poison_outputs)
    check_covariance(backend, rand(*LINEAR_CASES[case]), (), reduce, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (7, 3, 5, 4), (3, 17, 33, 9), (2, 1, 129, 2)])
@pytest.mark.parametrize("backend", COMPILED)
def test_ekfac_lambda_matches_reference(backend, shape, dtype, poison_outputs):
    _poisoned(backend, poison_outputs)
    n, p, f, o = shape
    a, g = rand(n, p, f, dtype=dtype), rand(n, p, o, dtype=dtype)
    out = factor_ops.ekfac_lambda(a, g, backend=backend)
    assert_rel(out, ref.ekfac_lambda(a, g), 1e-5)


@pytest.mark.parametrize("backend", COMPILED)
def test_ekfac_lambda_mixed_dtypes(backend, poison_outputs):
    _poisoned(backend, poison_outputs)
    a, g = rand(5, 4, 6), rand(5, 4, 3, dtype=torch.bfloat16)
    assert_rel(factor_ops.ekfac_lambda(a, g, backend=backend), ref.ekfac_lambda(a, g), 1e-5)


def check_covariance_add(backend, x, conv, reduce):
    """covariance_add adds the reference covariance, packed, to random float64 sums."""
    S_ref, s_ref = ref.covariance(x.cpu(), conv, reduce)
    groups, f = S_ref.shape[0], S_ref.shape[1]
    packed = torch.randn(groups, f * (f + 1) // 2, dtype=torch.float64, device=x.device)
    sums = torch.randn(groups, f, dtype=torch.float64, device=x.device)
    start_p, start_s = packed.clone(), sums.clone()
    factor_ops.covariance_add(x, packed, sums, conv, reduce, backend=backend)
    assert_rel((packed - start_p).cpu().float(), ref.pack_upper(S_ref), TOL[x.dtype])
    assert_rel((sums - start_s).cpu().float(), s_ref, TOL[x.dtype])
    # the packed layout itself: row i's entries j >= i, row after row
    i, j = torch.triu_indices(f, f)
    assert torch.equal(ref.pack_upper(S_ref), S_ref[:, i, j])
    assert torch.equal(ref.unpack_upper(ref.pack_upper(S_ref), f), S_ref)
    upper = ref.unpack_upper(ref.pack_upper(S_ref), f, symmetric=False)
    assert torch.equal(upper, S_ref.triu())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["stride2_pad", "dil_groups"])
@pytest.mark.parametrize("backend", ["reference"] + COMPILED)
def test_covariance_add_accumulates_the_packed_covariance(backend, case, dtype):
    shape, conv = CONV_CASES[case]
    check_covariance_add(backend, rand(*shape, dtype=dtype), conv, False)
    check_covariance_add(backend, rand(3, 5, 37, dtype=dtype), (), False)


@pytest.mark.skipif("cpu" not in COMPILED, reason="the cpu extension is not built")
def test_cpu_covariance_add_with_row_splits_and_blocks():
    """F = 360 > one 256-row strip and 378 rows: several row blocks and row splits, whose
    partial sums the kernel adds into the packed float64 sums."""
    check_covariance_add("cpu", rand(9, 40, 7, 6), (3, 3, 1, 1, 1, 1, 1, 1, 1), False)


@pytest.mark.parametrize("backend", ["reference"] + COMPILED)
def test_covariance_add_reduce(backend):
    shape, conv = CONV_CASES["stride2_pad"]
    check_covariance_add(backend, rand(*shape), conv, True)


# ----------------------------------------------------------------------------- bad input


def test_bad_input_names_the_argument():
    with pytest.raises(TypeError, match="x must be float32"):
        factor_ops.covariance(torch.ones(2, 3, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"x must be \[N, T, F\]"):
        factor_ops.covariance(torch.randn(2, 3))
    with pytest.raises(ValueError, match="NCHW"):
        factor_ops.covariance(torch.randn(2, 3, 4), conv=(3, 3, 1, 1, 1, 1, 1, 1, 1))
    with pytest.raises(ValueError, match="groups=2"):
        factor_ops.covariance(torch.randn(2, 3, 4, 4), conv=(3, 3, 1, 1, 1, 1, 1, 1, 2))
    with pytest.raises(ValueError, match="conv must be"):
        factor_ops.covariance(torch.randn(2, 3, 4, 4), conv=(3, 3, 1))
    with pytest.raises(ValueError, match="no output position"):
        factor_ops.covariance(torch.randn(2, 3, 2, 2), conv=(5, 5, 1, 1, 0, 0, 1, 1, 1))
    with pytest.raises(TypeError, match="reduce must be a bool"):
        factor_ops.covariance(torch.randn(2, 3, 4), reduce=1)
    with pytest.raises(ValueError, match="share N and P"):
        factor_ops.ekfac_lambda(torch.randn(2, 3, 4), torch.randn(2, 4, 4))
    with pytest.raises(TypeError, match="g must be float32"):
        factor_ops.ekfac_lambda(torch.randn(2, 3, 4), torch.ones(2, 3, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="backend"):
        factor_ops.ekfac_lambda(torch.randn(2, 3, 4), torch.randn(2, 3, 4), backend="gpu")
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match=r"packed must be a contiguous float64 tensor \[1, 10\]"):
        factor_ops.covariance_add(x, torch.zeros(1, 10), torch.zeros(1, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"sums must be a contiguous float64 tensor \[1, 4\]"):
        factor_ops.covariance_add(x, torch.zeros(1, 10, dtype=torch.float64),
                                  torch.zeros(1, 5, dtype=torch.float64))
