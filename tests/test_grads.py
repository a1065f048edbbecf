"""fastattr.projected_grads / per_sample_grads against torch.func, and Projector.project offsets.

The oracle everywhere: per-row gradients by ``torch.func`` (``functional_call`` +
``vmap(grad)``), segment-summed, then ``Projector.project`` (or ``KroneckerProjector.project``)
of the selected parameters in ``named_parameters`` order. Models: an MLP on 3-D inputs with a
LayerNorm and a module called twice, a conv net (stride 2, padding, dilation, groups, bias /
no bias, 'same', a reflect-padded conv that falls back, GroupNorm), a norms net (GroupNorm on
2-D and 1-D spatial inputs, LayerNorm over the last 1 and 2 dims of 3-D inputs), and small
diffusers UNets (self-attention; cross-attention with encoder_hidden_states in the batch),
whose norms are captured so that nothing takes the torch.func pass.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import fastattr
from fastattr.psg import Segments


def _psg_backends() -> list:
    """Backends whose fused psg op exists here (the cpu one is being written concurrently)."""
    out = ["reference"]
    if fastattr.backends()["cpu"].available:
        if hasattr(importlib.import_module("fastattr.kernels.cpu"), "psg_project"):
            out.append("cpu")
    return out


BACKENDS = _psg_backends()


def _kronecker():
    try:
        return importlib.import_module("fastattr.kronecker").KroneckerProjector
    except (ImportError, AttributeError):
        return None


KroneckerProjector = _kronecker()
needs_kron = pytest.mark.skipif(KroneckerProjector is None, reason="fastattr.kronecker missing")


def assert_rel(actual, expected, tol=1e-5):
    """max |actual - expected| <= tol * max |expected|."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = expected.abs().max().clamp_min(1e-30)
    err = (actual.double() - expected.double()).abs().max()
    assert err <= tol * scale, f"max error {float(err):.3e} > {tol} x {float(scale):.3e}"


def assert_grads_close(got: dict, expected: dict, tol=1e-5):
    """Per-parameter, relative to the largest gradient of all (some are ~0 analytically:
    an attention key bias cancels in the softmax)."""
    assert list(got) == list(expected)
    scale = max(float(v.abs().max()) for v in expected.values())
    for name in expected:
        assert got[name].shape == expected[name].shape, name
        err = float((got[name].double() - expected[name].double()).abs().max())
        assert err <= tol * scale, f"{name}: max error {err:.3e} > {tol} x {scale:.3e}"


def oracle_grads(model, output_fn, batch, names=None, ids=None) -> dict:
    """torch.func per-sample gradients ``{name: [B, *shape]}`` of the per-row outputs."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    names = list(params) if names is None else [n for n in params if n in set(names)]
    n_rows = batch[0].shape[0]

    def row(p, *leaves):
        return output_fn(_Swapped(model, {**params, **p}), tuple(x[None] for x in leaves)).sum()

    per_row = vmap(grad(row), in_dims=(None, *[0] * len(batch)))(
        {n: params[n] for n in names}, *batch)
    ids = torch.arange(n_rows) if ids is None else torch.as_tensor(ids)
    num = int(ids.max()) + 1
    return {n: torch.zeros(num, *params[n].shape).index_add_(0, ids, per_row[n]) for n in names}


class _Swapped:
    """Calls ``model`` with ``params`` swapped in (what output_fn sees in the oracle)."""

    def __init__(self, model, params):
        self.model, self.params = model, params

    def __call__(self, *args, **kwargs):
        return functional_call(self.model, self.params, args, kwargs)


# ------------------------------------------------------------------------------------ models


class MLP(nn.Module):
    """3-D inputs [N, T, d], a LayerNorm, a Linear called twice, a bias-free one."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(7, 9)
        self.norm = nn.LayerNorm(9)
        self.fc2 = nn.Linear(9, 5, bias=False)
        self.shared = nn.Linear(5, 5)
        self.emb = nn.Parameter(torch.randn(5) * 0.1)  # a bare parameter: torch.func

    def forward(self, x):
        h = self.fc2(torch.tanh(self.norm(self.fc1(x))))
        return self.shared(torch.tanh(self.shared(h) + self.emb))


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(6, 4, (3, 2), padding=(2, 1), dilation=(2, 1), groups=2, bias=False)
        self.norm = nn.GroupNorm(2, 4)
        self.c3 = nn.Conv2d(4, 4, 3, padding="same", groups=4)
        self.c4 = nn.Conv2d(4, 5, 3, padding=1, padding_mode="reflect")  # falls back
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.c1(x))
        h = torch.tanh(self.norm(self.c2(h)))
        h = torch.tanh(self.c4(self.c3(h)))
        return self.head(h.mean(dim=(2, 3)))


