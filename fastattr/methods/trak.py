"""TRAK and D-TRAK (shared/METHODS.md): ``score(x, i) = φ(x)ᵀ (ΦᵀΦ + λI)⁻¹ φ(x_i)`` with
``φ = Pᵀ g``, ``g(x) = (1/K) Σ_t ∇_θ f(θ; x, t, ε(x, t))``, averaged over an ensemble.

TRAK uses ``f = loss``, D-TRAK ``f = square`` (the same f on both sides). Sign: with
``f = loss`` a positive score means the train sample's gradient step lowers the test
loss (a proponent). For D-TRAK's ``square`` the sign follows the same algebra on the
output norm; the papers (and the LDS) use the score as is.
"""

from __future__ import annotations

import torch

from ..diffusion import _check_output, _output_name
from ..projection import Projector
from .base import AttributionMethod, Kernel, check_lam, chunked_scores

__all__ = ["TRAK", "DTRAK"]


class TRAK(AttributionMethod):
    """TRAK for diffusion models: projected gradients of ``output`` and the kernel solve.

    Args:
        task: the ``DiffusionTask`` (model, schedule, K timesteps, attributed parameters).
        k: projection dimension.
        lam: λ of ``(ΦᵀΦ + λI)⁻¹`` (> 0); None takes 0.1 × the mean eigenvalue of ΦᵀΦ
            (per model). ``score(..., lam=)`` and ``sweep_lambda`` override it.
        output: the output function f (default "loss" for TRAK, "square" for D-TRAK).
        models: ensemble members (checkpoints or independently trained models with the
            task's parameters); default ``[task.model]``. Scores are the mean over members;
            member e is projected with an independent matrix (``ensemble_id=e``).
        projector: "rademacher" or "gaussian"; seed: the projection seed.
        backend: kernels' backend; store: a directory for the train features (resumable);
        batch_size: examples per gradient pass; progress: progress bars.

    Example::

        task = DiffusionTask(unet, samples_per_example=10)
        trak = TRAK(task, k=2048).fit(train_images)
        scores = trak.score(test_images)            # [n_test, n_train], > 0: proponent
        best = trak.top_k(test_images, k=5).ids
    """

    name = "trak"
    default_output = "loss"

    def __init__(self, task, *, k: int = 4096, lam=None, output=None, models=None,
                 projector: str = "rademacher", seed: int = 0, backend: str = "auto",
                 store=None, batch_size: int = 16, progress: bool = True):
        super().__init__(task, store=store, batch_size=batch_size, progress=progress)
        self.lam = check_lam(lam)
        self.output = _check_output(self.default_output if output is None else output)
        members = [task.model] if models is None else list(models)
        if not members:
            raise ValueError("models must hold at least one model")
        self.tasks = [task if m is task.model else task.with_model(m) for m in members]
        # validates k / kind / seed / backend now, not after a long pass
        self.projectors = [Projector(k, kind=projector, seed=seed, ensemble_id=e, backend=backend)
                           for e in range(len(members))]
        self.k, self.kind, self.seed = k, projector, seed
        self.kernels = []

    def models(self) -> list:
        """The ensemble members.

        Example::

            len(trak.models())
        """
        return [t.model for t in self.tasks]

    def options(self) -> dict:
        """k, projector kind, seed, output function and number of members (store config).

        Example::

            trak.options()["k"]
        """
        return {"k": self.k, "projector": self.kind, "seed": self.seed,
                "output": _output_name(self.output), "members": len(self.tasks)}

    def features(self, data, member: int = 0, name=None, arg: str = "data") -> torch.Tensor:
        """``(features [n, k], ids [n])``: the projected gradients of ``data`` under
        ensemble member ``member`` (``name``: the store entry, None for no store).

        Example::

            phi, ids = trak.features(train_images)
        """
        task, proj = self.tasks[member], self.projectors[member]
        out = self.featurize(data, lambda b: {"features": task.features(b, proj, self.output)},
                             name, f"{self.name} features ({member + 1}/{len(self.tasks)})",
                             arg)
        return out["features"], out["ids"]

    def _fit(self, train_data):
        self.kernels, ids = [], None
        for e in range(len(self.tasks)):
            phi, member_ids = self.features(train_data, e, f"features_{e}", "train_data")
            if ids is not None and not torch.equal(ids, member_ids):
                raise ValueError("train_data yielded other ids on another pass: it must be "
                                 "re-iterable in a fixed order")
            ids = member_ids
            self.kernels.append(Kernel(phi))
        return ids

    def _test_features(self, test_data) -> list:
        return [self.features(test_data, e, None, "test_data")[0] for e in range(len(self.tasks))]

    def _score_features(self, feats: list, lam) -> torch.Tensor:
        total = None
        for kernel, phi in zip(self.kernels, feats):
            lam_e = kernel.resolve(lam)
            s = chunked_scores(kernel.solve(phi, lam_e), kernel.rotated)
            total = s if total is None else total + s
        return total / len(feats)

    def _score(self, test_data, lam=None) -> torch.Tensor:
        return self._score_features(self._test_features(test_data),
                                    self.lam if lam is None else check_lam(lam))

    def sweep_lambda(self, test_data, lams) -> torch.Tensor:
        """Scores for every λ of ``lams``: ``Tensor[len(lams), n_test, n_train]``; the test
        features and the kernel's eigendecomposition are computed once.

        Example::

            grid = trak.sweep_lambda(test_images, [1e-2, 1e-1, 1.0])
        """
        self._require_fit()
        lams = [check_lam(v, allow_none=False) for v in lams]
        if not lams:
            raise ValueError("lams must hold at least one λ")
        feats = self._test_features(test_data)
        return torch.stack([self._score_features(feats, v) for v in lams])


class DTRAK(TRAK):
    """D-TRAK (Zheng et al., ICLR 2024): TRAK with the output function ``square``
    (``mean ε_θ²``) on both sides; the other output functions of the paper's ablation
    (``mean``, ``l1``, ``l2``, ``linf``, ``elbo``, ``loss``) are the ``output`` option.

    Example::

        dtrak = DTRAK(DiffusionTask(unet, samples_per_example=10), k=4096).fit(train_images)
        scores = dtrak.score(generated_images)
    """

    name = "dtrak"
    default_output = "square"
