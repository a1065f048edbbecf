"""TRAK / D-TRAK on a small diffusers UNet with attention: the scores equal the formula of
shared/METHODS.md computed by hand (explicit per-row autograd gradients, the materialised
projection, a float64 solve); features do not depend on batch size or order; the store
resumes an interrupted fit; bad input is refused clearly."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from _models import explicit_grads, tiny_images, tiny_unet
from fastattr import Projector
from fastattr.diffusion import DiffusionTask
from fastattr.methods import DTRAK, TRAK

N_TRAIN, N_TEST, K, k = 6, 3, 2, 96
TEST_IDS = torch.arange(100, 100 + N_TEST)


def _formula(phi_train: torch.Tensor, phi_test: torch.Tensor, lam=None) -> torch.Tensor:
    phi, psi = phi_train.double(), phi_test.double()
    gram = phi.T @ phi
    if lam is None:
        lam = 0.1 * float(torch.linalg.eigvalsh(gram).mean())
    return psi @ torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype),
                                    phi.T)


def _rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.fixture(scope="module")
def setup():
    model = tiny_unet(0)
    task = DiffusionTask(model, samples_per_example=K, timesteps="random", noise_seed=3)
    return task, tiny_images(N_TRAIN, 0), tiny_images(N_TEST, 1)


@pytest.mark.parametrize("cls,output", [(DTRAK, "square"), (TRAK, "loss")])
def test_scores_equal_the_formula(setup, cls, output):
    task, x, xt = setup
    method = cls(task, k=k, seed=5, progress=False, batch_size=4).fit(x)
    scores = method.score((xt, TEST_IDS))
    assert scores.shape == (N_TEST, N_TRAIN) and method.output == output
    proj = Projector(k, seed=5)
    g_train = explicit_grads(task, x, torch.arange(N_TRAIN), output)
    g_test = explicit_grads(task, xt, TEST_IDS, output)
    expected = _formula(proj.project(g_train.float()), proj.project(g_test.float()))
    assert _rel(scores, expected) < 1e-4
    # an absolute λ, and top_k agrees with the scores
    s2 = method.score((xt, TEST_IDS), lam=3.0)
    assert _rel(s2, _formula(proj.project(g_train.float()), proj.project(g_test.float()), 3.0)) < 1e-4
    top = method.top_k((xt, TEST_IDS), k=2, lam=3.0)
    assert torch.equal(top.indices, s2.topk(2, dim=1).indices)
    assert torch.equal(top.ids, method.train_ids[top.indices])


def test_ensemble_is_the_mean_over_members(setup):
    task, x, xt = setup
    other = tiny_unet(1)
    method = DTRAK(task, k=k, models=[task.model, other], progress=False).fit(x)
    scores = method.score((xt, TEST_IDS), lam=2.0)
    expected = 0
    for e, m in enumerate([task.model, other]):
        proj = Projector(k, seed=0, ensemble_id=e)
        g_train = explicit_grads(task, x, torch.arange(N_TRAIN), "square", model=m)
        g_test = explicit_grads(task, xt, TEST_IDS, "square", model=m)
        expected = expected + _formula(proj.project(g_train.float()), proj.project(g_test.float()),
                                       2.0) / 2
    assert _rel(scores, expected) < 1e-4


def test_features_do_not_depend_on_batch_size_or_order(setup):
    task, x, xt = setup
    ids = torch.arange(N_TRAIN) * 7 + 1
    a = DTRAK(task, k=k, batch_size=4, progress=False)
    phi_a, ids_a = a.features((x, ids))
    perm = torch.tensor([4, 1, 5, 0, 3, 2])
    b = DTRAK(task, k=k, batch_size=5, progress=False)
    phi_b, ids_b = b.features((x[perm], ids[perm]))
    assert torch.equal(ids_b, ids[perm])
    assert torch.allclose(phi_b, phi_a[perm], rtol=1e-5, atol=1e-6)
    # and the scores' columns follow the fit order
    sa = a.fit((x, ids)).score(xt)
    sb = b.fit((x[perm], ids[perm])).score(xt)
    assert torch.allclose(sb, sa[:, perm], rtol=1e-4, atol=1e-6)


def test_sweep_lambda_equals_score(setup):
    task, x, xt = setup
    method = TRAK(task, k=k, progress=False).fit(x)
    grid = method.sweep_lambda(xt, [0.5, 5.0])
    assert grid.shape == (2, N_TEST, N_TRAIN)
    for i, lam in enumerate([0.5, 5.0]):
        assert torch.allclose(grid[i], method.score(xt, lam=lam), rtol=1e-5, atol=1e-7)
    assert not torch.allclose(grid[0], grid[1])


_KILLED_FIT = """
import os, sys, torch
sys.path.insert(0, {tests!r})
from _models import tiny_images, tiny_unet
from fastattr.diffusion import DiffusionTask
from fastattr.methods import DTRAK
task = DiffusionTask(tiny_unet(0), samples_per_example={K}, timesteps="random", noise_seed=3)
calls = [0]
features = task.features
def dying(*args, **kwargs):
    calls[0] += 1
    if calls[0] == 3:   # the process dies while computing the third chunk
        os._exit(17)
    return features(*args, **kwargs)
