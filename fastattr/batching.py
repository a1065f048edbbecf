"""Cutting a user's batch into smaller batches along its leading (example) dimension.

Data passes that only *sum* over examples (curvature factors) can run a large batch as
several small forward/backward passes: the result is the same sum up to float rounding,
and the peak memory is that of the small pass (the model's saved activations grow with
the rows of a pass). A batch is any nesting of tuples, lists and dicts whose leaves are
tensors, sequences of Python numbers (ids as a list) or other values; every tensor /
number sequence with the batch's example count as its leading size is cut, other leaves
(a scalar, a string, a shared tensor of another size) are passed to every part unchanged.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import numbers

import torch

__all__ = ["example_count", "split_batch", "release_free_memory"]


def _is_number_seq(x) -> bool:
    return (isinstance(x, (tuple, list)) and len(x) > 0
            and all(isinstance(v, numbers.Number) for v in x))


def _leaf_sizes(batch, out: list) -> None:
    if isinstance(batch, torch.Tensor):
        if batch.dim() >= 1:
            out.append(batch.shape[0])
    elif _is_number_seq(batch):
        out.append(len(batch))
    elif isinstance(batch, dict):
        for v in batch.values():
            _leaf_sizes(v, out)
    elif isinstance(batch, (tuple, list)):
        for v in batch:
            _leaf_sizes(v, out)


def example_count(batch) -> int | None:
    """The examples in ``batch``: the leading size of its first tensor (or number sequence)
    when it is the largest such size, else None (nothing to cut along).

    Example::

        example_count((images, ids))     # images.shape[0]
    """
    sizes = []
    _leaf_sizes(batch, sizes)
    if not sizes or sizes[0] != max(sizes):
        return None
    return sizes[0]


def _cut(batch, n: int, lo: int, hi: int):
    if isinstance(batch, torch.Tensor):
        return batch[lo:hi] if batch.dim() >= 1 and batch.shape[0] == n else batch
    if _is_number_seq(batch):
        return type(batch)(batch[lo:hi]) if len(batch) == n else batch
    if isinstance(batch, dict):
        return type(batch)((k, _cut(v, n, lo, hi)) for k, v in batch.items())
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a NamedTuple
        return type(batch)(*(_cut(v, n, lo, hi) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(_cut(v, n, lo, hi) for v in batch)
    return batch


def split_batch(batch, size: int) -> list:
    """``batch`` as a list of batches of at most ``size`` examples each, in order (``[batch]``
    itself when it has no more, or when ``example_count`` finds nothing to cut along).

    Example::

        for part in split_batch((images, ids), 32):
            ...                                    # (images[i:i+32], ids[i:i+32])
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be an int >= 1, got {size!r}")
    n = example_count(batch)
    if n is None or n <= size:
        return [batch]
    return [_cut(batch, n, lo, min(n, lo + size)) for lo in range(0, n, size)]


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library has none."""
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None


def release_free_memory() -> None:
    """Return the C heap's free pages to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Between the phases of a long computation: the activations a data pass freed stay
    resident in glibc's heap (fragmented among live blocks, so plain reuse cannot absorb the
    next phase's large buffers) and would add to the next phase's peak resident memory.
    Costs milliseconds; not for inner loops (the pages fault back in when reused).
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
