"""The built-in LDS benchmark "digits": every fastattr method on the same retrained models.

``run_lds(methods, size)`` follows shared/METHODS.md's LDS protocol on the digits data
(``fastattr.data``) and the fixed training recipe (``fastattr.train``):

1. the full model is trained on the first ``n_train`` training images (with checkpoints for
   TracIn / ReTrac) and draws the generated set (deterministic DDIM);
2. M subsets of half the training images (``fastattr.lds.subsets``), one model per subset
   and seed, trained with the same recipe and cached (``fastattr.lds.Retrainer``: resumable,
   ``workers`` processes, the GPU when there is one);
3. the loss of every validation and generated sample under every subset model over fixed
   (t, ε) draws keyed by sample id (common random numbers), averaged over the seeds;
4. each method is fitted on the full model and scores both test sets; methods with a λ
   sweep a grid and λ is chosen on a held-out half of the test samples
   (``fastattr.lds.select_lambda``), the eval-set-tuned figure reported beside, labelled.

Sizes (``SIZES``): ``quick`` is a smoke run (a few minutes on a 2-core CPU; its figures are
noise), ``full`` the benchmark of the README. Results: a table, JSON and a bar chart PNG.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import time
from pathlib import Path

import torch

from . import distributed

__all__ = ["LDSSize", "SIZES", "METHODS", "GroundTruth", "ground_truth", "run_lds",
           "format_table", "write_chart", "save_results", "ABLATION_OUTPUTS", "run_ablation",
           "format_ablation", "run_counterfactual", "format_counterfactual"]

METHODS = ("das", "dtrak", "trak", "kfac", "tracin", "retrac")


@dataclasses.dataclass(frozen=True)
class LDSSize:
    """One size of the benchmark.

    Attributes:
        n_train: the first ``n_train`` digits training images are the training set.
        steps / batch_size: the training recipe of the full and every subset model.
        num_subsets / seeds: M subsets, S training seeds per subset.
        n_val / n_gen: validation images (digits test split) and generated samples.
        K / k: timesteps per example and projection dimension of the features.
        eval_K / eval_seeds: uniform timesteps and noise seeds of the measurement.
        checkpoints: TracIn / ReTrac checkpoints of the full model's run.
        sample_steps: DDIM steps drawing the generated set.
        lam_scales: λ grid relative to each method's default λ (TRAK / D-TRAK / DAS) and
            the absolute damping grid of K-FAC influence is ``kfac_damping``.

    Example::

        size = dataclasses.replace(SIZES["quick"], num_subsets=16)
    """

    n_train: int
    steps: int
    batch_size: int
    num_subsets: int
    seeds: int
    n_val: int
    n_gen: int
    K: int
    k: int
    eval_K: int
    eval_seeds: tuple
    checkpoints: int
    sample_steps: int = 50
    lam_scales: tuple = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
    kfac_damping: tuple = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2)


SIZES = {
    "quick": LDSSize(n_train=128, steps=120, batch_size=64, num_subsets=6, seeds=1, n_val=16,
                     n_gen=8, K=2, k=256, eval_K=10, eval_seeds=(0,), checkpoints=2),
    # 500 training images keep each sample's effect on a subset model large next to the
    # seed noise, and 300 steps (77 epochs of a 250-image subset) fit it; 100 subsets bring
    # D-TRAK's bootstrap CI under +-3 points in about 40 minutes of retraining on 2 cores
    # (2 workers of 1 thread)
    "full": LDSSize(n_train=500, steps=300, batch_size=64, num_subsets=100, seeds=1, n_val=96,
                    n_gen=32, K=10, k=2048, eval_K=50, eval_seeds=(0, 1), checkpoints=4),
}


def _recipe(steps: int, batch_size: int):
    """The benchmark's training recipe (the full model's and every subset model's): the
    quick recipe at ``steps`` steps of ``batch_size``, warm-up scaled down for short runs."""
    from .train import RECIPES, Recipe

    return Recipe(**{**dataclasses.asdict(RECIPES["quick"]), "steps": steps,
                     "batch_size": batch_size, "warmup": min(50, max(1, steps // 10))})


def _train_fn(indices, seed, device="cpu", *, steps, batch_size):
    """A subset model of the benchmark's recipe (module level: picklable for workers)."""
    from .train import train_digits

    return train_digits(indices, seed=seed, size=_recipe(steps, batch_size), device=device,
                        progress=False, use_cache=False)


