"""The stat cache: a file's key is reused only while its size, mtime and inode are
unchanged and the mtime is old enough to trust; new keys and removals survive a save."""

from __future__ import annotations

import os
import time

import pytest

from engine.scan import DEFAULT_INCLUDE, StatCache, file_keys, scan_folder
from flow.keys import file_key
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


def _reference_scan(root, include, exclude=(), extensionless=False):
    """The scan as first written (one entry at a time): the new one must agree."""
    from engine.scan import FileStat, _matcher

    root = os.path.realpath(root)
    wanted = _matcher(include, exclude, extensionless)
    found, stack = [], [""]
    while stack:
        rel_dir = stack.pop()
        for e in os.scandir(os.path.join(root, rel_dir) if rel_dir else root):
            name = e.name
            if name[0] == ".":
                continue
            rel = f"{rel_dir}/{name}" if rel_dir else name
            try:
                if e.is_symlink():
                    target = os.path.realpath(e.path)
                    if not (target == root or target.startswith(root + os.sep)):
                        continue
                if e.is_dir():
                    stack.append(rel)
                    continue
                if not wanted(name, rel) or not e.is_file():
                    continue
                st = e.stat()
            except OSError:
                continue
            found.append((rel, FileStat(st.st_size, st.st_mtime_ns, st.st_ino)))
    found.sort()
    return [f[0] for f in found], [f[1] for f in found]


def _tricky_tree(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    for d in ("a", "a/b", "a-b", ".hidden", "c"):
        (root / d).mkdir(parents=True)
    outside.mkdir()
    for rel in (
        "x.png",
        "x.PNG",
        "a.dcm",
        "a/y.dcm",
        "a/b/z.jpg",
        "a-b/w.png",
        "a0.png",
        "IM0001",
        "a/IM0002",
        "notes.txt",
        ".secret.png",
        ".hidden/h.png",
        "c/keep.dcm",
        "c/skip.dcm",
    ):
        (root / rel).write_bytes(rel.encode())
    (outside / "o.png").write_bytes(b"o")
    (root / "in.png").symlink_to(root / "x.png")  # inside the root: followed
    (root / "c2").symlink_to(root / "c")  # a folder inside: followed
    (root / "out.png").symlink_to(outside / "o.png")  # outside: never followed
    (root / "outdir").symlink_to(outside)
    (root / "dangling.png").symlink_to(root / "nothing.png")
    os.mkfifo(root / "pipe.png")  # not a regular file
    return root


_CASES = [
    {"include": DEFAULT_INCLUDE},
    {"include": ("*.png",)},
    {"include": ("*.dcm", "a/*"), "exclude": ("c/skip.*",)},
    {"include": ("*.dcm",), "extensionless": True},
    {"include": ("x.*", "*.jp?g")},
    {"include": ("*.png",), "exclude": ("a*",)},
]


def test_scan_agrees_with_the_one_entry_at_a_time_scan(tmp_path):
    root = _tricky_tree(tmp_path)
    for case in _CASES:
        got = scan_folder(root, **case)
        assert got == _reference_scan(root, **case), case
        assert got[0] == sorted(got[0])
    rels, _ = scan_folder(root, include=("*.png",))
    assert "in.png" in rels and "out.png" not in rels and "pipe.png" not in rels
    assert ".secret.png" not in rels and "a-b/w.png" in rels


def test_parts_of_a_scan_agree_with_the_whole(tmp_path):
    """What ``flow watch`` rescans when notified: a sub-folder (``under=``) or one
    file (``stat_file``) is listed exactly as the whole scan lists it."""
    from engine.scan import stat_file

    root = _tricky_tree(tmp_path)
    on_disk = [
        os.path.relpath(os.path.join(d, n), root).replace(os.sep, "/")
        for d, dirs, files in os.walk(root, followlinks=False)
        for n in dirs + files
    ] + ["nothing/here.png", "a/nothing.dcm", "c2/keep.dcm", "outdir/o.png"]
    for case in _CASES:
        rels, stats = scan_folder(root, **case)
        whole = dict(zip(rels, stats))
        for d in ("a", "a/b", "c", "c2", ".hidden", "outdir", "nope", "x.png"):
            got = scan_folder(root, under=d, **case)
            assert got == (
                [r for r in rels if r.startswith(d + "/")],
                [whole[r] for r in rels if r.startswith(d + "/")],
            ), (case, d)
        for rel in on_disk:
            assert stat_file(root, rel, **case) == whole.get(rel), (case, rel)


def test_the_stat_cache_fast_path_sees_a_changed_file(tmp_path):
    """Same file list as the cache: compared row by row, still by size/mtime/inode."""
    store = open_store(tmp_path / "store")
    root = tmp_path / "data"
    root.mkdir()
    for i in range(5):
        _write(root / f"f{i}.bin", bytes([i]) * 10)
    keys, hashed = _keys(root, store)
    assert hashed == 5
    _write(root / "f3.bin", b"changed!!!", OLD + 10)  # same size, another mtime
    keys2, hashed = _keys(root, store)
    assert hashed == 1 and keys2["f3.bin"] == file_key(root / "f3.bin") != keys["f3.bin"]
    assert {k: v for k, v in keys2.items() if k != "f3.bin"} == {
        k: v for k, v in keys.items() if k != "f3.bin"
    }
    assert _keys(root, store) == (keys2, 0)


def test_file_refs_are_made_when_read():
    from engine.refs import FileRef
    from engine.scan import FileRefs

    refs = FileRefs(["a.png", "b/c.dcm"], [b"k1", None], "/data")
    assert len(refs) == 2
    assert refs[1] == FileRef("/data/b/c.dcm", None) and refs[-2] == FileRef("/data/a.png", b"k1")
    assert refs[1].path == "/data/b/c.dcm" and refs[-2].key == b"k1"
    assert refs[0:2] == [refs[0], refs[1]] and list(refs) == [refs[0], refs[1]]
    assert FileRefs(["/x/a.png"], [b"k"])[0] == FileRef("/x/a.png", b"k")  # full paths
    with pytest.raises(ValueError, match="1 paths for 2 keys"):
        FileRefs(["a"], [b"k", b"l"])


def test_paused_gc_restores_the_collector_state():
    import gc

    from engine.scan import paused_gc

    assert gc.isenabled()
    with paused_gc():
        assert not gc.isenabled()
        with paused_gc():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the inner one restores "off"
    assert gc.isenabled()
    with pytest.raises(RuntimeError), paused_gc():
        raise RuntimeError("boom")
    assert gc.isenabled()


def test_a_file_gone_under_the_scan_is_left_out(tmp_path, monkeypatch):
    """A file removed between the folder's listing and its stat (a copy tool's temp
    file, a study being moved): not listed, and the scan goes on."""
    import engine.scan as fs

    for name in ("a.png", "b.png", "c.png"):
        _write(tmp_path / name, name.encode())
    real_scandir = os.scandir

    class Vanishing:
        """Lists what the folder held; ``b.png`` is gone by the time it is read."""

        def __init__(self, path):
            self._it = real_scandir(path)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._it.close()

        def __iter__(self):
            for e in self._it:
                if e.name == "b.png":
                    os.unlink(e.path)
                yield e

    monkeypatch.setattr(fs.os, "scandir", Vanishing)
    rels, stats = scan_folder(tmp_path, include=("*.png",))
    assert rels == ["a.png", "c.png"] and [s.size for s in stats] == [5, 5]
