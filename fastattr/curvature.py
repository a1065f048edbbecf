"""K-FAC / EK-FAC curvature of the diffusion loss, and its damped inverse.

``fit_factors`` approximates the GGN of a model's loss per ``Linear`` / ``Conv2d`` layer
(Mlodozeniec et al., shared/METHODS.md). For a layer ``s = W a`` (bias: ``a`` augmented with
a 1, handled analytically from column sums -- there is never a ones column):

- K-FAC: ``A = E[a aᵀ]``, ``G = E[g gᵀ]``, ``F ≈ A ⊗ G``. Weight sharing over the R
  positions of a row (conv pixels, tokens): ``sharing="expand"`` (default)
  ``A = (1/NR) Σ_{n,r} a aᵀ``, ``G = (1/N) Σ_{n,r} g gᵀ``; ``"reduce"``: ``ā_n = mean_r a``,
  ``ĝ_n = Σ_r g``, ``A = (1/N) Σ ā āᵀ``, ``G = (1/N) Σ ĝ ĝᵀ``.
- EK-FAC: eigenbases ``A = Q_A Λ_A Q_Aᵀ``, ``G = Q_G Λ_G Q_Gᵀ`` (fp64 eigh), then a second
  data pass ``Λ = (1/N) Σ_n (Q_Gᵀ ∇_W ℓ_n Q_A)²`` (the ``ekfac_lambda`` kernel, from rotated
  ``a`` and ``g``; the per-datum gradients are never formed).
- ``"diagonal"``: ``Λ = (1/N) Σ_n (∇_W ℓ_n)²`` (identity eigenbases).
- ``"exact"``: the dense matrix ``(1/N) Σ_n ∇ℓ_n ∇ℓ_nᵀ`` over every selected parameter, for
  tiny models (an oracle for tests).

Here N counts data: every (x, t, ε) row is one datum. The gradient ``∇ℓ_n`` is the
pseudo-gradient of the GGN estimator (``ggn``):

- ``"model"`` (recommended): backpropagate ``√(2/d)·ξ_n``, ``ξ_n ~ N(0, I)`` drawn from the
  Philox generator keyed by the datum id (stream GGN): an MC estimate of the GGN of the
  mean-squared-error loss over the d output entries;
- ``"model_exact"``: the same expectation computed exactly by backpropagating every
  ``√(2/d)·e_k`` (d backward passes per batch: tiny models only);
- ``"loss"``: the gradient of the datum's loss itself (the empirical Fisher).

Conversion to kronfluence's stored factors: its A and G are raw sums over the N·R rows,
divided by N·R when it eigendecomposes: A is the same as ours (expand); its G is ours
divided by R (kronfluence normalises G by rows, METHODS.md by data); its Λ (divided by its
count) equals ours. Kronfluence averages a grouped conv's input over the groups; here each
group is its own Kronecker block (the layer's true weight gradient is block diagonal).

``Factors.precondition(grads, damping)`` applies ``(F + λI)⁻¹``: in the eigenbasis
``V ↦ Q_G [(Q_Gᵀ V Q_A) ⊘ (Λ + λ)] Q_Aᵀ`` (K-FAC: ``Λ = λ_G λ_Aᵀ``; ``damping="pi"`` style
π-heuristic as an option for K-FAC). ``save`` / ``load`` use safetensors and record the
config and a model fingerprint that ``load`` checks.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from . import distributed, rng
from .backends import select_backend
from .batching import release_free_memory, split_batch
from .capture import CONV2D, LINEAR, Capture, _conv_padding, coverage, select_params
from .diffusion import Rows
from .factor_ops import (covariance, covariance_add, covariance_shape, ekfac_lambda,
                         unpack_upper)
from .reference.curvature import add_packed
from .kernels import implementation

__all__ = ["fit_factors", "Factors", "LayerFactors", "kfac_params", "regression_loss",
           "STRATEGIES", "GGNS", "SHARING"]

STRATEGIES = ("ekfac", "kfac", "diagonal", "exact")
GGNS = ("model", "model_exact", "loss")
SHARING = ("expand", "reduce")
FORMAT_VERSION = 1
# entries of a rotated activation chunk [rows, P, F] in the Λ pass (4 MiB of fp32): the
# chunk and its layout copy are the Λ pass's only memory beyond the model's own activations
LAMBDA_CHUNK_ENTRIES = 1 << 20


# ------------------------------------------------------------------------------ parameters


def kfac_params(model: nn.Module) -> list:
    """Names of the parameters K-FAC covers: weights and biases of ``Linear`` / ``Conv2d``
    modules whose calls can be captured (``fastattr.coverage`` says "linear" / "conv2d").

    Example::

        names = kfac_params(unet)        # the default selection of fit_factors
    """
    return [n for n, m in coverage(model).items() if m in (LINEAR, CONV2D)]


def regression_loss(model, batch, samples_per_example: int = 1) -> Rows:
    """Rows of a plain regression batch ``(x, y)`` or ``(x, y, ids)``: outputs ``model(x)``,
    targets ``y`` (loss: mean squared error per row). One datum per example.

    Example::

        factors = fit_factors(mlp, [(x, y)], regression_loss, ggn="loss")
    """
    if samples_per_example != 1:
        raise ValueError("regression_loss has one datum per example: samples_per_example must "
                         f"be 1, got {samples_per_example}")
    if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
        raise TypeError("a regression batch is (x, y) or (x, y, ids)")
    out = model(batch[0])
    return Rows(out, batch[1], batch[2] if len(batch) == 3 else None)


def _weights_digest(model: nn.Module, names) -> str:
    params = dict(model.named_parameters())
    h = hashlib.sha256()
    for name in names:
        t = params[name].detach().to("cpu", torch.float32).contiguous()
        h.update(name.encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def fingerprint(model: nn.Module, names) -> dict:
    """What identifies the fitted model: selected parameter names, shapes and a digest of
    their values."""
    params = dict(model.named_parameters())
    return {"params": {n: list(params[n].shape) for n in names},
            "weights_sha256": _weights_digest(model, names)}


# ---------------------------------------------------------------------------- the factors


@dataclass
class LayerFactors:
    """Factors of one module (a ``Linear`` or ``Conv2d``), one Kronecker block per group.

    Tensors (``tensors``, also attributes): eigenvectors ``QA [G, Fa, Fa]`` and
    ``QG [G, O, O]`` (``factor_dtype``), with ``Fa = F + 1`` when the bias is selected (its
    row / column last) and O = d_out / groups; float64 eigenvalues ``eigA [G, Fa]``,
    ``eigG [G, O]`` and ``lam [G, O, Fa]`` (EK-FAC / diagonal: the corrected eigenvalues,
    for diagonal in the parameter basis); ``A``, ``G`` (float64) with ``keep_covariances``. ``weight`` / ``bias``
    are parameter names (``bias`` None when not selected), ``conv`` the conv geometry (``()``
    for linear), ``weight_shape`` the parameter's shape.
    """

    module: str
    weight: str
    bias: str | None
    weight_shape: tuple
    conv: tuple
    groups: int
    tensors: dict = field(default_factory=dict)

    def __getattr__(self, name):
        tensors = self.__dict__.get("tensors", {})
        if name in tensors:
            return tensors[name]
        raise AttributeError(name)

    @property
    def d_out(self) -> int:
        return self.weight_shape[0] // self.groups

    @property
    def features(self) -> int:
        """F without the bias: the columns of one group's weight block."""
        return math.prod(self.weight_shape[1:])

    def to_blocks(self, weight_grad: torch.Tensor, bias_grad) -> torch.Tensor:
        """``[q, G, O, Fa]`` float64 blocks of gradients ``[q, *weight_shape]`` / ``[q, d_out]``."""
        q = weight_grad.shape[0]
        w = weight_grad.reshape(q, self.groups, self.d_out, self.features).to(torch.float64)
        if self.bias is None:
            return w
        if bias_grad is None:
            raise ValueError(f"layer {self.module}: the bias {self.bias} was fitted, so its "
                             "gradient must be given too")
        b = bias_grad.reshape(q, self.groups, self.d_out, 1).to(torch.float64)
        return torch.cat([w, b], dim=3)

    def from_blocks(self, blocks: torch.Tensor):
        """Inverse of ``to_blocks``: ``(weight [q, *weight_shape], bias [q, d_out] | None)``."""
        q = blocks.shape[0]
        w = blocks[..., :self.features].reshape(q, *self.weight_shape)
        b = None if self.bias is None else blocks[..., self.features].reshape(q, -1)
        return w, b


