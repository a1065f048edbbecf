"""fastattr.batching: cutting batches along their examples, and the heap release helper."""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch

from fastattr.batching import example_count, release_free_memory, split_batch


class Pair(NamedTuple):
    x: torch.Tensor
    ids: list


def test_tuple_with_id_list_and_shared_leaves():
    x = torch.randn(7, 3)
    batch = (x, list(range(10, 17)), "tag", torch.tensor(2.0))
    parts = split_batch(batch, 3)
    assert [p[0].shape[0] for p in parts] == [3, 3, 1]
    assert torch.equal(torch.cat([p[0] for p in parts]), x)
    assert [p[1] for p in parts] == [[10, 11, 12], [13, 14, 15], [16]]
    assert all(p[2] == "tag" and float(p[3]) == 2.0 for p in parts)


def test_dict_and_namedtuple_keep_their_types():
    batch = {"pair": Pair(torch.arange(5), [1, 2, 3, 4, 5]), "y": torch.ones(5, 2)}
    parts = split_batch(batch, 2)
    assert len(parts) == 3 and all(isinstance(p, dict) for p in parts)
    assert isinstance(parts[0]["pair"], Pair)
    assert parts[2]["pair"].ids == [5] and parts[2]["y"].shape == (1, 2)
    assert torch.equal(parts[1]["pair"].x, torch.tensor([2, 3]))


def test_nothing_to_cut_along_returns_the_batch_itself():
    batch = (torch.randn(4, 2),)
    assert split_batch(batch, 4)[0] is batch
    assert split_batch(batch, 9)[0] is batch
    odd = (torch.randn(3, 2), torch.randn(8))  # the first tensor is not the largest
    assert example_count(odd) is None and split_batch(odd, 1)[0] is odd
    assert example_count("no tensors") is None


def test_bad_size():
    with pytest.raises(ValueError, match="size must be an int >= 1"):
        split_batch((torch.ones(3),), 0)
    with pytest.raises(ValueError, match="size must be an int >= 1"):
        split_batch((torch.ones(3),), True)


def test_release_free_memory_runs():
    release_free_memory()  # glibc: malloc_trim; elsewhere a no-op -- either way no error
    release_free_memory()
