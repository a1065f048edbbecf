"""Projected per-sample gradients of a diffusers UNet: time and peak memory per method.

For B training images with K timesteps each (B*K rows of the diffusion loss, the K rows of an
image summing into its gradient, as D-TRAK does), every method computes the ``[B, k]``
projected per-sample gradients of all the UNet's parameters:

  fastattr-dense   ``fastattr.projected_grads`` with a ``Projector(k)``: Linear / Conv2d
                   gradients formed tile by tile inside the fused psg kernels, the other
                   parameters (GroupNorm) by torch.func; one forward/backward of the B*K rows.
  fastattr-kron    the same with a ``KroneckerProjector`` of (about) the same total k.
  vmap+projector   ``torch.func.vmap(grad)`` per-sample gradients (one vmap over B rows per
                   timestep, summed over the K timesteps), then ``Projector.project``.
  trak             traker's path: ``FunctionalGradientComputer`` (functional_call + vmap +
                   grad) per timestep, summed, flattened, then ``BasicProjector`` (which
                   regenerates its p x k matrix on every call).
  forward-backward not a method: one plain forward/backward of the B*K rows (gradient to the
                   input only), the floor that both fastattr paths share. The table's
                   "x dense proj" column divides the dense path's time above this floor by
                   the Kronecker path's.

Each case runs in its own subprocess so that peak memory is its own: on CPU the growth of the
resident set (VmHWM after resetting it, minus VmRSS before the first call); on GPU
``torch.cuda.max_memory_allocated`` minus the allocation before the call. "peak MiB" is the
first call's (what a single call costs, one-time allocations included: the acceptance
figure); "warm MiB" the timed calls' (measured afresh after the first: the steady state of a
loop over batches). Time is the
median of the timed calls after a warm-up call (a call longer than ``--long-call`` seconds is
timed once, without warm-up, and marked so).

Models: ``digits`` (the 8x8 UNet of the digits benchmark, ``fastattr.models.digits_unet``)
and ``cifar`` (a 32x32 DDPM-CIFAR-size UNet, meant for a GPU; on this 2-core CPU a call takes
14-70 s and vmap+projector needs about 17 GiB at B = 64, so time it once with ``--long-call 1
--repeats 1``). ``--quick`` is a smoke run.

Examples::

    python benchmarks/bench_psg.py --json benchmarks/out/psg.json
    python benchmarks/bench_psg.py --model cifar --device cuda --methods fastattr-dense,vmap+projector
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

try:
    import fastattr
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import fastattr

from bench_common import (finish, peak_memory_mib, reset_peak_memory,  # noqa: E402
                          run_in_subprocess)

METHODS = ("fastattr-dense", "fastattr-kron", "vmap+projector", "trak", "forward-backward")
# Acceptance of issue 3 on CPU: memory and speed of the dense fused path against
# vmap + projection at B = 64, and the Kronecker path against dense at equal total k.
ACCEPT_MEMORY_RATIO = 10.0
ACCEPT_TIME_RATIO = 1.0
ACCEPT_KRON_SPEEDUP = 10.0


# ------------------------------------------------------------------------------ the problem


def build_model(name: str, device: str):
    from fastattr import models

    torch.manual_seed(0)
    model = {"digits": models.digits_unet, "cifar": models.cifar_unet, "tiny": _tiny_unet}[name]()
    return model.to(device).eval()


def _tiny_unet():
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                       layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
                       attention_head_dim=4)


def alphas_cumprod(device) -> torch.Tensor:
    """DDPM's linear schedule, 1000 steps (beta 1e-4 .. 0.02)."""
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, 0).to(torch.float32).to(device)


