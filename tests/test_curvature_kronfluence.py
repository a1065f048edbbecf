"""fastattr.curvature against kronfluence (1.0.1) on the same models, data and damping.

Both run the empirical Fisher (kronfluence ``use_empirical_fisher=True``, ours ``ggn="loss"``)
so the two see identical per-datum gradients. The documented conversion (curvature.py):
A is the same; kronfluence's G is normalised by rows (N·R), ours by data (N), so ours = R ×
its; Λ is the same. Kronfluence averages a grouped conv's input over its groups (an
approximation); fastattr keeps one Kronecker block per group, so the grouped conv is compared
with kronfluence on the equivalent model whose grouped conv is split into one conv per group
(same weights).
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

pytest.importorskip("kronfluence")
from kronfluence.analyzer import Analyzer, prepare_model  # noqa: E402
from kronfluence.arguments import FactorArguments, ScoreArguments  # noqa: E402
from kronfluence.task import Task  # noqa: E402

from fastattr.curvature import fit_factors, regression_loss  # noqa: E402
from fastattr.grads import per_sample_grads  # noqa: E402

logging.getLogger("kronfluence").setLevel(logging.ERROR)
DAMPING = 1e-3


class RegressionTask(Task):
    """Per-example mean squared error, summed over the batch (= fastattr's per-row loss)."""

    def compute_train_loss(self, batch, model, sample=False):
        x, y = batch
        return (model(x) - y).pow(2).flatten(1).mean(1).sum()

    def compute_measurement(self, batch, model):
        return self.compute_train_loss(batch, model)


def mlp():
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4, bias=False), nn.Tanh(),
                         nn.Linear(4, 3))


class ConvNet(nn.Module):
    """Conv with bias and stride 2, a grouped conv (groups=2), a linear head."""

    def __init__(self, split: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, stride=2, padding=1)
        self.split = split
        if split:  # the grouped conv as one conv per group (kronfluence's comparison model)
            self.conv2a = nn.Conv2d(2, 3, (3, 2), padding=1)
            self.conv2b = nn.Conv2d(2, 3, (3, 2), padding=1)
        else:
            self.conv2 = nn.Conv2d(4, 6, (3, 2), padding=1, groups=2)
        self.head = nn.Linear(6 * 4 * 5, 3)

    def forward(self, x):
        h = torch.tanh(self.conv1(x))
        if self.split:
            h = torch.cat([self.conv2a(h[:, :2]), self.conv2b(h[:, 2:])], dim=1)
        else:
            h = self.conv2(h)
        return self.head(torch.tanh(h).flatten(1))


def split_copy(net: ConvNet) -> ConvNet:
    """The split-group twin of ``net`` with the same function."""
    twin = ConvNet(split=True)
    with torch.no_grad():
        twin.conv1.load_state_dict(net.conv1.state_dict())
        twin.head.load_state_dict(net.head.state_dict())
        for i, conv in enumerate((twin.conv2a, twin.conv2b)):
            conv.weight.copy_(net.conv2.weight[3 * i:3 * i + 3])
            conv.bias.copy_(net.conv2.bias[3 * i:3 * i + 3])
    return twin


def kronfluence_run(model, train, query, strategy, tmp_path):
    """kronfluence's factors (covariance, eigen, lambda) and pairwise scores [q, n]."""
    task = RegressionTask()
    model = prepare_model(model, task)
    analyzer = Analyzer("cmp", model, task, cpu=True, disable_tqdm=True,
                        output_dir=str(tmp_path))
    f64 = torch.float64
    fargs = FactorArguments(strategy=strategy, use_empirical_fisher=True,
                            activation_covariance_dtype=f64, gradient_covariance_dtype=f64,
                            per_sample_gradient_dtype=f64, lambda_dtype=f64)
    analyzer.fit_all_factors("f", torch.utils.data.TensorDataset(*train), per_device_batch_size=7,
                             factor_args=fargs, overwrite_output_dir=True)
    sargs = ScoreArguments(damping_factor=DAMPING, precondition_dtype=f64,
                           per_sample_gradient_dtype=f64, score_dtype=f64)
    analyzer.compute_pairwise_scores("s", "f", torch.utils.data.TensorDataset(*query),
                                     torch.utils.data.TensorDataset(*train),
                                     per_device_query_batch_size=5, per_device_train_batch_size=7,
                                     score_args=sargs, overwrite_output_dir=True)
    return (analyzer.load_covariance_matrices("f"), analyzer.load_eigendecomposition("f"),
            analyzer.load_lambda_matrices("f"), analyzer.load_pairwise_scores("s")["all_modules"])


def our_scores(model, factors, train, query):
    """⟨(F + λI)⁻¹ ∇ℓ(query), ∇ℓ(train)⟩ with fastattr's per-sample gradients."""
    def row_loss(m, batch):
        return regression_loss(m, batch).outputs.sub(batch[1]).pow(2).flatten(1).mean(1)

    names = factors.param_names
    gq = per_sample_grads(model, row_loss, query, params=names)
    gt = per_sample_grads(model, row_loss, train, params=names)
    pre = factors.precondition({n: gq[n].double() for n in names}, damping=DAMPING)
    return sum(pre[n].flatten(1) @ gt[n].double().flatten(1).T for n in names)