class Norms(nn.Module):
    """GroupNorm on [N, C, H, W] and [N, C, L]; LayerNorm over the last 1 and 2 dims of
    [N, T, d]."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.gn2d = nn.GroupNorm(2, 4)
        self.gn1d = nn.GroupNorm(4, 4, eps=1e-3)
        self.fc = nn.Linear(5, 6)
        self.ln1 = nn.LayerNorm(6)
        self.ln2 = nn.LayerNorm((4, 6), eps=1e-4)

    def forward(self, x):
        h = torch.tanh(self.gn2d(self.conv(x)))              # [N, 4, 6, 5]
        h = torch.tanh(self.fc(self.gn1d(h.mean(2))))        # [N, 4, 6]
        return self.ln2(torch.tanh(self.ln1(h)) * h)


def row_sq(model, batch):
    x, y = batch
    return (model(x) - y).pow(2).flatten(1).sum(1)


CASES = ["mlp", "conv", "norms"]


def make_case(name):
    torch.manual_seed(0)
    if name == "mlp":
        model, x = MLP(), torch.randn(6, 4, 7)
    elif name == "norms":
        model, x = Norms(), torch.randn(6, 3, 6, 5)
        with torch.no_grad():  # affines away from their (1, 0) initialisation
            for norm in (model.gn2d, model.gn1d, model.ln1, model.ln2):
                norm.weight.add_(torch.randn_like(norm.weight) * 0.3)
                norm.bias.add_(torch.randn_like(norm.bias) * 0.3)
    else:
        model, x = ConvNet(), torch.randn(6, 3, 9, 7)
    with torch.no_grad():
        y = torch.randn_like(model(x))
    return model, (x, y)


# ------------------------------------------------------------------------- small models


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_projected_grads_equal_torch_func_then_project(case, backend):
    model, batch = make_case(case)
    proj = fastattr.Projector(97, seed=3, backend=backend)
    expected = proj.project(oracle_grads(model, row_sq, batch))
    got = fastattr.projected_grads(model, row_sq, batch, proj)
    assert got.dtype == torch.float32
    assert_rel(got, expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_segments_sum_rows(case, backend):
    """K rows per sample (and rows in any order) give the sums of the per-row gradients."""
    model, batch = make_case(case)
    ids = torch.tensor([2, 0, 0, 1, 2, 2])
    proj = fastattr.Projector(64, kind="gaussian", backend=backend)
    expected = proj.project(oracle_grads(model, row_sq, batch, ids=ids))
    got = fastattr.projected_grads(model, row_sq, batch, proj, segments=ids)
    assert got.shape == (3, 64)
    assert_rel(got, expected)
    per_row = fastattr.per_sample_grads(model, row_sq, batch)
    summed = {n: torch.zeros(3, *g.shape[1:]).index_add_(0, ids, g) for n, g in per_row.items()}
    assert_grads_close(fastattr.per_sample_grads(model, row_sq, batch, segments=ids), summed)
    # a Segments object works as well
    got2 = fastattr.projected_grads(model, row_sq, batch, proj, segments=Segments.from_ids(ids))
    assert_rel(got2, expected)


@pytest.mark.parametrize("case", CASES)
def test_per_sample_grads_equal_torch_func(case):
    model, batch = make_case(case)
    assert_grads_close(fastattr.per_sample_grads(model, row_sq, batch),
                       oracle_grads(model, row_sq, batch))


PARAM_SELECTIONS = {
    "bias_only": lambda n, p: n in ("fc1.bias", "shared.bias", "c1.bias", "head.bias",
                                    "norm.bias", "gn2d.bias", "ln1.bias", "ln2.bias"),
    "weight_only": lambda n, p: n.endswith("weight"),
    "mixed_list": ["fc1.bias", "norm.weight", "shared.weight", "emb", "c2.weight", "c4.bias",
                   "norm.bias", "head.bias", "gn1d.weight", "gn2d.bias", "ln2.weight",
                   "ln1.bias", "fc.bias"],
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("selection", list(PARAM_SELECTIONS))
@pytest.mark.parametrize("case", CASES)
def test_param_selection_uses_selected_offsets(case, selection, backend):
    """Only the selected parameters, each at the offset of its place among them."""
    model, batch = make_case(case)
    params = PARAM_SELECTIONS[selection]
    if isinstance(params, list):
        names = [n for n, _ in model.named_parameters() if n in params]
        params = names
    else:
        names = [n for n, p in model.named_parameters() if params(n, p)]
    assert names
    proj = fastattr.Projector(50, seed=1, backend=backend)
    expected = proj.project(oracle_grads(model, row_sq, batch, names=names))
    got = fastattr.projected_grads(model, row_sq, batch, proj, params=params)
    assert_rel(got, expected)
    grads = fastattr.per_sample_grads(model, row_sq, batch, params=params)
    assert list(grads) == names
    assert_grads_close(grads, oracle_grads(model, row_sq, batch, names=names))


def test_frozen_parameters_default_and_by_name():
    model, batch = make_case("mlp")
    model.fc1.requires_grad_(False)
    proj = fastattr.Projector(40, backend="reference")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert_rel(fastattr.projected_grads(model, row_sq, batch, proj),
               proj.project(oracle_grads(model, row_sq, batch, names=trainable)))
    got = fastattr.projected_grads(model, row_sq, batch, proj, params=["fc1.weight"])
    assert_rel(got, proj.project(oracle_grads(model, row_sq, batch, names=["fc1.weight"])))
    assert not model.fc1.weight.requires_grad  # restored


def test_norm_coverage():
    cov = fastattr.coverage(make_case("norms")[0])
    assert [cov[f"{m}.weight"] for m in ("gn2d", "gn1d", "ln1", "ln2")] == [
        "groupnorm", "groupnorm", "layernorm", "layernorm"]
    assert "torch.func" not in cov.summary()


def test_norm_used_without_calling_it_falls_back_to_torch_func():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(7, 4)
            self.gn = nn.GroupNorm(2, 4)
            self.ln = nn.LayerNorm(4)

        def forward(self, x):
            h = nn.functional.group_norm(self.fc(x).transpose(1, 2), 2, self.gn.weight * 1.5,
                                         self.gn.bias)
            return self.ln(h.transpose(1, 2))

    torch.manual_seed(0)
    model, x = Functional(), torch.randn(6, 3, 7)
    batch = (x, torch.randn(6, 3, 4))
    assert fastattr.coverage(model)["gn.weight"] == "groupnorm"
    proj = fastattr.Projector(30, backend="reference")
    expected = oracle_grads(model, row_sq, batch)
    assert_rel(fastattr.projected_grads(model, row_sq, batch, proj), proj.project(expected))
    assert_grads_close(fastattr.per_sample_grads(model, row_sq, batch), expected)


def test_only_torch_func_parameters():
    model, batch = make_case("conv")
    names = ["c4.weight", "c4.bias"]
    assert all(fastattr.coverage(model, names)[n] == "torch.func" for n in names)
    proj = fastattr.Projector(33, backend="reference")
    assert_rel(fastattr.projected_grads(model, row_sq, batch, proj, params=names),
               proj.project(oracle_grads(model, row_sq, batch, names=names)))


def test_non_row_tensors_in_batch_are_broadcast():
    """A batch leaf whose leading dim is not N is given whole to every row."""
    model, (x, y) = make_case("conv")
    scale = torch.rand(4) + 0.5

    def fn(m, b):
        x, y, s = b
        return ((m(x) - y) * s[:3]).pow(2).sum(1)

    proj = fastattr.Projector(32, backend="reference")
    expected = proj.project(oracle_grads(model, lambda m, b: fn(m, (*b, scale)), (x, y)))
    assert_rel(fastattr.projected_grads(model, fn, (x, y, scale), proj), expected)


# -------------------------------------------------------------------------------- Kronecker


@needs_kron
@pytest.mark.parametrize("selection", [None, "weight_only", "bias_only", "mixed_list"])
@pytest.mark.parametrize("case", CASES)
def test_kronecker_projector_blocks(case, selection):
    model, batch = make_case(case)
    params = PARAM_SELECTIONS.get(selection)
    if isinstance(params, list):
        params = [n for n, _ in model.named_parameters() if n in params]
    names = fastattr.capture.select_params(model, params)
    kp = KroneckerProjector(3, 4, seed=2)
    ids = torch.tensor([0, 0, 1, 1, 1, 2])
    expected = kp.project(oracle_grads(model, row_sq, batch, names=list(names), ids=ids))
    got = fastattr.projected_grads(model, row_sq, batch, kp, params=params, segments=ids)
    assert got.shape == (3, sum(kp.block_size(p.shape) for p in names.values()))
    assert_rel(got, expected)


class BiasFirstLinear(nn.Linear):
    """A Linear whose bias is registered (and listed by named_parameters) before its weight."""

    def __init__(self, d_in, d_out):
        nn.Module.__init__(self)
        self.in_features, self.out_features = d_in, d_out
        self.bias = nn.Parameter(torch.randn(d_out) * 0.1)
        self.weight = nn.Parameter(torch.randn(d_out, d_in) * 0.3)


@needs_kron
def test_kronecker_bias_listed_before_weight():
    """Blocks follow named_parameters order even when a layer's bias block precedes its
    weight block (they cannot be written as one slice)."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), BiasFirstLinear(4, 3))
    assert [n for n, _ in model.named_parameters()][2:] == ["2.bias", "2.weight"]
    assert fastattr.coverage(model)["2.weight"] == "linear"
    x = torch.randn(6, 5)
    batch = (x, torch.randn(6, 3))
    kp = KroneckerProjector(3, 2, seed=4)
    ids = torch.tensor([1, 0, 0, 2, 1, 1])
    expected = kp.project(oracle_grads(model, row_sq, batch, ids=ids))
    assert_rel(fastattr.projected_grads(model, row_sq, batch, kp, segments=ids), expected)


