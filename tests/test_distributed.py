"""torch.distributed: ``torchrun --nproc_per_node=2`` (gloo, CPU) gives the single-process
results (D-TRAK features, the kernel matrix, EK-FAC factors, D-TRAK and K-FAC influence
scores), with an uneven number of samples per rank; a rank killed mid-fit leaves a store that
a world-size-1 re-launch completes; bad setups fail clearly. The processes run
tests/_dist_worker.py."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from fastattr import distributed
from fastattr.store import FeatureStore, StoreSessionError

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WORKER = os.path.join(HERE, "_dist_worker.py")


def _env():
    # one thread per rank: two ranks with spinning OpenMP threads on 2 cores crawl
    return dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE",
                PYTHONPATH=os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")]
                                                     if p]))


def _single(out, store, *flags):
    res = subprocess.run([sys.executable, WORKER, str(out), str(store), *flags], env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return torch.load(out)


def _torchrun(out, store, *flags, nproc=2):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={nproc}", WORKER, str(out), str(store), *flags],
                          env=_env(), capture_output=True, text=True, timeout=300)


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    single = _single(tmp / "single.pt", tmp / "store1")
    res = _torchrun(tmp / "dist.pt", tmp / "store2")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return single, torch.load(tmp / "dist.pt"), tmp


def _check_equal(single, dist):
    """The acceptance tolerances: features and scores ≤ 1e-6 relative, the fp64-reduced
    kernel and factors ≤ 1e-10."""
    assert _rel(dist["features"], single["features"]) <= 1e-6
    assert _rel(dist["kernel"], single["kernel"]) <= 1e-10
    assert _rel(dist["dtrak_scores"], single["dtrak_scores"]) <= 1e-6
    assert dist["num_data"] == single["num_data"] == 26
    assert set(dist["factors"]) == set(single["factors"])
    for key, want in single["factors"].items():
        assert _rel(dist["factors"][key], want) <= 1e-10, key
    for key in ("kfac_scores", "das_scores", "tracin_exact_scores", "retrac_scores"):
        assert dist[key].shape == (4, 13), key
        assert torch.isfinite(dist[key]).all() and dist[key].abs().sum() > 0, key
        assert _rel(dist[key], single[key]) <= 1e-6, key


def test_two_ranks_equal_one_process(runs):
    single, dist, _ = runs
    # 13 images in batches of 3: rank 0 computes batches 0, 2, 4 (7 images), rank 1 1, 3 (6)
    assert single["computed"] == 5 and dist["computed"] == 3
    assert dist["features"].shape == single["features"].shape == (13, 24)
    # ΦᵀΦ, A, G, Λ: fp64 sums over the ranks; the eigenbases: rank 0's of the reduced A, G
    _check_equal(single, dist)


def test_a_group_of_one_rank_equals_no_group(runs, tmp_path):
    # the collectives run trivially: the path a one-GPU NCCL run takes
    single, _, _ = runs
    res = _torchrun(tmp_path / "one.pt", tmp_path / "store", nproc=1)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    one = torch.load(tmp_path / "one.pt")
    assert one["computed"] == 5
    _check_equal(single, one)


@pytest.mark.cuda
def test_nccl_on_one_gpu_equals_one_process(tmp_path):
    single = _single(tmp_path / "single.pt", tmp_path / "store1", "--cuda")
    res = _torchrun(tmp_path / "nccl.pt", tmp_path / "store2", "--cuda", nproc=1)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    _check_equal(single, torch.load(tmp_path / "nccl.pt"))


def test_the_store_written_by_two_ranks_reads_as_one_process_writes_it(runs):
    import json

    _, _, tmp = runs
    config = json.loads((tmp / "store1" / "manifest.json").read_text())["config"]
    one, two = FeatureStore(tmp / "store1", config), FeatureStore(tmp / "store2", config)
    assert one.chunks("features_0") == two.chunks("features_0") == list(range(5))
    for i in range(5):
        a, b = one.read_chunk("features_0", i), two.read_chunk("features_0", i)
        assert sorted(a) == sorted(b) == ["features", "ids"]
        assert (a["ids"] == b["ids"]).all()
        assert _rel(torch.from_numpy(b["features"].copy()),
                    torch.from_numpy(a["features"].copy())) <= 1e-6
    assert two.session()["world_size"] == 2 and one.session()["world_size"] == 1


def test_killed_rank_resumes_with_world_size_one(runs, tmp_path):
    single, _, _ = runs
    store = tmp_path / "store"
    res = _torchrun(tmp_path / "killed.pt", store, "--die-after", "1", "--only-dtrak")
    assert res.returncode != 0                     # rank 1 died in its second batch
    assert not (tmp_path / "killed.pt").exists()
    left = sorted(os.listdir(store / "features_0"))
    done = [n for n in left if n.startswith("chunk_")]
    assert 1 <= len(done) < 5, left
    resumed = _single(tmp_path / "resumed.pt", store, "--only-dtrak")
    assert resumed["computed"] == 5 - len(done)    # only the missing chunks
    for key in ("features", "kernel", "dtrak_scores"):
        assert _rel(resumed[key], single[key]) <= 1e-6, key


@pytest.mark.parametrize("flag,message", [
    ("--store-per-rank", "is not shared between ranks"),
    ("--k-per-rank", "options.k: rank 0 has 24, rank 1 has 32"),
])
def test_bad_setups_fail_clearly(tmp_path, flag, message):
    res = _torchrun(tmp_path / "bad.pt", tmp_path / "store", flag, "--only-dtrak")
    assert res.returncode != 0
    out = res.stdout + res.stderr
    assert "rank 0 error: DistributedSetupError: " in out and message in out, out[-3000:]
    assert not (tmp_path / "bad.pt").exists()


def test_world_size_changing_while_the_store_is_open(tmp_path):
    from _models import tiny_images, tiny_unet

    from fastattr.diffusion import DiffusionTask
    from fastattr.methods import DTRAK

    task = DiffusionTask(tiny_unet(0), samples_per_example=2)
    features = task.features
    calls = [0]

    def another_launch(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 2:   # meanwhile a 2-process job opens the same store
            FeatureStore(tmp_path, dtrak.store_config()).open_session(2, "other")
        return features(*args, **kwargs)

    task.features = another_launch
    dtrak = DTRAK(task, k=16, store=tmp_path, batch_size=2, progress=False)
    with pytest.raises(StoreSessionError, match="world size changed while the store was open: "
                       "this run has 1 process"):
        dtrak.fit(tiny_images(6))
    # the chunks it wrote are complete, and a later run (the other job gone) resumes
    task.features = features
    again = DTRAK(task, k=16, store=tmp_path, batch_size=2, progress=False).fit(tiny_images(6))
    fresh = DTRAK(task, k=16, batch_size=2, progress=False).fit(tiny_images(6))
    assert torch.equal(again.kernels[0].rotated, fresh.kernels[0].rotated)


def test_retraining_jobs_are_shared_out_by_rank(tmp_path):
    # 7 subset models on 2 ranks (4 + 3); one of them already cached from an earlier run
    from fastattr.lds import Retrainer

    sys.path.insert(0, HERE)
    try:
        import _dist_worker
    finally:
        sys.path.remove(HERE)
    early = Retrainer(_dist_worker.train_fn, tmp_path / "cache", n_train=20, num_subsets=7,
                      config=_dist_worker.CONFIG,
                      progress=False)
    early.train([early.subset_job(2, 0)])
    res = _torchrun(tmp_path / "out.pt", tmp_path / "cache", "--retrain")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt")
    names = [early.subset_job_name(m, 0) for m in range(7)]
    assert out["trained"] == [n for n in names if n != names[2]]   # every rank returns all
    ranks = [int(out["models"][n]["rank"]) for n in names]
    assert ranks[2] == -1                                 # the cached one, not retrained
    assert sorted(ranks[:2] + ranks[3:]) == [0, 0, 0, 1, 1, 1]  # round robin over the 6 left
    for m, name in enumerate(names):
        job = early.subset_job(m, 0)
        assert out["models"][name]["sum"].tolist() == [float(job.indices.sum()), 0.0]


def test_cli_demo_distributed_equals_one_process(tmp_path):
    args = ["demo", "--n-train", "40", "--steps", "5", "--samples", "2", "--k", "32",
            "--no-progress"]
    one = subprocess.run([sys.executable, "-m", "fastattr.cli", *args, "--cache-dir",
                          str(tmp_path / "c1"), "--out", str(tmp_path / "one.png")],
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node=2", "-m", "fastattr.cli", *args, "--distributed",
                          "--cache-dir", str(tmp_path / "c2"), "--out", str(tmp_path / "two.png")],
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]

    def proponents(text):
        return [line for line in text.splitlines() if "proponents" in line]

    # one report (rank 0's), the same proponents and scores, the same picture
    assert len(proponents(two.stdout)) == len(proponents(one.stdout)) == 2 * 2 + 2
    assert proponents(two.stdout) == proponents(one.stdout)
    assert (tmp_path / "one.png").read_bytes() == (tmp_path / "two.png").read_bytes()
    bad = subprocess.run([sys.executable, "-m", "fastattr.cli", *args, "--distributed"],
                         env={k: v for k, v in _env().items() if k not in ("RANK", "WORLD_SIZE")},
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "--distributed needs torchrun's environment" in bad.stderr


def test_helpers_without_a_group():
    assert distributed.current() is None and distributed.is_main()
    assert [distributed.owner(i, None) for i in range(3)] == [0, 0, 0]
    group = distributed.Group(1, 3, "gloo")
    assert [distributed.owner(i, group) for i in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    # uneven slices cover range(n) once, sizes differing by at most one
    for n in (0, 1, 5, 7, 13):
        parts = [distributed.rank_slice(n, distributed.Group(r, 3, "gloo")) for r in range(3)]
        covered = [i for p in parts for i in range(n)[p]]
        assert covered == list(range(n))
        sizes = [len(range(n)[p]) for p in parts]
        assert max(sizes) - min(sizes) <= 1
    x = torch.randn(4, 3)
    assert torch.equal(distributed.gather_columns(x, None), x)
    assert distributed.all_reduce(x, None).dtype == torch.float64


def test_init_from_env_names_what_is_missing(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(distributed.DistributedSetupError, match="RANK, WORLD_SIZE, MASTER_ADDR"):
        distributed.init_from_env()


@pytest.fixture
def one_rank_group(tmp_path):
    """An in-process gloo group of world size 1 (the collectives run trivially)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0,
                            world_size=1)
    try:
        yield distributed.current()
    finally:
        dist.destroy_process_group()


def test_ggn_model_needs_datum_ids_under_a_group(one_rank_group):
    from fastattr.curvature import fit_factors, regression_loss

    assert one_rank_group == distributed.Group(0, 1, "gloo")
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    x, y = torch.randn(6, 5), torch.randn(6, 3)
    with pytest.raises(ValueError, match="under torch.distributed the loss must return Rows "
                       "with ids"):
        fit_factors(mlp, [(x, y)], regression_loss, progress=False)
    # with ids (or the empirical Fisher, which draws nothing) it fits, as without a group
    with_ids = fit_factors(mlp, [(x, y, torch.arange(6))], regression_loss, progress=False)
    loss_ggn = fit_factors(mlp, [(x, y)], regression_loss, ggn="loss", progress=False)
    assert with_ids.num_data == loss_ggn.num_data == 6