def _method(name: str, task, size: LDSSize, ckpts, progress: bool):
    from .methods import DAS, DTRAK, TRAK, KFACInfluence, ReTrac, TracIn

    common = dict(progress=progress, batch_size=64)
    if name == "das":
        return DAS(task, k=size.k, **common)
    if name == "dtrak":
        return DTRAK(task, k=size.k, **common)
    if name == "trak":
        return TRAK(task, k=size.k, **common)
    if name == "kfac":
        return KFACInfluence(task, strategy="ekfac", **common)
    if name in ("tracin", "retrac"):
        cls = TracIn if name == "tracin" else ReTrac
        return cls(task, checkpoints=ckpts.models, learning_rates=ckpts.learning_rates,
                   k=size.k, **common)
    raise ValueError(f"unknown method {name!r}: expected a subset of {METHODS}")


def _lam_grid(name: str, method, size: LDSSize):
    """The λ grid of a method (None: the method has no λ)."""
    if name in ("dtrak", "trak"):
        base = method.kernels[0].default_lam()
    elif name == "das":
        base = method.kernel.default_lam()
    elif name == "kfac":
        return list(size.kfac_damping)
    else:
        return None
    return relative_grid(base, size)


def relative_grid(base: float, size: LDSSize) -> list:
    """The λ grid ``base × size.lam_scales`` (``base``: a method's default λ)."""
    return [base * s for s in size.lam_scales]


def _evaluate(name, method, test, masks, F, size: LDSSize):
    lams = _lam_grid(name, method, size)
    scores = method.score(test) if lams is None else method.sweep_lambda(test, lams)
    return lds_entry(scores, lams, masks, F)


def lds_entry(scores, lams, masks, F) -> dict:
    """The benchmark's LDS report of ``scores [n_test, n_train]`` (``lams`` None) or of a λ
    sweep ``[len(lams), n_test, n_train]``: λ chosen on the held-out half, the figure tuned
    on the evaluation set beside (``fastattr.lds.select_lambda``).

    Example::

        lds_entry(dtrak.sweep_lambda(val, lams), lams, gt.masks, gt.F["val"])["heldout"]
    """
    from .lds import lds, select_lambda

    if lams is None:
        return {"heldout": lds(scores, masks, F).as_dict(), "tuned_on_eval": None, "lam": None}
    sel = select_lambda(scores, lams, masks, F)
    return {"heldout": sel.heldout.as_dict(), "tuned_on_eval": sel.tuned_on_eval.as_dict(),
            "lam": sel.lam}


@dataclasses.dataclass
class GroundTruth:
    """What every attributor is judged against (``ground_truth``): the full ``model`` and its
    TracIn ``checkpoints``, the ``train`` batch ``(images, ids)``, the ``test_sets`` ("val",
    "gen") as ``(images, ids)``, the subset ``masks [M, n_train]``, the measurements ``F``
    (split -> ``[M, n_test]``, seed-averaged losses), the ``device``, the ``timings`` and
    the size ``cfg``.

    Example::

        gt = ground_truth("quick")
        lds(my_scores(gt.model, gt.train, gt.test_sets["val"]), gt.masks, gt.F["val"])
    """

    cfg: LDSSize
    model: torch.nn.Module
    checkpoints: object
    train: tuple
    test_sets: dict
    masks: torch.Tensor
    F: dict
    device: str
    timings: dict
    retrainer: object = None     # the fastattr.lds.Retrainer of the subset models (its cache)


def _names(value, allowed: tuple, what: str) -> list:
    """A comma-separated string or a list of names, each of ``allowed``."""
    names = [v.strip() for v in (value.split(",") if isinstance(value, str) else value)]
    unknown = [v for v in names if v not in allowed]
    if unknown or not names:
        raise ValueError(f"{what} must be names from {allowed}, got {unknown or names}")
    return names