# -------------------------------------------------------------------------- diffusers UNets

ABAR = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0)


def diffusion_loss(model, batch):
    """Per-row DDPM loss with the noise fixed in the batch: mean over pixels, Tensor[N]."""
    x0, t, noise, *cond = batch
    a = ABAR[t].reshape(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    kwargs = {"encoder_hidden_states": cond[0]} if cond else {}
    return (model(x_t, t, **kwargs).sample - noise).pow(2).flatten(1).mean(1)


@pytest.fixture(scope="module")
def unet_case():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), layers_per_block=1, norm_num_groups=4,
        attention_head_dim=4).eval()
    B, K = 2, 2
    gen = torch.Generator().manual_seed(0)
    batch = (torch.randn(B, 1, 8, 8, generator=gen).repeat_interleave(K, 0),
             torch.randint(0, 1000, (B * K,), generator=gen),
             torch.randn(B * K, 1, 8, 8, generator=gen))
    ids = torch.arange(B).repeat_interleave(K)
    return model, batch, ids, oracle_grads(model, diffusion_loss, batch, ids=ids)


@pytest.fixture(scope="module")
def cond_unet_case():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
        norm_num_groups=4, cross_attention_dim=12, attention_head_dim=4).eval()
    B, K = 2, 2
    gen = torch.Generator().manual_seed(1)
    batch = (torch.randn(B, 1, 8, 8, generator=gen).repeat_interleave(K, 0),
             torch.randint(0, 1000, (B * K,), generator=gen),
             torch.randn(B * K, 1, 8, 8, generator=gen),
             torch.randn(B, 5, 12, generator=gen).repeat_interleave(K, 0))
    ids = torch.arange(B).repeat_interleave(K)
    return model, batch, ids, oracle_grads(model, diffusion_loss, batch, ids=ids)


