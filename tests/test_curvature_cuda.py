"""CUDA curvature kernels (csrc/cuda/curvature.cu via fastattr/kernels/cuda.py).

Marked ``cuda``: tests/conftest.py deselects them where no GPU is visible. The shared cases of
tests/test_factor_ops.py run through the public wrappers with ``backend="cuda"``; the shapes here
add what the CUDA tiling has to get right: features past one 64-wide tile (off-diagonal tile
pairs, ragged edges), more rows than fill the device (row slices reduced in order), fewer conv
positions or tokens per datum than a 16-row chunk, P = 1 and P crossing chunks in ekfac_lambda.
Results are held to float64 products of the same (exactly upcast) inputs; outputs are poisoned
(NaN) before every launch, and repeated calls must be bit-identical.
"""

from __future__ import annotations

import pytest
import torch

from fastattr import factor_ops
from fastattr.reference import curvature as ref
from test_factor_ops import CONV_CASES, LINEAR_CASES, TOL, assert_rel, check_covariance
from test_factor_ops import rand as cpu_rand
from test_psg_cuda import _usable_module, cuda_kernels, ext  # noqa: F401  (autouse fixture)

pytestmark = pytest.mark.cuda

DEV = "cuda"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# name -> (x shape, conv geometry or ()); sizes chosen against the 64 x 64 tiles and 16-row chunks
TILE_CASES = {
    "linear_f65": ((4, 5, 65), ()),  # two feature tiles, a 1-wide ragged edge
    "linear_f200_rows": ((3, 700, 200), ()),  # 4 tiles, 2100 rows: row slices
    "linear_one_token": ((37, 1, 130), ()),
    "conv_f72_groups": ((3, 16, 9, 8), (3, 3, 1, 1, 1, 1, 1, 1, 2)),  # F = 72 per group
    "conv_f150_dil": ((2, 6, 12, 11), (5, 5, 2, 1, 3, 2, 2, 1, 1)),  # F = 150: 3 tiles
    "conv_one_position": ((19, 8, 3, 3), (3, 3, 1, 1, 0, 0, 1, 1, 1)),  # 1 position per datum
    "conv_six_positions": ((9, 3, 4, 6), (3, 2, 2, 3, 1, 1, 1, 1, 1)),  # < 16 per datum
    "conv_many_positions": ((2, 5, 40, 37), (3, 3, 1, 1, 1, 1, 1, 1, 1)),  # 2960 rows
    "conv_depthwise_groups": ((3, 64, 7, 5), (3, 3, 2, 1, 1, 1, 1, 1, 64)),  # 64 groups, F = 9
}


@pytest.fixture(autouse=True)
def _poison_outputs(poison_outputs):
    poison_outputs(cuda_kernels())


def rand(*shape, dtype=torch.float32):
    return cpu_rand(*shape, dtype=dtype).to(DEV)


def exact_covariance(x, conv, reduce):
    """float64 (S, s) of the float32-upcast rows (bf16 / fp16 upcast exactly)."""
    rows = ref.covariance_rows(x.cpu(), conv, False).double()  # a copy of x's values: exact
    if reduce:
        batch = x.shape[0]
        rows = rows.reshape(rows.shape[0], batch, -1, rows.shape[2]).sum(dim=2)
    return rows.transpose(1, 2) @ rows, rows.sum(dim=1)


def exact_lambda(a, g):
    return (g.cpu().double().transpose(1, 2) @ a.cpu().double()).square().sum(dim=0)


def run_covariance(x, conv, reduce):
    S, s = cuda_kernels().covariance(x, tuple(conv), reduce)
    torch.cuda.synchronize()  # surface asynchronous kernel faults in this test
    return S, s


def run_lambda(a, g):
    out = cuda_kernels().ekfac_lambda(a, g)
    torch.cuda.synchronize()
    return out


def check_exact_covariance(x, conv, reduce, tol=1e-5):
    S, s = run_covariance(x, conv, reduce)
    S_exact, s_exact = exact_covariance(x, conv, reduce)
    assert S.device.type == "cuda" and s.device.type == "cuda"
    assert_rel(S.cpu(), S_exact, tol)
    assert_rel(s.cpu(), s_exact, tol)
    assert torch.equal(S, S.transpose(1, 2)), "S must be exactly symmetric"
    return S, s


