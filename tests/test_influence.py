"""KFACInfluence: EK-FAC scores equal kronfluence's on a small diffusers UNet with attention
fed the same (x_t, t, ε) rows; on a linear denoiser with a closed-form ridge optimum the
scores predict exact leave-one-out retraining (sign and scale: Δ test loss ≈ score / n);
scores equal the formula from explicit gradients (checks the streamed grads_matmul path);
the store reloads fitted factors; bad input is refused clearly."""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
from torch import nn

from _models import explicit_grads, tiny_images, tiny_unet
from fastattr.curvature import kfac_params
from fastattr.diffusion import DiffusionTask, _noised
from fastattr.methods.influence import KFACInfluence

N_TRAIN, N_TEST, K = 10, 4, 2
TEST_IDS = torch.arange(100, 100 + N_TEST)


def spearman(a, b) -> float:
    ra = a.flatten().argsort().argsort().double()
    rb = b.flatten().argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def pearson(a, b) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1])


def _rel(a, b) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.fixture(scope="module")
def setup():
    task = DiffusionTask(tiny_unet(0), samples_per_example=K, timesteps="random", noise_seed=3)
    return task, tiny_images(N_TRAIN, 0), (tiny_images(N_TEST, 1), TEST_IDS)


# ------------------------------------------------------------------ kronfluence agreement


def _kronfluence_scores(task, train, test, damping, tmp_path):
    """kronfluence 1.0.1's EK-FAC pairwise scores ``[n_test, n_train]`` on the task's rows.

    Every (image, draw) row ``(x_t, t, ε)`` -- from fastattr's own protocol -- is one
    kronfluence datum (as it is one datum of fastattr's factors); our gradients of an image
    are the K-average over its rows, so our score is the mean of kronfluence's row-pair
    scores over each image's K × K block. Both use the empirical Fisher (fastattr
    ``ggn="loss"``, kronfluence ``use_empirical_fisher=True``) so they see the same per-datum
    gradients, and both track every Linear / Conv2d module (kronfluence's default)."""
    pytest.importorskip("kronfluence")
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    logging.getLogger("kronfluence").setLevel(logging.ERROR)

    class RowsTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            x_t, t, eps = batch
            return (model(x_t, t).sample - eps).pow(2).flatten(1).mean(1).sum()

        def compute_measurement(self, batch, model):
            return self.compute_train_loss(batch, model)

    def rows(images, ids):
        r = _noised(images, ids, None, task.K, task.alphas_cumprod, task.timesteps,
                    task.noise_seed)
        return torch.utils.data.TensorDataset(r.x_t, r.t, r.eps)

    kt = RowsTask()
    model = prepare_model(copy.deepcopy(task.model), kt)
    analyzer = Analyzer("cmp", model, kt, cpu=True, disable_tqdm=True, output_dir=str(tmp_path))
    f64 = torch.float64
    fargs = FactorArguments(strategy="ekfac", use_empirical_fisher=True,
                            activation_covariance_dtype=f64, gradient_covariance_dtype=f64,
                            per_sample_gradient_dtype=f64, lambda_dtype=f64)
    train_rows = rows(train, torch.arange(train.shape[0]))
    analyzer.fit_all_factors("f", train_rows, per_device_batch_size=8, factor_args=fargs,
                             overwrite_output_dir=True)
    sargs = ScoreArguments(damping_factor=damping, precondition_dtype=f64,
                           per_sample_gradient_dtype=f64, score_dtype=f64)
    analyzer.compute_pairwise_scores("s", "f", rows(*test), train_rows,
                                     per_device_query_batch_size=8,
                                     per_device_train_batch_size=8, score_args=sargs,
                                     overwrite_output_dir=True)
    kf = analyzer.load_pairwise_scores("s")["all_modules"]
    n_test, n_train = test[0].shape[0], train.shape[0]
    return kf.reshape(n_test, task.K, n_train, task.K).mean((1, 3))


@pytest.mark.parametrize("damping", [1e-4, None])  # absolute λ; the 0.1·mean(Λ) heuristic
def test_ekfac_scores_match_kronfluence(setup, damping, tmp_path):
    task, x, test = setup
    inf = KFACInfluence(task, strategy="ekfac", ggn="loss", damping=damping, batch_size=4,
                        progress=False).fit(x)
    ours = inf.score(test)
    kf = _kronfluence_scores(task, x, test, damping, tmp_path)
    assert ours.shape == kf.shape == (N_TEST, N_TRAIN)
    assert spearman(ours, kf) >= 0.99
    assert min(spearman(ours[i], kf[i]) for i in range(N_TEST)) >= 0.99
    assert _rel(ours, kf) < 1e-4       # measured ~1e-6: the same quantity, not just ranks


