"""CUDA fused per-sample-gradient kernels (csrc/cuda/psg.cu via fastattr/kernels/cuda.py).

Marked ``cuda``: tests/conftest.py deselects them where no GPU is visible. Results are held
elementwise to the exact (float64) products, relative to the natural scale of their rounding
errors: for psg_project ``sum_i (sum_{r,s} |g a|)_i |R_ij|`` (the kernel accumulates G_b in fp32
from |g a| terms, then multiplies bf16 hi + lo splits of G_b into R on tensor cores), for
psg_matmul the same with |Q|. Outputs are poisoned (NaN) before every launch, segments include
one with no rows (its row must be exactly zero), weight offsets pass 2**32 (hi counter word).
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

import fastattr
from fastattr import rng
from fastattr.backends import load_extension
from fastattr.psg import LayerIO, Segments, conv_output_size, psg_matmul, psg_project
from fastattr.reference import projection as ref_projection
from fastattr.reference import psg as ref

pytestmark = pytest.mark.cuda

DEV = "cuda"
KINDS = ["rademacher", "gaussian"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
KEY = (0x9E3779B9, 0x7F4A7C15)  # both words >= 2**31: exercises the uint32 key path
W_OFFSET = (1 << 33) + 5
B_OFFSET = 17
# fp32 accumulation of G_b over <= a few hundred terms, bf16 hi + lo splits (<= ~2^-17 each),
# fp32 tensor-core accumulation over d_out * F terms: well inside 1e-4 of the error scale
TOL = 1e-4

# name -> (conv geometry or (), a shape, d_out); odd sizes on purpose
LAYERS = {
    "linear_tokens": ((), (6, 3, 7), 5),
    "linear_one_out": ((), (4, 1, 13), 1),
    "linear_wide": ((), (5, 2, 41), 37),  # several o- and f-tiles, a partial bias chunk
    "linear_long_seq": ((), (3, 77, 9), 3),  # > 32 positions per row: several gather rounds
    "conv_stride2_pad": ((3, 3, 2, 2, 1, 1, 1, 1, 1), (5, 3, 7, 6), 5),
    "conv_dil_groups": ((3, 2, 1, 2, 2, 1, 2, 1, 2), (3, 6, 5, 7), 4),
    "conv_1x1_depthwise": ((1, 1, 1, 1, 0, 0, 1, 1, 4), (4, 4, 3, 3), 8),
    "conv_3x3_depthwise": ((3, 3, 1, 1, 1, 1, 1, 1, 3), (2, 3, 6, 5), 3),
    "conv_wide": ((2, 2, 1, 1, 0, 0, 1, 1, 1), (2, 20, 4, 3), 33),  # F = 80: 5 f-tiles
    "conv_pad_exceeds": ((2, 3, 3, 1, 2, 3, 1, 2, 1), (3, 2, 3, 2), 7),  # mostly padding
}


def cuda_kernels():
    from fastattr.kernels import cuda

    return cuda


def ext():
    mod, err = load_extension("_cuda")
    assert mod is not None, err
    return mod


@pytest.fixture(autouse=True)
def _poison_outputs(poison_outputs):
    poison_outputs(cuda_kernels())


@pytest.fixture(autouse=True)
def _fp32_matmuls():
    """Comparisons use torch matmuls: keep them true fp32 whatever other tests set."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


@pytest.fixture(autouse=True)
def _usable_module():
    if ext().device_count() == 0:
        pytest.skip(f"fastattr._cuda sees no device: {ext().version()['device_status']}")


def rand(*shape, dtype=torch.float32):
    return (torch.randn(*shape, device=DEV) + 0.1).to(dtype)  # random, never zeros


def make_layer(name: str, dtype=torch.float32, g_dtype=None, rows: int | None = None):
    conv, a_shape, d_out = LAYERS[name]
    if rows is not None:
        a_shape = (rows, *a_shape[1:])
    a = rand(*a_shape, dtype=dtype)
    if conv:
        kh, kw, sh, sw, ph, pw, dh, dw, _ = conv
        g_shape = (a_shape[0], d_out, conv_output_size(a_shape[2], kh, sh, ph, dh),
                   conv_output_size(a_shape[3], kw, sw, pw, dw))
    else:
        g_shape = (a_shape[0], a_shape[1], d_out)
    return a, rand(*g_shape, dtype=g_dtype or dtype), conv


def features(a, conv) -> int:
    return a.shape[1] // conv[8] * conv[0] * conv[1] if conv else a.shape[2]


