"""The digits training recipe: deterministic per seed (and the caller's RNG untouched), the
cache (a second call loads and does not train; another subset / seed / step count is another
entry; files written whole, no temporaries left), checkpoints for TracIn, the learning-rate
schedule, subset handling, usable as a picklable LDS ``train_fn``."""

from __future__ import annotations

import dataclasses
import pickle

import pytest
import torch

import fastattr.train as train_mod
from fastattr.train import RECIPES, Checkpoints, lr_at, train_digits

STEPS = 4
TINY = dataclasses.replace(RECIPES["quick"], steps=STEPS, batch_size=16, warmup=2)


def _weights(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def count_training(monkeypatch):
    """How many times the training loop ran."""
    calls = []
    real = train_mod._train

    def counted(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "_train", counted)
    return calls


def test_same_seed_same_weights_and_global_rng_untouched(tmp_path):
    state = torch.get_rng_state()
    a = train_digits(range(40), seed=3, size=TINY, progress=False, use_cache=False)
    assert torch.equal(torch.get_rng_state(), state)
    b = train_digits(range(40), seed=3, size=TINY, progress=False, use_cache=False)
    c = train_digits(range(40), seed=4, size=TINY, progress=False, use_cache=False)
    assert _same(_weights(a), _weights(b))
    assert not _same(_weights(a), _weights(c))
    assert not a.training
    # the subset's order does not matter (it is sorted), its content does
    d = train_digits(list(reversed(range(40))), seed=3, size=TINY, progress=False,
                     use_cache=False)
    assert _same(_weights(a), _weights(d))
    e = train_digits(range(1, 41), seed=3, size=TINY, progress=False, use_cache=False)
    assert not _same(_weights(a), _weights(e))


def test_cache_is_reused(tmp_path, count_training):
    first = train_digits(range(32), seed=0, size=TINY, progress=False, cache_dir=tmp_path)
    assert len(count_training) == 1
    files = sorted(p.name for p in (tmp_path / "digits").iterdir())
    assert len(files) == 1 and files[0].startswith("custom-") and files[0].endswith(".safetensors")
    second = train_digits(range(32), seed=0, size=TINY, progress=False, cache_dir=tmp_path)
    assert len(count_training) == 1  # loaded, not trained
    assert _same(_weights(first), _weights(second)) and not second.training
    # another seed, subset or step count is another entry
    train_digits(range(32), seed=1, size=TINY, progress=False, cache_dir=tmp_path)
    train_digits(range(33), seed=0, size=TINY, progress=False, cache_dir=tmp_path)
    train_digits(range(32), seed=0, size=TINY, steps=3, progress=False, cache_dir=tmp_path)
    assert len(count_training) == 4
    assert len(list((tmp_path / "digits").iterdir())) == 4  # no temporary files left
    # a damaged file is trained again and replaced
    path = next((tmp_path / "digits").iterdir())
    path.write_bytes(b"not a safetensors file")
    train_digits(range(32), seed=0, size=TINY, progress=False, cache_dir=tmp_path)
    train_digits(range(32), seed=1, size=TINY, progress=False, cache_dir=tmp_path)
    train_digits(range(33), seed=0, size=TINY, progress=False, cache_dir=tmp_path)
    train_digits(range(32), seed=0, size=TINY, steps=3, progress=False, cache_dir=tmp_path)
    assert len(count_training) == 5


def test_cache_dir_from_environment(tmp_path, monkeypatch, count_training):
    monkeypatch.setenv("FASTATTR_CACHE", str(tmp_path / "env"))
    train_digits(range(16), seed=0, size=TINY, progress=False)
    train_digits(range(16), seed=0, size=TINY, progress=False)
    assert len(count_training) == 1
    assert len(list((tmp_path / "env" / "digits").iterdir())) == 1


def test_checkpoints(tmp_path, count_training):
    model, ckpts = train_digits(range(24), seed=0, size=TINY, checkpoints=2, progress=False,
                                cache_dir=tmp_path)
    assert isinstance(ckpts, Checkpoints)
    assert ckpts.steps == [2, 4] and len(ckpts.models) == 2
    # the mean learning rate of the steps each checkpoint stands for
    assert ckpts.learning_rates == pytest.approx([(lr_at(TINY, 0) + lr_at(TINY, 1)) / 2,
                                                  (lr_at(TINY, 2) + lr_at(TINY, 3)) / 2])
    assert all(not m.training for m in ckpts.models)
    # checkpoints hold the raw weights; the returned model their moving average
    assert not _same(_weights(ckpts.models[0]), _weights(ckpts.models[1]))
    assert not _same(_weights(model), _weights(ckpts.models[1]))
    again, cached = train_digits(range(24), seed=0, size=TINY, checkpoints=2, progress=False,
                                 cache_dir=tmp_path)
    assert len(count_training) == 1
    assert cached.steps == ckpts.steps and cached.learning_rates == ckpts.learning_rates
    for a, b in zip(ckpts.models, cached.models):
        assert _same(_weights(a), _weights(b))
    assert _same(_weights(model), _weights(again))


def test_learning_rate_schedule():
    quick = RECIPES["quick"]
    assert lr_at(quick, 0) == pytest.approx(quick.lr / quick.warmup)
    assert lr_at(quick, quick.warmup - 1) == pytest.approx(quick.lr)
    assert lr_at(quick, quick.steps - 1) == pytest.approx(quick.lr * quick.min_lr_ratio)
    lrs = [lr_at(quick, s) for s in range(quick.warmup, quick.steps)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_train_fn_protocol_and_bad_input():
    fn = pickle.loads(pickle.dumps(train_digits))  # module level: workers can receive it
    assert fn is train_digits
    with pytest.raises(ValueError, match="size"):
        train_digits(size="huge")
    with pytest.raises(ValueError, match="repeated"):
        train_digits([1, 1], size=TINY, use_cache=False, progress=False)
    with pytest.raises(IndexError):
        train_digits([1500], size=TINY, use_cache=False, progress=False)
    with pytest.raises(ValueError, match="steps"):
        train_digits(steps=0)
    with pytest.raises(ValueError, match="seed"):
        train_digits(seed=-1)
