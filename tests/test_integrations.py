"""Adapters for trak and dattri: same numbers as fastattr.Projector, same shapes/dtypes/devices
as the libraries' own projectors, independent matrices per model, clear errors; and the
libraries' real pipelines driven with them (trak's TRAKer; dattri's TRAK, TracIn and DVEmb
attributors), checked against the formulas recomputed from torch.func gradients.

CI installs the libraries with ``pip install --no-deps traker==0.3.2 dattri==0.3.0`` plus
``pip install tqdm`` (trak's package import needs it); library-specific tests skip without them.
"""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import fastattr

KINDS = [("rademacher", "rademacher"), ("normal", "gaussian")]  # (library name, fastattr name)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rand(*shape, dtype=torch.float32):
    return (torch.randn(*shape) + 0.1).to(dtype)  # random, never zeros


def run_python(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=120)


def test_importing_fastattr_imports_neither_library():
    res = run_python(
        "import sys, fastattr, fastattr.integrations\n"
        "bad = [m for m in ('trak', 'dattri') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    assert res.returncode == 0, res.stderr


# --------------------------------------------------------------------------------------- trak


@pytest.fixture(scope="module")
def trak_projectors():
    return pytest.importorskip("trak.projectors", reason="pip install traker")


@pytest.fixture(scope="module")
def adapter(trak_projectors):
    from fastattr.integrations import trak as adapter

    return adapter


def test_trak_adapter_without_trak_says_how_to_install():
    res = run_python(
        "import sys\n"
        "sys.modules['trak'] = None\n"  # makes `import trak...` fail as if not installed
        "try:\n"
        "    import fastattr.integrations.trak\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
        "else:\n"
        "    raise SystemExit('no ImportError')\n"
    )
    assert res.returncode == 0, res.stderr
    assert "pip install traker" in res.stdout


@pytest.mark.parametrize("trak_kind,kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", [256, 100])
def test_trak_equals_fastattr_projector(adapter, trak_kind, kind, dtype, k):
    grads = rand(7, 1031, dtype=dtype)
    ref = fastattr.Projector(k, kind=kind, seed=5, ensemble_id=3).project(grads)

    normalized = adapter.FastattrProjector(1031, k, 5, trak_kind, "cpu", normalize=True)
    assert torch.equal(normalized.project(grads, model_id=3), ref)

    # trak's convention: entries +-1 / N(0, 1), i.e. fastattr's times sqrt(k)
    unit = adapter.FastattrProjector(1031, k, 5, trak_kind, "cpu")
    out = unit.project(grads, model_id=3)
    if k == 256:  # sqrt(k) = 16: the rescale is exact
        assert torch.equal(out, ref * 16)
    else:
        torch.testing.assert_close(out, ref * math.sqrt(k), rtol=1e-6, atol=0)


def test_trak_dict_equals_flat(adapter):
    grads = {"w": rand(4, 6, 5), "b": rand(4), "c": rand(4, 3, 2, 2)}  # 1-D like a bias
    flat = torch.cat([g.reshape(4, -1) for g in grads.values()], dim=1)
    proj = adapter.FastattrProjector(flat.shape[1], 64, 1, "rademacher", "cpu")
    torch.testing.assert_close(proj.project(grads, 0), proj.project(flat, 0), rtol=1e-6,
                               atol=1e-6)


@pytest.mark.parametrize("trak_kind", ["rademacher", "normal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_trak_output_like_basic_projector(adapter, trak_projectors, trak_kind, dtype):
    ptype = trak_projectors.ProjectionType(trak_kind)
    grads = rand(64, 2000)
    theirs = trak_projectors.BasicProjector(2000, 1024, 0, ptype, "cpu", dtype=dtype)
    ours = adapter.FastattrProjector(2000, 1024, 0, ptype, "cpu", dtype=dtype)
    for x in (grads, {"a": grads[:, :1500].reshape(64, 30, 50), "b": grads[:, 1500:]}):
        expected = theirs.project(x, model_id=0)
        got = ours.project(x, model_id=0)
        assert got.shape == expected.shape == (64, 1024)
        assert got.dtype == expected.dtype == dtype
        assert got.device == expected.device
    # same magnitudes as trak's (unnormalised) matrices: entries of R^T g ~ N(0, ||g||^2)
    ratio = ours.project(grads, 0).float().std() / theirs.project(grads, 0).float().std()
    assert 0.9 < float(ratio) < 1.1
    assert isinstance(ours, trak_projectors.AbstractProjector)
    assert ours.proj_type == ptype and ours.proj_dim == 1024 and ours.grad_dim == 2000


def test_trak_model_ids_give_independent_matrices(adapter):
    grads = rand(3, 500)
    proj = adapter.FastattrProjector(500, 128, 0, "rademacher", "cpu")
    first = proj.project(grads, model_id=0)
    second = proj.project(grads, model_id=1)
    assert not torch.allclose(first, second)
    # nearly uncorrelated: independent matrices, not a shifted or scaled copy
    corr = torch.corrcoef(torch.stack([first.flatten(), second.flatten()]))[0, 1]
    assert abs(float(corr)) < 0.2
    assert torch.equal(proj.project(grads, model_id=0), first)  # cached, deterministic
    assert sorted(proj._projectors) == [0, 1]
    proj.free_memory()
    assert not proj._projectors
    assert torch.equal(proj.project(grads, model_id=1), second)  # rebuilt identically
    other_seed = adapter.FastattrProjector(500, 128, 1, "rademacher", "cpu")
    assert not torch.allclose(other_seed.project(grads, 0), first)
    # default model id: ensemble_id (and trak's `model_id=` keyword alias)
    assert torch.equal(adapter.FastattrProjector(500, 128, 0, ensemble_id=1).project(grads), second)
    assert torch.equal(adapter.FastattrProjector(500, 128, 0, model_id=1).project(grads), second)


def test_trak_bad_inputs(adapter):
    proj = adapter.FastattrProjector(100, 32, 0, "rademacher", "cpu")
    with pytest.raises(ValueError, match="grad_dim=100"):
        proj.project(rand(2, 99), 0)
    with pytest.raises(ValueError, match="grad_dim=100"):
        proj.project({"a": rand(2, 50), "b": rand(2, 49)}, 0)
    with pytest.raises(ValueError, match="2-D"):
        proj.project(rand(2, 10, 10), 0)
    with pytest.raises(TypeError, match="grads must be"):
        proj.project("not a tensor", 0)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        proj.project(torch.ones(2, 100, dtype=torch.int32), 0)
    with pytest.raises(ValueError, match="ensemble_id"):
        proj.project(rand(2, 100), -1)
    with pytest.raises(TypeError, match="model_id must be an int"):
        proj.project(rand(2, 100), 0.5)
    with pytest.raises(ValueError, match="proj_type"):
        adapter.FastattrProjector(100, 32, 0, "sjlt", "cpu")
    with pytest.raises(ValueError, match="k must be"):
        adapter.FastattrProjector(100, 0, 0, "rademacher", "cpu")
    with pytest.raises(ValueError, match="grad_dim"):
        adapter.FastattrProjector(0, 32, 0, "rademacher", "cpu")
    with pytest.raises(ValueError, match="backend"):
        adapter.FastattrProjector(100, 32, 0, "rademacher", "cpu", backend="nope")
    with pytest.raises(ValueError, match="NaN or Inf"):
        adapter.FastattrProjector(100, 32, check_finite=True).project(
            torch.full((2, 100), float("nan")), 0)


# ---- TRAKer end to end: a tiny classifier, trak's own task, gradient computer and saver


N_CLASSES = 3


def mlp():
    return torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(),
                               torch.nn.Linear(12, N_CLASSES))


def flat_per_sample_grads(model, state, fn, xs, ys, names=None):
    """Per-sample gradients of fn(params, x, y), flattened in named_parameters order."""
    params = {name: t.detach() for name, t in state.items()}
    grads = torch.func.vmap(torch.func.grad(fn), in_dims=(None, 0, 0))(params, xs, ys)
    names = names or [name for name, _ in model.named_parameters()]
    return torch.cat([grads[name].reshape(len(xs), -1) for name in names], dim=1)


def margin_fn(model):
    """trak's ImageClassificationModelOutput, written independently: log p / (1 - p)."""

    def margin(params, x, y):
        logits = torch.func.functional_call(model, params, (x[None],))[0]
        others = logits.masked_fill(torch.arange(N_CLASSES) == y, -math.inf)
        return logits.gather(0, y[None])[0] - others.logsumexp(0)

    return margin


def rel_err(got, want) -> float:
    got, want = (torch.as_tensor(t).detach().double() for t in (got, want))
    return float((got - want).norm() / want.norm())


def test_trak_traker_end_to_end(adapter, tmp_path):
    """trak's TRAKer with the adapter as its projector: two checkpoints, batched featurizing,
    lambda_reg. What it stores is fastattr's projection of the per-sample margin gradients
    (computed here with torch.func), and its scores are trak's formula on those features."""
    traker_mod = pytest.importorskip("trak.traker")
    torch.manual_seed(0)
    model = mlp()
    ckpts = [mlp().state_dict() for _ in range(2)]
    n, m, k, seed, lam = 40, 5, 16, 7, 0.05
    x, y = torch.randn(n, 6), torch.randint(0, N_CLASSES, (n,))
    xt, yt = torch.randn(m, 6), torch.randint(0, N_CLASSES, (m,))
    p = sum(t.numel() for t in model.parameters())
    projector = adapter.FastattrProjector.for_model(model, k, seed, "rademacher", "cpu")
    assert projector.grad_dim == p

    traker = traker_mod.TRAKer(
        model=model, task="image_classification", train_set_size=n, save_dir=str(tmp_path),
        device="cpu", use_half_precision=False, logging_level=40, lambda_reg=lam,
        proj_dim=999,  # ignored: TRAKer takes proj_dim from the projector
        projector=projector,
    )
    assert traker.projector is projector and traker.proj_dim == k
    train_feats, out_to_loss = [], []
    for model_id, ckpt in enumerate(ckpts):
        traker.load_checkpoint(ckpt, model_id=model_id)
        for start in range(0, n, 16):  # 16, 16, 8
            batch = (x[start:start + 16], y[start:start + 16])
            traker.featurize(batch=batch, num_samples=len(batch[0]))
        train_feats.append(torch.as_tensor(np.array(traker.saver.current_store["grads"])))
        out_to_loss.append(torch.as_tensor(np.array(traker.saver.current_store["out_to_loss"])))
        # trak's own per-sample gradients (a dict) through FastattrProjector.project
        trak_grads = traker.gradient_computer.compute_per_sample_grad(batch=(x[:16], y[:16]))
        ours = projector.project(trak_grads, model_id=model_id) / math.sqrt(p)
        assert rel_err(train_feats[-1][:16], ours) <= 1e-6
    traker.finalize_features()
    target_feats = []
    for model_id, ckpt in enumerate(ckpts):
        traker.start_scoring_checkpoint(exp_name="q", checkpoint=ckpt, model_id=model_id,
                                        num_targets=m)
        traker.score(batch=(xt, yt), num_samples=m)
        target_feats.append(torch.as_tensor(np.array(traker.saver.current_store["q_grads"])))
    scores = torch.as_tensor(np.array(traker.finalize_scores(exp_name="q"))).double()
    assert scores.shape == (n, m)

    # independently: torch.func margin gradients -> fastattr.Projector -> trak's formula
    margin = margin_fn(model)
    total, avg_q, no_lambda = 0, 0, 0
    for model_id, ckpt in enumerate(ckpts):
        proj = fastattr.Projector(k, kind="rademacher", seed=seed, ensemble_id=model_id)

        def features(xs, ys, ckpt=ckpt, proj=proj):  # trak's projector is unnormalised
            g = flat_per_sample_grads(model, ckpt, margin, xs, ys)
            return proj.project(g).double() * math.sqrt(k) / math.sqrt(p)

        X, T = features(x, y), features(xt, yt)
        assert rel_err(train_feats[model_id], X) <= 1e-5
        assert rel_err(target_feats[model_id], T) <= 1e-5
        model.load_state_dict(ckpt)
        with torch.no_grad():
            q = 1 - torch.softmax(model(x), -1)[torch.arange(n), y].double()
        torch.testing.assert_close(out_to_loss[model_id].double().flatten(), q, rtol=1e-5,
                                   atol=1e-6)
        for reg in (lam, 0.0):
            # BasicScoreComputer: (XᵀX + λI)⁻¹ rescaled by its mean |entry|, X (.) Tᵀ
            inv = torch.linalg.inv(X.T @ X + reg * torch.eye(k, dtype=torch.float64))
            part = X @ (inv / inv.abs().mean()) @ T.T
            if reg:
                total = total + part
            else:
                no_lambda = no_lambda + part
        avg_q = avg_q + q
    # finalize_scores: mean over checkpoints of the scores times mean out_to_loss
    expected = (total / 2) * (avg_q / 2)[:, None]
    assert rel_err(scores, expected) <= 1e-4
    assert rel_err((no_lambda / 2) * (avg_q / 2)[:, None], expected) > 1e-3  # λ did matter


def test_trak_traker_grad_wrt(adapter, tmp_path):
    """TRAKer(grad_wrt=...) projects only the named parameters; for_model sizes the adapter."""
    traker_mod = pytest.importorskip("trak.traker")
    torch.manual_seed(1)
    model = mlp()
    names = ["2.weight", "2.bias"]
    x, y = torch.randn(8, 6), torch.randint(0, N_CLASSES, (8,))
    projector = adapter.FastattrProjector.for_model(model, 32, 3, "normal", grad_wrt=names)
    assert projector.grad_dim == 12 * N_CLASSES + N_CLASSES
    traker = traker_mod.TRAKer(
        model=model, task="image_classification", train_set_size=8, save_dir=str(tmp_path),
        device="cpu", use_half_precision=False, logging_level=40, grad_wrt=names,
        projector=projector,
    )
    traker.load_checkpoint(model.state_dict(), model_id=4)
    traker.featurize(batch=(x, y), num_samples=8)
    stored = torch.as_tensor(np.array(traker.saver.current_store["grads"]))
    g = flat_per_sample_grads(model, model.state_dict(), margin_fn(model), x, y, names)
    want = fastattr.Projector(32, kind="gaussian", seed=3, ensemble_id=4).project(g)
    assert rel_err(stored, want * math.sqrt(32) / math.sqrt(projector.grad_dim)) <= 1e-5


def test_trak_for_model_bad_inputs(adapter):
    model = mlp()
    with pytest.raises(ValueError, match="grad_wrt.*'nope'"):
        adapter.FastattrProjector.for_model(model, 8, grad_wrt=["0.weight", "nope"])
    with pytest.raises(TypeError, match="grad_wrt must be a list"):
        adapter.FastattrProjector.for_model(model, 8, grad_wrt="0.weight")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        adapter.FastattrProjector.for_model({"w": torch.ones(3)}, 8)
    with pytest.raises(ValueError, match="k must be"):
        adapter.FastattrProjector.for_model(model, 0)


@pytest.mark.cuda
def test_trak_on_cuda(adapter):
    grads = rand(8, 3000).cuda()
    proj = adapter.FastattrProjector(3000, 512, 0, "rademacher", "cuda", dtype=torch.float16)
    out = proj.project(grads, 1)
    assert out.device == grads.device and out.dtype == torch.float16 and out.shape == (8, 512)
    cpu = adapter.FastattrProjector(3000, 512, 0, "rademacher", "cpu").project(grads.cpu(), 1)
    torch.testing.assert_close(out.float().cpu(), cpu, rtol=1e-3, atol=1e-2)


# ------------------------------------------------------------------------------------- dattri


from fastattr.integrations.dattri import random_project  # noqa: E402  (needs no dattri)


@pytest.fixture(scope="module")
def dattri_projection():
    return pytest.importorskip("dattri.func.projection", reason="pip install dattri")


def test_dattri_adapter_works_without_dattri():
    res = run_python(
        "import sys, torch\n"
        "sys.modules['dattri'] = None\n"
        "from fastattr.integrations.dattri import random_project\n"
        "g = torch.randn(3, 40)\n"
        "print(tuple(random_project(g, 3, 16, 8, 0, 'rademacher')(g, 2).shape))\n"
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "(3, 16)"


@pytest.mark.parametrize("dattri_kind,kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dattri_equals_fastattr_projector(dattri_kind, kind, dtype):
    feats = rand(6, 777, dtype=dtype)
    project = random_project(feats, 6, 300, 32, 9, dattri_kind)
    ref = fastattr.Projector(300, kind=kind, seed=9, ensemble_id=4).project(feats)
    out = project(feats, 4)
    assert out.dtype == dtype  # dattri 0.3: the feature's dtype
    # the input is read as it is and accumulated in fp32; only the result is rounded
    assert torch.equal(out, ref.to(dtype))
    assert torch.equal(random_project(feats, 6, 300, 32, 9, kind=kind)(feats, 4), out)


def test_dattri_never_downcasts_fp32_input():
    feats = rand(5, 513)
    ref = fastattr.Projector(64, kind="gaussian", seed=0).project(feats)
    assert torch.equal(random_project(feats, 5, 64)(feats), ref)  # default: normal, fp32
    assert torch.equal(random_project(feats, 5, 64, use_half_precision=False)(feats), ref)
    half = random_project(feats, 5, 64, use_half_precision=True)(feats)
    assert half.dtype == torch.bfloat16
    assert torch.equal(half, ref.to(torch.bfloat16))  # one rounding of the fp32 result


def test_dattri_dict_equals_flat():
    feats = {"conv.weight": rand(4, 3, 2, 5), "conv.bias": rand(4, 3), "fc.bias": rand(4)}
    flat = torch.cat([t.reshape(4, -1) for t in feats.values()], dim=1)
    project = random_project(feats, 4, 50, 8, 2, "rademacher")
    assert project.feature_dim == flat.shape[1]
    torch.testing.assert_close(project(feats, 1), project(flat, 1), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dattri_kind", ["rademacher", "normal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dattri_output_like_dattri(dattri_projection, dattri_kind, dtype):
    feats = rand(32, 1200, dtype=dtype)
    layers = {"a": feats[:, :1000].reshape(32, 10, 100), "b": feats[:, 1000:]}
    for example in (feats, layers):
        theirs = dattri_projection.random_project(example, 32, 1024, 32, 0, dattri_kind)
        ours = random_project(example, 32, 1024, 32, 0, dattri_kind)
        for x in (feats, layers, feats[:5]):
            if isinstance(x, torch.Tensor) and x.shape[0] == 5:
                expected, got = theirs(x, 1), ours(x, 1)
            else:
                expected, got = theirs(x), ours(x)
            assert got.shape == expected.shape
            assert got.dtype == expected.dtype
            assert got.device == expected.device
        # the same JL scale as dattri 0.3 (both divide by sqrt(proj_dim))
        ratio = ours(feats).double().std() / theirs(feats).double().std()
        assert 0.9 < float(ratio) < 1.1


def test_dattri_accepts_dattri_projection_type(dattri_projection):
    feats = rand(3, 90)
    ptype = dattri_projection.ProjectionType.rademacher
    assert torch.equal(random_project(feats, 3, 32, 8, 0, ptype)(feats),
                       random_project(feats, 3, 32, 8, 0, "rademacher")(feats))


def test_dattri_ensemble_ids_give_independent_matrices():
    feats = rand(3, 400)
    project = random_project(feats, 3, 128, 8, 0, "rademacher")
    first, second = project(feats, 0), project(feats, 1)
    corr = torch.corrcoef(torch.stack([first.flatten(), second.flatten()]))[0, 1]
    assert abs(float(corr)) < 0.2
    assert torch.equal(project(feats), first)  # ensemble_id defaults to 0
    assert not torch.allclose(random_project(feats, 3, 128, 8, 1, "rademacher")(feats), first)


def test_dattri_bad_inputs():
    feats = rand(4, 100)
    project = random_project(feats, 4, 32, 8, 0, "rademacher")
    with pytest.raises(ValueError, match="feature_dim=100|\\[batch, 100\\]"):
        project(rand(4, 99))
    with pytest.raises(ValueError, match="feature_dim=100"):
        project({"a": rand(4, 60), "b": rand(4, 41)})
    with pytest.raises(TypeError, match="feature must be"):
        project([feats])
    with pytest.raises(ValueError, match="ensemble_id"):
        project(feats, -1)
    with pytest.raises(ValueError, match="dattri-only"):
        random_project(feats, 4, 32, 8, 0, "sjlt")
    with pytest.raises(ValueError, match="dattri-only"):
        random_project(feats, 4, 32, 8, 0, "grass_4")
    with pytest.raises(TypeError, match="pass device= by keyword"):
        random_project(feats, 4, 32, 8, "cpu")  # dattri <= 0.2 argument order
    with pytest.raises(ValueError, match="not a multiple"):
        random_project(feats, 3, 32, 8)
    with pytest.raises(ValueError, match="disagree"):
        random_project(feats, 4, 32, 8, 0, "normal", kind="rademacher")
    with pytest.raises(TypeError, match="floating"):
        random_project(torch.ones(4, 10, dtype=torch.int64), 4, 32, 8)
    with pytest.raises(ValueError, match="k must be"):
        random_project(feats, 4, 0, 8)
    with pytest.raises(ValueError, match="backend"):
        random_project(feats, 4, 32, 8, backend="nope")


# ---- dattri's attributors driven with fastattr's projection


def ce_loss_fn(model):
    """A per-sample loss in dattri's task convention: f(params, (x, y)) on one sample."""

    def loss(params, data):
        x, y = data
        logits = torch.func.functional_call(model, params, (x[None],))
        return torch.nn.functional.cross_entropy(logits, y[None])

    return loss


def flat_loss_grads(model, state, xs, ys):
    loss = ce_loss_fn(model)
    return flat_per_sample_grads(model, state, lambda prm, x, y: loss(prm, (x, y)), xs, ys)


@pytest.fixture
def dattri_setup(dattri_projection, monkeypatch):
    trak_mod = pytest.importorskip("dattri.algorithm.trak")
    tracin_mod = pytest.importorskip("dattri.algorithm.tracin")
    from dattri.task import AttributionTask

    # dattri's attributors update their module's DEFAULT_PROJECTOR_KWARGS dict in place;
    # give each test a private copy so no projector_kwargs leak into other tests.
    for mod in (trak_mod, tracin_mod):
        monkeypatch.setattr(mod, "DEFAULT_PROJECTOR_KWARGS", dict(mod.DEFAULT_PROJECTOR_KWARGS))
    torch.manual_seed(2)
    model = mlp()
    ckpts = [mlp().state_dict() for _ in range(2)]
    task = AttributionTask(loss_func=ce_loss_fn(model), model=model, checkpoints=ckpts)
    data = (torch.randn(40, 6), torch.randint(0, N_CLASSES, (40,)),
            torch.randn(5, 6), torch.randint(0, N_CLASSES, (5,)))
    return trak_mod, tracin_mod, model, ckpts, task, data


def loaders(data):
    from torch.utils.data import DataLoader, TensorDataset

    x, y, xt, yt = data
    return (DataLoader(TensorDataset(x, y), batch_size=16),
            DataLoader(TensorDataset(xt, yt), batch_size=4))


def test_dattri_trak_attributor_with_fastattr_projection(dattri_setup):
    """dattri's TRAKAttributor (cache + attribute, two checkpoints, regularization) inside
    use_fastattr_projection equals dattri's TRAK formula on fastattr's projection of the
    per-sample loss gradients."""
    from fastattr.integrations.dattri import use_fastattr_projection

    trak_mod, _, model, ckpts, task, (x, y, xt, yt) = dattri_setup
    k, seed, lam = 16, 3, 0.05
    n, p = len(x), sum(t.numel() for t in model.parameters())

    def correct_probability(params, data):
        return torch.exp(-ce_loss_fn(model)(params, data))

    kwargs = {"proj_dim": k, "proj_seed": seed, "proj_max_batch_size": 32, "device": "cpu"}
    original = trak_mod.random_project

    def run():
        attributor = trak_mod.TRAKAttributor(task, correct_probability, projector_kwargs=kwargs,
                                             regularization=lam)
        train, test = loaders((x, y, xt, yt))
        attributor.cache(train)
        return attributor.attribute(test).double()

    with use_fastattr_projection() as modules:
        assert trak_mod in modules and trak_mod.random_project is not original
        scores = run()
    assert trak_mod.random_project is original  # restored

    total, avg_q = 0, 0
    for ckpt_idx, ckpt in enumerate(ckpts):
        proj = fastattr.Projector(k, kind="gaussian", seed=seed, ensemble_id=ckpt_idx)
        X = proj.project(flat_loss_grads(model, ckpt, x, y) / math.sqrt(p)).double()
        T = proj.project(flat_loss_grads(model, ckpt, xt, yt) / math.sqrt(p)).double()
        total = total + T @ torch.linalg.solve(X.T @ X + lam * torch.eye(k, dtype=X.dtype), X.T)
        model.load_state_dict(ckpt)
        with torch.no_grad():
            avg_q = avg_q + 1 - torch.softmax(model(x), -1)[torch.arange(n), y].double()
    expected = ((total / 2) * (avg_q / 2)[None]).T
    assert scores.shape == (n, len(xt))
    assert rel_err(scores, expected) <= 1e-4
    # outside the block dattri projects with its own matrices: other numbers
    assert rel_err(run(), expected) > 1e-2


def test_dattri_tracin_attributor_with_fastattr_projection(dattri_setup):
    """TracInAttributor's projector_kwargs (rademacher here) reach fastattr's projection."""
    from fastattr.integrations.dattri import use_fastattr_projection

    _, tracin_mod, model, ckpts, task, (x, y, xt, yt) = dattri_setup
    weights = torch.tensor([0.5, 2.0])
    attributor = tracin_mod.TracInAttributor(
        task, weights, normalized_grad=False,
        projector_kwargs={"proj_dim": 24, "proj_seed": 9, "proj_type": "rademacher",
                          "proj_max_batch_size": 32, "device": "cpu"})
    train, test = loaders((x, y, xt, yt))
    with use_fastattr_projection(["dattri.algorithm.tracin"], backend="cpu"):
        scores = attributor.attribute(train, test).double()
    expected = 0
    for ckpt_idx, (ckpt, w) in enumerate(zip(ckpts, weights)):
        proj = fastattr.Projector(24, kind="rademacher", seed=9, ensemble_id=ckpt_idx)
        X = proj.project(flat_loss_grads(model, ckpt, x, y)).double()
        T = proj.project(flat_loss_grads(model, ckpt, xt, yt)).double()
        expected = expected + float(w) * X @ T.T
    assert rel_err(scores, expected) <= 1e-4


def test_dattri_dvemb_projector_attribute_hook(dattri_projection):
    """DVEmbAttributor uses an assigned `projector` as it is: no rebinding needed."""
    dvemb = pytest.importorskip("dattri.algorithm.dvemb")
    from dattri.task import AttributionTask
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(3)
    model = mlp()
    task = AttributionTask(loss_func=ce_loss_fn(model), model=model,
                           checkpoints=model.state_dict())
    x, y, xt, yt = torch.randn(16, 6), torch.randint(0, 3, (16,)), torch.randn(4, 6), \
        torch.randint(0, 3, (4,))
    p = sum(t.numel() for t in model.parameters())
    attributor = dvemb.DVEmbAttributor(task, proj_dim=20, proj_seed=5)
    project = random_project(torch.zeros(8, p), 8, 20, 32, 5, "rademacher")
    attributor.projector = project
    for start in (0, 8):
        attributor.cache_gradients(0, (x[start:start + 8], y[start:start + 8]),
                                   torch.arange(start, start + 8), learning_rate=0.1)
    proj = fastattr.Projector(20, kind="rademacher", seed=5)
    want = proj.project(flat_loss_grads(model, model.state_dict(), x, y))
    got = torch.cat(attributor.cached_gradients[0])
    assert rel_err(got, want) <= 1e-5
    attributor.cache()
    scores = attributor.attribute(DataLoader(TensorDataset(xt, yt), batch_size=4))
    assert attributor.projector is project
    test_feats = proj.project(flat_loss_grads(model, model.state_dict(), xt, yt))
    assert rel_err(scores, attributor.embeddings[0] @ test_feats.T) <= 1e-5


def test_use_fastattr_projection_dispatch_and_restore(dattri_projection):
    from fastattr.integrations.dattri import use_fastattr_projection

    trak_mod = pytest.importorskip("dattri.algorithm.trak")
    original = trak_mod.random_project
    feats = rand(6, 50)
    with use_fastattr_projection("dattri.algorithm.trak"):
        patched = trak_mod.random_project
        # dense kinds: fastattr's numbers, dattri's device default ("cpu") and dtype rule
        out = patched(feats, 6, 16, 32, 1, "rademacher")(feats, ensemble_id=2)
        ref = fastattr.Projector(16, kind="rademacher", seed=1, ensemble_id=2).project(feats)
        assert torch.equal(out, ref)
        # dattri-only kinds go to dattri's own function
        ident = patched(feats, 6, 50, 32, 0, "identity")(feats)
        assert torch.equal(ident, dattri_projection.random_project(
            feats, 6, 50, 32, 0, "identity")(feats))
        with use_fastattr_projection(trak_mod):  # nested: restores to the outer one
            assert trak_mod.random_project is not patched
        assert trak_mod.random_project is patched
    assert trak_mod.random_project is original
    with pytest.raises(RuntimeError, match="boom"):
        with use_fastattr_projection():
            raise RuntimeError("boom")
    assert trak_mod.random_project is original
    with pytest.raises(ValueError, match="modules: fastattr has no random_project"):
        with use_fastattr_projection([fastattr]):
            pass
    with pytest.raises(TypeError, match="modules must be"):
        with use_fastattr_projection([3]):
            pass
    with pytest.raises(ValueError, match="backend"):
        with use_fastattr_projection(backend="nope"):
            pass
    assert trak_mod.random_project is original


def test_use_fastattr_projection_without_dattri_says_how_to_install():
    res = run_python(
        "import sys\n"
        "sys.modules['dattri'] = None\n"
        "from fastattr.integrations.dattri import use_fastattr_projection\n"
        "try:\n"
        "    with use_fastattr_projection():\n"
        "        pass\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
        "else:\n"
        "    raise SystemExit('no ImportError')\n"
    )
    assert res.returncode == 0, res.stderr
    assert "pip install dattri" in res.stdout


@pytest.mark.cuda
def test_dattri_on_cuda():
    feats = rand(8, 3000)
    project = random_project(feats, 8, 512, 32, 0, "rademacher", device="cuda")
    out = project(feats)  # moved to the projector's device, as dattri does
    assert out.device.type == "cuda" and out.dtype == torch.float32
    torch.testing.assert_close(out.cpu(), project.projector(0).project(feats), rtol=1e-4,
                               atol=1e-4)
