"""fastattr.curvature against brute force: explicit per-datum gradients (torch.func), dense
matrices, unfold definitions; save / load; bad input."""

from __future__ import annotations

import functools
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from fastattr import rng
from fastattr.curvature import Factors, fit_factors, kfac_params, regression_loss
from fastattr.diffusion import DiffusionLoss, Rows

from _models import tiny_unet

# oracle-grade factors: float64 eigenvectors, and the covariances kept for inspection
fit = functools.partial(fit_factors, factor_dtype=torch.float64, keep_covariances=True,
                        progress=False)


class ConvNet(nn.Module):
    """Stride 2 + bias, a grouped and dilated conv without bias, a shared linear called twice."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(4, 6, (3, 2), padding=(2, 1), dilation=(2, 1), groups=2,
                               bias=False)
        self.shared = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.conv2(torch.tanh(self.conv1(x))))  # [N, 6, 4, 5]
        h = h.mean(dim=(2, 3))
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(h)))))


def mlp():
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def data(model_kind: str, n: int = 12, batch: int = 5, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 7, 8, generator=gen) if model_kind == "conv" else torch.randn(
        n, 5, generator=gen)
    y = torch.randn(n, 3, generator=gen)
    ids = torch.arange(n) * 3 + 11  # stable datum ids, not positions
    return [(x[i:i + batch], y[i:i + batch], ids[i:i + batch]) for i in range(0, n, batch)]


def pseudo_grads(model, batches, ggn: str, seed: int = 0):
    """Per-datum pseudo-gradients by torch.func: dict name -> [N, (d,) *shape] (float64)."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    out = {k: [] for k in params}
    for x, y, ids in batches:
        d = y.shape[1]
        if ggn == "model":
            key = rng.philox_key(seed)
            xi = rng.matrix_rows(ids, d, "gaussian", key, rng.Stream.GGN, scale=1.0)
            vecs = (xi * math.sqrt(2.0 / d))[:, None]  # [N, 1, d]
        elif ggn == "model_exact":
            vecs = torch.eye(d).expand(x.shape[0], d, d) * math.sqrt(2.0 / d)
        else:
            vecs = None

        def value(p, xr, yr, vr):
            o = functional_call(model, p, (xr[None],))[0]
            return ((o - yr) ** 2).mean() if vr is None else (o * vr).sum()

        if vecs is None:
            g = vmap(grad(value), in_dims=(None, 0, 0, None))(params, x, y, None)
            g = {k: v[:, None] for k, v in g.items()}
        else:
            g = vmap(vmap(grad(value), in_dims=(None, None, None, 0)),
                     in_dims=(None, 0, 0, 0))(params, x, y, vecs)
        for k in params:
            out[k].append(g[k].double())
    return {k: torch.cat(v) for k, v in out.items()}


def blocks(lf, grads):
    """[N, V, G, O, Fa] per-datum gradient blocks of one layer (V vectors per datum)."""
    w = grads[lf.weight]
    n, v = w.shape[:2]
    parts = [w.reshape(n, v, lf.groups, lf.d_out, -1)]
    if lf.bias is not None:
        parts.append(grads[lf.bias].reshape(n, v, lf.groups, lf.d_out, 1))
    return torch.cat(parts, dim=4)


def assert_rel(actual, expected, tol):
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    err = (actual - expected).abs().max() / expected.abs().max().clamp_min(1e-300)
    assert err <= tol, f"relative error {float(err):.2e} > {tol}"


# ------------------------------------------------------------------------ Λ, A, G by hand


