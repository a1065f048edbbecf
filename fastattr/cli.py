"""The ``fastattr`` command line.

``fastattr demo``      train (or reuse) a diffusion model of handwritten digits, draw 8 samples,
                      attribute them to the training images with DAS and D-TRAK, write
                      ``attribution.png`` (about 4 minutes on a 2-core CPU from a cold cache)
``fastattr lds``       the digits LDS benchmark: every method's LDS with bootstrap CIs on the
                      validation and generated sets, a table, JSON and a bar chart
``fastattr bench``     run the microbenchmarks of the repository's ``benchmarks/`` scripts
``fastattr backends``  which compute backends are available here, and why not
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["main"]


def _cmd_backends(args) -> int:
    import fastattr

    for name, status in fastattr.backends().items():
        mark = "yes" if status.available else "no "
        print(f"  {name:<10} {mark}  {status.reason}")
    return 0


def _cmd_demo(args) -> int:
    """Train (or load) the digits diffusion model, sample, attribute, print and draw."""
    import torch

    import fastattr
    from fastattr.demo import digits_demo

    if args.threads:
        torch.set_num_threads(args.threads)
    print("fastattr", fastattr.__version__, "- backends:")
    _cmd_backends(args)
    print()
    start = time.perf_counter()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    digits_demo(out=args.out, methods=methods, size=args.size, steps=args.steps,
                n_train=args.n_train, n_samples=args.samples, seed=args.seed, k=args.k, K=args.timesteps,
                cache_dir=args.cache_dir, device=args.device, progress=not args.no_progress,
                log=print)
    print(f"\nDone in {time.perf_counter() - start:.1f} s (torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads).")
    return 0


def _cmd_lds(args) -> int:
    """Run the digits LDS benchmark (and the ablation), print tables, write JSON and the
    chart."""
    import torch

    from fastattr.digits_lds import (format_ablation, format_counterfactual, format_table,
                                     ground_truth, run_ablation, run_counterfactual, run_lds,
                                     save_results, write_chart)

    if args.threads:
        torch.set_num_threads(args.threads)
    ablation_Ks = _int_list(args.ablation_K, "--ablation-K") if args.ablation_K else []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    gt = ground_truth(args.size, args.cache_dir, args.workers, not args.no_progress, print)
    results = run_lds(args.methods, size=args.size, progress=not args.no_progress, log=print,
                      gt=gt)
    if ablation_Ks:
        results["ablation"] = run_ablation(args.ablation_outputs, ablation_Ks, size=args.size,
                                           progress=not args.no_progress, log=print, gt=gt)
    if args.counterfactual:
        results["counterfactual"] = run_counterfactual(
            args.counterfactual_methods, k=args.counterfactual, n_test=args.counterfactual_n,
            progress=not args.no_progress, log=print, gt=gt)
    results["wall_seconds"] = time.perf_counter() - start
    print()
    print(format_table(results))
    if ablation_Ks:
        print("\nD-TRAK output-function ablation (val LDS %, held-out λ):")
        print(format_ablation(results["ablation"]))
    if args.counterfactual:
        print(f"\nCounterfactual check ({args.counterfactual_n} validation digits; loss change "
              "of the retrained model):")
        print(format_counterfactual(results["counterfactual"]))
    from fastattr import distributed

    if not distributed.is_main():      # under torch.distributed rank 0 writes the outputs
        return 0
    save_results(results, out / "lds.json")
    write_chart(results, out / "lds.png")
    print(f"\nwrote {out / 'lds.json'} and {out / 'lds.png'} "
          f"({results['wall_seconds'] / 60:.1f} min)")
    return 0


def _int_list(text: str, name: str) -> list:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise SystemExit(f"fastattr: {name} expects comma-separated positive integers, "
                         f"got {text!r}")
    return values


# the microbenchmarks `fastattr bench` runs, in order: script stem -> what it measures
BENCHMARKS = {
    "projection": "random projection throughput per backend vs traker and torch.matmul",
    "psg": "projected per-sample gradients of the digits UNet vs torch.func + projection",
    "factor_ops": "CPU curvature kernels (covariance, EK-FAC lambda) vs torch",
    "curvature": "EK-FAC factor fitting vs kronfluence",
}


def _benchmarks_dir(explicit) -> Path:
    """The ``benchmarks/`` directory: ``--benchmarks-dir``, ``$FASTATTR_BENCHMARKS``, the
    checkout the package was imported from, or the working directory's."""
    import fastattr

    if explicit:
        if not (Path(explicit) / "bench_common.py").is_file():
            raise SystemExit(f"fastattr bench: --benchmarks-dir {explicit} holds no benchmark "
                             "scripts (expected bench_common.py and bench_*.py)")
        return Path(explicit)
    candidates = [os.environ.get("FASTATTR_BENCHMARKS"),
                  Path(fastattr.__file__).resolve().parents[1] / "benchmarks",
                  Path.cwd() / "benchmarks"]
    for c in candidates:
        if c and (Path(c) / "bench_common.py").is_file():
            return Path(c)
    raise SystemExit("fastattr bench: the benchmark scripts live in the repository's "
                     "benchmarks/ directory, which is not installed with the package; run "
                     "from a checkout or pass --benchmarks-dir DIR")


