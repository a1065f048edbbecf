"""The LDS harness (fastattr.lds): subsets, LDS against hand computations and synthetic
datamodels, the bootstrap CI, λ selection on a held-out half, cached / resumable / parallel
retraining, the common-random-numbers measurement and the counterfactual check."""

import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from fastattr import lds as L
from fastattr.diffusion import DiffusionTask, noise, timesteps
from fastattr.methods.base import QUERY_IDS
from fastattr.store import StoreConfigError

# ------------------------------------------------------------------ tiny training problems
# module level: the retraining workers (spawned processes) import train_fn from here

N_TRAIN, DIM = 12, 3
_g = torch.Generator().manual_seed(0)
X_TRAIN = torch.randn(N_TRAIN, DIM, generator=_g)
Y_TRAIN = X_TRAIN @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.3 * torch.randn(N_TRAIN, 1,
                                                                           generator=_g)
X_TEST = torch.randn(5, DIM, generator=_g)
Y_TEST = X_TEST @ torch.tensor([[1.0], [-2.0], [0.5]])


def make_linear():
    return nn.Linear(DIM, 1)


def train_linear(indices, seed, device="cpu"):
    """A few gradient steps of least squares on the subset's rows; the initialisation comes
    from the global RNG, which the Retrainer seeds with ``seed``. Each call appends a line
    to $LDS_TEST_LOG; the call numbered $LDS_TEST_DIE_AT kills the process."""
    log = os.environ.get("LDS_TEST_LOG")
    if log:
        with open(log, "a") as fh:
            fh.write(json.dumps({"n": len(indices), "seed": seed, "device": device}) + "\n")
        die_at = int(os.environ.get("LDS_TEST_DIE_AT", "0"))
        if die_at:
            with open(log) as fh:
                if sum(1 for _ in fh) == die_at:
                    os._exit(17)
    model = make_linear().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = X_TRAIN[indices].to(device), Y_TRAIN[indices].to(device)
    for _ in range(20):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
    return model


def test_losses(model, data):
    x, y = data
    with torch.no_grad():
        return ((model(x) - y) ** 2).squeeze(1)


test_losses.__test__ = False   # a helper, not a pytest test

# a mean estimator: the "model" is the mean of its training points (a state dict)
_g2 = torch.Generator().manual_seed(1)
POINTS = torch.randn(30, 2, generator=_g2, dtype=torch.float64)
QUERIES = torch.randn(4, 2, generator=_g2, dtype=torch.float64) * 2


def train_mean(indices, seed):
    return {"mu": POINTS[indices].mean(0)}


def mean_losses(state, queries):
    return ((queries - state["mu"]) ** 2).sum(1)


# ------------------------------------------------------------------ subsets


def test_subsets_sizes_seeds_prefix():
    masks = L.subsets(11, 20, alpha=0.5, seed=3)
    assert masks.dtype == torch.bool and masks.shape == (20, 11)
    assert (masks.sum(1) == 6).all()                        # round(5.5) = 6, every row
    assert (L.subsets(10, 5, alpha=0.3).sum(1) == 3).all()
    assert torch.equal(masks, L.subsets(11, 20, alpha=0.5, seed=3))       # reproducible
    assert torch.equal(L.subsets(11, 8, alpha=0.5, seed=3), masks[:8])    # prefix-stable
    assert not torch.equal(L.subsets(11, 20, alpha=0.5, seed=4), masks)
    assert len({tuple(r.tolist()) for r in masks}) > 15    # rows are different subsets
    for alpha in (0.0, 1.0, 1.5, -0.2):
        with pytest.raises(ValueError, match="alpha must be a float in \\(0, 1\\)"):
            L.subsets(10, 4, alpha=alpha)
    with pytest.raises(ValueError, match="leave one out"):
        L.subsets(3, 4, alpha=0.9)


# ------------------------------------------------------------------ LDS by hand

