"""FeatureStore: round trips, resumability after a killed writer, config refusal, atomicity."""

import inspect
import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
import torch

import fastattr
from fastattr.store import FeatureStore, StoreConfigError

CONFIG = {"method": {"name": "trak", "k": 4096, "proj": "rademacher"}, "seed": 0,
          "model": {"weights_sha256": "ab12", "params": {"w": [3, 4]}}}
NUM_CHUNKS = 8


def chunk_data(i):
    """Chunk ``i`` of the resumability tests: a deterministic function of ``i``, with a
    row count that varies so concatenation offsets matter."""
    import numpy as np

    rows = 3 + i % 4
    phi = (np.arange(rows * 5, dtype=np.float32).reshape(rows, 5) + 1000 * i) / 7
    ids = np.arange(rows, dtype=np.int64) + 100 * i
    return {"phi": phi, "ids": ids}


def _expected_concat(key):
    return torch.from_numpy(np.concatenate([chunk_data(i)[key] for i in range(NUM_CHUNKS)]))


# ------------------------------------------------------------------------------ round trip


@pytest.mark.parametrize("make", [torch.randn, np.random.default_rng(0).standard_normal],
                         ids=["torch", "numpy"])
@pytest.mark.parametrize("shape", [(7, 3), (0, 5), (4,), ()])
@pytest.mark.parametrize("dtype", ["float32", "float64", "int64"])
def test_round_trip(tmp_path, make, shape, dtype):
    store = FeatureStore(tmp_path / "s", CONFIG)
    value = make(shape) * 100
    if isinstance(value, torch.Tensor):
        value = value.to(getattr(torch, dtype))
        want = value.numpy()
    else:
        value = np.asarray(value).astype(dtype)
        want = value
    store.write_chunk("phi", 2, {"x": value, "y": want[None] if want.ndim else want})
    got = store.read_chunk("phi", 2)
    assert set(got) == {"x", "y"}
    assert isinstance(got["x"], np.memmap)
    assert got["x"].dtype == np.dtype(dtype) and got["x"].shape == tuple(shape)
    np.testing.assert_array_equal(got["x"], want)
    loaded = store.read_chunk("phi", 2, mmap=False)["x"]
    assert not isinstance(loaded, np.memmap)
    np.testing.assert_array_equal(loaded, want)


def test_tensor_on_other_device_or_with_grad_is_stored(tmp_path):
    store = FeatureStore(tmp_path, CONFIG)
    t = torch.randn(4, 2, requires_grad=True)
    store.write_chunk("phi", 0, {"phi": t * 2})
    np.testing.assert_array_equal(store.read_chunk("phi", 0)["phi"], (t * 2).detach().numpy())


def test_concat_and_missing(tmp_path):
    store = FeatureStore(tmp_path, CONFIG)
    for i in (0, 1, 2, 5):
        store.write_chunk("phi", i, chunk_data(i))
    assert store.chunks("phi") == [0, 1, 2, 5]
    assert store.missing("phi", NUM_CHUNKS) == [3, 4, 6, 7]
    assert store.chunks("other") == [] and store.missing("other", 2) == [0, 1]
    with pytest.raises(KeyError, match=r"4 of 8 chunks of phi are missing: 3-4, 6-7"):
        store.concat("phi", "phi", NUM_CHUNKS)
    for i in store.missing("phi", NUM_CHUNKS):
        store.write_chunk("phi", i, chunk_data(i))
    for key in ("phi", "ids"):
        got = store.concat("phi", key, NUM_CHUNKS)
        assert isinstance(got, torch.Tensor)
        assert torch.equal(got, _expected_concat(key))
    assert store.concat("phi", "phi", 3).shape[0] == sum(3 + i % 4 for i in range(3))
    with pytest.raises(KeyError, match=r"chunk phi/0 .* has no array 'nope'"):
        store.concat("phi", "nope", 2)


def test_concat_refuses_mismatched_chunks(tmp_path):
    store = FeatureStore(tmp_path, CONFIG)
    store.write_chunk("phi", 0, {"phi": np.zeros((2, 3), np.float32)})
    store.write_chunk("phi", 1, {"phi": np.zeros((2, 4), np.float32)})
    with pytest.raises(ValueError, match=r"chunk 1 holds float32 \[2, 4\]"):
        store.concat("phi", "phi", 2)