def _size(size) -> LDSSize:
    cfg = SIZES[size] if isinstance(size, str) and size in SIZES else size
    if not isinstance(cfg, LDSSize):
        raise ValueError(f"size must be one of {tuple(SIZES)} or an LDSSize, got {size!r}")
    return cfg


def _measure_key(cfg: LDSSize, test_sets: dict, retrainer, device: str) -> str:
    """What the measurements depend on: the test images and ids, the (t, ε) draws, the
    subset models (masks, seeds) and the device; fastattr's version for safety."""
    from . import __version__

    h = hashlib.sha256()
    for split, (images, ids) in sorted(test_sets.items()):
        h.update(split.encode())
        h.update(images.detach().float().cpu().contiguous().numpy().tobytes())
        h.update(torch.as_tensor(ids).cpu().numpy().tobytes())
    h.update(retrainer.masks.cpu().numpy().tobytes())
    h.update(json.dumps([cfg.eval_K, list(cfg.eval_seeds), cfg.seeds, cfg.steps,
                         cfg.batch_size, device, __version__]).encode())
    return h.hexdigest()[:16]


def ground_truth(size="quick", cache_dir=None, workers: int = 1, progress: bool = True,
                 log=print) -> GroundTruth:
    """Train (or load from the cache) the full model and every subset model of ``size`` and
    measure the test sets under each: the LDS ground truth shared by fastattr's methods
    (``run_lds``) and the reference libraries (``benchmarks/bench_lds_peers.py``).

    Example::

        gt = ground_truth("quick", cache_dir="cache")
        gt.F["val"].shape        # [num_subsets, n_val]
    """
    from .data import digits
    from .diffusion import DiffusionTask
    from .lds import Retrainer, _save_atomic, measure
    from .models import digits_unet
    from .train import default_cache_dir, train_digits

    cfg = _size(size)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    timings = {}
    clock = time.perf_counter()

    train_fn = functools.partial(_train_fn, steps=cfg.steps, batch_size=cfg.batch_size)
    recipe = {"steps": cfg.steps, "batch_size": cfg.batch_size, "data": "sklearn-digits"}
    retrainer_dir = root / "lds" / f"digits-{cfg.n_train}-{cfg.steps}"
    retrainer = Retrainer(train_fn, retrainer_dir,
                          cfg.n_train, cfg.num_subsets, cfg.seeds, make_model=digits_unet,
                          config=recipe, workers=workers, device=device, progress=progress)
    model, ckpts = train_digits(range(cfg.n_train), seed=0,
                                size=_recipe(cfg.steps, cfg.batch_size), device=device,
                                progress=progress, checkpoints=cfg.checkpoints,
                                cache_dir=root)
    timings["full model"] = time.perf_counter() - clock
    name = size if isinstance(size, str) else "custom"
    log(f"digits LDS ({name}): {cfg.n_train} training images, {cfg.num_subsets} subsets x "
        f"{cfg.seeds} seed(s), {cfg.steps} steps each")

    clock = time.perf_counter()
    retrainer.run()
    timings["retraining"] = time.perf_counter() - clock

    train = digits("train").subset(range(cfg.n_train)).batch()
    val = digits("test").subset(range(cfg.n_val)).batch()
    gen = DiffusionTask(model).sample(cfg.n_gen, num_steps=cfg.sample_steps, seed=0)
    test_sets = {"val": val, "gen": (gen.images.clamp(-1, 1), gen.ids)}

    clock = time.perf_counter()
    # the measurements are cached beside the subset models: a re-run (other methods, the
    # ablation, the peers benchmark) reads them instead of re-evaluating every model
    cached = retrainer_dir / f"measure-{_measure_key(cfg, test_sets, retrainer, device)}.pt"
    with distributed.main_first():     # under torch.distributed: rank 0 measures, others read
        if cached.exists():
            F = torch.load(cached, map_location="cpu", weights_only=True)
        else:
            eval_task = DiffusionTask(model, samples_per_example=cfg.eval_K,
                                      timesteps="uniform")
            F = {split: measure(retrainer, data, eval_task, eval_seeds=list(cfg.eval_seeds),
                                progress=progress) for split, data in test_sets.items()}
            _save_atomic(cached, F)
    timings["measurement"] = time.perf_counter() - clock
    return GroundTruth(cfg, model, ckpts, train, test_sets, retrainer.masks, F, device, timings,
                       retrainer)


