"""Fitting EK-FAC factors of a diffusers UNet: fastattr vs kronfluence, time per phase and
peak memory.

Both fit the EK-FAC factors (GGN-model: a random output vector backpropagated per datum;
expand sharing) of every Linear / Conv2d of the UNet on the same data: ``n`` examples of
sklearn's digits (scaled to [-1, 1]) with ``K`` (t, ε) draws each (the rows come from
``fastattr.diffusion.DiffusionLoss``, computed once and fed to both), in batches of ``B``
rows. Phases: covariance (first data pass), eigendecomposition, Λ (second data pass).

  fastattr     ``fastattr.curvature.fit_factors`` (strategy "ekfac", ggn "model"), then
               ``Factors.save`` (kronfluence writes its factors to disk too).
  kronfluence  ``Analyzer.fit_covariance_matrices`` / ``perform_eigendecomposition`` /
               ``fit_lambda_matrices`` (= ``fit_all_factors``, timed per phase), strategy
               "ekfac", true Fisher with targets sampled so the output gradient has the GGN-model
               covariance, on CPU (``cpu=True``) or the GPU.

Each case runs in its own subprocess; peak memory is the growth of the resident set over
the model and data, after the heap's free pages are returned to the OS (CPU), or
``torch.cuda.max_memory_allocated`` over the allocation before the fit (GPU). Time is the
wall time of a fit after a warm-up fit on two batches: the median of ``--repeats`` fits,
with the highest peak of them. fastattr runs with its default ``max_rows`` (128 rows per
forward/backward; larger batches are cut), kronfluence with the batch as given.

Examples::

    python benchmarks/bench_curvature.py --json benchmarks/out/curvature.json
    python benchmarks/bench_curvature.py --quick
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time

import torch

try:
    import fastattr
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import fastattr

from bench_common import (finish, peak_memory_mib, reset_peak_memory,  # noqa: E402
                          run_in_subprocess)

from fastattr.curvature import fit_factors  # noqa: E402
from fastattr.diffusion import DiffusionLoss, Rows  # noqa: E402

METHODS = ("fastattr", "kronfluence")
ACCEPT_SPEEDUP = 2.0
ACCEPT_MEMORY = 3.0


# ------------------------------------------------------------------------------ the problem


def build_model(name: str, device: str):
    torch.manual_seed(0)
    if name == "tiny":
        from diffusers import UNet2DModel

        model = UNet2DModel(sample_size=8, in_channels=1, out_channels=1,
                            block_out_channels=(8, 16), layers_per_block=1,
                            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                            up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
                            attention_head_dim=4)
    elif name == "cifar":
        model = fastattr.models.cifar_unet()
    else:
        model = fastattr.models.digits_unet()
    return model.to(device).eval()


def make_rows(model, n: int, K: int, device: str):
    """The (x_t, t, ε, id) rows of n examples with K draws each (fixed, fed to both)."""
    size, channels = model.config.sample_size, model.config.in_channels
    if size == 8 and channels == 1:
        from sklearn.datasets import load_digits

        images = torch.tensor(load_digits().images[:n], dtype=torch.float32) / 8.0 - 1.0
        images = images[:, None]
    else:
        images = torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(0))
        images = images * 2 - 1
    ids = torch.arange(images.shape[0])
    loss = DiffusionLoss()
    captured = {}

    def grab(x_t, t):  # a stand-in model that records the noisy inputs DiffusionLoss builds
        captured.update(x_t=x_t, t=t)
        return x_t

    rows = loss(grab, (images, ids), K)
    return (captured["x_t"].to(device), captured["t"].to(device), rows.targets.to(device),
            rows.ids.to(device))


def batches_of(rows, B: int):
    x_t, t, eps, ids = rows
    return [(x_t[i:i + B], t[i:i + B], eps[i:i + B], ids[i:i + B])
            for i in range(0, x_t.shape[0], B)]


def unet_rows(model, batch, samples_per_example=1) -> Rows:
    """fastattr's loss on precomputed rows: outputs ε_θ(x_t, t), targets ε."""
    x_t, t, eps, ids = batch
    return Rows(model(x_t, t).sample, eps, ids)


# ---------------------------------------------------------------------------- the two fits


def fit_fastattr(model, batches, workdir: str, threads: int) -> dict:
    start = time.perf_counter()
    factors = fit_factors(model, batches, unet_rows, strategy="ekfac", ggn="model",
                          progress=False)
    factors.save(os.path.join(workdir, "factors.safetensors"))
    total = time.perf_counter() - start
    timings = dict(factors.timings)
    timings["save"] = total - sum(timings.values())
    return dict(total_s=total, phases_s=timings, layers=len(factors.layers))


class _KronfluenceTask:
    """kronfluence Task on precomputed rows: the MSE of ε_θ(x_t, t) against ε, summed over
    the batch; with ``sample`` (true Fisher) the targets are drawn around the output so that
    the output gradient is √(2/d)·ξ, the GGN-model vector."""

    def __new__(cls):
        from kronfluence.task import Task

        class UNetTask(Task):
            def compute_train_loss(self, batch, model, sample=False):
                x_t, t, eps, _ = batch
                out = model(x_t, t).sample
                if sample:
                    d = out[0].numel()
                    with torch.no_grad():
                        eps = out + math.sqrt(d / 2.0) * torch.randn_like(out)
                return (out - eps).pow(2).flatten(1).mean(1).sum()

            def compute_measurement(self, batch, model):
                return self.compute_train_loss(batch, model)

        return UNetTask()


