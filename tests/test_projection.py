"""Projector: every backend here against x @ materialize(...), the JL property, input handling."""

import math

import pytest
import torch

import fastattr
from fastattr import rng
from fastattr.backends import load_extension
from fastattr.kernels import cpu as cpu_kernels
from fastattr.reference import projection as reference

KINDS = ["rademacher", "gaussian"]
HOST_BACKENDS = ["reference", "cpu"]
# (dtype, rtol, atol) of project vs x.float() @ materialize: fp32 accumulation either way, so
# only summation order differs; low-precision inputs are upcast exactly before the product.
DTYPES = [(torch.float32, 1e-5, 1e-5), (torch.bfloat16, 1e-5, 1e-5), (torch.float16, 1e-5, 1e-5)]


@pytest.fixture(autouse=True)
def _poison_outputs(poison_outputs):
    poison_outputs(cpu_kernels)  # the launcher's output buffers start as NaN


def dense_projection(x: torch.Tensor, proj: fastattr.Projector) -> torch.Tensor:
    """float64 x @ R: the exact product the backends round to fp32."""
    mat = proj.materialize(x.shape[1], device="cpu").double()
    return x.double() @ mat


def rand(*shape, dtype=torch.float32):
    return (torch.randn(*shape) + 0.1).to(dtype)  # random, never zeros


SIMD_LEVELS = ["amx", "avx512", "avx2", "generic"]  # highest first


@pytest.fixture(params=SIMD_LEVELS)
def simd(request, monkeypatch):
    """Run the cpu backend in each of its SIMD variants (a lower one is forced by env; on a
    CPU without the requested one the highest it has runs)."""
    monkeypatch.setenv("FASTATTR_CPU_SIMD", request.param)
    ext, _ = load_extension("_C")
    level = ext.simd_level()
    assert SIMD_LEVELS.index(level) >= SIMD_LEVELS.index(request.param)
    return level


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype,rtol,atol", DTYPES)
@pytest.mark.parametrize(
    "B,p,k",
    # 49 rows: 16-row blocks in a 2 x 2 pair and a single one (the amx kernel's two shapes);
    # 1100 inputs: two full 512-deep blocks and a ragged one; 2200 columns: a second column
    # block narrower than one group per thread
    [(1, 1, 1), (5, 7, 3), (3, 129, 130), (9, 1000, 4097), (17, 300, 257), (49, 1100, 2200)],
)
def test_cpu_matches_dense_product(simd, kind, dtype, rtol, atol, B, p, k):
    x = rand(B, p, dtype=dtype)
    proj = fastattr.Projector(k, kind=kind, seed=7, backend="cpu")
    got = proj.project(x)
    assert got.dtype == torch.float32 and got.shape == (B, k)
    expected = dense_projection(x.float(), proj)
    torch.testing.assert_close(got.double(), expected, rtol=rtol, atol=atol * math.sqrt(p / k))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype,rtol,atol", DTYPES)
@pytest.mark.parametrize("B,p,k", [(1, 1, 1), (5, 7, 3), (4, 257, 129)])
def test_reference_matches_dense_product(kind, dtype, rtol, atol, B, p, k):
    x = rand(B, p, dtype=dtype)
    proj = fastattr.Projector(k, kind=kind, seed=11, backend="reference")
    expected = dense_projection(x.float(), proj)
    torch.testing.assert_close(proj.project(x).double(), expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("kind", KINDS)
def test_materialize_identical_across_backends(kind):
    rows = torch.tensor([0, 3, 127, 128, 2**32 + 1, 2**35 - 2])
    ref = fastattr.Projector(4097, kind=kind, seed=99, backend="reference").materialize(rows)
    got = fastattr.Projector(4097, kind=kind, seed=99, backend="cpu").materialize(rows)
    if kind == "rademacher":
        assert torch.equal(got, ref)
    else:  # fp32 transcendentals vs float64: a few ulp
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6 / math.sqrt(4097))


