"""What every attribution method shares: data passes with an optional on-disk store, the
TRAK-style kernel ``K_λ = ΦᵀΦ + λI`` with its eigendecomposition, chunked scoring, ``top_k``.

A method is constructed with a ``fastattr.diffusion.DiffusionTask`` and its options,
``fit(train_data)`` computes the train-side state (and writes it to ``store=`` when given,
chunk by chunk, so an interrupted fit resumes), ``score(test_data)`` returns
``Tensor[n_test, n_train]`` with the sign convention of shared/METHODS.md (> 0: the train
sample is a proponent, training on it lowers the test sample's loss).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .. import distributed
from ..diffusion import DiffusionTask

__all__ = ["AttributionMethod", "TopK", "Kernel", "check_lam", "chunked_scores", "streamed_rows",
           "main_broadcast", "QUERY_IDS"]

# a bare Tensor of test images gets ids QUERY_IDS + j: its noise ε(id, t) then differs from
# that of the training images (ids 0..n-1), which would otherwise share it position by position
QUERY_IDS = 1 << 40


class TopK(NamedTuple):
    """``values [n_test, k]`` and ``indices [n_test, k]`` (positions in the training data,
    in fit order) of the largest scores, and ``ids [n_test, k]`` (the training ids).

    Example::

        top = method.top_k(test_images, k=5)
        best_ids = top.ids[:, 0]
    """

    values: torch.Tensor
    indices: torch.Tensor
    ids: torch.Tensor


def check_lam(lam, allow_none: bool = True):
    """λ must be a float > 0 (or None for the method's relative default).

    Example::

        lam = check_lam(1e-2)        # ValueError for 0, negative or NaN
    """
    if lam is None and allow_none:
        return None
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) \
            or lam <= 0:
        raise ValueError(f"lam must be a finite float > 0 (the damping of the solve "
                         f"(ΦᵀΦ + λI)⁻¹){' or None' if allow_none else ''}, got {lam!r}")
    return float(lam)


def _progress(iterable, total, desc: str, enabled: bool):
    if not enabled or not distributed.is_main():   # one set of bars: rank 0's
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False)


class Kernel:
    """``ΦᵀΦ`` of train features (float64) and its eigendecomposition ``V diag(s) Vᵀ``, so
    that scores for any λ cost one small matmul: ``φᵀ K_λ⁻¹ φ_i = ((φV) / (s+λ)) · (φ_i V)``.

    ``rotated`` holds the train features in the eigenbasis ``ΦV`` (float32 ``[n, k]``).

    Example::

        kernel = Kernel(phi_train)                       # [n, k]
        scores = kernel.solve(phi_test, 0.1) @ kernel.rotated.T
    """

    def __init__(self, features: torch.Tensor):
        phi = features.to(torch.float64)
        group = distributed.current()
        # under torch.distributed each rank sums its slice of rows, reduced in float64, and
        # rank 0's eigendecomposition is broadcast: every rank holds the same V bit for bit
        part = phi[distributed.rank_slice(phi.shape[0], group)]
        gram = distributed.all_reduce(part.T @ part, group)
        if not torch.isfinite(gram).all():
            raise FloatingPointError("the train features contain NaN/Inf: the model's "
                                     "gradients overflowed or the data holds NaN")
        s, V = distributed.broadcast(
            tuple(torch.linalg.eigh(gram)) if distributed.is_main() else None, group)
        s, V = s.to(phi.device), V.to(phi.device)
        self.eigenvalues = s.clamp_min(0)
        self.V = V
        self.rotated = (phi @ V).to(torch.float32)

    @property
    def k(self) -> int:
        return self.V.shape[0]

    def default_lam(self) -> float:
        """λ when none is given: 0.1 × the mean eigenvalue of ΦᵀΦ (scale-free).

        Example::

            lam = kernel.default_lam()
        """
        return 0.1 * float(self.eigenvalues.mean()) or 1e-12

    def resolve(self, lam) -> float:
        lam = check_lam(lam)
        return self.default_lam() if lam is None else lam

    def solve(self, features: torch.Tensor, lam: float) -> torch.Tensor:
        """``(φ V) / (s + λ)``: test features ready to be dotted with ``rotated`` rows.

        Example::

            left = kernel.solve(phi_test, lam)    # scores = left @ kernel.rotated.T
        """
        rot = features.to(torch.float64) @ self.V.to(features.device)
        return (rot / (self.eigenvalues.to(features.device) + lam)).to(torch.float32)

    def leverage(self, lam: float) -> torch.Tensor:
        """Train self-leverage ``h_i = φ_iᵀ K_λ⁻¹ φ_i`` (float64 ``[n]``).

        Example::

            h = kernel.leverage(0.1)
        """
        r = self.rotated.to(torch.float64)
        return (r * r / (self.eigenvalues + lam)).sum(1)


class AttributionMethod:
    """Base class: data passes, the optional store, chunked scoring, ``top_k``.

    Subclasses implement ``_fit(train_data)`` and ``_score(test_data, **options)`` and set
    ``name``; ``options()`` returns what determines the train-side state (store config).

    Example::

        class MyMethod(AttributionMethod):
            name = "mine"
            def _fit(self, train_data): ...      # returns the train ids
            def _score(self, test_data): ...     # returns [n_test, n_train]
    """

    name = "method"

    def __init__(self, task: DiffusionTask, *, store=None, batch_size: int = 16,
                 progress: bool = True):
        if not isinstance(task, DiffusionTask):
            raise TypeError(f"task must be a fastattr.diffusion.DiffusionTask, got "
                            f"{type(task).__name__}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        self.task = task
        self.store_path = store
        self.batch_size = batch_size
        self.progress = bool(progress)
        self.train_ids = None
        self._store = None

    def __repr__(self) -> str:
        state = "unfitted" if self.train_ids is None else f"fitted on {self.n_train}"
        return f"{type(self).__name__}({self.task!r}, {state})"

    # ------------------------------------------------------------------ options / store

    def options(self) -> dict:
        """The method options that determine the train-side state.

        Example::

            method.options()      # e.g. {'k': 4096, 'projector': 'rademacher', ...}
        """
        return {}

    def models(self) -> list:
        """The models whose gradients are used (ensemble members / checkpoints).

        Example::

            len(method.models())
        """
        return [self.task.model]

    def store_config(self) -> dict:
        return {"method": self.name, "options": self.options(), "task": self.task.config(),
                "fingerprints": [self.task.fingerprint(m) for m in self.models()],
                "batch_size": self.batch_size}

    def store(self):
        """The ``FeatureStore`` of this method (opened on first use), or None.

        Example::

            store = method.store()
            store.chunks("features_0") if store else None
        """
        if self.store_path is None:
            return None
        if self._store is None:
            from ..store import FeatureStore

            self._store = FeatureStore(self.store_path, self.store_config())
        return self._store

    @property
    def n_train(self) -> int:
        self._require_fit()
        return self.train_ids.numel()

    def _require_fit(self):
        if self.train_ids is None:
            raise RuntimeError(f"{type(self).__name__} is not fitted: call fit(train_data) "
                               "before score / top_k")

    # ----------------------------------------------------------------------- passes

    def featurize(self, data, compute, name: str, desc: str, arg: str = "data") -> dict:
        """One pass over ``data``: ``compute(batch) -> {key: Tensor[B, ...]}`` per batch,
        concatenated (plus ``ids``). With a store and ``name``, each batch is a chunk:
        existing chunks are read back (their ids checked), missing ones computed and
        written atomically, so an interrupted pass resumes where it stopped.

        Under ``torch.distributed`` (``fastattr.distributed``) the missing chunks are shared
        out round robin, each rank computes (and writes) its own, and every rank returns the
        whole pass, as one process would.

        Example::

            out = method.featurize(data, lambda b: {"x": b[0].flatten(1)}, None, "pass")
        """
        total, batches = self.task.batches(data, self.batch_size, arg,
                                           QUERY_IDS if arg == "test_data" else 0)
        group = distributed.current()
        if group is not None and arg == "train_data":   # before the store is opened
            distributed.agree({**self.store_config(), "store": name is not None and
                               self.store_path is not None}, f"{self.name}'s config", group)
        store = self.store() if name is not None else None
        session = None
        if store is not None:
            session = distributed.check_shared(store, group)
        todo = None
        if group is not None and store is not None and total is not None:
            # share out only what is missing: a re-launch balances the work left
            todo = {i: pos % group.world for pos, i in enumerate(
                distributed.broadcast(store.missing(name, total), group))}
        parts, mine = {}, {}
        for index, batch in enumerate(_progress(batches, total, desc, self.progress)):
            ids = batch[1].cpu()
            if store is not None and store.has_chunk(name, index) and (
                    todo is None or index not in todo):
                parts[index] = self._read_chunk(store, name, index, ids)
                continue
            rank = todo.get(index, 0) if todo is not None else distributed.owner(index, group)
            if group is not None and rank != group.rank:
                parts[index] = ids                  # computed by another rank
                continue
            chunk = {k: v.detach().cpu() for k, v in compute(batch).items()}
            chunk["ids"] = ids
            if store is not None:
                store.write_chunk(name, index, chunk)
            parts[index] = mine[index] = chunk
        if not parts:
            raise ValueError(f"{arg} is empty")
        if store is not None:
            store.check_session(1 if group is None else group.world, session)
        if group is not None:
            parts = self._gather_chunks(parts, mine, store, name, group)
        chunks = [parts[i] for i in range(len(parts))]
        return {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]}

    @staticmethod
    def _read_chunk(store, name, index, ids) -> dict:
        chunk = {k: torch.from_numpy(v.copy()) for k, v in store.read_chunk(name, index).items()}
        if not torch.equal(chunk["ids"], ids):
            raise ValueError(
                f"store {store.path} chunk {index} of {name!r} holds other sample ids "
                "than this batch: the data (its order or batch_size) differs from the "
                "run that wrote the store; use a new store directory")
        return chunk

    def _gather_chunks(self, parts, mine, store, name, group) -> dict:
        """Fill the chunks other ranks computed (``parts[i]`` holds their ids): from the
        store when there is one, else by ``all_gather_object``; ids checked either way."""
        if store is not None:
            distributed.barrier(group)          # every rank's chunks are renamed in
            for index, part in parts.items():
                if isinstance(part, torch.Tensor):
                    parts[index] = self._read_chunk(store, name, index, part)
            return parts
        for theirs in distributed.all_gather(mine, group):
            for index, chunk in theirs.items():
                if not isinstance(parts[index], torch.Tensor):
                    continue
                if not torch.equal(chunk["ids"], parts[index]):
                    raise distributed.DistributedSetupError(
                        f"batch {index} holds other sample ids on another rank: every rank "
                        "must pass the same data in the same order (and batch_size)")
                parts[index] = chunk
        return parts

    # ----------------------------------------------------------------------- public

    def fit(self, train_data) -> "AttributionMethod":
        """Compute the train-side state from ``train_data`` (see ``DiffusionTask.batches``
        for the accepted forms); returns ``self``.

        Example::

            method = DTRAK(task, k=2048).fit(train_images)
        """
        ids = self._fit(train_data)
        if torch.unique(ids).numel() != ids.numel():
            raise ValueError("train_data holds repeated sample ids: ids must identify samples")
        self.train_ids = ids
        return self

    def score(self, test_data, **options) -> torch.Tensor:
        """``Tensor[n_test, n_train]`` float32: ``score[x, i] > 0`` means train sample i
        is a proponent of test sample x (columns in fit order: ``self.train_ids``).

        ``test_data`` takes the forms of ``fit``; a bare Tensor of images gets the ids
        ``QUERY_IDS + j`` (2⁴⁰ + j), so its noise draws differ from the training images'
        (give explicit ids to score training images against themselves).

        Example::

            scores = method.score(test_images)     # [n_test, n_train]
        """
        self._require_fit()
        return self._score(test_data, **options)

    def top_k(self, test_data, k: int = 10, **options) -> TopK:
        """The k strongest proponents of every test sample (``TopK``).

        Example::

            top = method.top_k(test_images, k=5)    # .values, .indices, .ids
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an int >= 1, got {k!r}")
        scores = self.score(test_data, **options)
        k = min(k, scores.shape[1])
        top = scores.topk(k, dim=1)
        return TopK(top.values, top.indices, self.train_ids[top.indices])

    # to implement
    def _fit(self, train_data) -> torch.Tensor:  # returns the train ids in fit order
        raise NotImplementedError

    def _score(self, test_data, **options) -> torch.Tensor:
        raise NotImplementedError


def chunked_scores(left: torch.Tensor, right: torch.Tensor, weights=None,
                   chunk: int = 8192) -> torch.Tensor:
    """``left @ right.T`` (``[n_test, n_train]`` float32) in train chunks, each column scaled
    by ``weights`` when given: bounded temporaries whatever n_train is.

    Example::

        scores = chunked_scores(left, kernel.rotated, weights=residuals)
    """
    group = distributed.current()
    # under torch.distributed each rank scores a slice of the train columns, then gathered
    cols = distributed.rank_slice(right.shape[0], group)
    right = right[cols]
    weights = None if weights is None else weights[cols]
    out = torch.empty(left.shape[0], right.shape[0], dtype=torch.float32)
    for j in range(0, right.shape[0], chunk):
        block = left @ right[j:j + chunk].to(left.device).T
        if weights is not None:
            block = block * weights[j:j + chunk].to(block.device, block.dtype)
        out[:, j:j + chunk] = block.cpu()
    return distributed.gather_columns(out, group)


def streamed_rows(batches, compute, total, desc: str, progress: bool,
                  check=None) -> torch.Tensor:
    """``torch.cat([compute(b) for b in batches])`` as float64 on the CPU: one pass of
    train gradients against fixed directions. Under ``torch.distributed`` each rank computes
    the batches it owns (round robin) and the rows are gathered, so every rank returns the
    whole. ``check(batch)`` runs on every batch (e.g. an ids check), owned or not.

    Example::

        dots = streamed_rows(batches, lambda b: task.grads_matmul(b, queries), None,
                             "train", progress=False)            # [n_train, q]
    """
    group = distributed.current()
    rank = 0 if group is None else group.rank
    rows = {}
    count = 0
    for index, batch in enumerate(_progress(batches, total, desc, progress)):
        count += 1
        if check is not None:
            check(batch)
        if distributed.owner(index, group) == rank:
            rows[index] = compute(batch).to(torch.float64).cpu()
    if group is not None:
        for theirs in distributed.all_gather(rows, group):
            rows.update(theirs)
    if count == 0:
        raise ValueError("the training data is empty")
    return torch.cat([rows[i] for i in range(count)])


def main_broadcast(make, device):
    """``make()`` run on rank 0 only and its result (a dict of tensors) broadcast to every
    rank, on ``device``: query directions are computed once. Without a process group, just
    ``make()``.

    Example::

        queries = main_broadcast(lambda: factors.precondition(task.grads(batch)), "cpu")
    """
    group = distributed.current()
    if group is None:
        return make()
    out = distributed.broadcast(make() if group.rank == 0 else None, group)
    return {k: v.to(device) for k, v in out.items()}