def grouped_segments(n: int, extra_empty: bool = True) -> Segments:
    """Rows shuffled into 3 samples, plus (by default) a 4th sample with no rows."""
    ids = torch.randint(0, 3, (n,))
    ids[: min(3, n)] = torch.arange(min(3, n))
    return Segments.from_ids(ids, num_segments=4 if extra_empty else 3, device=DEV)


def exact_grads(a, g, seg: Segments, conv, absolute: bool = False):
    """float64 per-sample (weight [B, d_out * F], bias [B, d_out]); with ``absolute`` the same
    of |a| and |g|, i.e. sum_{r,s} |g a| -- the scale of G_b's fp32 rounding errors."""
    a, g = a.double(), g.double()
    if absolute:
        a, g = a.abs(), g.abs()
    if conv:
        kh, kw, sh, sw, ph, pw, dh, dw, groups = conv
        patches = F.unfold(a, (kh, kw), dilation=(dh, dw), padding=(ph, pw), stride=(sh, sw))
        n, c_out = g.shape[:2]
        positions = g.shape[2] * g.shape[3]
        patches = patches.reshape(n, groups, -1, positions)
        gg = g.reshape(n, groups, c_out // groups, positions)
        weight = torch.einsum("ngol,ngfl->ngof", gg, patches).reshape(n, -1)
        bias = g.sum(dim=(2, 3))
    else:
        weight = torch.einsum("nto,nti->noi", g, a).reshape(a.shape[0], -1)
        bias = g.sum(dim=1)
    ids = ref.segment_ids(seg.seg_ptr, seg.order)
    batch = seg.num_segments
    return (weight.new_zeros(batch, weight.shape[1]).index_add_(0, ids, weight),
            bias.new_zeros(batch, bias.shape[1]).index_add_(0, ids, bias))


@functools.lru_cache(maxsize=32)
def _matrix(offset: int, p: int, k: int, kind: str, key=KEY, stream: int = 0) -> torch.Tensor:
    rows = torch.arange(offset, offset + p, dtype=torch.int64, device=DEV)
    return ref_projection.materialize(rows, k, kind, key, stream).double()


def assert_within(got, exact, bound, tol=TOL):
    assert got.dtype == torch.float32 and got.device.type == "cuda"
    assert got.shape == exact.shape
    assert torch.isfinite(got).all(), "non-finite entries (an unwritten poisoned output?)"
    err = (got.double() - exact).abs()
    worst = (err / bound.clamp_min(1e-300)).max().item()
    assert (err <= tol * bound + 1e-30).all(), f"max error / error scale = {worst:.3g} > {tol}"


def expected_project(a, g, seg, conv, has_bias, k, kind, w_offset=W_OFFSET, b_offset=B_OFFSET,
                     key=KEY, stream=0):
    """(exact, bound) float64 [B, k]."""
    w, b = exact_grads(a, g, seg, conv)
    w_abs, b_abs = exact_grads(a, g, seg, conv, absolute=True)
    r_w = _matrix(w_offset, w.shape[1], k, kind, key, stream)
    exact, bound = w @ r_w, w_abs @ r_w.abs()
    if has_bias:
        r_b = _matrix(b_offset, b.shape[1], k, kind, key, stream)
        exact, bound = exact + b @ r_b, bound + b_abs @ r_b.abs()
    return exact, bound


def expected_matmul(a, g, seg, conv, q_weight, q_bias):
    w, b = exact_grads(a, g, seg, conv)
    w_abs, b_abs = exact_grads(a, g, seg, conv, absolute=True)
    q = q_weight.double().reshape(q_weight.shape[0], -1)
    exact, bound = w @ q.T, w_abs @ q.abs().T
    if q_bias is not None:
        exact, bound = exact + b @ q_bias.double().T, bound + b_abs @ q_bias.double().abs().T
    return exact, bound


def run_project(a, g, seg, conv, has_bias, k, kind, w_offset=W_OFFSET, b_offset=B_OFFSET,
                key=KEY, stream=0):
    out = cuda_kernels().psg_project(a, g, seg.seg_ptr, seg.order, conv, has_bias, w_offset,
                                     b_offset, k, kind, key, stream)
    torch.cuda.synchronize()  # surface asynchronous kernel faults in this test
    return out


def run_matmul(a, g, seg, conv, q_weight, q_bias):
    out = cuda_kernels().psg_matmul(a, g, seg.seg_ptr, seg.order, conv, q_weight, q_bias)
    torch.cuda.synchronize()
    return out


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(LAYERS))
def test_psg_project_matches_exact(name, dtype, kind):
    a, g, conv = make_layer(name, dtype)
    seg = grouped_segments(a.shape[0])
    has_bias = name not in ("linear_one_out", "conv_dil_groups")
    for k in (1, 130):
        got = run_project(a, g, seg, conv, has_bias, k, kind)
        assert_within(got, *expected_project(a, g, seg, conv, has_bias, k, kind))
        assert (got[3] == 0).all(), "a sample with no rows must project to exactly zero"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [3, 257, 300, 777])