@pytest.mark.filterwarnings("ignore:There is a performance drop")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["unet_case", "cond_unet_case"])
def test_diffusers_unets(which, backend, request):
    model, batch, ids, expected = request.getfixturevalue(which)
    cov = fastattr.coverage(model)
    summary = cov.summary()
    # every attention projection (self and cross) is fused and every norm captured:
    # nothing takes the torch.func pass
    assert set(summary) == ({"linear", "conv2d", "groupnorm"} if which == "unet_case" else
                            {"linear", "conv2d", "groupnorm", "layernorm"})
    assert all(cov[n] == "linear" for n in cov if ".to_q." in n or ".to_k." in n)
    proj = fastattr.Projector(24, seed=5, backend=backend)  # the reference op is slow in k
    got = fastattr.projected_grads(model, diffusion_loss, batch, proj, segments=ids)
    assert_rel(got, proj.project(expected))
    if backend == "reference":
        assert_grads_close(
            fastattr.per_sample_grads(model, diffusion_loss, batch, segments=ids), expected)
        if KroneckerProjector is not None:
            kp = KroneckerProjector(2, 3, seed=1)
            got = fastattr.projected_grads(model, diffusion_loss, batch, kp, segments=ids)
            assert_rel(got, kp.project(expected))


# ------------------------------------------------------------------------------------ errors