# ------------------------------------------------------------------------------ atomicity


def test_leftover_temp_chunk_is_not_a_chunk(tmp_path):
    store = FeatureStore(tmp_path, CONFIG)
    for i in range(3):
        store.write_chunk("phi", i, chunk_data(i))
    # a writer killed mid-write: its temp dir holds one of two arrays, the second truncated
    tmp = tmp_path / "phi" / ".tmp-chunk_000003-4242-deadbeef"
    tmp.mkdir()
    np.save(tmp / "phi.npy", chunk_data(3)["phi"])
    (tmp / "ids.npy").write_bytes(b"\x93NUMPY\x01\x00")
    assert store.chunks("phi") == [0, 1, 2]
    assert store.missing("phi", 4) == [3]
    assert not store.has_chunk("phi", 3)
    with pytest.raises(KeyError, match=r"phi/3"):
        store.read_chunk("phi", 3)
    (tmp_path / ".tmp-manifest-4242-deadbeef.json").write_text("{")
    assert store.clean_temp() == 2
    assert not tmp.exists() and not (tmp_path / ".tmp-manifest-4242-deadbeef.json").exists()
    assert store.chunks("phi") == [0, 1, 2]
    assert store.clean_temp() == 0


_CHILD = """
import os, sys, time
from fastattr.store import FeatureStore

{chunk_data}

path, config, stall_at, num_chunks = sys.argv[1], {config!r}, int(sys.argv[2]), int(sys.argv[3])
store = FeatureStore(path, config)
real_fsync, current = os.fsync, [None]

def fsync(fd):
    real_fsync(fd)
    if current[0] == stall_at:      # first array of this chunk is on disk, the second is not
        print("stalled", flush=True)
        time.sleep(60)

os.fsync = fsync
for i in range(num_chunks):
    current[0] = i
    store.write_chunk("phi", i, chunk_data(i))
    print(i, flush=True)
"""


def _start_writer(path, stall_at, num_chunks):
    src = _CHILD.format(chunk_data=inspect.getsource(chunk_data), config=CONFIG)
    env = dict(os.environ)
    root = str(pathlib.Path(fastattr.__file__).parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(src), str(path),
                             str(stall_at), str(num_chunks)],
                            stdout=subprocess.PIPE, text=True, env=env)


def _resume_and_check(path, written):
    store = FeatureStore(path, CONFIG)
    done = store.chunks("phi")
    assert set(written) <= set(done)        # every chunk the child finished is there...
    for i in done:                          # ...and every chunk there is whole and right
        got = store.read_chunk("phi", i)
        assert set(got) == {"phi", "ids"}
        for key, want in chunk_data(i).items():
            np.testing.assert_array_equal(got[key], want)
    for i in store.missing("phi", NUM_CHUNKS):
        store.write_chunk("phi", i, chunk_data(i))
    for key in ("phi", "ids"):
        assert torch.equal(store.concat("phi", key, NUM_CHUNKS), _expected_concat(key))
    store.clean_temp()
    assert not [p for p in (path / "phi").iterdir() if p.name.startswith(".")]


def test_writer_killed_mid_chunk_resumes(tmp_path):
    """The child stalls after the first fsync of chunk 3 (one array of two written in its
    temp dir) and is SIGKILLed there: exactly chunks 0-2 exist, chunk 3 only as a temp dir."""
    path = tmp_path / "s"
    child = _start_writer(path, stall_at=3, num_chunks=NUM_CHUNKS)
    try:
        lines = [child.stdout.readline().strip() for _ in range(4)]
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
    assert lines == ["0", "1", "2", "stalled"], lines
    temps = [p for p in (path / "phi").iterdir() if p.name.startswith(".tmp-chunk_000003-")]
    assert len(temps) == 1 and [f.name for f in temps[0].iterdir()] == ["phi.npy"]
    store = FeatureStore(path, CONFIG)
    assert store.chunks("phi") == [0, 1, 2]
    with pytest.raises(KeyError):
        store.read_chunk("phi", 3)
    _resume_and_check(path, [0, 1, 2])