# ------------------------------------------------------- sign: exact leave-one-out


T_LIN = 1000


def _linear_inputs(x_t, t):
    """``z = [x_t, sin(2πt/T), cos(2πt/T)]`` per row."""
    angle = 2 * math.pi * t.to(x_t.dtype) / T_LIN
    return torch.cat([x_t.flatten(1), torch.sin(angle)[:, None], torch.cos(angle)[:, None]], 1)


class LinearDenoiser(nn.Module):
    """``ε_θ(x_t, t) = W z + b`` with z the fixed features above: the diffusion loss is
    quadratic in θ, its GGN is its Hessian, and ridge retraining is closed form."""

    def __init__(self, d: int):
        super().__init__()
        self.lin = nn.Linear(d + 2, d)

    def forward(self, x_t, t):
        return self.lin(_linear_inputs(x_t, t)).reshape(x_t.shape)


def test_sign_and_scale_match_exact_leave_one_out():
    """Training objective ``Σ_i ℓ(x_i) + (nλ/2)‖θ‖²`` (ℓ the K-averaged diffusion loss on
    the task's draws), minimised in closed form. Its Hessian is ``n(F + λI)`` with F the
    exact GGN of fit_factors (``ggn="model_exact"``, averaged over the n·K rows), so
    influence predicts ``Δ test loss(remove j) ≈ score / n``: a positive score (proponent)
    must mean the test loss rises when j is removed."""
    n, n_test, k, lam, d = 40, 12, 4, 1e-2, 4
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, 2, 2, generator=g) * 2 - 1
    xq = torch.rand(n_test, 1, 2, 2, generator=g) * 2 - 1
    q_ids = torch.arange(1000, 1000 + n_test)
    model = LinearDenoiser(d)
    task = DiffusionTask(model, samples_per_example=k, timesteps="random", noise_seed=1)

    def rows(images, ids):  # z̃ = [z, 1] and ε per (image, draw), float64
        r = _noised(images, ids, None, k, task.alphas_cumprod, task.timesteps, task.noise_seed)
        z = _linear_inputs(r.x_t.double(), r.t)
        z = torch.cat([z, torch.ones(z.shape[0], 1, dtype=z.dtype)], 1)
        return z.reshape(len(ids), k, -1), r.eps.double().reshape(len(ids), k, d)

    Z, E = rows(x, torch.arange(n))
    Zq, Eq = rows(xq, q_ids)
    # ∂/∂W̃ [Σ_rows ‖W̃z̃ − ε‖²/(dK) + (nλ/2)‖W̃‖²] = 0  ⇒  W̃ = Σεz̃ᵀ (Σz̃z̃ᵀ + (nλdK/2) I)⁻¹
    ridge = n * lam * d * k / 2

    def solve(keep):
        z, e = Z[keep].reshape(-1, Z.shape[-1]), E[keep].reshape(-1, d)
        return e.T @ z @ torch.linalg.inv(z.T @ z + ridge * torch.eye(z.shape[1], dtype=z.dtype))

    def test_loss(W):
        return ((Zq @ W.T - Eq) ** 2).mean(-1).mean(-1)   # [n_test]

    W = solve(torch.ones(n, dtype=torch.bool))
    with torch.no_grad():
        model.lin.weight.copy_(W[:, :-1])
        model.lin.bias.copy_(W[:, -1])
    base = test_loss(W)
    delta = torch.stack([test_loss(solve(torch.arange(n) != j)) - base for j in range(n)], 1)

    inf = KFACInfluence(task, strategy="exact", ggn="model_exact", damping=lam,
                        progress=False).fit(x)
    pred = inf.score((xq, q_ids)).double() / n
    assert pearson(pred, delta) >= 0.99                     # measured 0.9975
    big = delta.abs() > 0.1 * delta.abs().max()
    assert big.sum() >= 50 and (delta > 0).any() and (delta < 0).any()
    assert (pred.sign() == delta.sign())[big].double().mean() >= 0.95   # measured 1.0
    slope = float((pred * delta).sum() / (pred * pred).sum())
    assert 0.8 < slope < 1.25                                # measured 1.07


# -------------------------------------------------------- formula, options, errors


def _formula(task, inf, x, test, output, damping):
    """``∇m(test)ᵀ (F + λI)⁻¹ ∇ℓ(train)`` with query gradients from ``task.grads``, the
    factors' ``precondition`` and explicit per-row autograd train gradients."""
    names = inf.params
    sub = copy.copy(task)
    sub.params = names
    q = sub.grads(test, output=output)
    pre = inf.factors.precondition(q, damping)
    flat = torch.cat([pre[nm].reshape(pre[nm].shape[0], -1).double() for nm in names], 1)
    g_train = explicit_grads(sub, x, torch.arange(x.shape[0]), "loss")
    return flat @ g_train.T


