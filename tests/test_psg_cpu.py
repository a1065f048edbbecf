"""CPU-specific checks of the fused per-sample-gradient kernels (fastattr._C psg_project /
psg_matmul) beyond tests/test_psg_ops.py: shapes large enough to cross every blocking
boundary of the kernel (feature blocks, channel blocks inside groups, reduction chunks, wide
images, sample chunks), every SIMD variant, bitwise determinism across thread counts and
batch splits, and the checks the extension does before it touches memory.
"""

from __future__ import annotations

import pytest
import torch

import fastattr
from fastattr.backends import backends
from fastattr.psg import Segments
from fastattr.reference import psg as ref

pytestmark = pytest.mark.skipif(not backends()["cpu"].available, reason="fastattr._C not built")

# "native": the best build this CPU runs (psg_project on the AMX tile units where the CPU has
# them); the others are forced with FASTATTR_CPU_SIMD.
SIMD = ["native", "avx512", "avx2", "generic"]


def use_simd(monkeypatch, simd):
    if simd == "native":
        monkeypatch.delenv("FASTATTR_CPU_SIMD", raising=False)
    else:
        monkeypatch.setenv("FASTATTR_CPU_SIMD", simd)


def kernels():
    from fastattr.kernels import cpu

    return cpu


def assert_rel(actual, expected, tol=1e-5):
    assert actual.shape == expected.shape and actual.dtype == torch.float32
    assert torch.isfinite(actual).all()
    scale = expected.abs().max().clamp_min(1e-30)
    err = (actual.double() - expected.double()).abs().max()
    assert err <= tol * scale, f"max error {float(err):.3e} > {tol} x {float(scale):.3e}"


# name -> (a shape, g shape, conv). Sizes cross the kernel's blocks: F > 64 (feature blocks),
# d_out above a block's channels (inside groups too), > 256 tokens or output columns
# (reduction chunks), stride / padding / dilation on both axes.
LAYERS = {
    "linear_wide": ((9, 3, 150), (9, 3, 70), ()),
    "linear_long": ((5, 300, 20), (5, 300, 11), ()),
    "conv_3x3": ((9, 24, 9, 11), (9, 40, 9, 11), (3, 3, 1, 1, 1, 1, 1, 1, 1)),
    "conv_groups_f96": ((7, 32, 10, 13), (7, 300, 5, 12), (3, 2, 2, 1, 2, 0, 2, 1, 2)),
    "conv_wide_image": ((4, 3, 3, 300), (4, 5, 3, 300), (1, 3, 1, 1, 0, 1, 1, 1, 1)),
    "conv_depthwise_s2": ((6, 8, 7, 7), (6, 8, 4, 4), (3, 3, 2, 2, 1, 1, 1, 1, 8)),
    # more samples than one 32-row group of the tile kernels
    "conv_45_samples": ((45, 6, 5, 5), (45, 10, 5, 5), (3, 3, 1, 1, 1, 1, 1, 1, 1)),
}


def make(name, dtype=torch.float32):
    a_shape, g_shape, conv = LAYERS[name]
    return torch.randn(a_shape).to(dtype), torch.randn(g_shape).to(dtype), conv


def grouped(n: int, num_segments: int):
    """Rows shuffled into segments; segment 1 has no rows."""
    ids = torch.randint(0, num_segments, (n,))
    ids[ids == 1] = 0
    return Segments.from_ids(ids, num_segments=num_segments)


def shape_info(a, g, conv):
    d_out = g.shape[1] if conv else g.shape[2]
    features = a.shape[1] // conv[8] * conv[0] * conv[1] if conv else a.shape[2]
    return d_out, features


@pytest.mark.parametrize("simd", SIMD)
@pytest.mark.parametrize("name", list(LAYERS))
def test_psg_project_large_shapes(name, simd, monkeypatch):
    use_simd(monkeypatch, simd)
    a, g, conv = make(name)
    seg = grouped(a.shape[0], 5)
    for k, kind in ((300, "rademacher"), (70, "gaussian")):
        key = fastattr.Projector(k, kind=kind, seed=11).key
        args = (a, g, seg.seg_ptr, seg.order, conv, True, (1 << 32) + 3, 5, k, kind, key, 0)
        got = kernels().psg_project(*args)
        assert_rel(got, ref.psg_project(*args))
        assert (got[1] == 0).all()


@pytest.mark.parametrize("simd", SIMD)
@pytest.mark.parametrize("name", list(LAYERS))
def test_psg_matmul_large_shapes(name, simd, monkeypatch):
    use_simd(monkeypatch, simd)
    a, g, conv = make(name)
    seg = grouped(a.shape[0], 5)
    d_out, features = shape_info(a, g, conv)
    q = 45  # more than one micro-tile of columns
    q_weight = torch.randn(q, d_out * features)
    q_bias = torch.randn(q, d_out).to(torch.bfloat16)
    got = kernels().psg_matmul(a, g, seg.seg_ptr, seg.order, conv, q_weight, q_bias)
    assert_rel(got, ref.psg_matmul(a, g, seg.seg_ptr, seg.order, conv, q_weight, q_bias))
    assert (got[1] == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["linear_wide", "conv_groups_f96"])
