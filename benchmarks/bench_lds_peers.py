"""The reference libraries on fastattr's digits LDS benchmark: LDS and wall time beside
fastattr's own methods, on the same trained models and the same LDS ground truth.

What is compared (peer -> the fastattr method it is set against, run in the same process):

  traker         trak 0.3.2 ``TRAKer``: D-TRAK (f = ``square``, mean over pixels of ε_θ²) with
                 a ``ModelOutput`` on the diffusion task, trak's own ``BasicProjector``
                 (Rademacher, fp32, same k), out-to-loss term 1 (D-TRAK has no Q)  -> dtrak
  traker-trak    the same with f = ``loss`` (the training loss, TRAK)              -> trak
  kronfluence    kronfluence 1.0.1 EK-FAC influence: ``Analyzer.fit_all_factors`` (strategy
                 "ekfac", the true-Fisher / GGN-model of the Gaussian output, as fastattr's
                 default ``ggn="model"``) + ``compute_pairwise_scores``, measurement = loss
                                                                                   -> kfac
  dattri-tracin  dattri 0.3.0 ``TracInAttributor`` on the full model's checkpoints weighted by
                 their learning rates, projected gradients (same k)                -> tracin
  dattri-trak    dattri 0.3.0 ``TRAKAttributor``: TRAK with f = ``loss`` on both sides,
                 correct-probability term off (Q = 1, as fastattr's TRAK)          -> trak

How: ``fastattr.digits_lds.ground_truth`` trains (or loads from ``--cache-dir``) the full model,
its TracIn checkpoints and the subset models and measures the test sets; every attributor,
peer or fastattr, is judged by ``fastattr.lds`` on those masks and measurements. Every peer
sees the same per-example objective as fastattr: the K (t, ε) draws of
``fastattr.diffusion.DiffusionTask`` (uniform timestep grid, noise ε(id, t) from Philox)
and its output functions (``output_values``), averaged over the K draws per image. Peers
that only take per-sample inputs get the K noisy rows of an image as one sample
(``[K, C, H, W]``, vmapped); kronfluence, whose per-sample gradients are per datum, gets each
(x_t, t, ε) row as one datum and its row-pair scores are averaged over each image's K × K
block (= the scores of the K-averaged gradients, as fastattr's; the curvature is the
average over the n·K rows in both).

λ: a method with a λ (TRAK kernels, influence damping) is scored on a grid and λ is picked
on a held-out half of the test samples (``fastattr.lds.select_lambda``), the protocol of
``fastattr lds``. Grids: the TRAK-like peers use fastattr's relative grid
``lam_scales × 0.1 · mean eigenvalue of their own ΦᵀΦ`` (traker: from its stored features;
dattri, which takes λ only at construction and exposes no features: fastattr TRAK's base
divided by the number of parameters p, since dattri divides gradients by √p before the
same-scale JL projection -- and one dattri fit per λ, its API recomputing the gradients);
EK-FAC uses fastattr's absolute damping grid ``kfac_damping`` on both sides (kronfluence's
sampled targets ``y = ε_θ + √(d/2)·ξ`` give the same Fisher scale as fastattr's GGN-model, so
absolute λ mean the same); one ``compute_pairwise_scores`` per damping (kronfluence takes
one damping per call). TracIn has no λ.

Times: wall seconds of fit + scoring both test sets over the whole λ grid, LDS computation
excluded, for the peer and for its fastattr method; ratio = peer / fastattr (> 1: fastattr
is faster). ``agreement``: mean over test samples of the Spearman correlation between the
peer's and fastattr's scores of one test sample (at fastattr's held-out λ position of the
grid): a low figure means the two do not compute the same thing. A peer that cannot run
gets a row with its status and the reason, never a number.

Commands (from the repository root)::

    python benchmarks/bench_lds_peers.py --size quick --cache-dir ~/.cache/fastattr \\
        --peers traker,kronfluence,dattri-tracin,dattri-trak --json benchmarks/out/lds_peers_quick.json
    python benchmarks/bench_lds_peers.py --size full --cache-dir ~/.cache/fastattr \\
        --json benchmarks/out/lds_peers_full.json
    python benchmarks/bench_lds_peers.py --tiny --cache-dir /tmp/peers --json /tmp/peers.json

``--tiny`` is the smoke test's size (tests/test_digits_lds.py's with two-point λ grids; under
a minute; its figures are noise). On a machine shared with other jobs pass ``--threads 1``:
two spinning OpenMP threads per process against busy cores made the peers ~20x slower.

Checks of the setup (tests/test_bench_lds_peers.py): TRAKer fed fastattr's own projection
matrix (``fastattr.integrations.trak.FastattrProjector``) ranks the training images as
fastattr's dtrak does (per-test Spearman >= 0.99 at every λ), so the peer sees the same
objective, noise and timesteps; with trak's own matrix the agreement is the projection noise
(tiny size, measured: 0.36-0.60 at k = 32, 0.73-0.82 at k = 256, 0.67-0.94 at k = 1024).
trak 0.3.2 needs a workaround (``finalize``) for its BasicProjector after finalize_features.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import math
import os
import sys
import tempfile
import time
import traceback
import warnings

import numpy as np
import torch

try:
    import fastattr  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_common import _version, machine_info, write_json_atomic  # noqa: E402

from fastattr.diffusion import DiffusionTask, _noised, output_values  # noqa: E402
from fastattr.digits_lds import (  # noqa: E402
    SIZES, LDSSize, _lam_grid, _method, _table, format_lds, ground_truth,
    lds_entry as digits_lds_entry, relative_grid)
from fastattr.lds import spearman  # noqa: E402

# tests/test_digits_lds.py's tiny size, with two-point λ grids (the smoke test's budget)
TINY = LDSSize(n_train=12, steps=4, batch_size=8, num_subsets=4, seeds=1, n_val=4, n_gen=2,
               K=1, k=32, eval_K=2, eval_seeds=(0,), checkpoints=2, sample_steps=4,
               lam_scales=(0.1, 1.0), kfac_damping=(1e-4, 1e-3))

BATCH = 16  # images per gradient pass, fastattr's methods' default
DATTRI_TRACIN_BATCH = 128  # dattri's TracIn: fewer train batches, fewer test-gradient passes
SPLITS = ("val", "gen")


@dataclasses.dataclass
class PeerRun:
    """What a peer produced: ``scores`` (split -> ``[L, n_test, n_train]`` in fastattr's sign
    convention, L = len(lams), or L = 1 without λ), the λ grid (None: no λ), how λ was
    handled, and the wall seconds of fit + scoring."""

    scores: dict
    lams: list | None
    lam_protocol: str
    seconds: float
    extra: dict = dataclasses.field(default_factory=dict)


# ---------------------------------------------------------------- the shared diffusion objective


def image_rows(task: DiffusionTask, images: torch.Tensor, ids: torch.Tensor, device):
    """``(x_t [B, K, C, H, W], t [B, K], ε [B, K, C, H, W])``: the K noisy rows of every image
    under fastattr's protocol (the task's timestep set, Philox noise ε(id, t))."""
    rows = _noised(images, ids, None, task.K, task.alphas_cumprod, task.timesteps,
                   task.noise_seed)
    B, K, shape = images.shape[0], task.K, tuple(images.shape[1:])
    return (rows.x_t.reshape(B, K, *shape).to(device), rows.t.reshape(B, K).to(device),
            rows.eps.reshape(B, K, *shape).to(device))


def image_output(task: DiffusionTask, output: str, model, params, x_t, t, eps) -> torch.Tensor:
    """One image's ``(1/K) Σ_t f(θ; x, t, ε(x, t))`` with ``params`` (torch.func style), the
    per-example objective of fastattr's methods (``DiffusionTask._rows``)."""
    pred = torch.func.functional_call(model, params, (x_t, t))
    pred = getattr(pred, "sample", pred)
    return output_values(output, pred, eps, t, task.alphas_cumprod).mean()