# 2 test samples, 4 train samples, 4 subsets of 2
HAND_SCORES = [[1.0, 2.0, 0.0, -1.0],
               [1.0, 0.0, 1.0, 0.0]]
HAND_MASKS = [[1, 1, 0, 0],
              [0, 0, 1, 1],
              [1, 0, 1, 0],
              [0, 1, 0, 1]]
HAND_F = [[0.1, 0.9],
          [0.5, 0.4],
          [0.3, 0.1],
          [0.2, 0.6]]


def test_lds_equals_hand_computation_with_ties():
    # test 0: Ŷ = [3, -1, 1, 1] -> average ranks [4, 1, 2.5, 2.5];
    #         -F = [-.1, -.5, -.3, -.2] -> ranks [4, 1, 2, 3]
    #         centred [1.5, -1.5, 0, 0] . [1.5, -1.5, -.5, .5] = 4.5, norms² 4.5 and 5
    # test 1: Ŷ = [1, 1, 2, 0] -> ranks [2.5, 2.5, 4, 1]; -F = [-.9, -.4, -.1, -.6] ->
    #         ranks [1, 3, 4, 2]; centred [0, 0, 1.5, -1.5] . [-1.5, .5, 1.5, -.5] = 3
    rho = [4.5 / math.sqrt(4.5 * 5), 3.0 / math.sqrt(4.5 * 5)]
    res = L.lds(torch.tensor(HAND_SCORES), torch.tensor(HAND_MASKS, dtype=torch.bool),
                torch.tensor(HAND_F), num_bootstrap=0)
    np.testing.assert_allclose(res.per_test, rho, rtol=1e-12)
    assert res.mean == pytest.approx(sum(rho) / 2, rel=1e-12)
    assert res.num_undefined == 0 and res.num_subsets == 4
    assert math.isnan(res.ci_low) and math.isnan(res.ci_high)
    # scipy's Spearman (average ranks for ties) agrees
    from scipy.stats import spearmanr

    yhat = np.array(HAND_MASKS, float) @ np.array(HAND_SCORES).T
    for x in range(2):
        ref = spearmanr(yhat[:, x], -np.array(HAND_F)[:, x]).statistic
        assert res.per_test[x] == pytest.approx(ref, rel=1e-12)
    # the sign convention: correlate with MINUS the loss; flipping the scores flips the LDS
    flipped = L.lds(-torch.tensor(HAND_SCORES), HAND_MASKS, HAND_F, num_bootstrap=0)
    np.testing.assert_allclose(flipped.per_test, [-r for r in rho], rtol=1e-12)


def test_sign_convention_proponents_lower_the_loss():
    # every train sample helps test 0 (including it lowers the loss by its score): LDS = +1
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]])
    masks = L.subsets(5, 10, alpha=0.4, seed=1)
    F = 10.0 - masks.double() @ scores.double().T           # lower loss when included
    assert L.lds(scores, masks, F, num_bootstrap=0).mean == pytest.approx(1.0)
    assert L.lds(scores, masks, -F, num_bootstrap=0).mean == pytest.approx(-1.0)


def test_constant_prediction_or_loss_is_undefined_and_excluded():
    scores = torch.tensor(HAND_SCORES + [[1.0, 1.0, 1.0, 1.0]])     # Ŷ = 2 for every subset
    F = torch.tensor([row + [0.5] for row in HAND_F])
    res = L.lds(scores, HAND_MASKS, F, num_bootstrap=0)
    assert math.isnan(res.per_test[2]) and res.num_undefined == 1
    assert res.mean == pytest.approx(np.mean(res.per_test[:2]))   # NaN left out of the mean
    const_f = torch.tensor(HAND_F)
    const_f[:, 1] = 0.3                                              # F constant for test 1
    res = L.lds(torch.tensor(HAND_SCORES), HAND_MASKS, const_f, num_bootstrap=0)
    assert res.num_undefined == 1 and math.isnan(res.per_test[1])
    assert res.mean == pytest.approx(res.per_test[0])
    assert "1 undefined" in str(res)
    every = L.lds(torch.ones(2, 4), HAND_MASKS, HAND_F, num_bootstrap=10)
    assert math.isnan(every.mean) and every.num_undefined == 2 and math.isnan(every.ci_low)
    assert every.as_dict()["mean"] is None                           # JSON-ready


