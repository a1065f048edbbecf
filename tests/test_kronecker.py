"""KroneckerProjector against its explicit definition.

The definition: per parameter at global offset ``off``, ``R_in`` = rows ``[off, off + F)`` of
the stream-3 matrix with k_in columns, ``R_out`` = rows ``[off, off + d_out)`` of the stream-4
matrix with k_out columns (both from ``fastattr.rng.matrix_rows``); a weight's per-sample
gradient ``G_b [d_out, F]`` maps to ``vec(R_out^T G_b R_in)``, a 1-D one to ``R_out^T g``.
Per-sample gradients come from torch.func (one row per sample) or the reference psg ops
(rows grouped into samples, including an empty one).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import functional_call, grad, vmap

import fastattr
from fastattr import kronecker
from fastattr.psg import LayerIO, Segments
from fastattr.reference import psg as ref
from fastattr.rng import matrix_rows, philox_key

SEED, ENSEMBLE = 7, 2
KEY = philox_key(SEED, ENSEMBLE)


def assert_rel(actual: torch.Tensor, expected: torch.Tensor, tol: float):
    """max |actual - expected| <= tol * max |expected|."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.dtype == torch.float32
    assert torch.isfinite(actual).all()
    scale = expected.abs().max().clamp_min(1e-30)
    err = (actual.to(torch.float64) - expected.to(torch.float64)).abs().max()
    assert err <= tol * scale, f"max error {float(err):.3e} > {tol} x {float(scale):.3e}"


def explicit(grads: dict, offsets: dict, k_in: int, k_out: int, kind: str) -> torch.Tensor:
    """The definition in float64, from materialised factors: [B, sum of blocks]."""
    blocks = []
    for name, gb in grads.items():
        off, shape = offsets[name], gb.shape[1:]
        d_out = shape[0]
        r_out = matrix_rows(torch.arange(off, off + d_out), k_out, kind, KEY, 4).double()
        if len(shape) == 1:
            blocks.append(gb.double() @ r_out)
            continue
        features = math.prod(shape[1:])
        r_in = matrix_rows(torch.arange(off, off + features), k_in, kind, KEY, 3).double()
        gmat = gb.double().reshape(gb.shape[0], d_out, features)
        blocks.append((r_out.T @ gmat @ r_in).flatten(1))
    return torch.cat(blocks, 1)


# (module factory, input shape) -- odd sizes on purpose
CASES = {
    "linear_tokens": (lambda: torch.nn.Linear(7, 5), (6, 3, 7)),
    "linear_nobias": (lambda: torch.nn.Linear(13, 1, bias=False), (4, 1, 13)),
    "conv_stride2_pad": (lambda: torch.nn.Conv2d(3, 5, 3, stride=2, padding=1), (5, 3, 7, 6)),
    "conv_dil_groups": (
        lambda: torch.nn.Conv2d(6, 4, (3, 2), stride=(1, 2), padding=(2, 1), dilation=(2, 1),
                                groups=2),
        (3, 6, 5, 7),
    ),
    "conv_depthwise": (lambda: torch.nn.Conv2d(4, 8, 1, groups=4), (4, 4, 3, 3)),
}


def geometry(module) -> tuple:
    if isinstance(module, torch.nn.Conv2d):
        return (*module.kernel_size, *module.stride, *module.padding, *module.dilation,
                module.groups)
    return ()


def make_layer(case: str):
    """module, LayerIO (fp32) of one forward/backward of sum(out * weights), x, weights."""
    factory, shape = CASES[case]
    module = factory()
    x = torch.randn(shape)
    out = module(x)
    weights = torch.randn_like(out)
    g = torch.autograd.grad((out * weights).sum(), out)[0]
    return module, LayerIO(x, g, geometry(module)), x, weights