def row_loaders(task, data, device, batch_size: int = BATCH):
    """A torch DataLoader (no shuffle) of the per-image rows of ``data = (images, ids)``."""
    from torch.utils.data import DataLoader, TensorDataset

    return DataLoader(TensorDataset(*image_rows(task, data[0], data[1], device)),
                      batch_size=batch_size, shuffle=False)


def joined_test_set(gt):
    """Both test sets as one ``(images, ids)``: one pass of a peer over the train set scores
    them all (``split_test_set`` takes the result apart)."""
    sets = list(gt.test_sets.values())
    return torch.cat([d[0] for d in sets]), torch.cat([torch.as_tensor(d[1]) for d in sets])


def split_test_set(gt, scores: torch.Tensor) -> dict:
    """``[L, n_val + n_gen, n_train]`` scores of ``joined_test_set`` -> split -> ``[L, n, n_train]``."""
    out, start = {}, 0
    for split, data in gt.test_sets.items():
        out[split] = scores[:, start:start + len(data[1])]
        start += len(data[1])
    return out


def _n_params(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------- traker


def finalize(traker, projector) -> None:
    """``traker.finalize_features`` for model 0, working around a trak 0.3.2 bug: it frees
    BasicProjector's matrix, which project() then reuses without regenerating when there is
    one block (k <= block_size = 100), and a second finalize fails deleting it again (both
    AttributeError). Regenerating it from its saved generator state gives the same matrix."""
    traker.finalize_features(model_ids=[0])
    if getattr(projector, "proj_matrix_available", True) is False:
        projector.generate_sketch_matrix(projector.generator_states[0])


def run_traker(ctx, output: str = "square") -> PeerRun:
    """trak's TRAKer on the diffusion task, one model: D-TRAK (``output="square"``, against
    fastattr's dtrak) or TRAK (``output="loss"``, against fastattr's trak)."""
    from trak import TRAKer
    from trak.modelout_functions import AbstractModelOutput
    from trak.projectors import BasicProjector, ProjectionType

    task, cfg, gt, dev = ctx["task"], ctx["cfg"], ctx["gt"], ctx["device"]

    class DiffusionOutput(AbstractModelOutput):
        """f (square: D-TRAK's mean ε_θ²; loss: the training loss) averaged over the K draws;
        no out-to-loss term (Q = 1, as fastattr's TRAK and D-TRAK)."""

        def __init__(self):
            super().__init__()

        def get_output(self, model, weights, buffers, x_t, t, eps):
            return image_output(task, output, model, (weights, buffers), x_t, t, eps)

        def get_out_to_loss_grad(self, model, weights, buffers, batch):
            return torch.ones(batch[0].shape[0], 1, device=batch[0].device)

    model = copy.deepcopy(gt.model)
    p = _n_params(model)
    # trak's own CPU projector, asked for fastattr's default kind (Rademacher) and fp32;
    # ctx["traker_projector"](grad_dim, k, device) swaps it (the tests pass fastattr's matrix
    # through fastattr.integrations.trak to check that the scores then equal dtrak's)
    make = ctx.get("traker_projector")
    projector = make(p, cfg.k, dev) if make else BasicProjector(
        grad_dim=p, proj_dim=cfg.k, seed=0, proj_type=ProjectionType.rademacher, device=dev,
        dtype=torch.float32)
    state = model.state_dict()
    with tempfile.TemporaryDirectory(dir=ctx["work_dir"]) as save_dir:
        clock = time.perf_counter()
        traker = TRAKer(model=model, task=DiffusionOutput(), train_set_size=len(gt.train[1]),
                        save_dir=save_dir, device=dev, projector=projector,
                        use_half_precision=False, logging_level=logging.ERROR)
        traker.load_checkpoint(state, model_id=0)
        for batch in row_loaders(task, gt.train, dev):
            traker.featurize(batch=batch, num_samples=batch[0].shape[0])
        # fastattr's λ grid relative to 0.1 × the mean eigenvalue of this ΦᵀΦ (its trace / k)
        X = torch.as_tensor(np.asarray(traker.saver.current_store["grads"]), dtype=torch.float64)
        lams = relative_grid(0.1 * float(X.square().sum()) / cfg.k, cfg)
        traker.score_computer.lambda_reg = lams[0]
        finalize(traker, projector)
        for split, data in gt.test_sets.items():
            traker.start_scoring_checkpoint(exp_name=split, checkpoint=state, model_id=0,
                                            num_targets=len(data[1]))
            for batch in row_loaders(task, data, dev):
                traker.score(batch=batch, num_samples=batch[0].shape[0])
        sweeps = {s: [] for s in gt.test_sets}
        for lam in lams:
            # re-finalize with this λ: trak keeps the features, only (ΦᵀΦ + λI)⁻¹ changes
            traker.score_computer.lambda_reg = lam
            traker.saver.model_ids[0]["is_finalized"] = 0
            finalize(traker, projector)
            for split in gt.test_sets:
                # trak returns [n_train, n_test]; same sign as fastattr (gradients of the same f
                # on both sides, positive = proponent), so only a transpose
                s = torch.as_tensor(np.asarray(traker.finalize_scores(exp_name=split)))
                sweeps[split].append(s.T.double())
        seconds = time.perf_counter() - clock
    return PeerRun({s: torch.stack(v) for s, v in sweeps.items()}, lams,
                   "select_lambda over fastattr's relative grid (lam_scales x 0.1 mean "
                   "eigenvalue of trak's own Phi^T Phi); trak's BasicScoreComputer rescales "
                   "(Phi^T Phi + lam I)^-1 by a constant, which the LDS ignores", seconds)


# ------------------------------------------------------------------------------- kronfluence


def run_kronfluence(ctx) -> PeerRun:
    """kronfluence's EK-FAC influence with fastattr's damping grid (one scoring per damping)."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from torch.utils.data import TensorDataset

    task, cfg, gt, dev = ctx["task"], ctx["cfg"], ctx["gt"], ctx["device"]
    logging.getLogger("kronfluence").setLevel(logging.ERROR)
    d = math.prod(gt.train[0].shape[1:])
    # the loss is the mean over d pixels of (ε_θ − y)²: its Hessian in ε_θ is (2/d) I. With
    # y ~ N(ε_θ, (d/2) I) the sampled gradient (2/d)(ε_θ − y) has covariance (2/d) I, so the
    # true Fisher kronfluence fits equals fastattr's GGN-model in expectation (same scale,
    # hence the same absolute damping grid means the same)
    sigma = math.sqrt(d / 2)

    class DiffusionRowsTask(Task):
        """Each (x_t, t, ε) row of fastattr's protocol is one datum; loss = mean_pixels."""

        def compute_train_loss(self, batch, model, sample=False):
            x_t, t, eps = batch
            pred = model(x_t, t).sample
            if sample:
                with torch.no_grad():
                    eps = pred + sigma * torch.randn_like(pred)
            return output_values("loss", pred, eps, t).sum()

        def compute_measurement(self, batch, model):
            return self.compute_train_loss(batch, model)

    def rows(data):
        x_t, t, eps = image_rows(task, data[0], data[1], dev)
        return TensorDataset(x_t.flatten(0, 1), t.flatten(0, 1), eps.flatten(0, 1))

    K, n = task.K, len(gt.train[1])
    lams = list(cfg.kfac_damping)
    torch.manual_seed(0)  # kronfluence's sampled targets
    with tempfile.TemporaryDirectory(dir=ctx["work_dir"]) as out_dir:
        clock = time.perf_counter()
        ktask = DiffusionRowsTask()
        model = prepare_model(copy.deepcopy(gt.model), ktask)
        analyzer = Analyzer("peers", model, ktask, cpu=dev == "cpu", disable_tqdm=True,
                            disable_model_save=True, output_dir=out_dir)
        train_rows = rows(gt.train)
        # both test sets in one query set: one pass over the train rows per damping
        query = rows(joined_test_set(gt))
        analyzer.fit_all_factors("ekfac", train_rows, per_device_batch_size=BATCH * K,
                                 factor_args=FactorArguments(strategy="ekfac"),
                                 overwrite_output_dir=True)
        sweep = []
        for i, lam in enumerate(lams):
            analyzer.compute_pairwise_scores(f"scores_{i}", "ekfac", query, train_rows,
                                             per_device_query_batch_size=BATCH * K,
                                             per_device_train_batch_size=BATCH * K,
                                             score_args=ScoreArguments(damping_factor=lam),
                                             overwrite_output_dir=True)
            kf = analyzer.load_pairwise_scores(f"scores_{i}")["all_modules"].double().cpu()
            # row-pair scores -> image pairs: the mean over each K x K block is the score of
            # the K-averaged gradients. Sign: kronfluence's score is g_qᵀ(F + λI)⁻¹g_j, > 0 when
            # removing j raises the test loss: fastattr's convention (proponent), no flip
            sweep.append(kf.reshape(-1, K, n, K).mean((1, 3)))
        seconds = time.perf_counter() - clock
    return PeerRun(split_test_set(gt, torch.stack(sweep)), lams,
                   "select_lambda over fastattr's absolute damping grid kfac_damping (same "
                   "Fisher scale); one compute_pairwise_scores per damping", seconds)


# ------------------------------------------------------------------------------------- dattri


def _dattri_task(ctx, output: str, models):
    from dattri.task import AttributionTask

    task = ctx["task"]
    model = copy.deepcopy(ctx["gt"].model)

    def per_image(params, data):
        x_t, t, eps = data
        return image_output(task, output, model, params, x_t, t, eps)

    return AttributionTask(loss_func=per_image, model=model,
                           checkpoints=[copy.deepcopy(m.state_dict()) for m in models])


def _projector_kwargs(cfg, dev) -> dict:
    # a full dict: dattri updates its module-level defaults in place with what it is given
    return {"proj_dim": cfg.k, "proj_max_batch_size": 32, "proj_seed": 0, "device": dev}


def run_dattri_tracin(ctx) -> PeerRun:
    """dattri's TracIn over the full model's checkpoints, η_c = their learning rates."""
    from dattri.algorithm.tracin import TracInAttributor

    task, cfg, gt, dev = ctx["task"], ctx["cfg"], ctx["gt"], ctx["device"]
    ckpts = gt.checkpoints
    clock = time.perf_counter()
    attributor = TracInAttributor(_dattri_task(ctx, "loss", ckpts.models),
                                  torch.tensor([float(v) for v in ckpts.learning_rates]),
                                  normalized_grad=False,
                                  projector_kwargs=_projector_kwargs(cfg, dev), device=dev)
    # both test sets in one query loader. dattri recomputes the test gradients for every
    # train batch: with fastattr's 16 images per batch that is 32 passes over the 128 test
    # images (about 2 hours here), so dattri gets its best setting, batches of 128 images
    # (4 train batches, 1 test batch); its per-sample gradients of 128 images fit in memory
    both = joined_test_set(gt)
    # dattri returns [n_train, n_test] of Σ_c η_c ⟨g_c(train), g_c(test)⟩ with loss gradients
    # on both sides: > 0 = proponent, fastattr's sign; only a transpose
    joined = attributor.attribute(row_loaders(task, gt.train, dev, DATTRI_TRACIN_BATCH),
                                  row_loaders(task, both, dev, DATTRI_TRACIN_BATCH)
                                  ).T.double()[None]
    scores = split_test_set(gt, joined)
    seconds = time.perf_counter() - clock
    return PeerRun(scores, None, "no lambda", seconds,
                   {"checkpoints": len(ckpts.models), "batch_size": DATTRI_TRACIN_BATCH,
                    "learning_rates": [float(v) for v in ckpts.learning_rates]})


def run_dattri_trak(ctx) -> PeerRun:
    """dattri's TRAK (f = loss, Q = 1) on the full model, one fit per λ of the grid."""
    from dattri.algorithm.trak import TRAKAttributor

    task, cfg, gt, dev = ctx["task"], ctx["cfg"], ctx["gt"], ctx["device"]
    base = ctx["fastattr_trak_base"]
    if base is None:
        raise RuntimeError("needs fastattr's trak in the same run (its kernel sets the λ grid)")
    # dattri divides the gradients by √p before a JL projection of fastattr's scale: its ΦᵀΦ
    # is fastattr's / p, so is the grid's base
    lams = relative_grid(base / _n_params(gt.model), cfg)

    def no_correct_probability(params, data):
        # Q = 1 − p = 1: TRAK for diffusion has no out-to-loss term (fastattr's TRAK neither)
        return data[0].sum() * 0.0

    sweep = []
    clock = time.perf_counter()
    dtask = _dattri_task(ctx, "loss", [gt.model])
    train = row_loaders(task, gt.train, dev)
    test = row_loaders(task, joined_test_set(gt), dev)
    for lam in lams:
        # dattri takes λ (regularization) at construction and recomputes the gradients in
        # cache(): one fit per λ is what its API offers
        attributor = TRAKAttributor(dtask, no_correct_probability,
                                    projector_kwargs=_projector_kwargs(cfg, dev), device=dev,
                                    regularization=lam)
        attributor.cache(train)
        # [n_train, n_test] of φ_testᵀ(ΦᵀΦ + λI)⁻¹φ_train with loss gradients on both sides:
        # > 0 = proponent, fastattr's sign; only a transpose
        sweep.append(attributor.attribute(test).T.double())
    seconds = time.perf_counter() - clock
    return PeerRun(split_test_set(gt, torch.stack(sweep)), lams,
                   "select_lambda over fastattr's relative grid, base = fastattr trak's "
                   "0.1 mean eigenvalue / p (dattri's feature scale); one dattri fit per lambda",
                   seconds, {"seconds_per_lambda": seconds / len(lams)})


# (peer, library distribution, what it runs, fastattr method, runner)
PEERS = {
    "traker": ("traker", "TRAKer D-TRAK (f=square)", "dtrak", run_traker),
    "traker-trak": ("traker", "TRAKer TRAK (f=loss)", "trak",
                    lambda ctx: run_traker(ctx, output="loss")),
    "kronfluence": ("kronfluence", "EK-FAC influence", "kfac", run_kronfluence),
    "dattri-tracin": ("dattri", "TracInAttributor", "tracin", run_dattri_tracin),
    "dattri-trak": ("dattri", "TRAKAttributor TRAK (f=loss)", "trak", run_dattri_trak),
}


# ------------------------------------------------------------------------------ evaluation


def lds_entry(sweep: torch.Tensor, lams, masks, F) -> dict:
    """The LDS of scores ``[L, n_test, n_train]`` as ``fastattr.digits_lds._evaluate`` reports
    it: held-out λ (and the eval-tuned figure beside) or, without λ, the plain LDS; plus the
    grid position of the chosen λ (for ``agreement``)."""
    entry = digits_lds_entry(sweep[0] if lams is None else sweep, lams, masks, F)
    entry["lam_index"] = None if lams is None else lams.index(entry["lam"])
    return entry


def run_fastattr(name: str, ctx) -> PeerRun:
    """fastattr's method as ``fastattr lds`` runs it, timed the same way as the peers."""
    task, cfg, gt = ctx["task"], ctx["cfg"], ctx["gt"]
    clock = time.perf_counter()
    method = _method(name, task, cfg, gt.checkpoints, ctx["progress"]).fit(gt.train)
    lams = _lam_grid(name, method, cfg)
    scores = {s: (method.score(data)[None] if lams is None else method.sweep_lambda(data, lams))
              for s, data in gt.test_sets.items()}
    seconds = time.perf_counter() - clock
    extra = {}
    if name == "trak":
        extra["base_lam"] = method.kernels[0].default_lam()
    return PeerRun({s: v.double().cpu() for s, v in scores.items()}, lams,
                   "no lambda" if lams is None else "select_lambda over the size's grid",
                   seconds, extra)


def agreement(peer: PeerRun, ours: PeerRun, ours_lds: dict) -> dict:
    """Per split: mean over test samples of Spearman(peer scores, fastattr scores) at
    fastattr's held-out λ position of the grid (both grids have the same positions)."""
    out = {}
    for split, theirs in peer.scores.items():
        i = ours_lds[split]["lam_index"] or 0
        j = min(i, theirs.shape[0] - 1)
        rho = spearman(theirs[j].numpy(), ours.scores[split][i].numpy(), axis=1)
        out[split] = None if np.isnan(rho).all() else float(np.nanmean(rho))
    return out


def _fmt_lds(entry) -> str:
    return format_lds(entry["heldout"]) if entry else "-"


def format_table(rows: list) -> str:
    """(method, library, LDS val, LDS gen, seconds, ratio vs fastattr) per row."""
    table = [("method", "library", "LDS val % (held-out λ)", "LDS gen %", "seconds",
              "ratio vs fastattr", "agreement")]
    for r in rows:
        if r["status"] != "ok":
            table.append((r["method"], r["library"], r["status"], r["reason"][:60], "-", "-",
                          "-"))
            continue
        agree = r.get("agreement")
        table.append((r["method"], r["library"], _fmt_lds(r["lds"]["val"]),
                      _fmt_lds(r["lds"]["gen"]), f"{r['seconds']:.2f}",
                      "1 (reference)" if r["library"] == "fastattr" else f"{r['ratio']:.2f}",
                      "-" if not agree else " / ".join(
                          "n/a" if v is None else f"{v:.2f}" for v in agree.values())))
    return _table(table)


def _row(method, library, version, status, **fields) -> dict:
    return dict(method=method, library=library, version=version, status=status, **fields)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="quick")
    parser.add_argument("--tiny", action="store_true",
                        help="the smoke test's size (overrides --size; figures are noise)")
    parser.add_argument("--cache-dir", default=None,
                        help="cache of the trained models (default fastattr's cache dir)")
    parser.add_argument("--peers", default=",".join(PEERS),
                        help=f"comma-separated, of {', '.join(PEERS)}")
    parser.add_argument("--json", default=None, help="write the rows and machine record here")
    parser.add_argument("--workers", type=int, default=1, help="retraining processes")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--progress", action="store_true", help="progress bars")
    args = parser.parse_args(argv)
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = [p for p in peers if p not in PEERS]
    if unknown or not peers:
        parser.error(f"--peers must be names from {', '.join(PEERS)}, got {unknown or peers}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.progress:
        os.environ["TQDM_DISABLE"] = "1"  # dattri's and trak's bars (tqdm >= 4.66)
        warnings.filterwarnings("ignore", category=FutureWarning)  # kronfluence's GradScaler
    size_name = "tiny" if args.tiny else args.size
    cfg = TINY if args.tiny else SIZES[args.size]
    start = time.perf_counter()

    gt = ground_truth(cfg, args.cache_dir, args.workers, args.progress)
    task = DiffusionTask(gt.model, samples_per_example=cfg.K, timesteps="uniform")
    work_dir = tempfile.mkdtemp(prefix="lds_peers_")
    ctx = dict(task=task, cfg=cfg, gt=gt, device=gt.device, work_dir=work_dir,
               progress=args.progress, fastattr_trak_base=None)
    rows, ours = [], {}

    def save(done: bool = False) -> None:
        """The JSON so far, rewritten (atomically) after every row: an interrupted run keeps
        the rows it finished."""
        if args.json:
            write_json_atomic(args.json, {
                "benchmark": "lds_peers", "size_name": size_name,
                "size": dataclasses.asdict(cfg), "device": gt.device,
                "machine": machine_info(), "config": vars(args),
                "ground_truth_timings": gt.timings, "rows": rows, "complete": done,
                "versions": {d: _version(d) for d in ("traker", "kronfluence", "dattri")},
                "wall_s": time.perf_counter() - start})

    def evaluate(run: PeerRun) -> dict:
        return {s: lds_entry(run.scores[s], run.lams, gt.masks, gt.F[s]) for s in SPLITS}

    # fastattr's methods first: the peers' ratios and dattri-trak's λ grid need them
    for name in dict.fromkeys(PEERS[p][2] for p in peers):
        try:
            run = run_fastattr(name, ctx)
        except Exception as exc:  # reported, not hidden: the peers then have no ratio
            rows.append(_row(name, "fastattr", _version("fastattr"), "error",
                             reason=f"{type(exc).__name__}: {exc}",
                             traceback=traceback.format_exc()[-3000:]))
            continue
        ours[name] = (run, evaluate(run))
        if name == "trak":
            ctx["fastattr_trak_base"] = run.extra["base_lam"]
        rows.append(_row(name, "fastattr", getattr(sys.modules["fastattr"], "__version__", None),
                         "ok", lds=ours[name][1], seconds=run.seconds, ratio=1.0,
                         lams=run.lams, lam_protocol=run.lam_protocol))
        print(f"  fastattr {name}: {run.seconds:.2f} s", flush=True)
        save()

    for peer in peers:
        dist, what, matched, runner = PEERS[peer]
        version = _version(dist)
        label = f"{peer}: {what}"
        if version is None:
            rows.append(_row(label, dist, None, "skipped", compared_with=matched,
                             reason=f"{dist} is not installed (pip install {dist})"))
            continue
        try:
            run = runner(ctx)
        except Exception as exc:
            rows.append(_row(label, dist, version, "error", compared_with=matched,
                             reason=f"{type(exc).__name__}: {exc}",
                             traceback=traceback.format_exc()[-3000:]))
            print(f"  {peer}: error: {type(exc).__name__}: {exc}", flush=True)
            continue
        entry = evaluate(run)
        ref = ours.get(matched)
        rows.append(_row(label, dist, version, "ok", compared_with=matched, lds=entry,
                         seconds=run.seconds,
                         fastattr_seconds=None if ref is None else ref[0].seconds,
                         ratio=None if ref is None else run.seconds / ref[0].seconds,
                         agreement=None if ref is None else agreement(run, ref[0], ref[1]),
                         lams=run.lams, lam_protocol=run.lam_protocol, **run.extra))
        print(f"  {peer}: {run.seconds:.2f} s", flush=True)
        save()

    import shutil

    shutil.rmtree(work_dir, ignore_errors=True)
    print(f"digits LDS ({size_name}): peers vs fastattr on the same models and ground truth; "
          "agreement = mean per-test Spearman with fastattr's scores (val / gen)")
    print(format_table(rows))
    save(done=True)
    return 0 if all(r["status"] == "ok" for r in rows if r["library"] == "fastattr") else 1


if __name__ == "__main__":
    sys.exit(main())