# ------------------------------------------------------------------ synthetic datamodels


def _datamodel(n_test, n_train, M, noise_scale, seed=0):
    rng = np.random.default_rng(seed)
    theta = rng.normal(size=(n_test, n_train))
    masks = L.subsets(n_train, M, seed=seed)
    F = -(masks.numpy().astype(float) @ theta.T) + noise_scale * rng.normal(size=(M, n_test))
    return theta, masks, F


def test_perfect_attributor_scores_one_random_zero():
    theta, masks, F = _datamodel(40, 100, 200, noise_scale=0.1)
    perfect = L.lds(theta, masks, F, num_bootstrap=0)
    assert perfect.mean > 0.95 and perfect.per_test.min() > 0.9
    rand = L.lds(np.random.default_rng(9).normal(size=theta.shape), masks, F, num_bootstrap=0)
    assert abs(rand.mean) < 0.1
    assert L.lds(-theta, masks, F, num_bootstrap=0).mean < -0.95


def test_bootstrap_ci_contains_estimate_and_narrows_with_more_subsets():
    widths = []
    for M in (30, 300):
        theta, masks, F = _datamodel(20, 60, M, noise_scale=6.0, seed=2)
        res = L.lds(theta, masks, F, num_bootstrap=300, seed=5)
        assert res.ci_low < res.mean < res.ci_high
        assert 0.2 < res.mean < 0.9                      # noisy enough to be informative
        assert res.num_bootstrap == 300 and res.ci_level == 0.95
        widths.append(res.ci_high - res.ci_low)
        again = L.lds(theta, masks, F, num_bootstrap=300, seed=5)
        assert (again.ci_low, again.ci_high) == (res.ci_low, res.ci_high)    # seeded
    assert widths[1] < 0.6 * widths[0]                   # ~1/sqrt(10) in theory
    narrow = L.lds(theta, masks, F, num_bootstrap=300, seed=5, ci=0.5)
    assert res.ci_low < narrow.ci_low < narrow.ci_high < res.ci_high


def test_select_lambda_picks_the_perfect_attributor_and_reports_heldout():
    theta, masks, F = _datamodel(30, 50, 80, noise_scale=0.5, seed=3)
    rng = np.random.default_rng(4)
    lams = [1e-3, 1e-2, 1e-1, 1.0]
    sweep = np.stack([rng.normal(size=theta.shape), theta + 3 * rng.normal(size=theta.shape),
                      theta, -theta])
    sel = L.select_lambda(torch.from_numpy(sweep), lams, masks, F, num_bootstrap=100)
    assert sel.lam == 1e-1 and sel.lam_tuned_on_eval == 1e-1
    assert np.argmax(sel.lds_tune) == 2 and np.argmax(sel.lds_all) == 2
    tune, held = sel.tune_index, sel.eval_index
    assert len(tune) == 15 and len(held) == 15
    assert sorted(np.concatenate([tune, held]).tolist()) == list(range(30))
    # the held-out figure is the LDS of the chosen λ on the evaluation half only
    ref = L.lds(theta[held], masks, F[:, held], num_bootstrap=100)
    assert sel.heldout.mean == pytest.approx(ref.mean)
    assert (sel.heldout.ci_low, sel.heldout.ci_high) == (ref.ci_low, ref.ci_high)
    assert np.array_equal(sel.heldout.test_index, held) and sel.heldout.per_test.size == 15
    assert sel.heldout.lam == 1e-1 and not sel.heldout.tuned_on_eval
    assert sel.tuned_on_eval.tuned_on_eval and sel.tuned_on_eval.per_test.size == 30
    assert sel.tuned_on_eval.mean == pytest.approx(L.lds(theta, masks, F, num_bootstrap=0).mean)
    assert "tuned on the evaluation set" in str(sel.tuned_on_eval)
    json.dumps(sel.as_dict())

    # λ_a is perfect on the tuning half only, λ_b on the evaluation half only: the held-out
    # figure picks λ_a on the tuning half and honestly reports its poor LDS on the other
    noise_ = rng.normal(size=theta.shape)
    a, b = noise_.copy(), noise_.copy()
    a[tune], b[held] = theta[tune], theta[held]
    sel = L.select_lambda(np.stack([a, b]), [0.5, 2.0], masks, F, num_bootstrap=0)
    assert sel.lam == 0.5 and abs(sel.heldout.mean) < 0.3
    assert sel.lds_tune[0] > 0.9 and sel.tuned_on_eval.mean < 0.7


