"""The digits LDS benchmark runs end to end (a tiny size: the pipeline, not the figures),
writes its table, JSON and chart, and a re-run reuses every trained model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fastattr import digits_lds
from fastattr.digits_lds import LDSSize, format_table, run_lds, save_results, write_chart

TINY = LDSSize(n_train=12, steps=4, batch_size=8, num_subsets=4, seeds=1, n_val=4, n_gen=2,
               K=1, k=32, eval_K=2, eval_seeds=(0,), checkpoints=2, sample_steps=4)


def test_tiny_benchmark_end_to_end(tmp_path):
    pytest.importorskip("PIL")
    results = run_lds(["dtrak", "das", "tracin"], size=TINY, cache_dir=tmp_path,
                      progress=False, log=lambda *a: None)
    assert set(results["methods"]) == {"dtrak", "das", "tracin"}
    for name, entry in results["methods"].items():
        for split in ("val", "gen"):
            res = entry[split]["heldout"]
            assert res["mean"] is None or -1.0 <= res["mean"] <= 1.0
            assert len(res["per_test"]) >= 1
        assert (entry["val"]["lam"] is None) == (name == "tracin")
    table = format_table(results)
    assert "dtrak" in table and "LDS val" in table
    save_results(results, tmp_path / "lds.json")
    assert json.loads((tmp_path / "lds.json").read_text())["size"]["n_train"] == 12
    write_chart(results, tmp_path / "lds.png")
    from PIL import Image

    assert Image.open(tmp_path / "lds.png").size[0] > 200
    # a second run trains nothing: every subset model comes from the cache
    calls = []
    original = digits_lds._train_fn

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    import fastattr.lds

    measured = []
    real_measure = fastattr.lds.measure
    digits_lds._train_fn = counting
    fastattr.lds.measure = lambda *a, **kw: measured.append(1) or real_measure(*a, **kw)
    try:
        again = run_lds(["dtrak"], size=TINY, cache_dir=tmp_path, progress=False,
                        log=lambda *a: None)
    finally:
        digits_lds._train_fn = original
        fastattr.lds.measure = real_measure
    assert calls == [] and measured == []  # models and measurements both from the cache
    assert again["methods"]["dtrak"] == {**results["methods"]["dtrak"],
                                         "seconds": again["methods"]["dtrak"]["seconds"]}


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="methods must be names from"):
        run_lds(["dtrak", "lissa"], size=TINY, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="size must be one of"):
        run_lds(["dtrak"], size="huge", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="outputs must be names from"):
        digits_lds.run_ablation(["square", "cube"], Ks=(10,), size=TINY, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="Ks must be positive"):
        digits_lds.run_ablation(["square"], Ks=(0,), size=TINY, cache_dir=tmp_path)


def test_command_line_lds_and_bench(tmp_path, monkeypatch, capsys):
    from fastattr.cli import main

    for command in ("lds", "bench"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
    assert "--benchmarks-dir" in capsys.readouterr().out
    # `fastattr lds --size quick` at the tiny size: table printed, JSON and chart written
    monkeypatch.setitem(digits_lds.SIZES, "quick", TINY)
    out = tmp_path / "results"
    assert main(["lds", "--methods", "dtrak", "--size", "quick", "--out", str(out),
                 "--cache-dir", str(tmp_path / "cache"), "--no-progress",
                 "--ablation-K", "1,10", "--ablation-outputs", "square,loss",
                 "--counterfactual", "3", "--counterfactual-n", "2",
                 "--counterfactual-methods", "dtrak"]) == 0
    printed = capsys.readouterr().out
    assert "LDS val" in printed and "dtrak" in printed and "CIFAR-2 paper" in printed
    assert "Counterfactual check" in printed and "without top-3" in printed
    saved = json.loads((out / "lds.json").read_text())
    # the counterfactual check: 2 val digits, their top-3 D-TRAK proponents and 3 random
    # images removed in turn, each retrained into the cache beside the subset models
    cf = saved["counterfactual"]
    assert cf["k"] == 3 and cf["n_test"] == 2 and [r["method"] for r in cf["rows"]] == ["dtrak"]
    row = cf["rows"][0]
    assert len(row["delta_top"]) == len(row["delta_random"]) == 2
    assert all(math.isfinite(v) for v in row["delta_top"] + row["delta_random"])
    assert row["mean_difference"] == pytest.approx(
        sum(t - r for t, r in zip(row["delta_top"], row["delta_random"])) / 2)
    models = sorted(p.name for p in (tmp_path / "cache").rglob("*.pt") if p.name.startswith(
        ("cf_", "full_")))
    assert models[-1] == "full_seed_0.pt" and 2 <= len(models) - 1 <= 4, models
    assert list(saved["methods"]) == ["dtrak"] and saved["size"]["n_train"] == 12
    cells = {(r["output"], r["K"]) for r in saved["ablation"]["rows"]}
    assert cells == {("square", 1), ("square", 10), ("loss", 1), ("loss", 10)}
    # the ablation's D-TRAK f=square at K=1 is the benchmark's dtrak (TINY has K=1)
    square1 = next(r for r in saved["ablation"]["rows"] if r["output"] == "square" and r["K"] == 1)
    assert square1["val"] == saved["methods"]["dtrak"]["val"]
    with pytest.raises(SystemExit, match="--ablation-K expects"):
        main(["lds", "--ablation-K", "10,x"])
    assert (out / "lds.png").stat().st_size > 0

    assert main(["bench", "--list"]) == 0
    assert "factor_ops" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="unknown benchmark"):
        main(["bench", "nope"])
    with pytest.raises(SystemExit, match="holds no benchmark scripts"):
        main(["bench", "factor_ops", "--benchmarks-dir", str(tmp_path)])
    # a real (quick) run of one script, found next to the package or in the checkout
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    assert main(["bench", "factor_ops", "--quick", "--out", str(tmp_path / "bench")]) == 0
    rows = json.loads((tmp_path / "bench" / "factor_ops.json").read_text())["rows"]
    assert {r["op"] for r in rows} == {"covariance", "ekfac_lambda"}
    assert all(r["ours_s"] > 0 and r["torch_s"] > 0 for r in rows)
