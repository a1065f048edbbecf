"""Adapters for trak and dattri: same numbers as fastattr.Projector, same shapes/dtypes/devices
as the libraries' own projectors, independent matrices per model, clear errors.

CI installs the libraries with ``pip install --no-deps traker==0.3.2 dattri==0.3.0`` plus
``pip install tqdm`` (trak's package import needs it); library-specific tests skip without them.
"""

import math
import os
import subprocess
import sys

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


def test_trak_traker_end_to_end(adapter, tmp_path):
    """TRAKer runs with the adapter as its projector (featurize, finalize, score)."""
    traker_mod = pytest.importorskip("trak.traker")
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    n_params = sum(p.numel() for p in model.parameters())
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    traker = traker_mod.TRAKer(
        model=model, task="image_classification", train_set_size=16, save_dir=str(tmp_path),
        device="cpu", use_half_precision=False, logging_level=40,
        projector=adapter.FastattrProjector(n_params, 64, 0, "rademacher", "cpu"),
    )
    traker.load_checkpoint(model.state_dict(), model_id=0)
    for start in range(0, 16, 8):
        traker.featurize(batch=(x[start:start + 8], y[start:start + 8]), num_samples=8)
    traker.finalize_features()
    traker.start_scoring_checkpoint(exp_name="q", checkpoint=model.state_dict(), model_id=0,
                                    num_targets=4)
    traker.score(batch=(x[:4], y[:4]), num_samples=4)
    scores = torch.as_tensor(traker.finalize_scores(exp_name="q"))
    assert scores.shape == (16, 4)
    assert bool(torch.isfinite(scores).all()) and bool(scores.abs().sum() > 0)


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


@pytest.mark.cuda
def test_dattri_on_cuda():
    feats = rand(8, 3000)
    project = random_project(feats, 8, 512, 32, 0, "rademacher", device="cuda")
    out = project(feats)  # moved to the projector's device, as dattri does
    assert out.device.type == "cuda" and out.dtype == torch.float32
    torch.testing.assert_close(out.cpu(), project.projector(0).project(feats), rtol=1e-4,
                               atol=1e-4)
