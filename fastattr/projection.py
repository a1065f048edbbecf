"""``Projector``: random projection of (per-sample) gradients with a matrix that is never stored.

The p x k matrix R is a pure function of (seed, ensemble_id, kind, k) -- see ``fastattr.rng``
and shared/DESIGN.md -- so every backend, batch split, machine and GPU model uses the same R.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from . import ops
from .backends import check_backend_name, select_backend
from .kernels import implementation
from .rng import KINDS, Stream, philox_key

__all__ = ["Projector"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_INDEX = (1 << 63) - 1


def _check_dtype(name: str, t: torch.Tensor) -> torch.Tensor:
    if t.dtype in _FLOAT_DTYPES:
        return t
    if t.dtype == torch.float64:  # accepted for convenience; fp32 accumulate everywhere
        return t.to(torch.float32)
    raise TypeError(
        f"{name} must be float32, bfloat16 or float16 (float64 is converted), got {t.dtype}"
    )


def _flatten_layers(x, arg: str = "x", explicit_offsets=None):
    """``x`` -> (names, 2-D views [B, p_l], offsets). A dict/list is its concatenation,
    unless ``explicit_offsets`` places the layers explicitly (validated here)."""
    if isinstance(x, torch.Tensor):
        if x.dim() != 2:
            raise ValueError(
                f"{arg} must be a 2-D tensor [B, p] (or a dict/list of per-layer tensors "
                f"[B, ...]), got shape {tuple(x.shape)}"
            )
        items = [(arg, x)]
    elif isinstance(x, Mapping):
        items = [(f"{arg}[{key!r}]", value) for key, value in x.items()]
    elif isinstance(x, Sequence) and not isinstance(x, (str, bytes)):
        items = [(f"{arg}[{i}]", value) for i, value in enumerate(x)]
    else:
        raise TypeError(
            f"{arg} must be a Tensor [B, p] or a dict/list of tensors, got {type(x).__name__}"
        )
    if not items:
        raise ValueError(f"{arg} is empty: give at least one layer tensor")
    names, layers, offsets = [], [], []
    offset = 0
    first_name, first = items[0]
    for name, t in items:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
        if t.dim() < 1:
            raise ValueError(f"{name} must have a leading batch dimension, got a scalar")
        if t.shape[0] != first.shape[0]:
            raise ValueError(
                f"{name} has batch size {t.shape[0]}, but {first_name} has {first.shape[0]}: "
                "all layers must share the leading batch dimension"
            )
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device}, but {first_name} is on {first.device}")
        per_sample = math.prod(t.shape[1:])
        # a view whenever the strides allow it: nothing is copied for strided layers
        flat = _check_dtype(name, t).reshape(t.shape[0], per_sample)
        if per_sample == 0:
            raise ValueError(f"{name} has no elements per sample (shape {tuple(t.shape)})")
        names.append(name)
        layers.append(flat)
        offsets.append(offset)
        offset += flat.shape[1]
    if offset > _MAX_INDEX:
        raise ValueError(f"{arg} has {offset} features per sample; at most 2**63 - 1 supported")
    if explicit_offsets is not None:
        offsets = _explicit_offsets(x, explicit_offsets, names, layers)
    return names, layers, offsets


def _explicit_offsets(x, offsets, names, layers) -> list:
    """Validate user ``offsets`` (one global start index per layer of ``x``) -> list of ints."""
    if isinstance(x, torch.Tensor) and not isinstance(offsets, (Mapping, Sequence, torch.Tensor)):
        offsets = [offsets]
    if isinstance(offsets, Mapping):
        if not isinstance(x, Mapping):
            raise TypeError("offsets is a dict, so x must be a dict with the same keys")
        if set(offsets.keys()) != set(x.keys()):
            missing = [key for key in x if key not in offsets]
            extra = [key for key in offsets if key not in x]
            raise ValueError(f"offsets must have x's keys: missing {missing}, unexpected {extra}")
        offsets = [offsets[key] for key in x]
    elif isinstance(offsets, torch.Tensor):
        if offsets.dim() != 1 or offsets.is_floating_point() or offsets.dtype == torch.bool:
            raise TypeError(f"offsets must be 1-D integers, got {offsets.dtype} of shape "
                            f"{tuple(offsets.shape)}")
        offsets = [int(v) for v in offsets.tolist()]
    elif not isinstance(offsets, Sequence) or isinstance(offsets, (str, bytes)):
        raise TypeError(f"offsets must be a list of ints (one per layer of x), a dict, or an "
                        f"int for a single tensor; got {type(offsets).__name__}")
    if len(offsets) != len(layers):
        raise ValueError(f"offsets has {len(offsets)} entries but x has {len(layers)} layers")
    out = []
    for name, off, layer in zip(names, offsets, layers):
        off = _check_int(f"offsets for {name}", off, 0, _MAX_INDEX)
        if off + layer.shape[1] > _MAX_INDEX + 1:
            raise ValueError(f"{name} at offset {off} ends past input index 2**63 - 1")
        out.append(off)
    return out


def _check_int(name: str, value, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def _rows_tensor(rows) -> torch.Tensor:
    if isinstance(rows, bool):
        raise TypeError("rows must be an int, a range, a sequence or a 1-D integer tensor")
    if isinstance(rows, int):
        _check_int("rows", rows, 0)
        return torch.arange(rows, dtype=torch.int64)
    if isinstance(rows, range):
        return torch.arange(rows.start, rows.stop, rows.step, dtype=torch.int64)
    t = torch.as_tensor(rows)
    if t.dim() != 1 or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"rows must be 1-D integer indices, got {t.dtype} of shape {tuple(t.shape)}")
    t = t.to(torch.int64)
    if t.numel() and int(t.min()) < 0:
        raise ValueError("rows must be non-negative input indices")
    return t


def _resolve_backend(requested: str, device_type: str, device_index) -> str:
    device = torch.device(device_type) if device_index is None else torch.device(device_type, device_index)
    return select_backend(requested, device)


# Under torch.compile the choice is evaluated eagerly and used as a constant (it probes
# modules and the environment, which dynamo cannot trace). This is exactly what
# torch.compiler.assume_constant_result does, without importing torch._dynamo (and with it
# triton) at fastattr import time; test_custom_op_traces_under_torch_compile guards it.
_resolve_backend._dynamo_marked_constant = True


class Projector:
    """Random projection ``x -> R^T x`` with ``R`` (p x k) generated on the fly.

    Args:
        k: output dimension (any k >= 1). Entries are scaled by ``1/sqrt(k)`` so that
            ``E ||R^T x||^2 = ||x||^2``.
        kind: ``"rademacher"`` (entries +-1/sqrt(k)) or ``"gaussian"`` (N(0, 1/k)).
        seed: 64-bit seed of the matrix.
        ensemble_id: independent matrices for the models of an ensemble (the key is
            ``splitmix64(seed ^ splitmix64(ensemble_id))``, no collisions across ids).
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"triton"`` or ``"cuda"``
            (see ``fastattr.backends()``); ``FASTATTR_BACKEND`` overrides ``"auto"``.
        check_finite: raise ``ValueError`` when an input holds NaN or Inf.
        stream: Philox stream; 0 is the projection (other uses of the generator pick others).

    Results are deterministic (no float atomics) and do not depend on the backend beyond
    fp32 rounding, nor on how a batch is split.

    Example::

        proj = fastattr.Projector(k=4096, seed=0)
        feats = proj.project(per_sample_grads)            # [B, p] -> [B, 4096] float32
        feats = proj.project({"fc1": g1, "fc2": g2})       # same as the flat concatenation
    """

    def __init__(
        self,
        k: int,
        kind: str = "rademacher",
        seed: int = 0,
        ensemble_id: int = 0,
        backend: str = "auto",
        check_finite: bool = False,
        stream: int = int(Stream.PROJECTION),
    ):
        self.k = _check_int("k", k, 1, (1 << 31) - 1)
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.kind = kind
        self.seed = _check_int("seed", seed, 0, (1 << 64) - 1)
        self.ensemble_id = _check_int("ensemble_id", ensemble_id, 0, (1 << 64) - 1)
        self.stream = _check_int("stream", stream, 0, (1 << 32) - 1)
        self.backend = check_backend_name(backend)
        self.check_finite = bool(check_finite)
        self.key = philox_key(self.seed, self.ensemble_id)

    def __repr__(self) -> str:
        return (
            f"Projector(k={self.k}, kind={self.kind!r}, seed={self.seed}, "
            f"ensemble_id={self.ensemble_id}, backend={self.backend!r})"
        )

    @property
    def scale(self) -> float:
        """The entry magnitude 1/sqrt(k) (exact for Rademacher, the std for Gaussian)."""
        return 1.0 / math.sqrt(self.k)

    def resolve_backend(self, device) -> str:
        """The backend ``project`` would use for tensors on ``device``."""
        device = torch.device(device)
        return _resolve_backend(self.backend, device.type, device.index)

    def project(self, x, offsets=None) -> torch.Tensor:
        """Project ``x`` -> ``Tensor[B, k]`` float32 on ``x``'s device.

        ``x`` is a ``Tensor[B, p]`` or a dict / list of per-layer tensors ``[B, ...]``,
        projected as the concatenation of their flattened values in the given order (layer
        ``l`` occupies input indices ``[off_l, off_l + p_l)``; nothing is concatenated in
        memory). fp32, bf16 and fp16 inputs are accumulated in fp32; strided inputs are
        accepted as they are.

        ``offsets`` places the layers explicitly instead: the global input index of each
        layer's first element -- one int per layer in ``x``'s order (a list, or a dict with
        ``x``'s keys when ``x`` is a dict; an int when ``x`` is a single tensor). The result
        is the projection of a longer flat vector holding layer ``l`` at
        ``[offsets[l], offsets[l] + p_l)`` and zeros elsewhere, so the parameters of one
        model can be projected in separate calls (and the results summed). Overlapping
        ranges add.

        Example::

            full = proj.project({"w1": g1, "b1": gb1, "w2": g2})
            part = proj.project({"w2": g2}, offsets=[g1[0].numel() + gb1[0].numel()])
            rest = proj.project({"w1": g1, "b1": gb1})
            # full == part + rest (up to fp32 rounding)
        """
        names, layers, offsets = _flatten_layers(x, explicit_offsets=offsets)
        if self.check_finite:
            for name, layer in zip(names, layers):
                if not bool(torch.isfinite(layer).all()):
                    raise ValueError(f"{name} contains NaN or Inf (check_finite=True)")
        backend = self.resolve_backend(layers[0].device)
        if layers[0].shape[0] == 0:
            return torch.zeros(0, self.k, dtype=torch.float32, device=layers[0].device)
        return ops.project(layers, offsets, self.k, self.kind, self.key[0], self.key[1],
                           self.stream, backend)

    __call__ = project

    def materialize(self, rows, device=None) -> torch.Tensor:
        """Explicit rows of R: ``Tensor[len(rows), k]`` float32.

        ``rows`` is a count n (rows 0..n-1), a ``range``, or 1-D integer input indices.
        Bit-identical across backends for Rademacher, a few ulp for Gaussian.
        """
        rows = _rows_tensor(rows)
        device = torch.device("cpu") if device is None else torch.device(device)
        rows = rows.to(device)
        backend = self.resolve_backend(device)
        materialize = implementation(backend, "project", "materialize")
        return materialize(rows, self.k, self.kind, self.key, self.stream)

    def project_transpose(self, y: torch.Tensor, p, chunk_rows: int | None = None):
        """Map projected vectors back: ``R y``.

        Args:
            y: ``Tensor[k]`` or ``Tensor[B, k]``.
            p: the input dimension (int), or the layer structure of ``project``'s input as a
               dict ``{name: shape}`` or list of shapes (per-sample shapes, no batch dim).
            chunk_rows: rows of R materialised at a time (bounded memory).

        Returns ``Tensor[B, p]`` (``[p]`` for 1-D ``y``), or a dict / list of
        ``[B, *shape]`` tensors matching ``p``.
        """
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"y must be a Tensor, got {type(y).__name__}")
        if y.dim() not in (1, 2) or y.shape[-1] != self.k:
            raise ValueError(f"y must have shape [k] or [B, k] with k={self.k}, got {tuple(y.shape)}")
        y2 = _check_dtype("y", y).to(torch.float32).reshape(-1, self.k)
        if isinstance(p, Mapping):
            shapes = [tuple(s) for s in p.values()]
        elif isinstance(p, Sequence) and not isinstance(p, (str, bytes)):
            shapes = [tuple(s) for s in p]
        else:
            shapes = None
            _check_int("p", p, 1, _MAX_INDEX)
        total = p if shapes is None else sum(math.prod(s) for s in shapes)
        if total < 1:
            raise ValueError("p describes no input features")
        if chunk_rows is not None:
            _check_int("chunk_rows", chunk_rows, 1)
        out = ops.project_transpose_rows(y2, 0, total, self.k, self.kind, self.key, self.stream,
                                         self.resolve_backend(y.device), chunk_rows)
        if shapes is None:
            return out[0] if y.dim() == 1 else out
        pieces, offset = [], 0
        for shape in shapes:
            n = math.prod(shape)
            piece = out[:, offset : offset + n].reshape(out.shape[0], *shape)
            pieces.append(piece[0] if y.dim() == 1 else piece)
            offset += n
        return dict(zip(p.keys(), pieces)) if isinstance(p, Mapping) else pieces