def fit_kronfluence(model, batches, workdir: str, threads: int) -> dict:
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments

    logging.getLogger("kronfluence").setLevel(logging.ERROR)
    task = _KronfluenceTask()
    model = prepare_model(model, task)
    rows = [torch.cat([b[i] for b in batches]) for i in range(4)]
    dataset = torch.utils.data.TensorDataset(*rows)
    batch_size = batches[0][0].shape[0]
    analyzer = Analyzer("bench", model, task, cpu=not torch.cuda.is_available(),
                        disable_tqdm=True, output_dir=workdir)
    fargs = FactorArguments(strategy="ekfac")
    phases = {}
    start = time.perf_counter()
    analyzer.fit_covariance_matrices("f", dataset, per_device_batch_size=batch_size,
                                     factor_args=fargs, overwrite_output_dir=True)
    phases["covariance"] = time.perf_counter() - start
    clock = time.perf_counter()
    analyzer.perform_eigendecomposition("f", factor_args=fargs, overwrite_output_dir=True)
    phases["eigendecomposition"] = time.perf_counter() - clock
    clock = time.perf_counter()
    analyzer.fit_lambda_matrices("f", dataset, per_device_batch_size=batch_size,
                                 factor_args=fargs, overwrite_output_dir=True)
    phases["lambda"] = time.perf_counter() - clock
    layers = len(analyzer.load_lambda_matrices("f")["lambda_matrix"])
    return dict(total_s=time.perf_counter() - start, phases_s=phases, layers=layers)


FITS = {"fastattr": fit_fastattr, "kronfluence": fit_kronfluence}


def run_case(spec: dict) -> dict:
    device = spec["device"]
    torch.set_num_threads(spec["threads"])
    model = build_model(spec["model"], device)
    batches = batches_of(make_rows(model, spec["n"], spec["K"], device), spec["B"])
    fit = FITS[spec["method"]]
    workdir = tempfile.mkdtemp(prefix="bench_curvature.")
    try:
        fit(model, batches[:2], workdir, spec["threads"])  # warm-up: imports, kernels, caches
        runs, peak = [], 0.0
        for _ in range(spec["repeats"]):
            if spec["method"] == "kronfluence":
                model = build_model(spec["model"], device)  # prepare_model wrapped the modules
            base = reset_peak_memory(device)
            runs.append(fit(model, batches, workdir, spec["threads"]))
            peak = max(peak, peak_memory_mib(device, base))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    # the run of median total time (its phases add up), the highest peak of all runs
    result = sorted(runs, key=lambda r: r["total_s"])[len(runs) // 2]
    return dict(spec, status="ok", peak_mem_mib=peak, rows=sum(b[0].shape[0] for b in batches),
                params=sum(p.numel() for p in model.parameters()),
                total_s_all=[r["total_s"] for r in runs], **result)


# ------------------------------------------------------------------------------- reporting


def acceptance(rows: list[dict]) -> list[dict]:
    by = {r["method"]: r for r in rows if r["status"] == "ok"}
    if "fastattr" not in by or "kronfluence" not in by:
        return []
    ours, ref = by["fastattr"], by["kronfluence"]
    speed = ref["total_s"] / ours["total_s"]
    memory = ref["peak_mem_mib"] / max(ours["peak_mem_mib"], 1e-3)
    return [dict(check=f"EK-FAC fit >= {ACCEPT_SPEEDUP}x faster than kronfluence", value=speed,
                 passed=speed >= ACCEPT_SPEEDUP),
            dict(check=f"EK-FAC fit peak memory >= {ACCEPT_MEMORY}x lower than kronfluence",
                 value=memory, passed=memory >= ACCEPT_MEMORY)]


def print_table(rows):
    print(f"{'method':<12} {'rows':>5} {'total s':>8} {'cov s':>7} {'eigh s':>7} {'lambda s':>8} "
          f"{'save s':>7} {'peak MiB':>9}  status")
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['method']:<12} {r['status']}: {r.get('reason', '')[-300:]}")
            continue
        ph = r["phases_s"]
        print(f"{r['method']:<12} {r['rows']:>5} {r['total_s']:>8.2f} {ph['covariance']:>7.2f} "
              f"{ph['eigendecomposition']:>7.2f} {ph['lambda']:>8.2f} "
              f"{ph.get('save', 0.0):>7.2f} {r['peak_mem_mib']:>9.1f}  ok")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="digits", choices=("digits", "cifar", "tiny"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--n", type=int, default=256, help="examples")
    ap.add_argument("--K", type=int, default=2, help="(t, noise) draws per example")
    ap.add_argument("--B", type=int, default=64, help="rows per batch")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeats", type=int, default=1,
                    help="fits per case after the warm-up: median time, highest peak memory")
    ap.add_argument("--case-timeout", type=float, default=1800.0)
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny UNet, 8 examples")
    ap.add_argument("--json", default=None, help="write all rows and the machine record here")
    ap.add_argument("--run-case", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        ap.error(f"--methods: unknown {sorted(unknown)}; choose from {METHODS}")
    if args.quick:
        args.model, args.n, args.K, args.B = "tiny", 8, 1, 4
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.run_case:
        print(json.dumps(run_case(json.loads(args.run_case))))
        return 0
    start = time.perf_counter()
    rows = []
    for method in args.methods:
        spec = dict(method=method, model=args.model, device=args.device, n=args.n, K=args.K,
                    B=args.B, threads=args.threads, repeats=args.repeats)
        row = run_in_subprocess(__file__, spec, args.case_timeout)
        rows.append(row)
        print(f"  {method}: {row['status']} {row.get('total_s', float('nan')):.2f} s, "
              f"{row.get('peak_mem_mib', float('nan')):.1f} MiB", flush=True)
    checks = acceptance(rows) if args.model == "digits" else []
    print_table(rows)
    return finish("curvature", args, rows, checks, start)


if __name__ == "__main__":
    sys.exit(main())
