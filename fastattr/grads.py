"""Projected per-sample gradients of any ``nn.Module``: ``projected_grads`` and its oracle.

``projected_grads(model, output_fn, batch, projector)`` is the projection of the
concatenated per-sample gradients of the selected parameters, in ``named_parameters`` order
(parameter l at global input offset ``sum of the numels before it``), computed without
forming them:

- ``nn.Linear`` / ``nn.Conv2d`` parameters from the captured layer inputs ``a`` and output
  gradients ``g`` of one forward/backward of the N rows, by the fused kernels
  (``fastattr.psg.psg_project``), one layer call at a time inside the backward;
- ``nn.GroupNorm`` / ``nn.LayerNorm`` affines from the same capture: per-row gradients
  ``sum g * x_hat`` / ``sum g`` (``x_hat`` recomputed from the recorded input), segment-summed
  per call and projected densely at their offsets in one call at the end;
- every other selected parameter by ``torch.func`` (``functional_call`` + ``vmap(grad)``
  over rows), segment-summed and projected at its offset.

``fastattr.coverage(model, params)`` shows which parameter takes which path.
"""

from __future__ import annotations

import torch
from torch import nn

from .capture import (FUNC, Capture, NormIO, _plan, check_row_outputs, make_segments,
                      select_params)
from .psg import LayerIO, Segments, psg_matmul, psg_project
from .reference import psg as ref_psg

__all__ = ["projected_grads", "per_sample_grads", "grads_matmul"]


# ---------------------------------------------------------------------------------- helpers


def _segment_sum(x: torch.Tensor, seg: Segments) -> torch.Tensor:
    """Per-row ``x [N, ...]`` -> per-sample sums ``[B, ...]`` (fp32)."""
    k = seg.rows_per_sample
    if k is not None:  # the common layout: a reshape, no index computation
        x = x.to(torch.float32)
        return x if k == 1 else x.reshape(seg.num_segments, k, *x.shape[1:]).sum(1)
    ids = ref_psg.segment_ids(seg.seg_ptr.to(x.device), seg.order.to(x.device))
    out = torch.zeros((seg.num_segments, *x.shape[1:]), dtype=torch.float32, device=x.device)
    return out.index_add_(0, ids, x.to(torch.float32))


def _bias_rows(layer: LayerIO) -> torch.Tensor:
    """Per-row bias gradient ``[N, d_out]``: the output gradient summed over positions."""
    g = layer.g.to(torch.float32)
    return g.sum(dim=(2, 3)) if layer.is_conv else g.sum(dim=1)


def _norm_grads(roles: dict, layer: NormIO, seg: Segments) -> dict:
    """Per-sample gradients ``{name: [B, *shape]}`` of a norm call's selected affines."""
    w, b = roles.get("weight"), roles.get("bias")
    weight, bias = layer.row_grads(weight=w is not None, bias=b is not None)
    out = {}
    if w is not None:
        out[w] = _segment_sum(weight, seg)
    if b is not None:
        out[b] = _segment_sum(bias, seg)
    return out


class _BoundOutput(nn.Module):
    """``output_fn(model, batch)`` as a module, so ``functional_call`` can swap parameters
    of ``model`` for the duration of an arbitrary user function (not only ``forward``)."""

    def __init__(self, model: nn.Module, output_fn):
        super().__init__()
        self.model = model
        self.__dict__["output_fn"] = output_fn  # not registered, even if it is a Module

    def forward(self, batch):
        return self.output_fn(self.model, batch)


def _func_row_grads(model, output_fn, batch, names: list, n: int, chunk_size=None) -> dict:
    """Per-row gradients ``{name: [N, *shape]}`` of ``output_fn`` by torch.func.

    Every tensor in ``batch`` (nested tuples / lists / dicts) whose leading dim is N is split
    by rows; other leaves are passed whole to every row.
    """
    from torch.func import functional_call, grad, vmap  # torch.func loads lazily
    from torch.utils._pytree import tree_flatten, tree_unflatten

    params = dict(model.named_parameters())
    primals = {f"model.{name}": params[name].detach() for name in names}
    leaves, spec = tree_flatten(batch)
    dims = [0 if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == n else None
            for x in leaves]
    if 0 not in dims:
        raise ValueError(f"batch holds no tensor with N={n} rows (the length of output_fn's "
                         "result), so the rows cannot be separated for torch.func")
    bound = _BoundOutput(model, output_fn)

    def row_value(p, *row_leaves):
        # each row is a batch of one, so the model sees the shapes it always sees
        full = [x.unsqueeze(0) if d == 0 else x for x, d in zip(row_leaves, dims)]
        out = functional_call(bound, p, (tree_unflatten(full, spec),))
        return out.sum()

    try:
        # torch.func.grad differentiates inside an outer no_grad; the no_grad stops autograd
        # from also recording a graph back to the model's other (captured) parameters
        with torch.no_grad():
            per_row = vmap(grad(row_value), in_dims=(None, *dims), chunk_size=chunk_size)(
                primals, *leaves)
    except RuntimeError as exc:
        if "randomness" in str(exc):
            raise RuntimeError(
                "the model draws random numbers (dropout in train mode?) inside output_fn; the "
                "torch.func part of the per-sample gradients cannot reproduce them. Call "
                f"model.eval(), or exclude the torch.func parameters ({exc})") from exc
        if "saved tensor hooks" in str(exc):
            raise RuntimeError(
                "torch.func cannot differentiate through gradient checkpointing, which the "
                "torch.func parameters here need (see fastattr.coverage). Disable "
                "checkpointing, or exclude those parameters with the params filter: the "
                f"captured Linear / Conv2d layers work with non-reentrant checkpointing ({exc})"
            ) from exc
        raise
    return {name: per_row[f"model.{name}"] for name in names}