@pytest.mark.parametrize("strategy,measurement,damping",
                         [("ekfac", "loss", 1e-4), ("kfac", "square", None)])
def test_scores_equal_the_formula(setup, strategy, measurement, damping):
    task, x, test = setup
    inf = KFACInfluence(task, strategy=strategy, measurement=measurement, damping=damping,
                        batch_size=3, progress=False).fit(x)
    # influence runs over the Linear / Conv2d parameters among the attributed ones
    assert inf.params == [nm for nm in task.params if nm in set(kfac_params(task.model))]
    assert len(inf.params) < len(task.params)     # the UNet's norms are left out
    scores = inf.score(test)
    assert scores.shape == (N_TEST, N_TRAIN) and scores.dtype == torch.float32
    assert _rel(scores, _formula(task, inf, x, test, measurement, damping)) < 1e-4


def test_strategies_sweep_and_measurements(setup):
    task, x, test = setup
    runs = {}
    for strategy in ("ekfac", "kfac", "diagonal"):
        inf = KFACInfluence(task, strategy=strategy, batch_size=4, progress=False).fit(x)
        runs[strategy] = s = inf.score(test)
        assert s.shape == (N_TEST, N_TRAIN) and torch.isfinite(s).all() and s.abs().max() > 0
    assert not torch.allclose(runs["ekfac"], runs["diagonal"])
    lams = [1e-5, 1e-3, 1e-1]
    grid = inf.sweep_lambda(test, lams)
    assert grid.shape == (3, N_TEST, N_TRAIN)
    for i, lam in enumerate(lams):
        assert _rel(grid[i], inf.score(test, lam=lam)) < 1e-5
    assert grid[0].abs().max() > grid[2].abs().max()   # more damping, smaller scores
    # ELBO measurement: positive time weights, still finite; top_k reads the scores
    elbo = KFACInfluence(task, measurement="elbo", batch_size=4, progress=False).fit(x)
    s = elbo.score(test)
    assert torch.isfinite(s).all() and not torch.allclose(s, runs["ekfac"])
    top = elbo.top_k(test, k=3)
    assert torch.equal(top.indices, s.topk(3, dim=1).indices)


def test_store_reloads_factors(setup, tmp_path, monkeypatch):
    task, x, test = setup
    first = KFACInfluence(task, damping=1e-3, store=tmp_path / "s", batch_size=4,
                          progress=False).fit(x)
    assert (tmp_path / "s" / "factors.safetensors").exists()
    import fastattr.methods.influence as module

    def refit(*args, **kwargs):
        raise AssertionError("the factors should have been read from the store")

    monkeypatch.setattr(module, "fit_factors", refit)
    again = KFACInfluence(task, damping=1e-3, store=tmp_path / "s", batch_size=5,
                          progress=False).fit(x)
    assert torch.equal(again.score(test), first.score(test))
    with pytest.raises(ValueError, match="other training ids"):
        KFACInfluence(task, store=tmp_path / "s", progress=False).fit(x[:6])
    with pytest.raises(ValueError, match="another config"):
        KFACInfluence(task, strategy="kfac", store=tmp_path / "s", progress=False).fit(x)


def test_bad_input_is_refused(setup):
    task, x, test = setup
    refused = [({"damping": bad}, "damping must be a finite float > 0")
               for bad in (0, -1.0, float("nan"), "big")] + [
        ({"strategy": "lissa"}, "strategy must be one of"),
        ({"ggn": "fisher"}, "ggn must be one of"),
        ({"measurement": "nll"}, "unknown measurement 'nll'"),
        ({"curvature_samples": 0}, "curvature_samples must be an int >= 1")]
    for kwargs, message in refused:
        with pytest.raises(ValueError, match=message):
            KFACInfluence(task, **kwargs)
    norms = DiffusionTask(task.model, params=lambda name, p: "norm" in name)
    with pytest.raises(ValueError, match="no Linear / Conv2d"):
        KFACInfluence(norms)
    inf = KFACInfluence(task, batch_size=5, progress=False)
    with pytest.raises(RuntimeError, match="not fitted"):
        inf.score(test)
    inf.fit(x)
    with pytest.raises(ValueError, match="lam must be a finite float > 0"):
        inf.score(test, lam=0.0)
    with pytest.raises(ValueError, match="lam must be a finite float > 0"):
        inf.sweep_lambda(test, [1e-3, -1e-3])
    with pytest.raises(ValueError, match="at least one"):
        inf.sweep_lambda(test, [])
