"""benchmarks/bench_lds_peers.py at its tiny size: every reference library runs on the digits
LDS ground truth and gets a row (LDS in [-1, 1], time > 0, ratio vs fastattr), the JSON is
written atomically; and trak's TRAKer fed fastattr's projection matrix reproduces fastattr's
D-TRAK scores (the peer task is the same objective, noise and timesteps, not just similar).

Benchmarks are scripts, not timed tests: this checks that the script works, not its figures.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
SCRIPT = os.path.join(BENCH, "bench_lds_peers.py")
PEERS = ("traker", "kronfluence", "dattri-tracin", "dattri-trak")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("lds_peers_cache")


def test_tiny_run_writes_every_peer_row(cache_dir, tmp_path):
    for lib in ("trak", "kronfluence", "dattri"):
        pytest.importorskip(lib)
    out = tmp_path / "sub" / "peers.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    # one thread: on a busy 2-core machine two spinning OpenMP threads per process slow the
    # peers down ~20x (measured); the figures do not depend on it
    res = subprocess.run([sys.executable, SCRIPT, "--tiny", "--threads", "1",
                          "--cache-dir", str(cache_dir),
                          "--peers", ",".join(PEERS), "--json", str(out)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "ratio vs fastattr" in res.stdout and "LDS val" in res.stdout

    data = json.loads(out.read_text())
    assert sorted(p.name for p in out.parent.iterdir()) == ["peers.json"]  # atomic: no temp
    assert data["benchmark"] == "lds_peers" and data["size"]["n_train"] == 12
    assert data["complete"] is True  # rewritten after every row, marked complete at the end
    assert data["machine"]["torch"] and data["versions"]["kronfluence"]
    rows = {r["method"].split(":")[0]: r for r in data["rows"]}
    assert set(rows) == set(PEERS) | {"dtrak", "kfac", "tracin", "trak"}
    for name, row in rows.items():
        assert row["status"] == "ok", (name, row.get("reason"), row.get("traceback"))
        assert row["seconds"] > 0 and row["ratio"] > 0
        for split in ("val", "gen"):
            entry = row["lds"][split]
            mean = entry["heldout"]["mean"]
            assert mean is None or -1.0 <= mean <= 1.0
            assert (entry["lam"] is None) == (row["lams"] is None)
        if name in PEERS:
            assert row["fastattr_seconds"] > 0
            assert row["ratio"] == pytest.approx(row["seconds"] / row["fastattr_seconds"])
            assert all(v is None or -1.0 <= v <= 1.0 for v in row["agreement"].values())
            assert row["lam_protocol"]
    assert rows["kronfluence"]["lams"] == data["size"]["kfac_damping"]
    assert rows["dattri-tracin"]["lams"] is None


@pytest.mark.parametrize("method,output", [("dtrak", "square"), ("trak", "loss")])
def test_traker_with_fastattrs_matrix_reproduces_ours(cache_dir, method, output):
    """Same projection matrix (fastattr's, through the trak adapter): TRAKer's D-TRAK and
    TRAK scores rank the training images as fastattr's dtrak and trak do, for every test
    sample and λ."""
    pytest.importorskip("trak")
    sys.path.insert(0, BENCH)
    try:
        import bench_lds_peers as bench
    finally:
        sys.path.remove(BENCH)
    from fastattr.diffusion import DiffusionTask
    from fastattr.digits_lds import ground_truth
    from fastattr.integrations.trak import FastattrProjector
    from fastattr.lds import spearman

    cfg = bench.TINY
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see the test above
    try:
        gt = ground_truth(cfg, cache_dir, progress=False, log=lambda *a: None)
        task = DiffusionTask(gt.model, samples_per_example=cfg.K, timesteps="uniform")
        ctx = dict(task=task, cfg=cfg, gt=gt, device=gt.device, work_dir=str(cache_dir),
                   progress=False, traker_projector=lambda p, k, dev: FastattrProjector(
                       p, k, 0, "rademacher", dev))
        ours, theirs = bench.run_fastattr(method, ctx), bench.run_traker(ctx, output)
    finally:
        torch.set_num_threads(threads)
    for split in ("val", "gen"):
        assert theirs.scores[split].shape == ours.scores[split].shape
        for i in range(len(ours.lams)):
            rho = spearman(theirs.scores[split][i].numpy(), ours.scores[split][i].numpy(),
                           axis=1)
            assert np.nanmin(rho) >= 0.99, (split, i, rho)
