"""The ``fastattr`` command line.

``fastattr demo``      attribute real handwritten digits with projected gradients (a few seconds)
``fastattr backends``  which compute backends are available here, and why not
"""

from __future__ import annotations

import argparse
import sys
import time

__all__ = ["main"]


def _cmd_backends(args) -> int:
    import fastattr

    for name, status in fastattr.backends().items():
        mark = "yes" if status.available else "no "
        print(f"  {name:<10} {mark}  {status.reason}")
    return 0


def _cmd_demo(args) -> int:
    """Per-sample gradients of a small digits classifier, projected with fastattr, then
    gradient-similarity attribution: which training digits support each test digit."""
    import torch

    import fastattr
    from fastattr.demo import digits_demo

    print("fastattr", fastattr.__version__, "- backends:")
    _cmd_backends(args)
    print()
    start = time.perf_counter()
    report = digits_demo(k=args.k, seed=args.seed, backend=args.backend, n_test=args.n_test,
                         log=print)
    print(f"\nDone in {time.perf_counter() - start:.1f} s (torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads).")
    return 0 if report["label_agreement"] > 0.5 else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastattr",
        description="Fast training-data attribution for diffusion models.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    demo = sub.add_parser(
        "demo",
        help="attribute real handwritten digits (sklearn's bundled load_digits) end to end",
        description="Train a small classifier on scikit-learn's bundled digits (no download), "
        "project its per-sample gradients with fastattr.Projector and print each test "
        "digit's top-5 training proponents.",
    )
    demo.add_argument("--k", type=int, default=2048, help="projection dimension (default 2048)")
    demo.add_argument("--seed", type=int, default=0, help="seed of model and projection")
    demo.add_argument("--backend", default="auto", help="projection backend (default auto)")
    demo.add_argument("--n-test", type=int, default=5, help="test digits to show (default 5)")
    demo.set_defaults(func=_cmd_demo)

    backends = sub.add_parser("backends", help="list compute backends and why each is (not) available")
    backends.set_defaults(func=_cmd_backends)
    return parser


def main(argv=None) -> int:
    """Entry point of the ``fastattr`` console script."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