def torch_func_grads(module, x, weights) -> dict:
    """Per-row gradients of sum(module(x_r) * weights_r): dict name -> [N, *shape]."""
    params = {name: p.detach() for name, p in module.named_parameters()}

    def loss(p, xr, wr):
        return (functional_call(module, p, (xr[None],)) * wr[None]).sum()

    return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, weights)


def grouped_segments(n: int, per_sample: int = 2):
    """``per_sample`` rows per sample (shuffled), plus an empty sample and one of 1 row."""
    samples = (n - 1) // per_sample
    ids = torch.arange(samples).repeat_interleave(per_sample)
    ids = torch.cat([ids, torch.full((n - ids.numel(),), samples + 1)])  # leftovers: last
    ids = ids[torch.randperm(n)]
    return Segments.from_ids(ids, num_segments=samples + 2)  # sample `samples` is empty


def layer_offsets(module, w_offset: int, gap: int = 3) -> dict:
    offsets = {"weight": w_offset}
    if module.bias is not None:
        offsets["bias"] = w_offset + module.weight.numel() + gap
    return offsets


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_project_layer_equals_torch_func_definition(case, kind):
    """One row per sample: project_layer == definition on torch.func per-sample gradients."""
    module, layer, x, weights = make_layer(case)
    grads = torch_func_grads(module, x, weights)
    offsets = layer_offsets(module, w_offset=11)
    proj = fastattr.KroneckerProjector(5, 3, kind=kind, seed=SEED, ensemble_id=ENSEMBLE)
    got = proj.project_layer(layer, Segments.identity(x.shape[0]), offsets["weight"],
                             offsets.get("bias"))
    assert_rel(got, explicit(grads, offsets, 5, 3, kind), 1e-5)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("per_sample", [1, 3])