def run_lds(methods=METHODS, size="quick", cache_dir=None, workers: int = 1,
            progress: bool = True, log=print, gt=None) -> dict:
    """Run the digits LDS benchmark for ``methods`` (names of ``METHODS``) at ``size``
    ("quick", "full" or an ``LDSSize``); models and retraining runs are cached under
    ``cache_dir`` (default ``fastattr.train.default_cache_dir()``), so a re-run (or an
    interrupted one) reuses them. ``gt`` reuses a ``ground_truth`` already built (its size
    then wins). Returns a
    JSON-ready dict (``format_table`` prints it).

    Example::

        results = run_lds(["dtrak", "trak"], size="quick")
        print(format_table(results))
    """
    from .diffusion import DiffusionTask

    cfg = _size(size) if gt is None else gt.cfg
    methods = _names(methods, METHODS, "methods")
    if gt is None:
        gt = ground_truth(size, cache_dir, workers, progress, log)
    task = DiffusionTask(gt.model, samples_per_example=cfg.K, timesteps="uniform")
    results = {"size": dataclasses.asdict(cfg), "device": gt.device, "methods": {},
               "timings": gt.timings, "torch": torch.__version__}
    for name in methods:
        clock = time.perf_counter()
        method = _method(name, task, cfg, gt.checkpoints, progress).fit(gt.train)
        entry = {s: _evaluate(name, method, data, gt.masks, gt.F[s], cfg)
                 for s, data in gt.test_sets.items()}
        entry["seconds"] = time.perf_counter() - clock
        results["methods"][name] = entry
        log(f"  {name}: val LDS {format_lds(entry['val']['heldout'])}, gen LDS "
            f"{format_lds(entry['gen']['heldout'])} ({entry['seconds']:.1f} s)")
    return results


ABLATION_OUTPUTS = ("loss", "square", "mean", "l1", "l2", "linf", "elbo")

# D-TRAK (Zheng et al., ICLR 2024) Table 1, CIFAR-2 val LDS (%) at K = 10 / 100 / 1000
# timesteps, k = 4096 (shared/METHODS.md): printed beside ours for comparison
PUBLISHED_CIFAR2 = {"loss": (10.7, 19.5, 22.4), "elbo": (8.5, 9.1, 13.2),
                    "square": (24.8, 30.8, 32.4), "mean": (24.9, 29.2, 30.4),
                    "l1": (23.4, 30.4, 32.3), "l2": (24.7, 30.9, 32.4),
                    "linf": (5.2, 11.5, 22.3)}


def run_ablation(outputs=ABLATION_OUTPUTS, Ks=(10, 100), size="quick", cache_dir=None,
                 workers: int = 1, progress: bool = True, log=print, gt=None) -> dict:
    """D-TRAK's output-function ablation on the digits benchmark: the validation-set LDS of
    TRAK features of each output function (``ABLATION_OUTPUTS``; same f on both sides) at
    each number of timesteps ``Ks``, λ chosen on the held-out half as in ``run_lds``.
    ``gt`` reuses a ``ground_truth`` already built (its size then wins). Returns a JSON-ready
    dict (``format_ablation`` prints it).

    Example::

        print(format_ablation(run_ablation(["square", "loss"], Ks=(10,), size="quick")))
    """
    from .diffusion import OUTPUTS, DiffusionTask
    from .methods import DTRAK

    cfg = _size(size) if gt is None else gt.cfg
    outputs = _names(outputs, OUTPUTS, "outputs")
    Ks = [int(K) for K in Ks]
    if not Ks or min(Ks) < 1:
        raise ValueError(f"Ks must be positive timestep counts, got {Ks}")
    if gt is None:
        gt = ground_truth(size, cache_dir, workers, progress, log)
    rows = []
    for K in Ks:
        task = DiffusionTask(gt.model, samples_per_example=K, timesteps="uniform")
        for output in outputs:
            clock = time.perf_counter()
            method = DTRAK(task, k=cfg.k, output=output, progress=progress,
                           batch_size=64).fit(gt.train)
            val = _evaluate("dtrak", method, gt.test_sets["val"], gt.masks, gt.F["val"], cfg)
            seconds = time.perf_counter() - clock
            rows.append({"output": output, "K": K, "val": val, "seconds": seconds})
            log(f"  D-TRAK f={output} K={K}: val LDS {format_lds(val['heldout'])} "
                f"({seconds:.1f} s)")
    return {"size": dataclasses.asdict(cfg), "rows": rows, "published_cifar2": PUBLISHED_CIFAR2}


