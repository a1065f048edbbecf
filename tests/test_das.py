"""DAS on a small diffusers UNet with attention: the scores equal the formula of
shared/METHODS.md computed by hand (per-row Jacobians of the output functions with
torch.func, written here and independent of fastattr's capture; the materialised
projection; residuals from a direct forward pass; a float64 solve), for the mean output
and m > 1 Gaussian directions, exact and projected gradient norms, signed / squared /
leverage-corrected; features do not depend on batch size or order; sweep_lambda; the
store; bad input is refused clearly."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, jacrev, vmap

from _models import tiny_images, tiny_unet
from fastattr import Projector, rng
from fastattr.diffusion import DiffusionTask, noise, timesteps
from fastattr.methods.das import DAS

N_TRAIN, N_TEST, K, k = 6, 3, 3, 96
TEST_IDS = torch.arange(100, 100 + N_TEST)
SEED = 5

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop")


def _rel(a, b):
    """max |a − b| / max |b|, in float64."""
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def setup():
    # the uniform grid j·T/K, as the official DAS code uses
    task = DiffusionTask(tiny_unet(0), samples_per_example=K, timesteps="uniform", noise_seed=3)
    return task, tiny_images(N_TRAIN, 0), tiny_images(N_TEST, 1)


def _draws(task, images, ids):
    """The task's K (x_t, t, ε) rows per image, from the documented protocol."""
    t = timesteps(ids, task.K, task.T, task.timesteps, task.noise_seed).reshape(-1)
    eps = noise(ids.repeat_interleave(task.K), t, images.shape[1:], task.T, task.noise_seed)
    a = task.alphas_cumprod[t].float().reshape(-1, 1, 1, 1)
    return a.sqrt() * images.repeat_interleave(task.K, 0) + (1 - a).sqrt() * eps, t, eps


def _directions(m):
    """U [d, m] of output_dim m: Philox Gaussian, stream OUTPUT, entries N(0, 1/m)."""
    return rng.matrix_rows(torch.arange(64), m, "gaussian", rng.philox_key(SEED),
                           rng.Stream.OUTPUT)


def _jacobians(task, images, ids, m):
    """``[B, K, m, p]`` float64: the gradient of each output function at every draw (m = 1:
    mean over pixels of ε_θ; m > 1: ⟨U_j, ε_θ⟩ / d), one torch.func row each."""
    model = task.model
    params = {n: p.detach() for n, p in model.named_parameters()}
    chosen = {n: params[n] for n in task.params}
    U = None if m == 1 else _directions(m)

    def outputs(p, x, t):
        pred = functional_call(model, {**params, **p}, (x[None], t)).sample.flatten()
        return pred.mean()[None] if U is None else pred @ U / pred.numel()

    x_t, t, _ = _draws(task, images, ids)
    J = vmap(jacrev(outputs), in_dims=(None, 0, 0))(chosen, x_t, t)
    flat = torch.cat([J[n].reshape(x_t.shape[0], m, -1) for n in task.params], 2)
    return flat.double().reshape(images.shape[0], task.K, m, -1)


def _residuals(task, images, ids):
    x_t, t, eps = _draws(task, images, ids)
    with torch.no_grad():
        pred = task.model(x_t, t).sample
    u = ((eps - pred) ** 2).flatten(1).mean(1).sqrt().double().reshape(-1, task.K)
    return (u / u.norm(dim=1, keepdim=True)).mean(1)


def _features(J, grad_norm):
    """DAS features ``[B, m, k]`` from the Jacobians: unit per-timestep gradients, averaged,
    projected (exact norms), or projected per timestep and unit in projected norm."""
    proj = Projector(k, seed=SEED)
    B, K_, m, p = J.shape
    if grad_norm == "exact":
        g = (J / J.norm(dim=3, keepdim=True)).mean(1)
        return proj.project(g.reshape(B * m, p).float()).double().reshape(B, m, k)
    rows = proj.project(J.reshape(-1, p).float()).double().reshape(B, K_, m, k)
    return (rows / rows.norm(dim=3, keepdim=True)).mean(1)