def _cmd_bench(args) -> int:
    """Run the chosen benchmark scripts one after another; each prints its own table."""
    names = list(BENCHMARKS) if not args.names else args.names
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise SystemExit(f"fastattr bench: unknown benchmark(s) {', '.join(unknown)}; "
                         f"expected names from {', '.join(BENCHMARKS)}")
    if args.list:
        for name, what in BENCHMARKS.items():
            print(f"  {name:<11} {what}")
        return 0
    import fastattr

    bench_dir = _benchmarks_dir(args.benchmarks_dir)
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    failed = []
    for name in names:
        cmd = [sys.executable, str(bench_dir / f"bench_{name}.py")]
        if args.quick:
            cmd.append("--quick")
        if out:
            cmd += ["--json", str(out / f"{name}.json")]
        print(f"== {name}: {' '.join(cmd)}", flush=True)
        # the scripts import bench_common from their own directory, and the same fastattr
        # as this process (a checkout's package may not be installed)
        package_root = str(Path(fastattr.__file__).resolve().parents[1])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(bench_dir), package_root] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
        if subprocess.run(cmd, env=env).returncode != 0:
            failed.append(name)
    if failed:
        print(f"fastattr bench: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _add_run_options(parser) -> None:
    """Options every long-running command shares."""
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--distributed", action="store_true",
                        help="run under torchrun: join the process group of RANK / "
                        "WORLD_SIZE / MASTER_ADDR / MASTER_PORT (NCCL on GPUs, gloo on CPU) "
                        "and share the work out by rank; rank 0 prints and writes the outputs "
                        "(see README, Distributed)")