def test_half_inputs_upcast_exactly(name, dtype):
    """bf16 / fp16 a and g are upcast on load: the result matches the fp32 reference on the
    same (rounded) values to fp32 accuracy."""
    a, g, conv = make(name, dtype)
    seg = Segments.identity(a.shape[0])
    key = fastattr.Projector(129).key
    args = (a, g, seg.seg_ptr, seg.order, conv, True, 0, 10**6, 129, "rademacher", key, 0)
    assert_rel(kernels().psg_project(*args), ref.psg_project(*args))
    d_out, features = shape_info(a, g, conv)
    q_weight = torch.randn(3, d_out * features).to(dtype)
    assert_rel(kernels().psg_matmul(a, g, seg.seg_ptr, seg.order, conv, q_weight, None),
               ref.psg_matmul(a, g, seg.seg_ptr, seg.order, conv, q_weight, None))


@pytest.mark.parametrize("simd", ["native", "avx512"])
@pytest.mark.parametrize("name", ["linear_wide", "conv_3x3", "conv_45_samples"])
def test_bitwise_same_for_any_thread_count_and_batch_split(name, simd, monkeypatch):
    use_simd(monkeypatch, simd)
    a, g, conv = make(name)
    n = a.shape[0]
    key = fastattr.Projector(700).key

    def run(lo, hi, threads):
        seg = Segments.identity(hi - lo)
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return kernels().psg_project(a[lo:hi], g[lo:hi], seg.seg_ptr, seg.order, conv, True,
                                         3, 1, 700, "rademacher", key, 0)
        finally:
            torch.set_num_threads(old)

    full = run(0, n, 2)
    assert torch.equal(full, run(0, n, 1))
    assert torch.equal(full, run(0, n, 3))
    assert torch.equal(full, torch.cat([run(0, 2, 2), run(2, n, 1)]))
    cut = n // 2 + 1  # another row-group boundary
    assert torch.equal(full, torch.cat([run(0, cut, 1), run(cut, n, 2)]))


@pytest.mark.parametrize("simd", ["native", "avx512"])
def test_many_samples_and_columns(simd, monkeypatch):
    """More samples than one 32-row group of the tile kernels (2x2 and 1x4 paths), columns
    past one generated tile (1024) and not a multiple of 64, blocks deeper than one 512-entry
    slice, and a column count small enough that threads split the samples instead."""
    use_simd(monkeypatch, simd)
    a, g = torch.randn(70, 3, 150), torch.randn(70, 3, 40)
    seg = grouped(70, 41)
    for k, kind, threads in ((1100, "rademacher", 2), (100, "rademacher", 2), (100, "gaussian", 3),
                             (70, "gaussian", 1)):
        key = fastattr.Projector(k, kind=kind, seed=3).key
        args = (a, g, seg.seg_ptr, seg.order, (), True, 17, 9000, k, kind, key, 0)
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            got = kernels().psg_project(*args)
        finally:
            torch.set_num_threads(old)
        assert_rel(got, ref.psg_project(*args))
        assert (got[1] == 0).all()


def test_more_samples_than_one_pass():
    """Batches beyond the kernel's sample chunk (1024) are processed in passes."""
    a, g = torch.randn(1100, 2, 3), torch.randn(1100, 2, 4)
    seg = grouped(1100, 1030)
    key = fastattr.Projector(9).key
    args = (a, g, seg.seg_ptr, seg.order, (), True, 0, 12, 9, "rademacher", key, 0)
    got = kernels().psg_project(*args)
    assert_rel(got, ref.psg_project(*args))
    assert (got[1] == 0).all()


def test_one_segment_with_every_row():
    a, g, conv = make("conv_3x3")
    seg = Segments.from_ids(torch.zeros(a.shape[0], dtype=torch.int64))
    key = fastattr.Projector(33, kind="gaussian").key
    args = (a, g, seg.seg_ptr, seg.order, conv, False, 0, 0, 33, "gaussian", key, 0)
    assert_rel(kernels().psg_project(*args), ref.psg_project(*args))


def test_bad_segments_raise_before_reading():
    a, g = torch.randn(4, 2, 3), torch.randn(4, 2, 5)
    key = fastattr.Projector(8).key
    cpu = kernels()

    def call(seg_ptr, order):
        return cpu.psg_project(a, g, torch.tensor(seg_ptr), torch.tensor(order), (), False, 0, 0,
                               8, "rademacher", key, 0)

    with pytest.raises(ValueError, match="seg_ptr"):
        call([0, 2, 3], [0, 1, 2, 3])  # ends before the last row
    with pytest.raises(ValueError, match="non-decreasing"):
        call([0, 3, 2, 4], [0, 1, 2, 3])
    with pytest.raises(ValueError, match="permutation"):
        call([0, 2, 4], [0, 1, 1, 3])
    with pytest.raises(ValueError, match="permutation"):
        call([0, 2, 4], [0, 1, 2, 9])
    with pytest.raises(ValueError, match="output positions"):
        cpu.psg_project(torch.randn(2, 3, 5, 5), torch.randn(2, 4, 5, 5), torch.tensor([0, 1, 2]),
                        torch.tensor([0, 1]), (3, 3, 1, 1, 0, 0, 1, 1, 1), False, 0, 0, 8,
                        "rademacher", key, 0)
    with pytest.raises(ValueError, match="q_weight"):
        cpu.psg_matmul(a, g, torch.tensor([0, 4]), torch.arange(4), (), torch.randn(2, 14), None)
