"""The fused per-sample-gradient ops against torch.func and against the reference backend.

- The reference (which materialises G_b) equals torch.func per-sample gradients followed by
  the dense projection / explicit inner products.
- Every compiled backend available here equals the reference on odd shapes, every input
  dtype, conv geometries (stride 2, padding, dilation, groups), segments with several rows
  and with none, 64-bit offsets, both matrix kinds; outputs are poisoned before the call.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from torch.func import functional_call, grad, vmap

import fastattr
from fastattr.backends import backends
from fastattr.psg import LayerIO, Segments, psg_matmul, psg_project
from fastattr.reference import psg as ref

COMPILED = [name for name in ("cpu", "triton") if backends()[name].available]
LAUNCHERS = {"cpu": "fastattr.kernels.cpu", "triton": "fastattr.kernels.triton.psg"}
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def assert_rel(actual: torch.Tensor, expected: torch.Tensor, tol: float):
    """max |actual - expected| <= tol * max |expected| (the scale of the result)."""
    assert actual.shape == expected.shape
    assert torch.isfinite(actual).all(), "non-finite entries (an unwritten poisoned output?)"
    scale = expected.abs().max().clamp_min(1e-30)
    err = (actual.to(torch.float64) - expected.to(torch.float64)).abs().max()
    assert err <= tol * scale, f"max error {float(err):.3e} > {tol} x {float(scale):.3e}"


# (name, module factory, input shape) -- odd sizes on purpose
LINEAR_CASES = {
    "linear_tokens": (lambda: torch.nn.Linear(7, 5), (6, 3, 7)),
    "linear_nobias": (lambda: torch.nn.Linear(13, 1, bias=False), (4, 1, 13)),
}
CONV_CASES = {
    "conv_stride2_pad": (lambda: torch.nn.Conv2d(3, 5, 3, stride=2, padding=1), (5, 3, 7, 6)),
    "conv_dil_groups": (
        lambda: torch.nn.Conv2d(6, 4, (3, 2), stride=(1, 2), padding=(2, 1), dilation=(2, 1),
                                groups=2, bias=False),
        (3, 6, 5, 7),
    ),
    "conv_1x1_depthwise": (lambda: torch.nn.Conv2d(4, 8, 1, groups=4), (4, 4, 3, 3)),
}


def geometry(module) -> tuple:
    if isinstance(module, torch.nn.Conv2d):
        return (*module.kernel_size, *module.stride, *module.padding, *module.dilation,
                module.groups)
    return ()


def make_layer(case: str, dtype=torch.float32):
    """A module, a LayerIO of one forward/backward of a per-row loss, and the inputs."""
    factory, shape = {**LINEAR_CASES, **CONV_CASES}[case]
    module = factory()
    x = torch.randn(shape)
    out = module(x)
    # a per-row loss with a non-trivial output gradient
    weights = torch.randn_like(out)
    g = torch.autograd.grad((out * weights).sum(), out)[0]
    layer = LayerIO(x.to(dtype), g.to(dtype), geometry(module))
    return module, layer, x, weights


def torch_func_grads(module, x, weights):
    """Per-row gradients of sum(module(x_r) * weights_r) by torch.func: dict name -> [N, ...]."""
    params = {name: p.detach() for name, p in module.named_parameters()}

    def loss(p, xr, wr):
        return (functional_call(module, p, (xr[None],)) * wr[None]).sum()

    return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, weights)


def segments_for(n: int, mode: str):
    """(Segments, ids) for n rows: one row per sample, or rows shuffled into 3 samples + one
    sample with no rows (its gradient is zero)."""
    if mode == "one_row_each":
        return Segments.identity(n), torch.arange(n)
    ids = torch.randint(0, 3, (n,))
    ids[:3] = torch.tensor([0, 1, 2])[: min(3, n)]
    return Segments.from_ids(ids, num_segments=4), ids


@pytest.mark.parametrize("case", [*LINEAR_CASES, *CONV_CASES])
@pytest.mark.parametrize("mode", ["one_row_each", "grouped"])
def test_reference_equals_torch_func(case, mode):
    module, layer, x, weights = make_layer(case)
    seg, ids = segments_for(x.shape[0], mode)
    per_row = torch_func_grads(module, x, weights)
    batch = seg.num_segments
    names = [name for name, _ in module.named_parameters()]
    expected = {n: torch.zeros(batch, *per_row[n].shape[1:]).index_add_(0, ids, per_row[n])
                for n in names}
    has_bias = "bias" in names
    proj = fastattr.Projector(37, seed=5, backend="reference")
    offsets = {"weight": 11, "bias": 11 + module.weight.numel() + 3}
    got = psg_project(layer, seg, proj, offsets["weight"], offsets["bias"] if has_bias else None)
    want = fastattr.ops.project([expected[n].flatten(1) for n in names],
                                [offsets[n] for n in names], 37, "rademacher", *proj.key, 0,
                                "reference")
    assert_rel(got, want, 1e-5)


def test_reference_linear_tokens():
    """A linear layer applied to [N, T, d]: G_b sums over the T tokens."""
    module, layer, x, weights = make_layer("linear_tokens")
    per_row = torch_func_grads(module, x, weights)
    seg = Segments.identity(x.shape[0])
    w, b = ref.per_sample_grads(layer.a, layer.g, seg.seg_ptr, seg.order, (), True)
    assert_rel(w, per_row["weight"], 1e-6)
    assert_rel(b, per_row["bias"], 1e-6)


def _cases():
    # (case, dtype, k, kind): every case in fp32, the dtypes and kinds spread over them
    out = []
    for i, case in enumerate([*LINEAR_CASES, *CONV_CASES]):
        out.append((case, torch.float32, (1, 3, 130)[i % 3], ("rademacher", "gaussian")[i % 2]))
    out.append(("linear_tokens", torch.bfloat16, 33, "rademacher"))
    out.append(("conv_stride2_pad", torch.float16, 5, "gaussian"))
    out.append(("conv_dil_groups", torch.bfloat16, 129, "rademacher"))
    return out


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("case,dtype,k,kind", _cases())
@pytest.mark.parametrize("mode", ["one_row_each", "grouped"])
def test_psg_project_matches_reference(backend, case, dtype, k, kind, mode, poison_outputs):
    _, layer, x, _ = make_layer(case, dtype)
    seg, _ = segments_for(x.shape[0], mode)
    has_bias = case not in ("linear_nobias", "conv_dil_groups")
    # weight beyond 2**32 exercises the 64-bit counter (hi word of the row index)
    w_offset, b_offset = (1 << 33) + 5, 17
    ref_proj = fastattr.Projector(k, kind=kind, seed=3, ensemble_id=1, backend="reference")
    want = psg_project(layer, seg, ref_proj, w_offset, b_offset if has_bias else None)
    poison_outputs(importlib.import_module(LAUNCHERS[backend]))
    proj = fastattr.Projector(k, kind=kind, seed=3, ensemble_id=1, backend=backend)
    got = psg_project(layer, seg, proj, w_offset, b_offset if has_bias else None)
    assert got.dtype == torch.float32 and got.shape == (seg.num_segments, k)
    assert_rel(got, want, TOL[dtype])
    if mode == "grouped":
        assert (got[3] == 0).all(), "a sample with no rows must project to exactly zero"


@pytest.mark.parametrize("backend", ["reference", *COMPILED])
@pytest.mark.parametrize("case", [*LINEAR_CASES, *CONV_CASES])
@pytest.mark.parametrize("q_dtype", [torch.float32, torch.bfloat16])
def test_psg_matmul_equals_inner_products(backend, case, q_dtype, poison_outputs):
    module, layer, x, weights = make_layer(case)
    seg, ids = segments_for(x.shape[0], "grouped")
    q = 6
    q_weight = torch.randn(q, *module.weight.shape).to(q_dtype)
    q_bias = None if module.bias is None else torch.randn(q, module.weight.shape[0]).to(q_dtype)
    if backend != "reference":
        poison_outputs(importlib.import_module(LAUNCHERS[backend]))
    got = psg_matmul(layer, seg, q_weight, q_bias, backend=backend)
    # explicit inner products of torch.func per-sample gradients
    per_row = torch_func_grads(module, x, weights)
    w = torch.zeros(seg.num_segments, *module.weight.shape).index_add_(0, ids, per_row["weight"])
    want = w.flatten(1).double() @ q_weight.double().flatten(1).T
    if q_bias is not None:
        b = torch.zeros(seg.num_segments, q_bias.shape[1]).index_add_(0, ids, per_row["bias"])
        want += b.double() @ q_bias.double().T
    assert got.shape == (seg.num_segments, q) and got.dtype == torch.float32
    assert_rel(got, want.float(), 1e-5)


def test_psg_project_sums_over_layers_like_projector():
    """Two layers' psg_project at their offsets sum to Projector.project of the flat grads."""
    m1, l1, x1, w1 = make_layer("linear_tokens")
    m2, l2, x2, w2 = make_layer("conv_1x1_depthwise")
    n = 4
    l1 = LayerIO(l1.a[:n], l1.g[:n])
    seg = Segments.identity(n)
    g1 = torch_func_grads(m1, x1[:n], w1[:n])
    g2 = torch_func_grads(m2, x2, w2)
    flat = torch.cat([g1["weight"].flatten(1), g1["bias"], g2["weight"].flatten(1),
                      g2["bias"]], dim=1)
    backend = COMPILED[0] if COMPILED else "reference"
    proj = fastattr.Projector(64, seed=9, backend=backend)
    o1 = m1.weight.numel()
    o2 = o1 + m1.bias.numel()
    o3 = o2 + m2.weight.numel()
    got = psg_project(l1, seg, proj, 0, o1) + psg_project(l2, seg, proj, o2, o3)
    assert_rel(got, proj.project(flat), 1e-5)