def test_project_layer_with_segments(case, per_sample):
    """Rows grouped into samples (shuffled, unequal sizes, one sample empty)."""
    module, layer, x, weights = make_layer(case)
    seg = grouped_segments(x.shape[0], per_sample)
    has_bias = module.bias is not None
    w, b = ref.per_sample_grads(layer.a, layer.g, seg.seg_ptr, seg.order, layer.conv, has_bias)
    grads = {"weight": w, **({"bias": b} if has_bias else {})}
    offsets = layer_offsets(module, w_offset=(1 << 33) + 5)  # 64-bit offsets
    proj = fastattr.KroneckerProjector(4, 6, seed=SEED, ensemble_id=ENSEMBLE)
    got = proj.project_layer(layer, seg, offsets["weight"], offsets.get("bias"))
    empty = (seg.seg_ptr[1:] == seg.seg_ptr[:-1]).nonzero().flatten()
    assert empty.numel() >= 1 and (got[empty] == 0).all()
    assert_rel(got, explicit(grads, offsets, 4, 6, "rademacher"), 1e-5)
    # project() on the same gradients gives the same numbers
    assert_rel(proj.project(grads, offsets=offsets), explicit(grads, offsets, 4, 6, "rademacher"),
               1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_project_layer_in_order_rows_non_contiguous(case):
    """K rows per sample stored in order (one chunk, read in place) from strided a and g:
    the same numbers as the definition."""
    module, layer, x, weights = make_layer(case)
    n = x.shape[0]
    keep = n - n % 2  # 2 rows per sample, in order
    # strided views of the same values: every other entry of a twice-as-large tensor
    a = torch.stack([layer.a[:keep], torch.randn_like(layer.a[:keep])], -1)[..., 0]
    g = torch.stack([layer.g[:keep], torch.randn_like(layer.g[:keep])], -1)[..., 0]
    assert not a.is_contiguous() and not g.is_contiguous()
    seg = Segments.from_ids(torch.arange(keep // 2).repeat_interleave(2))
    assert seg.rows_per_sample == 2
    has_bias = module.bias is not None
    w, b = ref.per_sample_grads(a, g, seg.seg_ptr, seg.order, layer.conv, has_bias)
    grads = {"weight": w, **({"bias": b} if has_bias else {})}
    offsets = layer_offsets(module, w_offset=17)
    proj = fastattr.KroneckerProjector(4, 3, seed=SEED, ensemble_id=ENSEMBLE)
    got = proj.project_layer(LayerIO(a, g, layer.conv), seg, offsets["weight"],
                             offsets.get("bias"))
    assert_rel(got, explicit(grads, offsets, 4, 3, "rademacher"), 1e-5)
    # a second call reuses the cached conv weights and gives the same numbers
    again = proj.project_layer(LayerIO(a, g, layer.conv), seg, offsets["weight"],
                               offsets.get("bias"))
    assert torch.equal(got, again)


@pytest.mark.parametrize("case", ["linear_tokens", "conv_stride2_pad"])
def test_project_layer_adds_into_out(case):
    """``out=``: the result is added to the given tensor (a column slice of a wider one),
    which is returned; the other columns are untouched."""
    module, layer, x, _ = make_layer(case)
    seg = Segments.from_ids(torch.tensor([0, 1, 1, 2, 0, 2, 2][: x.shape[0]]))
    proj = fastattr.KroneckerProjector(4, 3, seed=SEED, ensemble_id=ENSEMBLE)
    b_off = module.weight.numel() if module.bias is not None else None
    expected = proj.project_layer(layer, seg, 0, b_off)
    wide = torch.randn(seg.num_segments, expected.shape[1] + 5)
    before = wide.clone()
    got = proj.project_layer(layer, seg, 0, b_off, out=wide[:, 2:2 + expected.shape[1]])
    assert got.data_ptr() == wide[:, 2:].data_ptr()
    assert_rel(wide[:, 2:2 + expected.shape[1]], before[:, 2:2 + expected.shape[1]] + expected,
               1e-6)
    assert torch.equal(wide[:, :2], before[:, :2])
    assert torch.equal(wide[:, 2 + expected.shape[1]:], before[:, 2 + expected.shape[1]:])
    with pytest.raises(ValueError, match="out must be float32 of shape"):
        proj.project_layer(layer, seg, 0, b_off, out=torch.zeros(seg.num_segments, 3))
    with pytest.raises(ValueError, match="out must be float32"):
        proj.project_layer(layer, seg, 0, b_off, out=expected.double())
    with pytest.raises(TypeError, match="out must be a Tensor"):
        proj.project_layer(layer, seg, 0, b_off, out=expected.tolist())


def test_rows_per_sample():
    """K only for equal, in-order segments; None for shuffled, unequal or empty samples."""
    assert Segments.identity(5).rows_per_sample == 1
    assert Segments.from_ids(torch.arange(4).repeat_interleave(3)).rows_per_sample == 3
    assert Segments.from_ids(torch.tensor([1, 0, 0, 1])).rows_per_sample is None  # shuffled
    assert Segments.from_ids(torch.tensor([0, 0, 1, 1, 1])).rows_per_sample is None
    assert Segments.from_ids(torch.tensor([0, 0, 2, 2])).rows_per_sample is None  # 1 is empty
    assert Segments.from_ids(torch.tensor([0, 1]), num_segments=4).rows_per_sample is None


def test_chunks_with_unequal_samples(monkeypatch):
    """A tiny scratch budget forces many chunks; sizes 1..9 rows force chunk splits by length."""
    module = torch.nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(45, 3, 5, 5)
    g = torch.randn(45, 4, 5, 5)
    ids = torch.arange(9).repeat_interleave(torch.arange(1, 10))[torch.randperm(45)]
    seg = Segments.from_ids(ids)
    layer = LayerIO(x, g, geometry(module))
    proj = fastattr.KroneckerProjector(3, 5, seed=SEED, ensemble_id=ENSEMBLE)
    whole = proj.project_layer(layer, seg, 0, 200)
    monkeypatch.setattr(kronecker, "_CHUNK_ENTRIES", 4000)
    chunked = proj.project_layer(layer, seg, 0, 200)
    w, b = ref.per_sample_grads(x, g, seg.seg_ptr, seg.order, layer.conv, True)
    want = explicit({"weight": w, "bias": b}, {"weight": 0, "bias": 200}, 3, 5, "rademacher")
    assert_rel(whole, want, 1e-5)
    assert_rel(chunked, want, 1e-5)


@pytest.mark.parametrize("case", ["linear_tokens", "conv_dil_groups"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs(case, dtype):
    """bf16/fp16 a and g are accumulated in fp32: the result is the fp32 one within 1e-2."""
    module, layer, x, weights = make_layer(case)
    seg = grouped_segments(x.shape[0], 2)
    proj = fastattr.KroneckerProjector(6, 5, seed=SEED, ensemble_id=ENSEMBLE)
    half = LayerIO(layer.a.to(dtype), layer.g.to(dtype), layer.conv)
    got = proj.project_layer(half, seg, 3, 500)
    w, b = ref.per_sample_grads(layer.a, layer.g, seg.seg_ptr, seg.order, layer.conv, True)
    assert_rel(got, explicit({"weight": w, "bias": b}, {"weight": 3, "bias": 500}, 6, 5,
                             "rademacher"), 1e-2)
    # project() takes half per-sample gradients too
    got = proj.project({"weight": w.to(dtype), "bias": b.to(dtype)}, offsets=[3, 500])
    assert_rel(got, explicit({"weight": w, "bias": b}, {"weight": 3, "bias": 500}, 6, 5,
                             "rademacher"), 1e-2)


def test_project_model_dict_and_sizes():
    """A model's per-sample gradient dict: default offsets are cumulative numels; the result
    is the concatenation of the layers' project_layer results; block sizes add up."""
    lin, conv = torch.nn.Linear(7, 5), torch.nn.Conv2d(2, 3, 3)
    proj = fastattr.KroneckerProjector(4, 3, seed=SEED, ensemble_id=ENSEMBLE)
    shapes = {"lin.weight": (5, 7), "lin.bias": (5,), "conv.weight": (3, 2, 3, 3),
              "conv.bias": (3,)}
    assert proj.block_size((5, 7)) == 12 and proj.block_size(torch.Size([3])) == 3
    assert proj.total_k(shapes) == 12 + 3 + 12 + 3
    assert proj.total_k([lin.weight, lin.bias]) == 15

    x_lin, x_conv = torch.randn(4, 1, 7), torch.randn(4, 2, 5, 5)
    w_lin, w_conv = torch.randn(4, 1, 5), torch.randn(4, 3, 3, 3)
    g_lin = torch_func_grads(lin, x_lin[:, 0], w_lin[:, 0])
    g_conv = torch_func_grads(conv, x_conv, w_conv)
    grads = {"lin.weight": g_lin["weight"], "lin.bias": g_lin["bias"],
             "conv.weight": g_conv["weight"], "conv.bias": g_conv["bias"]}
    offsets, total = {}, 0
    for name, shape in shapes.items():
        offsets[name] = total
        total += math.prod(shape)
    got = proj.project(grads)
    assert got.shape == (4, proj.total_k(shapes))
    assert_rel(got, explicit(grads, offsets, 4, 3, "rademacher"), 1e-5)
    # layer by layer from captured inputs / output gradients
    seg = Segments.identity(4)
    out_lin = lin(x_lin)
    out_conv = conv(x_conv)
    ga = torch.autograd.grad((out_lin * w_lin).sum(), out_lin)[0]
    gc = torch.autograd.grad((out_conv * w_conv).sum(), out_conv)[0]
    by_layer = torch.cat([
        proj.project_layer(LayerIO(x_lin, ga), seg, offsets["lin.weight"], offsets["lin.bias"]),
        proj.project_layer(LayerIO(x_conv, gc, geometry(conv)), seg, offsets["conv.weight"],
                           offsets["conv.bias"]),
    ], 1)
    assert_rel(by_layer, got, 1e-5)
    # a list gives the same; a single [B, d_out, F] tensor is one weight at offset 0
    assert torch.equal(proj.project(list(grads.values())), got)
    single = proj.project(grads["conv.weight"].flatten(2))
    assert_rel(single, explicit({"w": grads["conv.weight"]}, {"w": 0}, 4, 3, "rademacher"), 1e-5)
    assert proj.project(grads["conv.weight"].flatten(2)[:0]).shape == (0, 12)
    # a 0-D parameter (a learnt scalar) counts as 1-D of size 1
    scalar = torch.randn(4)
    assert proj.block_size(()) == 3
    assert_rel(proj.project({"s": scalar}, offsets={"s": 9}),
               explicit({"s": scalar[:, None]}, {"s": 9}, 4, 3, "rademacher"), 1e-6)


def test_factors_follow_the_rng_spec_and_are_independent_across_layers():
    """Factors are matrix_rows of streams 3 (input) and 4 (output) at the parameter's offset;
    different offsets (layers) give unrelated factors, as do the two streams."""
    proj = fastattr.KroneckerProjector(130, 129, seed=SEED, ensemble_id=ENSEMBLE)
    r_in, r_out = proj.factors((64, 3, 3, 3), offset=1000)
    assert torch.equal(r_in, matrix_rows(torch.arange(1000, 1027), 130, "rademacher", KEY, 3))
    assert torch.equal(r_out, matrix_rows(torch.arange(1000, 1064), 129, "rademacher", KEY, 4))
    assert proj.factors((64,), offset=5)[0] is None

    def agreement(u, v):  # fraction of equal signs; ~0.5 for independent Rademacher entries
        return float((u.sign() == v.sign()).double().mean())

    other_in, other_out = proj.factors((64, 3, 3, 3), offset=1000 + 64 * 27)  # the next layer
    dense = fastattr.Projector(130, seed=SEED, ensemble_id=ENSEMBLE).materialize(range(1000, 1027))
    for u, v in ((r_in, other_in), (r_out, other_out), (r_in, dense),
                 (r_in[:, :129], r_out[:27])):
        assert 0.4 < agreement(u, v) < 0.6
    # the projections of one gradient placed at two offsets are unrelated
    gmat = torch.randn(8, 64, 27)
    f1 = proj.project(gmat, offsets=0)
    f2 = proj.project(gmat, offsets=64 * 27)
    corr = torch.corrcoef(torch.stack([f1.flatten(), f2.flatten()]))[0, 1]
    assert abs(float(corr)) < 0.05
    # another seed or ensemble member: other factors
    for other in (fastattr.KroneckerProjector(130, 129, seed=SEED + 1, ensemble_id=ENSEMBLE),
                  fastattr.KroneckerProjector(130, 129, seed=SEED, ensemble_id=ENSEMBLE + 1)):
        assert 0.4 < agreement(r_in, other.factors((64, 3, 3, 3), 1000)[0]) < 0.6


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_backends_generate_the_same_factors(backend):
    if not fastattr.backends()[backend].available:
        pytest.skip(f"{backend} not available")
    proj = fastattr.KroneckerProjector(33, 7, seed=SEED, ensemble_id=ENSEMBLE, backend=backend)
    assert proj.resolve_backend("cpu") == backend
    r_in, r_out = proj.factors((5, 40), offset=3)
    assert torch.equal(r_in, matrix_rows(torch.arange(3, 43), 33, "rademacher", KEY, 3))
    assert torch.equal(r_out, matrix_rows(torch.arange(3, 8), 7, "rademacher", KEY, 4))


def test_repr_and_export():
    proj = fastattr.KroneckerProjector(8, 4, kind="gaussian", seed=1, ensemble_id=2)
    assert repr(proj) == ("KroneckerProjector(k_in=8, k_out=4, kind='gaussian', seed=1, "
                          "ensemble_id=2, backend='auto')")
    assert "KroneckerProjector" in fastattr.__all__


def test_bad_inputs_raise_clear_errors():
    K = fastattr.KroneckerProjector
    for kwargs, exc, word in [
        (dict(k_in=0, k_out=4), ValueError, "k_in"),
        (dict(k_in=4, k_out=0), ValueError, "k_out"),
        (dict(k_in=4.0, k_out=4), TypeError, "k_in"),
        (dict(k_in=4, k_out=True), TypeError, "k_out"),
        (dict(k_in=4, k_out=4, kind="sparse"), ValueError, "kind"),
        (dict(k_in=4, k_out=4, seed=-1), ValueError, "seed"),
        (dict(k_in=4, k_out=4, backend="gpu"), ValueError, "backend"),
    ]:
        with pytest.raises(exc, match=word):
            K(**kwargs)

    proj = K(4, 3)
    a, g = torch.randn(5, 2, 7), torch.randn(5, 2, 3)
    seg = Segments.identity(5)
    with pytest.raises(TypeError, match="layer"):
        proj.project_layer((a, g), seg, 0)
    with pytest.raises(TypeError, match="segments"):
        proj.project_layer(LayerIO(a, g), torch.arange(5), 0)
    with pytest.raises(ValueError, match="rows"):
        proj.project_layer(LayerIO(a, g), Segments.identity(4), 0)
    with pytest.raises(TypeError, match="float32"):
        proj.project_layer(LayerIO(a.to(torch.int32), g), seg, 0)
    with pytest.raises(ValueError, match="w_offset"):
        proj.project_layer(LayerIO(a, g), seg, -1)
    with pytest.raises(TypeError, match="b_offset"):
        proj.project_layer(LayerIO(a, g), seg, 0, b_offset=2.0)
    with pytest.raises(ValueError, match="conv"):
        proj.project_layer(LayerIO(torch.randn(2, 3, 5, 5), torch.randn(2, 4, 3, 3), (3, 3)),
                           Segments.identity(2), 0)

    grads = {"w": torch.randn(5, 3, 7), "b": torch.randn(5, 3)}
    with pytest.raises(ValueError, match="empty"):
        proj.project({})
    with pytest.raises(TypeError, match="x"):
        proj.project("weights")
    with pytest.raises(ValueError, match=r"x\['b'\]"):
        proj.project({"w": grads["w"], "b": torch.randn(4, 3)})
    with pytest.raises(TypeError, match=r"x\['w'\]"):
        proj.project({"w": grads["w"].to(torch.int64)})
    with pytest.raises(ValueError, match="offsets has 1"):
        proj.project(grads, offsets=[0])
    with pytest.raises(ValueError, match="offsets for"):
        proj.project(grads, offsets=[0, -2])
    with pytest.raises(ValueError, match="keys"):
        proj.project(grads, offsets={"w": 0, "bias": 21})
    with pytest.raises(ValueError, match="shape"):
        proj.block_size((3, 0))
    with pytest.raises(TypeError, match="shapes"):
        proj.total_k(7)


@pytest.mark.cuda
def test_cuda_matches_cpu():
    module, layer, x, weights = make_layer("conv_dil_groups")
    seg = grouped_segments(x.shape[0], 2)
    proj = fastattr.KroneckerProjector(5, 6, seed=SEED, ensemble_id=ENSEMBLE)
    want = proj.project_layer(layer, seg, 9, 400)
    # fp32 convolutions on GPUs may use TF32 (torch's default for cuDNN): compare loosely
    got = proj.project_layer(LayerIO(layer.a.cuda(), layer.g.cuda(), layer.conv), seg.to("cuda"),
                             9, 400)
    assert got.device.type == "cuda"
    assert_rel(got.cpu(), want, 5e-3)