class Factors:
    """Fitted curvature factors of a model: ``layers`` ``{module name: LayerFactors}``,
    ``config`` (strategy, ggn, sharing, samples per example, seed, loss config) and
    ``fingerprint`` of the model. ``num_data`` counts the (x, t, ε) data seen.

    Example::

        factors = fit_factors(unet, loader, DiffusionLoss(), strategy="ekfac")
        pre = factors.precondition(query_grads, damping=1e-3)   # dict name -> [q, *shape]
        factors.save("factors.safetensors")
        factors = Factors.load("factors.safetensors", model=unet)
    """

    def __init__(self, layers: dict, config: dict, fingerprint: dict, num_data: int,
                 dense=None, param_names=None):
        self.layers = layers
        self.config = config
        self.fingerprint = fingerprint
        self.num_data = num_data
        self.dense = dense  # "exact": the [p, p] float64 matrix over param_names
        self.param_names = list(param_names or [])
        self.timings = {}  # seconds per fitting phase (not saved)

    def __repr__(self) -> str:
        return (f"Factors({self.config['strategy']}, ggn={self.config['ggn']}, "
                f"{len(self.layers)} layers, {self.num_data} data)")

    @property
    def strategy(self) -> str:
        return self.config["strategy"]

    # -------------------------------------------------------------- inverse products

    def precondition(self, grads, damping=None, heuristic: str = "exact"):
        """``(F + λI)⁻¹ grads``: ``grads`` ``{parameter name: Tensor[q, *shape]}`` (every
        fitted parameter) -> the same structure (float32 unless given float64).

        ``damping`` λ (absolute); ``None`` takes kronfluence's heuristic ``0.1 · mean(Λ)`` per
        layer. ``heuristic="pi"`` (K-FAC only) damps the factors instead:
        ``(A + π√λ I)⁻¹ ⊗ (G + √λ/π I)⁻¹`` with ``π² = (tr A / dim A) / (tr G / dim G)``.
        """
        if heuristic not in ("exact", "pi"):
            raise ValueError(f"heuristic must be 'exact' or 'pi', got {heuristic!r}")
        if heuristic == "pi" and self.strategy != "kfac":
            raise ValueError("the pi heuristic applies to strategy='kfac' only")
        if damping is not None:
            if isinstance(damping, bool) or not isinstance(damping, (int, float)) or damping < 0:
                raise ValueError(f"damping must be a float >= 0 or None, got {damping!r}")
        if not isinstance(grads, dict):
            raise TypeError("grads must be a dict {parameter name: Tensor[q, *shape]}")
        missing = [n for n in self.param_names if n not in grads]
        unknown = [n for n in grads if n not in self.param_names]
        if missing or unknown:
            raise ValueError(f"grads must hold exactly the fitted parameters: missing {missing}, "
                             f"not fitted {unknown}")
        q = next(iter(grads.values())).shape[0]
        for name, t in grads.items():
            shape = tuple(self.fingerprint["params"][name])
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != (q, *shape):
                raise ValueError(f"grads[{name!r}] must be a Tensor [q={q}, {shape}], got "
                                 f"{getattr(t, 'shape', type(t).__name__)}")
        out_dtype = torch.float64 if all(t.dtype == torch.float64 for t in grads.values()) \
            else torch.float32
        if self.strategy == "exact":
            return self._precondition_dense(grads, damping, out_dtype)
        out = {}
        for lf in self.layers.values():
            ref = grads[lf.weight]
            v = lf.to_blocks(grads[lf.weight], grads.get(lf.bias) if lf.bias else None)
            v = v.to(ref.device)
            if self.strategy == "diagonal":
                lam = lf.lam.to(ref.device)
                lam_d = lam + (0.1 * lam.mean() if damping is None else damping)
                res = v / lam_d
            else:
                QA = lf.QA.to(ref.device, torch.float64)
                QG = lf.QG.to(ref.device, torch.float64)
                rot = QG.transpose(1, 2) @ v @ QA
                if self.strategy == "ekfac":
                    lam = lf.lam.to(ref.device)
                    rot = rot / (lam + (0.1 * lam.mean() if damping is None else damping))
                elif heuristic == "pi":
                    eig_a, eig_g = lf.eigA.to(ref.device), lf.eigG.to(ref.device)
                    lam_abs = damping if damping is not None else 0.1 * float(
                        (eig_g[:, :, None] * eig_a[:, None, :]).mean())
                    pi = torch.sqrt((eig_a.mean(1) / eig_g.mean(1)).clamp_min(1e-300))
                    da = eig_a + (pi * math.sqrt(lam_abs))[:, None]
                    dg = eig_g + (math.sqrt(lam_abs) / pi)[:, None]
                    rot = rot / (dg[:, :, None] * da[:, None, :])
                else:
                    lam = lf.eigG.to(ref.device)[:, :, None] * lf.eigA.to(ref.device)[:, None, :]
                    rot = rot / (lam + (0.1 * lam.mean() if damping is None else damping))
                res = QG @ rot @ QA.transpose(1, 2)
            w, b = lf.from_blocks(res)
            out[lf.weight] = w.to(out_dtype)
            if lf.bias is not None:
                out[lf.bias] = b.to(out_dtype)
        return {n: out[n] for n in self.param_names}

    def _precondition_dense(self, grads, damping, out_dtype):
        flat = torch.cat([grads[n].reshape(grads[n].shape[0], -1).to(torch.float64)
                          for n in self.param_names], dim=1)
        dense = self.dense.to(flat.device)
        lam = 0.1 * float(torch.diagonal(dense).mean()) if damping is None else damping
        solved = torch.linalg.solve(dense + lam * torch.eye(dense.shape[0], dtype=dense.dtype,
                                                             device=dense.device), flat.T).T
        out, off = {}, 0
        for n in self.param_names:
            numel = grads[n][0].numel()
            out[n] = solved[:, off:off + numel].reshape(grads[n].shape).to(out_dtype)
            off += numel
        return out

    # -------------------------------------------------------------------- save / load

    def state(self) -> dict:
        """Every tensor as ``{key: tensor}`` (keys ``module/name``; ``dense`` for exact)."""
        tensors = {}
        for lf in self.layers.values():
            for key, t in lf.tensors.items():
                tensors[f"{lf.module}/{key}"] = t.contiguous()
        if self.dense is not None:
            tensors["dense"] = self.dense.contiguous()
        return tensors

    def _metadata(self) -> dict:
        layers = {name: {"weight": lf.weight, "bias": lf.bias,
                         "weight_shape": list(lf.weight_shape), "conv": list(lf.conv),
                         "groups": lf.groups} for name, lf in self.layers.items()}
        return {"format": FORMAT_VERSION, "config": self.config, "fingerprint": self.fingerprint,
                "num_data": self.num_data, "layers": layers, "param_names": self.param_names}

    def save(self, path) -> None:
        """Write the factors to ``path`` (safetensors, config and fingerprint in its metadata).
        The file appears whole or not at all (temp file, fsync, rename)."""
        from safetensors.torch import save_file

        path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=".factors-", suffix=".tmp", dir=directory)
        os.close(fd)
        try:
            save_file(self.state(), tmp, metadata={"fastattr": json.dumps(self._metadata())})
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    @classmethod
    def load(cls, path, model: nn.Module | None = None, **expected) -> "Factors":
        """Read factors saved by ``save``. With ``model``, its selected parameters must have
        the names, shapes and values the factors were fitted on; ``expected`` config entries
        (``strategy="ekfac"``, ``ggn="model"``, ...) must match. Mismatches raise
        ``ValueError`` saying what differs.

        Example::

            factors = Factors.load("f.safetensors", model=unet, strategy="ekfac")
        """
        from safetensors import safe_open

        path = os.fspath(path)
        with safe_open(path, framework="pt") as fh:
            meta = (fh.metadata() or {}).get("fastattr")
            if meta is None:
                raise ValueError(f"{path} was not written by fastattr.Factors.save")
            meta = json.loads(meta)
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}
        if meta.get("format") != FORMAT_VERSION:
            raise ValueError(f"{path} has factor format {meta.get('format')}, this fastattr "
                             f"reads {FORMAT_VERSION}")
        diffs = [f"{k}: saved {meta['config'].get(k)!r}, expected {v!r}"
                 for k, v in expected.items() if meta["config"].get(k) != v]
        if model is not None:
            names = list(meta["fingerprint"]["params"])
            params = dict(model.named_parameters())
            missing = [n for n in names if n not in params]
            if missing:
                diffs.append(f"the model has no parameters {missing}")
            else:
                shapes = {n: list(params[n].shape) for n in names}
                wrong = {n: (meta["fingerprint"]["params"][n], s) for n, s in shapes.items()
                         if meta["fingerprint"]["params"][n] != s}
                if wrong:
                    diffs.append("parameter shapes differ (saved, model): " + ", ".join(
                        f"{n} {a} vs {b}" for n, (a, b) in wrong.items()))
                elif _weights_digest(model, names) != meta["fingerprint"]["weights_sha256"]:
                    diffs.append("the model's parameter values differ from those the factors "
                                 "were fitted on (another checkpoint?)")
        if diffs:
            raise ValueError(f"factors in {path} do not match: " + "; ".join(diffs))
        layers = {}
        for name, info in meta["layers"].items():
            prefix = f"{name}/"
            own = {k[len(prefix):]: t for k, t in tensors.items() if k.startswith(prefix)}
            layers[name] = LayerFactors(name, info["weight"], info["bias"],
                                        tuple(info["weight_shape"]), tuple(info["conv"]),
                                        info["groups"], own)
        return cls(layers, meta["config"], meta["fingerprint"], meta["num_data"],
                   tensors.get("dense"), meta["param_names"])