def assert_rel(actual, expected, tol):
    actual, expected = actual.double(), expected.double()
    err = (actual - expected).abs().max() / expected.abs().max()
    assert err <= tol, f"relative error {float(err):.2e} > {tol}"


def spearman(a, b):
    ra = a.flatten().argsort().argsort().double()
    rb = b.flatten().argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


@pytest.mark.parametrize("strategy", ["ekfac", "kfac"])
def test_mlp_factors_and_scores_match_kronfluence(strategy, tmp_path):
    torch.manual_seed(0)
    model = mlp()
    train = (torch.randn(21, 5), torch.randn(21, 3))
    query = (torch.randn(5, 5), torch.randn(5, 3))
    batches = [(train[0][i:i + 7], train[1][i:i + 7]) for i in range(0, 21, 7)]
    ours = fit_factors(model, batches, regression_loss, strategy=strategy, ggn="loss",
                       keep_covariances=True, progress=False)
    cov, eig, lam, kf_scores = kronfluence_run(mlp_copy(model), train, query, strategy, tmp_path)
    for name in ("0", "2", "4"):
        lf = ours.layers[name]
        n_a = cov["num_activation_covariance_processed"][name]
        n_g = cov["num_gradient_covariance_processed"][name]
        assert_rel(lf.A[0], cov["activation_covariance"][name] / n_a, 1e-5)
        assert_rel(lf.G[0], cov["gradient_covariance"][name] / n_g, 1e-5)  # R = 1
        if strategy == "ekfac":
            # kronfluence's Λ is [d_out, d_in(+1)], in its own eigenbases: rotate ours there
            kq_a = eig["activation_eigenvectors"][name].double()
            kq_g = eig["gradient_eigenvectors"][name].double()
            kf_lam = lam["lambda_matrix"][name] / lam["num_lambda_processed"][name]
            assert_rel(in_kronfluence_basis(lf, 0, kq_a, kq_g), kf_lam, 1e-5)
    ours_scores = our_scores(model, ours, train, query)
    assert_rel(ours_scores, kf_scores, 1e-4)
    assert spearman(ours_scores, kf_scores) >= 0.999


def mlp_copy(model):
    twin = mlp()
    twin.load_state_dict(model.state_dict())
    return twin


def in_kronfluence_basis(lf, group, kq_a, kq_g):
    """Our Λ indexed like kronfluence's: with distinct eigenvalues the two eigenbases differ
    by a signed permutation P = |Q_oursᵀ Q_kf| (signs drop out of the squares)."""
    pa = (lf.QA[group].double().T @ kq_a).abs().round()
    pg = (lf.QG[group].double().T @ kq_g).abs().round()
    return pg.T @ lf.lam[group] @ pa


def test_convnet_factors_and_scores_match_kronfluence(tmp_path):
    torch.manual_seed(1)
    model = ConvNet()
    train = (torch.randn(14, 2, 7, 8), torch.randn(14, 3))
    query = (torch.randn(5, 2, 7, 8), torch.randn(5, 3))
    batches = [(train[0][i:i + 7], train[1][i:i + 7]) for i in range(0, 14, 7)]
    ours = fit_factors(model, batches, regression_loss, strategy="ekfac", ggn="loss",
                       keep_covariances=True, progress=False)
    cov, eig, lam, kf_scores = kronfluence_run(split_copy(model), train, query, "ekfac", tmp_path)
    pairs = [("conv1", 0, "conv1"), ("conv2", 0, "conv2a"), ("conv2", 1, "conv2b"),
             ("head", 0, "head")]
    for ours_name, group, kf_name in pairs:
        lf = ours.layers[ours_name]
        n_a = cov["num_activation_covariance_processed"][kf_name]
        n_g = cov["num_gradient_covariance_processed"][kf_name]
        positions = n_g / 14  # R: output positions per datum (1 for the head)
        assert_rel(lf.A[group], cov["activation_covariance"][kf_name] / n_a, 1e-5)
        assert_rel(lf.G[group], cov["gradient_covariance"][kf_name] / n_g * positions, 1e-5)
        kq_a = eig["activation_eigenvectors"][kf_name].double()
        kq_g = eig["gradient_eigenvectors"][kf_name].double()
        kf_lam = lam["lambda_matrix"][kf_name] / lam["num_lambda_processed"][kf_name]
        assert_rel(in_kronfluence_basis(lf, group, kq_a, kq_g), kf_lam, 1e-5)
    ours_scores = our_scores(model, ours, train, query)
    assert_rel(ours_scores, kf_scores, 1e-4)
    assert spearman(ours_scores, kf_scores) >= 0.999
