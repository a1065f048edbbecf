"""Microbenchmark of the CPU curvature kernels against plain torch on digits-UNet-sized layers.

  covariance    fastattr.kernels.cpu.covariance (patches formed in the kernel, upper triangle,
                column sums included) vs torch ``F.unfold`` + ``rows.T @ rows`` (MKL / oneDNN
                GEMM; no column sums) -- conv inputs; linear inputs vs ``rows.T @ rows``.
  ekfac_lambda  fastattr.kernels.cpu.ekfac_lambda vs ``(g.transpose(1, 2) @ a).square().sum(0)``.

Prints the median wall time of each (float32 input) and the ratio ours / torch. Timings only:
correctness is the tests' job. ``--threads`` sets torch's (and so our) thread count.
"""

from __future__ import annotations

import argparse
import time

from bench_common import machine_info, write_json_atomic

import torch
import torch.nn.functional as F

from fastattr.kernels import cpu

# (name, x shape, conv geometry or ())
COVARIANCE_CASES = [
    ("conv 32ch 3x3 8x8, N=64", (64, 32, 8, 8), (3, 3, 1, 1, 1, 1, 1, 1, 1)),
    ("conv 32ch 3x3 8x8, N=640", (640, 32, 8, 8), (3, 3, 1, 1, 1, 1, 1, 1, 1)),
    ("conv 64ch 3x3 4x4, N=64", (64, 64, 4, 4), (3, 3, 1, 1, 1, 1, 1, 1, 1)),
    ("conv 64ch 3x3 4x4, N=640", (640, 64, 4, 4), (3, 3, 1, 1, 1, 1, 1, 1, 1)),
    ("conv 32ch 3x3 s2 8x8, N=256", (256, 32, 8, 8), (3, 3, 2, 2, 1, 1, 1, 1, 1)),
    ("conv-grad 64ch 1x1 4x4, N=640", (640, 64, 4, 4), (1, 1, 1, 1, 0, 0, 1, 1, 1)),
    ("linear F=32, 640 rows", (640, 1, 32), ()),
    ("linear F=128, 640 rows", (640, 1, 128), ()),
    ("linear F=256, 640 rows", (640, 1, 256), ()),
    ("linear F=256, 64x16 tokens", (64, 16, 256), ()),
]

# (name, N, P, F, O)
LAMBDA_CASES = [
    ("conv 32->32 3x3 8x8", 64, 64, 288, 32),
    ("conv 64->64 3x3 4x4", 64, 16, 576, 64),
    ("conv 64->64 3x3 4x4, N=256", 256, 16, 576, 64),
    ("linear 256->256", 640, 1, 256, 256),
    ("linear 128->128, 16 tokens", 64, 16, 128, 128),
]


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up: allocations, OpenMP team
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def torch_covariance(x, conv):
    if not conv:
        rows = x.reshape(-1, x.shape[2])
        return rows.T @ rows
    kh, kw, sh, sw, ph, pw, dh, dw, _ = conv
    patches = F.unfold(x, (kh, kw), dilation=(dh, dw), padding=(ph, pw), stride=(sh, sw))
    rows = patches.transpose(1, 2).reshape(-1, patches.shape[1])
    return rows.T @ rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: the first two cases of each kernel, 3 repeats")
    parser.add_argument("--json", default=None, help="write all rows and the machine record here")
    args = parser.parse_args()
    cov_cases, lam_cases = COVARIANCE_CASES, LAMBDA_CASES
    if args.quick:
        cov_cases, lam_cases, args.repeats = cov_cases[:2], lam_cases[:2], 3
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    print(f"threads={args.threads}, median of {args.repeats}, times in ms")
    print(f"{'covariance':34s} {'ours':>8s} {'torch':>8s} {'ratio':>6s}")
    for name, shape, conv in cov_cases:
        x = torch.randn(*shape)
        ours = median_time(lambda: cpu.covariance(x, conv, False), args.repeats)
        ref = median_time(lambda: torch_covariance(x, conv), args.repeats)
        rows.append(dict(op="covariance", case=name, ours_s=ours, torch_s=ref))
        print(f"{name:34s} {ours * 1e3:8.3f} {ref * 1e3:8.3f} {ours / ref:6.2f}")
    print(f"{'ekfac_lambda':34s} {'ours':>8s} {'torch':>8s} {'ratio':>6s}")
    for name, n, p, f, o in lam_cases:
        a, g = torch.randn(n, p, f), torch.randn(n, p, o)
        ours = median_time(lambda: cpu.ekfac_lambda(a, g), args.repeats)
        ref = median_time(lambda: (g.transpose(1, 2) @ a).square().sum(0), args.repeats)
        rows.append(dict(op="ekfac_lambda", case=name, ours_s=ours, torch_s=ref))
        print(f"{name:34s} {ours * 1e3:8.3f} {ref * 1e3:8.3f} {ours / ref:6.2f}")
    if args.json:
        write_json_atomic(args.json, {"benchmark": "factor_ops", "machine": machine_info(),
                                      "threads": args.threads, "repeats": args.repeats,
                                      "rows": rows})

if __name__ == "__main__":
    main()