def test_psg_project_column_tiles(kind, k):
    """k past one 128-column sub-tile, one 256-column block, and with a ragged last tile."""
    a, g, conv = make_layer("conv_stride2_pad")
    seg = grouped_segments(a.shape[0])
    got = run_project(a, g, seg, conv, True, k, kind)
    assert_within(got, *expected_project(a, g, seg, conv, True, k, kind))


@pytest.mark.parametrize("kind", KINDS)
def test_psg_project_matches_reference_backend(kind):
    a, g, conv = make_layer("conv_dil_groups", torch.bfloat16)
    seg = grouped_segments(a.shape[0])
    got = run_project(a, g, seg, conv, True, 65, kind)
    want = ref.psg_project(a, g, seg.seg_ptr, seg.order, conv, True, W_OFFSET, B_OFFSET, 65, kind,
                           KEY, 0)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


@pytest.mark.parametrize("kind", KINDS)
def test_mixed_input_dtypes(kind):
    """a and g may differ in dtype (each is upcast on load)."""
    for a_dtype, g_dtype in [(torch.float32, torch.bfloat16), (torch.float16, torch.float32)]:
        a, g, conv = make_layer("linear_tokens", a_dtype, g_dtype)
        seg = grouped_segments(a.shape[0])
        got = run_project(a, g, seg, conv, True, 40, kind)
        assert_within(got, *expected_project(a, g, seg, conv, True, 40, kind))


@pytest.mark.parametrize("kind", KINDS)
def test_many_segments_and_rows(kind):
    """> 32 segments (several segment tiles), one row each and several rows each."""
    a, g, conv = make_layer("linear_tokens", rows=150)
    for seg in (Segments.identity(150, device=DEV),
                Segments.from_ids(torch.randint(0, 70, (150,)), num_segments=71, device=DEV)):
        got = run_project(a, g, seg, conv, True, 100, kind)
        assert_within(got, *expected_project(a, g, seg, conv, True, 100, kind))
    a, g, conv = make_layer("conv_stride2_pad", rows=40)
    seg = Segments.identity(40, device=DEV)
    got = run_project(a, g, seg, conv, True, 33, kind)
    assert_within(got, *expected_project(a, g, seg, conv, True, 33, kind))


@pytest.mark.parametrize("kind", KINDS)
def test_split_chunks_accurate_and_deterministic(kind):
    """Few outputs, a large layer: the chunk list is split over blocks and reduced in order."""
    a = rand(3, 4, 300)
    g = rand(3, 4, 200)
    seg = Segments.identity(3, device=DEV)
    first = run_project(a, g, seg, (), True, 5, kind)
    assert_within(first, *expected_project(a, g, seg, (), True, 5, kind))
    for _ in range(3):
        assert torch.equal(run_project(a, g, seg, (), True, 5, kind), first)


@pytest.mark.parametrize("kind", KINDS)
def test_other_key_stream_and_offsets(kind):
    a, g, conv = make_layer("conv_wide")
    seg = grouped_segments(a.shape[0])
    key = rng.philox_key(12345, 3)
    for w_off, b_off in [(0, 2**32 - 10), (2**40 + 3, 7)]:
        got = run_project(a, g, seg, conv, True, 70, kind, w_off, b_off, key, 2)
        assert_within(got, *expected_project(a, g, seg, conv, True, 70, kind, w_off, b_off,
                                             key, 2))


@pytest.mark.parametrize("q_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["linear_tokens", "linear_wide", "conv_stride2_pad",
                                  "conv_dil_groups", "conv_1x1_depthwise", "conv_wide"])