def _is_block_projector(projector) -> bool:
    """A Kronecker-style projector: one output block per parameter (``project_layer``)."""
    return hasattr(projector, "project_layer") and hasattr(projector, "block_size")


def _check_projector(projector):
    if _is_block_projector(projector):
        return
    if not (hasattr(projector, "project") and hasattr(projector, "k")
            and hasattr(projector, "resolve_backend")):
        raise TypeError(f"projector must be a fastattr.Projector or a KroneckerProjector, got "
                        f"{type(projector).__name__}")


class _Run:
    """One forward/backward of the rows under a ``Capture``; hands each layer call to
    ``on_layer(names, layer, seg)`` and returns the torch.func per-sample gradients."""

    def __init__(self, model, output_fn, batch, params, segments, on_layer, func_chunk_size,
                 on_plan=None):
        if not callable(output_fn):
            raise TypeError(f"output_fn must be a callable (model, batch) -> Tensor[N], got "
                            f"{type(output_fn).__name__}")
        self.seg = None

        def handler(module_name, layer):
            on_layer(cap.roles[module_name], layer, self.seg)

        cap = Capture(model, params, on_layer=handler)
        self.plan = cap.plan
        if on_plan is not None:  # before the forward: on_layer may need what it derives
            on_plan(self.plan)
        with cap:
            if cap.captured_modules:
                out = check_row_outputs(output_fn(model, batch))
            else:  # everything is torch.func: this pass only measures N
                with torch.no_grad():
                    out = check_row_outputs(output_fn(model, batch))
            self.num_rows = out.shape[0]
            self.device = out.device
            self.seg = make_segments(segments, self.num_rows, device=out.device)
            if cap.captured_modules:
                cap.backward(out)
        del out
        fallback = set(cap.fallback)  # norms used without calling them
        func_names = [n for n, m in self.plan.items() if m == FUNC or n in fallback]
        self.func_grads = {}
        if func_names:
            rows = _func_row_grads(model, output_fn, batch, func_names, self.num_rows,
                                   func_chunk_size)
            self.func_grads = {n: _segment_sum(g, self.seg) for n, g in rows.items()}


# ----------------------------------------------------------------------------------- public


