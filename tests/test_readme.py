"""The README's Methods snippets run as written (in order, in one namespace, in a temp dir)."""

from __future__ import annotations

import os
import re

import pytest
import torch

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _method_snippets() -> list:
    text = open(README, encoding="utf-8").read()
    start = text.index("<!-- methods-snippets")
    end = text.index("\n## ", start)
    return re.findall(r"```python\n(.*?)```", text[start:end], flags=re.S)


def test_methods_snippets_run(tmp_path, monkeypatch):
    pytest.importorskip("diffusers")
    snippets = _method_snippets()
    assert len(snippets) >= 5
    monkeypatch.chdir(tmp_path)
    namespace = {}
    for code in snippets:
        exec(compile(code, "README.md", "exec"), namespace)
    scores = namespace["scores"]
    assert isinstance(scores, torch.Tensor) and scores.shape == (4, 48)
    assert torch.isfinite(scores).all()
    assert (tmp_path / "trak-store" / "manifest.json").exists()
