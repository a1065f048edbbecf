"""DAS, the Diffusion Attribution Score (Lin et al., ICLR 2025; shared/METHODS.md).

With ``m`` output functions ``f_1..f_m`` (``output_dim``), K (t, ε) draws per example and
the projection ``P`` (k columns):

- features, one per direction j: ``φ^{(j)}(x) = (1/K) Σ_t Pᵀ g_t / ‖g_t‖`` with
  ``g_t = ∇_θ f_j(θ; x, t, ε(x, t))`` -- every per-timestep gradient normalised to unit norm
  before the average (``grad_norm="projected"`` estimates ``‖g_t‖`` by ``‖Pᵀ g_t‖``,
  ``"exact"`` takes the true norm);
- kernel ``K_λ = Σ_j Φ^{(j)ᵀ} Φ^{(j)} + λI`` over the n train samples;
- residual weight of train sample i: ``u_t = √(mean_pixels (ε − ε_θ(x_{i,t}, t))²)`` on the
  task's K draws, ``e_i = mean_t u_t / ‖u‖₂``;
- ``score(x, i) = Σ_j φ^{(j)}(x)ᵀ K_λ⁻¹ φ_i^{(j)} · w_i`` and, ``squared``,
  ``Σ_j (φ^{(j)}(x)ᵀ K_λ⁻¹ φ_i^{(j)} · w_i)²`` (the paper's ``‖J(x) Δθ_i‖²``), with
  ``w_i = e_i`` (1 without ``residual_weights``); with ``leverage`` the solve is the
  leave-i-out one, ``K_λ⁻¹`` replaced by ``(K_λ − Φ_iᵀΦ_i)⁻¹``: for m = 1 the division by
  ``1 − h_i`` with the train self-leverage ``h_i = φ_iᵀ K_λ⁻¹ φ_i`` (Sherman–Morrison), for
  m > 1 the Woodbury form ``K_λ⁻¹ Φ_iᵀ (I − Φ_i K_λ⁻¹ Φ_iᵀ)⁻¹`` over the sample's m rows.

``output_dim = 1`` is the official code's ``mean`` output (``f = mean_pixels ε_θ``).
``output_dim = m > 1`` compresses the d-dim output with m Gaussian directions instead:
``f_j = ⟨U_{:,j}, ε_θ⟩ / d``, ``U [d, m]`` the Philox Gaussian matrix of stream
``Stream.OUTPUT`` keyed by the method's seed with entries ``N(0, 1/m)`` (see
``output_directions``; ``UUᵀ`` then approximates the identity, so ``Σ_j ⟨U_j, v⟩² ≈ ‖v‖²``).
The per-timestep normalisation makes the features invariant to any positive rescaling of
``f_j``, so this scaling is a convention only: it changes no score.

Sign (shared/METHODS.md: > 0 means proponent): the signed score has the algebra of D-TRAK
-- positive when the train sample's (normalised) output gradients align with the test
sample's under the kernel, i.e. a gradient step on the train sample moves the test output
function the way it moves its own -- weighted by the train sample's (positive) residual
magnitude; as in the papers and the LDS it is used as is. The ``squared`` score is ≥ 0 and
measures the size of the predicted change of the test output when the train sample is
removed, with no direction: larger means more influential, which ``top_k`` and the LDS read
as a stronger proponent.
"""

from __future__ import annotations

import torch

from .. import rng
from ..projection import Projector
from .base import AttributionMethod, Kernel, check_lam, chunked_scores

__all__ = ["DAS", "output_directions"]

GRAD_NORMS = ("projected", "exact")


def output_directions(d: int, m: int, seed: int = 0) -> torch.Tensor:
    """``U``, float32 ``[d, m]``: the m output directions of ``DAS(output_dim=m)`` for a
    d-dim model output -- rows ``0..d−1`` of the Philox Gaussian matrix keyed by
    ``(seed, Stream.OUTPUT)`` (``fastattr.rng.matrix_rows``), entries ``N(0, 1/m)``.

    Example::

        U = output_directions(3 * 32 * 32, m=8, seed=0)
        f = eps_pred.flatten(1) @ U / U.shape[0]      # [N, 8]: the 8 output functions
    """
    return rng.matrix_rows(torch.arange(d, dtype=torch.int64), m, "gaussian",
                           rng.philox_key(seed), rng.Stream.OUTPUT)


class _Direction:
    """The output function ``f_j(pred, target, t) = ⟨U_{:,j}, pred⟩ / d`` (``[N]``)."""

    def __init__(self, cache: dict, m: int, seed: int, j: int):
        self.cache, self.m, self.seed, self.j = cache, m, seed, j

    def __call__(self, pred, target, t):
        p = pred.flatten(1)
        d = p.shape[1]
        if d not in self.cache:
            self.cache[d] = output_directions(d, self.m, self.seed)
        u = self.cache[d][:, self.j].to(p.device, p.dtype)
        return p @ u / d


def _check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