# ----------------------------------------------------------------------------- the fitting


class _Layer:
    """Running sums of one module while fitting."""

    def __init__(self, module_name, module, weight, bias, kind):
        self.module_name, self.weight, self.bias, self.kind = module_name, weight, bias, kind
        if kind == CONV2D:
            pads = _conv_padding(module)
            self.conv = (*module.kernel_size, *module.stride, *pads, *module.dilation,
                         module.groups) if pads is not None else None
            self.groups = module.groups
        else:
            self.conv, self.groups = (), 1
        self.weight_shape = tuple(module.weight.shape)
        self.S_a = self.s_a = self.S_g = self.lam = None
        self.rows_a = 0  # the normaliser of A: rows (x positions for expand)
        self.calls = 0


def _add(acc, value):
    value = value.to(torch.float64)
    return value if acc is None else acc.add_(value)


def _check_finite(name: str, what: str, t: torch.Tensor):
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise FloatingPointError(
            f"layer {name}: the {what} has {bad} NaN/Inf entries (a diverged model, a loss "
            "that overflows, or inf/nan in the data); cannot eigendecompose it")


class _Fitter:
    def __init__(self, model, loss, strategy, ggn, sharing, K, names, seed, backend):
        self.model, self.loss, self.strategy, self.ggn = model, loss, strategy, ggn
        self.sharing, self.K, self.seed, self.backend = sharing, K, seed, backend
        self.names = names
        cov = coverage(model, names)
        bad = [n for n, m in cov.items() if m not in (LINEAR, CONV2D)]
        if bad and strategy != "exact":
            notes = {n: cov.plans[n].note or cov[n] for n in bad}
            raise ValueError(
                f"K-FAC covers the weights and biases of Linear / Conv2d modules only; these "
                f"selected parameters are not: {notes}. Select others with params= "
                "(default: fastattr.curvature.kfac_params(model))")
        self.layers = {}
        modules = dict(model.named_modules())
        for name, plan in cov.plans.items():
            if plan.method not in (LINEAR, CONV2D):
                continue
            lay = self.layers.get(plan.module)
            if lay is None:
                lay = _Layer(plan.module, modules[plan.module], None, None, plan.method)
                self.layers[plan.module] = lay
            setattr(lay, plan.role, name)
        for lay in self.layers.values():
            if lay.weight is None:
                raise ValueError(f"module {lay.module_name}: its bias is selected without its "
                                 "weight; K-FAC needs both (or the weight alone)")
            if lay.conv is None:
                raise ValueError(f"module {lay.module_name}: string padding other than symmetric"
                                 " is not supported")
        self.num_data = 0
        self.phase = "covariance"

    # ---- rows and pseudo-gradients

    def _rows(self, batch, model=None):
        rows = self.loss(self.model if model is None else model, batch, self.K)
        if not isinstance(rows, tuple) or len(rows) < 2:
            raise TypeError("loss(model, batch, samples_per_example) must return "
                            "fastattr.diffusion.Rows(outputs, targets, ids)")
        outputs, targets = rows[0], rows[1]
        ids = rows[2] if len(rows) > 2 else None
        if not isinstance(outputs, torch.Tensor) or outputs.dim() < 1:
            raise TypeError("Rows.outputs must be a Tensor [N, ...]")
        n = outputs.shape[0]
        if ids is None:
            if getattr(self, "group", None) is not None and self.ggn == "model":
                raise ValueError(
                    "under torch.distributed the loss must return Rows with ids: the GGN's "
                    "random output vectors are keyed by datum id, and a rank cannot number "
                    "the data of batches other ranks hold (DiffusionLoss returns them; give "
                    "regression batches as (x, y, ids))")
            ids = torch.arange(self.num_data, self.num_data + n, device=outputs.device)
        return outputs, targets, torch.as_tensor(ids).to(torch.int64), n

    def _ggn_vectors(self, ids: torch.Tensor, d: int, device) -> torch.Tensor:
        """√(2/d)·ξ per datum: [N, d] from the Philox generator (stream GGN)."""
        materialize = implementation(select_backend("auto", ids.device), "project",
                                     "materialize")
        xi = materialize(ids, d, "gaussian", rng.philox_key(self.seed), int(rng.Stream.GGN))
        # materialize scales by 1/√d; the GGN of mean-squared error over d entries needs √(2/d)
        return (xi * math.sqrt(2.0)).to(device)

    def _pseudo_losses(self, outputs, targets, ids, k=None):
        flat = outputs.reshape(outputs.shape[0], -1)
        d = flat.shape[1]
        if self.ggn == "loss":
            if targets is None or tuple(targets.shape) != tuple(outputs.shape):
                raise ValueError(f"ggn='loss' needs targets of the outputs' shape "
                                 f"{tuple(outputs.shape)}")
            return (flat - targets.reshape(flat.shape).detach()).square().mean(1)
        if self.ggn == "model_exact":
            return flat[:, k] * math.sqrt(2.0 / d)
        v = self._ggn_vectors(ids, d, flat.device).to(flat.dtype)
        return (flat * v).sum(1)

    # ---- one batch

    def run_batch(self, batch):
        passes = [None]
        if self.ggn == "model_exact":
            passes = "all"
        first = True
        k = 0
        while True:
            self._first_pass = first
            with Capture(self.model, self.names, on_layer=self._on_layer) as cap:
                outputs, targets, ids, n = self._rows(batch)
                d = outputs[0].numel()
                # calls per module in this forward: several calls of one module sum into
                # one gradient before Λ squares it
                self._calls_now = {}
                for call in cap._calls:
                    self._calls_now[call.module_name] = self._calls_now.get(call.module_name, 0) + 1
                cap.backward(self._pseudo_losses(outputs, targets, ids, k))
            if self.phase == "lambda":
                self._flush_pending()
            first = False
            k += 1
            if passes != "all" or k >= d:
                break
        self.num_data += n

    def _on_layer(self, module_name, layer):
        lay = self.layers.get(module_name)
        if lay is None:
            return
        if self.phase == "covariance":
            self._covariance(lay, layer)
        else:
            self._lambda(lay, layer)

    def _covariance(self, lay, layer):
        n = layer.a.shape[0]
        if self.sharing == "expand":
            positions = layer.g.shape[2] * layer.g.shape[3] if lay.conv else layer.a.shape[1]
        else:
            positions = 1
        if self._first_pass:
            # fp64 running sum of the upper triangle only: half the memory of the full matrix
            if lay.S_a is None:
                groups, f = covariance_shape(layer.a, lay.conv)
                lay.S_a = layer.a.new_zeros(groups, f * (f + 1) // 2, dtype=torch.float64)
                lay.s_a = layer.a.new_zeros(groups, f, dtype=torch.float64)
            if self.sharing == "reduce":  # the rows are sums over r positions: ā = sum / r
                r = layer.g.shape[2] * layer.g.shape[3] if lay.conv else layer.a.shape[1]
                S, s = covariance(layer.a, lay.conv, True, self.backend)
                add_packed(S / (r * r), s / r, lay.S_a, lay.s_a)
            else:  # the kernel adds into the running sums: no S or packed copy per batch
                covariance_add(layer.a, lay.S_a, lay.s_a, lay.conv, False, self.backend)
            lay.rows_a += n * positions
            lay.calls += 1
        g_conv = (1, 1, 1, 1, 0, 0, 1, 1, lay.groups) if lay.conv else ()
        S_g, _ = covariance(layer.g, g_conv, self.sharing == "reduce", self.backend)
        lay.S_g = _add(lay.S_g, S_g)

    def _rotate(self, lay, a, g, QA, QG):
        """Rotated ``(a' [G, n, P, Fa], g' [G, n, P, O])`` float32 of one chunk of rows."""
        n = a.shape[0]
        has_bias = lay.bias is not None
        Fw = math.prod(lay.weight_shape[1:])
        if lay.conv:
            kh, kw, sh, sw, ph, pw, dh, dw, groups = lay.conv
            # the rotation as a convolution: weight = Q_A's weight rows, bias = its bias row
            cin = lay.weight_shape[1]
            weight = QA[:, :Fw, :].transpose(1, 2).reshape(groups * QA.shape[2], cin, kh, kw)
            bias = QA[:, Fw, :].reshape(-1) if has_bias else None
            if groups == 1:
                # channels-last in and out: the [n, Ho, Wo, Fa] result is the [n, P, Fa] rows
                # the Λ kernel reads, without a layout copy of this (patch-sized) tensor.
                # Output channels padded with zero filters to a multiple of 16: oneDNN runs
                # e.g. 880 channels 5-15% faster than 865 (the caller drops the extra Λ
                # columns, which are exact zeros)
                fa = QA.shape[2]
                pad = -fa % 16
                if pad:
                    weight = torch.cat([weight, weight.new_zeros(pad, *weight.shape[1:])])
                    bias = None if bias is None else torch.cat([bias, bias.new_zeros(pad)])
                x = a.to(torch.float32).contiguous(memory_format=torch.channels_last)
                ar = torch.nn.functional.conv2d(x, weight, bias, (sh, sw), (ph, pw), (dh, dw))
                ar = ar.permute(0, 2, 3, 1).reshape(1, n, -1, fa + pad)
            else:
                ar = torch.nn.functional.conv2d(a.to(torch.float32), weight, bias, (sh, sw),
                                                (ph, pw), (dh, dw), groups)
                ar = ar.reshape(n, groups, QA.shape[2], -1).permute(1, 0, 3, 2)
            gg = g.to(torch.float32).reshape(n, groups, lay.d_out_g, -1).permute(1, 0, 3, 2)
            gr = gg @ QG[:, None]
            return ar, gr
        a = a.to(torch.float32)
        ar = a @ QA[0, :Fw]
        if has_bias:
            ar = ar + QA[0, Fw]
        gr = g.to(torch.float32) @ QG[0]
        return ar[None], gr[None]

    def _lambda(self, lay, layer):
        n = layer.a.shape[0]
        P = layer.g.shape[2] * layer.g.shape[3] if lay.conv else layer.a.shape[1]
        QA, QG = self._bases(lay)
        Fa = QA.shape[2]
        step = max(1, LAMBDA_CHUNK_ENTRIES // max(1, P * Fa * lay.groups))
        if self._calls_now.get(lay.module_name, 1) > 1:
            # several calls of one module sum into one gradient before squaring: keep every
            # call and square once the batch's backward is through (_flush_pending)
            lay.pending.append((layer.a, layer.g))
            return
        for start in range(0, n, step):
            ar, gr = self._rotate(lay, layer.a[start:start + step], layer.g[start:start + step],
                                  QA, QG)
            self._lambda_add(lay, ar, gr)

    def _bases(self, lay):
        """float32 ``(Q_A, Q_G)`` of a layer for the Λ pass (identities for "diagonal", made
        when needed rather than stored)."""
        if lay.identity:
            fa = math.prod(lay.weight_shape[1:]) + (lay.bias is not None)
            eye = torch.eye(fa, dtype=torch.float32)
            return (eye.expand(lay.groups, fa, fa),
                    torch.eye(lay.d_out_g).expand(lay.groups, lay.d_out_g, lay.d_out_g))
        return lay.QA.to(torch.float32), lay.QG.to(torch.float32)

    def _flush_pending(self):
        for lay in self.layers.values():
            calls, lay.pending = lay.pending, []
            if not calls:
                continue
            n = calls[0][0].shape[0]
            QA, QG = self._bases(lay)
            step = max(1, LAMBDA_CHUNK_ENTRIES // max(1, sum(
                (g.shape[2] * g.shape[3] if lay.conv else a.shape[1]) for a, g in calls)
                * QA.shape[2] * lay.groups))
            for start in range(0, n, step):
                parts = [self._rotate(lay, a[start:start + step], g[start:start + step],
                                      QA, QG) for a, g in calls]
                self._lambda_add(lay, torch.cat([p[0] for p in parts], dim=2),
                                 torch.cat([p[1] for p in parts], dim=2))

    def _lambda_add(self, lay, ar, gr):
        lam = torch.stack([ekfac_lambda(ar[i].contiguous(), gr[i].contiguous(), self.backend)
                           for i in range(ar.shape[0])])
        fa = math.prod(lay.weight_shape[1:]) + (lay.bias is not None)
        lay.lam = _add(lay.lam, lam[..., :fa])  # _rotate may pad a' with zero columns

    # ---- between the passes

    def covariances(self, lay, symmetric: bool = True):
        """The normalised ``(A, G)`` of one layer, float64 (A unpacked: a transient; with
        ``symmetric=False`` only its upper triangle is filled, which is all
        ``eigh(UPLO="U")`` reads)."""
        if lay.S_a is None:
            raise ValueError(f"module {lay.module_name} was never reached by the loss: "
                             "exclude its parameters with params=")
        groups, f = lay.s_a.shape
        fa = f + (lay.bias is not None)
        A = lay.S_a.new_zeros(groups, fa, fa)
        unpack_upper(lay.S_a, f, symmetric, out=A[:, :f, :f])
        if lay.bias is not None:  # the augmented [a; 1]: column sums and the row count
            A[:, :f, f] = lay.s_a
            A[:, f, f] = float(lay.rows_a)
            if symmetric:
                A[:, f, :f] = lay.s_a
        return A.div_(lay.rows_a), lay.S_g / self.num_data

    def eigendecompose(self):
        """fp64 eigh of every layer's A and G, one layer at a time; the running sums are
        released as we go and the eigenvectors kept in ``factor_dtype``."""
        for lay in self.layers.values():
            A, G = self.covariances(lay, symmetric=self.keep_covariances)
            lay.S_a = lay.s_a = lay.S_g = None
            _check_finite(lay.module_name, "activation covariance A", A)
            _check_finite(lay.module_name, "gradient covariance G", G)
            G = (G + G.transpose(1, 2)) / 2
            lay.eigA, QA = torch.linalg.eigh(A, UPLO="U")
            lay.eigG, QG = torch.linalg.eigh(G)
            lay.QA, lay.QG = QA.to(self.factor_dtype), QG.to(self.factor_dtype)
            if self.keep_covariances:
                lay.A, lay.G = A, G

    # ---- torch.distributed: each rank ran its share of the batches

    def reduce(self, keys) -> None:
        """Sum the running sums ``keys`` of every layer, ``num_data`` and the row counts over
        the ranks, in float64. A rank that saw no batch has no sums yet: the shapes come
        from the ranks that have them."""
        group = self.group
        shapes = distributed.all_gather(
            {name: {k: None if getattr(lay, k) is None else list(getattr(lay, k).shape)
                    for k in keys} for name, lay in self.layers.items()}, group)
        device = next(self.model.parameters()).device
        for name, lay in self.layers.items():
            for k in keys:
                shape = next((s[name][k] for s in shapes if s[name][k] is not None), None)
                if shape is None:
                    continue
                mine = getattr(lay, k)
                if mine is None:
                    mine = torch.zeros(shape, dtype=torch.float64, device=device)
                setattr(lay, k, distributed.all_reduce(mine, group))
        counts = distributed.all_reduce(torch.tensor(
            [self.num_data] + [lay.rows_a for lay in self.layers.values()],
            dtype=torch.float64), group)
        self.num_data = int(counts[0])
        for lay, rows in zip(self.layers.values(), counts[1:].tolist()):
            lay.rows_a = int(rows)

    def broadcast_bases(self) -> None:
        """Rank 0's eigendecompositions on every rank: the same bases bit for bit, whatever
        each rank's LAPACK would have returned."""
        keys = ("eigA", "QA", "eigG", "QG") + (("A", "G") if self.keep_covariances else ())
        device = next(self.model.parameters()).device
        theirs = distributed.broadcast(
            {name: {k: getattr(lay, k) for k in keys} for name, lay in self.layers.items()},
            self.group)
        for name, lay in self.layers.items():
            for k in keys:
                setattr(lay, k, theirs[name][k].to(device))

    def run_shard(self, data, progress: bool, desc: str) -> None:
        """``run_batch`` over this rank's batches of ``data`` (all of them without a group),
        each cut into parts of at most ``max_rows`` rows."""
        examples = None if self.max_rows is None else max(1, self.max_rows // self.K)
        for batch in _shard(data, progress, desc, self.group):
            for part in [batch] if examples is None else split_batch(batch, examples):
                self.run_batch(part)

    def start_lambda(self, identity: bool):
        self.phase = "lambda"
        self.num_data_cov, self.num_data = self.num_data, 0
        for lay in self.layers.values():
            lay.d_out_g = lay.weight_shape[0] // lay.groups
            lay.identity = identity
            lay.lam, lay.pending = None, []

    def factors(self, config, fp) -> Factors:
        layers = {}
        for lay in self.layers.values():
            tensors = {}
            if self.strategy in ("kfac", "ekfac"):
                tensors.update(QA=lay.QA, QG=lay.QG, eigA=lay.eigA, eigG=lay.eigG)
                if self.keep_covariances:
                    tensors.update(A=lay.A, G=lay.G)
            if self.strategy in ("ekfac", "diagonal"):
                lam = lay.lam / self.num_data
                _check_finite(lay.module_name, "eigenvalue correction Λ", lam)
                tensors["lam"] = lam
            layers[lay.module_name] = LayerFactors(
                lay.module_name, lay.weight, lay.bias, lay.weight_shape,
                lay.conv, lay.groups, {k: v.to("cpu") for k, v in tensors.items()})
        num = self.num_data if self.strategy == "diagonal" else getattr(
            self, "num_data_cov", self.num_data)
        return Factors(layers, config, fp, num, param_names=self.names)


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _shard(data, progress: bool, desc: str, group):
    """This rank's batches of ``data`` (``distributed.owner``; every batch without a group),
    with rank 0's progress bar over the whole pass."""
    if progress and distributed.is_main():
        from tqdm.auto import tqdm

        try:
            total = len(data)
        except TypeError:
            total = None
        data = tqdm(data, total=total, desc=desc, leave=False)
    rank = 0 if group is None else group.rank
    for index, batch in enumerate(data):
        if distributed.owner(index, group) == rank:
            yield batch


def fit_factors(model: nn.Module, data, loss, *, strategy: str = "ekfac", ggn: str = "model",
                sharing: str = "expand", samples_per_example: int = 1, params=None,
                seed: int = 0, backend: str = "auto", factor_dtype=torch.float32,
                keep_covariances: bool = False, max_rows: int | None = 128,
                progress: bool = True) -> Factors:
    """Fit the curvature of ``model``'s loss on ``data`` (see the module docstring).

    Args:
        model: any ``nn.Module`` (call ``model.eval()`` first: dropout and batch-norm
            statistics would make the data's gradients inconsistent).
        data: an iterable of batches (re-iterated once per data pass: a list or a
            ``DataLoader``, not a generator).
        loss: ``loss(model, batch, samples_per_example) -> Rows(outputs, targets, ids)``:
            ``fastattr.diffusion.DiffusionLoss()`` for diffusers UNets, ``regression_loss``
            for ``(x, y)`` batches, or your own. The loss of a row is the mean squared error of
            ``outputs`` against ``targets`` over the non-leading dims.
        strategy: "ekfac" | "kfac" | "diagonal" | "exact".
        ggn: "model" | "model_exact" | "loss".
        sharing: "expand" | "reduce".
        samples_per_example: K (x_t, t, ε) data per example, passed to ``loss``.
        params: parameters (names or a filter, as ``fastattr.select_params``); default
            ``kfac_params(model)``.
        seed: seed of the GGN-model random output vectors.
        backend: kernels' backend ("auto", "reference", "cpu", "triton", "cuda").
        factor_dtype: dtype the eigenvectors are kept in (float32, as kronfluence, halves
            their memory; float64 for oracle-grade tests). Running sums, eigenvalues and Λ
            are float64 regardless.
        keep_covariances: also keep the normalised A and G (float64) in the factors.
        max_rows: most loss rows (examples x ``samples_per_example``) in one forward /
            backward: a larger batch is cut along its examples (``fastattr.batching``) and
            run in parts. The factors are sums over data, so they do not change beyond
            float rounding, while the peak memory stops growing with the batch (the model's
            saved activations are per row). None: whole batches.
        progress: show progress bars.

    Example::

        from fastattr.diffusion import DiffusionLoss
        factors = fit_factors(unet.eval(), batches, DiffusionLoss(), samples_per_example=10)
    """
    _check_choice("strategy", strategy, STRATEGIES)
    _check_choice("ggn", ggn, GGNS)
    _check_choice("sharing", sharing, SHARING)
    if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, int)
                                 or max_rows < 1):
        raise ValueError(f"max_rows must be None or an int >= 1, got {max_rows!r}")
    if isinstance(samples_per_example, bool) or not isinstance(samples_per_example, int) \
            or samples_per_example < 1:
        raise ValueError(f"samples_per_example must be an int >= 1, got {samples_per_example!r}")
    if not callable(loss):
        raise TypeError("loss must be a callable (model, batch, samples_per_example) -> Rows")
    if iter(data) is data:
        raise TypeError("data must be re-iterable (a list or DataLoader, not a generator): "
                        "the factors take two passes over it")
    names = list(select_params(model, kfac_params(model) if params is None else params))
    config = {"strategy": strategy, "ggn": ggn, "sharing": sharing,
              "factor_dtype": str(factor_dtype).replace("torch.", ""),
              "samples_per_example": samples_per_example, "seed": seed,
              "loss": loss.config() if hasattr(loss, "config") else getattr(
                  loss, "__name__", type(loss).__name__)}
    fp = fingerprint(model, names)
    group = distributed.current()
    distributed.agree({"config": config, "fingerprint": fp}, "fit_factors' config", group)
    if strategy == "exact":
        return _fit_exact(model, data, loss, ggn, samples_per_example, names, seed, config, fp,
                          progress)
    if factor_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"factor_dtype must be torch.float32 or torch.float64, got {factor_dtype}")
    fitter = _Fitter(model, loss, strategy, ggn, sharing, samples_per_example, names, seed,
                     backend)
    fitter.group, fitter.max_rows = group, max_rows
    fitter.factor_dtype, fitter.keep_covariances = factor_dtype, bool(keep_covariances)
    timings = {}
    clock = time.perf_counter()
    if strategy in ("kfac", "ekfac"):
        fitter.run_shard(data, progress, "covariance")
        if group is not None:
            fitter.reduce(("S_a", "s_a", "S_g"))
        if fitter.num_data == 0:
            raise ValueError("data is empty")
        timings["covariance"], clock = time.perf_counter() - clock, time.perf_counter()
        release_free_memory()
        fitter.eigendecompose()
        release_free_memory()
        if group is not None:
            fitter.broadcast_bases()
        timings["eigendecomposition"], clock = time.perf_counter() - clock, time.perf_counter()
    if strategy in ("ekfac", "diagonal"):
        fitter.start_lambda(identity=strategy == "diagonal")
        fitter.run_shard(data, progress, "eigenvalue correction")
        if group is not None:
            fitter.reduce(("lam",))
        if fitter.num_data == 0:
            raise ValueError("data is empty")
        timings["lambda"] = time.perf_counter() - clock
    factors = fitter.factors(config, fp)
    factors.timings = timings
    return factors


