"""Influence functions with K-FAC / EK-FAC curvature (Mlodozeniec et al., ICLR 2025;
shared/METHODS.md):

    ``score(q, j) = ∇_θ m(x_q)ᵀ (F + λI)⁻¹ ∇_θ ℓ(x_j)``

- ``ℓ(x) = (1/K) Σ_t mean_pixels (ε_θ(x_t, t) − ε)²``, the train loss of an image over the
  task's K (t, ε(id, t)) draws;
- ``m`` the measurement of the test side: the same loss (default), ``elbo`` (``w_t · loss``),
  ``square`` or any output function of ``fastattr.diffusion.OUTPUTS`` / a callable
  ``(pred, target, t) -> Tensor[N]``, K-averaged the same way;
- ``F`` the GGN of the diffusion loss per (x, t, ε) datum, averaged over the N = n·K_c data
  (``fastattr.curvature.fit_factors``: EK-FAC, K-FAC, diagonal, or the dense matrix for tiny
  models), λ the damping.

Influence is computed over the ``Linear`` / ``Conv2d`` weights and biases among the task's
attributed parameters (the parameters K-FAC covers); norms, embeddings and other
parameters are left out of both gradients and the curvature.

Sign (shared/METHODS.md: > 0 means proponent): with the training objective
``Σ_i ℓ(x_i) + (nλ/2)‖θ‖²`` (Hessian ``n(F + λI)`` where F is exact), removing train sample j
moves the optimum by ``Δθ ≈ (1/n)(F + λI)⁻¹ ∇ℓ(x_j)`` and the test measurement by
``Δm ≈ score(q, j) / n``. With ``m = loss`` a positive score therefore means the test loss
*rises* when j is removed: j is a proponent, as the convention asks, with no sign flip.
For other measurements the score predicts the rise of ``m`` when j is removed.

Computation: query gradients are formed for a chunk of ``batch_size`` test samples and
preconditioned once; the train gradients are never materialised but streamed batch by batch
through the fused per-sample-gradient × query kernels (``DiffusionTask.grads_matmul``), so
every test chunk costs one gradient pass over the training set.
"""

from __future__ import annotations

import copy
import math
import os

import torch

from ..curvature import GGNS, SHARING, STRATEGIES, Factors, fit_factors, kfac_params
from ..diffusion import _check_output, _output_name
from .. import distributed
from .base import QUERY_IDS, AttributionMethod, _progress, main_broadcast, streamed_rows

__all__ = ["KFACInfluence"]

FACTORS_FILE = "factors.safetensors"