def _formula(train, test, e, lam=None, leverage=False, squared=False):
    n, m, _ = train.shape
    A = train.reshape(n * m, k)
    gram = A.T @ A
    if lam is None:
        lam = 0.1 * float(torch.linalg.eigvalsh(gram).mean())
    solved = torch.linalg.solve(gram + lam * torch.eye(k, dtype=gram.dtype), A.T)
    solved = solved.T.reshape(n, m, k)                           # K_λ⁻¹ φ_i^{(j)}
    terms = torch.einsum("xjk,ijk->xij", test, solved)           # [n_test, n, m]
    w = e.clone()
    if leverage:  # leave-i-out solve by brute force: remove sample i's m rows from the gram
        for i in range(n):
            rest = torch.cat([A[:i * m], A[(i + 1) * m:]])
            loo = torch.linalg.solve(rest.T @ rest + lam * torch.eye(k, dtype=gram.dtype),
                                     train[i].T)                 # [k, m]
            terms[:, i] = torch.einsum("xjk,kj->xj", test, loo)
    terms = terms * w[None, :, None]
    return terms.pow(2).sum(2) if squared else terms.sum(2)


_CACHE = {}


def _oracle(setup, m):
    if m not in _CACHE:
        task, x, xt = setup
        _CACHE[m] = (_jacobians(task, x, torch.arange(N_TRAIN), m),
                     _jacobians(task, xt, TEST_IDS, m), _residuals(task, x, torch.arange(N_TRAIN)))
    return _CACHE[m]


VARIANTS = [dict(), dict(lam=0.5), dict(lam=0.5, leverage=True), dict(lam=0.5, squared=True),
            dict(lam=0.5, squared=True, leverage=True)]


def test_exact_norms_equal_the_formula(setup):
    task, x, xt = setup
    das = DAS(task, k=k, grad_norm="exact", seed=SEED, batch_size=4, progress=False).fit(x)
    J_tr, J_te, e = _oracle(setup, 1)
    assert _rel(das.residuals, e) < 1e-5
    # the residual weights are not all alike: dropping them changes the scores
    assert float(e.max() - e.min()) > 1e-3
    phi_tr, phi_te = _features(J_tr, "exact"), _features(J_te, "exact")
    for opts in VARIANTS:
        scores = das.score((xt, TEST_IDS), **opts)
        assert scores.shape == (N_TEST, N_TRAIN)
        assert _rel(scores, _formula(phi_tr, phi_te, e, **opts)) < 1e-4, opts
    # constructor defaults are the per-call defaults
    lev = DAS(task, k=k, grad_norm="exact", seed=SEED, lam=0.5, leverage=True, squared=True,
              progress=False)
    lev.kernel, lev.residuals, lev.train_ids = das.kernel, das.residuals, das.train_ids
    assert torch.equal(lev.score((xt, TEST_IDS)),
                       das.score((xt, TEST_IDS), lam=0.5, leverage=True, squared=True))
    assert (lev.score((xt, TEST_IDS)) >= 0).all()


def test_projected_norms_equal_the_formula(setup):
    task, x, xt = setup
    J_tr, J_te, e = _oracle(setup, 1)
    phi_tr, phi_te = _features(J_tr, "projected"), _features(J_te, "projected")
    das = DAS(task, k=k, seed=SEED, progress=False).fit(x)
    plain = DAS(task, k=k, seed=SEED, residual_weights=False, progress=False).fit(x)
    for opts in VARIANTS[:3]:
        assert _rel(das.score((xt, TEST_IDS), **opts), _formula(phi_tr, phi_te, e, **opts)) < 1e-4
        ones = torch.ones(N_TRAIN, dtype=torch.float64)
        assert _rel(plain.score((xt, TEST_IDS), **opts),
                    _formula(phi_tr, phi_te, ones, **opts)) < 1e-4
    # the projected norm is an estimate: features differ from the exact-norm ones
    assert _rel(phi_tr, _features(J_tr, "exact")) > 1e-4