@pytest.mark.parametrize("kind", KINDS)
def test_cpu_kernel_overwrites_poisoned_output(kind):
    """The kernel writes every output element (no reliance on a zeroed buffer)."""
    ext, _ = load_extension("_C")
    x = rand(6, 333)
    key = rng.philox_key(5, 0)
    kind_code = {"rademacher": 0, "gaussian": 1}[kind]
    out = torch.full((6, 70), float("nan"))
    ext.project(out.data_ptr(), 6, [(x.data_ptr(), 0, 333, x.stride(0), x.stride(1), 0)], 70,
                kind_code, key[0], key[1], 0, rng.projection_scale(70), 2)
    expected = reference.project([x], [0], 70, kind, key, 0)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    mat = torch.full((4, 70), float("nan"))
    rows = torch.tensor([1, 2, 3, 2**33])
    ext.materialize(mat.data_ptr(), rows.data_ptr(), 4, 70, kind_code, key[0], key[1], 0,
                    rng.projection_scale(70), 2)
    assert torch.isfinite(mat).all()
    torch.testing.assert_close(mat, reference.materialize(rows, 70, kind, key, 0), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_large_p_and_odd_k(backend):
    x = rand(2, 1_000_003)
    proj = fastattr.Projector(3, seed=1, backend=backend)
    torch.testing.assert_close(proj.project(x).double(), dense_projection(x, proj), rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("kind", KINDS)
def test_offsets_beyond_32_bits(kind):
    """Layers placed past 2**32 input indices use the high counter word (p up to 2**40)."""
    key = rng.philox_key(3, 1)
    layers = [rand(4, 50), rand(4, 70)]
    offsets = [2**32 - 20, 2**40 + 5]
    got = cpu_kernels.project(layers, offsets, 33, kind, key, 0)
    expected = reference.project(layers, offsets, 33, kind, key, 0)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    low = reference.project([layers[1]], [5], 33, kind, key, 0)
    assert not torch.allclose(reference.project([layers[1]], [2**40 + 5], 33, kind, key, 0), low)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_dict_and_list_equal_flat(backend, kind):
    layers = {"conv.weight": rand(5, 4, 3, 3), "conv.bias": rand(5, 4), "fc.weight": rand(5, 7, 11)}
    flat = torch.cat([v.reshape(5, -1) for v in layers.values()], dim=1)
    proj = fastattr.Projector(65, kind=kind, seed=3, backend=backend)
    ref = proj.project(flat)
    torch.testing.assert_close(proj.project(layers), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(proj.project(list(layers.values())), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_non_contiguous_input(backend):
    base = rand(40, 9)
    x = base.T  # [9, 40], strides (1, 9)
    y = rand(6, 200)[:, ::3]  # stride 3 along p
    proj = fastattr.Projector(19, kind="gaussian", seed=2, backend=backend)
    torch.testing.assert_close(proj.project(x), proj.project(x.contiguous()), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(proj.project(y), proj.project(y.contiguous()), rtol=1e-6, atol=1e-6)
    layers = {"a": rand(3, 4, 5).transpose(1, 2), "b": rand(8, 3).T}
    flat = torch.cat([v.reshape(3, -1) for v in layers.values()], dim=1)
    torch.testing.assert_close(proj.project(layers), proj.project(flat), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_cpu_is_fp32_accurate_over_a_wide_range(simd, kind):
    """Inputs from 1e-30 to 1e30 (per row), few terms per output: each output must be within
    fp32 rounding of the float64 product relative to its own sum of |x R|. The amx kernel
    splits each fp32 input (and each Gaussian entry) into three bf16 parts; with a part
    missing the error would reach 2^-16 of that sum."""
    B, p, k = 20, 3, 40
    x = rand(B, p) * torch.logspace(-30, 30, B).unsqueeze(1)
    proj = fastattr.Projector(k, kind=kind, seed=21, backend="cpu")
    got = proj.project(x).double()
    mat = proj.materialize(p).double()
    expected = x.double() @ mat
    magnitude = x.double().abs() @ mat.abs()
    assert torch.isfinite(got).all()
    assert ((got - expected).abs() / magnitude).max() < 1e-6


def test_batch_splits_are_bit_identical_on_cpu():
    x = rand(37, 777)
    for kind in KINDS:
        proj = fastattr.Projector(300, kind=kind, seed=4, backend="cpu")
        whole = proj.project(x)
        parts = torch.cat([proj.project(x[:1]), proj.project(x[1:20]), proj.project(x[20:])])
        assert torch.equal(whole, parts)
        assert torch.equal(whole, proj.project(x))  # deterministic run to run


def test_thread_count_does_not_change_result():
    x = rand(16, 2000)
    proj = fastattr.Projector(700, kind="gaussian", seed=4, backend="cpu")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = proj.project(x)
        torch.set_num_threads(2)
        two = proj.project(x)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


@pytest.mark.parametrize("kind", KINDS)
def test_same_result_across_backends(kind):
    x = rand(7, 300)
    results = [fastattr.Projector(129, kind=kind, seed=8, backend=b).project(x) for b in HOST_BACKENDS]
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_jl_norms_and_inner_products(kind):
    n, p, k = 200, 3000, 1024
    x = torch.randn(n, p) * torch.rand(n, 1) * 10  # varied norms
    proj = fastattr.Projector(k, kind=kind, seed=21, backend="cpu")
    y = proj.project(x).double()
    x = x.double()
    ratio = y.pow(2).sum(1) / x.pow(2).sum(1)
    # E ratio = 1, Var = 2/k per sample (Gaussian; less for Rademacher): 5 sigma on the mean
    assert abs(ratio.mean().item() - 1.0) < 5 * math.sqrt(2.0 / k / n)
    assert (ratio - 1).abs().max() < 6 * math.sqrt(2.0 / k)
    xn = x / x.norm(dim=1, keepdim=True)
    yn = y / x.norm(dim=1, keepdim=True)
    err = (yn[:50] @ yn[50:100].T) - (xn[:50] @ xn[50:100].T)
    # JL: |<Px, Py> - <x, y>| <= eps for unit vectors, eps ~ sqrt(2/k) per pair; 6 sigma
    assert err.abs().max() < 6 * math.sqrt(2.0 / k)


def test_ensemble_ids_give_independent_matrices():
    mats = [fastattr.Projector(512, seed=0, ensemble_id=e, backend="cpu").materialize(400) for e in range(3)]
    n = mats[0].numel()
    for a in range(3):
        for b in range(a + 1, 3):
            corr = torch.corrcoef(torch.stack([mats[a].flatten(), mats[b].flatten()]))[0, 1]
            assert abs(corr) < 5 / math.sqrt(n)
    other_seed = fastattr.Projector(512, seed=1, backend="cpu").materialize(400)
    assert not torch.equal(other_seed, mats[0])
    assert torch.equal(fastattr.Projector(512, seed=0, backend="cpu").materialize(400), mats[0])


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_project_transpose_is_the_adjoint(backend):
    proj = fastattr.Projector(37, kind="gaussian", seed=6, backend=backend)
    shapes = {"w": (4, 5), "b": (4,)}
    x = {"w": rand(3, 4, 5), "b": rand(3, 4)}
    y = rand(3, 37)
    back = proj.project_transpose(y, shapes)
    assert back["w"].shape == (3, 4, 5) and back["b"].shape == (3, 4)
    lhs = (proj.project(x) * y).sum(1)
    rhs = (x["w"] * back["w"]).sum((1, 2)) + (x["b"] * back["b"]).sum(1)
    torch.testing.assert_close(lhs, rhs, rtol=1e-4, atol=1e-4)
    flat = proj.project_transpose(y, 24)
    torch.testing.assert_close(flat, y @ proj.materialize(24).T)
    torch.testing.assert_close(proj.project_transpose(y[0], 24), flat[0])


def test_backends_report():
    status = fastattr.backends()
    assert set(status) == {"reference", "cpu", "triton", "cuda"}
    assert status["cpu"].available, status["cpu"].reason
    assert status["reference"].available
    for name, st in status.items():
        assert st.reason, name  # every backend says why (not) available


# ---------------------------------------------------------------- bad input


def test_rejects_bad_k_and_kind():
    with pytest.raises(ValueError, match="k must be"):
        fastattr.Projector(0)
    with pytest.raises(ValueError, match="k must be"):
        fastattr.Projector(-3)
    with pytest.raises(TypeError, match="k must be an int"):
        fastattr.Projector(4.0)
    with pytest.raises(ValueError, match="kind"):
        fastattr.Projector(4, kind="sparse")
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        fastattr.Projector(4, backend="tpu")
    with pytest.raises(ValueError, match="seed"):
        fastattr.Projector(4, seed=-1)


def test_rejects_bad_input():
    proj = fastattr.Projector(8, backend="cpu")
    with pytest.raises(ValueError, match="x must be a 2-D"):
        proj.project(rand(3))
    with pytest.raises(ValueError, match="x must be a 2-D"):
        proj.project(rand(2, 3, 4))
    with pytest.raises(ValueError, match=r"x\['b'\] has batch size 4"):
        proj.project({"a": rand(3, 5), "b": rand(4, 5)})
    with pytest.raises(TypeError, match=r"x\[1\] must be float32"):
        proj.project([rand(3, 5), torch.ones(3, 5, dtype=torch.int64)])
    with pytest.raises(TypeError, match="x must be float32"):
        proj.project(torch.randn(3, 5, dtype=torch.complex64))
    with pytest.raises(TypeError, match="x must be float32"):
        proj.project(torch.ones(3, 5, dtype=torch.int32))
    with pytest.raises(ValueError, match="empty"):
        proj.project({})
    with pytest.raises(TypeError, match="x must be a Tensor"):
        proj.project("gradients")
    with pytest.raises(ValueError, match="no elements"):
        proj.project({"a": rand(3, 5), "b": torch.empty(3, 0)})


def test_check_finite_names_the_layer():
    x = rand(3, 5)
    x[1, 2] = float("nan")
    fastattr.Projector(8, backend="cpu").project(x)  # off by default: no scan
    with pytest.raises(ValueError, match=r"x\['g'\] contains NaN"):
        fastattr.Projector(8, backend="cpu", check_finite=True).project({"f": rand(3, 2), "g": x})
    x[1, 2] = float("inf")
    with pytest.raises(ValueError, match="x contains NaN or Inf"):
        fastattr.Projector(8, backend="cpu", check_finite=True).project(x)


def test_rejects_bad_transpose_and_rows():
    proj = fastattr.Projector(8, backend="cpu")
    with pytest.raises(ValueError, match="y must have shape"):
        proj.project_transpose(rand(2, 7), 10)
    with pytest.raises(ValueError, match="p must be"):
        proj.project_transpose(rand(2, 8), 0)
    with pytest.raises(TypeError, match="rows"):
        proj.materialize(torch.tensor([0.5]))
    with pytest.raises(ValueError, match="rows"):
        proj.materialize(torch.tensor([-1]))


def test_float64_and_empty_batch():
    proj = fastattr.Projector(8, backend="cpu")
    x = rand(3, 5).double()
    torch.testing.assert_close(proj.project(x), proj.project(x.float()))
    assert proj.project(rand(0, 5)).shape == (0, 8)


def test_custom_op_traces_under_torch_compile():
    from fastattr import ops

    proj = fastattr.Projector(33, kind="gaussian", seed=3, backend="cpu")
    x = rand(5, 71)
    layers = [x[:, :40], x[:, 40:]]
    torch.library.opcheck(ops.project, (layers, [0, 40], 33, "gaussian", *proj.key, 0, "cpu"))

    def features(g):
        return proj.project(g) * 2.0

    compiled = torch.compile(features, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), features(x))


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("kind", KINDS)
def test_batch_splits_and_backends_agree(backend, kind):
    """The same seed gives the same features however the batch is split, on every backend
    here (triton under TRITON_INTERPRET=1), and the same as the reference backend."""
    x = rand(7, 45)
    proj = fastattr.Projector(19, kind=kind, seed=12, backend=backend)
    whole = proj.project(x)
    parts = torch.cat([proj.project(x[:2]), proj.project(x[2:3]), proj.project(x[3:])])
    torch.testing.assert_close(parts, whole, rtol=1e-6, atol=1e-6)
    ref = fastattr.Projector(19, kind=kind, seed=12, backend="reference").project(x)
    torch.testing.assert_close(whole, ref, rtol=1e-5, atol=1e-5)


def test_import_does_not_import_triton():
    """DESIGN: triton is never imported at package import time. (The first call of any
    torch custom op imports torch._dynamo, which imports triton when it is installed;
    that is torch's doing, after import.)"""
    import subprocess
    import sys

    code = (
        "import sys, torch, fastattr\n"
        "fastattr.backends()\n"
        "fastattr.Projector(8, backend='cpu')\n"
        "assert 'triton' not in sys.modules, 'triton imported'\n"
        "assert 'torch._dynamo' not in sys.modules, 'torch._dynamo imported'\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_project_is_differentiable(backend):
    """The gradient of project is the transpose product R g, per layer, in the layer's dtype."""
    proj = fastattr.Projector(23, kind="gaussian", seed=9, backend=backend)
    a = rand(4, 3, 5).requires_grad_()
    b = rand(4, 7).to(torch.bfloat16).requires_grad_()
    g = rand(4, 23)
    proj.project({"a": a, "b": b}).backward(g)
    mat = proj.materialize(22)
    torch.testing.assert_close(a.grad.reshape(4, 15), g @ mat[:15].T, rtol=1e-5, atol=1e-5)
    assert b.grad.dtype == torch.bfloat16
    torch.testing.assert_close(b.grad.float(), (g @ mat[15:].T).bfloat16().float())