def test_bad_shapes_and_options():
    s, m, f = torch.tensor(HAND_SCORES), torch.tensor(HAND_MASKS), torch.tensor(HAND_F)
    with pytest.raises(ValueError, match="scores has 4 train columns but masks has 5"):
        L.lds(s, torch.ones(4, 5), f)
    with pytest.raises(ValueError, match=r"F has shape \(4, 3\) but masks has M=4 subsets "
                                         r"and scores n_test=2"):
        L.lds(s, m, torch.zeros(4, 3))
    with pytest.raises(ValueError, match="F must be 2-D"):
        L.lds(s, m, torch.zeros(4))
    with pytest.raises(ValueError, match="masks must hold only 0/1"):
        L.lds(s, m * 2, f)
    with pytest.raises(ValueError, match="scores holds NaN"):
        L.lds(torch.full((2, 4), float("nan")), m, f)
    with pytest.raises(ValueError, match="ci must be a float in \\(0, 1\\)"):
        L.lds(s, m, f, ci=1.0)
    with pytest.raises(ValueError, match="lams holds 3 values but sweep has L=1"):
        L.select_lambda(s[None], [1, 2, 3], m, f)
    with pytest.raises(ValueError, match="sweep has 4 train columns but masks has 5"):
        L.select_lambda(s[None], [1], torch.ones(4, 5), f)


# ------------------------------------------------------------------ retraining

_KILLED_RUN = """
import os, sys
sys.path.insert(0, {tests!r})
from test_lds import train_linear, make_linear
from fastattr.lds import Retrainer
Retrainer(train_linear, {cache!r}, {n}, 3, seeds=2, make_model=make_linear,
          progress=False).run()
"""


def _child_env():
    # the child imports the very fastattr this process runs
    import fastattr

    root = os.path.dirname(os.path.dirname(os.path.abspath(fastattr.__file__)))
    return {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}


def _states(retrainer):
    return {job.name: retrainer.load(job).state_dict() for job in retrainer.jobs()}


def _log_lines(path):
    with open(path) as fh:
        return [json.loads(line) for line in fh]


