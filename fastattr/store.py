"""On-disk, chunked, resumable store of the train-side state of attribution methods.

Train features ``Φ [n, k]``, residual weights, curvature factors... are computed in chunks
over the training set, often for hours. ``FeatureStore`` keeps them in a directory so that
an interrupted run resumes where it stopped, and a run with another configuration never
mixes its chunks with those of the store. Layout::

    path/
      manifest.json                  {"format": 1, "fastattr_version", "config", "created"}
      session.json                   {"world_size", "nonce", "opened"}: the run writing it now
      <name>/                        one entry ("train_features", "factors", ...)
        chunk_000000/                one complete chunk: a directory of .npy files
          <key>.npy                  one array per key (np.save, no pickle)
        chunk_000001/
        .tmp-chunk_000002-<pid>-<r>  a chunk being written (or left by a killed writer)

Atomicity: a chunk is written whole into a hidden temporary sibling directory, every file
flushed and fsync'ed, the directory fsync'ed, then renamed to its final name in one
``os.rename`` and the parent directory fsync'ed. A chunk therefore exists exactly when its
final directory does, and then it is complete: no half-written chunk is ever read. Chunk
presence is decided by the filesystem alone, never by a shared index file, so several
processes (``torch.distributed`` ranks) may write chunks of the same store at once; when two
write the same chunk, the first rename wins and the other's copy is discarded. Leftover
temporary directories of killed writers are ignored by every reader; ``clean_temp`` deletes
them.

The manifest records the ``config`` the caller describes the contents with (method,
options, model fingerprint, seeds, ...). Opening an existing store with a config that
differs raises ``StoreConfigError`` naming every differing key; a different fastattr version
alone is accepted. The manifest is written once, atomically, by whichever process creates
the store first.
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import pathlib
import re
import secrets
import shutil

import numpy as np
import torch

__all__ = ["FeatureStore", "StoreConfigError", "StoreSessionError", "FORMAT_VERSION"]

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SESSION = "session.json"
# entry names and array keys: file-name safe, not hidden, no path separators
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,199}")
_CHUNK = re.compile(r"chunk_(\d+)")
_ABSENT = object()
_RENAME_CLASH = (errno.EEXIST, errno.ENOTEMPTY)


class StoreConfigError(ValueError):
    """An existing store was made with another config than the one asked for.

    Example::

        try:
            store = FeatureStore("run/", {"method": "trak", "k": 2048})
        except StoreConfigError as err:
            print(err)   # store run was made with another config: k: store has 4096, asked 2048
    """


class StoreSessionError(RuntimeError):
    """Another run, of another world size, opened the store while this one was writing it.

    Example::

        try:
            method.fit(train_images)
        except StoreSessionError as err:
            print(err)    # ... the world size changed while the store was open ...
    """


# ------------------------------------------------------------------------------ helpers


def _fsync_dir(directory) -> None:
    """Make a directory's entries (a rename, a new file) durable. Not every platform or
    filesystem can open or fsync a directory; there the rename is as durable as it gets."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temp_name(prefix: str, kind: str = "tmp") -> str:
    # pid for the reader of a listing, random bits for uniqueness across hosts
    return f".{kind}-{prefix}-{os.getpid()}-{secrets.token_hex(4)}"


def _write_json_durably(path, body: dict) -> None:
    """``body`` as JSON in the new file ``path``, flushed and fsync'ed (the caller renames it
    into place)."""
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(body, fh, indent=2, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())


def _check_name(value, what: str) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value) or value in (MANIFEST, SESSION):
        raise ValueError(f"{what} must be a simple name (letters, digits, '_', '-', '.'; not "
                         f"starting with '.', no '/', at most 200 characters, not "
                         f"{MANIFEST!r} or {SESSION!r}), got {value!r}")
    return value


