"""The LDS harness of shared/METHODS.md: retrain on subsets, measure, correlate.

The linear datamodeling score (LDS) asks how well an attribution method predicts what
retraining does. Its pieces, each usable on its own and none tied to one benchmark:

1. ``subsets(n, M, alpha, seed)``: M random subsets of the training set, each of exactly
   ``round(alpha * n)`` samples, seeded (and prefix-stable: the first M of a larger draw
   are the same subsets, so adding subsets reuses the models already trained).
2. ``Retrainer``: trains one model per (subset, seed) with the user's
   ``train_fn(subset_indices, seed) -> model``, caches each on disk (atomic writes, a
   manifest with the config; a cache made with another config is refused with what
   differs), resumes an interrupted run (only the missing models train), runs in parallel
   worker processes (``workers=``) and uses the GPU when there is one.
3. ``measure``: ``F [M, n_test]``, each test sample's diffusion loss under every retrained
   model, averaged over a fixed set of (t, ε) draws keyed by (eval_seed, id(x), t) that is
   identical for every model (common random numbers: the measurement noise cancels
   between models), and over the seeds of a subset. Any other model: a plain
   ``measure_fn(model, test_data) -> [n_test]``.
4. ``lds(scores, masks, F)``: ``Ŷ[m, x] = Σ_{i∈S_m} score(x, i)`` and
   ``LDS = mean_x Spearman_m(Ŷ[m, x], −F[m, x])`` (the sign convention of METHODS.md: a
   positive score is a proponent, it lowers the test loss when included, hence the
   correlation with *minus* the loss), with a percentile bootstrap CI over subsets.
5. ``select_lambda``: λ picked on a held-out half of the test samples, LDS reported on the
   other half; the figure tuned on all test samples (what the papers report) beside it,
   labelled ``tuned_on_eval=True``.
6. ``counterfactual``: remove each test sample's top-k proponents vs k random samples,
   retrain (through the same cache), compare the change in its loss.

Example::

    from fastattr import lds
    retrainer = lds.Retrainer(train_fn, "runs/lds", n_train=len(train), num_subsets=64,
                              seeds=3, make_model=make_unet, workers=4)
    retrainer.run()                                   # resumable; skips cached models
    F = lds.measure(retrainer, test_images, DiffusionTask(unet, samples_per_example=100,
                                                          noise_seed=0))
    result = lds.lds(method.score(test_images), retrainer.masks, F)
    print(result)                                     # LDS 0.312 [0.281, 0.344] ...
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import math
import os
import pathlib
import pickle
import random
import re
from typing import NamedTuple

import numpy as np
import torch

from . import distributed
from .store import FeatureStore, _fsync_dir, _temp_name

__all__ = ["subsets", "Job", "Retrainer", "measure", "lds", "LDSResult", "select_lambda",
           "LambdaSelection", "counterfactual", "CounterfactualResult", "spearman"]

CACHE_FORMAT = 1
MODELS_DIR = "models"
_JOB_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,150}")


# ----------------------------------------------------------------------------- helpers


def _progress(iterable, total, desc: str, enabled: bool):
    from .methods.base import _progress as bar

    return bar(iterable, total, desc, enabled)


def _check_int(value, name: str, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def _check_fraction(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not 0.0 < float(value) < 1.0:
        raise ValueError(f"{name} must be a float in (0, 1), got {value!r}")
    return float(value)


def _seeds(seeds) -> list:
    if isinstance(seeds, (int, np.integer)) and not isinstance(seeds, bool):
        return list(range(_check_int(seeds, "seeds (a count)", 1)))
    try:
        out = [_check_int(s, "every seed") for s in seeds]
    except TypeError:
        raise TypeError(f"seeds must be an int (count) or a sequence of ints >= 0, got "
                        f"{seeds!r}") from None
    if not out or len(set(out)) != len(out):
        raise ValueError(f"seeds must be a non-empty sequence of distinct ints, got {seeds!r}")
    return out


def _float_array(value, name: str, ndim: int, shape_doc: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        array = value.detach().cpu().to(torch.float64).numpy()
    else:
        array = np.asarray(value, dtype=np.float64)
    if array.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D {shape_doc}, got shape {tuple(array.shape)}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    return array


def _masks_array(masks) -> np.ndarray:
    array = _float_array(masks, "masks", 2, "[M, n_train] (subset membership)")
    if not np.isin(array, (0.0, 1.0)).all():
        raise ValueError("masks must hold only 0/1 (or bool) entries: masks[m, i] says whether "
                         "train sample i is in subset m")
    return array


def _indices_digest(indices: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(indices, dtype="<i8").tobytes()).hexdigest()


def _nanmean(values: np.ndarray, axis: int) -> np.ndarray:
    """Mean over ``axis`` of the non-NaN entries; NaN (without a warning) where all are."""
    valid = ~np.isnan(values)
    count = valid.sum(axis)
    total = np.where(valid, values, 0.0).sum(axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


# ----------------------------------------------------------------------------- subsets


def subsets(n: int, num_subsets: int, alpha: float = 0.5, seed: int = 0) -> torch.Tensor:
    """``BoolTensor [num_subsets, n]``: M random subsets of ``range(n)``, each of exactly
    ``round(alpha * n)`` samples (halves round up).

    Subset m is drawn from its own generator keyed by ``(seed, m)`` (numpy ``SeedSequence``),
    so the result is reproducible on any machine and prefix-stable: the first M rows of
    ``subsets(n, 2 * M, ...)`` are ``subsets(n, M, ...)``.

    Example::

        masks = subsets(1000, 64, alpha=0.5, seed=0)      # [64, 1000], 500 True per row
        indices = masks[0].nonzero().squeeze(1)           # subset 0's sample indices
    """
    n = _check_int(n, "n", 2)
    num_subsets = _check_int(num_subsets, "num_subsets")
    alpha = _check_fraction(alpha, "alpha")
    seed = _check_int(seed, "seed")
    size = int(math.floor(alpha * n + 0.5))
    if not 0 < size < n:
        raise ValueError(f"alpha={alpha} of n={n} samples gives subsets of {size} samples; "
                         f"every subset must hold at least one sample and leave one out")
    masks = np.zeros((num_subsets, n), dtype=bool)
    for m in range(num_subsets):
        masks[m, np.random.default_rng([seed, m]).permutation(n)[:size]] = True
    return torch.from_numpy(masks)


# ----------------------------------------------------------------------------- retraining


class Job(NamedTuple):
    """One model to train: its cache ``name``, the training-set ``indices`` it trains on
    (sorted int64 numpy array) and the training ``seed``.

    Example::

        job = Job("subset_00003_seed_1", np.array([0, 2, 5]), 1)
    """

    name: str
    indices: np.ndarray
    seed: int


def _accepts_device(fn) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any((p.name == "device" and p.kind != p.POSITIONAL_ONLY) or p.kind == p.VAR_KEYWORD
               for p in params)


def _state_of(model, name: str):
    """(kind, CPU state dict) of what train_fn returned."""
    if isinstance(model, torch.nn.Module):
        return "module", {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    if isinstance(model, dict) and model and all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in model.items()):
        return "state", {k: v.detach().cpu().clone() for k, v in model.items()}
    raise TypeError(f"train_fn returned {type(model).__name__} for job {name}: it must return "
                    "an nn.Module or a non-empty dict {name: Tensor} (a state)")


def _save_atomic(path: pathlib.Path, payload: dict) -> None:
    """torch.save ``payload`` to ``path``: written to a hidden temp sibling, flushed and
    fsync'ed, renamed into place (``os.replace``), directory fsync'ed: the file appears whole
    or not at all. Temp files of killed writers are ``FeatureStore.clean_temp``'s."""
    tmp = path.parent / (_temp_name(path.stem) + ".pt")
    try:
        with open(tmp, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _train_job(train_fn, job: Job, device: str, path: str, pass_device: bool) -> str:
    """Train one job and write its model to ``path`` (run in the caller or a worker).

    The global RNGs are seeded with the job's seed for the call and restored after it."""
    devices = list(range(torch.cuda.device_count())) if str(device).startswith("cuda") else []
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(job.seed)
            np.random.seed(job.seed % 2**32)
            random.seed(job.seed)
            kwargs = {"device": device} if pass_device else {}
            model = train_fn(torch.from_numpy(job.indices.copy()), job.seed, **kwargs)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    kind, state = _state_of(model, job.name)
    _save_atomic(pathlib.Path(path), {
        "format": CACHE_FORMAT, "kind": kind, "name": job.name, "seed": int(job.seed),
        "num_indices": int(job.indices.size), "indices_sha256": _indices_digest(job.indices),
        "state": state})
    return job.name


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def _job_device(device: str, position: int) -> str:
    """``"cuda"`` spreads jobs over every visible GPU (round robin); others are kept. Under
    ``torch.distributed`` each rank keeps to its own GPU (``torch.cuda.current_device``)."""
    if device == "cuda" and distributed.current() is not None:
        return f"cuda:{torch.cuda.current_device()}"
    if device == "cuda" and torch.cuda.device_count() > 1:
        return f"cuda:{position % torch.cuda.device_count()}"
    return device


class Retrainer:
    """Trains and caches one model per (subset, seed) of the LDS protocol, and any other
    training job (``train``, used by ``counterfactual``).

    Args:
        train_fn: ``train_fn(subset_indices, seed) -> model``: trains on the training samples
            ``subset_indices`` (sorted int64 ``Tensor``, positions in the training set, the
            column order of the attribution scores) with training seed ``seed``, and returns an
            ``nn.Module`` (its ``state_dict`` is cached; pass ``make_model`` to load it back)
            or a dict ``{name: Tensor}`` (cached and returned as is). If it takes a ``device``
            keyword, the device to train on is passed. The global torch / numpy / random
            RNGs are seeded with ``seed`` for each call (so the same seed on two subsets
            starts from the same initialisation: common random numbers across subsets).
            With ``workers > 1`` it runs in spawned processes and must be picklable: a
            module-level function (or a ``functools.partial`` of one) of an importable
            module, not a lambda or a nested function; a script defining it must guard its
            main code with ``if __name__ == "__main__":``.
        cache_dir: the cache directory (created): ``manifest.json`` (the config) and
            ``models/<job name>.pt`` (``torch.save`` of the state and what it was trained on).
        n_train: the size of the training set.
        num_subsets: M, the number of LDS subsets (0: a cache for ``train`` jobs only).
        seeds: training seeds per subset: a count S (seeds ``0..S-1``) or a list of ints.
        alpha: the fraction of the training set in each subset.
        subset_seed: the seed of ``subsets``.
        make_model: ``make_model() -> nn.Module``, a fresh model of ``train_fn``'s
            architecture to load a cached ``state_dict`` into (needed to load modules).
        config: a JSON dict describing the training recipe (hyperparameters, data version);
            recorded in the manifest. Default ``{"train_fn": "<module>.<qualname>"}``.
        workers: parallel training processes (torch multiprocessing, spawn context); 1
            trains in this process. Each worker uses ``cpu_count // workers`` threads.
        device: where models are trained (passed to ``train_fn`` when it takes ``device``)
            and loaded: default "cuda" when a GPU is there, else "cpu". "cuda" spreads the
            jobs over every visible GPU.
        progress: tqdm progress bars.

    The manifest records ``n_train``, ``alpha``, ``subset_seed`` and ``config``; opening
    the cache with other values raises ``fastattr.store.StoreConfigError`` naming each
    difference. ``num_subsets`` and ``seeds`` are not recorded: raising them later trains
    only the new models (subsets are prefix-stable). Each model file appears whole or not
    at all (temp file, fsync, rename), so a killed run leaves only complete models and a
    re-run trains only the missing ones.

    Example::

        def train_fn(indices, seed, device="cpu"):          # module level: picklable
            return train_unet(train_images[indices], seed=seed, device=device)

        retrainer = Retrainer(train_fn, "runs/lds", n_train=len(train_images),
                              num_subsets=64, seeds=3, make_model=make_unet, workers=4)
        retrainer.run()                   # trains what is missing
        model = retrainer.model(0, seed=2)
    """

    def __init__(self, train_fn, cache_dir, n_train: int, num_subsets: int = 0, seeds=1,
                 alpha: float = 0.5, subset_seed: int = 0, *, make_model=None, config=None,
                 workers: int = 1, device=None, progress: bool = True):
        if not callable(train_fn):
            raise TypeError(f"train_fn must be a callable (subset_indices, seed) -> model, got "
                            f"{type(train_fn).__name__}")
        if make_model is not None and not callable(make_model):
            raise TypeError("make_model must be a callable () -> nn.Module")
        if config is not None and not isinstance(config, dict):
            raise TypeError(f"config must be a JSON dict describing the training recipe, got "
                            f"{type(config).__name__}")
        self.train_fn = train_fn
        self.make_model = make_model
        self.n_train = _check_int(n_train, "n_train", 2)
        self.num_subsets = _check_int(num_subsets, "num_subsets")
        self.seeds = _seeds(seeds)
        self.alpha = _check_fraction(alpha, "alpha")
        self.subset_seed = _check_int(subset_seed, "subset_seed")
        self.workers = _check_int(workers, "workers", 1)
        self.device = str(device) if device is not None else (
            "cuda" if torch.cuda.is_available() else "cpu")
        self.progress = bool(progress)
        self.masks = subsets(self.n_train, self.num_subsets, self.alpha, self.subset_seed)
        name = f"{getattr(train_fn, '__module__', '?')}." \
               f"{getattr(train_fn, '__qualname__', type(train_fn).__name__)}"
        self.config = {"protocol": "fastattr.lds.Retrainer", "n_train": self.n_train,
                       "alpha": self.alpha, "subset_seed": self.subset_seed,
                       "train": {"train_fn": name} if config is None else config}
        self.cache = FeatureStore(cache_dir, self.config)
        self.cache_dir = self.cache.path
        self.models_dir = self.cache_dir / MODELS_DIR
        self.models_dir.mkdir(exist_ok=True)

    def __repr__(self) -> str:
        return (f"Retrainer({str(self.cache_dir)!r}, n_train={self.n_train}, "
                f"num_subsets={self.num_subsets}, seeds={self.seeds}, alpha={self.alpha})")

    # ------------------------------------------------------------------ jobs

    @staticmethod
    def subset_job_name(m: int, seed: int) -> str:
        """The cache name of subset ``m``'s model with training seed ``seed``.

        Example::

            Retrainer.subset_job_name(3, 1)        # 'subset_00003_seed_1'
        """
        return f"subset_{m:05d}_seed_{seed}"

    def subset_job(self, m: int, seed: int) -> Job:
        """The ``Job`` of subset ``m`` with training seed ``seed``.

        Example::

            job = retrainer.subset_job(0, 0)
            job.indices                            # subset 0's sorted sample indices
        """
        m = _check_int(m, "m")
        if m >= self.num_subsets:
            raise IndexError(f"subset {m} out of range: the retrainer has num_subsets="
                             f"{self.num_subsets}")
        indices = np.flatnonzero(self.masks[m].numpy()).astype(np.int64)
        return Job(self.subset_job_name(m, _check_int(seed, "seed")), indices, int(seed))

    def jobs(self) -> list:
        """Every (subset, seed) ``Job``, subset-major.

        Example::

            len(retrainer.jobs())                  # num_subsets * len(seeds)
        """
        return [self.subset_job(m, s) for m in range(self.num_subsets) for s in self.seeds]

    def path(self, name: str) -> pathlib.Path:
        """The cache file of job ``name``.

        Example::

            retrainer.path("subset_00000_seed_0")  # .../models/subset_00000_seed_0.pt
        """
        if not isinstance(name, str) or not _JOB_NAME.fullmatch(name):
            raise ValueError(f"a job name must be a simple file name (letters, digits, '_', "
                             f"'-', '.'; not starting with '.'), got {name!r}")
        return self.models_dir / f"{name}.pt"

    def has(self, name: str) -> bool:
        """Whether the model of job ``name`` is in the cache (complete).

        Example::

            retrainer.has("subset_00000_seed_0")
        """
        return self.path(name).is_file()

    def missing(self, jobs=None) -> list:
        """The jobs (default: every subset job) whose model is not cached yet.

        Example::

            print(len(retrainer.missing()), "models to train")
        """
        return [job for job in (self.jobs() if jobs is None else jobs) if not self.has(job.name)]

    # ------------------------------------------------------------------ training

    def run(self) -> list:
        """Train every subset model that is not cached; returns the names trained now.

        Example::

            trained = retrainer.run()      # [] when everything is cached
        """
        return self.train(self.jobs(), desc="retraining subsets")

    def train(self, jobs, desc: str = "retraining") -> list:
        """Train the ``jobs`` (a list of ``Job``) whose model is not cached, in this process
        (``workers=1``) or in ``workers`` spawned processes; returns the names trained now.
        Each model is written to the cache as soon as it is trained.

        Example::

            keep = np.setdiff1d(np.arange(n), removed)
            retrainer.train([Job("without_outliers_seed_0", keep, 0)])
        """
        jobs = [self._check_job(job) for job in jobs]
        names = [job.name for job in jobs]
        if len(set(names)) != len(names):
            raise ValueError("jobs holds two jobs with the same name")
        group = distributed.current()
        if group is not None:
            return self._train_distributed(jobs, desc, group)
        todo = self.missing(jobs)
        if todo:
            self._train_here(todo, desc)
        return [job.name for job in todo]

    def _train_here(self, todo: list, desc: str) -> None:
        """Train ``todo`` into the cache: in this process (``workers=1``) or in ``workers``
        spawned processes."""
        pass_device = _accepts_device(self.train_fn)
        if self.workers == 1:
            for pos, job in enumerate(_progress(todo, len(todo), desc, self.progress)):
                _train_job(self.train_fn, job, _job_device(self.device, pos),
                           str(self.path(job.name)), pass_device)
        else:
            self._train_parallel(todo, desc, pass_device)

    def _train_distributed(self, jobs: list, desc: str, group) -> list:
        """Under ``torch.distributed``: rank 0's list of missing jobs is shared out round
        robin, each rank trains its share (with its own ``workers``) into the common cache,
        and every rank returns, once all are done, every name trained now."""
        distributed.agree({"config": self.config, "jobs": [
            (j.name, _indices_digest(j.indices), j.seed) for j in jobs]},
            "the retraining jobs", group)
        distributed.check_shared(self.cache, group)
        names = distributed.broadcast([j.name for j in self.missing(jobs)], group)
        by_name = {j.name: j for j in jobs}
        mine = [by_name[n] for n in names[group.rank::group.world]]
        if mine:
            self._train_here(mine, f"{desc} (rank {group.rank})")
        distributed.barrier(group)
        lost = [n for n in names if not self.has(n)]
        if lost:
            raise distributed.DistributedSetupError(
                f"rank {group.rank} does not see {len(lost)} models the other ranks trained "
                f"into {self.models_dir} (e.g. {lost[0]}): the cache directory must be shared")
        return names

    def _train_parallel(self, todo: list, desc: str, pass_device: bool) -> None:
        from concurrent.futures import ProcessPoolExecutor, as_completed
        from concurrent.futures.process import BrokenProcessPool

        try:
            pickle.dumps(self.train_fn)
        except Exception as err:
            raise TypeError(f"train_fn must be picklable for workers={self.workers} (a "
                            "module-level function of an importable module or a "
                            "functools.partial of one; not a lambda or a nested function): "
                            f"{err}") from None
        ctx = torch.multiprocessing.get_context("spawn")
        threads = max(1, (os.cpu_count() or 1) // self.workers)
        pool = ProcessPoolExecutor(max_workers=min(self.workers, len(todo)), mp_context=ctx,
                                   initializer=_init_worker, initargs=(threads,))
        try:
            futures = {pool.submit(_train_job, self.train_fn, job, _job_device(self.device, pos),
                                   str(self.path(job.name)), pass_device): job
                       for pos, job in enumerate(todo)}
            for future in _progress(as_completed(futures), len(futures), desc, self.progress):
                try:
                    future.result()            # a job's exception surfaces here
                except BrokenProcessPool as err:
                    raise RuntimeError(f"a retraining worker died (while training "
                                       f"{futures[future].name} or another job): {err}") from err
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _check_job(self, job) -> Job:
        if not isinstance(job, tuple) or len(job) != 3:
            raise TypeError(f"a job is Job(name, indices, seed), got {job!r:.80}")
        name, indices, seed = job
        self.path(name)
        indices = np.asarray(indices.cpu() if isinstance(indices, torch.Tensor) else indices)
        if indices.ndim != 1 or indices.size == 0 or indices.dtype.kind not in "iu":
            raise ValueError(f"job {name}: indices must be a non-empty 1-D integer array")
        indices = np.unique(indices.astype(np.int64))
        if indices[0] < 0 or indices[-1] >= self.n_train:
            raise ValueError(f"job {name}: indices must lie in [0, n_train={self.n_train})")
        return Job(name, indices, _check_int(seed, f"job {name}'s seed"))

    # ------------------------------------------------------------------ loading

    def load(self, job):
        """The cached model of ``job`` (a ``Job``, or a job name): ``make_model()`` with the
        cached ``state_dict`` loaded, on ``device``, in eval mode; or the cached state dict
        when ``train_fn`` returned one. A ``Job`` is checked against what the file was
        trained on.

        Example::

            model = retrainer.load(retrainer.subset_job(0, 0))
        """
        job = job if isinstance(job, str) else self._check_job(job)
        name = job if isinstance(job, str) else job.name
        path = self.path(name)
        if not path.is_file():
            raise FileNotFoundError(f"no cached model {name} in {self.models_dir}: train it "
                                    "first (Retrainer.run / Retrainer.train)")
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(job, str) and payload.get("indices_sha256") != \
                _indices_digest(job.indices):
            raise ValueError(f"cached model {path} was trained on other samples than job "
                             f"{name} asks for; delete it or use another cache_dir")
        if payload.get("kind") == "state":
            return {k: v.to(self.device) for k, v in payload["state"].items()}
        if self.make_model is None:
            raise ValueError(f"cached model {name} is an nn.Module's state_dict: pass "
                             "make_model=<callable returning a fresh model> to the Retrainer "
                             "to load it")
        model = self.make_model()
        model.load_state_dict(payload["state"])
        return model.to(self.device).eval()

    def model(self, m: int, seed: int):
        """The cached model of subset ``m`` with training seed ``seed`` (see ``load``).

        Example::

            model = retrainer.model(3, seed=0)
        """
        return self.load(self.subset_job(m, seed))


# ----------------------------------------------------------------------------- measurement


def _model_device(model) -> torch.device:
    if isinstance(model, torch.nn.Module):
        for tensor in list(model.parameters()) + list(model.buffers()):
            return tensor.device
    return torch.device("cpu")


def _to_device(batch, device):
    def move(v):
        if isinstance(v, dict):
            return {k: move(x) for k, x in v.items()}
        return v.to(device) if isinstance(v, torch.Tensor) else v

    return tuple(move(v) for v in batch)


def _cat_conditions(conds):
    if conds[0] is None:
        return None
    if isinstance(conds[0], dict):
        return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}
    return torch.cat(conds)


def _select_condition(cond, index):
    if cond is None:
        return None
    if isinstance(cond, dict):
        return {k: v[index] for k, v in cond.items()}
    return cond[index]


class _Measurer:
    """Losses of the test samples under one model: ``measurer(model, index=None)`` ->
    float64 numpy ``[n]`` (every test sample, or those at ``index``)."""

    def __init__(self, test_data, task_or_fn, eval_seeds=None, output="loss",
                 batch_size: int = 64):
        from .diffusion import DiffusionTask, _check_output
        from .methods.base import QUERY_IDS

        self.batch_size = _check_int(batch_size, "batch_size", 1)
        self.n_test = None
        if isinstance(task_or_fn, DiffusionTask):
            self.task, self.fn = task_or_fn, None
            self.output = _check_output(output)
            self.eval_seeds = [task_or_fn.noise_seed] if eval_seeds is None else \
                _seeds(list(eval_seeds))
            _, batches = task_or_fn.batches(test_data, self.batch_size, "test_data", QUERY_IDS)
            parts = list(batches)
            self.images = torch.cat([b[0] for b in parts])
            self.ids = torch.cat([b[1] for b in parts])
            self.cond = _cat_conditions([b[2] if len(b) == 3 else None for b in parts])
            self.n_test = self.ids.numel()
        elif callable(task_or_fn):
            if eval_seeds is not None:
                raise ValueError("eval_seeds applies to a DiffusionTask measurement; a "
                                 "measure_fn draws its own noise")
            self.task, self.fn, self.data = None, task_or_fn, test_data
        else:
            raise TypeError("task_or_fn must be a fastattr.diffusion.DiffusionTask or a "
                            "callable measure_fn(model, test_data) -> Tensor[n_test], got "
                            f"{type(task_or_fn).__name__}")

    def __call__(self, model, index=None) -> np.ndarray:
        if self.fn is not None:
            out = self.fn(model, self.data)
            out = _float_array(out, "measure_fn's result", 1, "[n_test]")
            if self.n_test is None:
                self.n_test = out.size
            elif out.size != self.n_test:
                raise ValueError(f"measure_fn returned {out.size} losses for one model and "
                                 f"{self.n_test} for another: it must give one per test sample")
            return out if index is None else out[index]
        return self._diffusion_losses(model, index)

    def _diffusion_losses(self, model, index) -> np.ndarray:
        images, ids, cond = self.images, self.ids, self.cond
        if index is not None:
            index = torch.as_tensor(np.asarray(index, dtype=np.int64))
            images, ids, cond = images[index], ids[index], _select_condition(cond, index)
        data = (images, ids) if cond is None else (images, ids, cond)
        task = self.task.with_model(model)
        device = _model_device(model)
        total = torch.zeros(ids.numel(), dtype=torch.float64)
        for seed in self.eval_seeds:
            task.noise_seed = seed
            _, batches = task.batches(data, self.batch_size, "test_data")
            total += torch.cat([task.values(_to_device(b, device), output=self.output)
                                .double().mean(1).cpu() for b in batches])
        return (total / len(self.eval_seeds)).numpy()


def _model_grid(models) -> list:
    """``models`` as a list of M lists of seed models."""
    if isinstance(models, (str, bytes)) or not hasattr(models, "__len__") or not len(models):
        raise TypeError("models must be a Retrainer or a non-empty list with one entry per "
                        "subset (a model, or a list of models trained with different seeds)")
    return [list(entry) if isinstance(entry, (list, tuple)) else [entry] for entry in models]


def measure(models, test_data, task_or_fn, *, eval_seeds=None, output="loss",
            batch_size: int = 64, progress: bool = True) -> torch.Tensor:
    """``F [M, n_test]`` (float64): the loss of every test sample under every subset's
    model(s), averaged over the seeds of a subset.

    Args:
        models: a ``Retrainer`` (every subset × seed model, loaded one at a time; all must be
            trained), or a list with one entry per subset: a model or a list of seed models.
        test_data: the test samples: for a ``DiffusionTask`` a Tensor of images (ids
            ``QUERY_IDS + j``, as ``method.score`` gives them), a tuple
            ``(images, ids[, condition])`` or an iterable of such batches; for a
            ``measure_fn`` whatever it takes.
        task_or_fn: a ``fastattr.diffusion.DiffusionTask`` (its model is ignored): the loss
            is ``task.with_model(model).values(batch, output).mean(1)``, the mean over the
            task's K draws (t, ε(eval_seed, id, t)) with ``timesteps="uniform"`` (the grid) or
            "random" (keyed by (eval_seed, id)). The draws depend on the sample id only,
            never on the model, batch or position: every model sees the same (t, ε) (common
            random numbers). Or a callable ``measure_fn(model, test_data) -> [n_test]``
            for any other model.
        eval_seeds: noise seeds to average over (each a full set of K draws); default the
            task's ``noise_seed``.
        output: the measured output function (default "loss", the protocol's).
        batch_size: test samples per forward pass (the result does not depend on it).
        progress: a tqdm bar over the models.

    Example::

        task = DiffusionTask(unet, samples_per_example=100, timesteps="uniform")
        F = measure(retrainer, test_images, task, eval_seeds=[0, 1, 2])     # [64, n_test]
        F = measure([[m0a, m0b], [m1a, m1b]], x, lambda model, x: mse(model, x))
    """
    measurer = _Measurer(test_data, task_or_fn, eval_seeds, output, batch_size)
    if isinstance(models, Retrainer):
        missing = models.missing()
        if models.num_subsets == 0:
            raise ValueError("the Retrainer has num_subsets=0: there is nothing to measure")
        if missing:
            raise ValueError(f"{len(missing)} of the retrainer's {len(models.jobs())} models "
                             "are not trained yet: call retrainer.run() first")
        grid = [[models.subset_job(m, s) for s in models.seeds]
                for m in range(models.num_subsets)]
        load = models.load
    else:
        grid, load = _model_grid(models), (lambda model: model)
    total = sum(len(row) for row in grid)
    pairs = ((m, entry) for m, row in enumerate(grid) for entry in row)
    rows = [[] for _ in grid]
    for m, entry in _progress(pairs, total, "measuring", progress):
        rows[m].append(measurer(load(entry)))
    return torch.from_numpy(np.stack([np.mean(np.stack(r), 0) for r in rows]))


# ----------------------------------------------------------------------------- LDS


def spearman(a, b, axis: int = 0) -> np.ndarray:
    """Spearman rank correlation of ``a`` and ``b`` along ``axis`` (ties get average
    ranks: the Pearson correlation of the rank vectors, as ``scipy.stats.spearmanr``);
    NaN where either is constant along ``axis``.

    Example::

        spearman([1, 2, 2, 3], [1, 3, 2, 4])      # 0.9487 (ties: ranks 1, 2.5, 2.5, 4)
    """
    from scipy.stats import rankdata

    ra = rankdata(np.asarray(a, dtype=np.float64), method="average", axis=axis)
    rb = rankdata(np.asarray(b, dtype=np.float64), method="average", axis=axis)
    ra = ra - ra.mean(axis, keepdims=True)
    rb = rb - rb.mean(axis, keepdims=True)
    den = np.sqrt((ra * ra).sum(axis) * (rb * rb).sum(axis))
    with np.errstate(invalid="ignore", divide="ignore"):
        # a constant vector has all ranks equal to (n+1)/2 exactly: centred ranks are 0
        return np.where(den > 0, (ra * rb).sum(axis) / np.where(den > 0, den, 1.0), np.nan)


@dataclasses.dataclass
class LDSResult:
    """An LDS figure: ``mean`` over test samples of the per-test Spearman correlation,
    with the percentile bootstrap CI ``[ci_low, ci_high]`` over subsets.

    Fields:
        mean, ci_low, ci_high: the LDS and its CI (NaN bounds when ``num_bootstrap=0``).
        per_test: float64 ``[n_test]`` Spearman of each test sample; NaN where Ŷ or F is
            constant across the subsets (the correlation is undefined).
        num_undefined: how many test samples are NaN; they are left out of ``mean``.
        num_subsets, num_bootstrap, ci_level: M, resamples, the CI's coverage.
        lam: the λ of the scores, when chosen by ``select_lambda``.
        tuned_on_eval: True when λ was chosen on the very test samples the figure is
            measured on (optimistic; what the papers report).
        test_index: the test samples the figure is over (None: all).

    Example::

        result = lds(scores, masks, F)
        print(f"{100 * result.mean:.1f} ± {100 * result.half_width:.1f}")
        json.dump(result.as_dict(), fh)
    """

    mean: float
    ci_low: float
    ci_high: float
    per_test: np.ndarray
    num_undefined: int
    num_subsets: int
    num_bootstrap: int
    ci_level: float
    lam: float | None = None
    tuned_on_eval: bool = False
    test_index: np.ndarray | None = None

    @property
    def half_width(self) -> float:
        """Half the CI's width (the "±" of a table).

        Example::

            result.half_width        # 0.031
        """
        return (self.ci_high - self.ci_low) / 2

    def as_dict(self) -> dict:
        """JSON-ready dict (arrays as lists, NaN as None).

        Example::

            json.dumps(result.as_dict())
        """
        def clean(v):
            if isinstance(v, np.ndarray):
                return [clean(x) for x in v.tolist()]
            if isinstance(v, float) and not math.isfinite(v):
                return None
            return v

        return {f.name: clean(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def __str__(self) -> str:
        label = "" if self.lam is None else f", λ={self.lam:g}"
        label += " (λ tuned on the evaluation set)" if self.tuned_on_eval else ""
        undefined = f", {self.num_undefined} undefined" if self.num_undefined else ""
        ci = "" if math.isnan(self.ci_low) else \
            f" [{self.ci_low:.3f}, {self.ci_high:.3f}] ({100 * self.ci_level:g}% CI)"
        return (f"LDS {self.mean:.3f}{ci}, n_test={self.per_test.size}{undefined}, "
                f"M={self.num_subsets}{label}")


def _predictions(scores: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """``Ŷ [M, n_test]``: the sum of each test sample's scores over each subset."""
    return masks @ scores.T


def _check_lds_inputs(scores, masks, F, scores_name: str = "scores"):
    masks = _masks_array(masks)
    scores_shape = tuple(scores.shape)
    if scores_shape[-1] != masks.shape[1]:
        raise ValueError(f"{scores_name} has {scores_shape[-1]} train columns but masks has "
                         f"{masks.shape[1]} (scores [n_test, n_train], masks [M, n_train])")
    if masks.shape[0] < 2:
        raise ValueError(f"masks must hold at least 2 subsets (rows), got {masks.shape[0]}")
    F = _float_array(F, "F", 2, "[M, n_test] (losses)")
    if F.shape != (masks.shape[0], scores_shape[-2]):
        raise ValueError(f"F has shape {F.shape} but masks has M={masks.shape[0]} subsets and "
                         f"{scores_name} n_test={scores_shape[-2]} test samples: F must be "
                         f"[M, n_test] = {(masks.shape[0], scores_shape[-2])}")
    return masks, F


def _bootstrap(Yhat: np.ndarray, negF: np.ndarray, num_bootstrap: int, seed: int) -> np.ndarray:
    """LDS of ``num_bootstrap`` resamples (with replacement) of the M subsets."""
    M, n = Yhat.shape
    rng = np.random.default_rng(seed)
    out = np.empty(num_bootstrap)
    per_chunk = max(1, (1 << 22) // max(1, M * n))        # ~32 MB float64 temporaries
    for start in range(0, num_bootstrap, per_chunk):
        count = min(per_chunk, num_bootstrap - start)
        rows = rng.integers(0, M, size=(count, M))
        out[start:start + count] = _nanmean(spearman(Yhat[rows], negF[rows], axis=1), axis=1)
    return out


def _lds_of(Yhat, negF, num_bootstrap, ci, seed, **labels) -> LDSResult:
    per_test = spearman(Yhat, negF, axis=0)
    num_undefined = int(np.isnan(per_test).sum())
    mean = float(_nanmean(per_test, axis=0))
    low = high = math.nan
    if num_bootstrap:
        boot = _bootstrap(Yhat, negF, num_bootstrap, seed)
        if not np.isnan(boot).all():
            low, high = (float(v) for v in np.nanpercentile(
                boot, [100 * (1 - ci) / 2, 100 * (1 + ci) / 2]))
    return LDSResult(mean, low, high, per_test, num_undefined, Yhat.shape[0], num_bootstrap,
                     ci, **labels)


def lds(scores, masks, F, *, num_bootstrap: int = 1000, ci: float = 0.95,
        seed: int = 0) -> LDSResult:
    """The linear datamodeling score of ``scores`` against retraining.

    ``Ŷ[m, x] = Σ_{i∈S_m} scores[x, i]`` predicts the effect of training on subset m;
    ``LDS = mean_x Spearman_m(Ŷ[m, x], −F[m, x])`` (minus the loss: a positive score means
    a proponent, which lowers the loss, so a good attributor correlates positively).
    Ties get average ranks. A test sample whose Ŷ or F is the same for every subset has no
    correlation: its ``per_test`` entry is NaN and it is left out of the mean (counted in
    ``num_undefined``; all undefined gives a NaN mean). The CI is the percentile interval
    of the LDS over ``num_bootstrap`` resamples of the M subsets with replacement
    (``seed``ed; 0 resamples: no CI).

    Args:
        scores: ``[n_test, n_train]`` attribution scores (columns: the train indices that
            ``train_fn`` receives).
        masks: ``[M, n_train]`` bool/0-1 subset membership (``Retrainer.masks``).
        F: ``[M, n_test]`` losses of the test samples under each subset's model(s)
            (``measure``).

    Example::

        result = lds(method.score(test_images), retrainer.masks, F)
        result.mean, result.ci_low, result.ci_high, result.per_test
    """
    num_bootstrap = _check_int(num_bootstrap, "num_bootstrap")
    ci = _check_fraction(ci, "ci")
    seed = _check_int(seed, "seed")
    scores = _float_array(scores, "scores", 2, "[n_test, n_train]")
    masks, F = _check_lds_inputs(scores, masks, F)
    return _lds_of(_predictions(scores, masks), -F, num_bootstrap, ci, seed)


@dataclasses.dataclass
class LambdaSelection:
    """λ chosen on a held-out half of the test samples (``tune_index``) and the LDS with
    it on the other half (``heldout``, over ``eval_index``); beside it the figure of the λ
    that is best on all test samples (``tuned_on_eval``, labelled ``tuned_on_eval=True``:
    optimistic, what the papers report).

    Fields: ``lam``, ``heldout``, ``lam_tuned_on_eval``, ``tuned_on_eval``, ``lams``,
    ``lds_tune [L]`` (mean LDS of each λ on the tuning half), ``lds_all [L]`` (on all test
    samples), ``tune_index``, ``eval_index``.

    Example::

        sel = select_lambda(method.sweep_lambda(test_images, lams), lams, masks, F)
        print(sel.lam, sel.heldout, sel.tuned_on_eval)
    """

    lam: float
    heldout: LDSResult
    lam_tuned_on_eval: float
    tuned_on_eval: LDSResult
    lams: list
    lds_tune: np.ndarray
    lds_all: np.ndarray
    tune_index: np.ndarray
    eval_index: np.ndarray

    def as_dict(self) -> dict:
        """JSON-ready dict (nested results, arrays as lists, NaN as None).

        Example::

            json.dumps(selection.as_dict())
        """
        def clean(v):
            if isinstance(v, LDSResult):
                return v.as_dict()
            if isinstance(v, np.ndarray):
                return [None if isinstance(x, float) and not math.isfinite(x) else x
                        for x in v.tolist()]
            return v

        return {f.name: clean(getattr(self, f.name)) for f in dataclasses.fields(self)}


def select_lambda(sweep, lams, masks, F, *, split_seed: int = 0, num_bootstrap: int = 1000,
                  ci: float = 0.95, seed: int = 0) -> LambdaSelection:
    """Pick λ on half the test samples, report the LDS on the other half.

    The test samples are split by a permutation seeded with ``split_seed``: the first
    ``n_test // 2`` tune, the rest evaluate. λ maximises the mean LDS (``lds`` without
    bootstrap) on the tuning half (the first of equal ones); the held-out figure is
    ``lds`` of that λ's scores on the evaluation half (with its bootstrap CI). The λ best
    on all test samples and its LDS over all of them come beside, labelled
    ``tuned_on_eval=True``.

    Args:
        sweep: ``[L, n_test, n_train]`` scores for each λ (``method.sweep_lambda``).
        lams: the L values of λ.
        masks, F: as for ``lds``.

    Example::

        lams = [1e-3, 1e-2, 1e-1, 1.0]
        sel = select_lambda(dtrak.sweep_lambda(test_images, lams), lams, retrainer.masks, F)
        print(sel.heldout)          # LDS ... λ=0.01
        print(sel.tuned_on_eval)    # LDS ... λ=0.01 (λ tuned on the evaluation set)
    """
    num_bootstrap = _check_int(num_bootstrap, "num_bootstrap")
    ci = _check_fraction(ci, "ci")
    seed = _check_int(seed, "seed")
    sweep = _float_array(sweep, "sweep", 3, "[L, n_test, n_train] (method.sweep_lambda)")
    lams = [float(v) for v in lams]
    if len(lams) != sweep.shape[0]:
        raise ValueError(f"lams holds {len(lams)} values but sweep has L={sweep.shape[0]} "
                         "score matrices (sweep [L, n_test, n_train])")
    masks, F = _check_lds_inputs(sweep, masks, F, "sweep")
    n_test = sweep.shape[1]
    if n_test < 2:
        raise ValueError(f"select_lambda needs at least 2 test samples to split, got {n_test}")
    perm = np.random.default_rng(_check_int(split_seed, "split_seed")).permutation(n_test)
    tune, held = np.sort(perm[:n_test // 2]), np.sort(perm[n_test // 2:])
    negF = -F
    per_test = np.stack([spearman(_predictions(s, masks), negF, axis=0) for s in sweep])
    lds_tune, lds_all = _nanmean(per_test[:, tune], 1), _nanmean(per_test, 1)
    if np.isnan(lds_tune).all() or np.isnan(lds_all).all():
        raise ValueError("every λ's LDS is undefined (Ŷ or F constant across subsets for every "
                         "test sample)")
    best, best_all = int(np.nanargmax(lds_tune)), int(np.nanargmax(lds_all))
    heldout = _lds_of(_predictions(sweep[best][held], masks), negF[:, held], num_bootstrap,
                      ci, seed, lam=lams[best], test_index=held)
    on_eval = _lds_of(_predictions(sweep[best_all], masks), negF, num_bootstrap, ci, seed,
                      lam=lams[best_all], tuned_on_eval=True)
    return LambdaSelection(lams[best], heldout, lams[best_all], on_eval, lams, lds_tune,
                           lds_all, tune, held)


# ----------------------------------------------------------------------------- counterfactual


@dataclasses.dataclass
class CounterfactualResult:
    """The counterfactual check: for each test sample, the change of its loss when its
    top-k proponents are removed from the training set (``delta_top``) and when k random
    samples are (``delta_random``), against the model trained on everything
    (``base_loss``); all averaged over training seeds.

    ``mean_difference = mean(delta_top − delta_random)`` (> 0: removing the proponents
    hurts more than removing random samples, as a good attributor predicts), ``stderr``
    its standard error over test samples, ``fraction_top_greater`` the share of test
    samples with ``delta_top > delta_random``.

    Example::

        res = counterfactual(scores, retrainer, test_images, task, k=10)
        print(res.mean_difference, "+-", res.stderr)
    """

    delta_top: np.ndarray
    delta_random: np.ndarray
    base_loss: np.ndarray
    mean_difference: float
    stderr: float
    fraction_top_greater: float
    k: int
    seeds: list
    test_index: np.ndarray

    def as_dict(self) -> dict:
        """JSON-ready dict (arrays as lists).

        Example::

            json.dumps(result.as_dict())
        """
        return {f.name: (v.tolist() if isinstance(v, np.ndarray) else v)
                for f in dataclasses.fields(self) for v in [getattr(self, f.name)]}


def _removal_job(removed: np.ndarray, n: int, seed: int) -> Job:
    removed = np.unique(removed.astype(np.int64))
    keep = np.setdiff1d(np.arange(n, dtype=np.int64), removed)
    return Job(f"cf_{_indices_digest(removed)[:20]}_seed_{seed}", keep, seed)


def counterfactual(scores, retrainer: Retrainer, test_data, task_or_fn, k: int, *,
                   seeds=None, random_seed: int = 0, test_index=None, eval_seeds=None,
                   output="loss", batch_size: int = 64,
                   progress: bool | None = None) -> CounterfactualResult:
    """Retrain without each test sample's top-k proponents and without k random samples,
    and compare the change of its loss.

    For every test sample x (or those of ``test_index``): the k largest ``scores[x]`` (ties:
    the lower index first) and k distinct random samples (a generator keyed by
    ``(random_seed, x)``) are removed in turn; ``retrainer.train_fn`` trains on the rest
    with each seed, through the retrainer's cache (job names ``cf_<digest of the removed
    set>_seed_<s>``, the full model ``full_seed_<s>``; the same removed set is trained
    once), in its worker processes. The loss of x is measured as in ``measure``.

    Args:
        scores: ``[n_test, n_train]``, columns the indices ``train_fn`` receives.
        retrainer: a ``Retrainer`` (its train_fn, cache, workers and device; its subsets are
            not used: ``num_subsets=0`` is fine).
        test_data, task_or_fn, eval_seeds, output, batch_size: as for ``measure``.
        k: samples removed, ``1 <= k < n_train``.
        seeds: training seeds (default the retrainer's).
        progress: default the retrainer's.

    Example::

        retrainer = Retrainer(train_fn, "runs/cf", n_train=n, make_model=make_unet)
        res = counterfactual(dtrak.score(test_images), retrainer, test_images, task, k=50)
        res.mean_difference         # > 0 when removing proponents raises the loss more
    """
    if not isinstance(retrainer, Retrainer):
        raise TypeError(f"retrainer must be a fastattr.lds.Retrainer (wrap your train_fn in "
                        f"one), got {type(retrainer).__name__}")
    scores = _float_array(scores, "scores", 2, "[n_test, n_train]")
    n_test, n = scores.shape
    if n != retrainer.n_train:
        raise ValueError(f"scores has {n} train columns but the retrainer's n_train is "
                         f"{retrainer.n_train}")
    k = _check_int(k, "k", 1)
    if k >= n:
        raise ValueError(f"k must be < n_train={n}, got {k}")
    seeds = retrainer.seeds if seeds is None else _seeds(seeds)
    progress = retrainer.progress if progress is None else bool(progress)
    index = np.arange(n_test) if test_index is None else np.asarray(test_index, dtype=np.int64)
    if index.ndim != 1 or index.size == 0 or index.min() < 0 or index.max() >= n_test:
        raise ValueError(f"test_index must be a non-empty 1-D array of rows of scores "
                         f"(0..{n_test - 1})")
    measurer = _Measurer(test_data, task_or_fn, eval_seeds, output, batch_size)
    if measurer.n_test is not None and measurer.n_test != n_test:
        raise ValueError(f"test_data holds {measurer.n_test} test samples but scores has "
                         f"{n_test} rows")

    full = {s: Job(f"full_seed_{s}", np.arange(n, dtype=np.int64), s) for s in seeds}
    plan = {}                                           # x -> (top jobs, random jobs)
    for x in index.tolist():
        top = np.argsort(-scores[x], kind="stable")[:k]
        rand = np.random.default_rng([_check_int(random_seed, "random_seed"), x]).choice(
            n, size=k, replace=False)
        plan[x] = ([_removal_job(top, n, s) for s in seeds],
                   [_removal_job(rand, n, s) for s in seeds])
    jobs = {job.name: job for job in full.values()}
    for top_jobs, rand_jobs in plan.values():
        jobs.update({job.name: job for job in top_jobs + rand_jobs})
    retrainer.train(list(jobs.values()), desc="counterfactual retraining")

    base = np.mean([measurer(retrainer.load(full[s]), index) for s in seeds], axis=0)
    delta_top, delta_rand = np.empty(index.size), np.empty(index.size)
    for pos, x in enumerate(_progress(index.tolist(), index.size, "counterfactual losses",
                                      progress)):
        top_jobs, rand_jobs = plan[x]
        delta_top[pos] = np.mean([measurer(retrainer.load(j), [x])[0] for j in top_jobs])
        delta_rand[pos] = np.mean([measurer(retrainer.load(j), [x])[0] for j in rand_jobs])
    delta_top -= base
    delta_rand -= base
    diff = delta_top - delta_rand
    stderr = float(diff.std(ddof=1) / math.sqrt(diff.size)) if diff.size > 1 else math.nan
    return CounterfactualResult(delta_top, delta_rand, base, float(diff.mean()), stderr,
                                float((diff > 0).mean()), k, list(seeds), index)