def test_retraining_resumes_after_kill(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    env = {**_child_env(), "LDS_TEST_LOG": str(tmp_path / "killed.log"), "LDS_TEST_DIE_AT": "3"}
    script = _KILLED_RUN.format(tests=os.path.dirname(__file__), cache=str(cache), n=N_TRAIN)
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env,
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 17, res.stderr
    assert len(_log_lines(tmp_path / "killed.log")) == 3       # died inside the third call
    models = sorted(p.name for p in (cache / "models").iterdir())
    assert models == ["subset_00000_seed_0.pt", "subset_00000_seed_1.pt"]   # only complete

    monkeypatch.setenv("LDS_TEST_LOG", str(tmp_path / "resumed.log"))
    resumed = L.Retrainer(train_linear, cache, N_TRAIN, 3, seeds=2, make_model=make_linear,
                          progress=False)
    assert [j.name for j in resumed.missing()] == [
        "subset_00001_seed_0", "subset_00001_seed_1", "subset_00002_seed_0",
        "subset_00002_seed_1"]
    trained = resumed.run()
    assert trained == [j.name for j in resumed.jobs()][2:]
    calls = _log_lines(tmp_path / "resumed.log")
    assert len(calls) == 4 and [c["seed"] for c in calls] == [0, 1, 0, 1]
    assert all(c["n"] == 6 and c["device"] == "cpu" for c in calls)   # device passed
    assert resumed.run() == [] and len(_log_lines(tmp_path / "resumed.log")) == 4

    monkeypatch.setenv("LDS_TEST_LOG", str(tmp_path / "fresh.log"))
    fresh = L.Retrainer(train_linear, tmp_path / "fresh", N_TRAIN, 3, seeds=2,
                        make_model=make_linear, progress=False)
    assert len(fresh.run()) == 6
    a, b = _states(resumed), _states(fresh)
    assert a.keys() == b.keys()
    for name in a:
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]), (name, key)
    # seeds differ, subsets differ: the models are not all the same
    assert not torch.equal(a["subset_00000_seed_0"]["weight"], a["subset_00000_seed_1"]["weight"])
    F1 = L.measure(resumed, (X_TEST, Y_TEST), test_losses, progress=False)
    F2 = L.measure(fresh, (X_TEST, Y_TEST), test_losses, progress=False)
    assert F1.shape == (3, 5) and torch.equal(F1, F2)
    # F averages the seeds of a subset
    manual = np.mean([test_losses(resumed.model(1, s), (X_TEST, Y_TEST)).numpy()
                      for s in (0, 1)], 0)
    np.testing.assert_allclose(F1[1].numpy(), manual, rtol=1e-6)

    # another configuration of the same cache is refused, naming what differs
    with pytest.raises(StoreConfigError, match="alpha: store has 0.5, asked 0.25"):
        L.Retrainer(train_linear, cache, N_TRAIN, 3, seeds=2, alpha=0.25)
    with pytest.raises(StoreConfigError, match="n_train: store has 12, asked 10"):
        L.Retrainer(train_linear, cache, 10, 3, seeds=2)
    with pytest.raises(StoreConfigError, match="train.train_fn"):
        L.Retrainer(train_mean, cache, N_TRAIN, 3, seeds=2)
    # more subsets later: only the new ones train (subsets are prefix-stable)
    more = L.Retrainer(train_linear, cache, N_TRAIN, 4, seeds=2, make_model=make_linear,
                       progress=False)
    assert more.run() == ["subset_00003_seed_0", "subset_00003_seed_1"]


def test_parallel_workers_train_the_same_models(tmp_path, monkeypatch):
    monkeypatch.setenv("LDS_TEST_LOG", str(tmp_path / "calls.log"))
    serial = L.Retrainer(train_linear, tmp_path / "serial", N_TRAIN, 2, seeds=[0, 5],
                         make_model=make_linear, progress=False)
    parallel = L.Retrainer(train_linear, tmp_path / "parallel", N_TRAIN, 2, seeds=[0, 5],
                           make_model=make_linear, workers=2, progress=False)
    assert len(serial.run()) == 4
    assert sorted(parallel.run()) == sorted(j.name for j in parallel.jobs())
    assert len(_log_lines(tmp_path / "calls.log")) == 8        # the workers did train
    a, b = _states(serial), _states(parallel)
    for name in a:
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]), (name, key)
    assert parallel.run() == []
    with pytest.raises(TypeError, match="train_fn must be picklable for workers=2"):
        L.Retrainer(lambda idx, seed: make_linear(), tmp_path / "lambda", N_TRAIN, 1,
                    workers=2, progress=False).run()


