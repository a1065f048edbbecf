"""One process of the distributed tests (tests/test_distributed.py): launched by
``torchrun --nproc_per_node=N`` (a gloo group on CPU) or plainly (no group: the
single-process reference). Fits D-TRAK (with a store), EK-FAC factors and K-FAC influence on
a tiny UNet and 13 images (5 batches of 3, 3, 3, 3, 1: uneven per rank) and saves, on rank 0,
what the test compares.

    python tests/_dist_worker.py OUT STORE [--die-after N] [--store-per-rank] [--k-per-rank]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))

from _models import tiny_images, tiny_unet  # noqa: E402

N_TRAIN, BATCH = 13, 3
CONFIG = {"train": "a stand-in that records its job"}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("store")
    parser.add_argument("--die-after", type=int, default=None,
                        help="rank 1 exits (os._exit) after computing this many feature batches")
    parser.add_argument("--store-per-rank", action="store_true",
                        help="each rank passes its own store directory (a bad setup)")
    parser.add_argument("--k-per-rank", action="store_true",
                        help="rank 1 asks another k (a bad setup)")
    parser.add_argument("--only-dtrak", action="store_true")
    parser.add_argument("--cuda", action="store_true",
                        help="model and data on the GPU (NCCL under torchrun)")
    parser.add_argument("--retrain", action="store_true",
                        help="instead: the LDS Retrainer's jobs shared out by rank")
    args = parser.parse_args()
    if args.retrain:
        return retrain(args)

    torch.set_num_threads(1)
    import torch.distributed as dist

    from fastattr import distributed
    from fastattr.curvature import fit_factors
    from fastattr.diffusion import DiffusionTask
    from fastattr.methods import DTRAK, KFACInfluence

    device = "cuda" if args.cuda else "cpu"
    if "RANK" in os.environ:
        if args.cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if args.cuda else "gloo")
    group = distributed.current()
    rank = 0 if group is None else group.rank

    model = tiny_unet(0).to(device)
    train = (tiny_images(N_TRAIN, seed=1).to(device), torch.arange(N_TRAIN) * 7 + 3)
    test = (tiny_images(4, seed=2).to(device), torch.arange(4) + 1000)
    task = DiffusionTask(model, samples_per_example=2, timesteps="uniform")

    computed = [0]
    features = task.features

    def counting(*a, **kw):
        computed[0] += 1
        if args.die_after is not None and rank == 1 and computed[0] > args.die_after:
            os._exit(7)                     # a rank dying mid-fit, no cleanup
        return features(*a, **kw)

    task.features = counting
    store = args.store + (f"/rank{rank}" if args.store_per_rank else "")
    k = 24 + (8 if args.k_per_rank and rank == 1 else 0)
    try:
        dtrak = DTRAK(task, k=k, store=store, batch_size=BATCH, progress=False).fit(train)
    except Exception as exc:
        # the error every rank raises, for the test to read
        print(f"rank {rank} error: {type(exc).__name__}: {exc}", flush=True)
        return 3
    results = {"features": dtrak.store().concat("features_0", "features", 5),
               "computed": computed[0]}
    kernel = dtrak.kernels[0]
    results["kernel"] = kernel.V @ torch.diag(kernel.eigenvalues) @ kernel.V.T
    results["dtrak_scores"] = dtrak.score(test)
    if not args.only_dtrak:
        batches = [(train[0][i:i + BATCH], train[1][i:i + BATCH])
                   for i in range(0, N_TRAIN, BATCH)]
        factors = fit_factors(model, batches, task.curvature_loss(),
                              strategy="ekfac", samples_per_example=2, keep_covariances=True,
                              factor_dtype=torch.float64, progress=False)
        results["factors"] = {f"{name}.{key}": t for name, lf in factors.layers.items()
                              for key, t in lf.tensors.items()}
        results["num_data"] = factors.num_data
        inf = KFACInfluence(task, damping=1e-3, batch_size=BATCH, progress=False).fit(train)
        results["kfac_scores"] = inf.score(test)
        # the other methods' paths: DAS's kernel and weights, TracIn's streamed exact
        # gradients (queries broadcast from rank 0), ReTrac's stored norms
        from fastattr.methods import DAS, ReTrac, TracIn

        task.features = features
        das = DAS(task, k=24, batch_size=BATCH, progress=False).fit(train)
        results["das_scores"] = das.score(test)
        ckpts = dict(checkpoints=[model, tiny_unet(1).to(device)], learning_rates=[0.1, 0.05])
        results["tracin_exact_scores"] = TracIn(task, k=None, batch_size=BATCH, progress=False,
                                                **ckpts).fit(train).score(test)
        results["retrac_scores"] = ReTrac(task, k=24, batch_size=BATCH, progress=False,
                                          **ckpts).fit(train).score(test)
    if rank == 0:
        tmp = args.out + ".tmp"
        torch.save(_cpu(results), tmp)
        os.replace(tmp, args.out)
    if group is not None:
        dist.destroy_process_group()
    return 0


def _cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    return obj


def train_fn(indices, seed):
    """A stand-in for training: a 'model' that records what it was trained on and where."""
    return {"sum": torch.tensor([float(indices.sum()), float(seed)]),
            "rank": torch.tensor([int(os.environ.get("RANK", "-1"))])}


def retrain(args) -> int:
    import torch.distributed as dist

    from fastattr import distributed
    from fastattr.lds import Retrainer

    if "RANK" in os.environ:
        dist.init_process_group("gloo")
    group = distributed.current()
    retrainer = Retrainer(train_fn, args.store, n_train=20, num_subsets=7, config=CONFIG,
                          progress=False)
    trained = retrainer.run()
    models = {job.name: retrainer.load(job) for job in retrainer.jobs()}
    if group is None or group.rank == 0:
        torch.save({"trained": trained, "models": models}, args.out)
    if group is not None:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