def test_psg_matmul_matches_exact(name, q_dtype):
    a, g, conv = make_layer(name)
    seg = grouped_segments(a.shape[0])
    d_out = g.shape[1] if conv else g.shape[2]
    for q in (1, 7, 300):
        q_weight = rand(q, d_out, features(a, conv), dtype=q_dtype)
        for q_bias in (None, rand(q, d_out, dtype=q_dtype), rand(q, d_out, dtype=torch.bfloat16)):
            got = run_matmul(a, g, seg, conv, q_weight, q_bias)
            assert_within(got, *expected_matmul(a, g, seg, conv, q_weight, q_bias))
            assert (got[3] == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_psg_matmul_low_precision_inputs(dtype):
    a, g, conv = make_layer("conv_3x3_depthwise", dtype)
    seg = grouped_segments(a.shape[0])
    q_weight = rand(9, g.shape[1], features(a, conv))
    q_bias = rand(9, g.shape[1])
    got = run_matmul(a, g, seg, conv, q_weight, q_bias)
    assert_within(got, *expected_matmul(a, g, seg, conv, q_weight, q_bias))
    want = ref.psg_matmul(a, g, seg.seg_ptr, seg.order, conv, q_weight, q_bias)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_runs_on_the_current_stream():
    a, g, conv = make_layer("conv_wide")
    seg = grouped_segments(a.shape[0])
    expected = run_project(a, g, seg, conv, True, 300, "gaussian")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = cuda_kernels().psg_project(a, g, seg.seg_ptr, seg.order, conv, True, W_OFFSET,
                                         B_OFFSET, 300, "gaussian", KEY, 0)
    side.synchronize()
    assert torch.equal(got, expected)


def test_bad_arguments_raise():
    a, g, conv = make_layer("conv_stride2_pad")
    seg = grouped_segments(a.shape[0])
    kernels = cuda_kernels()
    with pytest.raises(ValueError, match="CUDA tensors"):
        kernels.psg_project(a.cpu(), g.cpu(), seg.seg_ptr.cpu(), seg.order.cpu(), conv, True, 0, 0,
                            8, "rademacher", KEY, 0)
    with pytest.raises(ValueError, match="is on"):
        kernels.psg_project(a, g, seg.seg_ptr.cpu(), seg.order, conv, True, 0, 0, 8, "rademacher",
                            KEY, 0)
    with pytest.raises(ValueError, match="output size"):
        kernels.psg_project(a, g, seg.seg_ptr, seg.order, (3, 3, 1, 1, 1, 1, 1, 1, 1), True, 0, 0,
                            8, "rademacher", KEY, 0)
    with pytest.raises(ValueError, match="q_weight"):
        kernels.psg_matmul(a, g, seg.seg_ptr, seg.order, conv, rand(2, 5, 3, 2), None)
    with pytest.raises(ValueError, match="q_bias"):
        kernels.psg_matmul(a, g, seg.seg_ptr, seg.order, conv, rand(2, 5, 3, 3, 3), rand(2, 4))
    stream = torch.cuda.current_stream().cuda_stream
    out = torch.empty(seg.num_segments, 8, device=DEV)
    args = (out.data_ptr(), a.data_ptr(), 0, list(a.shape), g.data_ptr(), 0, list(g.shape),
            list(conv), seg.seg_ptr.data_ptr(), seg.order.data_ptr(), seg.num_segments, True, 0, 0)
    with pytest.raises(ValueError, match="kind"):
        ext().psg_project(*args, 8, 7, 0, 0, 0, 0.5, stream)
    with pytest.raises(ValueError, match="k must be"):
        ext().psg_project(*args, 0, 0, 0, 0, 0, 0.5, stream)
    bad_dtype = (out.data_ptr(), a.data_ptr(), 9, *args[3:])
    with pytest.raises(ValueError, match="dtype"):
        ext().psg_project(*bad_dtype, 8, 0, 0, 0, 0, 0.5, stream)
    with pytest.raises(ValueError, match="groups"):
        ext().psg_project(*args[:7], [3, 3, 2, 2, 1, 1, 1, 1, 2], *args[8:], 8, 0, 0, 0, 0, 0.5,
                          stream)


@pytest.mark.parametrize("kind", KINDS)
def test_public_api(kind):
    """fastattr.psg with backend="cuda" end to end, against the reference backend on CPU."""
    a, g, conv = make_layer("conv_dil_groups")
    ids = torch.tensor([0, 2, 0])
    layer = LayerIO(a, g, conv)
    seg = Segments.from_ids(ids, num_segments=3)
    proj = fastattr.Projector(65, kind=kind, seed=3, backend="cuda")
    ref_proj = fastattr.Projector(65, kind=kind, seed=3, backend="reference")
    got = psg_project(layer, seg, proj, 2**33, 1000)
    assert got.device.type == "cuda" and got.shape == (3, 65)
    cpu_layer = LayerIO(a.cpu(), g.cpu(), conv)
    want = psg_project(cpu_layer, seg, ref_proj, 2**33, 1000)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    assert (got[1] == 0).all()
    q_weight = rand(4, g.shape[1], features(a, conv))
    q_bias = rand(4, g.shape[1])
    got = psg_matmul(layer, seg, q_weight, q_bias, backend="cuda")
    want = psg_matmul(cpu_layer, seg, q_weight.cpu(), q_bias.cpu(), backend="reference")
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
