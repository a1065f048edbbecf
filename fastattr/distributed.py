"""Running fastattr under ``torch.distributed`` (``torchrun``, SLURM running ``torchrun``).

When a process group is initialised (``torch.distributed.init_process_group``, NCCL on GPUs,
gloo on CPU) and has more than one rank, every ``fit`` / ``score`` / ``fit_factors`` shares
its work out by rank and returns, on every rank, what a single process would return:

- data passes (train features, streamed train gradients, curvature passes) go batch by batch
  to the ranks, round robin by batch index (``owner``): deterministic, uneven counts fine;
- with a store, each rank writes its own chunks, in the single-process format (a single
  process reads the store afterwards); the ranks then read each other's chunks back;
  without a store the chunks travel by ``all_gather_object``;
- sums (``ΦᵀΦ``, K-FAC / EK-FAC covariances, Λ, counts) are reduced in float64
  (``all_reduce``); eigendecompositions are taken on rank 0 and broadcast, so every rank
  holds bitwise the same bases;
- preconditioned query gradients are computed on rank 0 and broadcast; every rank streams
  its share of the training set against them and the score columns are gathered.

Nothing happens differently without a process group; a group of one rank goes through the
same collectives (trivially), which lets one GPU check the NCCL path.

Checks before any long work (``DistributedSetupError``): the ranks' method configs (options,
task, model fingerprints) and data ids agree; a store directory is the same directory on
every rank (``check_shared``). A store records the world size of the run writing it
(``FeatureStore.open_session``); a pass that finds another world size in it at its end
stops: another launch opened the store meanwhile.
"""

from __future__ import annotations

import contextlib
import json
import secrets
from typing import NamedTuple

import torch

__all__ = ["Group", "DistributedSetupError", "current", "owner", "rank_slice", "all_reduce",
           "broadcast", "all_gather", "barrier", "agree", "check_shared", "gather_columns",
           "init_from_env", "is_main", "main_first"]


class DistributedSetupError(RuntimeError):
    """The ranks of a distributed run disagree (configs, data, store directory) or the store
    is being written by a run of another world size.

    Example::

        try:
            method.fit(train_images)
        except DistributedSetupError as err:
            print(err)     # e.g. "rank 1 differs from rank 0: options.k: rank 0 has 64, ..."
    """


class Group(NamedTuple):
    """The running process group: this process's ``rank``, the ``world`` size and the
    ``backend`` ("gloo", "nccl", ...)."""

    rank: int
    world: int
    backend: str