@pytest.mark.parametrize("ggn", ["model", "loss", "model_exact"])
@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_ekfac_lambda_is_its_definition(kind, ggn):
    torch.manual_seed(3)
    model = mlp() if kind == "mlp" else ConvNet()
    batches = data("conv" if kind == "conv" else "mlp")
    f = fit(model, batches, regression_loss, strategy="ekfac", ggn=ggn, progress=False,
                    seed=5)
    grads = pseudo_grads(model, batches, ggn, seed=5)
    for lf in f.layers.values():
        b = blocks(lf, grads)  # [N, V, G, O, Fa]
        rot = lf.QG.transpose(1, 2) @ b @ lf.QA
        expected = rot.square().sum(1).mean(0)  # sum over vectors, mean over data
        assert_rel(lf.lam, expected, 1e-5)
        assert f.num_data == 12


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_diagonal_is_mean_squared_gradient(kind):
    torch.manual_seed(4)
    model = mlp() if kind == "mlp" else ConvNet()
    batches = data("conv" if kind == "conv" else "mlp")
    f = fit(model, batches, regression_loss, strategy="diagonal", ggn="loss",
                    progress=False)
    grads = pseudo_grads(model, batches, "loss")
    for lf in f.layers.values():
        assert_rel(lf.lam, blocks(lf, grads).square().sum(1).mean(0), 1e-5)


def captured_io(model, batches):
    """Inputs and output gradients (ggn='loss') of every call of every layer, by hooks."""
    ios = {}
    for x, y, _ in batches:
        acts, handles = {}, []
        for name, mod in model.named_modules():
            if isinstance(mod, (nn.Linear, nn.Conv2d)):
                def hook(m, args, out, name=name):
                    out.register_hook(lambda g: ios.setdefault(name, []).append((args[0], g)))
                handles.append(mod.register_forward_hook(hook))
        out = model(x)
        ((out - y) ** 2).flatten(1).mean(1).sum().backward()
        for h in handles:
            h.remove()
    return ios


@pytest.mark.parametrize("sharing", ["expand", "reduce"])
def test_conv_factors_are_their_unfold_definitions(sharing):
    torch.manual_seed(5)
    model = ConvNet()
    batches = data("conv")
    f = fit(model, batches, regression_loss, strategy="kfac", ggn="loss",
                    sharing=sharing, progress=False)
    ios = captured_io(model, batches)
    for name in ("conv1", "conv2"):
        mod, lf = getattr(model, name), f.layers[name]
        A = G = 0
        rows = 0
        for a, g in ios[name]:
            n = a.shape[0]
            patches = F.unfold(a.detach().double(), mod.kernel_size, dilation=mod.dilation,
                               padding=mod.padding, stride=mod.stride)  # [n, C*k, P]
            P = patches.shape[2]
            patches = patches.reshape(n, lf.groups, -1, P)
            if mod.bias is not None:
                patches = torch.cat([patches, torch.ones(n, lf.groups, 1, P, dtype=torch.float64)],
                                    2)
            gg = g.double().reshape(n, lf.groups, lf.d_out, P)
            if sharing == "expand":
                A = A + torch.einsum("ngfp,ngep->gfe", patches, patches)
                G = G + torch.einsum("ngop,ngqp->goq", gg, gg)
                rows += n * P
            else:
                am, gs = patches.mean(3), gg.sum(3)
                A = A + torch.einsum("ngf,nge->gfe", am, am)
                G = G + torch.einsum("ngo,ngq->goq", gs, gs)
                rows += n
        assert_rel(lf.A, A / rows, 1e-5)
        assert_rel(lf.G, G / 12, 1e-5)