def test_bad_inputs_raise_clear_errors():
    _, layer, x, _ = make_layer("linear_tokens")
    proj = fastattr.Projector(8, backend="reference")
    seg = Segments.identity(x.shape[0])
    with pytest.raises(ValueError, match="rows"):
        psg_project(LayerIO(layer.a[:-1], layer.g), Segments.identity(x.shape[0] - 1), proj, 0)
    with pytest.raises(ValueError, match="segments"):
        psg_project(layer, Segments.identity(x.shape[0] + 1), proj, 0)
    with pytest.raises(ValueError, match="tokens"):
        psg_project(LayerIO(layer.a, layer.g[:, :1]), seg, proj, 0)
    with pytest.raises(TypeError, match="float32"):
        psg_project(LayerIO(layer.a.to(torch.int32), layer.g), seg, proj, 0)
    with pytest.raises(ValueError, match="w_offset"):
        psg_project(layer, seg, proj, -1)
    _, conv, xc, _ = make_layer("conv_stride2_pad")
    bad = LayerIO(conv.a, conv.g, (3, 3, 1, 1, 1, 1, 1, 1, 1))  # stride 1 does not fit g
    with pytest.raises(ValueError, match="output positions"):
        psg_project(bad, Segments.identity(xc.shape[0]), proj, 0)
    with pytest.raises(ValueError, match="q_weight"):
        psg_matmul(conv, Segments.identity(xc.shape[0]), torch.randn(2, 5, 3, 3), backend="reference")
    with pytest.raises(ValueError, match="segment id"):
        Segments.from_ids(torch.tensor([0, 3]), num_segments=2)
    with pytest.raises(TypeError, match="segment ids"):
        Segments.from_ids(torch.tensor([0.0, 1.0]))
