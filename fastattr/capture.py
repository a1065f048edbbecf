"""Per-sample gradient capture: layer inputs ``a`` and output gradients ``g`` of one backward.

For an ``nn.Linear`` or ``nn.Conv2d`` the per-sample weight gradient is ``G_b = sum_r g_r a_r^T``
over the rows r of sample b, so ``a`` (recorded by a forward hook) and ``g`` (recorded by a
tensor hook on the layer's output) are all the fused kernels of ``fastattr.psg`` need; the
gradient itself is never formed. ``nn.GroupNorm`` / ``nn.LayerNorm`` affines are captured the
same way (input ``x``, output gradient ``g``; a ``NormIO`` record): their per-row gradients
``sum g * x_hat`` (weight) and ``sum g`` (bias) are small and formed directly, with ``x_hat``
recomputed from ``x``. Every other selected parameter (embeddings, bare parameters, modules
whose forward cannot be captured) gets its per-sample gradient from ``torch.func``
(``functional_call`` + ``vmap(grad)`` over rows), which re-runs the model.

Rows and samples. The batch's leading dimension N is the *row* dimension: ``output_fn``
returns one value per row (``Tensor[N]``); they are summed before the backward, so the output
gradient of a layer at row r is exactly the gradient of row r's own value (as long as the
model does not mix rows -- batch-norm in train mode does, and is refused). ``Segments`` then
group rows into samples (K timesteps of one image -> one sample), whose gradients sum.

Limits: the model must not mix rows (batch-norm with batch statistics is refused; other
cross-row operations cannot be detected and give wrong per-sample gradients); a captured layer
must see the rows as its leading dim (refused otherwise, naming the module); non-reentrant
gradient checkpointing works for the captured layers, but torch.func cannot differentiate
through checkpointing, nor reproduce dropout -- call ``model.eval()`` or exclude those
parameters.

``coverage(model, params)`` says, before anything runs, how every selected parameter is
handled::

    >>> print(fastattr.coverage(fastattr.models.digits_unet()))
    parameter                                 shape          method      note
    conv_in.weight                            (32, 1, 3, 3)  conv2d
    conv_in.bias                              (32,)          conv2d
    time_embedding.linear_1.weight            (128, 32)      linear
    ...
    down_blocks.0.resnets.0.norm1.weight      (32,)          groupnorm
    ...
    conv2d: 50 parameters, 557825 of 701345 elements (79.5%)
    linear: 52 parameters, 140960 of 701345 elements (20.1%)
    groupnorm: 42 parameters, 2560 of 701345 elements (0.4%)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .psg import LayerIO, Segments

__all__ = ["Capture", "Coverage", "NormIO", "ParamPlan", "coverage", "select_params",
           "make_segments"]

LINEAR, CONV2D, FUNC = "linear", "conv2d", "torch.func"
GROUPNORM, LAYERNORM = "groupnorm", "layernorm"
NORMS = (GROUPNORM, LAYERNORM)


# ------------------------------------------------------------------------ parameter selection


def select_params(model: nn.Module, params=None) -> dict:
    """The selected parameters of ``model``, ``{name: parameter}`` in ``named_parameters`` order.

    ``params`` is ``None`` (every parameter with ``requires_grad``), a callable
    ``(name, parameter) -> bool``, or a list / tuple / set of names. Tied parameters appear
    once, under their first name (as ``named_parameters`` lists them). Raises ``ValueError``
    when nothing is selected or a name is unknown.

    Example::

        sel = select_params(model, lambda name, p: "attn" in name)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    named = dict(model.named_parameters())
    if params is None:
        selected = {n: p for n, p in named.items() if p.requires_grad}
        what = "no parameter of the model has requires_grad=True"
    elif isinstance(params, str):
        raise TypeError(f"params must be a list of names or a callable, got the string "
                        f"{params!r} (wrap a single name in a list)")
    elif callable(params):
        selected = {n: p for n, p in named.items() if params(n, p)}
        what = "the params filter selects no parameter"
    else:
        try:
            names = list(params)
        except TypeError:
            raise TypeError(f"params must be None, a callable (name, param) -> bool or a list of "
                            f"names, got {type(params).__name__}") from None
        unknown = [n for n in names if n not in named]
        if unknown:
            close = ", ".join(list(named)[:5])
            raise ValueError(f"unknown parameter names {unknown} (names are those of "
                             f"model.named_parameters(), e.g. {close}, ...)")
        wanted = set(names)
        selected = {n: p for n, p in named.items() if n in wanted}
        what = "params is an empty list"
    if not selected:
        raise ValueError(f"no parameter selected: {what}. Select at least one parameter "
                         "(params=None takes every parameter with requires_grad=True)")
    return selected