def test_kfac_of_a_linear_layer_is_the_exact_ggn():
    # one Linear, one row per datum: the GGN is A ⊗ (2/d) I exactly, so K-FAC with the exact
    # output Hessian equals the dense GGN block
    torch.manual_seed(6)
    model = nn.Linear(4, 3)
    batches = [(torch.randn(6, 4), torch.randn(6, 3), torch.arange(6) + 6 * i) for i in range(2)]
    kfac = fit(model, batches, regression_loss, strategy="kfac", ggn="model_exact",
                       progress=False)
    exact = fit(model, batches, regression_loss, strategy="exact", ggn="model_exact",
                        progress=False)
    lf = kfac.layers[""]
    # parameter order of exact: weight [3, 4] row-major then bias [3]; K-FAC blocks [O, Fa]
    # with the bias as column Fa-1: permute the dense matrix into the block order
    order = torch.tensor([o * 4 + i for o in range(3) for i in range(4)])
    idx = torch.stack([torch.cat([order[o * 4:(o + 1) * 4], torch.tensor([12 + o])])
                       for o in range(3)]).reshape(-1)
    dense = exact.dense[idx][:, idx]
    assert_rel(torch.kron(lf.G[0], lf.A[0]), dense, 1e-6)


# ------------------------------------------------------------------------- preconditioning


def implied_dense(lf, strategy):
    """The dense [G, O*Fa, O*Fa] matrix each strategy's precondition inverts (+ λI)."""
    mats = []
    for gi in range(lf.groups):
        if strategy == "kfac":
            mats.append(torch.kron(lf.G[gi], lf.A[gi]))
        else:
            q = torch.kron(lf.QG[gi], lf.QA[gi])
            mats.append(q @ torch.diag(lf.lam[gi].reshape(-1)) @ q.T)
    return mats


@pytest.mark.parametrize("strategy", ["ekfac", "kfac", "diagonal", "exact"])
def test_precondition_is_a_dense_solve(strategy):
    torch.manual_seed(7)
    model = ConvNet()
    batches = data("conv")
    f = fit(model, batches, regression_loss, strategy=strategy, ggn="model",
                    progress=False, params=["conv1.weight", "conv1.bias", "conv2.weight"])
    shapes = {n: p.shape for n, p in model.named_parameters()}
    v = {n: torch.randn(3, *shapes[n], dtype=torch.float64) for n in f.param_names}
    lam = 0.05
    out = f.precondition(v, damping=lam)
    assert set(out) == set(v) and all(out[n].dtype == torch.float64 for n in out)
    if strategy == "exact":
        flat = torch.cat([v[n].flatten(1) for n in f.param_names], 1)
        solved = torch.linalg.solve(f.dense + lam * torch.eye(f.dense.shape[0]), flat.T).T
        assert_rel(torch.cat([out[n].flatten(1) for n in f.param_names], 1), solved, 1e-6)
        return
    for lf in f.layers.values():
        vb = lf.to_blocks(v[lf.weight], v.get(lf.bias))
        ob = lf.to_blocks(out[lf.weight], out.get(lf.bias))
        for gi in range(lf.groups):
            if strategy == "diagonal":
                expected = vb[:, gi] / (lf.lam[gi] + lam)
            else:
                m = implied_dense(lf, strategy)[gi]
                expected = torch.linalg.solve(m + lam * torch.eye(m.shape[0]),
                                              vb[:, gi].flatten(1).T).T.reshape(vb[:, gi].shape)
            assert_rel(ob[:, gi], expected, 1e-6)


def test_pi_heuristic_damps_the_factors():
    torch.manual_seed(8)
    model = mlp()
    f = fit(model, data("mlp"), regression_loss, strategy="kfac", progress=False)
    lam = 0.01
    v = {n: torch.randn(2, *p.shape, dtype=torch.float64) for n, p in model.named_parameters()}
    out = f.precondition(v, damping=lam, heuristic="pi")
    for lf in f.layers.values():
        A, G = lf.A[0], lf.G[0]
        pi = math.sqrt((torch.trace(A) / A.shape[0]) / (torch.trace(G) / G.shape[0]))
        m = torch.kron(G + math.sqrt(lam) / pi * torch.eye(G.shape[0]),
                       A + pi * math.sqrt(lam) * torch.eye(A.shape[0]))
        vb = lf.to_blocks(v[lf.weight], v[lf.bias])[:, 0]
        expected = torch.linalg.solve(m, vb.flatten(1).T).T.reshape(vb.shape)
        assert_rel(lf.to_blocks(out[lf.weight], out[lf.bias])[:, 0], expected, 1e-6)
    with pytest.raises(ValueError, match="pi heuristic"):
        fit(model, data("mlp"), regression_loss, strategy="ekfac",
                    progress=False).precondition(v, damping=lam, heuristic="pi")