def test_errors_are_clear():
    model, batch = make_case("mlp")
    proj = fastattr.Projector(16, backend="reference")
    with pytest.raises(ValueError, match="5 sample ids but output_fn returned 6 rows"):
        fastattr.projected_grads(model, row_sq, batch, proj, segments=[0, 0, 1, 1, 2])
    with pytest.raises(ValueError, match="no parameter selected"):
        fastattr.projected_grads(model, row_sq, batch, proj, params=lambda n, p: False)
    with pytest.raises(ValueError, match="returned a scalar.*per-row values"):
        fastattr.projected_grads(model, lambda m, b: row_sq(m, b).mean(), batch, proj)
    with pytest.raises(TypeError, match="projector"):
        fastattr.projected_grads(model, row_sq, batch, object())
    with pytest.raises(TypeError, match="output_fn"):
        fastattr.projected_grads(model, None, batch, proj)
    bn = nn.Sequential(nn.Linear(7, 3), nn.BatchNorm1d(4))
    with pytest.raises(ValueError, match=r"module 1 \(BatchNorm1d\)"):
        fastattr.projected_grads(bn, lambda m, b: m(b[0]).flatten(1).sum(1), batch, proj)
    with pytest.raises(ValueError, match="no tensor with N=6 rows"):
        # all rows come from a closure: the torch.func part cannot split them
        x = batch[0]
        fastattr.per_sample_grads(model, lambda m, b: m(x).flatten(1).sum(1), {"unused": 1},
                                  params=["emb"])


def test_dropout_in_train_mode_is_explained():
    model = nn.Sequential(nn.Linear(4, 4), nn.PReLU(), nn.Dropout(0.5))  # PReLU: torch.func
    x = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="model.eval"):
        fastattr.per_sample_grads(model, lambda m, b: m(b).sum(1), x)


# -------------------------------------------------------------------- Projector.project offsets


def test_project_offsets_place_layers():
    proj = fastattr.Projector(37, seed=9, backend="reference")
    g1, gb, g2 = torch.randn(3, 4, 5), torch.randn(3, 4), torch.randn(3, 7)
    full = proj.project({"w1": g1, "b1": gb, "w2": g2})
    assert torch.equal(proj.project({"w1": g1, "b1": gb, "w2": g2}, offsets=[0, 20, 24]), full)
    assert_rel(proj.project({"w2": g2}, offsets=[24]) + proj.project({"w1": g1, "b1": gb}), full)
    assert_rel(proj.project({"w2": g2, "w1": g1}, offsets={"w1": 0, "w2": 24})
               + proj.project([gb], offsets=[20]), full)
    padded = torch.cat([torch.zeros(3, 11), g2], 1)
    assert_rel(proj.project(g2, offsets=11), proj.project(padded))
    assert_rel(proj.project(g2, offsets=torch.tensor([11])), proj.project(padded))
    # a 64-bit offset
    big = (1 << 40) + 3
    assert_rel(proj.project(g2, offsets=[big]), g2 @ proj.materialize(range(big, big + 7)))


@pytest.mark.parametrize("offsets,error,match", [
    ([0], ValueError, "offsets has 1 entries but x has 2 layers"),
    ([0, -1], ValueError, r"must be in \[0"),
    ([0, 1.5], TypeError, "must be an int"),
    ({"a": 0, "c": 1}, ValueError, "missing"),
    ("0", TypeError, "offsets must be a list"),
    ([0, (1 << 63) - 2], ValueError, "ends past"),
])
def test_project_offsets_validation(offsets, error, match):
    proj = fastattr.Projector(8, backend="reference")
    with pytest.raises(error, match=match):
        proj.project({"a": torch.randn(2, 3), "b": torch.randn(2, 3)}, offsets=offsets)


def test_project_offsets_are_differentiable():
    proj = fastattr.Projector(8, backend="reference")
    x = torch.randn(2, 5, requires_grad=True)
    y = proj.project([x], offsets=[13])
    (gx,) = torch.autograd.grad(y.pow(2).sum(), x)
    expected = 2 * y.detach() @ proj.materialize(range(13, 18)).T
    assert_rel(gx, expected)