# --------------------------------------------------------------------------- what is captured


def _conv_padding(module: nn.Conv2d):
    """Symmetric zero padding ``(ph, pw)`` of ``module``, or ``None`` when it is asymmetric."""
    if isinstance(module.padding, str):
        if module.padding == "valid":
            return (0, 0)
        # 'same': total padding d*(k-1) per dim, torch pads the extra element on the right
        pads = []
        for k, d in zip(module.kernel_size, module.dilation):
            total = d * (k - 1)
            if total % 2:
                return None
            pads.append(total // 2)
        return tuple(pads)
    return tuple(module.padding)


def _module_kind(module: nn.Module):
    """``(kind, reason)``: ``kind`` is "linear" / "conv2d" when the module's calls can be
    captured, else ``None`` with the reason it cannot."""
    name = type(module).__name__
    if isinstance(module, nn.Linear):
        # a subclass that overrides forward (LoRA wrappers, ...) computes something else
        if type(module).forward is not nn.Linear.forward:
            return None, f"{name} overrides Linear.forward"
        return LINEAR, ""
    if isinstance(module, nn.Conv2d):
        if (type(module).forward is not nn.Conv2d.forward
                or type(module)._conv_forward is not nn.Conv2d._conv_forward):
            return None, f"{name} overrides Conv2d.forward"
        if module.padding_mode != "zeros":
            return None, f"Conv2d padding_mode={module.padding_mode!r} (only 'zeros' is fused)"
        if _conv_padding(module) is None:
            return None, "Conv2d padding='same' is asymmetric here (even dilation*(k-1) needed)"
        return CONV2D, ""
    if isinstance(module, nn.GroupNorm):
        if type(module).forward is not nn.GroupNorm.forward:
            return None, f"{name} overrides GroupNorm.forward"
        return GROUPNORM, ""
    if isinstance(module, nn.LayerNorm):
        if type(module).forward is not nn.LayerNorm.forward:
            return None, f"{name} overrides LayerNorm.forward"
        return LAYERNORM, ""
    return None, name


@dataclass(frozen=True)
class ParamPlan:
    """How one selected parameter gets its per-sample gradient.

    ``method`` is "linear" or "conv2d" (fused kernels on captured ``a`` / ``g`` of module
    ``module``, whose ``role`` -- "weight" or "bias" -- it is), "groupnorm" or "layernorm"
    (per-row affine gradients from the captured input / output gradient) or "torch.func";
    ``note`` says why a parameter falls back to torch.func. A captured norm that turns out
    to be used without calling it (``F.group_norm(x, g, norm.weight)``) falls back to
    torch.func at run time.
    """

    name: str
    shape: tuple
    method: str
    module: str
    role: str
    note: str = ""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class Coverage(Mapping):
    """``{parameter name: method}`` for the selected parameters, in ``named_parameters``
    order, with the details in ``plans[name]`` (a ``ParamPlan``). ``print`` it for a table.

    Example::

        cov = fastattr.coverage(model)
        cov["fc1.weight"]        # 'linear'
        print(cov)               # one line per parameter and a summary
    """

    def __init__(self, plans):
        self.plans = {p.name: p for p in plans}

    def __getitem__(self, name):
        return self.plans[name].method

    def __iter__(self):
        return iter(self.plans)

    def __len__(self):
        return len(self.plans)

    def offsets(self) -> dict:
        """``{name: global offset}``: parameter l starts at the sum of the numels before it."""
        out, off = {}, 0
        for name, plan in self.plans.items():
            out[name] = off
            off += plan.numel
        return out

    @property
    def num_features(self) -> int:
        """p: the length of the concatenated per-sample gradient."""
        return sum(p.numel for p in self.plans.values())

    def summary(self) -> dict:
        """``{method: (number of parameters, number of elements)}``."""
        out = {}
        for plan in self.plans.values():
            count, numel = out.get(plan.method, (0, 0))
            out[plan.method] = (count + 1, numel + plan.numel)
        return out

    def __repr__(self) -> str:
        parts = ", ".join(f"{m}: {c} params / {n} elements" for m, (c, n) in self.summary().items())
        return f"Coverage({parts})"

    def __str__(self) -> str:
        rows = [("parameter", "shape", "method", "note")]
        rows += [(p.name, str(p.shape), p.method, p.note) for p in self.plans.values()]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = [f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}".rstrip()
                 for r in rows]
        total = self.num_features
        for method, (count, numel) in self.summary().items():
            lines.append(f"{method}: {count} parameters, {numel} of {total} elements "
                         f"({100.0 * numel / max(total, 1):.1f}%)")
        return "\n".join(lines)