def run_counterfactual(methods=("das", "dtrak"), k: int = 25, n_test: int = 8, size="quick",
                       cache_dir=None, workers: int = 1, progress: bool = True, log=print,
                       gt=None) -> dict:
    """The counterfactual check (``fastattr.lds.counterfactual``) on the digits benchmark:
    for each of the first ``n_test`` validation digits, retrain without its ``k`` strongest
    proponents under each method (scores at the method's default λ) and without ``k``
    random training images (the same random set for every method), and compare the rise of
    its loss (measured as the LDS ground truth is: ``eval_K`` uniform timesteps x
    ``eval_seeds``). The models go to the subset models' cache (resumable, ``workers``).
    Returns a JSON-ready dict (``format_counterfactual`` prints it).

    Example::

        print(format_counterfactual(run_counterfactual(["das"], k=10, size="quick")))
    """
    from .diffusion import DiffusionTask
    from .lds import counterfactual

    methods = _names(methods, METHODS, "methods")
    if gt is None:
        gt = ground_truth(size, cache_dir, workers, progress, log)
    cfg = gt.cfg
    if isinstance(n_test, bool) or not isinstance(n_test, int) or not 1 <= n_test <= cfg.n_val:
        raise ValueError(f"n_test must be an int in [1, {cfg.n_val}] (the validation digits), "
                         f"got {n_test!r}")
    images, ids = gt.test_sets["val"]
    val = (images[:n_test], torch.as_tensor(ids)[:n_test])
    task = DiffusionTask(gt.model, samples_per_example=cfg.K, timesteps="uniform")
    eval_task = DiffusionTask(gt.model, samples_per_example=cfg.eval_K, timesteps="uniform")
    rows = []
    for name in methods:
        clock = time.perf_counter()
        scores = _method(name, task, cfg, gt.checkpoints, progress).fit(gt.train).score(val)
        res = counterfactual(scores, gt.retrainer, val, eval_task, k,
                             eval_seeds=list(cfg.eval_seeds), progress=progress)
        seconds = time.perf_counter() - clock
        rows.append({"method": name, **res.as_dict(), "seconds": seconds})
        log(f"  {name}: removing the top-{k} proponents raises the loss by "
            f"{float(res.delta_top.mean()):+.4f}, {k} random images by "
            f"{float(res.delta_random.mean()):+.4f} ({seconds:.0f} s)")
    return {"size": dataclasses.asdict(cfg), "k": k, "n_test": n_test, "rows": rows}


def format_counterfactual(results: dict) -> str:
    """The counterfactual check as a text table (mean loss change without the top-k
    proponents and without k random images, their difference ± standard error, the share of
    test samples where the proponents matter more).

    Example::

        print(format_counterfactual(run_counterfactual(["das"], size="quick")))
    """
    k = results["k"]
    table = [("method", f"Δloss without top-{k}", f"Δloss without {k} random",
              "difference ± s.e.", "top > random")]
    for r in results["rows"]:
        table.append((r["method"], f"{sum(r['delta_top']) / len(r['delta_top']):+.4f}",
                      f"{sum(r['delta_random']) / len(r['delta_random']):+.4f}",
                      f"{r['mean_difference']:+.4f} ± {r['stderr']:.4f}",
                      f"{r['fraction_top_greater']:.0%}"))
    return _table(table)


