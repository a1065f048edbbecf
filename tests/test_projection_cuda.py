"""CUDA projection kernels (csrc/cuda/projection.cu via fastattr/kernels/cuda.py) vs the reference.

Marked ``cuda``: tests/conftest.py deselects them where no GPU is visible. Projections are held
elementwise to the exact (float64) product of the input with the reference matrix, relative to
sum_i |x_i R_ij| (the natural scale of rounding errors, meaningful for cancelling sums too).
The kernel feeds tensor cores bf16 operands: fp32 inputs and Gaussian entries are split into
hi + lo (each represented to 2^-16 relative, lo * lo dropped), fp16 splits exactly, bf16 and
+-1 are exact; see ``tolerance``. Rademacher rows must be bit-identical to the reference,
Gaussian rows within a few ulp.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

import fastattr
from fastattr import rng
from fastattr.backends import load_extension
from fastattr.reference import projection as reference

pytestmark = pytest.mark.cuda

KINDS = ["rademacher", "gaussian"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
KIND_CODES = {"rademacher": 0, "gaussian": 1}
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
KEY = (0x9E3779B9, 0x7F4A7C15)  # both words >= 2**31: exercises the uint32 key path
DEV = "cuda"


def tolerance(dtypes, kind: str) -> float:
    """Worst-case error of one product relative to |x z|, plus fp32 accumulation.

    Each inexact operand representation costs <= 2^-16 (the bf16 lo term's rounding): fp32
    x's lo; a Gaussian z's lo; and the dropped x_lo * z_lo when both are split.
    """
    x_split = any(d in (torch.float32, torch.float16) for d in dtypes)
    x_inexact = torch.float32 in dtypes
    gauss = kind == "gaussian"
    terms = int(x_inexact) + int(gauss) + int(gauss and x_split)
    return 2e-5 + terms * 1.6e-5


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
def _usable_module(request):
    """Kernel tests need the module's own (static) runtime to see the GPU; test_module_probes
    fails with the reason when it does not (e.g. a driver older than the CUDA it was built with)."""
    if request.node.name != "test_module_probes" and ext().device_count() == 0:
        pytest.skip(f"fastattr._cuda sees no device: {ext().version()['device_status']}")


def rand(*shape, dtype=torch.float32):
    return (torch.randn(*shape, device=DEV) + 0.1).to(dtype)  # random, never zeros


@functools.lru_cache(maxsize=16)
def _matrix(offset: int, p: int, k: int, kind: str, key=KEY, stream: int = 0) -> torch.Tensor:
    rows = torch.arange(offset, offset + p, dtype=torch.int64, device=DEV)
    return reference.materialize(rows, k, kind, key, stream).double()


def assert_matches_exact(got, layers, offsets, k, kind, key=KEY, stream=0):
    """|got - x @ R| <= tol * (|x| @ |R|) elementwise, x @ R in float64."""
    tol = tolerance({x.dtype for x in layers}, kind)
    assert got.dtype == torch.float32 and got.shape == (layers[0].shape[0], k)
    assert got.device.type == "cuda"
    exact = torch.zeros(got.shape, dtype=torch.float64, device=DEV)
    bound = torch.zeros_like(exact)
    for x, off in zip(layers, offsets):
        mat = _matrix(off, x.shape[1], k, kind, key, stream)
        exact += x.double() @ mat
        bound += x.double().abs() @ mat.abs()
    assert torch.isfinite(got).all()
    err = (got.double() - exact).abs()
    worst = (err / bound.clamp_min(1e-300)).max().item()
    assert (err <= tol * bound).all(), f"max error / sum|x R| = {worst:.3g} > {tol}"


def project(layers, offsets, k, kind, key=KEY, stream=0):
    out = cuda_kernels().project(layers, offsets, k, kind, key, stream)
    torch.cuda.synchronize()  # surface asynchronous kernel faults in this test
    return out


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B", [1, 5, 33])
@pytest.mark.parametrize("p", [1, 7, 1000])
@pytest.mark.parametrize("k", [1, 3, 4097])
def test_project_matches_exact_product(kind, dtype, B, p, k):
    x = rand(B, p, dtype=dtype)
    assert_matches_exact(project([x], [0], k, kind), [x], [0], k, kind)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_project_matches_reference_backend(kind, dtype):
    x = rand(9, 777, dtype=dtype)
    got = project([x], [3], 130, kind)
    expected = reference.project([x], [3], 130, kind, KEY, 0)
    # outputs ~ sqrt(777 / 130); both sides carry fp32 rounding
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_fp32_and_fp16_inputs_keep_their_precision(kind, dtype):
    """A bf16-only product would be off by ~1e-3 relative; hi + lo splits keep ~1e-6."""
    x = rand(4, 5000, dtype=dtype)
    got = project([x], [0], 300, kind).double()
    exact = x.double() @ _matrix(0, 5000, 300, kind)
    rel = ((got - exact).norm() / exact.norm()).item()
    assert rel < 1e-5, rel


@pytest.mark.parametrize("kind", KINDS)
def test_large_batch_uses_several_batch_tiles(kind):
    x = rand(300, 333)
    assert_matches_exact(project([x], [0], 257, kind), [x], [0], 257, kind)


@pytest.mark.parametrize("kind", KINDS)
def test_split_k_is_accurate_and_deterministic(kind):
    """Small B * k with long p: the reduction is split over blocks and reduced in fixed order."""
    x = rand(2, 200_003)
    first = project([x], [0], 5, kind)
    assert_matches_exact(first, [x], [0], 5, kind)
    for _ in range(3):
        assert torch.equal(project([x], [0], 5, kind), first)
    y = rand(3, 50_000, dtype=torch.bfloat16)
    assert_matches_exact(project([y], [0], 130, kind), [y], [0], 130, kind)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_input_equals_contiguous(kind, dtype):
    base = rand(40, 9, dtype=dtype)
    cases = [base.T, rand(6, 600, dtype=dtype)[:, ::3], rand(5, 2, 300, dtype=dtype)[:, 1]]
    for x in cases:
        assert not x.is_contiguous()
        got = project([x], [0], 129, kind)
        # the kernel reads the same values in the same order whatever the strides
        assert torch.equal(got, project([x.contiguous()], [0], 129, kind))
        assert_matches_exact(got, [x], [0], 129, kind)


@pytest.mark.parametrize("kind", KINDS)
def test_layers_with_offsets_beyond_32_bits(kind):
    """Layers past 2**32 input indices use the high counter word (p up to 2**40)."""
    layers = [rand(4, 50), rand(4, 70, dtype=torch.bfloat16), rand(4, 33, dtype=torch.float16)]
    offsets = [2**32 - 20, 2**32 + 30, 2**40 + 5]
    got = project(layers, offsets, 33, kind)
    assert_matches_exact(got, layers, offsets, 33, kind)
    torch.testing.assert_close(got, reference.project(layers, offsets, 33, kind, KEY, 0),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_more_layers_than_one_launch_takes(kind):
    """> 64 layers run as several launches; later ones accumulate into the output in order."""
    gen = torch.Generator().manual_seed(0)
    sizes = torch.randint(1, 60, (150,), generator=gen).tolist()
    dtypes = [DTYPES[i % 3] for i in range(150)]
    layers = [rand(6, p, dtype=d) for p, d in zip(sizes, dtypes)]
    offsets = [sum(sizes[:i]) for i in range(150)]
    got = project(layers, offsets, 200, kind)
    assert_matches_exact(got, layers, offsets, 200, kind)
    flat = torch.cat([x.float() for x in layers], dim=1)
    torch.testing.assert_close(got, project([flat], [0], 200, kind), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_materialize_matches_reference(kind):
    rows = torch.tensor([0, 1, 3, 127, 128, 1000, 2**32 - 1, 2**32 + 1, 2**35 - 2, 2**40 + 7])
    for k in (1, 3, 4097):
        ref = reference.materialize(rows, k, kind, KEY, 0)
        got = cuda_kernels().materialize(rows.to(DEV), k, kind, KEY, 0).cpu()
        assert got.shape == (rows.numel(), k)
        if kind == "rademacher":
            assert torch.equal(got, ref)
        else:  # fp32 transcendentals vs the float64 definition: a few ulp
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6 / math.sqrt(k))


@pytest.mark.parametrize("kind", KINDS)
def test_materialize_other_stream_and_key(kind):
    rows = torch.arange(0, 300, 7)
    key = rng.philox_key(12345, 3)
    ref = reference.materialize(rows, 260, kind, key, 2)
    got = cuda_kernels().materialize(rows.to(DEV), 260, kind, key, 2).cpu()
    if kind == "rademacher":
        assert torch.equal(got, ref)
    else:
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6 / math.sqrt(260))
    x = rand(3, 50)
    assert_matches_exact(project([x], [9], 260, kind, key, 2), [x], [9], 260, kind, key, 2)


@pytest.mark.parametrize("kind", KINDS)
def test_materialize_matches_cpu_backend(kind):
    if load_extension("_C")[0] is None:
        pytest.skip("fastattr._C not built")
    from fastattr.kernels import cpu

    rows = torch.tensor([5, 77, 2**33 + 9])
    got = cuda_kernels().materialize(rows.to(DEV), 1000, kind, KEY, 0).cpu()
    ref = cpu.materialize(rows, 1000, kind, KEY, 0)
    if kind == "rademacher":
        assert torch.equal(got, ref)
    else:
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6 / math.sqrt(1000))


@pytest.mark.parametrize("kind", KINDS)
def test_binding_overwrites_poisoned_output(kind):
    """Direct and split-K paths write every output element (no zeroed buffer assumed)."""
    stream = torch.cuda.current_stream().cuda_stream
    for B, p, k in [(6, 333, 70), (2, 100_000, 3)]:
        x = rand(B, p)
        out = torch.full((B, k), float("nan"), device=DEV)
        ext().project(out.data_ptr(), B, [(x.data_ptr(), 0, p, x.stride(0), x.stride(1), 0)], k,
                      KIND_CODES[kind], KEY[0], KEY[1], 0, rng.projection_scale(k), stream)
        torch.cuda.synchronize()
        assert_matches_exact(out, [x], [0], k, kind)
    rows = torch.tensor([1, 2, 3, 2**33], device=DEV)
    mat = torch.full((4, 70), float("nan"), device=DEV)
    ext().materialize(mat.data_ptr(), rows.data_ptr(), 4, 70, KIND_CODES[kind], KEY[0], KEY[1], 0,
                      rng.projection_scale(70), stream)
    torch.cuda.synchronize()
    assert torch.isfinite(mat).all()


def test_runs_on_the_current_stream():
    x = rand(16, 5000)
    expected = project([x], [0], 513, "gaussian")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = cuda_kernels().project([x], [0], 513, "gaussian", KEY, 0)
        mat = cuda_kernels().materialize(torch.arange(5000, device=DEV), 513, "gaussian", KEY, 0)
    side.synchronize()
    assert torch.equal(got, expected)
    torch.testing.assert_close(got.double(), x.double() @ mat.double(), rtol=1e-5, atol=1e-4)


def test_binding_rejects_bad_arguments():
    x = rand(2, 10)
    out = torch.empty(2, 4, device=DEV)
    stream = torch.cuda.current_stream().cuda_stream
    layer = (x.data_ptr(), 0, 10, x.stride(0), x.stride(1), 0)
    with pytest.raises(ValueError, match="kind"):
        ext().project(out.data_ptr(), 2, [layer], 4, 7, 0, 0, 0, 0.5, stream)
    with pytest.raises(ValueError, match="k must be"):
        ext().project(out.data_ptr(), 2, [layer], 0, 0, 0, 0, 0, 0.5, stream)
    with pytest.raises(ValueError, match="dtype"):
        ext().project(out.data_ptr(), 2, [(x.data_ptr(), 9, 10, 10, 1, 0)], 4, 0, 0, 0, 0, 0.5,
                      stream)
    with pytest.raises(ValueError, match="p must be"):
        ext().project(out.data_ptr(), 2, [(x.data_ptr(), 0, 0, 10, 1, 0)], 4, 0, 0, 0, 0, 0.5,
                      stream)
    with pytest.raises(ValueError, match="CUDA tensors"):
        cuda_kernels().project([x.cpu()], [0], 4, "rademacher", KEY, 0)
    with pytest.raises(ValueError, match="is on"):
        cuda_kernels().project([x, x.cpu()], [0, 10], 4, "rademacher", KEY, 0)


def test_module_probes():
    info = ext().version()
    assert ext().device_count() >= 1, info
    assert info["runtime"] >= 12000 and info["driver"] > 0
    assert info["device_status"] == "ok"
    status = fastattr.backends()["cuda"]
    assert status.available, status.reason


@pytest.mark.parametrize("kind", KINDS)
def test_public_api(kind):
    """fastattr.Projector(..., backend="cuda") end to end, against the reference backend on CPU."""
    layers = {
        "conv.weight": rand(5, 4, 3, 3),
        "conv.bias": rand(5, 4, dtype=torch.bfloat16),
        "fc.weight": rand(5, 11, 7, dtype=torch.float16).transpose(1, 2),
    }
    proj = fastattr.Projector(65, kind=kind, seed=3, backend="cuda")
    assert proj.resolve_backend(DEV) == "cuda"
    got = proj.project(layers)
    assert got.device.type == "cuda" and got.shape == (5, 65)
    ref_proj = fastattr.Projector(65, kind=kind, seed=3, backend="reference")
    expected = ref_proj.project({name: x.cpu() for name, x in layers.items()})
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-4, atol=1e-4)
    flat = torch.cat([x.float().reshape(5, -1) for x in layers.values()], dim=1)
    torch.testing.assert_close(proj.project(flat), got, rtol=1e-5, atol=1e-5)
    mat = proj.materialize(torch.tensor([0, 9, 2**33]), device=DEV)
    assert mat.device.type == "cuda"
    ref_mat = ref_proj.materialize(torch.tensor([0, 9, 2**33]))
    if kind == "rademacher":
        assert torch.equal(mat.cpu(), ref_mat)
    else:
        torch.testing.assert_close(mat.cpu(), ref_mat, rtol=1e-5, atol=1e-6)
    y = rand(2, 65)
    back = proj.project_transpose(y, 24)
    torch.testing.assert_close(back.cpu(), ref_proj.project_transpose(y.cpu(), 24), rtol=1e-5,
                               atol=1e-5)
    assert proj.project(rand(0, 7)).shape == (0, 65)
