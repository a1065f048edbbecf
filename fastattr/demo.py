"""The ``fastattr demo`` job: which training digits made the diffusion model draw this?

1. trains the digits benchmark's diffusion model (``fastattr.train.train_digits``, the
   ``quick`` recipe: scikit-learn's bundled handwritten digits, nothing downloaded) or loads
   it from the cache;
2. draws 8 samples with deterministic DDIM (50 steps, fixed seed);
3. attributes every sample to the 1500 training images with DAS and D-TRAK
   (``fastattr.methods``; projected gradients, the train features kept in a store under the
   cache directory so a second run only scores);
4. prints each sample's top-5 proponents with their scores, and writes ``attribution.png``:
   one row per sample -- the sample, then for each method its top proponents (largest
   scores: training on them makes the sample more likely) and its top opponents (most
   negative scores), upscaled 8x, captioned with train id, digit label and score.

As a sanity figure it also reports how often the proponents show the same digit as the
sample (the sample's digit read off its nearest training image; chance is about 10 %).

Example::

    from fastattr.demo import digits_demo
    report = digits_demo(out="attribution.png")
    report["top"]["das"].ids[0]          # train ids of sample 0's DAS proponents
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import NamedTuple

import torch

from . import distributed

__all__ = ["digits_demo", "Layout", "attribution_layout", "draw_attribution", "METHODS"]

METHODS = ("das", "dtrak")
_LABELS = {"das": "DAS", "dtrak": "D-TRAK"}


# ----------------------------------------------------------------------------- picture

class Layout(NamedTuple):
    """Pixel geometry of ``attribution.png``: ``tile`` (side of an upscaled 8x8 image),
    ``pad`` (between tiles of a group), ``gap`` (between groups), ``caption`` (text lines
    under a tile), ``header`` (column titles), ``margin``, ``row_gap``, ``width``,
    ``height``.

    Example::

        attribution_layout(n_rows=8, n_methods=2, top=5, bottom=3).width
    """

    tile: int
    pad: int
    gap: int
    caption: int
    header: int
    margin: int
    row_gap: int
    width: int
    height: int


def attribution_layout(n_rows: int, n_methods: int, top: int = 5, bottom: int = 3,
                       scale: int = 8) -> Layout:
    """The geometry of a picture with ``n_rows`` samples and, per method, ``top``
    proponents and ``bottom`` opponents, 8x8 images upscaled ``scale`` times.

    Example::

        layout = attribution_layout(8, 2)            # 8 samples, DAS and D-TRAK
        image.size == (layout.width, layout.height)
    """
    tile, pad, gap, caption, header, margin, row_gap = 8 * scale, 4, 18, 26, 34, 10, 8
    groups = [top, bottom] * n_methods
    groups = [g for g in groups if g > 0]

    def group_width(n):
        return n * tile + (n - 1) * pad

    width = 2 * margin + tile + sum(gap + group_width(g) for g in groups)
    height = 2 * margin + header + n_rows * (tile + caption) + max(n_rows - 1, 0) * row_gap
    return Layout(tile, pad, gap, caption, header, margin, row_gap, width, height)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # a Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _tile(image: torch.Tensor, side: int):
    """An 8x8 image in [-1, 1] (``[1, 8, 8]``) as a grey PIL image of ``side`` pixels
    (nearest-neighbour upscaling: the pixels stay visible)."""
    from PIL import Image

    pixels = ((image.detach().float().cpu().clamp(-1, 1)[0] + 1) * 127.5).round()
    small = Image.fromarray(pixels.to(torch.uint8).numpy(), mode="L")
    return small.resize((side, side), Image.NEAREST)


def draw_attribution(path, samples: torch.Tensor, train: torch.Tensor, labels: torch.Tensor,
                     ids: torch.Tensor, results: dict, top: int = 5, bottom: int = 3,
                     scale: int = 8, sample_captions=None) -> Layout:
    """Write the picture: one row per sample, then per method (``results``: name ->
    ``(pro_indices [n, top], pro_scores, opp_indices [n, bottom], opp_scores)``, indices
    into ``train``) its proponents and opponents, captioned ``#id 'label'`` and the score.

    Example::

        draw_attribution("attribution.png", gen, train_images, train_labels, train_ids,
                         {"das": (pi, ps, oi, os)})
    """
    from PIL import Image, ImageDraw

    n = samples.shape[0]
    lay = attribution_layout(n, len(results), top, bottom, scale)
    canvas = Image.new("RGB", (lay.width, lay.height), "white")
    draw = ImageDraw.Draw(canvas)
    font, small = _font(12), _font(10)
    green, red, grey = (0, 110, 0), (170, 0, 0), (60, 60, 60)

    # columns: x of the sample and of each group's first tile
    x = lay.margin
    columns = [("generated", x, 1, grey)]
    x += lay.tile
    separators = []
    for name in results:
        separators.append(x + lay.gap // 2)
        for kind, count, colour in (("proponents", top, green), ("opponents", bottom, red)):
            if count <= 0:
                continue
            x += lay.gap
            columns.append((f"{_LABELS.get(name, name)} {kind}", x, count, colour))
            x += count * lay.tile + (count - 1) * lay.pad
    for title, x0, _, colour in columns:
        draw.text((x0, lay.margin), title, fill=colour, font=font)
    for xs in separators:  # a vertical rule before each method's block
        draw.line([(xs, lay.margin), (xs, lay.height - lay.margin)], fill=(200, 200, 200))
    for title, x0, count, _ in columns[1:]:  # a rule under each group's title
        y = lay.margin + 18
        draw.line([(x0, y), (x0 + count * lay.tile + (count - 1) * lay.pad - 1, y)],
                  fill=(200, 200, 200))

    for r in range(n):
        y = lay.margin + lay.header + r * (lay.tile + lay.caption + lay.row_gap)
        canvas.paste(_tile(samples[r], lay.tile), (lay.margin, y))
        caption = f"sample {r}" if sample_captions is None else sample_captions[r]
        draw.text((lay.margin, y + lay.tile + 1), caption, fill=grey, font=small)
        group = 1
        for name, (pro_i, pro_s, opp_i, opp_s) in results.items():
            for idx, val, count, colour in ((pro_i, pro_s, top, green),
                                            (opp_i, opp_s, bottom, red)):
                if count <= 0:
                    continue
                x0 = columns[group][1]
                group += 1
                for j in range(min(count, idx.shape[1])):
                    i = int(idx[r, j])
                    xj = x0 + j * (lay.tile + lay.pad)
                    canvas.paste(_tile(train[i], lay.tile), (xj, y))
                    draw.text((xj, y + lay.tile + 1), f"#{int(ids[i])} '{int(labels[i])}'",
                              fill=grey, font=small)
                    draw.text((xj, y + lay.tile + 13), f"{float(val[r, j]):+.3g}",
                              fill=colour, font=small)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return lay


# ----------------------------------------------------------------------------- the job

def _store_dir(cache_dir: Path, method) -> Path:
    """A store directory per configuration (so another k, K or model never collides)."""
    config = json.dumps(method.store_config(), sort_keys=True, default=str)
    return cache_dir / "demo" / f"{method.name}-{hashlib.sha256(config.encode()).hexdigest()[:16]}"


def _nearest_labels(samples: torch.Tensor, train: torch.Tensor, labels: torch.Tensor):
    """Each sample's nearest training image (pixel L2) and its label."""
    d = torch.cdist(samples.flatten(1).float(), train.flatten(1).float())
    nearest = d.argmin(1)
    return nearest, labels[nearest]