def test_writer_killed_at_any_moment_resumes(tmp_path):
    """Killed wherever it happens to be after its second chunk: whatever is there is whole."""
    path = tmp_path / "s"
    child = _start_writer(path, stall_at=-1, num_chunks=10 ** 6)
    try:
        written = [int(child.stdout.readline()) for _ in range(2)]
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
    assert written == [0, 1]
    _resume_and_check(path, written)


def test_write_chunk_keeps_first_put_replaces(tmp_path):
    store = FeatureStore(tmp_path, CONFIG)
    store.write_chunk("phi", 0, {"x": np.ones(3)})
    store.write_chunk("phi", 0, {"x": np.zeros(3), "y": np.zeros(1)})
    got = store.read_chunk("phi", 0)
    assert list(got) == ["x"] and np.all(got["x"] == 1)

    assert store.get("factors") is None
    store.put("factors", {"A": torch.eye(3), "G": torch.full((2, 2), 2.0)})
    got = store.get("factors")
    assert not isinstance(got["A"], np.memmap) and isinstance(store.get("factors", True)["A"],
                                                             np.memmap)
    np.testing.assert_array_equal(got["A"], np.eye(3, dtype=np.float32))
    store.put("factors", {"A": torch.zeros(2)})
    got = store.get("factors")
    assert list(got) == ["A"] and np.all(got["A"] == 0) and got["A"].shape == (2,)
    assert [p.name for p in (tmp_path / "factors").iterdir()] == ["chunk_000000"]


def test_concurrent_writers_of_one_chunk(tmp_path):
    """Threads racing on the same chunks (and on put): every chunk ends up whole, written by
    one of them, and no temp or trash directory is left."""
    store = FeatureStore(tmp_path, CONFIG)
    barrier = threading.Barrier(6)
    errors = []

    def work(w):
        try:
            barrier.wait()
            for i in range(4):
                store.write_chunk("phi", i, {"x": np.full(1000, w, np.int64)})
                store.put("obj", {"x": np.full(1000, w, np.int64)})
        except BaseException as err:  # noqa: BLE001 -- reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i in range(4):
        x = store.read_chunk("phi", i)["x"]
        assert x[0] in range(6) and np.all(x == x[0])
    x = store.get("obj")["x"]
    assert x[0] in range(6) and np.all(x == x[0])
    assert not [p for d in ("phi", "obj") for p in (tmp_path / d).iterdir()
                if p.name.startswith(".")]


# ------------------------------------------------------------------------------ config


def test_manifest_contents(tmp_path):
    FeatureStore(tmp_path, CONFIG)
    body = json.loads((tmp_path / "manifest.json").read_text())
    assert body["format"] == 1 and body["fastattr_version"] == fastattr.__version__
    assert body["config"] == CONFIG and body["created"][:2] == "20"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_reopen_same_config_keeps_manifest(tmp_path):
    first = FeatureStore(tmp_path, CONFIG)
    first.write_chunk("phi", 0, chunk_data(0))
    before = (tmp_path / "manifest.json").read_bytes()
    # key order and tuples vs lists do not matter: the config is compared as JSON
    same = dict(reversed(list(CONFIG.items())))
    same["model"] = {"params": {"w": (3, 4)}, "weights_sha256": "ab12"}
    second = FeatureStore(str(tmp_path), same)
    assert (tmp_path / "manifest.json").read_bytes() == before
    assert second.config == CONFIG and second.chunks("phi") == [0]


def test_other_version_alone_is_accepted(tmp_path):
    FeatureStore(tmp_path, CONFIG)
    body = json.loads((tmp_path / "manifest.json").read_text())
    body["fastattr_version"] = "0.0.1"
    (tmp_path / "manifest.json").write_text(json.dumps(body))
    FeatureStore(tmp_path, CONFIG)