# ------------------------------------------------------------------- protocol invariances


def test_factors_do_not_depend_on_batching():
    torch.manual_seed(9)
    model = ConvNet()
    f1 = fit(model, data("conv", batch=5), regression_loss, progress=False)
    f2 = fit(model, data("conv", batch=3), regression_loss, progress=False)
    for name, lf in f1.layers.items():
        for key in ("A", "G", "lam"):
            assert_rel(getattr(f2.layers[name], key), getattr(lf, key), 1e-5)


@pytest.mark.parametrize("strategy", ["ekfac", "diagonal"])
def test_factors_do_not_depend_on_max_rows(strategy):
    """Cutting batches into parts of at most max_rows rows changes nothing beyond rounding:
    the running sums, the data count and the GGN vectors (keyed by datum id, or numbered in
    order without ids) are the same."""
    torch.manual_seed(11)
    model = ConvNet()
    batches = data("conv", batch=5)
    whole = fit(model, batches, regression_loss, strategy=strategy, max_rows=None,
                progress=False)
    parts = fit(model, batches, regression_loss, strategy=strategy, max_rows=2,
                progress=False)
    assert parts.num_data == whole.num_data
    for name, lf in whole.layers.items():
        for key in ("A", "G", "lam") if strategy == "ekfac" else ("lam",):
            assert_rel(getattr(parts.layers[name], key), getattr(lf, key), 1e-5)


def test_max_rows_counts_rows_of_k_draws():
    """With K draws per example, max_rows=4 runs 1 example (3 rows) per part."""
    pytest.importorskip("diffusers")
    unet = tiny_unet(12)
    batches = [(torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 2]))]
    seen = []
    loss = DiffusionLoss()

    def counting(model, batch, K):
        seen.append(batch[0].shape[0])
        return loss(model, batch, K)

    kw = dict(samples_per_example=3, strategy="kfac", progress=False)
    parts = fit(unet, batches, counting, max_rows=4, **kw)
    assert seen == [1, 1, 1]
    whole = fit(unet, batches, loss, max_rows=None, **kw)
    for name, lf in whole.layers.items():
        assert_rel(parts.layers[name].A, lf.A, 1e-5)
        assert_rel(parts.layers[name].G, lf.G, 1e-5)


def test_diffusion_unet_fits_with_k_draws():
    pytest.importorskip("diffusers")
    unet = tiny_unet(10)
    images = torch.randn(4, 1, 8, 8)
    batches = [(images[:2], torch.tensor([0, 1])), (images[2:], torch.tensor([2, 3]))]
    f = fit(unet, batches, DiffusionLoss(), samples_per_example=3, progress=False)
    assert f.num_data == 12
    names = set(f.layers)
    assert {"conv_in", "time_embedding.linear_1", "down_blocks.1.attentions.0.to_q"} <= names
    for lf in f.layers.values():
        assert torch.isfinite(lf.lam).all() and (lf.lam >= 0).all()
    assert f.config["loss"]["timesteps"] == "random" and f.config["samples_per_example"] == 3
    # the rows of one example are its K draws; a different K gives other data
    rows = DiffusionLoss()(unet, batches[0], 3)
    assert isinstance(rows, Rows) and rows.outputs.shape == (6, 1, 8, 8)
    assert torch.equal(rows.ids, torch.tensor([0, 1, 2, 3, 4, 5]))


# ------------------------------------------------------------------------ save / load