# ------------------------------------------------------------------- the shared cases


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduce", [False, True])
@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv_covariance_matches_reference(case, reduce, dtype):
    shape, conv = CONV_CASES[case]
    check_covariance("cuda", rand(*shape), conv, reduce, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduce", [False, True])
@pytest.mark.parametrize("case", list(LINEAR_CASES))
def test_linear_covariance_matches_reference(case, reduce, dtype):
    check_covariance("cuda", rand(*LINEAR_CASES[case]), (), reduce, dtype)


# ------------------------------------------------------------------- CUDA tiling


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduce", [False, True])
@pytest.mark.parametrize("case", list(TILE_CASES))
def test_covariance_tiles_match_exact(case, reduce, dtype):
    shape, conv = TILE_CASES[case]
    check_exact_covariance(rand(*shape, dtype=dtype), conv, reduce)


@pytest.mark.parametrize("case", ["linear_f200_rows", "conv_many_positions", "conv_f72_groups"])
def test_covariance_deterministic(case):
    """Row slices are reduced in slot order: repeated calls are bit-identical."""
    shape, conv = TILE_CASES[case]
    x = rand(*shape)
    for reduce in (False, True):
        S, s = check_exact_covariance(x, conv, reduce)
        for _ in range(2):
            S2, s2 = run_covariance(x, conv, reduce)
            assert torch.equal(S, S2) and torch.equal(s, s2)


def test_covariance_zero_padding_only_positions():
    """Padding wider than the kernel's reach: some patches are all zeros, still counted."""
    x = rand(2, 3, 2, 3)
    check_exact_covariance(x, (2, 2, 1, 1, 3, 2, 1, 1, 1), False)
    check_exact_covariance(x, (2, 2, 1, 1, 3, 2, 1, 1, 1), True)


# ------------------------------------------------------------------- ekfac_lambda

LAMBDA_SHAPES = [
    (1, 1, 1, 1),
    (7, 3, 5, 4),
    (3, 17, 33, 9),  # P > one 16-row chunk, not a multiple of it
    (2, 1, 129, 2),
    (5, 7, 130, 67),  # several f- and o-tiles, ragged edges
    (1000, 1, 70, 65),  # P = 1: every row starts a datum; data split over blocks
    (300, 13, 20, 3),  # data straddle chunk boundaries, split over blocks
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", LAMBDA_SHAPES, ids=str)
def test_ekfac_lambda_matches_exact(shape, dtype):
    n, p, f, o = shape
    a, g = rand(n, p, f, dtype=dtype), rand(n, p, o, dtype=dtype)
    got = run_lambda(a, g)
    assert got.device.type == "cuda"
    assert_rel(got.cpu(), exact_lambda(a, g), 1e-5)


def test_ekfac_lambda_public_api_and_reference():
    a, g = rand(7, 3, 5), rand(7, 3, 4)
    got = factor_ops.ekfac_lambda(a, g, backend="cuda")
    assert_rel(got.cpu(), ref.ekfac_lambda(a.cpu(), g.cpu()), TOL[torch.float32])


def test_ekfac_lambda_mixed_dtypes():
    a, g = rand(5, 4, 6), rand(5, 4, 3, dtype=torch.bfloat16)
    assert_rel(run_lambda(a, g).cpu(), exact_lambda(a, g), 1e-5)
    a, g = rand(5, 4, 6, dtype=torch.float16), rand(5, 4, 3)
    assert_rel(run_lambda(a, g).cpu(), exact_lambda(a, g), 1e-5)


def test_ekfac_lambda_deterministic():
    a, g = rand(1000, 1, 70), rand(1000, 1, 65)  # split over blocks
    first = run_lambda(a, g)
    assert_rel(first.cpu(), exact_lambda(a, g), 1e-5)
    for _ in range(2):
        assert torch.equal(run_lambda(a, g), first)


# ------------------------------------------------------------------- streams and bad input


def test_runs_on_the_current_stream():
    x = rand(3, 700, 200)
    expected = run_covariance(x, (), False)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = cuda_kernels().covariance(x, (), False)
    side.synchronize()
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_bad_arguments_raise():
    kernels = cuda_kernels()
    with pytest.raises(ValueError, match="CUDA tensors"):
        kernels.covariance(torch.randn(2, 3, 4), (), False)
    with pytest.raises(ValueError, match="contiguous"):
        kernels.covariance(rand(2, 4, 3).transpose(1, 2), (), False)
    with pytest.raises(ValueError, match="NCHW"):
        kernels.covariance(rand(2, 3, 4), (1, 1, 1, 1, 0, 0, 1, 1, 1), False)
    with pytest.raises(ValueError, match="groups"):
        kernels.covariance(rand(2, 3, 4, 4), (1, 1, 1, 1, 0, 0, 1, 1, 2), False)
    with pytest.raises(ValueError, match="no output position"):
        kernels.covariance(rand(2, 3, 2, 2), (5, 5, 1, 1, 0, 0, 1, 1, 1), False)
    with pytest.raises(ValueError, match="is on"):
        kernels.ekfac_lambda(rand(2, 3, 4), torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match=r"\[N, P, F\]"):
        kernels.ekfac_lambda(rand(2, 3, 4), rand(2, 4, 4))
    stream = torch.cuda.current_stream().cuda_stream
    out = torch.empty(4, 4, device=DEV)
    a = rand(2, 3, 4)
    with pytest.raises(ValueError, match="dtype"):
        ext().ekfac_lambda(out.data_ptr(), a.data_ptr(), 9, a.data_ptr(), 0, 2, 3, 4, 4, stream)
    with pytest.raises(ValueError, match="empty"):
        ext().ekfac_lambda(out.data_ptr(), a.data_ptr(), 0, a.data_ptr(), 0, 0, 3, 4, 4, stream)
    with pytest.raises(ValueError, match="conv must be"):
        ext().covariance(out.data_ptr(), out.data_ptr(), a.data_ptr(), 0, [2, 3, 4, 1], [1, 1],
                         False, stream)