def test_other_config_is_refused_naming_each_difference(tmp_path):
    FeatureStore(tmp_path, CONFIG)
    other = json.loads(json.dumps(CONFIG))
    other["method"]["k"] = 2048
    other["seed"] = 1
    other["model"]["params"]["w"] = [3, 5]
    other["timesteps"] = [10, 20]
    del other["method"]["proj"]
    with pytest.raises(StoreConfigError) as info:
        FeatureStore(tmp_path, other)
    msg = str(info.value)
    assert msg.startswith(f"store {tmp_path} was made with another config: ")
    for part in ("method.k: store has 4096, asked 2048",
                 'method.proj: store has "rademacher", asked <absent>',
                 "model.params.w: store has [3, 4], asked [3, 5]",
                 "seed: store has 0, asked 1",
                 "timesteps: store has <absent>, asked [10, 20]"):
        assert part in msg, (part, msg)
    assert msg.count(": store has") == 5
    assert "name" not in msg and "weights_sha256" not in msg
    # types count: true is not 1, 1.0 is not 1
    for value in (True, 0.0):
        with pytest.raises(StoreConfigError, match="seed: store has 0, asked"):
            FeatureStore(tmp_path, {**CONFIG, "seed": value})
    assert issubclass(StoreConfigError, ValueError)


def test_concurrent_creation(tmp_path):
    path = tmp_path / "new" / "store"
    barrier = threading.Barrier(8)
    stores, errors = [], []

    def open_store():
        try:
            barrier.wait()
            stores.append(FeatureStore(path, CONFIG))
        except BaseException as err:  # noqa: BLE001 -- reported below
            errors.append(err)

    threads = [threading.Thread(target=open_store) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(stores) == 8
    created = {s.manifest["created"] for s in stores}
    assert created == {json.loads((path / "manifest.json").read_text())["created"]}
    assert [p.name for p in path.iterdir()] == ["manifest.json"]


# ------------------------------------------------------------------------------ bad input


def test_bad_input(tmp_path):
    store = FeatureStore(tmp_path, CONFIG)
    ok = {"x": np.zeros(2)}
    for name in ("a/b", ".x", "", "manifest.json", 3, "a b"):
        with pytest.raises(ValueError, match="name must be a simple name"):
            store.write_chunk(name, 0, ok)
    with pytest.raises(ValueError, match="name must be a simple name"):
        store.chunks("../x")
    for index in (-1, 1.0, True, "0"):
        with pytest.raises(ValueError, match="index must be an int >= 0"):
            store.write_chunk("phi", index, ok)
    with pytest.raises(ValueError, match="an arrays key must be a simple name"):
        store.write_chunk("phi", 0, {"a/b": np.zeros(2)})
    with pytest.raises(TypeError, match=r"arrays\['x'\] must be a torch.Tensor or numpy "
                                        r"array, got list"):
        store.write_chunk("phi", 0, {"x": [1, 2]})
    with pytest.raises(TypeError, match=r"arrays\['x'\] is a bfloat16 tensor"):
        store.write_chunk("phi", 0, {"x": torch.zeros(2, dtype=torch.bfloat16)})
    with pytest.raises(TypeError, match=r"arrays\['x'\] is an object array"):
        store.put("obj", {"x": np.array([None, 1])})
    with pytest.raises(TypeError, match="arrays must be a non-empty dict"):
        store.write_chunk("phi", 0, {})
    with pytest.raises(ValueError, match="num_chunks must be an int >= 0"):
        store.missing("phi", -2)
    with pytest.raises(TypeError, match="config must be JSON-serialisable"):
        FeatureStore(tmp_path / "t", {"x": object()})
    with pytest.raises(TypeError, match="config must be a dict"):
        FeatureStore(tmp_path / "t", [1])
    # nothing was written by the refused calls
    assert store.chunks("phi") == [] and store.get("obj") is None
    assert not [p for d in tmp_path.iterdir() if d.is_dir() for p in d.iterdir()]


def test_session_records_the_world_size_and_catches_a_change(tmp_path):
    from fastattr.store import StoreSessionError

    store = FeatureStore(tmp_path, {"k": 4})
    assert store.session() is None
    store.check_session(2, "ours")                 # nothing recorded yet: fine
    store.open_session(2, "ours")
    assert store.session()["world_size"] == 2 and store.session()["nonce"] == "ours"
    store.check_session(2, "ours")
    FeatureStore(tmp_path, {"k": 4}).open_session(2, "a re-launch of the same size")
    store.check_session(2, "ours")                 # same world size: tolerated
    FeatureStore(tmp_path, {"k": 4}).open_session(3, "another job")
    with pytest.raises(StoreSessionError, match="this run has 2 process.*a run of 3 opened"):
        store.check_session(2, "ours")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "session.json"]
    with pytest.raises(ValueError, match="session.json"):
        store.write_chunk("session.json", 0, {"x": torch.ones(1)})
