"""TracIn / Diffusion-ReTrac on a small diffusers UNet with attention: the scores equal the
formulas of shared/METHODS.md computed from gradients taken independently of fastattr's
capture (torch.func ``functional_call`` + ``vmap(grad)`` over the (x_t, t, ε) rows of the
documented noise / timestep protocol), exact and through the materialised projection, over
two checkpoints with learning rates; features do not depend on batch size or order; the
store is read back; bad input is refused clearly."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch

from _models import tiny_images, tiny_unet
from fastattr import Projector
from fastattr.diffusion import DiffusionTask, noise, timesteps
from fastattr.methods.tracin import ReTrac, TracIn
from fastattr.store import StoreConfigError

N_TRAIN, N_TEST, K, k = 6, 3, 2, 96
TRAIN_IDS = torch.arange(N_TRAIN)
TEST_IDS = torch.arange(100, 100 + N_TEST)
RATES = [0.5, 2.0]
SEED = 5


def _row_grads(task, model, images, ids, output) -> torch.Tensor:
    """``[B, K, p]`` float64: ``∇_θ f(θ; x, t, ε(x, t))`` of every (image, draw), by
    torch.func over the rows (parameters of ``task.params`` in named_parameters order)."""
    from torch.func import functional_call, grad, vmap

    T = task.T
    t = timesteps(ids, task.K, T, task.timesteps, task.noise_seed).reshape(-1)
    rid = ids.repeat_interleave(task.K)
    eps = noise(rid, t, images.shape[1:], T, task.noise_seed)
    a = task.alphas_cumprod[t].float().reshape(-1, 1, 1, 1)
    x_t = a.sqrt() * images.repeat_interleave(task.K, 0) + (1 - a).sqrt() * eps
    named = dict(model.named_parameters())
    params = {n: named[n].detach() for n in task.params}

    def f(p, xi, ti, ei):
        pred = functional_call(model, p, (xi[None], ti[None])).sample
        if output == "loss":
            return ((pred - ei[None]) ** 2).mean()
        assert output == "square"
        return (pred ** 2).mean()

    with warnings.catch_warnings():  # no vmap batching rule for CPU attention: slow path
        warnings.simplefilter("ignore", UserWarning)
        g = vmap(grad(f), in_dims=(None, 0, 0, 0))(params, x_t, t, eps)
    flat = torch.cat([g[n].flatten(1) for n in task.params], 1).double()
    return flat.reshape(images.shape[0], task.K, -1)


@pytest.fixture(scope="module")
def setup():
    models = [tiny_unet(0), tiny_unet(1)]
    task = DiffusionTask(models[0], samples_per_example=K, timesteps="random", noise_seed=3)
    x, xt = tiny_images(N_TRAIN, 0), tiny_images(N_TEST, 1)
    cache = {}

    def grads(c, side, output):
        key = (c, side, output)
        if key not in cache:
            images, ids = (x, TRAIN_IDS) if side == "train" else (xt, TEST_IDS)
            cache[key] = _row_grads(task, models[c], images, ids, output)
        return cache[key]

    return SimpleNamespace(task=task, models=models, x=x, xt=xt, grads=grads)


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True)


def _expected(s, *, retrac: bool, projected: bool, measurement: str = "loss") -> torch.Tensor:
    """``Σ_c η_c ⟨train side, test side⟩`` written out from the explicit row gradients."""
    total = 0
    for c, eta in enumerate(RATES):
        g = s.grads(c, "train", "loss").mean(1)              # [n, p]: K-averaged
        u = s.grads(c, "test", measurement)                  # [q, K, p]: per timestep
        if projected:
            proj = Projector(k, seed=SEED, ensemble_id=c)
            g = proj.project(g.float()).double()
            u = proj.project(u.reshape(-1, u.shape[-1]).float()).double().reshape(N_TEST, K, k)
        if retrac:
            g, h = _unit(g), _unit(u).mean(1)
        else:
            h = u.mean(1)
        total = total + eta * h @ g.T
    return total


def _rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def _method(cls, s, **kw):
    kw = {"checkpoints": s.models, "learning_rates": RATES, "seed": SEED, "progress": False,
          "batch_size": 4, **kw}
    return cls(s.task, **kw)


@pytest.mark.parametrize("measurement", ["loss", "square"])
def test_tracin_exact_equals_explicit_dot_products(setup, measurement):
    method = _method(TracIn, setup, k=None, measurement=measurement).fit((setup.x, TRAIN_IDS))
    scores = method.score((setup.xt, TEST_IDS), query_chunk=2)   # two test chunks
    assert scores.shape == (N_TEST, N_TRAIN) and scores.dtype == torch.float32
    expected = _expected(setup, retrac=False, projected=False, measurement=measurement)
    assert _rel(scores, expected) < 1e-4
    # each checkpoint counts with its learning rate: swapping them changes the scores
    swapped = _method(TracIn, setup, k=None, measurement=measurement,
                      learning_rates=RATES[::-1]).fit((setup.x, TRAIN_IDS))
    assert _rel(swapped.score((setup.xt, TEST_IDS)), expected) > 1e-2


def test_self_influence_is_the_weighted_squared_norm(setup):
    # a train sample scored against itself (same id, same noise): Σ_c η_c ‖g_c‖² > 0
    method = _method(TracIn, setup, k=None).fit((setup.x, TRAIN_IDS))
    diag = method.score((setup.x, TRAIN_IDS)).diagonal()
    expected = sum(eta * setup.grads(c, "train", "loss").mean(1).pow(2).sum(1)
                   for c, eta in enumerate(RATES))
    assert bool((diag > 0).all())
    assert _rel(diag, expected) < 1e-4


@pytest.mark.parametrize("measurement", ["loss", "square"])
def test_tracin_projected_equals_the_formula(setup, measurement):
    method = _method(TracIn, setup, k=k, measurement=measurement).fit(setup.x)
    scores = method.score((setup.xt, TEST_IDS))
    expected = _expected(setup, retrac=False, projected=True, measurement=measurement)
    assert _rel(scores, expected) < 1e-4
    top = method.top_k((setup.xt, TEST_IDS), k=2)
    assert torch.equal(top.indices, scores.topk(2, dim=1).indices)


@pytest.mark.parametrize("projected", [False, True])
def test_retrac_equals_its_normalised_form(setup, projected):
    method = _method(ReTrac, setup, k=k if projected else None).fit((setup.x, TRAIN_IDS))
    scores = method.score((setup.xt, TEST_IDS))
    expected = _expected(setup, retrac=True, projected=projected)
    assert _rel(scores, expected) < 1e-4
    # the normalisation matters: not TracIn rescaled as a whole
    tracin = _expected(setup, retrac=False, projected=projected)
    ratio = scores.double() / tracin
    assert float(ratio.max() - ratio.min()) > 1e-2 * float(ratio.abs().max())
    # |score| <= Σ η (Cauchy-Schwarz on unit vectors and a mean of unit vectors)
    assert float(scores.abs().max()) <= sum(RATES) + 1e-5


def test_features_do_not_depend_on_batch_size_or_order(setup):
    x, xt = setup.x, setup.xt
    ids = torch.arange(N_TRAIN) * 7 + 1
    perm = torch.tensor([4, 1, 5, 0, 3, 2])
    for cls in (TracIn, ReTrac):
        a = _method(cls, setup, k=k, batch_size=4)
        b = _method(cls, setup, k=k, batch_size=5)
        phi_a, ids_a = a.features((x, ids), checkpoint=1)
        phi_b, ids_b = b.features((x[perm], ids[perm]), checkpoint=1)
        assert torch.equal(ids_b, ids[perm])
        assert torch.allclose(phi_b, phi_a[perm], rtol=1e-5, atol=1e-6)
        psi_a, _ = a.query_features((xt, TEST_IDS), checkpoint=1)
        psi_b, _ = b.query_features((xt[[2, 0, 1]], TEST_IDS[[2, 0, 1]]), checkpoint=1)
        assert torch.allclose(psi_b, psi_a[[2, 0, 1]], rtol=1e-5, atol=1e-6)
    # exact mode: the columns follow the fit order, whatever the batch size
    sa = _method(ReTrac, setup, k=None, batch_size=4).fit((x, ids)).score(xt)
    sb = _method(ReTrac, setup, k=None, batch_size=5).fit((x[perm], ids[perm])).score(xt)
    assert torch.allclose(sb, sa[:, perm], rtol=1e-4, atol=1e-6)
    # a one-shot iterator of batches is kept for the passes at scoring time
    batches = ((x[i:i + 2], ids[i:i + 2]) for i in range(0, N_TRAIN, 2))
    sc = _method(ReTrac, setup, k=None, batch_size=4).fit(batches).score(xt)
    assert torch.allclose(sc, sa, rtol=1e-4, atol=1e-6)


def test_store_is_read_back(setup, tmp_path, monkeypatch):
    calls = []
    for name in ("features", "grads"):
        original = getattr(DiffusionTask, name)

        def counting(self, *args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(DiffusionTask, name, counting)
    for cls, kk in ((TracIn, k), (ReTrac, k), (ReTrac, None)):
        store = tmp_path / f"{cls.name}-{kk}"
        first = _method(cls, setup, k=kk, store=store).fit(setup.x)
        assert calls  # the first fit computed the train-side state
        calls.clear()
        second = _method(cls, setup, k=kk, store=store).fit(setup.x)
        assert calls == []  # ... the second read it from the store
        assert torch.equal(second.train_ids, first.train_ids)
        assert torch.equal(second.score((setup.xt, TEST_IDS)), first.score((setup.xt, TEST_IDS)))
    with pytest.raises(StoreConfigError, match="k: store has 96, asked 64"):
        _method(TracIn, setup, k=64, store=tmp_path / f"tracin-{k}").fit(setup.x)
    # ReTrac's exact norms were written per checkpoint
    from fastattr.store import FeatureStore

    done = FeatureStore(tmp_path / "retrac-None", _method(ReTrac, setup, k=None).store_config())
    assert done.chunks("norms_0") == [0, 1] and done.chunks("norms_1") == [0, 1]


def test_bad_input(setup):
    task, x, xt = setup.task, setup.x, setup.xt
    with pytest.raises(ValueError, match="learning_rates has 1 entries but there are 2 "
                                         "checkpoints"):
        TracIn(task, checkpoints=setup.models, learning_rates=[1.0])
    with pytest.raises(ValueError, match="learning_rates must be finite floats > 0"):
        ReTrac(task, checkpoints=setup.models, learning_rates=[1.0, 0.0])
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match=r"k must be an int >= 1 \(projected gradients\) "
                                             r"or None"):
            TracIn(task, k=bad)
    with pytest.raises(ValueError, match="unknown output 'losses'"):
        TracIn(task, output="losses")
    with pytest.raises(ValueError, match="unknown measurement 'l3'"):
        ReTrac(task, measurement="l3")
    with pytest.raises(ValueError, match="checkpoints must hold at least one model"):
        TracIn(task, checkpoints=[])
    with pytest.raises(TypeError, match=r"checkpoints\[0\] must be an nn.Module"):
        TracIn(task, checkpoints=["ckpt.pt"])
    for kk in (k, None):
        with pytest.raises(RuntimeError, match="ReTrac is not fitted: call fit"):
            ReTrac(task, k=kk, progress=False).score(xt)
    exact = TracIn(task, k=None, progress=False)
    with pytest.raises(ValueError, match=r"uses exact gradients \(k=None\)"):
        exact.features(x)
    exact.fit(x)
    with pytest.raises(ValueError, match="query_chunk must be an int >= 1"):
        exact.score(xt, query_chunk=0)
    with pytest.raises(ValueError, match=r"test_data holds images of shape \(1, 9, 9\)"):
        exact.score(torch.randn(2, 1, 9, 9))
    with pytest.raises(ValueError, match="train_data holds repeated sample ids"):
        TracIn(task, k=k, progress=False).fit((x, torch.zeros(N_TRAIN, dtype=torch.long)))