def projected_grads(model: nn.Module, output_fn, batch, projector, params=None, segments=None,
                    *, func_chunk_size: int | None = None) -> torch.Tensor:
    """Projected per-sample gradients ``Tensor[B, k]`` (float32) of any ``nn.Module``.

    Args:
        model: the model; its train/eval mode is used as it is (batch-norm in train mode is
            refused: it mixes rows).
        output_fn: ``output_fn(model, batch) -> Tensor[N]``, one value per row (e.g. the
            per-row diffusion loss). The values are summed before the backward; a scalar
            (mean-reduced) result is refused.
        batch: anything ``output_fn`` takes. For the torch.func part every tensor in it
            (nested tuples / lists / dicts) with N leading rows is split by rows; keep
            other tensors (schedules, tables) in ``output_fn``'s closure or with a leading
            dim that is not N.
        projector: a ``fastattr.Projector`` (result ``[B, k]``: the projection of the
            concatenated per-sample gradients of the selected parameters in
            ``named_parameters`` order), or a ``KroneckerProjector`` (result: each selected
            parameter's block, concatenated in that order).
        params: None (every parameter with ``requires_grad``), a callable
            ``(name, param) -> bool``, or a list of names.
        segments: sample id of every row (``[N]`` ints; rows with one id sum, e.g. the K
            timesteps of an image), or a ``fastattr.psg.Segments``; default one row per
            sample. B is the number of samples.
        func_chunk_size: rows per ``vmap`` chunk of the torch.func part (memory bound).

    Linear / Conv2d parameters are computed by the fused kernels of ``projector``'s backend
    from the captured layer inputs / output gradients; GroupNorm / LayerNorm affines from
    the same capture (formed per sample, projected densely); the others by torch.func (see
    ``fastattr.coverage``).

    Example::

        def output_fn(model, batch):
            x0, t, noise = batch
            x_t = sqrt_abar[t, None, None, None] * x0 + sqrt_1m_abar[t, None, None, None] * noise
            return (model(x_t, t).sample - noise).pow(2).flatten(1).mean(1)   # [N]

        proj = fastattr.Projector(k=2048, seed=0)
        ids = torch.arange(B).repeat_interleave(K)      # K timesteps of each image
        feats = fastattr.projected_grads(unet, output_fn, (x0, t, noise), proj, segments=ids)
    """
    _check_projector(projector)
    block = _is_block_projector(projector)
    model_params = dict(model.named_parameters()) if isinstance(model, nn.Module) else {}
    state = {"acc": None, "bias": {}}
    plan_box = {}

    def features(rows: int, device) -> torch.Tensor:
        """The result ``[B, width]``, allocated at the first contribution."""
        if state["acc"] is None:
            state["acc"] = torch.zeros(rows, plan_box["width"], dtype=torch.float32,
                                       device=device)
        return state["acc"]

    def add(cols: slice, value: torch.Tensor):
        features(value.shape[0], value.device)[:, cols] += value

    def on_layer(roles, layer, seg):
        offsets, cols = plan_box["offsets"], plan_box["cols"]
        if isinstance(layer, NormIO):
            # small: accumulated per sample, projected with the other dense leftovers
            for name, rows in _norm_grads(roles, layer, seg).items():
                dense = state["bias"]
                dense[name] = dense[name] + rows if name in dense else rows
            return
        w, b = roles.get("weight"), roles.get("bias")
        if w is None:
            # bias selected without the weight: its gradient is the summed g, projected
            # with the other dense leftovers at the end
            rows = _segment_sum(_bias_rows(layer), seg)
            state["bias"][b] = state["bias"][b] + rows if b in state["bias"] else rows
            return
        b_off = offsets[b] if b is not None else None
        if block:
            if b is None or cols[b].start == cols[w].stop:
                # weight and bias blocks adjacent (as named_parameters lists them): the
                # layer adds its features straight into the result's columns
                stop = cols[w].stop if b is None else cols[b].stop
                acc = features(seg.num_segments, layer.a.device)
                projector.project_layer(layer, seg, offsets[w], b_off,
                                        out=acc[:, cols[w].start:stop])
                return
            res = projector.project_layer(layer, seg, offsets[w], b_off)
            bw = cols[w].stop - cols[w].start
            add(cols[w], res[:, :bw])
            add(cols[b], res[:, bw:])
        else:
            add(slice(None), psg_project(layer, seg, projector, offsets[w], b_off))

    def on_plan(plan):
        # the plan (and with it offsets / columns) is known before the forward runs
        if block:
            cols, start = {}, 0
            for name, p in plan.plans.items():
                size = int(projector.block_size(p.shape))
                cols[name] = slice(start, start + size)
                start += size
            width = start
        else:
            cols, width = {name: slice(None) for name in plan}, projector.k
        plan_box.update(offsets=plan.offsets(), cols=cols, width=width)

    run = _Run(model, output_fn, batch, params, segments, on_layer, func_chunk_size, on_plan)
    plan, offsets, cols, width = run.plan, plan_box["offsets"], plan_box["cols"], plan_box["width"]
    leftovers = {**run.func_grads, **state["bias"]}
    if leftovers:
        names = [n for n in plan if n in leftovers]  # named_parameters order
        grads = {n: leftovers[n].reshape(run.seg.num_segments, *model_params[n].shape)
                 for n in names}
        res = projector.project(grads, offsets=[offsets[n] for n in names])
        if block:
            start = 0
            for n in names:
                size = cols[n].stop - cols[n].start
                add(cols[n], res[:, start:start + size])
                start += size
        else:
            add(slice(None), res)
    if state["acc"] is None:  # no call reached the loss and nothing was left over
        state["acc"] = torch.zeros(run.seg.num_segments, width, dtype=torch.float32,
                                   device=run.device)
    return state["acc"]