def build_parser() -> argparse.ArgumentParser:
    # the defaults of `fastattr lds` are the benchmark's own lists (digits_lds imports only
    # torch, which importing fastattr has already done)
    from fastattr.digits_lds import ABLATION_OUTPUTS, METHODS as LDS_METHODS

    parser = argparse.ArgumentParser(
        prog="fastattr",
        description="Fast training-data attribution for diffusion models.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    demo = sub.add_parser(
        "demo",
        help="attribute a digits diffusion model's samples to its training images",
        description="Train a small diffusion UNet on scikit-learn's bundled handwritten digits "
        "(no download; or reuse it from the cache), draw 8 samples with DDIM, attribute each "
        "to the 1500 training images with DAS and D-TRAK, print every sample's top-5 "
        "proponents with their scores and write a PNG of each sample beside its top "
        "proponents and opponents. About 4 minutes on a 2-core CPU from a cold cache, "
        "seconds when cached.",
    )
    demo.add_argument("--out", default="attribution.png",
                      help="the PNG to write (default attribution.png)")
    demo.add_argument("--cache-dir", default=None,
                      help="where trained models and train features are cached (default "
                      "$FASTATTR_CACHE or ~/.cache/fastattr)")
    demo.add_argument("--methods", default="das,dtrak",
                      help="comma-separated attribution methods: das, dtrak (default both)")
    demo.add_argument("--k", type=int, default=1024, metavar="k", help="projection dimension (default 1024)")
    demo.add_argument("--timesteps", type=int, default=4, metavar="K",
                      help="timesteps per image of the attribution features, a uniform grid "
                      "(default 4)")
    demo.add_argument("--samples", type=int, default=8, help="samples to draw (default 8)")
    demo.add_argument("--seed", type=int, default=0, help="seed of training and sampling")
    demo.add_argument("--size", default="quick", choices=("quick", "full"),
                      help="training recipe (default quick, about 2 minutes on 2 CPU cores)")
    demo.add_argument("--steps", type=int, default=None,
                      help="override the recipe's training steps")
    demo.add_argument("--n-train", type=int, default=None, metavar="N",
                      help="train on and attribute to the first N training images only "
                      "(smoke runs; default all 1500)")
    demo.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    _add_run_options(demo)
    demo.set_defaults(func=_cmd_demo)

    lds = sub.add_parser(
        "lds",
        help="the digits LDS benchmark: LDS of each method with bootstrap CIs",
        description="Train the digits diffusion model and one model per random half of the "
        "training set (cached, resumable), measure every validation and generated sample's "
        "loss under each with common random numbers, and report each method's linear "
        "datamodeling score with a 95%% bootstrap CI (lambda chosen on a held-out half of "
        "the test samples). Prints a table, writes lds.json and lds.png. quick: a smoke run "
        "of a few minutes (its figures are noise); full: the README's benchmark.",
    )
    lds.add_argument("--methods", default=",".join(LDS_METHODS),
                     help=f"comma-separated methods of {', '.join(LDS_METHODS)} (default all)")
    lds.add_argument("--size", default="quick", choices=("quick", "full"),
                     help="benchmark size (default quick)")
    lds.add_argument("--out", default="lds-results",
                     help="directory for lds.json and lds.png (default lds-results)")
    lds.add_argument("--cache-dir", default=None,
                     help="where trained models are cached (default $FASTATTR_CACHE or "
                     "~/.cache/fastattr); an interrupted run resumes from it")
    lds.add_argument("--workers", type=int, default=1,
                     help="retraining worker processes (default 1)")
    lds.add_argument("--ablation-K", default=None, metavar="K1,K2",
                     help="also run D-TRAK's output-function ablation (val set) at these "
                     "timestep counts, e.g. 10,100")
    lds.add_argument("--ablation-outputs", default=",".join(ABLATION_OUTPUTS),
                     help="output functions of the ablation (default all seven)")
    lds.add_argument("--counterfactual", type=int, default=0, metavar="K",
                     help="also run the counterfactual check: retrain without each of the "
                     "first --counterfactual-n validation digits' top-K proponents and without K "
                     "random images, and compare the rise of its loss")
    lds.add_argument("--counterfactual-n", type=int, default=8, metavar="N",
                     help="validation digits of the counterfactual check (default 8)")
    lds.add_argument("--counterfactual-methods", default="das,dtrak",
                     help="methods of the counterfactual check (default das,dtrak)")
    _add_run_options(lds)
    lds.set_defaults(func=_cmd_lds)

    bench = sub.add_parser(
        "bench",
        help="run the microbenchmarks of benchmarks/",
        description="Run the repository's microbenchmark scripts (benchmarks/bench_*.py) one "
        "after another; each prints its table (timings and ratios against the reference "
        "implementations). The scripts are not installed with the package: run from a "
        "checkout or pass --benchmarks-dir.",
    )
    bench.add_argument("names", nargs="*", metavar="NAME",
                       help=f"benchmarks to run, of {', '.join(BENCHMARKS)} (default all)")
    bench.add_argument("--quick", action="store_true", help="tiny shapes: a smoke run")
    bench.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    bench.add_argument("--out", default=None, help="directory for each benchmark's JSON")
    bench.add_argument("--benchmarks-dir", default=None,
                       help="the benchmarks/ directory (default: found next to the package "
                       "or in the working directory, or $FASTATTR_BENCHMARKS)")
    bench.set_defaults(func=_cmd_bench)

    backends = sub.add_parser("backends", help="list compute backends and why each is (not) available")
    backends.set_defaults(func=_cmd_backends)
    return parser


def main(argv=None) -> int:
    """Entry point of the ``fastattr`` console script."""
    args = build_parser().parse_args(argv)
    if not getattr(args, "distributed", False):
        return args.func(args)
    from fastattr import distributed

    try:
        group = distributed.init_from_env()
    except distributed.DistributedSetupError as err:
        raise SystemExit(f"fastattr {args.command}: {err}") from None
    if group is not None and group.rank != 0:
        # one report: the other ranks compute and keep quiet (their errors still reach stderr)
        sys.stdout = open(os.devnull, "w")
    try:
        return args.func(args)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