def test_output_dim_equals_the_formula(setup):
    task, x, xt = setup
    m = 3
    J_tr, J_te, e = _oracle(setup, m)
    phi_tr, phi_te = _features(J_tr, "exact"), _features(J_te, "exact")
    das = DAS(task, k=k, output_dim=m, grad_norm="exact", seed=SEED, batch_size=4,
              progress=False).fit(x)
    feats, _ = das.features((xt, TEST_IDS))
    assert feats.shape == (N_TEST, m, k)
    assert _rel(feats, phi_te) < 1e-4
    # leverage: the leave-one-out solve of all m rows of a sample (Woodbury), any λ
    for opts in [dict(), *VARIANTS[1:], *({**v, "lam": 4.0} for v in VARIANTS[1:])]:
        assert _rel(das.score((xt, TEST_IDS), **opts), _formula(phi_tr, phi_te, e, **opts)) < 1e-4
    # the directions are distinct output functions: not m copies of one feature
    assert _rel(feats[:, 0], feats[:, 1]) > 0.1


def test_features_do_not_depend_on_batch_size_or_order(setup):
    task, x, xt = setup
    ids = torch.arange(N_TRAIN) * 7 + 1
    perm = torch.tensor([4, 1, 5, 0, 3, 2])
    a = DAS(task, k=k, batch_size=3, progress=False).fit((x, ids))
    b = DAS(task, k=k, batch_size=5, progress=False).fit((x[perm], ids[perm]))
    assert torch.equal(b.train_ids, ids[perm])
    assert torch.allclose(b.residuals, a.residuals[perm], rtol=1e-6, atol=1e-7)
    for opts in (dict(), dict(squared=True, leverage=True)):
        sa, sb = a.score(xt, **opts), b.score(xt, **opts)
        assert torch.allclose(sb, sa[:, perm], rtol=1e-4, atol=1e-6)


def test_sweep_lambda_equals_score(setup):
    task, x, xt = setup
    das = DAS(task, k=k, progress=False).fit(x)
    lams = [0.05, 2.0]
    for opts in (dict(), dict(squared=True, leverage=True)):
        grid = das.sweep_lambda(xt, lams, **opts)
        assert grid.shape == (2, N_TEST, N_TRAIN)
        for i, lam in enumerate(lams):
            assert torch.allclose(grid[i], das.score(xt, lam=lam, **opts), rtol=1e-5, atol=1e-7)
        assert not torch.allclose(grid[0], grid[1])


def test_store_is_read_back(setup, tmp_path):
    task, x, xt = setup
    first = DAS(task, k=k, batch_size=4, store=tmp_path, progress=False).fit(x)
    calls = []
    features, values = task.features, task.values
    task.features = lambda *a, **kw: calls.append("features") or features(*a, **kw)
    task.values = lambda *a, **kw: calls.append("values") or values(*a, **kw)
    try:
        second = DAS(task, k=k, batch_size=4, store=tmp_path, progress=False).fit(x)
    finally:
        del task.features, task.values
    assert calls == []   # features and residual weights both came from the store
    assert torch.equal(second.residuals, first.residuals)
    for opts in (dict(), dict(squared=True, leverage=True)):
        assert torch.equal(second.score(xt, **opts), first.score(xt, **opts))
    with pytest.raises(ValueError, match="grad_norm"):
        DAS(task, k=k, batch_size=4, grad_norm="exact", store=tmp_path, progress=False).fit(x)


def test_bad_input(setup):
    task, x, xt = setup
    for m in (0, -2, True, 1.5):
        with pytest.raises(ValueError, match="output_dim must be an int >= 1"):
            DAS(task, output_dim=m)
    with pytest.raises(ValueError, match=r"grad_norm must be one of \('projected', 'exact'\)"):
        DAS(task, grad_norm="l2")
    with pytest.raises(TypeError, match="squared must be True or False"):
        DAS(task, squared="yes")
    for lam in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="lam must be a finite float > 0"):
            DAS(task, lam=lam)
    das = DAS(task, k=k, progress=False)
    with pytest.raises(RuntimeError, match="call fit"):
        das.score(xt)
    with pytest.raises(RuntimeError, match="call fit"):
        das.sweep_lambda(xt, [1.0])
    das.fit(x)
    with pytest.raises(ValueError, match="lam must be a finite float > 0"):
        das.score(xt, lam=0.0)
    with pytest.raises(ValueError, match="lam must be a finite float > 0"):
        das.sweep_lambda(xt, [1.0, -1.0])
    with pytest.raises(ValueError, match="lams must hold at least one"):
        das.sweep_lambda(xt, [])
    with pytest.raises(TypeError, match="leverage must be True or False"):
        das.score(xt, leverage=1)
