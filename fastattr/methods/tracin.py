"""TracIn and Diffusion-ReTrac (shared/METHODS.md; Xie et al., TMLR 2024).

With checkpoints ``θ_1..θ_C``, learning rates ``η_c``, the task's K (t, ε) draws per
example, the train output ``ℓ`` (``output``, default ``loss``) and the test measurement
``m`` (``measurement``, default ``loss``):

- train gradient ``g_c(x_i) = (1/K) Σ_t ∇_θ ℓ(θ_c; x_i, t, ε(x_i, t))``;
- test gradient ``h_c(x) = (1/K) Σ_t ∇_θ m(θ_c; x, t, ε(x, t))`` (Diffusion-TracIn averages
  the test gradient over the timestep set);
- **TracIn**: ``score(x, i) = Σ_c η_c ⟨g_c(x_i), h_c(x)⟩``;
- **ReTrac** (Diffusion-ReTrac) renormalises the train gradient and every per-timestep test
  gradient, removing the timestep-induced norm bias that makes a few train samples
  influential for every test sample:
  ``score(x, i) = Σ_c η_c ⟨g_c(x_i) / ‖g_c(x_i)‖, (1/K) Σ_t u_{c,t}(x) / ‖u_{c,t}(x)‖⟩``,
  ``u_{c,t}(x) = ∇_θ m(θ_c; x, t, ε(x, t))``. A gradient that vanishes contributes zero.

Both run on projected gradients (``k = int``: ``g, h, u`` replaced by ``Pᵀg, Pᵀh, Pᵀu`` with
an independent projection per checkpoint, ``ensemble_id = c``; for ReTrac the norms are
then those of the projected vectors, a Johnson–Lindenstrauss estimate of the true norms
with relative error O(1/√k)) or on exact gradients (``k = None``: the dot products of the
full gradients, computed by the fused ``grads_matmul`` kernels without forming the train
gradients).

Sign (shared/METHODS.md: > 0 means proponent): with ``output = measurement = loss``, a
gradient step ``θ ← θ − η g(x_i)`` changes the test loss by ``−η ⟨g(x_i), h(x)⟩`` to first
order, so a positive score means training on x_i lowers the test loss: a proponent. The
normalisation of ReTrac divides by positive norms and keeps the sign. For another
measurement (``square``, ``elbo``...) the score is the first-order *decrease* of that
measurement, used as is.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..diffusion import _check_output, _output_name
from ..projection import Projector
from .base import QUERY_IDS, AttributionMethod, chunked_scores, main_broadcast, streamed_rows

__all__ = ["TracIn", "ReTrac"]


def _check_k(k):
    if k is None:
        return None
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1 (projected gradients) or None (exact "
                         f"gradients), got {k!r}")
    return k


def _check_learning_rates(learning_rates, n: int) -> list:
    if learning_rates is None:
        return [1.0] * n
    rates = list(learning_rates)
    if len(rates) != n:
        raise ValueError(f"learning_rates has {len(rates)} entries but there are {n} "
                         "checkpoints: give one learning rate per checkpoint")
    for r in rates:
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) \
                or r <= 0:
            raise ValueError(f"learning_rates must be finite floats > 0, got {r!r}")
    return [float(r) for r in rates]


def _inverse_norms(norms: torch.Tensor) -> torch.Tensor:
    """``1 / norms`` (float64), 0 where a norm is 0 (a vanishing gradient scores 0)."""
    norms = norms.to(torch.float64)
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    return torch.where(norms > 0, 1 / safe, torch.zeros_like(norms))


def _squared_norms(grads: dict) -> torch.Tensor:
    """Row-wise ``‖g‖²`` (float64 ``[N]``) of per-row gradients ``{name: [N, ...]}``."""
    return sum(g.flatten(1).to(torch.float64).pow(2).sum(1) for g in grads.values())


def _one_shot(data) -> bool:
    """An iterator (a generator...) that a second pass would find exhausted."""
    if isinstance(data, (torch.Tensor, tuple)):
        return False
    try:
        return iter(data) is data
    except TypeError:
        return False


class TracIn(AttributionMethod):
    """Diffusion-TracIn: learning-rate-weighted dot products of train and test gradients
    summed over checkpoints, each gradient averaged over the task's K (t, ε) draws.

    Args:
        task: the ``DiffusionTask`` (model, schedule, K timesteps, attributed parameters).
        checkpoints: the models ``θ_c`` (``nn.Module`` with the task's parameters, e.g.
            saved training checkpoints); default ``[task.model]``. Checkpoint c is run
            through ``task.with_model`` and projected with its own matrix (``ensemble_id=c``).
        learning_rates: ``η_c``, one finite float > 0 per checkpoint; default all 1.0.
        k: projection dimension, or None for exact gradients. Projected: the train
            features ``Pᵀ g_c`` are computed in ``fit`` (stored in ``store`` when given) and
            a score is ``Σ_c η_c φ_c(x)·φ_c(x_i)``. Exact: ``fit`` keeps the train data
            (a one-shot iterator is materialised into a list) and ``score`` streams it once
            per checkpoint and test chunk through the fused ``grads_matmul`` kernels, dotting
            every train gradient with the held test gradients without forming it (memory:
            ``query_chunk × p`` for the test gradients).
        output: the train-side output function ℓ (default "loss").
        measurement: the test-side output function m (default "loss").
        projector: "rademacher" or "gaussian"; seed: the projection seed.
        backend: kernels' backend; store: a directory for the train-side state (projected
            features, ReTrac's exact train norms; resumable; exact TracIn keeps only the
            data and stores nothing); batch_size: examples per gradient pass; progress: bars.

    ``score(test_data, query_chunk=None)``: in exact mode, the number of test samples
    whose gradients are held at once (default ``batch_size``); more means fewer passes
    over the train data.

    Example::

        task = DiffusionTask(unet, samples_per_example=10)
        tracin = TracIn(task, checkpoints=[ckpt_10k, ckpt_20k, unet],
                        learning_rates=[1e-4, 1e-4, 5e-5], k=2048).fit(train_images)
        scores = tracin.score(test_images)          # [n_test, n_train], > 0: proponent
        exact = TracIn(task, k=None).fit(train_images).score(test_images, query_chunk=64)
    """

    name = "tracin"
    normalize = False  # ReTrac: unit train gradients and per-timestep unit test gradients

    def __init__(self, task, *, checkpoints=None, learning_rates=None, k: int | None = 4096,
                 output="loss", measurement="loss", projector: str = "rademacher",
                 seed: int = 0, backend: str = "auto", store=None, batch_size: int = 16,
                 progress: bool = True):
        super().__init__(task, store=store, batch_size=batch_size, progress=progress)
        members = [task.model] if checkpoints is None else list(checkpoints)
        if not members:
            raise ValueError("checkpoints must hold at least one model")
        for i, m in enumerate(members):
            if not isinstance(m, nn.Module):
                raise TypeError(f"checkpoints[{i}] must be an nn.Module, got "
                                f"{type(m).__name__}")
        self.learning_rates = _check_learning_rates(learning_rates, len(members))
        self.k = _check_k(k)
        self.output = _check_output(output, "output")
        self.measurement = _check_output(measurement, "measurement")
        self.tasks = [task if m is task.model else task.with_model(m) for m in members]
        # validates kind / seed / backend now, not after a long pass
        self.projectors = None if self.k is None else [
            Projector(self.k, kind=projector, seed=seed, ensemble_id=c, backend=backend)
            for c in range(len(members))]
        if self.k is None:
            Projector(1, kind=projector, seed=seed, backend=backend)
        self.kind, self.seed, self.backend = projector, seed, backend
        self.train_features = []   # projected: Φ_c [n, k] per checkpoint
        self.train_weights = []    # ReTrac: 1 / ‖g_c(x_i)‖ per checkpoint (float64 [n])
        self._train_data = None    # exact: the train data, streamed at score time

    @property
    def exact(self) -> bool:
        """True when the gradients are exact (``k=None``), False when projected.

        Example::

            TracIn(task, k=None).exact      # True
        """
        return self.k is None

    def models(self) -> list:
        """The checkpoints, in order.

        Example::

            [m is unet for m in TracIn(task).models()]     # [True]
        """
        return [t.model for t in self.tasks]

    def options(self) -> dict:
        """What determines the stored train-side state (the measurement and the learning
        rates act at scoring time only).

        Example::

            TracIn(task, k=512).options()   # {'k': 512, 'projector': 'rademacher', ...}
        """
        return {"k": self.k, "projector": self.kind, "seed": self.seed,
                "output": _output_name(self.output), "checkpoints": len(self.tasks)}

    # ------------------------------------------------------------------ projected mode

    def _require_projected(self, what: str):
        if self.exact:
            raise ValueError(f"{what} are projected gradients: this {type(self).__name__} "
                             "uses exact gradients (k=None); give k=int")

    def features(self, data, checkpoint: int = 0, name=None, arg: str = "data") -> tuple:
        """``(features [n, k], ids [n])``: the projected train-side gradients
        ``Pᵀ g_c(x)`` of ``output`` under checkpoint ``checkpoint`` (projected mode).

        Example::

            phi, ids = tracin.features(train_images, checkpoint=1)
        """
        self._require_projected("features")
        task, proj = self.tasks[checkpoint], self.projectors[checkpoint]
        out = self.featurize(data, lambda b: {"features": task.features(b, proj, self.output)},
                             name, f"{self.name} features ({checkpoint + 1}/{len(self.tasks)})",
                             arg)
        return out["features"], out["ids"]

    def _query_batch(self, batch, c: int) -> torch.Tensor:
        task, proj = self.tasks[c], self.projectors[c]
        if not self.normalize:
            return task.features(batch, proj, self.measurement)
        # rows f_t/K: the 1/K cancels in the normalisation
        rows = task.features(batch, proj, self.measurement, per_timestep=True)
        unit = rows.to(torch.float64) * _inverse_norms(rows.norm(dim=1)).to(rows.device)[:, None]
        return unit.reshape(-1, task.K, rows.shape[1]).mean(1).to(torch.float32)

    def query_features(self, data, checkpoint: int = 0) -> tuple:
        """``(features [n, k], ids [n])``: the projected test-side gradients of
        ``measurement`` under checkpoint ``checkpoint`` -- ``Pᵀ h_c(x)`` for TracIn,
        ``(1/K) Σ_t Pᵀu_t / ‖Pᵀu_t‖`` for ReTrac (projected mode). A bare Tensor of images
        gets the test ids ``QUERY_IDS + j``.

        Example::

            psi, _ = tracin.query_features(test_images)
            scores = psi @ tracin.features(train_images)[0].T     # one checkpoint, η = 1
        """
        self._require_projected("query features")
        out = self.featurize(data, lambda b: {"features": self._query_batch(b, checkpoint)},
                             None, f"{self.name} test features ({checkpoint + 1}/"
                             f"{len(self.tasks)})", "test_data")
        return out["features"], out["ids"]

    # ---------------------------------------------------------------------- fit

    def _fit(self, train_data):
        if _one_shot(train_data):  # several passes (checkpoints, exact scoring) follow
            train_data = list(train_data)
        self.train_features, self.train_weights, self._train_data = [], [], None
        ids = None

        def same(new):
            if ids is not None and not torch.equal(ids, new):
                raise ValueError("train_data yielded other ids on another pass: it must be "
                                 "re-iterable in a fixed order")
            return new

        if not self.exact:
            for c in range(len(self.tasks)):
                phi, c_ids = self.features(train_data, c, f"features_{c}", "train_data")
                ids = same(c_ids)
                self.train_features.append(phi)
                if self.normalize:  # ‖Pᵀg‖: the JL estimate of ‖g‖
                    self.train_weights.append(_inverse_norms(phi.norm(dim=1)))
            return ids
        self._train_data = train_data
        if not self.normalize:  # nothing to compute: one pass for the ids
            return self.featurize(train_data, lambda b: {}, None, f"{self.name} ids",
                                  "train_data")["ids"]
        for c, task in enumerate(self.tasks):
            def norms(batch, task=task):
                # materialised per-example gradients: memory batch_size × p
                return {"norms": _squared_norms(task.grads(batch, self.output)).sqrt()}

            out = self.featurize(train_data, norms, f"norms_{c}",
                                 f"{self.name} train norms ({c + 1}/{len(self.tasks)})",
                                 "train_data")
            ids = same(out["ids"])
            self.train_weights.append(_inverse_norms(out["norms"]))
        return ids

    # ---------------------------------------------------------------------- score

    def _exact_queries(self, batch, c: int) -> dict:
        """``{name: [B, *shape]}``: the test gradients h_c (TracIn) or the mean unit
        per-timestep gradients (ReTrac; per-row gradients materialised, ``B·K × p``)."""
        task = self.tasks[c]
        if not self.normalize:
            return task.grads(batch, self.measurement)
        from ..grads import per_sample_grads

        fn, rows, _ = task._rows(batch, self.measurement, task.model)
        grads = per_sample_grads(task.model, fn, rows, params=task.params)  # one per row
        scale = _inverse_norms(_squared_norms(grads).sqrt()) / task.K
        out = {}
        for name, g in grads.items():
            w = scale.to(g.device).reshape(-1, *[1] * (g.dim() - 1))
            unit = (g.to(torch.float64) * w).reshape(-1, task.K, *g.shape[1:]).sum(1)
            out[name] = unit.to(torch.float32)
        return out

    def _test_chunks(self, test_data, size: int):
        """Lists of test batches holding about ``size`` samples each."""
        _, batches = self.task.batches(test_data, self.batch_size, "test_data", QUERY_IDS)
        group, count = [], 0
        for batch in batches:
            group.append(batch)
            count += batch[1].numel()
            if count >= size:
                yield group
                group, count = [], 0
        if group:
            yield group

    def _stream_train(self, c: int, queries: dict) -> torch.Tensor:
        """``[n_train, q]``: ⟨g_c(x_i), queries_j⟩ over the kept train data (fit order);
        shared out by rank under ``torch.distributed``."""
        task = self.tasks[c]
        total, batches = task.batches(self._train_data, self.batch_size, "train_data")
        pos = 0

        def check(batch):
            nonlocal pos
            ids = batch[1].cpu()
            if not torch.equal(ids, self.train_ids[pos:pos + ids.numel()]):
                raise ValueError("train_data yielded other ids than at fit: it must be "
                                 "re-iterable in a fixed order")
            pos += ids.numel()

        dots = streamed_rows(batches, lambda b: task.grads_matmul(b, queries, self.output,
                                                                  backend=self.backend),
                             total, f"{self.name} train ({c + 1}/{len(self.tasks)})",
                             self.progress, check)
        if pos != self.n_train:
            raise ValueError(f"train_data yielded {pos} samples at scoring, {self.n_train} at "
                             "fit: it must be re-iterable in a fixed order")
        return dots

    def _score_exact(self, test_data, query_chunk) -> torch.Tensor:
        rows = []
        for group in self._test_chunks(test_data, query_chunk):
            block = None
            for c, eta in enumerate(self.learning_rates):
                def make(group=group, c=c):
                    parts = [self._exact_queries(b, c) for b in group]
                    return {n: torch.cat([p[n] for p in parts]) for n in parts[0]}

                # rank 0 forms the query gradients; every rank streams its share of the train set
                queries = main_broadcast(make, next(self.tasks[c].model.parameters()).device)
                dots = self._stream_train(c, queries)              # [n_train, q]
                del queries
                if self.normalize:
                    dots = dots * self.train_weights[c][:, None]
                dots = eta * dots.T
                block = dots if block is None else block + dots
            rows.append(block.to(torch.float32))
        return torch.cat(rows)

    def score(self, test_data, query_chunk=None) -> torch.Tensor:
        """``Tensor[n_test, n_train]`` float32, ``score[x, i] > 0``: train sample i is a
        proponent of test sample x (columns in fit order, ``self.train_ids``; a bare Tensor
        of images gets the test ids ``QUERY_IDS + j``). ``query_chunk`` (exact mode): test
        samples whose gradients are held at once, default ``batch_size``; the train data is
        streamed once per chunk and checkpoint.

        Example::

            scores = TracIn(task, k=None).fit(train_images).score(test_images, query_chunk=64)
        """
        return super().score(test_data, query_chunk=query_chunk)

    def _score(self, test_data, query_chunk=None) -> torch.Tensor:
        if query_chunk is None:
            query_chunk = self.batch_size
        if isinstance(query_chunk, bool) or not isinstance(query_chunk, int) or query_chunk < 1:
            raise ValueError(f"query_chunk must be an int >= 1, got {query_chunk!r}")
        if self.exact:
            return self._score_exact(test_data, query_chunk)
        total = None
        for c, eta in enumerate(self.learning_rates):
            psi = self.query_features(test_data, c)[0]
            weights = self.train_weights[c] if self.normalize else None
            s = eta * chunked_scores(psi, self.train_features[c], weights)
            total = s if total is None else total + s
        return total


class ReTrac(TracIn):
    """Diffusion-ReTrac (Xie et al., TMLR 2024): TracIn with the train gradient divided by
    its norm and each per-timestep test gradient divided by its norm before the K-average,
    ``Σ_c η_c ⟨g_c(x_i)/‖g_c(x_i)‖, (1/K) Σ_t u_{c,t}(x)/‖u_{c,t}(x)‖⟩``.

    The options are those of ``TracIn``. The train norms:

    - projected (``k = int``): ``‖Pᵀ g_c(x_i)‖``, the Johnson–Lindenstrauss estimate of
      ``‖g_c(x_i)‖`` (relative error O(1/√k)), read off the stored train features at no
      cost; the per-timestep test norms are likewise ``‖Pᵀ u_t‖``;
    - exact (``k = None``): the true ``‖g_c(x_i)‖``, computed in ``fit`` from materialised
      per-example gradients (``task.grads``: memory ``batch_size × p`` per batch; for small
      models or LoRA parameters) and stored (``norms_c``, resumable); the test side
      materialises the per-timestep gradients of a test batch (``batch_size·K × p``).

    The train normalisation is a column weight ``1/‖g_c(x_i)‖`` at scoring time; a vanishing
    gradient scores 0.

    Example::

        retrac = ReTrac(DiffusionTask(unet, samples_per_example=10), k=4096).fit(train_images)
        scores = retrac.score(test_images)          # [n_test, n_train], > 0: proponent
        best = retrac.top_k(test_images, k=5).ids
    """

    name = "retrac"
    normalize = True
