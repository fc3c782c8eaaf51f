"""The stat cache: a file's key is reused only while its size, mtime and inode are
unchanged and the mtime is old enough to trust; new keys and removals survive a save."""

from __future__ import annotations

import os
import time

from flow.keys import file_key
from flow.sources import StatCache, file_keys, scan_folder
from store import open_store

OLD = time.time() - 3600


def _write(path, data: bytes, mtime: float = OLD) -> None:
    path.write_bytes(data)
    os.utime(path, (mtime, mtime))


def _keys(root, store):
    rels, stats = scan_folder(root, include=("*.bin",))
    cache = StatCache(store, str(root))
    keys, errors, hashed = file_keys(str(root), rels, stats, cache)
    cache.save()
    assert not errors
    return dict(zip(rels, keys, strict=True)), hashed


def test_stat_cache_reuses_only_unchanged_files(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    store = open_store(tmp_path / "store")
    for i in range(5):
        _write(root / f"f{i}.bin", bytes([i]) * 100)
    first, hashed = _keys(root, store)
    assert hashed == 5
    assert all(first[f"f{i}.bin"] == bytes(file_key(root / f"f{i}.bin")) for i in range(5))

    again, hashed = _keys(root, store)
    assert hashed == 0 and again == first

    _write(root / "f1.bin", b"x" * 100, OLD + 10)  # same size, new content and mtime
    replaced = root / "tmp.bin"
    _write(replaced, b"y" * 100)
    os.utime(replaced, (OLD, OLD))
    os.replace(replaced, root / "f2.bin")  # same size and mtime, another inode
    _write(root / "f3.bin", b"z" * 100, time.time())  # too recent to trust
    (root / "f4.bin").unlink()
    _write(root / "f5.bin", b"new")
    now, hashed = _keys(root, store)
    assert hashed == 4  # f1, f2, f3 (recent) and f5
    assert set(now) == {"f0.bin", "f1.bin", "f2.bin", "f3.bin", "f5.bin"}
    for rel, k in now.items():
        assert k == bytes(file_key(root / rel)), rel
    assert now["f0.bin"] == first["f0.bin"] and now["f1.bin"] != first["f1.bin"]

    # the merged cache was saved: only the recent file is hashed again, f4 is gone
    later, hashed = _keys(root, store)
    assert hashed == 1 and later == now
    cache = StatCache(store, str(root))
    assert "f4.bin" not in cache._paths and len(cache._paths) == 5


def test_a_damaged_stat_cache_starts_over(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    store = open_store(tmp_path / "store")
    _write(root / "a.bin", b"a")
    _keys(root, store)
    store.put(StatCache(store, str(root)).path, b"not an npz")
    keys, hashed = _keys(root, store)
    assert hashed == 1 and keys["a.bin"] == bytes(file_key(root / "a.bin"))