task.features = dying
DTRAK(task, k={k}, batch_size=2, store={store!r}, progress=False).fit(tiny_images({n}, 0))
"""


def test_store_resumes_an_interrupted_fit(setup, tmp_path):
    task, x, xt = setup
    store = tmp_path / "store"
    script = _KILLED_FIT.format(tests=os.path.dirname(__file__), K=K, k=k, store=str(store),
                                n=N_TRAIN)
    # the child imports the very fastattr this process runs (an installed build or the source
    # tree with its compiled extension), not whatever its working directory would put first
    import fastattr

    package_root = os.path.dirname(os.path.dirname(os.path.abspath(fastattr.__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([package_root,
                                                        os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env,
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 17, res.stderr
    from fastattr.store import FeatureStore

    done = FeatureStore(store, DTRAK(task, k=k, batch_size=2, progress=False).store_config())
    assert done.chunks("features_0") == [0, 1]  # the dead run's third chunk never appears
    calls = []
    resumed = DTRAK(task, k=k, batch_size=2, store=store, progress=False)
    features = task.features

    def counting(*args, **kwargs):
        calls.append(1)
        return features(*args, **kwargs)

    task.features = counting
    try:
        resumed.fit(x)
    finally:
        del task.features
    assert len(calls) == 1  # only the missing chunk was computed
    fresh = DTRAK(task, k=k, batch_size=2, progress=False).fit(x)
    assert torch.equal(resumed.score(xt), fresh.score(xt))
    # another configuration is refused with what differs
    with pytest.raises(ValueError, match="k: store has 96, asked 64"):
        DTRAK(task, k=64, batch_size=2, store=store, progress=False).fit(x)


def test_bad_input(setup):
    task, x, xt = setup
    with pytest.raises(RuntimeError, match="call fit"):
        DTRAK(task, k=k, progress=False).score(xt)
    method = DTRAK(task, k=k, progress=False).fit(x)
    with pytest.raises(ValueError, match=r"test_data holds images of shape \(1, 9, 9\) but the "
                                         r"model takes \(1, 8, 8\)"):
        method.score(torch.randn(2, 1, 9, 9))
    for lam in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="lam must be a finite float > 0"):
            method.score(xt, lam=lam)
        with pytest.raises(ValueError, match="lam must be a finite float > 0"):
            DTRAK(task, lam=lam)
    with pytest.raises(ValueError, match="lam must be a finite float > 0"):
        method.sweep_lambda(xt, [1.0, 0.0])
    with pytest.raises(ValueError, match="unknown output 'squares'"):
        DTRAK(task, output="squares")
    with pytest.raises(ValueError, match="unknown output 'l3'"):
        DiffusionTask(task.model, output="l3")
    with pytest.raises(TypeError, match="task must be a fastattr.diffusion.DiffusionTask"):
        TRAK(task.model)
    with pytest.raises(ValueError, match="train_data holds repeated sample ids"):
        DTRAK(task, k=k, progress=False).fit((x, torch.zeros(N_TRAIN, dtype=torch.long)))
    with pytest.raises(ValueError, match="k must be"):
        DTRAK(task, k=0)


def test_lora_parameters_are_attributed(setup):
    peft = pytest.importorskip("peft")
    _, x, xt = setup
    model = tiny_unet(2)
    config = peft.LoraConfig(r=2, lora_alpha=4, init_lora_weights=False,
                             target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1"])
    model = peft.inject_adapter_in_model(config, model)
    task = DiffusionTask(model, samples_per_example=K, params="lora")
    assert task.params and all("lora_" in n for n in task.params)
    method = DTRAK(task, k=k, progress=False).fit(x)
    proj = Projector(k)
    expected = _formula(proj.project(explicit_grads(task, x, torch.arange(N_TRAIN), "square").float()),
                        proj.project(explicit_grads(task, xt, TEST_IDS, "square").float()))
    assert _rel(method.score((xt, TEST_IDS)), expected) < 1e-4
    with pytest.raises(ValueError, match="no LoRA parameters"):
        DiffusionTask(tiny_unet(0), params="lora")


def test_conditions_are_passed_through(setup):
    from diffusers import UNet2DConditionModel, UNet2DModel

    _, x, xt = setup
    torch.manual_seed(0)
    text = UNet2DConditionModel(sample_size=8, in_channels=1, out_channels=1,
                                block_out_channels=(8, 16), layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                cross_attention_dim=6, norm_num_groups=4,
                                attention_head_dim=2).eval()
    classes = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                          layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                          up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
                          num_class_embeds=3).eval()
    ids = torch.arange(4)
    for model, cond, key in ((text, torch.randn(4, 5, 6), "encoder_hidden_states"),
                             (classes, torch.tensor([0, 2, 1, 2]), "class_labels")):
        task = DiffusionTask(model, samples_per_example=2)
        proj = Projector(k)
        phi = task.features((x[:4], ids, cond), proj, output="loss")
        expected = proj.project(explicit_grads(task, x[:4], ids, "loss", cond={key: cond}).float())
        assert _rel(phi, expected) < 1e-4
        other = task.features((x[:4], ids, cond.flip(0)), proj, output="loss")
        assert not torch.allclose(other, phi)  # the condition reaches the model