class DAS(AttributionMethod):
    """DAS for diffusion models: per-timestep-normalised projected gradients of the
    compressed output, the kernel solve, residual weights, optional leverage and squaring.

    Args:
        task: the ``DiffusionTask`` (model, schedule, K timesteps, attributed parameters);
            its ``output`` is not used (DAS's output functions are fixed by ``output_dim``).
        k: projection dimension.
        lam: λ of ``(Σ_j Φ^{(j)ᵀ}Φ^{(j)} + λI)⁻¹`` (> 0); None takes 0.1 × the mean
            eigenvalue. ``score(..., lam=)`` and ``sweep_lambda`` override it.
        output_dim: m, the output functions: 1 is ``mean`` (the official code); m > 1 are
            m Gaussian directions of the output (``output_directions``), m times the
            gradient passes.
        grad_norm: how each per-timestep gradient is normalised: "projected" (``‖Pᵀ g_t‖``,
            a JL estimate of ``‖g_t‖`` with relative error O(1/√k), free) or "exact" (the
            true ``‖g_t‖`` from materialised per-row gradients: memory ``B·K × p`` per
            batch, for small models / LoRA parameters only).
        residual_weights: multiply train column i by its residual weight ``e_i``.
        leverage: the leave-one-out solve: train column i divided by ``1 − h_i`` (train
            self-leverage; Woodbury over the m rows when m > 1).
        squared: the squared score ``Σ_j (…)²`` instead of the signed one.
        projector: "rademacher" or "gaussian"; seed: the projection seed (and that of the
            output directions when m > 1).
        backend: kernels' backend; store: a directory for the train features and residual
            weights (resumable); batch_size: examples per gradient pass; progress: bars.

    ``residual_weights``, ``leverage`` and ``squared`` act at scoring time only (the store
    holds what all of them need); ``leverage`` and ``squared`` can be overridden per call.

    Example::

        task = DiffusionTask(unet, samples_per_example=10)
        das = DAS(task, k=2048).fit(train_images)
        scores = das.score(test_images)                       # [n_test, n_train]
        sq = das.score(test_images, squared=True, leverage=True)
        best = das.top_k(test_images, k=5).ids
    """

    name = "das"

    def __init__(self, task, *, k: int = 4096, lam=None, output_dim: int = 1,
                 grad_norm: str = "projected", residual_weights: bool = True,
                 leverage: bool = False, squared: bool = False, projector: str = "rademacher",
                 seed: int = 0, backend: str = "auto", store=None, batch_size: int = 16,
                 progress: bool = True):
        super().__init__(task, store=store, batch_size=batch_size, progress=progress)
        self.lam = check_lam(lam)
        if isinstance(output_dim, bool) or not isinstance(output_dim, int) or output_dim < 1:
            raise ValueError(f"output_dim must be an int >= 1 (1: the mean output, m > 1: m "
                             f"Gaussian output directions), got {output_dim!r}")
        if grad_norm not in GRAD_NORMS:
            raise ValueError(f"grad_norm must be one of {GRAD_NORMS}, got {grad_norm!r}")
        self.residual_weights = _check_flag("residual_weights", residual_weights)
        self.leverage = _check_flag("leverage", leverage)
        self.squared = _check_flag("squared", squared)
        # validates k / kind / seed / backend now, not after a long pass
        self.projector = Projector(k, kind=projector, seed=seed, backend=backend)
        self.k, self.kind, self.seed = k, projector, seed
        self.output_dim, self.grad_norm = output_dim, grad_norm
        cache = {}
        self.outputs = ["mean"] if output_dim == 1 else \
            [_Direction(cache, output_dim, seed, j) for j in range(output_dim)]
        self.kernel = None
        self.residuals = None

    def options(self) -> dict:
        """What determines the stored train-side state (features, residual weights).

        Example::

            DAS(task, k=512).options()   # {'k': 512, 'projector': 'rademacher', ...}
        """
        return {"k": self.k, "projector": self.kind, "seed": self.seed,
                "output": "mean" if self.output_dim == 1 else "gaussian",
                "output_dim": self.output_dim, "grad_norm": self.grad_norm}

    # ------------------------------------------------------------------ per batch

    def _unit_features(self, batch, output) -> torch.Tensor:
        """``[B, k]``: ``(1/K) Σ_t Pᵀ g_t / ‖g_t‖`` of one output function."""
        task = self.task
        if self.grad_norm == "projected":
            rows = task.features(batch, self.projector, output, per_timestep=True)
            norms = rows.to(torch.float64).norm(dim=1)
        else:
            from ..grads import per_sample_grads

            fn, data, _ = task._rows(batch, output, task.model)
            grads = per_sample_grads(task.model, fn, data, params=task.params)
            norms = sum(g.flatten(1).to(torch.float64).pow(2).sum(1)
                        for g in grads.values()).sqrt()
            rows = self.projector.project(grads)
        # a row whose gradient vanishes stays zero
        norms = torch.where(norms > 0, norms, torch.ones_like(norms))
        unit = rows.to(torch.float64) / norms.to(rows.device)[:, None]
        return unit.reshape(-1, task.K, rows.shape[1]).mean(1).to(torch.float32)

    def _batch_features(self, batch) -> torch.Tensor:
        return torch.stack([self._unit_features(batch, out) for out in self.outputs], 1)

    def _batch_residuals(self, batch) -> torch.Tensor:
        """``[B]``: ``e_i = mean_t u_t / ‖u‖₂``, ``u_t = √(mean_pixels (ε − ε_θ)²)``."""
        u = self.task.values(batch, output="loss").to(torch.float64).clamp_min(0).sqrt()
        norm = u.norm(dim=1, keepdim=True)
        return (u / torch.where(norm > 0, norm, torch.ones_like(norm))).mean(1).to(torch.float32)

    # ----------------------------------------------------------------------- passes

    def features(self, data, name=None, arg: str = "data") -> tuple:
        """``(features [n, m, k], ids [n])`` of ``data``: the m per-direction DAS features
        (``m = output_dim``; ``[n, 1, k]`` for the mean output).

        Example::

            phi, ids = das.features(images)     # [n, output_dim, k]
        """
        out = self.featurize(data, lambda b: {"features": self._batch_features(b)}, name,
                             f"{self.name} features", arg)
        return out["features"], out["ids"]

    def _fit(self, train_data):
        out = self.featurize(train_data, lambda b: {"features": self._batch_features(b),
                                                    "residuals": self._batch_residuals(b)},
                             "features", f"{self.name} features", "train_data")
        phi = out["features"]
        self.kernel = Kernel(phi.reshape(-1, phi.shape[-1]))
        self.residuals = out["residuals"]
        return out["ids"]

    # ----------------------------------------------------------------------- scoring

    def _train_side(self, lam: float, leverage: bool) -> tuple:
        """The train rows ``ΦV`` (``[n, m, k]``) and column weights ``w_i`` (``e_i`` or 1).

        With leverage, sample i's rows become those of the leave-i-out solve:
        ``(K − Φ_iᵀΦ_i)⁻¹ Φ_iᵀ = K⁻¹ Φ_iᵀ (I − H_i)⁻¹`` with ``H_i = Φ_i K⁻¹ Φ_iᵀ``
        (m × m; Woodbury). For m = 1 that is the division by ``1 − h_i``; for m > 1 it mixes
        the sample's directions, and ``I − H_i`` is positive definite for every λ > 0."""
        n, m = self.residuals.numel(), self.output_dim
        w = self.residuals.to(torch.float64) if self.residual_weights else \
            torch.ones(n, dtype=torch.float64)
        right = self.kernel.rotated.reshape(n, m, -1)
        if leverage:
            r = right.to(torch.float64)
            H = torch.einsum("nlk,njk->nlj", r / (self.kernel.eigenvalues + lam), r)
            M = torch.linalg.inv(torch.eye(m, dtype=H.dtype) - H)
            right = torch.einsum("nlk,nlj->njk", r, M).to(torch.float32)
        return right, w

    def _score_features(self, feats: torch.Tensor, lam, squared: bool,
                        leverage: bool) -> torch.Tensor:
        kernel = self.kernel
        lam = kernel.resolve(lam)
        n_test, m, k = feats.shape
        left = kernel.solve(feats.reshape(-1, k), lam).reshape(n_test, m, k)
        right, w = self._train_side(lam, leverage)
        if not squared:
            return chunked_scores(left.reshape(n_test, m * k), right.reshape(-1, m * k), w)
        total = torch.zeros(n_test, right.shape[0], dtype=torch.float32)
        for j in range(m):
            total += chunked_scores(left[:, j], right[:, j], w).pow(2)
        return total

    def _options(self, squared, leverage) -> tuple:
        squared = self.squared if squared is None else _check_flag("squared", squared)
        leverage = self.leverage if leverage is None else _check_flag("leverage", leverage)
        return squared, leverage

    def _score(self, test_data, lam=None, squared=None, leverage=None) -> torch.Tensor:
        lam = self.lam if lam is None else check_lam(lam)
        squared, leverage = self._options(squared, leverage)
        return self._score_features(self.features(test_data, None, "test_data")[0], lam,
                                    squared, leverage)

    def sweep_lambda(self, test_data, lams, *, squared=None, leverage=None) -> torch.Tensor:
        """Scores for every λ of ``lams``: ``Tensor[len(lams), n_test, n_train]``; the test
        features and the kernel's eigendecomposition are computed once (``squared`` /
        ``leverage`` default to the constructor's).

        Example::

            grid = das.sweep_lambda(test_images, [1e-2, 1e-1, 1.0], squared=True)
        """
        self._require_fit()
        lams = [check_lam(v, allow_none=False) for v in lams]
        if not lams:
            raise ValueError("lams must hold at least one λ")
        squared, leverage = self._options(squared, leverage)
        feats = self.features(test_data, None, "test_data")[0]
        return torch.stack([self._score_features(feats, v, squared, leverage) for v in lams])