def per_sample_grads(model: nn.Module, output_fn, batch, params=None, segments=None,
                     *, func_chunk_size: int | None = None) -> dict:
    """Explicit per-sample gradients ``{name: Tensor[B, *shape]}`` (float32, in
    ``named_parameters`` order), through the same capture as ``projected_grads``.

    The Linear / Conv2d gradients are materialised from the captured ``a`` / ``g`` (memory
    ``B x p``: meant for tests, small models and users who need the gradients themselves);
    arguments as in ``projected_grads``.

    Example::

        grads = fastattr.per_sample_grads(model, output_fn, batch, segments=ids)
        feats = fastattr.Projector(k=512).project(grads)   # == projected_grads(...)
    """
    model_params = dict(model.named_parameters()) if isinstance(model, nn.Module) else {}
    acc = {}

    def put(name, value):
        acc[name] = acc[name] + value if name in acc else value

    def on_layer(roles, layer, seg):
        if isinstance(layer, NormIO):
            for name, rows in _norm_grads(roles, layer, seg).items():
                put(name, rows.reshape(rows.shape[0], *model_params[name].shape))
            return
        w, b = roles.get("weight"), roles.get("bias")
        if w is None:
            put(b, _segment_sum(_bias_rows(layer), seg))
            return
        weight, bias = ref_psg.per_sample_grads(layer.a, layer.g, seg.seg_ptr, seg.order,
                                                layer.conv, b is not None)
        put(w, weight.reshape(weight.shape[0], *model_params[w].shape))
        if b is not None:
            put(b, bias)

    run = _Run(model, output_fn, batch, params, segments, on_layer, func_chunk_size)
    acc.update(run.func_grads)
    out = {}
    for name in run.plan:
        shape = model_params[name].shape
        if name in acc:
            out[name] = acc[name].reshape(run.seg.num_segments, *shape)
        else:  # a captured layer the loss never reaches
            out[name] = torch.zeros(run.seg.num_segments, *shape, dtype=torch.float32,
                                    device=run.device)
    return out


def grads_matmul(model: nn.Module, output_fn, batch, queries: dict, params=None, segments=None,
                 *, backend: str = "auto", func_chunk_size: int | None = None) -> torch.Tensor:
    """``Tensor[B, q]`` (float32): the dot products ``⟨g_b, Q_j⟩`` of every sample's gradient
    with q given directions, without forming the per-sample gradients of the Linear / Conv2d
    layers (the fused ``psg_matmul`` kernels, one layer call at a time in the backward).

    ``queries`` is ``{parameter name: Tensor[q, *shape]}`` over exactly the selected
    parameters (float32 or bfloat16, on the model's device), e.g. preconditioned query
    gradients for influence scores; the other arguments are those of ``projected_grads``.

    Example::

        q = fastattr.per_sample_grads(model, output_fn, test_batch)     # {name: [q, ...]}
        scores = grads_matmul(model, output_fn, train_batch, q)        # [B_train, q]
    """
    if not isinstance(queries, dict) or not queries:
        raise TypeError("queries must be a non-empty dict {parameter name: Tensor[q, *shape]}")
    model_params = dict(model.named_parameters())
    plan = _plan(model, select_params(model, params))
    missing = [n for n in plan if n not in queries]
    extra = [n for n in queries if n not in plan]
    if missing or extra:
        raise ValueError(f"queries must hold exactly the selected parameters: missing "
                         f"{missing[:5]}, not selected {extra[:5]}")
    q = None
    for name, t in queries.items():
        if not isinstance(t, torch.Tensor) or t.dim() < 1:
            raise TypeError(f"queries[{name!r}] must be a Tensor [q, *shape]")
        q = t.shape[0] if q is None else q
        if tuple(t.shape) != (q, *model_params[name].shape):
            raise ValueError(f"queries[{name!r}] must have shape [{q}, "
                             f"{', '.join(map(str, model_params[name].shape))}], got "
                             f"{tuple(t.shape)}")
    state = {"acc": None}

    def add(value):
        state["acc"] = value if state["acc"] is None else state["acc"] + value

    def dense(name, rows):  # per-sample gradients [B, ...] . queries -> [B, q]
        add(rows.reshape(rows.shape[0], -1).to(torch.float32)
            @ queries[name].reshape(q, -1).to(rows.device, torch.float32).T)

    def on_layer(roles, layer, seg):
        if isinstance(layer, NormIO):
            for name, rows in _norm_grads(roles, layer, seg).items():
                dense(name, rows)
            return
        w, b = roles.get("weight"), roles.get("bias")
        if w is None:
            dense(b, _segment_sum(_bias_rows(layer), seg))
            return
        add(psg_matmul(layer, seg, queries[w], queries[b] if b is not None else None,
                       backend=backend))

    run = _Run(model, output_fn, batch, params, segments, on_layer, func_chunk_size)
    for name, rows in run.func_grads.items():
        dense(name, rows)
    if state["acc"] is None:
        return torch.zeros(run.seg.num_segments, q, dtype=torch.float32, device=run.device)
    return state["acc"]