def _owners(model: nn.Module) -> dict:
    """``{id(parameter): [(module name, module, attribute)]}`` over distinct modules."""
    owners, seen = {}, set()
    for mname, module in model.named_modules(remove_duplicate=False):
        if id(module) in seen:
            continue
        seen.add(id(module))
        for attr, p in module._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((mname, module, attr))
    return owners


def _plan(model: nn.Module, selected: dict, owners: dict | None = None) -> Coverage:
    owners = _owners(model) if owners is None else owners
    parents = dict(model.named_modules())
    plans = []
    for name, p in selected.items():
        users = owners.get(id(p), [])
        mname, module, attr = users[0] if users else ("", None, "")
        method, note = FUNC, ""
        kinds = []
        for uname, umod, uattr in users:
            kind, why = _module_kind(umod)
            parent = parents.get(uname.rpartition(".")[0]) if uname else None
            if kind is not None and isinstance(parent, nn.MultiheadAttention):
                # MultiheadAttention uses out_proj.weight without calling out_proj
                kind, why = None, "used functionally by MultiheadAttention"
            if kind is not None and uattr not in ("weight", "bias"):
                kind, why = None, f"{type(umod).__name__}.{uattr}"
            kinds.append(kind)
            note = note or why
        if kinds and all(k is not None for k in kinds) and len(set(kinds)) == 1:
            method, note = kinds[0], ""
        elif len(users) > 1 and all(k is not None for k in kinds):
            note = "shared by modules of different kinds (" + ", ".join(sorted(set(kinds))) + ")"
        plans.append(ParamPlan(name, tuple(p.shape), method, mname, attr, note))
    return Coverage(plans)


def coverage(model: nn.Module, params=None) -> Coverage:
    """How each selected parameter's per-sample gradient is computed: a ``Coverage``
    mapping ``name -> "linear" | "conv2d" | "groupnorm" | "layernorm" | "torch.func"``
    (printable as a table).

    ``params`` selects parameters as in ``select_params`` (None: all trainable).

    Example::

        print(fastattr.coverage(model))
        fused = [n for n, m in fastattr.coverage(model).items() if m != "torch.func"]
    """
    return _plan(model, select_params(model, params))