def test_save_load_roundtrip_and_checks(tmp_path):
    torch.manual_seed(11)
    model = mlp()
    f = fit(model, data("mlp"), regression_loss, strategy="ekfac", progress=False)
    path = tmp_path / "f.safetensors"
    f.save(path)
    assert os.listdir(tmp_path) == ["f.safetensors"]  # no temp file left behind
    g = Factors.load(path, model=model, strategy="ekfac", ggn="model")
    for name, lf in f.layers.items():
        for key, t in lf.tensors.items():
            assert torch.equal(g.layers[name].tensors[key], t)
    v = {n: torch.randn(2, *p.shape) for n, p in model.named_parameters()}
    for n, t in f.precondition(v, damping=0.1).items():
        assert torch.equal(g.precondition(v, damping=0.1)[n], t)
    with pytest.raises(ValueError, match="strategy: saved 'ekfac', expected 'kfac'"):
        Factors.load(path, strategy="kfac")
    other = mlp()
    with pytest.raises(ValueError, match="parameter values differ"):
        Factors.load(path, model=other)
    wider = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    with pytest.raises(ValueError, match=r"shapes differ.*0.weight \[7, 5\] vs \[8, 5\]"):
        Factors.load(path, model=wider)


def test_exact_roundtrip(tmp_path):
    model = nn.Linear(3, 2)
    f = fit(model, [(torch.randn(4, 3), torch.randn(4, 2))], regression_loss,
                    strategy="exact", ggn="loss", progress=False)
    f.save(tmp_path / "e.safetensors")
    g = Factors.load(tmp_path / "e.safetensors", model=model)
    assert torch.equal(g.dense, f.dense) and g.param_names == ["weight", "bias"]


# ---------------------------------------------------------------------------- bad input


class Exploding(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.out = nn.Linear(2, 2)

    def forward(self, x):
        return self.out(self.fc(x) * torch.tensor(float("inf")))


def test_nan_factors_name_the_layer():
    batches = [(torch.randn(4, 3), torch.randn(4, 2))]
    with pytest.raises(FloatingPointError, match=r"layer (fc|out): the (activation|gradient) covariance"):
        fit(Exploding(), batches, regression_loss, progress=False)


def test_bad_arguments():
    model = mlp()
    batches = data("mlp")
    with pytest.raises(ValueError, match="strategy must be one of"):
        fit(model, batches, regression_loss, strategy="kfca")
    with pytest.raises(ValueError, match="ggn must be one of"):
        fit(model, batches, regression_loss, ggn="fisher")
    with pytest.raises(ValueError, match="sharing must be one of"):
        fit(model, batches, regression_loss, sharing="mean")
    with pytest.raises(ValueError, match="samples_per_example must be an int >= 1"):
        fit(model, batches, regression_loss, samples_per_example=0)
    with pytest.raises(TypeError, match="re-iterable"):
        fit(model, iter(batches), regression_loss)
    with pytest.raises(ValueError, match="max_rows must be None or an int >= 1"):
        fit(model, batches, regression_loss, max_rows=0)
    norm = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Linear(4, 3))
    with pytest.raises(ValueError, match="Linear / Conv2d modules only.*1.weight"):
        fit(norm, batches, regression_loss, params=[n for n, _ in norm.named_parameters()])
    assert kfac_params(norm) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    with pytest.raises(ValueError, match="bias is selected without its weight"):
        fit(model, batches, regression_loss, params=["0.bias"])
    f = fit(model, batches, regression_loss, strategy="kfac", progress=False)
    with pytest.raises(ValueError, match="missing"):
        f.precondition({"0.weight": torch.randn(1, 7, 5)}, damping=0.1)
    v = {n: torch.randn(2, *p.shape) for n, p in model.named_parameters()}
    v["0.bias"] = torch.randn(2, 6)
    with pytest.raises(ValueError, match=r"grads\['0.bias'\] must be a Tensor \[q=2"):
        f.precondition(v, damping=0.1)
    with pytest.raises(ValueError, match="damping must be a float >= 0"):
        f.precondition(v, damping=-1.0)
