"""Journey-TRAK (Georgiev et al. 2023): attribution of each step of a sampling trajectory.

At step s of a generated sample's trajectory (timestep t_s), the feature is the projected
gradient of ``f = loss`` at the step's prediction ``x̂_0`` re-noised to ``t_s`` with noise
``ε(id, t_s)``; scores use TRAK's train features and kernel:
``score[x, s, i] = φ_s(x)ᵀ (ΦᵀΦ + λI)⁻¹ φ(x_i)``, ``[n_gen, n_steps, n_train]``. Sign as
TRAK's: > 0 means training on sample i lowers the re-noised loss of that step's prediction.
"""

from __future__ import annotations

import torch

from ..diffusion import Trajectory
from .base import check_lam
from .trak import TRAK

__all__ = ["JourneyTRAK"]


class JourneyTRAK(TRAK):
    """Per-sampling-step TRAK scores of generated samples (``score_trajectory``); ``fit``,
    ``score`` (of final images), ``top_k`` and ``sweep_lambda`` are TRAK's, options too.

    Example::

        journey = JourneyTRAK(task, k=2048).fit(train_images)
        traj = task.sample(8, num_steps=50)
        per_step = journey.score_trajectory(traj)     # [8, 50, n_train]
    """

    name = "journey_trak"
    default_output = "loss"

    def score_trajectory(self, trajectory: Trajectory, lam=None, steps=None) -> torch.Tensor:
        """``Tensor[n_gen, n_steps, n_train]``: the scores of every sampling step (or of
        the step indices ``steps``) of ``trajectory`` (a ``DiffusionTask.sample`` result).

        Example::

            scores = journey.score_trajectory(task.sample(4, num_steps=20), steps=[0, 10, 19])
        """
        self._require_fit()
        if not isinstance(trajectory, Trajectory):
            raise TypeError(f"trajectory must be a fastattr.diffusion.Trajectory (from "
                            f"DiffusionTask.sample), got {type(trajectory).__name__}")
        lam = self.lam if lam is None else check_lam(lam)
        n, S = trajectory.x0_hat.shape[:2]
        chosen = list(range(S)) if steps is None else [int(s) for s in steps]
        bad = [s for s in chosen if not 0 <= s < S]
        if bad or not chosen:
            raise ValueError(f"steps must be indices in [0, {S}), got {steps!r}")
        out = torch.empty(n, len(chosen), self.n_train)
        for j, s in enumerate(chosen):
            t = trajectory.steps[s].repeat(n)
            feats = []
            for e, (task, proj) in enumerate(zip(self.tasks, self.projectors)):
                phi = torch.cat([
                    task.features_at((trajectory.x0_hat[i:i + self.batch_size, s],
                                      trajectory.ids[i:i + self.batch_size]),
                                     t[i:i + self.batch_size], proj, self.output)
                    for i in range(0, n, self.batch_size)])
                feats.append(phi)
            out[:, j] = self._score_features(feats, lam)
        return out