def current():
    """The initialised default process group (``Group``), else None. A group of one rank
    runs the same collectives as a larger one (a one-GPU NCCL run checks them).

    Example::

        group = fastattr.distributed.current()
        if group is None or group.rank == 0:
            print("I write the results")
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    return Group(dist.get_rank(), dist.get_world_size(), str(dist.get_backend()))


def is_main() -> bool:
    """Whether this process reports and writes single outputs (rank 0, or no group).

    Example::

        if fastattr.distributed.is_main():
            print(table)
    """
    group = current()
    return group is None or group.rank == 0


def owner(index: int, group) -> int:
    """The rank that computes batch ``index`` of a pass: round robin.

    Example::

        mine = [i for i in range(num_batches) if owner(i, group) == group.rank]
    """
    return 0 if group is None else index % group.world


def rank_slice(n: int, group) -> slice:
    """This rank's contiguous part of ``range(n)`` (sizes differ by at most one).

    Example::

        rows = features[rank_slice(len(features), group)]
    """
    if group is None:
        return slice(0, n)
    return slice(n * group.rank // group.world, n * (group.rank + 1) // group.world)


def _device(group):
    # NCCL moves only CUDA tensors; gloo only CPU ones
    if group.backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(tensor: torch.Tensor, group) -> torch.Tensor:
    """The float64 sum of ``tensor`` over the ranks (a new tensor on ``tensor``'s device).

    Example::

        gram = all_reduce(phi_local.double().T @ phi_local.double(), group)
    """
    import torch.distributed as dist

    if group is None:
        return tensor.to(torch.float64)
    out = tensor.detach().to(_device(group), torch.float64).contiguous().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(tensor.device)


def broadcast(obj, group, src: int = 0):
    """``obj`` of rank ``src`` on every rank (any picklable object; tensors come back on
    the CPU).

    Example::

        queries = broadcast(queries if group.rank == 0 else None, group)
    """
    import torch.distributed as dist

    if group is None:
        return obj
    box = [_to_cpu(obj) if group.rank == src else None]
    dist.broadcast_object_list(box, src=src, device=_device(group))
    return box[0]


def all_gather(obj, group) -> list:
    """Every rank's ``obj``, in rank order (tensors come back on the CPU).

    Example::

        parts = all_gather(local_columns, group)      # [part of rank 0, part of rank 1, ...]
    """
    import torch.distributed as dist

    if group is None:
        return [obj]
    out = [None] * group.world
    dist.all_gather_object(out, _to_cpu(obj))
    return out


def barrier(group) -> None:
    """Wait for every rank.

    Example::

        barrier(group)    # every rank's chunks are renamed into the store
    """
    import torch.distributed as dist

    if group is not None:
        if group.backend == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


@contextlib.contextmanager
def main_first():
    """Run the block on rank 0 first, then on the other ranks: for work cached on disk
    (training the model, measuring the subset models), which rank 0 does and the others
    then read from the cache. Without a group, just the block.

    Example::

        with main_first():
            model = train_digits(cache_dir=shared_dir)   # rank 0 trains, the others load
    """
    group = current()
    if group is not None and group.rank != 0:
        barrier(group)
    yield
    if group is not None and group.rank == 0:
        barrier(group)


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def agree(value, what: str, group) -> None:
    """Raise ``DistributedSetupError`` unless every rank passes the same JSON-able
    ``value`` (compared as JSON text), naming the first differing rank and keys.

    Example::

        agree(method.store_config(), "the method's config", group)
    """
    if group is None:
        return
    from .store import _config_diffs, _normalise_config

    mine = _normalise_config({"value": value})["value"]
    values = all_gather(json.dumps(mine, sort_keys=True), group)
    for rank, text in enumerate(values):
        if text != values[0]:
            diffs = _config_diffs(json.loads(values[0]), json.loads(text))
            shown = "; ".join(d.replace("store has", "rank 0 has").replace(
                "asked", f"rank {rank} has") for d in diffs[:8])
            raise DistributedSetupError(
                f"{what} differs between ranks: rank {rank} differs from rank 0: {shown}. "
                "Every rank must run the same method, options, model weights and data")


def check_shared(store, group) -> str:
    """Check that ``store`` is one directory seen by every rank, and record this run's
    session (world size) in it; returns the session nonce. Rank 0 writes a fresh nonce
    into the store, every rank reads it back: a rank that does not see it has a store of
    its own (a local disk, another path).

    Example::

        nonce = check_shared(store, group)
    """
    world = 1 if group is None else group.world
    nonce = secrets.token_hex(8) if group is None or group.rank == 0 else None
    if group is None:
        store.open_session(world, nonce)
        return nonce
    nonce = broadcast(nonce, group)
    if group.rank == 0:
        store.open_session(world, nonce)
    barrier(group)
    seen = store.session()
    ok = seen is not None and seen.get("nonce") == nonce
    verdicts = all_gather(None if ok else (str(store.path), seen), group)
    bad = [(r, v) for r, v in enumerate(verdicts) if v is not None]
    if bad:
        rank, (path, seen) = bad[0]
        raise DistributedSetupError(
            f"store directory {path} is not shared between ranks: rank {rank} does not see "
            f"the session rank 0 just wrote there (it sees {seen!r}). Put the store on a "
            "filesystem every rank mounts at the same path (NFS, Lustre, ...)")
    return nonce


def gather_columns(block: torch.Tensor, group) -> torch.Tensor:
    """Concatenate every rank's ``block`` along its last dim, in rank order (the columns of
    ``rank_slice``).

    Example::

        scores = gather_columns(left @ right[rank_slice(n, group)].T, group)
    """
    if group is None:
        return block
    return torch.cat(all_gather(block, group), dim=-1)


def init_from_env(backend=None) -> Group | None:
    """Initialise the default process group from torchrun's environment (``RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``, ``LOCAL_RANK``): NCCL when CUDA is
    available (each process on GPU ``LOCAL_RANK``), gloo otherwise. Returns ``current()``.

    Example::

        # torchrun --nproc_per_node=4 my_script.py
        group = fastattr.distributed.init_from_env()
    """
    import os

    import torch.distributed as dist

    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
               if k not in os.environ]
    if missing:
        raise DistributedSetupError(
            f"--distributed needs torchrun's environment; {', '.join(missing)} not set. Launch "
            "with `torchrun --nproc_per_node=N -m fastattr.cli ...` (see README, Distributed)")
    if not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return current()
