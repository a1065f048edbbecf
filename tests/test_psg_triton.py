"""Triton psg kernels (fastattr/kernels/triton/psg.py) on shapes that cross every tile edge.

tests/test_psg_ops.py compares every backend with the reference on the layer shapes of real
modules; here the launchers are called directly on shapes chosen for the kernel's tiling
(BLOCK_B = BLOCK_O = BLOCK_F = BLOCK_M = 16): more than one tile of segments, channels,
features and (row, position) pairs, forced splits of the (o, f) tiles, weight rows that
cross a 2**32 boundary of the counter, mixed input dtypes. Without a GPU this runs in the
Triton interpreter (slow), so every shape stays small.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not 1", allow_module_level=True)

from fastattr.kernels.triton import psg as tpsg  # noqa: E402
from fastattr.psg import Segments  # noqa: E402
from fastattr.reference import psg as ref  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KEY = (0x9E3779B9, 0x7F4A7C15)


@pytest.fixture(autouse=True)
def _poison(poison_outputs):
    poison_outputs(tpsg)


def rand(*shape, dtype=torch.float32):
    return (torch.randn(*shape) + 0.1).to(dtype).to(DEVICE)


def grouped(n: int, batch: int, empty: int | None = None) -> Segments:
    """n rows spread over ``batch`` samples in shuffled order; sample ``empty`` has none."""
    ids = torch.randint(0, batch, (n,))
    choices = [b for b in range(batch) if b != empty]
    ids[: len(choices)] = torch.tensor(choices)[torch.randperm(len(choices))][: n]
    if empty is not None:
        ids[ids == empty] = choices[0]
    return Segments.from_ids(ids, num_segments=batch, device=DEVICE)


def assert_rel(got, want, tol):
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.isfinite(got).all(), "non-finite entries (an unwritten poisoned output?)"
    scale = want.abs().max().clamp_min(1e-30)
    err = (got.double().cpu() - want.double().cpu()).abs().max()
    assert err <= tol * scale, f"max error {float(err):.3e} > {tol} x {float(scale):.3e}"


# (a shape, g shape, conv): every case spans more than one tile along some dimension
SHAPES = {
    # 17 segments (2 segment tiles), d_out 17, d_in 18 (+ bias column: 2 f tiles), T 3
    "linear_wide": ((40, 3, 18), (40, 3, 17), ()),
    # 5x5 output pixels per row: the (row, pixel) reduction crosses BLOCK_M many times
    "conv_pad_stride": ((9, 3, 9, 9), (9, 18, 5, 5), (3, 3, 2, 2, 1, 1, 1, 1, 1)),
    # 2 groups of 17 output channels (o tiles inside each group), F = 2 * 3 * 3
    "conv_groups": ((6, 4, 6, 5), (6, 34, 2, 3), (3, 3, 2, 1, 0, 0, 1, 1, 2)),
}


def layer(case, dtype_a=torch.float32, dtype_g=torch.float32):
    a_shape, g_shape, conv = SHAPES[case]
    return rand(*a_shape, dtype=dtype_a), rand(*g_shape, dtype=dtype_g), conv


@pytest.mark.parametrize("case,kind,k,splits,batch", [
    ("linear_wide", "rademacher", 70, 3, 17),
    ("linear_wide", "gaussian", 1, None, 17),
    ("conv_pad_stride", "gaussian", 33, 2, 4),
    ("conv_groups", "rademacher", 5, 4, 3),
])
def test_project_matches_reference(case, kind, k, splits, batch):
    a, g, conv = layer(case)
    seg = grouped(a.shape[0], batch, empty=batch - 1)
    # weight rows straddle 2**32: the counter's hi word changes inside a tile
    d_out = g.shape[1] if conv else g.shape[2]
    w_offset = 2**32 - d_out * 5
    b_offset = 2**40 + 7
    args = (a, g, seg.seg_ptr, seg.order, conv, True, w_offset, b_offset, k, kind, KEY, 2)
    got = tpsg.psg_project(*args, splits=splits)
    want = ref.psg_project(*args)
    assert_rel(got, want, 1e-5)
    assert (got[batch - 1] == 0).all(), "a sample with no rows projects to exactly zero"


@pytest.mark.parametrize("case,with_bias,q,splits", [
    ("linear_wide", True, 17, 2),
    ("conv_pad_stride", False, 3, None),
    ("conv_groups", True, 1, 3),
])
def test_matmul_matches_reference(case, with_bias, q, splits):
    a, g, conv = layer(case)
    seg = grouped(a.shape[0], 5)
    d_out = g.shape[1] if conv else g.shape[2]
    if conv:
        weight_shape = (d_out, a.shape[1] // conv[8], conv[0], conv[1])
    else:
        weight_shape = (d_out, a.shape[2])
    q_weight = rand(q, *weight_shape, dtype=torch.bfloat16)
    q_bias = rand(q, d_out) if with_bias else None
    args = (a, g, seg.seg_ptr, seg.order, conv, q_weight, q_bias)
    assert_rel(tpsg.psg_matmul(*args, splits=splits), ref.psg_matmul(*args), 1e-5)


def test_low_precision_and_mixed_inputs():
    """fp16 a and g take the input-dtype dot; fp32 a with bf16 g the fp32 one."""
    for dtype_a, dtype_g in ((torch.float16, torch.float16), (torch.float32, torch.bfloat16)):
        a, g, conv = layer("linear_wide", dtype_a, dtype_g)
        seg = Segments.identity(a.shape[0], device=DEVICE)
        args = (a, g, seg.seg_ptr, seg.order, conv, True, 3, 1, 40, "rademacher", KEY, 0)
        # the reference upcasts the same rounded inputs: only summation order differs
        assert_rel(tpsg.psg_project(*args), ref.psg_project(*args), 1e-5)


def test_splits_are_deterministic_and_agree():
    a, g, conv = layer("conv_groups")
    seg = grouped(a.shape[0], 3)
    args = (a, g, seg.seg_ptr, seg.order, conv, True, 11, 0, 20, "gaussian", KEY, 0)
    one = tpsg.psg_project(*args, splits=1)
    assert torch.equal(tpsg.psg_project(*args, splits=4), tpsg.psg_project(*args, splits=4))
    assert_rel(tpsg.psg_project(*args, splits=4), one, 1e-6)


def test_empty_batch_and_no_queries():
    a, g, conv = layer("linear_wide")
    seg_ptr = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    order = torch.arange(a.shape[0], device=DEVICE)
    got = tpsg.psg_project(a, g, seg_ptr, order, conv, False, 0, 0, 8, "rademacher", KEY, 0)
    assert got.shape == (0, 8)
    seg = Segments.identity(a.shape[0], device=DEVICE)
    q_weight = rand(0, g.shape[2], a.shape[2])
    got = tpsg.psg_matmul(a, g, seg.seg_ptr, seg.order, conv, q_weight, None)
    assert got.shape == (a.shape[0], 0)