def make_batch(model, B: int, K: int, device: str):
    """B images with K (t, noise) draws each: rows [B*K], image-major; ids map rows to images."""
    cfg = model.config
    size = cfg.sample_size
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(B, cfg.in_channels, size, size, generator=gen)
    x0 = x0.repeat_interleave(K, dim=0)
    t = torch.randint(0, 1000, (B * K,), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    ids = torch.arange(B).repeat_interleave(K)
    return (x0.to(device), t.to(device), noise.to(device)), ids.to(device)


def diffusion_loss(model, x0, t, noise, abar):
    """Per-row DDPM loss ||eps - eps_theta(x_t, t)||^2: Tensor[N]."""
    a = abar[t].reshape(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    pred = model(x_t, t).sample
    return (pred - noise).pow(2).flatten(1).sum(1)


def kron_factors(model, k: int) -> tuple[int, int]:
    """(k_in, k_out) = (s, s), the largest s whose Kronecker total over the UNet is <= k."""
    shapes = [p.shape for p in model.parameters()]
    s = 1
    while sum((s + 1) ** 2 if len(sh) >= 2 else s + 1 for sh in shapes) <= k:
        s += 1
    return s, s


# -------------------------------------------------------------------------------- methods


def make_call(method: str, model, batch, ids, B: int, K: int, k: int, device: str):
    abar = alphas_cumprod(device)
    x0, t, noise = batch
    params = dict(model.named_parameters())

    if method in ("fastattr-dense", "fastattr-kron"):
        if method == "fastattr-dense":
            projector = fastattr.Projector(k, seed=0)
        else:
            k_in, k_out = kron_factors(model, k)
            projector = fastattr.KroneckerProjector(k_in, k_out, seed=0)

        def output_fn(m, b):
            return diffusion_loss(m, *b, abar)

        return lambda: fastattr.projected_grads(model, output_fn, batch, projector, segments=ids)

    if method == "forward-backward":
        def call():
            x = x0.detach().requires_grad_(True)
            torch.autograd.grad(diffusion_loss(model, x, t, noise, abar).sum(), x)
            return torch.zeros(B, k)  # the shape the other methods return

        return call

    def row_loss(p, xr, tr, nr):
        def fn(*args):
            return diffusion_loss(lambda xt, tt: torch.func.functional_call(model, p, (xt, tt)),
                                  *args, abar)
        return fn(xr[None], tr[None], nr[None]).sum()

    def per_sample_sum(grad_fn):
        """Sum over the K timesteps of per-sample gradient dicts [B, ...] (one vmap per t)."""
        total = None
        for j in range(K):
            rows = slice(j, B * K, K)
            g = grad_fn(x0[rows], t[rows], noise[rows])
            total = g if total is None else {n: total[n] + g[n] for n in total}
        return total

    if method == "vmap+projector":
        projector = fastattr.Projector(k, seed=0)
        vgrad = torch.func.vmap(torch.func.grad(row_loss), in_dims=(None, 0, 0, 0))
        detached = {n: p.detach() for n, p in params.items()}

        def call():
            grads = per_sample_sum(lambda *b: vgrad(detached, *b))
            return projector.project(grads)

        return call

    if method == "trak":
        from trak.gradient_computers import FunctionalGradientComputer
        from trak.modelout_functions import AbstractModelOutput
        from trak.projectors import BasicProjector, ProjectionType
        from trak.utils import vectorize

        class DiffusionLoss(AbstractModelOutput):
            def __init__(self):
                pass

            def get_output(self, m, weights, buffers, xr, tr, nr):
                def net(xt, tt):
                    return torch.func.functional_call(m, (weights, buffers), (xt, tt))
                return diffusion_loss(net, xr[None], tr[None], nr[None], abar).sum()

            def get_out_to_loss_grad(self, m, weights, buffers, batch):
                raise NotImplementedError

        p = sum(v.numel() for v in params.values())
        computer = FunctionalGradientComputer(model, DiffusionLoss(), p, torch.float32,
                                              torch.device(device))
        basic = BasicProjector(grad_dim=p, proj_dim=k, seed=0,
                               proj_type=ProjectionType.rademacher, device=torch.device(device),
                               dtype=torch.float32)

        def call():
            grads = per_sample_sum(lambda *b: computer.compute_per_sample_grad(list(b)))
            return basic.project(vectorize(grads, device=torch.device(device)), model_id=0)

        return call
    raise ValueError(f"unknown method {method!r}")


# ------------------------------------------------------------------------- one case, timed


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def run_case(spec: dict) -> dict:
    """Build the problem, time ``spec['method']`` and measure its peak memory (this process)."""
    device = spec["device"]
    torch.set_num_threads(spec["threads"])
    model = build_model(spec["model"], device)
    batch, ids = make_batch(model, spec["B"], spec["K"], device)
    call = make_call(spec["method"], model, batch, ids, spec["B"], spec["K"], spec["k"], device)
    base = reset_peak_memory(device)
    times = []
    start = time.perf_counter()
    out = call()
    _sync(device)
    first = time.perf_counter() - start
    expected = (spec["B"], spec["k"]) if spec["method"] != "fastattr-kron" else None
    if expected and tuple(out.shape) != expected:
        raise RuntimeError(f"{spec['method']} returned {tuple(out.shape)}, expected {expected}")
    peak_first = peak_memory_mib(device, base)
    width = out.shape[1]
    del out
    single = first > spec["long_call"]
    peak_warm = None
    if single:
        times = [first]
    else:
        # the timed calls' own peak: the steady state of a loop over batches, without what
        # the first call does once (library pages, thread pools, caches)
        base = reset_peak_memory(device)
        for _ in range(spec["repeats"]):
            start = time.perf_counter()
            call()
            _sync(device)
            times.append(time.perf_counter() - start)
        peak_warm = peak_memory_mib(device, base)
    return dict(spec, status="ok", times_s=times, median_s=statistics.median(times),
                timed_once=single, peak_mem_mib=peak_first, peak_mem_warm_mib=peak_warm,
                k_out=width,
                params=sum(p.numel() for p in model.parameters()))


# ------------------------------------------------------------------------------- reporting


def add_ratios(rows: list[dict]) -> None:
    """x_vmap: time and memory of vmap+projector / the method's (> 1: better); x_dense for kron."""
    by_key = {(r["method"], r["B"], r["K"]): r for r in rows if r["status"] == "ok"}
    for r in rows:
        if r["status"] != "ok":
            continue
        base = by_key.get(("vmap+projector", r["B"], r["K"]))
        if base:
            r["x_vmap_time"] = base["median_s"] / r["median_s"]
            r["x_vmap_memory"] = base["peak_mem_mib"] / max(r["peak_mem_mib"], 1e-3)
            if base.get("peak_mem_warm_mib") is not None and r.get("peak_mem_warm_mib") is not None:
                r["x_vmap_memory_warm"] = (base["peak_mem_warm_mib"]
                                           / max(r["peak_mem_warm_mib"], 1e-3))
        dense = by_key.get(("fastattr-dense", r["B"], r["K"]))
        if dense and r["method"] == "fastattr-kron":
            r["x_dense_time"] = dense["median_s"] / r["median_s"]
            floor = by_key.get(("forward-backward", r["B"], r["K"]))
            if floor and r["median_s"] > floor["median_s"]:
                r["x_dense_proj_time"] = ((dense["median_s"] - floor["median_s"])
                                          / (r["median_s"] - floor["median_s"]))


def acceptance(rows: list[dict]) -> list[dict]:
    checks = []
    for r in rows:
        if r["status"] != "ok" or r["device"] != "cpu":
            continue
        if r["method"] == "fastattr-dense" and r["B"] == 64 and "x_vmap_memory" in r:
            checks.append(dict(check=f"dense B=64 K={r['K']}: memory >= {ACCEPT_MEMORY_RATIO}x "
                               "less than vmap+projector", value=r["x_vmap_memory"],
                               passed=r["x_vmap_memory"] >= ACCEPT_MEMORY_RATIO))
            # time ratio t_dense / t_vmap <= 1.0, i.e. x_vmap_time >= 1.0
            checks.append(dict(check=f"dense B=64 K={r['K']}: time ratio to vmap+projector <= "
                               f"{ACCEPT_TIME_RATIO}", value=1.0 / r["x_vmap_time"],
                               passed=1.0 / r["x_vmap_time"] <= ACCEPT_TIME_RATIO))
        if r["method"] == "fastattr-kron" and "x_dense_time" in r:
            checks.append(dict(check=f"kron B={r['B']} K={r['K']}: >= {ACCEPT_KRON_SPEEDUP}x "
                               "faster than dense", value=r["x_dense_time"],
                               passed=r["x_dense_time"] >= ACCEPT_KRON_SPEEDUP))
    return checks


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def print_table(rows):
    print(f"{'method':<16} {'B':>3} {'K':>3} {'k':>5} {'median s':>9} {'peak MiB':>9} "
          f"{'warm MiB':>9} {'x vmap t':>8} {'x vmap mem':>10} {'warm':>5} {'x dense t':>9} "
          f"{'x dense proj':>12}  status")
    for r in rows:
        ok = r["status"] == "ok"
        print(f"{r['method']:<16} {r['B']:>3} {r['K']:>3} {r.get('k_out', r['k']):>5} "
              f"{_fmt(r.get('median_s') if ok else None, '9.3f')} "
              f"{_fmt(r.get('peak_mem_mib') if ok else None, '9.1f')} "
              f"{_fmt(r.get('peak_mem_warm_mib') if ok else None, '9.1f')} "
              f"{_fmt(r.get('x_vmap_time'), '8.2f')} {_fmt(r.get('x_vmap_memory'), '10.1f')} "
              f"{_fmt(r.get('x_vmap_memory_warm'), '5.1f')} "
              f"{_fmt(r.get('x_dense_time'), '9.1f')} {_fmt(r.get('x_dense_proj_time'), '12.1f')}  "
              f"{r['status'] if ok else r['status'] + ': ' + r.get('reason', '')[-200:]}")


def _list(text: str, cast=str):
    return [cast(v) for v in text.split(",") if v]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="digits", choices=("digits", "cifar", "tiny"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--methods", type=_list, default=list(METHODS))
    ap.add_argument("--B", type=lambda s: _list(s, int), default=[16, 64])
    ap.add_argument("--K", type=lambda s: _list(s, int), default=[1, 10])
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3, help="timed calls after the warm-up")
    ap.add_argument("--long-call", type=float, default=20.0,
                    help="a first call longer than this many seconds is the only timing")
    ap.add_argument("--case-timeout", type=float, default=900.0)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: tiny UNet, B=2, K in {1, 2}, k=64, one timed call")
    ap.add_argument("--json", default=None, help="write all rows and the machine record here")
    ap.add_argument("--run-case", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        ap.error(f"--methods: unknown {sorted(unknown)}; choose from {METHODS}")
    if args.quick:
        args.model, args.B, args.K, args.k, args.repeats = "tiny", [2], [1, 2], 64, 1
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.run_case:
        print(json.dumps(run_case(json.loads(args.run_case))))
        return 0
    start = time.perf_counter()
    rows = []
    for B in args.B:
        for K in args.K:
            for method in args.methods:
                spec = dict(method=method, model=args.model, device=args.device, B=B, K=K,
                            k=args.k, repeats=args.repeats, long_call=args.long_call,
                            threads=args.threads)
                row = run_in_subprocess(__file__, spec, args.case_timeout)
                rows.append(row)
                print(f"  {method} B={B} K={K}: {row['status']} "
                      f"{_fmt(row.get('median_s'), '.3f')} s, "
                      f"{_fmt(row.get('peak_mem_mib'), '.1f')} MiB", flush=True)
    add_ratios(rows)
    checks = acceptance(rows) if args.model == "digits" and args.k == 4096 else []
    print_table(rows)
    return finish("psg", args, rows, checks, start)


if __name__ == "__main__":
    sys.exit(main())