def digits_demo(out="attribution.png", *, methods=METHODS, size: str = "quick", steps=None,
                n_train=None, n_samples: int = 8, sample_steps: int = 50, seed: int = 0,
                k: int = 1024, K: int = 4, top: int = 5, bottom: int = 3, cache_dir=None,
                device="cpu", batch_size: int = 64, progress: bool = True, log=print) -> dict:
    """Run the demo (see the module docstring); returns a report dict.

    Args:
        out: the PNG to write (None: none).
        methods: attribution methods, of ``METHODS`` ("das", "dtrak").
        size / steps: the training recipe (``fastattr.train``; ``steps`` overrides).
        n_train: train on (and attribute to) the first ``n_train`` training images only
            (default all 1500; small values for tests).
        n_samples / sample_steps / seed: the DDIM samples (``seed`` also seeds training).
        k / K: projection dimension and timesteps per example (uniform grid) of both methods.
        top / bottom: proponents / opponents shown per sample.
        cache_dir: model and feature cache (default ``fastattr.train.default_cache_dir()``).
        device / batch_size: where to compute, training images per gradient pass.
        progress / log: progress bars, where the report's lines go (``print``).

    The report holds ``samples [n, 1, 8, 8]``, ``scores`` (method -> ``[n, n_train]``),
    ``top`` / ``bottom`` (method -> ``TopK``-like (values, indices, ids)), ``sample_labels``
    (nearest-neighbour digit), ``label_agreement`` (method -> fraction of top proponents
    showing that digit), ``seconds`` (per phase) and ``png`` (the path written).

    Example::

        report = digits_demo(out="attribution.png", k=1024, K=8)
        report["label_agreement"]["das"]
    """
    from .data import digits
    from .diffusion import DiffusionTask
    from .methods import DAS, DTRAK
    from .methods.base import TopK
    from .train import default_cache_dir, train_digits

    methods = tuple(methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"methods must be a non-empty subset of {METHODS}, got {methods}")
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    seconds, clock = {}, time.perf_counter()

    train = digits("train")
    if n_train is not None:
        train = train.subset(range(n_train))
    model = train_digits(None if n_train is None else range(n_train), seed=seed, size=size,
                         steps=steps, device=device, progress=progress, cache_dir=cache_dir)
    seconds["model"] = time.perf_counter() - clock
    n_params = sum(p.numel() for p in model.parameters())
    log(f"digits diffusion model: {n_params / 1e6:.2f}M-parameter UNet ({size} recipe), "
        f"{len(train)} training images, ready in {seconds['model']:.1f} s "
        f"(cache: {cache_dir})")

    clock = time.perf_counter()
    task = DiffusionTask(model, samples_per_example=K, timesteps="uniform")
    traj = task.sample(n_samples, num_steps=sample_steps, seed=seed)
    samples = traj.images.clamp(-1, 1).cpu()
    query = (samples.to(device), traj.ids)
    seconds["sampling"] = time.perf_counter() - clock
    nearest, sample_labels = _nearest_labels(samples, train.images, train.labels)
    log(f"drew {n_samples} samples with DDIM ({sample_steps} steps, seed {seed}) in "
        f"{seconds['sampling']:.1f} s")

    train_batch = (train.images.to(device), train.ids)
    scores, tops, bottoms, agreement = {}, {}, {}, {}
    for name in methods:
        clock = time.perf_counter()
        cls = DAS if name == "das" else DTRAK
        store = _store_dir(cache_dir, cls(task, k=k, batch_size=batch_size, progress=progress))
        method = cls(task, k=k, batch_size=batch_size, progress=progress, store=store)
        method.fit(train_batch)
        s = method.score(query).cpu()
        seconds[name] = time.perf_counter() - clock
        t = min(top, s.shape[1])
        b = min(bottom, s.shape[1])
        hi = s.topk(t, dim=1)
        lo = s.topk(b, dim=1, largest=False)
        tops[name] = TopK(hi.values, hi.indices, train.ids[hi.indices])
        bottoms[name] = TopK(lo.values, lo.indices, train.ids[lo.indices])
        scores[name] = s
        agreement[name] = float((train.labels[hi.indices] == sample_labels[:, None])
                                .float().mean())
        log(f"{_LABELS[name]}: k={k}, K={K} timesteps, {len(train)} training images "
            f"attributed in {seconds[name]:.1f} s")

    for r in range(n_samples):
        log(f"\nsample {r} (looks like a '{int(sample_labels[r])}': nearest training image "
            f"#{int(train.ids[nearest[r]])})")
        for name in methods:
            items = "  ".join(f"#{int(i)} '{int(train.labels[j])}' {float(v):+.3g}"
                              for i, j, v in zip(tops[name].ids[r], tops[name].indices[r],
                                                 tops[name].values[r]))
            log(f"  {_LABELS[name]:>6} top-{tops[name].ids.shape[1]} proponents: {items}")
    log("")
    for name in methods:
        log(f"{_LABELS[name]}: top-{tops[name].ids.shape[1]} proponents show the sample's digit "
            f"{agreement[name]:.0%} of the time (chance ~10%)")

    png = None
    if out is not None and distributed.is_main():     # one writer under torch.distributed
        results = {name: (tops[name].indices, tops[name].values, bottoms[name].indices,
                          bottoms[name].values) for name in methods}
        captions = [f"sample {r} (nn '{int(sample_labels[r])}')" for r in range(n_samples)]
        draw_attribution(out, samples, train.images, train.labels, train.ids, results,
                         top=top, bottom=bottom, sample_captions=captions)
        png = Path(out)
        log(f"wrote {png}")
    return {"samples": samples, "scores": scores, "top": tops, "bottom": bottoms,
            "sample_labels": sample_labels, "label_agreement": agreement,
            "seconds": seconds, "png": png, "train_ids": train.ids}