def make_segments(segments, num_rows: int, device=None) -> Segments:
    """``Segments`` from ``None`` (one row per sample), a ``Segments``, or per-row sample ids.

    Example::

        seg = make_segments(torch.arange(4).repeat_interleave(3), 12)   # 3 rows per sample
    """
    if segments is None:
        return Segments.identity(num_rows, device=device)
    if not isinstance(segments, Segments):
        ids = torch.as_tensor(segments)
        if ids.dim() != 1:
            raise ValueError(f"segments must be one sample id per row (1-D), got shape "
                             f"{tuple(ids.shape)}")
        if ids.numel() != num_rows:
            raise ValueError(f"segments has {ids.numel()} sample ids but output_fn returned "
                             f"{num_rows} rows: give one sample id per row")
        segments = Segments.from_ids(ids, device=device)
    if segments.num_rows != num_rows:
        raise ValueError(f"segments describe {segments.num_rows} rows but output_fn returned "
                         f"{num_rows}")
    return segments if device is None else segments.to(device)


def check_row_outputs(out, where: str = "output_fn") -> torch.Tensor:
    """``out`` must be per-row values ``Tensor[N]``; a scalar (reduced) loss is refused."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{where} must return a Tensor of per-row values [N], got "
                        f"{type(out).__name__}")
    if out.dim() == 0:
        raise ValueError(
            f"{where} returned a scalar: return per-row values of shape [N] instead (e.g. "
            "`loss.flatten(1).sum(1)` rather than `loss.mean()`). fastattr sums them before the "
            "backward, so each row's gradient is its own; a mean would scale every gradient "
            "by 1/N and hide which row it came from")
    if out.dim() != 1:
        raise ValueError(f"{where} must return per-row values of shape [N], got shape "
                         f"{tuple(out.shape)} (reduce everything but the row dimension)")
    if not out.is_floating_point():
        raise TypeError(f"{where} must return floating-point values, got {out.dtype}")
    return out


def check_no_row_mixing(model: nn.Module):
    """Batch-norm with batch statistics couples the rows: per-sample gradients are undefined."""
    for mname, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if module.training or module.running_mean is None:
                raise ValueError(
                    f"module {mname or '<model>'} ({type(module).__name__}) normalises with batch "
                    "statistics, which mixes the rows of a batch: per-sample gradients are not "
                    "defined. Call model.eval() (running statistics) or replace it with "
                    "GroupNorm / LayerNorm")


# ----------------------------------------------------------------------------- norm records


@dataclass(frozen=True)
class NormIO:
    """One call of an ``nn.GroupNorm`` / ``nn.LayerNorm``: its input ``x``, output gradient
    ``g`` (same shape) and geometry.

    ``kind`` is "groupnorm" (``x [N, C, *]``, ``shape = (num_groups,)``, channel dim 1) or
    "layernorm" (``x [N, ..., *normalized_shape]``, ``shape = normalized_shape``).
    """

    x: torch.Tensor
    g: torch.Tensor
    kind: str
    shape: tuple
    eps: float

    def x_hat(self) -> torch.Tensor:
        """The normalised input, recomputed from ``x`` in fp32 (biased variance) by torch's
        own fused norm kernel without the affine."""
        x = self.x.to(torch.float32)
        if self.kind == GROUPNORM:
            return torch.nn.functional.group_norm(x, self.shape[0], eps=self.eps)
        return torch.nn.functional.layer_norm(x, self.shape, eps=self.eps)

    def row_grads(self, weight: bool = True, bias: bool = True):
        """Per-row affine gradients ``(weight [N, *pshape] or None, bias [N, *pshape] or
        None)`` (fp32): sums over every non-channel position of ``g * x_hat`` and ``g``."""
        g = self.g.to(torch.float32)
        n = g.shape[0]
        if self.kind == GROUPNORM:
            c = g.shape[1]
            g = g.reshape(n * c, 1, -1)
            # per-(row, channel) dot products as one batched matmul: no g * x_hat temporary
            w = torch.bmm(g, self.x_hat().reshape(n * c, -1, 1)).reshape(n, c) if weight else None
            b = g.sum(2).reshape(n, c) if bias else None
            return w, b

        def reduce(t):
            return t.reshape(n, -1, *self.shape).sum(1)

        w = reduce(g * self.x_hat()) if weight else None
        b = reduce(g) if bias else None
        return w, b


# ------------------------------------------------------------------------------ the capture


class _Call:
    """One captured call of a module: its input ``a`` and, after the backward, ``g``.
    ``conv`` holds the geometry: the conv tuple of ``LayerIO``, or ``(shape, eps)`` of a
    norm (``NormIO``)."""

    __slots__ = ("module_name", "module", "kind", "a", "out", "version", "g", "conv", "done")

    def __init__(self, module_name, module, kind, a, out, conv):
        self.module_name, self.module, self.kind = module_name, module, kind
        self.a, self.out, self.version = a, out, out._version
        self.g, self.conv, self.done = None, conv, False


def _lowest(root, outputs: list) -> list:
    """The tensors of ``outputs`` whose autograd node has no node of another one of them
    below it (reachable through ``next_functions``) in the graph of ``root``; unreached
    outputs are kept too. A backward to these passes through every node of ``outputs``."""
    nodes = {t.grad_fn for t in outputs if t.grad_fn is not None}
    below: dict = {}  # node -> some node of `outputs` is reachable below it
    stack = [(root, False)] if root is not None else []
    while stack:  # iterative post-order walk: the graph can be deeper than Python's stack
        node, children_done = stack.pop()
        if children_done:
            below[node] = any(child in nodes or below[child]
                              for child, _ in node.next_functions if child is not None)
        elif node not in below:
            below[node] = False  # visited (a DAG: no child can be an unfinished ancestor)
            stack.append((node, True))
            stack.extend((child, False) for child, _ in node.next_functions
                         if child is not None and child not in below)
    return [t for t in outputs if t.grad_fn is None or not below.get(t.grad_fn, False)]


class Capture:
    """Context manager recording ``LayerIO(a, g)`` of every call of the captured modules
    (``NormIO(x, g, ...)`` for a GroupNorm / LayerNorm).

    Args:
        model: any ``nn.Module``.
        params: which parameters (``select_params``): None = all with ``requires_grad``.
        on_layer: optional ``callable(module_name, LayerIO)`` run inside the backward as
            soon as a call's output gradient is known (then nothing is kept: memory stays
            at one layer's ``g``); by default the records are kept in ``layers``.

    Inside the ``with`` block run the forward of N rows and pass its per-row outputs
    ``Tensor[N]`` to ``backward`` (once). Parameters whose plan is "torch.func" are not
    captured here (see ``fastattr.grads``). Selected parameters with ``requires_grad=False``
    are switched on for the duration of the block. No ``.grad`` is written: the backward
    only goes as far as the captured outputs.

    Attributes after ``backward``: ``layers`` ``{module name: [LayerIO | NormIO, ...]}``
    (one per call the loss reaches, in call order; the gradients of several calls sum),
    ``plan`` (``Coverage``), ``num_rows`` (N), ``fallback`` (names of selected norm
    parameters whose module was never called although they have a gradient -- used
    functionally: their per-sample gradients must come from torch.func).

    Example::

        with fastattr.Capture(model) as cap:
            cap.backward(loss_per_row(model(x), y))        # Tensor[N]
        offsets, seg = cap.plan.offsets(), Segments.identity(cap.num_rows)
        for module_name, calls in cap.layers.items():
            roles = cap.roles[module_name]                 # {"weight": name, "bias": name}
            for layer in calls:                            # LayerIO (norms give NormIO)
                feats += psg_project(layer, seg, proj, offsets[roles["weight"]],
                                     offsets[roles["bias"]])
    """

    def __init__(self, model: nn.Module, params=None, on_layer=None):
        self.model = model
        self.selected = select_params(model, params)
        owners = _owners(model)
        self.plan = _plan(model, self.selected, owners)
        self.on_layer = on_layer
        self.layers: dict = {}
        self.num_rows = None
        self.fallback: list = []
        self._calls: list = []
        self._handles: list = []
        self._frozen: list = []
        self._state = "new"
        # the modules whose calls are captured: every owner of a fused parameter
        self._modules = {}
        # {module name: {"weight": parameter name, "bias": parameter name}} (selected only)
        self.roles: dict = {}
        for name, plan in self.plan.plans.items():
            if plan.method == FUNC:
                continue
            for uname, umod, attr in owners[id(self.selected[name])]:
                self._modules.setdefault(id(umod), (uname, umod, plan.method))
                self.roles.setdefault(uname, {})[attr] = name

    @property
    def captured_modules(self) -> list:
        """Names of the modules whose calls are captured."""
        return [name for name, _, _ in self._modules.values()]

    def __enter__(self) -> "Capture":
        if self._state != "new":
            raise RuntimeError("a Capture can be entered once; make a new one per batch")
        check_no_row_mixing(self.model)
        self._state = "forward"
        for p in self.selected.values():
            if not p.requires_grad:
                p.requires_grad_(True)
                self._frozen.append(p)
        for mname, module, kind in self._modules.values():
            self._handles.append(module.register_forward_hook(
                self._forward_hook(mname, kind), with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for p in self._frozen:
            p.requires_grad_(False)
        self._frozen.clear()
        self._calls.clear()
        self._state = "closed"
        return False

    def _forward_hook(self, mname, kind):
        def hook(module, args, kwargs, out):
            if self._state != "forward" or not torch.is_grad_enabled():
                return None  # calls outside the captured forward (e.g. recomputation)
            if not isinstance(out, torch.Tensor) or not out.requires_grad:
                return None  # no gradient flows through this call
            a = args[0] if args else kwargs.get("input")
            conv = ()
            if kind == CONV2D:
                ph, pw = _conv_padding(module)
                conv = (*module.kernel_size, *module.stride, ph, pw, *module.dilation,
                        module.groups)
            elif kind == GROUPNORM:
                conv = ((module.num_groups,), float(module.eps))
            elif kind == LAYERNORM:
                conv = (tuple(module.normalized_shape), float(module.eps))
            call = _Call(mname, module, kind, a.detach(), out, conv)
            index = len(self._calls)
            self._calls.append(call)
            out.register_hook(self._grad_hook(index))
            return None

        return hook

    def _grad_hook(self, index):
        def hook(g):
            if self._state != "backward":
                return None
            call = self._calls[index]
            call.g = g.detach() if call.g is None else call.g + g.detach()
            if self.on_layer is not None:
                # hand the call over now and drop it: only one layer's g is alive at a time
                layer = self._layer(call, self.num_rows)
                call.a = call.g = None
                call.done = True
                self.on_layer(call.module_name, layer)
            return None

        return hook

    def _layer(self, call: _Call, n: int):
        """The call's ``LayerIO`` in the psg layout (``NormIO`` for a norm), checked against
        the N rows."""
        a, g = call.a, call.g
        where = f"module {call.module_name} ({type(call.module).__name__})"
        if call.kind in NORMS:
            shape, eps = call.conv
            lead = 2 if call.kind == GROUPNORM else len(shape) + 1
            if a.dim() < lead or a.shape[0] != n:
                raise ValueError(f"{where} got an input of shape {tuple(a.shape)} whose leading "
                                 f"dim is not the batch's N={n} rows. Keep the rows leading or "
                                 "exclude its parameters with the params filter")
            if g is None:
                return None
            return NormIO(a, g, call.kind, shape, eps)
        if call.kind == CONV2D:
            if a.dim() != 4 or a.shape[0] != n:
                raise ValueError(f"{where} got an input of shape {tuple(a.shape)}; expected "
                                 f"[N={n}, C, H, W] with the batch's rows leading. Exclude its "
                                 "parameters with the params filter if it sees no rows")
            if g is None:  # shape check before the backward
                return None
            return LayerIO(a, g, call.conv)
        if a.dim() < 2 or a.shape[0] != n:
            raise ValueError(f"{where} got an input of shape {tuple(a.shape)} whose leading "
                             f"dim is not the batch's N={n} rows (e.g. rows folded into "
                             "another dim, or a broadcast timestep embedding). Keep the rows "
                             "leading or exclude its parameters with the params filter")
        if g is None:  # shape check before the backward
            return None
        return LayerIO(a.reshape(n, -1, a.shape[-1]), g.reshape(n, -1, g.shape[-1]))

    def backward(self, out: torch.Tensor):
        """Sum the per-row outputs ``out [N]`` and backpropagate, recording ``g``.

        Checks that ``out`` is per-row (not a scalar) and that every captured call saw the
        N rows as its leading dim (raising with the module's name otherwise).
        """
        if self._state != "forward":
            raise RuntimeError("Capture.backward must be called once, inside the with block")
        out = check_row_outputs(out)
        n = out.shape[0]
        self.num_rows = n
        for call in self._calls:
            self._layer(call, n)  # checks shapes before the backward runs
        outputs, late = [], []
        for call in self._calls:
            if call.out._version == call.version:
                outputs.append(call.out)
            else:
                # modified in place after the call: grad w.r.t. the tensor now would be the
                # gradient of the modified value; the hook still fires with the original's
                # gradient as long as the backward passes through the call, which asking for
                # the module's own parameter guarantees
                late.append(call)
        # autograd.grad keeps the gradient of every target until it returns; asking only for
        # the outputs with no other captured output below them in the graph still runs the
        # backward through every captured call (each lies on a path to one of them), so the
        # hooks see every g while only a few are kept
        targets = _lowest(out.grad_fn, outputs)
        for call in late:
            targets.append(next(p for p in (call.module.weight, call.module.bias)
                                if p is not None and p.requires_grad))
        # A captured module that was never called contributes nothing: right when it is
        # unused, wrong when its parameters are used without calling it (F.linear(x,
        # mod.weight)). Asking for those parameters' gradients in the same backward tells
        # the two apart at the cost of one small weight-gradient per such module.
        # A norm used that way falls back to torch.func (unless its parameters are shared
        # with a norm that was called: those are captured there).
        called = {id(c.module) for c in self._calls}
        called_params = {id(p) for c in self._calls
                         for p in (getattr(c.module, "weight", None),
                                   getattr(c.module, "bias", None)) if p is not None}
        silent = [(mname, p, kind) for key, (mname, module, kind) in self._modules.items()
                  if key not in called
                  for p in (getattr(module, "weight", None), getattr(module, "bias", None))
                  if p is not None and p.requires_grad
                  and not (kind in NORMS and id(p) in called_params)]
        targets += [p for _, p, _ in silent]
        self._state = "backward"
        if targets and out.requires_grad:
            grads = torch.autograd.grad(out.sum(), targets, allow_unused=True)
            selected = {id(p): name for name, p in self.selected.items()}
            for (mname, p, kind), grad in zip(silent, grads[len(targets) - len(silent):]):
                if grad is not None and kind in NORMS:
                    if id(p) in selected and selected[id(p)] not in self.fallback:
                        self.fallback.append(selected[id(p)])
                elif grad is not None:
                    raise ValueError(
                        f"module {mname} was never called, yet its parameters have a gradient: "
                        "they are used without calling the module (e.g. F.linear(x, "
                        f"{mname}.weight)), so its per-sample gradients cannot be captured. "
                        "Exclude them with the params filter")
        self._state = "done"
        for call in self._calls:
            if call.done or call.g is None:
                continue  # handed over already, or the loss does not reach it (zero gradient)
            layer = self._layer(call, n)
            call.a = call.g = call.out = None  # release memory as we go
            if self.on_layer is not None:
                self.on_layer(call.module_name, layer)
            else:
                self.layers.setdefault(call.module_name, []).append(layer)
        self._calls.clear()
        return self