def _check_count(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{what} must be an int >= 0, got {value!r}")
    return int(value)


def _to_numpy(key: str, value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bfloat16:
            raise TypeError(f"arrays[{key!r}] is a bfloat16 tensor, which numpy cannot store: "
                            "convert it (.float()) first")
        try:
            return value.detach().cpu().numpy()
        except TypeError as err:
            raise TypeError(f"arrays[{key!r}] has dtype {value.dtype}, which numpy cannot "
                            f"store: {err}") from None
    if isinstance(value, np.ndarray):
        if value.dtype.hasobject:
            raise TypeError(f"arrays[{key!r}] is an object array; only numeric arrays are "
                            "stored (no pickle)")
        return value
    raise TypeError(f"arrays[{key!r}] must be a torch.Tensor or numpy array, got "
                    f"{type(value).__name__}")


def _check_arrays(arrays) -> dict:
    if not isinstance(arrays, dict) or not arrays:
        raise TypeError("arrays must be a non-empty dict {key: tensor or array}, got "
                        f"{arrays!r:.80}")
    return {_check_name(key, "an arrays key"): _to_numpy(key, value)
            for key, value in arrays.items()}


def _normalise_config(config) -> dict:
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    try:
        # the JSON round trip is what the manifest holds: tuples become lists, etc.
        return json.loads(json.dumps(config, allow_nan=False))
    except (TypeError, ValueError) as err:
        raise TypeError(f"config must be JSON-serialisable (no NaN/inf): {err}") from None


def _show(value) -> str:
    return "<absent>" if value is _ABSENT else json.dumps(value, sort_keys=True)


def _config_diffs(have, want, prefix: str = "") -> list:
    """'dotted.key: store has X, asked Y' for every leaf where ``have`` and ``want`` differ
    (compared as JSON text, so 1, 1.0 and true are three different values)."""
    if isinstance(have, dict) and isinstance(want, dict):
        diffs = []
        for key in sorted(set(have) | set(want), key=str):
            diffs += _config_diffs(have.get(key, _ABSENT), want.get(key, _ABSENT),
                                   f"{prefix}.{key}" if prefix else str(key))
        return diffs
    if _show(have) == _show(want):
        return []
    return [f"{prefix or '<config>'}: store has {_show(have)}, asked {_show(want)}"]


def _ranges(indices) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
    parts, start = [], None
    for pos, i in enumerate(indices):
        if start is None:
            start = i
        if pos + 1 == len(indices) or indices[pos + 1] != i + 1:
            parts.append(str(i) if i == start else f"{start}-{i}")
            start = None
    return ", ".join(parts)


# ------------------------------------------------------------------------------ the store


class FeatureStore:
    """A directory of named entries, each a set of numbered chunks of arrays, plus a
    manifest with the config they were computed with (see the module docstring).

    ``FeatureStore(path, config)`` opens ``path``, creating it and its manifest if needed;
    an existing store made with another ``config`` raises ``StoreConfigError`` listing
    every differing key by dotted path. ``config`` is a JSON-serialisable dict; ``store.config``
    is its JSON round trip (tuples read back as lists).

    Example::

        store = FeatureStore("runs/trak", {"method": "trak", "k": 2048, "seed": 0,
                                           "model": fingerprint})
        for i in store.missing("phi", num_chunks):      # resumes an interrupted run
            store.write_chunk("phi", i, {"phi": features(batches[i])})
        phi = store.concat("phi", "phi", num_chunks)    # torch [n, k]
    """

    def __init__(self, path, config: dict):
        self.path = pathlib.Path(path)
        self.config = _normalise_config(config)
        self.path.mkdir(parents=True, exist_ok=True)
        manifest = self.path / MANIFEST
        if not manifest.exists():
            self._create_manifest(manifest)
        self.manifest = self._read_manifest(manifest)
        diffs = _config_diffs(self.manifest["config"], self.config)
        if diffs:
            raise StoreConfigError(f"store {self.path} was made with another config: "
                                   + "; ".join(diffs))

    def _create_manifest(self, manifest: pathlib.Path) -> None:
        from . import __version__

        body = {"format": FORMAT_VERSION, "fastattr_version": __version__,
                "config": self.config,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat()}
        tmp = self.path / (_temp_name("manifest") + ".json")
        try:
            _write_json_durably(tmp, body)
            try:
                # link, unlike replace, never clobbers: the first creator's manifest stays
                os.link(tmp, manifest)
            except FileExistsError:
                pass                        # another process created the store first
            except OSError:
                os.replace(tmp, manifest)   # a filesystem without hard links
            _fsync_dir(self.path)
        finally:
            tmp.unlink(missing_ok=True)

    def _read_manifest(self, manifest: pathlib.Path) -> dict:
        try:
            body = json.loads(manifest.read_text(encoding="utf-8"))
        except ValueError as err:
            raise ValueError(f"{manifest} is not a fastattr store manifest: {err}") from None
        if not isinstance(body, dict) or "config" not in body:
            raise ValueError(f"{manifest} is not a fastattr store manifest")
        if body.get("format") != FORMAT_VERSION:
            raise ValueError(f"store {self.path} has format {body.get('format')!r}; this "
                             f"fastattr reads format {FORMAT_VERSION}")
        return body

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.path)!r})"

    # -------------------------------------------------------------------- chunks

    def _chunk_dir(self, name, index) -> pathlib.Path:
        name = _check_name(name, "name")
        index = _check_count(index, "index")
        return self.path / name / f"chunk_{index:06d}"

    def _write_temp(self, final: pathlib.Path, arrays: dict) -> pathlib.Path:
        """Every array of ``arrays`` written and fsync'ed into a new hidden sibling
        directory of ``final``; the caller renames it into place."""
        if not final.parent.is_dir():
            final.parent.mkdir(exist_ok=True)
            _fsync_dir(self.path)
        tmp = final.parent / _temp_name(final.name)
        tmp.mkdir()
        try:
            for key, array in arrays.items():
                with open(tmp / f"{key}.npy", "wb") as fh:
                    np.save(fh, array, allow_pickle=False)
                    fh.flush()
                    os.fsync(fh.fileno())
            _fsync_dir(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return tmp

    def has_chunk(self, name: str, index: int) -> bool:
        """Whether chunk ``index`` of entry ``name`` is complete (written and renamed in).

        Example::

            if not store.has_chunk("phi", i):
                store.write_chunk("phi", i, {"phi": features(batches[i])})
        """
        return self._chunk_dir(name, index).is_dir()

    def write_chunk(self, name: str, index: int, arrays: dict) -> None:
        """Write chunk ``index`` of entry ``name``: ``arrays`` ``{key: tensor or array}``, one
        ``{key}.npy`` each (tensors detached and copied to CPU; bfloat16 is refused, numpy has
        no such dtype). The chunk appears whole or not at all (temp dir, fsync, rename). If the
        chunk exists already (written before, or by another process meanwhile) the first one
        is kept and this call does nothing.

        Example::

            store.write_chunk("phi", 3, {"phi": phi_batch, "ids": ids})
        """
        final = self._chunk_dir(name, index)
        arrays = _check_arrays(arrays)
        if final.is_dir():
            return
        tmp = self._write_temp(final, arrays)
        try:
            os.rename(tmp, final)
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            if err.errno not in _RENAME_CLASH:
                raise
            return                          # another writer won; its chunk is complete
        _fsync_dir(final.parent)

    def read_chunk(self, name: str, index: int, mmap: bool = True) -> dict:
        """``{key: numpy array}`` of chunk ``index`` of entry ``name``, memory-mapped
        read-only (``np.memmap``) when ``mmap``. A missing chunk raises ``KeyError``.

        Example::

            phi = store.read_chunk("phi", 3)["phi"]      # np.memmap [rows, k]
        """
        directory = self._chunk_dir(name, index)
        if not directory.is_dir():
            raise KeyError(f"no chunk {name}/{index} in store {self.path}")
        return {f.name[:-len(".npy")]: np.load(f, mmap_mode="r" if mmap else None,
                                               allow_pickle=False)
                for f in sorted(directory.iterdir()) if f.name.endswith(".npy")}

    def chunks(self, name: str) -> list:
        """Sorted indices of the complete chunks of entry ``name`` (temporary directories of
        writers, running or killed, are not chunks).

        Example::

            store.chunks("phi")          # [0, 1, 2, 5]
        """
        directory = self.path / _check_name(name, "name")
        if not directory.is_dir():
            return []
        found = (_CHUNK.fullmatch(entry.name) for entry in directory.iterdir())
        return sorted(int(m.group(1)) for m in found
                      if m and (directory / m.group(0)).is_dir())

    def missing(self, name: str, num_chunks: int) -> list:
        """Indices in ``0..num_chunks-1`` with no complete chunk of entry ``name``: the work
        left to an interrupted run.

        Example::

            for i in store.missing("phi", num_chunks):
                store.write_chunk("phi", i, {"phi": features(batches[i])})
        """
        num_chunks = _check_count(num_chunks, "num_chunks")
        have = set(self.chunks(name))
        return [i for i in range(num_chunks) if i not in have]

    def concat(self, name: str, key: str, num_chunks: int) -> torch.Tensor:
        """Array ``key`` of chunks ``0..num_chunks-1`` of entry ``name`` concatenated along
        dim 0, as a torch tensor in memory. Missing chunks raise ``KeyError`` listing them;
        chunks whose ``key`` arrays disagree in dtype or trailing shape raise ``ValueError``.

        Example::

            phi = store.concat("phi", "phi", num_chunks)     # torch.float32 [n, k]
        """
        _check_name(key, "key")
        num_chunks = _check_count(num_chunks, "num_chunks")
        if num_chunks == 0:
            raise ValueError("num_chunks must be >= 1 (nothing to concatenate)")
        gaps = self.missing(name, num_chunks)
        if gaps:
            raise KeyError(f"store {self.path}: {len(gaps)} of {num_chunks} chunks of {name} "
                           f"are missing: {_ranges(gaps)}")
        parts = []
        for i in range(num_chunks):
            arrays = self.read_chunk(name, i, mmap=True)
            if key not in arrays:
                raise KeyError(f"chunk {name}/{i} in store {self.path} has no array {key!r} "
                               f"(it has {sorted(arrays)})")
            part = arrays[key]
            if part.ndim == 0 or (parts and (part.dtype, part.shape[1:])
                                  != (parts[0].dtype, parts[0].shape[1:])):
                first = parts[0] if parts else part
                raise ValueError(f"cannot concatenate {name}/{key}: chunk {i} holds "
                                 f"{part.dtype} {list(part.shape)}, chunk 0 holds "
                                 f"{first.dtype} {list(first.shape)}")
            parts.append(part)
        return torch.from_numpy(np.concatenate(parts, axis=0))

    # -------------------------------------------------------------------- single objects

    def put(self, name: str, arrays: dict) -> None:
        """Store ``arrays`` as the single object ``name`` (chunk 0 of that entry), replacing
        any previous one: the new chunk is written whole to a temp dir, the old one renamed
        away, the new one renamed in, the old one deleted. A reader never sees a half-written
        object; one reading during the swap may find it absent.

        Example::

            store.put("factors", {"A": a_cov, "G": g_cov})
        """
        final = self._chunk_dir(name, 0)
        arrays = _check_arrays(arrays)
        tmp = self._write_temp(final, arrays)
        trash = []
        try:
            while True:
                try:
                    os.rename(tmp, final)
                    break
                except OSError as err:
                    if err.errno not in _RENAME_CLASH:
                        raise
                old = final.parent / _temp_name(final.name, kind="trash")
                try:
                    os.rename(final, old)   # a concurrent put may have moved it already
                    trash.append(old)
                except FileNotFoundError:
                    pass
            _fsync_dir(final.parent)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            for old in trash:
                shutil.rmtree(old, ignore_errors=True)

    def get(self, name: str, mmap: bool = False) -> dict | None:
        """The single object ``name`` stored by ``put`` as ``{key: numpy array}``, or
        ``None`` when absent.

        Example::

            factors = store.get("factors")
            if factors is None:
                store.put("factors", fit())
        """
        if not self.has_chunk(name, 0):
            return None
        try:
            return self.read_chunk(name, 0, mmap=mmap)
        except (KeyError, FileNotFoundError):
            return None                     # moved away by a concurrent put

    # -------------------------------------------------------------------- sessions

    def open_session(self, world_size: int, nonce: str) -> None:
        """Record that a run of ``world_size`` processes (``nonce`` names it) is writing the
        store now: ``session.json``, replaced atomically. A later launch (after a crash,
        with any world size) replaces it; ``check_session`` lets a running pass notice that.

        Example::

            store.open_session(world_size=2, nonce="3f2a...")
        """
        world_size = _check_count(world_size, "world_size")
        body = {"world_size": world_size, "nonce": str(nonce),
                "opened": datetime.datetime.now(datetime.timezone.utc).isoformat()}
        tmp = self.path / (_temp_name("session") + ".json")
        try:
            _write_json_durably(tmp, body)
            os.replace(tmp, self.path / SESSION)
            _fsync_dir(self.path)
        finally:
            tmp.unlink(missing_ok=True)

    def session(self) -> dict | None:
        """The last recorded session ``{"world_size", "nonce", "opened"}``, or None.

        Example::

            store.session()["world_size"]
        """
        try:
            return json.loads((self.path / SESSION).read_text(encoding="utf-8"))
        except (FileNotFoundError, ValueError):
            return None

    def check_session(self, world_size: int, nonce: str) -> None:
        """Raise ``StoreSessionError`` when another launch of another world size has opened
        the store since this run's ``open_session`` (two jobs writing one store, or a
        re-launch while this one still runs). A session of the same world size replacing
        ours is tolerated: chunks are written whole and the first rename wins, so two runs of
        one config cannot corrupt each other.

        Example::

            store.check_session(2, nonce)      # at the end of a pass
        """
        seen = self.session()
        if seen is not None and seen.get("nonce") != nonce \
                and seen.get("world_size") != world_size:
            raise StoreSessionError(
                f"store {self.path}: the world size changed while the store was open: this "
                f"run has {world_size} process(es), but a run of {seen.get('world_size')} "
                f"opened the store at {seen.get('opened')} and is writing it. Run one job "
                "per store; after a crash, re-launch once the old job has stopped")

    # -------------------------------------------------------------------- housekeeping

    def clean_temp(self) -> int:
        """Delete the temporary files and directories left by killed writers (``.tmp-*`` and
        ``.trash-*`` in the store and its entries); returns how many. Call it only when no
        writer is running: it also deletes the temp dir of a chunk being written.

        Example::

            store = FeatureStore(path, config)
            store.clean_temp()            # after a crash, before resuming
        """
        removed = 0
        for directory in [self.path] + [d for d in self.path.iterdir() if d.is_dir()
                                         and not d.name.startswith(".")]:
            for entry in directory.iterdir():
                if not entry.name.startswith((".tmp-", ".trash-")):
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
                removed += 1
        return removed
