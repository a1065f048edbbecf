"""``fastattr demo`` end to end at a reduced size (20 training steps, 64 training images,
k = 128): the report, the PNG (its size is the layout's), the second run served from the
cache (no training, same scores), the command line (``--help``, ``demo``, ``backends``)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import fastattr.train as train_mod
from fastattr.cli import main
from fastattr.demo import attribution_layout, digits_demo

SMALL = dict(steps=20, n_train=64, k=128, K=2, n_samples=3, sample_steps=10, progress=False)


def test_demo_end_to_end_and_cache(tmp_path, monkeypatch):
    trained = []
    real = train_mod._train
    monkeypatch.setattr(train_mod, "_train",
                        lambda *a, **kw: trained.append(1) or real(*a, **kw))
    lines = []
    out = tmp_path / "pics" / "attribution.png"
    report = digits_demo(out=out, cache_dir=tmp_path / "cache", log=lines.append, **SMALL)
    assert trained == [1]
    assert report["png"] == out and out.exists()
    with Image.open(out) as image:
        layout = attribution_layout(n_rows=3, n_methods=2, top=5, bottom=3)
        assert image.size == (layout.width, layout.height)
        assert image.mode == "RGB"
    assert report["samples"].shape == (3, 1, 8, 8)
    for name in ("das", "dtrak"):
        scores = report["scores"][name]
        assert scores.shape == (3, 64) and torch.isfinite(scores).all()
        top, bottom = report["top"][name], report["bottom"][name]
        assert top.ids.shape == (3, 5) and bottom.ids.shape == (3, 3)
        assert torch.equal(top.values, scores.topk(5, dim=1).values)
        assert torch.equal(bottom.values, scores.topk(3, dim=1, largest=False).values)
        assert int(top.ids.max()) < 64  # train ids of the first 64 images
        assert 0.0 <= report["label_agreement"][name] <= 1.0
    text = "\n".join(lines)
    assert "top-5 proponents" in text and "wrote" in text
    assert text.count("sample ") >= 3

    # warm: the model and the train features come from the cache
    again = digits_demo(out=tmp_path / "again.png", cache_dir=tmp_path / "cache",
                        log=lambda line: None, **SMALL)
    assert trained == [1]
    for name in ("das", "dtrak"):
        assert torch.equal(again["scores"][name], report["scores"][name])
    assert (tmp_path / "again.png").exists()


def test_layout_geometry():
    one = attribution_layout(1, 1, top=5, bottom=3)
    two = attribution_layout(2, 1, top=5, bottom=3)
    assert two.height - one.height == one.tile + one.caption + one.row_gap
    both = attribution_layout(1, 2, top=5, bottom=3)
    group = 5 * one.tile + 4 * one.pad + 3 * one.tile + 2 * one.pad + 2 * one.gap
    assert both.width - one.width == group
    assert attribution_layout(1, 1, top=5, bottom=0).width < one.width


def test_bad_methods(tmp_path):
    with pytest.raises(ValueError, match="methods"):
        digits_demo(out=None, methods=("tracin",), cache_dir=tmp_path, **SMALL)


def test_command_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--help"])
    assert exit_info.value.code == 0
    assert "--cache-dir" in capsys.readouterr().out
    assert main(["backends"]) == 0
    assert "reference" in capsys.readouterr().out
    out = tmp_path / "cli.png"
    code = main(["demo", "--out", str(out), "--cache-dir", str(tmp_path / "c"), "--steps", "10",
                 "--n-train", "40", "--k", "64", "--timesteps", "1", "--samples", "2",
                 "--methods", "dtrak", "--no-progress"])
    assert code == 0 and out.exists()
    with Image.open(out) as image:
        layout = attribution_layout(n_rows=2, n_methods=1)
        assert image.size == (layout.width, layout.height)
    printed = capsys.readouterr().out
    assert "D-TRAK top-5 proponents" in printed and "Done in" in printed