def test_retrainer_bad_input(tmp_path):
    with pytest.raises(ValueError, match="alpha must be a float in \\(0, 1\\)"):
        L.Retrainer(train_linear, tmp_path / "a", N_TRAIN, 2, alpha=1.0)
    with pytest.raises(ValueError, match="workers must be an int >= 1"):
        L.Retrainer(train_linear, tmp_path / "b", N_TRAIN, 2, workers=0)
    r = L.Retrainer(lambda idx, seed: "oops", tmp_path / "c", N_TRAIN, 1, progress=False)
    with pytest.raises(TypeError, match="train_fn returned str"):
        r.run()
    r = L.Retrainer(train_linear, tmp_path / "d", N_TRAIN, 1, progress=False)
    r.run()
    with pytest.raises(ValueError, match="pass make_model="):
        r.model(0, 0)
    with pytest.raises(ValueError, match="not trained yet"):
        L.measure(L.Retrainer(train_linear, tmp_path / "e", N_TRAIN, 1), (X_TEST, Y_TEST),
                  test_losses)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, n_train=12\)"):
        r.train([L.Job("bad", np.array([0, 12]), 0)])


# ------------------------------------------------------------------ measurement


class _Recorder:
    """model_fn recording the noisy inputs and timesteps every model is fed."""

    def __init__(self):
        self.calls = []

    def __call__(self, model, x_t, t):
        self.calls.append((x_t.clone(), t.clone()))
        return model(x_t)


def _conv(seed):
    torch.manual_seed(seed)
    return nn.Conv2d(1, 1, 3, padding=1)


def test_measure_uses_common_random_numbers():
    images = torch.rand(5, 1, 4, 4, generator=torch.Generator().manual_seed(3)) * 2 - 1
    rec = _Recorder()
    task = DiffusionTask(_conv(0), samples_per_example=4, timesteps="random", noise_seed=7,
                         model_fn=rec, sample_shape=(1, 4, 4))
    a, b = _conv(1), _conv(2)
    F = L.measure([a, b], images, task, batch_size=5, progress=False)
    assert F.shape == (2, 5) and F.dtype == torch.float64
    assert len(rec.calls) == 2
    (xa, ta), (xb, tb) = rec.calls
    assert torch.equal(ta, tb) and torch.equal(xa, xb)          # same (t, ε) for both models
    assert len(set(ta.tolist())) > 4                            # random timesteps, not a grid
    assert not torch.equal(F[0], F[1])

    # the formula: ids QUERY_IDS + j, t and ε(eval_seed, id, t) from fastattr.diffusion
    ids = QUERY_IDS + torch.arange(5)
    t = timesteps(ids, 4, task.T, "random", seed=7)
    eps = noise(ids.repeat_interleave(4), t.reshape(-1), (1, 4, 4), task.T, seed=7)
    abar = task.alphas_cumprod[t.reshape(-1)].float().reshape(-1, 1, 1, 1)
    x_t = abar.sqrt() * images.repeat_interleave(4, 0) + (1 - abar).sqrt() * eps
    with torch.no_grad():
        direct = ((a(x_t) - eps) ** 2).flatten(1).mean(1).reshape(5, 4).double().mean(1)
    torch.testing.assert_close(F[0], direct, rtol=1e-5, atol=1e-7)

    # the result does not depend on the batch size
    torch.testing.assert_close(L.measure([a, b], images, task, batch_size=2, progress=False),
                               F, rtol=1e-6, atol=1e-8)
    # several eval seeds are averaged; several seed models of a subset too
    F7 = L.measure([a], images, task, progress=False)
    F8 = L.measure([a], images, task, eval_seeds=[8], progress=False)
    assert not torch.equal(F7, F8)
    torch.testing.assert_close(L.measure([a], images, task, eval_seeds=[7, 8], progress=False),
                               (F7 + F8) / 2)
    torch.testing.assert_close(L.measure([[a, b]], images, task, progress=False),
                               F.mean(0, keepdim=True))
    # explicit ids key the draws: the same images with ids 0..4 get other noise
    F_ids = L.measure([a], (images, torch.arange(5)), task, progress=False)
    assert not torch.allclose(F_ids, F7)
    with pytest.raises(ValueError, match="test_data holds images of shape"):
        L.measure([a], torch.zeros(2, 1, 5, 5), task)
    with pytest.raises(TypeError, match="task_or_fn must be a"):
        L.measure([a], images, "loss")


