"""The ``fastattr demo`` job: projected-gradient attribution on real handwritten digits.

Uses scikit-learn's bundled ``load_digits`` (1797 8x8 images, shipped with sklearn, no
download). A small classifier is trained, the per-sample loss gradients of every training
image are projected with ``fastattr.Projector`` and each test image is attributed to the
training images whose projected gradients align with its own (``score > 0``: a proponent,
a gradient step on it lowers the test loss). The diffusion-model version of this pipeline
lands with the methods and LDS issues; this demo exercises the projection kernels end to end.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from .projection import Projector

__all__ = ["load_digits_tensors", "digits_demo"]


def load_digits_tensors(seed: int = 0, n_test: int = 297):
    """sklearn digits as float tensors in [0, 1]: (x_train, y_train, x_test, y_test)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def _per_sample_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 256):
    """Per-sample gradients of the cross-entropy loss, as a dict name -> [B, *param.shape]."""
    from torch.func import functional_call, grad, vmap

    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss(p, xi, yi):
        out = functional_call(model, p, (xi.unsqueeze(0),))
        return nn.functional.cross_entropy(out, yi.unsqueeze(0))

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))
    pieces = [per_sample(params, x[i : i + chunk], y[i : i + chunk]) for i in range(0, len(x), chunk)]
    return {name: torch.cat([piece[name] for piece in pieces]) for name in params}


def digits_demo(k: int = 2048, seed: int = 0, backend: str = "auto", n_test: int = 5, log=print):
    """Run the demo; returns a dict of the figures it printed."""
    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test = load_digits_tensors(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x_train), y_train).backward()
        opt.step()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    n_params = sum(p.numel() for p in model.parameters())
    log(f"digits: {len(x_train)} train / {len(x_test)} test images (8x8, sklearn bundled); "
        f"classifier with {n_params} parameters, test accuracy {accuracy:.1%}")

    train_grads = _per_sample_grads(model, x_train, y_train)
    test_grads = _per_sample_grads(model, x_test, y_test)
    projector = Projector(k, seed=seed, backend=backend)
    start = time.perf_counter()
    phi_train = projector.project(train_grads)  # dict of layers: projected as their concatenation
    elapsed = time.perf_counter() - start
    phi_test = projector.project(test_grads)
    log(f"projected {len(x_train)} per-sample gradients ({n_params} -> {k}) with backend "
        f"'{projector.resolve_backend('cpu')}' in {elapsed * 1e3:.1f} ms "
        f"({2 * len(x_train) * n_params * k / elapsed / 1e9:.1f} GFLOP/s effective)")

    # gradient cosine (TracIn with renormalised gradients, as in ReTrac): well-fit training
    # images have tiny gradients and would otherwise never show up. > 0: proponent.
    def cosine(a, b):
        return nn.functional.normalize(a, dim=1) @ nn.functional.normalize(b, dim=1).T

    scores = cosine(phi_test, phi_train)  # [n_test, n_train]
    flat_test = torch.cat([g.flatten(1) for g in test_grads.values()], 1)
    flat_train = torch.cat([g.flatten(1) for g in train_grads.values()], 1)
    exact = cosine(flat_test, flat_train)
    corr = torch.corrcoef(torch.stack([scores.flatten(), exact.flatten()]))[0, 1].item()
    log(f"projected vs exact gradient-cosine scores: Pearson r = {corr:.4f}")

    top = scores.topk(5, dim=1)
    agreement = (y_train[top.indices] == y_test[:, None]).float().mean().item()
    for t in range(min(n_test, len(x_test))):
        items = ", ".join(f"#{int(i)} ('{int(y_train[i])}', {s:+.3f})"
                          for i, s in zip(top.indices[t], top.values[t].tolist()))
        log(f"test digit '{int(y_test[t])}': top-5 proponents {items}")
    log(f"top-5 proponents share the test digit's label {agreement:.1%} of the time "
        f"over all {len(x_test)} test digits (chance: ~10%)")
    return {"accuracy": accuracy, "pearson_vs_exact": corr, "label_agreement": agreement,
            "projection_seconds": elapsed}