def format_ablation(results: dict) -> str:
    """The ablation as a text table: output function x K (val LDS %, CI, held-out λ) beside
    the D-TRAK paper's CIFAR-2 figures at the same K.

    Example::

        print(format_ablation(run_ablation(size="quick")))
    """
    Ks = sorted({r["K"] for r in results["rows"]})
    outputs = list(dict.fromkeys(r["output"] for r in results["rows"]))
    cell = {(r["output"], r["K"]): r for r in results["rows"]}
    published = {10: 0, 100: 1, 1000: 2}
    header = ["f"] + [f"K={K}" for K in Ks] + [f"CIFAR-2 paper K={K}" for K in Ks
                                               if K in published]
    rows = [header]
    for o in outputs:
        row = [o] + [format_lds(cell[o, K]["val"]["heldout"]) if (o, K) in cell else "-"
                     for K in Ks]
        paper = results.get("published_cifar2", {}).get(o)
        row += [f"{paper[published[K]]:.1f}" if paper else "-" for K in Ks if K in published]
        rows.append(row)
    return _table(rows)


def format_lds(res: dict) -> str:
    """One LDS report (``LDSResult.as_dict()``) as ``mean [low, high]`` in %, "n/a" when
    undefined.

    Example::

        format_lds(results["methods"]["dtrak"]["val"]["heldout"])   # '23.5 [20.6, 26.0]'
    """
    mean, lo, hi = res["mean"], res["ci_low"], res["ci_high"]
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "n/a"
    if lo is None or hi is None:
        return f"{100 * mean:.1f}"
    return f"{100 * mean:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def format_table(results: dict) -> str:
    """The results as a text table: LDS (%) with the 95% bootstrap CI on the validation and
    generated sets (λ chosen on the held-out half), and each method's wall time.

    Example::

        print(format_table(run_lds(size="quick")))
    """
    rows = [("method", "LDS val (held-out λ)", "LDS gen (held-out λ)", "val, λ tuned on eval",
             "seconds")]
    for name, e in results["methods"].items():
        tuned = e["val"]["tuned_on_eval"]
        rows.append((name, format_lds(e["val"]["heldout"]), format_lds(e["gen"]["heldout"]),
                     format_lds(tuned) if tuned else "-", f"{e['seconds']:.1f}"))
    return _table(rows)


def _table(rows) -> str:
    """Rows of strings (the first the header) as aligned text columns."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_chart(results: dict, path) -> None:
    """A bar chart PNG of the LDS (val and gen, held-out λ) with CI whiskers (Pillow).

    Example::

        write_chart(results, "lds.png")
    """
    from PIL import Image, ImageDraw

    names = list(results["methods"])
    W, H, pad, bar = 120 + 90 * len(names), 320, 40, 28
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    lo_v, hi_v = -0.2, 1.0
    y = lambda v: H - pad - (v - lo_v) / (hi_v - lo_v) * (H - 2 * pad)  # noqa: E731
    d.line([(pad, y(0)), (W - 10, y(0))], fill="black")
    for tick in (-0.2, 0.0, 0.2, 0.4, 0.6, 0.8, 1.0):
        d.text((4, y(tick) - 6), f"{tick:+.1f}", fill="gray")
    colors = {"val": (66, 133, 244), "gen": (244, 160, 0)}
    for i, name in enumerate(names):
        x0 = pad + 20 + 90 * i
        for j, split in enumerate(("val", "gen")):
            r = results["methods"][name][split]["heldout"]
            m = r["mean"]
            if m is None or (isinstance(m, float) and math.isnan(m)):
                continue
            xa = x0 + j * (bar + 4)
            d.rectangle([xa, min(y(m), y(0)), xa + bar, max(y(m), y(0))], fill=colors[split])
            if r["ci_low"] is not None and r["ci_high"] is not None:
                xc = xa + bar // 2
                d.line([(xc, y(r["ci_low"])), (xc, y(r["ci_high"]))], fill="black")
        d.text((x0, H - pad + 6), name, fill="black")
    d.text((pad, 8), "LDS (lambda chosen on held-out half): blue = validation, "
           "orange = generated; whiskers: 95% bootstrap CI", fill="black")
    _replace(path, lambda tmp: img.save(tmp, format="PNG"))


def save_results(results: dict, path) -> None:
    """Write the results as JSON atomically (temp file, then rename).

    Example::

        save_results(results, "lds.json")
    """
    _replace(path, lambda tmp: tmp.write_text(json.dumps(results, indent=2, default=float)))


def _replace(path, write) -> None:
    """``write(tmp)`` a hidden sibling of ``path``, then rename it into place: readers see the
    old file or the whole new one, never half of it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