def _check_damping(value, name: str, allow_none: bool = True):
    """λ must be a finite float > 0 (None: the factors' heuristic 0.1 · mean eigenvalue)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or value <= 0:
        alternative = " or None (the heuristic 0.1 · mean eigenvalue per layer)" \
            if allow_none else ""
        raise ValueError(f"{name} must be a finite float > 0 (the damping λ of (F + λI)⁻¹)"
                         f"{alternative}, got {value!r}")
    return float(value)


def _choice(name: str, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


class KFACInfluence(AttributionMethod):
    """Influence functions with (EK-)K-FAC curvature of the diffusion loss.

    Args:
        task: the ``DiffusionTask`` (model, schedule, K draws per gradient, attributed
            parameters; influence uses the ``Linear`` / ``Conv2d`` weights and biases
            among them).
        strategy: curvature approximation: "ekfac" (default), "kfac", "diagonal" or "exact"
            (the dense GGN: tiny models only).
        ggn: GGN estimator of ``fit_factors``: "model" (MC Fisher of the Gaussian output,
            the paper's default), "model_exact" (its exact expectation, d backward passes
            per batch) or "loss" (empirical Fisher).
        sharing: weight sharing of K-FAC over positions: "expand" (default) or "reduce".
        damping: λ (> 0, absolute); None takes the factors' heuristic ``0.1 · mean(Λ)`` per
            layer. ``score(..., lam=)`` and ``sweep_lambda`` override it.
        measurement: the test side's output function: "loss" (default), "elbo", "square",
            any of ``fastattr.diffusion.OUTPUTS`` or a callable ``(pred, target, t) ->
            Tensor[N]``. The train side is always the loss.
        curvature_samples: K_c, the (t, ε) draws per image the factors are fitted on
            (default ``task.K``).
        backend: kernels' backend; store: a directory for the fitted factors (a second fit
            with the same store, model and options reloads them); batch_size: images per
            gradient pass (and test samples per preconditioned chunk); progress: bars.

    Example::

        task = DiffusionTask(unet, samples_per_example=10)
        inf = KFACInfluence(task, strategy="ekfac", damping=1e-4).fit(train_images)
        scores = inf.score(test_images)              # [n_test, n_train], > 0: proponent
        best = inf.top_k(test_images, k=5).ids
    """

    name = "kfac_influence"

    def __init__(self, task, *, strategy: str = "ekfac", ggn: str = "model",
                 sharing: str = "expand", damping=None, measurement="loss",
                 curvature_samples=None, backend: str = "auto", store=None,
                 batch_size: int = 16, progress: bool = True):
        super().__init__(task, store=store, batch_size=batch_size, progress=progress)
        self.strategy = _choice("strategy", strategy, STRATEGIES)
        self.ggn = _choice("ggn", ggn, GGNS)
        self.sharing = _choice("sharing", sharing, SHARING)
        self.damping = _check_damping(damping, "damping")
        self.measurement = _check_output(measurement, "measurement")
        if curvature_samples is None:
            curvature_samples = task.K
        if isinstance(curvature_samples, bool) or not isinstance(curvature_samples, int) \
                or curvature_samples < 1:
            raise ValueError(f"curvature_samples must be an int >= 1 or None, got "
                             f"{curvature_samples!r}")
        self.curvature_samples = curvature_samples
        self.backend = backend
        covered = set(kfac_params(task.model))
        names = [n for n in task.params if n in covered]
        if not names:
            raise ValueError("the task's attributed parameters hold no Linear / Conv2d weight "
                             "or bias: K-FAC influence has nothing to work on")
        # the same task over the K-FAC-covered parameters only: gradients and curvature
        # then live on the same parameters
        self.task = copy.copy(task)
        self.task.params = names
        self.factors = None
        self._train_batches = None

    def options(self) -> dict:
        """What determines the fitted factors (recorded in the store's config).

        Example::

            KFACInfluence(task).options()   # {'strategy': 'ekfac', 'ggn': 'model', ...}
        """
        return {"strategy": self.strategy, "ggn": self.ggn, "sharing": self.sharing,
                "curvature_samples": self.curvature_samples}

    def store_config(self) -> dict:
        """The store's config: method, options, the task's loss config and the model
        fingerprint over ``params``.

        Example::

            KFACInfluence(task, store="runs/if").store_config()["options"]
        """
        # the factors depend on neither the batch size nor the measurement; the train side
        # is always the loss
        config = super().store_config()
        config.pop("batch_size", None)
        config["task"] = self.task.config(output="loss")
        return config

    @property
    def params(self) -> list:
        """The parameter names influence is computed over (Linear / Conv2d weights and
        biases among the task's attributed parameters).

        Example::

            KFACInfluence(task).params     # ['conv_in.weight', 'conv_in.bias', ...]
        """
        return list(self.task.params)

    # ----------------------------------------------------------------------- fitting

    def fit(self, train_data) -> "KFACInfluence":
        """Fit the curvature factors on ``train_data`` (a Tensor of images, a tuple
        ``(images, ids[, condition])`` or an iterable of such batches) and keep its batches
        for scoring (the train gradients are streamed at score time); returns ``self``.
        With a store, the factors are saved there, and reloaded (checked against the model,
        the options and the training ids) by a later fit.

        Example::

            inf = KFACInfluence(task, store="runs/if").fit((train_images, train_ids))
        """
        return super().fit(train_data)

    def _fit(self, train_data):
        # materialised: fit_factors takes two passes, score one per test chunk (the
        # images are held, never their gradients)
        batches = list(self.task.batches(train_data, self.batch_size, "train_data")[1])
        if not batches:
            raise ValueError("train_data is empty")
        ids = torch.cat([b[1].cpu() for b in batches])
        if torch.unique(ids).numel() != ids.numel():   # before the (long) fit, not after
            raise ValueError("train_data holds repeated sample ids: ids must identify samples")
        store = self.store()
        group = distributed.current()
        if group is not None:
            distributed.agree({"config": self.store_config(), "ids": ids.tolist(),
                               "store": store is not None},
                              f"{self.name}'s config and training ids", group)
        factors = None
        if store is not None:
            distributed.check_shared(store, group)
            factors = self._load_factors(store, ids)
            # one decision for all ranks (rank 0's), so that all or none enter fit_factors
            if not distributed.broadcast(factors is not None, group):
                factors = None
            elif factors is None:
                raise distributed.DistributedSetupError(
                    f"rank {group.rank} cannot read the factors rank 0 reads in {store.path}")
        if factors is None:
            factors = fit_factors(self.task.model, batches, self.task.curvature_loss(),
                                  strategy=self.strategy, ggn=self.ggn, sharing=self.sharing,
                                  samples_per_example=self.curvature_samples,
                                  params=self.task.params, backend=self.backend,
                                  progress=self.progress)
            if store is not None and distributed.is_main():   # every rank holds the same
                store.put("train_ids", {"ids": ids.sort().values})
                factors.save(store.path / FACTORS_FILE)
            distributed.barrier(group)
        self.factors = factors
        self._train_batches = batches
        return ids

    def _load_factors(self, store, ids):
        path = store.path / FACTORS_FILE
        saved = store.get("train_ids")
        if not path.exists() or saved is None:
            return None
        if not torch.equal(torch.from_numpy(saved["ids"].copy()), ids.sort().values):
            raise ValueError(f"store {store.path} holds factors fitted on other training ids "
                             "than train_data; use a new store directory")
        return Factors.load(os.fspath(path), model=self.task.model, strategy=self.strategy,
                            ggn=self.ggn, sharing=self.sharing,
                            samples_per_example=self.curvature_samples)

    # ----------------------------------------------------------------------- scoring

    def _resolve(self, lam):
        return self.damping if lam is None else _check_damping(lam, "lam", allow_none=False)

    def _scores(self, test_data, lams: list) -> torch.Tensor:
        """``[len(lams), n_test, n_train]``: every test chunk's query gradients once, one
        preconditioning per λ, one streamed train pass for all λ."""
        task, n_train = self.task, self.n_train
        total, tests = task.batches(test_data, self.batch_size, "test_data", QUERY_IDS)
        device = next(task.model.parameters()).device
        blocks = []
        for batch in _progress(tests, total, f"{self.name} test chunks", self.progress):
            def make(batch=batch):
                grads = task.grads(batch, output=self.measurement)
                pre = [self.factors.precondition(grads, lam) for lam in lams]
                return {n: torch.cat([p[n] for p in pre]) for n in task.params}

            # rank 0 preconditions the queries; every rank streams its share of the train set
            queries = main_broadcast(make, device)
            b = next(iter(queries.values())).shape[0] // len(lams)
            dots = streamed_rows(self._train_batches,
                                 lambda tb: task.grads_matmul(tb, queries, output="loss",
                                                              backend=self.backend),
                                 len(self._train_batches), "train gradients", self.progress)
            del queries
            if dots.shape[0] != n_train:
                raise RuntimeError(f"streamed {dots.shape[0]} train rows, fitted {n_train}")
            blocks.append(dots.T.to(torch.float32).reshape(len(lams), b, n_train))
        if not blocks:
            raise ValueError("test_data is empty")
        return torch.cat(blocks, dim=1)

    def _score(self, test_data, lam=None) -> torch.Tensor:
        return self._scores(test_data, [self._resolve(lam)])[0]

    def score(self, test_data, lam=None) -> torch.Tensor:
        """``Tensor[n_test, n_train]`` float32: ``∇m(x_q)ᵀ (F + λI)⁻¹ ∇ℓ(x_j)``, > 0 when
        train sample j is a proponent of test sample q (columns in fit order:
        ``self.train_ids``). ``lam`` overrides the damping of the constructor.

        ``test_data`` takes the forms of ``fit``; a bare Tensor of images gets the ids
        ``QUERY_IDS + j`` (its noise draws then differ from the training images').

        Example::

            scores = inf.score((test_images, test_ids), lam=1e-3)
        """
        return super().score(test_data, lam=lam)

    def sweep_lambda(self, test_data, lams) -> torch.Tensor:
        """Scores for every λ of ``lams``: ``Tensor[len(lams), n_test, n_train]``; the query
        gradients and the streamed train gradients are computed once for all λ.

        Example::

            grid = inf.sweep_lambda(test_images, [1e-5, 1e-4, 1e-3])
        """
        self._require_fit()
        lams = [_check_damping(v, "lam", allow_none=False) for v in lams]
        if not lams:
            raise ValueError("lams must hold at least one λ")
        return self._scores(test_data, lams)

    def __repr__(self) -> str:
        return (f"KFACInfluence({self.task!r}, strategy={self.strategy}, ggn={self.ggn}, "
                f"measurement={_output_name(self.measurement)}, "
                f"{'unfitted' if self.factors is None else f'fitted on {self.n_train}'})")
