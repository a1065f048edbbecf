"""Triton curvature kernels (fastattr/kernels/triton/curvature.py) on shapes that cross every
tile edge.

tests/test_factor_ops.py compares every backend with the reference through the public
wrappers on odd layer shapes; here the launchers are called directly, with forced splits, on
shapes chosen for the interpreter's tiles (covariance: BLOCK_F = BLOCK_R = 16, BLOCK_Q = 4;
ekfac_lambda: BLOCK_O = BLOCK_F = BLOCK_P = 16): several feature tiles (diagonal and j > i
tiles, partial last tiles), several row chunks with a partial last one, positions summed
over several BLOCK_Q steps, channel groups, stride / padding / dilation, and splits whose
last range is short. Without a GPU this runs in the Triton interpreter (slow), so every
shape stays small.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not 1", allow_module_level=True)

from fastattr.kernels.triton import curvature as tcurv  # noqa: E402
from fastattr.reference import curvature as ref  # noqa: E402
from test_psg_triton import assert_rel, rand  # noqa: E402  (device-aware, as for psg)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = 2e-5  # inputs are upcast exactly; only the summation order differs


@pytest.fixture(autouse=True)
def _poison(poison_outputs):
    poison_outputs(tcurv)


# name: (x shape, conv, splits). Row counts are for expand / reduce.
COVARIANCE = {
    # F = 37: three feature tiles (the last of 5); 21 token rows (2 chunks); T = 7 positions
    # per datum when reduced (2 BLOCK_Q steps, the last partial)
    "linear": ((3, 7, 37), (), 2),
    # 19 data of 5 tokens: reduce has 2 row chunks split in 2; F = 32 ends on a tile edge
    "linear_many": ((19, 5, 32), (), 2),
    # 2 groups of F = 2 * 3 * 3 = 18 (2 tiles each); stride (2, 1), padding (1, 2),
    # dilation (2, 1): 3 x 8 = 24 positions, 72 rows split 3 ways (32, 32, 8)
    "conv_groups": ((3, 4, 7, 6), (3, 3, 2, 1, 1, 2, 2, 1, 2), 3),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduce", [False, True])
@pytest.mark.parametrize("case", list(COVARIANCE))
def test_covariance_matches_reference(case, reduce, dtype):
    shape, conv, splits = COVARIANCE[case]
    x = rand(*shape, dtype=dtype)
    S, s = tcurv.covariance(x, conv, reduce, splits=splits)
    S_ref, s_ref = ref.covariance(x.cpu(), conv, reduce)
    assert_rel(S, S_ref, TOL)
    assert_rel(s, s_ref, TOL)
    assert torch.equal(S, S.transpose(1, 2)), "S must be exactly symmetric"


def test_covariance_splits_are_deterministic_and_agree():
    shape, conv, _ = COVARIANCE["conv_groups"]
    x = rand(*shape)
    first = tcurv.covariance(x, conv, False, splits=4)
    again = tcurv.covariance(x, conv, False, splits=4)
    assert all(torch.equal(u, v) for u, v in zip(first, again)), "two calls differ"
    one = tcurv.covariance(x, conv, False, splits=1)
    for split, whole in zip(first, one):
        assert_rel(split, whole, 1e-6)


# a [N, P, F], g [N, P, O]: 2 o tiles, 3 f tiles (partial), 2 P chunks, N = 5 split as 3 + 2
EKFAC_A, EKFAC_G = (5, 19, 33), (5, 19, 17)


@pytest.mark.parametrize("dtype_a,dtype_g", [(d, d) for d in DTYPES]
                         + [(torch.float16, torch.bfloat16)])
def test_ekfac_lambda_matches_reference(dtype_a, dtype_g):
    a, g = rand(*EKFAC_A, dtype=dtype_a), rand(*EKFAC_G, dtype=dtype_g)
    got = tcurv.ekfac_lambda(a, g, splits=2)
    assert_rel(got, ref.ekfac_lambda(a.cpu(), g.cpu()), TOL)


def test_ekfac_lambda_splits_are_deterministic_and_agree():
    a, g = rand(*EKFAC_A), rand(*EKFAC_G)
    first = tcurv.ekfac_lambda(a, g, splits=3)
    assert torch.equal(first, tcurv.ekfac_lambda(a, g, splits=3)), "two calls differ"
    assert_rel(first, tcurv.ekfac_lambda(a, g, splits=1), 1e-6)
