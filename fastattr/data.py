"""The built-in "digits" benchmark data: scikit-learn's bundled handwritten digits.

``sklearn.datasets.load_digits`` ships 1797 real 8x8 grey-scale digits (values 0..16) with
scikit-learn itself: nothing is downloaded. fastattr fixes one split of them for every run,
machine and library version:

- images scaled to [-1, 1] (``x / 8 - 1``), float32 ``[N, 1, 8, 8]``; labels int64 ``[N]``
  (the digit 0..9, unused by the unconditional models, shown in reports);
- a fixed train/test split: the 1797 images ordered by the key ``splitmix64(mix(seed) ⊕ i)``
  of their index ``i`` in ``load_digits`` (``SPLIT_SEED = 0``; ``fastattr.rng.splitmix64``,
  pure integer arithmetic, so the split never depends on a library's random generator),
  the first ``N_TEST = 297`` of that order are the test set, the other ``N_TRAIN = 1500``
  the training set, each kept in ``load_digits`` order;
- stable sample ids: training image ``j`` has id ``j`` (its position: the
  ``subset_indices`` of retraining are positions = ids), test image ``j`` has id
  ``TEST_ID_OFFSET + j`` (100000 + j), so the two never share the noise ``ε(id, t)``
  of the diffusion protocol (generated samples use ``2⁴⁰ + j``).

Example::

    from fastattr.data import digits
    train, test = digits("train"), digits("test")
    train.images.shape, test.ids[:2]        # (1500, 1, 8, 8), tensor([100000, 100001])
    batch = train.batch()                   # (images, ids): what fastattr's methods take
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .rng import splitmix64

__all__ = ["Digits", "digits", "digits_split", "N_TRAIN", "N_TEST", "TEST_ID_OFFSET",
           "SPLIT_SEED", "SPLITS"]

N_TOTAL = 1797
N_TEST = 297
N_TRAIN = N_TOTAL - N_TEST  # 1500
TEST_ID_OFFSET = 100_000
SPLIT_SEED = 0
SPLITS = ("train", "test")


@dataclass(frozen=True)
class Digits:
    """One split of the digits benchmark.

    Attributes:
        images: float32 ``[n, 1, 8, 8]`` in [-1, 1].
        labels: int64 ``[n]``, the digit shown (0..9).
        ids: int64 ``[n]``, stable sample ids (train: ``0..n-1``; test: ``100000 + j``).
        source_index: int64 ``[n]``, each image's row in ``sklearn.datasets.load_digits``.
        split: "train" or "test".

    Example::

        train = digits("train")
        half = train.subset(range(0, 1500, 2))     # ids kept: 0, 2, 4, ...
        images, ids = half.batch()
    """

    images: torch.Tensor
    labels: torch.Tensor
    ids: torch.Tensor
    source_index: torch.Tensor
    split: str

    def __len__(self) -> int:
        return self.images.shape[0]

    def batch(self) -> tuple:
        """``(images, ids)``: the form ``fit`` / ``score`` of ``fastattr.methods`` take.

        Example::

            das.fit(digits("train").batch())
        """
        return self.images, self.ids

    def subset(self, indices) -> "Digits":
        """The images at ``indices`` (positions in this split), ids unchanged.

        Example::

            first = digits("test").subset([0, 1, 2])
        """
        index = torch.as_tensor(list(indices) if not isinstance(indices, torch.Tensor)
                                else indices, dtype=torch.int64)
        if index.dim() != 1:
            raise ValueError(f"indices must be 1-D, got shape {tuple(index.shape)}")
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= len(self)):
            raise IndexError(f"indices must lie in [0, {len(self)}) for the {self.split} split")
        return Digits(self.images[index], self.labels[index], self.ids[index],
                      self.source_index[index], self.split)


def digits_split(seed: int = SPLIT_SEED, n_test: int = N_TEST) -> tuple:
    """``(train_index, test_index)``: the rows of ``load_digits`` in each split (int64,
    ascending). The order key of row ``i`` is ``splitmix64(splitmix64(seed) ^ i)``; the
    ``n_test`` smallest keys form the test set.

    Example::

        train_rows, test_rows = digits_split()     # 1500 and 297 rows
    """
    if not 0 < n_test < N_TOTAL:
        raise ValueError(f"n_test must lie in (0, {N_TOTAL}), got {n_test}")
    mixed = splitmix64(int(seed))
    order = sorted(range(N_TOTAL), key=lambda i: splitmix64(mixed ^ i))
    test = torch.tensor(sorted(order[:n_test]), dtype=torch.int64)
    train = torch.tensor(sorted(order[n_test:]), dtype=torch.int64)
    return train, test


@functools.lru_cache(maxsize=1)
def _load() -> tuple:
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32)  # [1797, 8, 8], 0..16
    if images.shape != (N_TOTAL, 8, 8):
        raise RuntimeError(f"sklearn's load_digits returned {tuple(images.shape)}, expected "
                           f"({N_TOTAL}, 8, 8)")
    images = (images / 8.0 - 1.0).unsqueeze(1)
    return images, torch.tensor(data.target, dtype=torch.int64)


def digits(split: str = "train") -> Digits:
    """The ``train`` (1500 images, ids ``0..1499``) or ``test`` (297 images, ids
    ``100000..100296``) split of the digits benchmark (see the module docstring). The
    tensors are fresh copies: changing them does not change later calls.

    Example::

        train = digits("train")
        train.images.min(), train.images.max()     # -1.0, 1.0
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    images, labels = _load()
    train_index, test_index = digits_split()
    index = train_index if split == "train" else test_index
    offset = 0 if split == "train" else TEST_ID_OFFSET
    return Digits(images[index].clone(), labels[index].clone(),
                  offset + torch.arange(index.numel(), dtype=torch.int64), index.clone(), split)
