"""The projection benchmark runs end to end (--quick) and writes well-formed JSON.

Benchmarks are scripts, not timed tests: this checks only that the script works.
"""

import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "bench_projection.py")


def test_bench_projection_quick_writes_json(tmp_path):
    out = tmp_path / "sub" / "bench.json"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    start = time.perf_counter()
    res = subprocess.run([sys.executable, SCRIPT, "--quick", "--json", str(out)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - start
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert elapsed < 30, f"--quick took {elapsed:.1f} s"

    data = json.loads(out.read_text())
    assert data["machine"]["torch"] and data["machine"]["torch_num_threads"] >= 1
    assert data["machine"]["cpu_model"] and data["machine"]["date"]
    ok = [r for r in data["rows"] if r["status"] == "ok"]
    assert ok, data["rows"]
    for row in ok:
        assert row["median_s"] > 0 and all(t > 0 for t in row["times_s"])
        assert row["gbps"] > 0 and row["tflops"] > 0
    methods = {row["method"] for row in ok}
    assert {"cpu", "matmul"} <= methods or {"reference", "matmul"} <= methods, methods
    assert all(row.get("reason") for row in data["rows"] if row["status"] != "ok")
    # written atomically: no temp file left beside the result
    assert sorted(p.name for p in out.parent.iterdir()) == ["bench.json"]


PSG_SCRIPT = os.path.join(ROOT, "benchmarks", "bench_psg.py")


def test_bench_psg_quick_writes_json(tmp_path):
    """bench_psg --quick runs each method in its own process and records time and memory."""
    out = tmp_path / "psg.json"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, PSG_SCRIPT, "--quick", "--methods",
                          "fastattr-dense,fastattr-kron,vmap+projector,forward-backward",
                          "--json", str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert {r["method"] for r in rows} == {"fastattr-dense", "fastattr-kron", "vmap+projector",
                                           "forward-backward"}
    for row in rows:
        assert row["status"] == "ok", row
        assert row["median_s"] > 0 and row["peak_mem_mib"] >= 0
        # the timed calls' own peak, measured afresh (none when the call was timed once)
        assert row["timed_once"] or row["peak_mem_warm_mib"] >= 0
    dense = [r for r in rows if r["method"] == "fastattr-dense"]
    assert all(r["k_out"] == 64 and "x_vmap_time" in r for r in dense)
    assert all("x_vmap_memory_warm" in r for r in dense if not r["timed_once"])
    kron = [r for r in rows if r["method"] == "fastattr-kron"]
    assert kron and all("x_dense_time" in r for r in kron)
    assert data["machine"]["diffusers"]


CURVATURE_SCRIPT = os.path.join(ROOT, "benchmarks", "bench_curvature.py")


def test_bench_curvature_quick_writes_json(tmp_path):
    """bench_curvature --quick fits EK-FAC with fastattr and kronfluence, phase by phase."""
    out = tmp_path / "curvature.json"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, CURVATURE_SCRIPT, "--quick", "--json", str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert {r["method"] for r in rows} == {"fastattr", "kronfluence"}
    for row in rows:
        assert row["status"] == "ok", row
        assert set(row["phases_s"]) >= {"covariance", "eigendecomposition", "lambda"}
        assert row["total_s"] > 0 and row["peak_mem_mib"] >= 0 and row["rows"] == 8
    # both fit the same layers: every Linear / Conv2d of the UNet
    assert rows[0]["layers"] == rows[1]["layers"] > 10