def test_measure_fn_for_any_model():
    models = [[make_linear(), make_linear()], make_linear()]
    F = L.measure(models, (X_TEST, Y_TEST), test_losses, progress=False)
    expected = np.stack([
        np.mean([test_losses(m, (X_TEST, Y_TEST)).numpy() for m in models[0]], 0),
        test_losses(models[1], (X_TEST, Y_TEST)).numpy()])
    np.testing.assert_allclose(F.numpy(), expected, rtol=1e-6)
    with pytest.raises(ValueError, match="measure_fn's result must be 1-D"):
        L.measure([models[1]], None, lambda m, d: torch.zeros(2, 2), progress=False)


# ------------------------------------------------------------------ counterfactual


def test_counterfactual_removing_proponents_hurts_more(tmp_path):
    retrainer = L.Retrainer(train_mean, tmp_path / "cf", len(POINTS), progress=False)
    mu = POINTS.mean(0)
    # exact first-order proponent score of the mean estimator: removing i moves the mean by
    # -(x_i - mu)/(n-1), which raises the loss of q iff (x_i - mu)·(q - mu) > 0
    scores = (QUERIES - mu) @ (POINTS - mu).T
    k = 6
    res = L.counterfactual(scores, retrainer, QUERIES, mean_losses, k=k)
    files = lambda: len(list((tmp_path / "cf" / "models").glob("*.pt")))   # noqa: E731
    assert files() == 1 + 2 * len(QUERIES)           # the full model + one per removed set
    assert res.mean_difference > 0 and res.fraction_top_greater == 1.0
    assert (res.delta_top > 0).all()
    # by hand for query 0
    top = torch.argsort(-scores[0])[:k]
    keep = torch.tensor([i for i in range(len(POINTS)) if i not in set(top.tolist())])
    by_hand = mean_losses({"mu": POINTS[keep].mean(0)}, QUERIES[:1]) - \
        mean_losses({"mu": mu}, QUERIES[:1])
    assert res.delta_top[0] == pytest.approx(float(by_hand), rel=1e-10)
    np.testing.assert_allclose(res.base_loss, mean_losses({"mu": mu}, QUERIES).numpy())
    # same call again: everything cached, same result
    again = L.counterfactual(scores, retrainer, QUERIES, mean_losses, k=k)
    assert files() == 1 + 2 * len(QUERIES)
    np.testing.assert_array_equal(again.delta_top, res.delta_top)
    # opponents as "proponents": removing them helps; the random sets are reused from cache
    worse = L.counterfactual(-scores, retrainer, QUERIES, mean_losses, k=k)
    assert files() == 1 + 3 * len(QUERIES)
    np.testing.assert_array_equal(worse.delta_random, res.delta_random)
    assert worse.mean_difference < 0
    json.dumps(res.as_dict())
    sub = L.counterfactual(scores, retrainer, QUERIES, mean_losses, k=k, test_index=[2])
    assert sub.delta_top.tolist() == [res.delta_top[2]]
    with pytest.raises(ValueError, match="k must be < n_train=30"):
        L.counterfactual(scores, retrainer, QUERIES, mean_losses, k=30)
    with pytest.raises(ValueError, match="scores has 29 train columns but the retrainer's "
                                         "n_train is 30"):
        L.counterfactual(scores[:, :29], retrainer, QUERIES, mean_losses, k=2)
