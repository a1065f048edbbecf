"""Journey-TRAK: DDIM sampling equals diffusers' DDIMScheduler; per-step scores equal TRAK's
formula on the gradient of the loss at each step's x̂_0 re-noised to that step."""

from __future__ import annotations

import pytest
import torch

from _models import tiny_images, tiny_unet
from fastattr import Projector
from fastattr.diffusion import DiffusionTask, noise
from fastattr.methods import JourneyTRAK


@pytest.fixture(scope="module")
def task():
    return DiffusionTask(tiny_unet(0), samples_per_example=2)


def test_sampling_equals_diffusers_ddim(task):
    from diffusers import DDIMScheduler

    traj = task.sample(3, num_steps=6, seed=4)
    sched = DDIMScheduler(num_train_timesteps=1000, set_alpha_to_one=True, steps_offset=0,
                          timestep_spacing="leading", clip_sample=False)
    sched.set_timesteps(6)
    assert torch.equal(traj.steps, sched.timesteps)
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            assert torch.allclose(traj.latents[:, i], x, atol=1e-5)
            out = sched.step(task.model(x, t).sample, t, x, eta=0.0)
            assert torch.allclose(traj.x0_hat[:, i], out.pred_original_sample, atol=1e-4)
            x = out.prev_sample
    assert torch.allclose(traj.images, x, atol=1e-4)


def test_per_step_scores_equal_the_formula(task):
    x = tiny_images(5)
    journey = JourneyTRAK(task, k=64, lam=0.5, progress=False).fit(x)
    traj = task.sample(2, num_steps=4, seed=1)
    scores = journey.score_trajectory(traj, steps=[0, 3])
    assert scores.shape == (2, 2, 5)
    proj = Projector(64)
    params = [p for n, p in task.model.named_parameters() if n in task.params]
    phi_train = journey.features(x)[0].double()
    gram = phi_train.T @ phi_train + 0.5 * torch.eye(64, dtype=torch.float64)
    abar = task.alphas_cumprod
    for j, s in enumerate([0, 3]):
        t = traj.steps[s:s + 1]
        rows = []
        for b in range(2):
            eps = noise(traj.ids[b:b + 1], t, (1, 8, 8), 1000)
            a = abar[t].float().reshape(1, 1, 1, 1)
            x_t = a.sqrt() * traj.x0_hat[b:b + 1, s] + (1 - a).sqrt() * eps
            loss = ((task.model(x_t, t).sample - eps) ** 2).mean()
            rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]))
        psi = proj.project(torch.stack(rows)).double()
        expected = psi @ torch.linalg.solve(gram, phi_train.T)
        assert torch.allclose(scores[:, j].double(), expected, rtol=1e-4,
                              atol=1e-4 * float(expected.abs().max()))
    with pytest.raises(ValueError, match=r"steps must be indices in \[0, 4\)"):
        journey.score_trajectory(traj, steps=[4])
    with pytest.raises(TypeError, match="trajectory must be a fastattr.diffusion.Trajectory"):
        journey.score_trajectory(traj.latents)
    with pytest.raises(ValueError, match="num_steps must be an int in"):
        task.sample(2, num_steps=0)
