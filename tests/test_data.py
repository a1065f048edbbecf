"""The digits benchmark data: sizes, value range, the fixed split (pinned by known rows, so a
change of the split rule shows up), stable ids, subsets, bad input refused."""

from __future__ import annotations

import pytest
import torch

from fastattr.data import (N_TEST, N_TRAIN, TEST_ID_OFFSET, Digits, digits, digits_split)


def test_shapes_range_and_ids():
    train, test = digits("train"), digits("test")
    assert (len(train), len(test)) == (N_TRAIN, N_TEST) == (1500, 297)
    for split in (train, test):
        assert split.images.dtype == torch.float32
        assert split.images.shape[1:] == (1, 8, 8)
        assert float(split.images.min()) == -1.0 and float(split.images.max()) == 1.0
        assert split.labels.dtype == torch.int64 and set(split.labels.tolist()) == set(range(10))
    assert torch.equal(train.ids, torch.arange(1500))
    assert torch.equal(test.ids, TEST_ID_OFFSET + torch.arange(297))
    assert train.split == "train" and test.split == "test"


def test_split_is_fixed_and_disjoint():
    train_rows, test_rows = digits_split()
    assert torch.equal(torch.sort(torch.cat([train_rows, test_rows])).values, torch.arange(1797))
    # known rows of the split: a change of the rule (or of splitmix64) changes these
    assert test_rows[:10].tolist() == [0, 3, 7, 10, 14, 15, 20, 30, 60, 68]
    assert train_rows[:5].tolist() == [1, 2, 4, 5, 6]
    assert torch.equal(digits("test").source_index, test_rows)
    other = digits_split(seed=1)[1]
    assert not torch.equal(other, test_rows) and other.numel() == 297


def test_images_match_sklearn_and_calls_are_independent():
    from sklearn.datasets import load_digits

    raw = torch.tensor(load_digits().images, dtype=torch.float32)
    test = digits("test")
    assert torch.equal(test.images[:, 0], raw[test.source_index] / 8 - 1)
    test.images.zero_()  # a fresh copy per call: the next call is unchanged
    assert float(digits("test").images.max()) == 1.0


def test_subset_and_batch():
    train = digits("train")
    half = train.subset(range(0, 10, 2))
    assert isinstance(half, Digits) and half.ids.tolist() == [0, 2, 4, 6, 8]
    assert torch.equal(half.images, train.images[[0, 2, 4, 6, 8]])
    images, ids = half.batch()
    assert images.shape == (5, 1, 8, 8) and torch.equal(ids, half.ids)
    with pytest.raises(IndexError):
        train.subset([1500])


def test_bad_input():
    with pytest.raises(ValueError, match="split"):
        digits("val")
    with pytest.raises(ValueError, match="n_test"):
        digits_split(n_test=0)
