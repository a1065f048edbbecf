"""The diffusion-loss protocol: timesteps and noise are functions of (seed, id, t), never of
the batch; DiffusionLoss builds x_t as DDPM does."""

from __future__ import annotations

import pytest
import torch

from fastattr import rng
from fastattr.diffusion import DiffusionLoss, ddpm_alphas_cumprod, noise, timesteps


def test_timesteps_are_keyed_by_id():
    ids = torch.tensor([5, 9, 2**40 + 3])
    t = timesteps(ids, K=6, T=1000, kind="random", seed=7)
    assert t.shape == (3, 6) and int(t.min()) >= 0 and int(t.max()) < 1000
    # the same id in another batch, at another position, gets the same draws
    assert torch.equal(timesteps(torch.tensor([2**40 + 3, 5]), 6, 1000, "random", 7), t[[2, 0]])
    assert not torch.equal(timesteps(ids, 6, 1000, "random", 8), t)
    # uniform: the D-TRAK grid
    assert timesteps(ids[:1], 4, 1000, "uniform").tolist() == [[0, 250, 500, 750]]


def test_noise_is_keyed_by_id_and_t_and_is_the_philox_matrix():
    ids, t = torch.tensor([3, 4, 3]), torch.tensor([10, 10, 11])
    eps = noise(ids, t, (2, 3), T=1000, seed=1)
    assert eps.shape == (3, 2, 3)
    expected = rng.matrix_rows(ids * 1000 + t, 6, "gaussian", rng.philox_key(1),
                               rng.Stream.NOISE, scale=1.0).reshape(3, 2, 3)
    assert torch.allclose(eps, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(eps[0], eps[2])  # same id, another t
    assert torch.equal(noise(ids[1:2], t[1:2], (2, 3), 1000, 1), eps[1:2])
    big = noise(torch.arange(400), torch.zeros(400, dtype=torch.long), (64,), 1000)
    assert abs(float(big.mean())) < 0.02 and abs(float(big.std()) - 1) < 0.02


def test_diffusion_loss_rows():
    class Echo(torch.nn.Module):
        def forward(self, x, t, class_labels=None):
            self.seen = (x, t, class_labels)
            return x * 2

    model = Echo()
    x0 = torch.randn(2, 1, 4, 4)
    loss = DiffusionLoss(timesteps="uniform", noise_seed=3)
    rows = loss(model, (x0, torch.tensor([7, 8]), torch.tensor([1, 0])), 2)
    x_t, t, labels = model.seen
    assert t.tolist() == [0, 500, 0, 500] and labels.tolist() == [1, 1, 0, 0]
    assert rows.ids.tolist() == [14, 15, 16, 17]
    abar = ddpm_alphas_cumprod()[t].float().view(-1, 1, 1, 1)
    expected = abar.sqrt() * x0.repeat_interleave(2, 0) + (1 - abar).sqrt() * rows.targets
    assert torch.allclose(x_t, expected, atol=1e-6)
    assert torch.equal(rows.outputs, 2 * x_t)
    assert torch.equal(rows.targets, noise(torch.tensor([7, 7, 8, 8]), t, (1, 4, 4), 1000, 3))


def test_bad_input():
    with pytest.raises(ValueError, match="kind must be one of"):
        timesteps(torch.arange(2), 3, 1000, kind="linear")
    with pytest.raises(TypeError, match="ids must be a 1-D integer tensor"):
        timesteps(torch.randn(3), 3, 1000)
    with pytest.raises(ValueError, match="ids must be >= 0"):
        noise(torch.tensor([-1]), torch.tensor([0]), (2,), 1000)
    with pytest.raises(ValueError, match="t must be < T=1000"):
        noise(torch.tensor([1]), torch.tensor([1000]), (2,), 1000)
    with pytest.raises(ValueError, match="timesteps must be one of"):
        DiffusionLoss(timesteps="grid")
    with pytest.raises(TypeError, match="a DiffusionLoss batch is"):
        DiffusionLoss()(None, torch.randn(2, 1, 4, 4), 1)
    with pytest.raises(ValueError, match="images has 2 rows but ids has 3"):
        DiffusionLoss()(None, (torch.randn(2, 1, 4, 4), torch.arange(3)), 1)


# ------------------------------------------------------------------ DiffusionTask and outputs


def test_output_functions_match_their_definitions():
    from fastattr.diffusion import OUTPUTS, elbo_weights, output_values

    pred, eps = torch.randn(5, 1, 3, 3), torch.randn(5, 1, 3, 3)
    t = torch.tensor([0, 10, 500, 998, 999])
    p, e = pred.flatten(1), eps.flatten(1)
    expected = {
        "loss": ((p - e) ** 2).mean(1), "square": (p ** 2).mean(1), "mean": p.mean(1),
        "l1": p.abs().sum(1), "l2": torch.linalg.vector_norm(p, dim=1),
        "linf": p.abs().max(1).values,
    }
    abar = ddpm_alphas_cumprod()
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)  # DDPM's linear schedule
    w = betas / (2 * (1 - betas) * (1 - abar))
    assert torch.allclose(elbo_weights(abar), w, rtol=1e-9)
    expected["elbo"] = w[t].float() * expected["loss"]
    assert set(expected) == set(OUTPUTS)
    for name, value in expected.items():
        assert torch.allclose(output_values(name, pred, eps, t), value, rtol=1e-5), name
    custom = output_values(lambda pr, tg, tt: pr.flatten(1)[:, 0] * tt, pred, eps, t)
    assert torch.equal(custom, p[:, 0] * t)


def test_task_schedule_and_checks():
    from diffusers import DDIMScheduler, DDPMScheduler

    from fastattr.diffusion import DiffusionTask

    model = torch.nn.Conv2d(1, 1, 3, padding=1)
    sched = DDPMScheduler(num_train_timesteps=200, beta_schedule="squaredcos_cap_v2")
    task = DiffusionTask(model, scheduler=sched, model_fn=lambda m, x, t: m(x),
                         sample_shape=(1, 4, 4), samples_per_example=3)
    assert task.T == 200
    assert torch.allclose(task.alphas_cumprod, sched.alphas_cumprod.double())
    assert task.values((torch.randn(2, 1, 4, 4), torch.tensor([4, 5]))).shape == (2, 3)
    with pytest.raises(ValueError, match="prediction_type is 'v_prediction'"):
        DiffusionTask(model, scheduler=DDIMScheduler(prediction_type="v_prediction"))
    with pytest.raises(ValueError, match="give scheduler or alphas_cumprod, not both"):
        DiffusionTask(model, scheduler=sched, alphas_cumprod=sched.alphas_cumprod)
    with pytest.raises(ValueError, match="samples_per_example must be an int >= 1"):
        DiffusionTask(model, samples_per_example=0)
    with pytest.raises(ValueError, match=r"data holds images of shape \(1, 5, 5\) but the model "
                                         r"takes \(1, 4, 4\)"):
        task.values((torch.randn(2, 1, 5, 5), torch.tensor([4, 5])))
    with pytest.raises(ValueError, match="condition 'class_labels' must be a Tensor with one "
                                         "entry per image"):
        task.values((torch.randn(2, 1, 4, 4), torch.tensor([4, 5]), torch.tensor([1])))
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        DiffusionTask(lambda x: x)