def _fit_exact(model, data, loss, ggn, K, names, seed, config, fp, progress) -> Factors:
    """The dense GGN ``(1/N) Σ ψψᵀ`` over the selected parameters (tiny models only)."""
    from .grads import per_sample_grads

    helper = _Fitter.__new__(_Fitter)
    helper.model, helper.loss, helper.K, helper.seed, helper.ggn = model, loss, K, seed, ggn
    helper.num_data = 0
    helper.group = group = distributed.current()
    p = sum(math.prod(t.shape) for n, t in model.named_parameters() if n in set(names))
    if p > 20000:
        raise ValueError(f"strategy='exact' builds a dense {p}x{p} matrix: for tiny models only "
                         "(select fewer parameters with params=)")
    dense = torch.zeros(p, p, dtype=torch.float64)
    for batch in _shard(data, progress, "exact GGN", group):
        outputs, targets, ids, n = helper._rows(batch)
        d = outputs[0].numel()
        for k in range(d if ggn == "model_exact" else 1):
            def output_fn(m, b, k=k):
                o, t, i, _ = helper._rows(b, m)
                return helper._pseudo_losses(o, t, i, k)

            grads = per_sample_grads(model, output_fn, batch, params=names)
            flat = torch.cat([grads[nm].reshape(n, -1).to(torch.float64) for nm in names], 1)
            dense += flat.T @ flat
        helper.num_data += n
    if group is not None:
        dense = distributed.all_reduce(dense, group)
        helper.num_data = int(distributed.all_reduce(torch.tensor([helper.num_data]), group)[0])
    if helper.num_data == 0:
        raise ValueError("data is empty")
    return Factors({}, config, fp, helper.num_data, dense / helper.num_data, names)
