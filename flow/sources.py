"""Source files: scanning folders and hashing each unchanged file only once.

A source file's key is the BLAKE3 hash of its bytes (:func:`flow.keys.file_key`).
Hashing a large archive at every build would dominate a no-op rebuild, so
keys are remembered in a **stat cache** keyed by (path, size, mtime_ns,
inode): a file whose stat is unchanged is not read again.  The cache lives in
the store (``cache/stat/<host>-<root digest>.npz``) and is only a cache: losing
it costs one re-hash, never a wrong key, because any change to a file's size,
mtime or inode misses it.  (A same-size rewrite within one mtime tick on a
filesystem with coarse timestamps is the classic blind spot; files modified
less than two seconds before the scan are therefore always re-hashed.)

Scanning is one recursive ``os.scandir`` walk; hidden files and folders
(``.name``) are skipped, and symbolic links are followed only when they
point inside the source root.
"""

from __future__ import annotations

import fnmatch
import io
import os
import re
import socket
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np

from flow.keys import KEY_SIZE, file_key, key

DEFAULT_INCLUDE = (
    "*.dcm",
    "*.dicom",
    "*.png",
    "*.jpg",
    "*.jpeg",
    "*.DCM",
    "*.PNG",
    "*.JPG",
    "*.JPEG",
    "*.ima",
    "*.IMA",
)
_RECENT_NS = 2_000_000_000


class FileStat(NamedTuple):
    size: int
    mtime_ns: int
    ino: int


def scan_folder(
    root: str | os.PathLike,
    include: Sequence[str] = DEFAULT_INCLUDE,
    exclude: Sequence[str] = (),
    extensionless: bool = False,
) -> tuple[list[str], list[FileStat]]:
    """Relative paths (``/``-separated, sorted) and stats of the files under ``root``.

    ``include``/``exclude`` are glob patterns matched against the file name
    and the relative path; ``extensionless=True`` also takes files without an
    extension (DICOM archives often name files ``IM0001``).
    """
    root = os.path.realpath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"source folder {root} does not exist or is not a folder")
    wanted = _matcher(include, exclude, extensionless)
    found: list[tuple[str, FileStat]] = []
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        full_dir = os.path.join(root, rel_dir) if rel_dir else root
        try:
            entries = list(os.scandir(full_dir))
        except OSError:
            continue
        for e in entries:
            name = e.name
            if name[0] == ".":
                continue
            rel = f"{rel_dir}/{name}" if rel_dir else name
            try:
                if e.is_symlink():
                    target = os.path.realpath(e.path)
                    if not (target == root or target.startswith(root + os.sep)):
                        continue  # never follow a link out of the source root
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


def _matcher(include: Sequence[str], exclude: Sequence[str], bare: bool):
    """A fast ``(name, rel) -> bool`` for glob patterns (``*.ext`` by suffix)."""
    suffixes = tuple(p[1:] for p in include if p.startswith("*.") and not _magic(p[2:]))
    globs = [p for p in include if not (p.startswith("*.") and not _magic(p[2:]))]
    inc = re.compile("|".join(fnmatch.translate(p) for p in globs)) if globs else None
    exc = re.compile("|".join(fnmatch.translate(p) for p in exclude)) if exclude else None

    def wanted(name: str, rel: str) -> bool:
        if exc is not None and (exc.match(name) or exc.match(rel)):
            return False
        if name.endswith(suffixes) or (bare and "." not in name):
            return True
        return inc is not None and bool(inc.match(name) or inc.match(rel))

    return wanted


def _magic(s: str) -> bool:
    return any(ch in s for ch in "*?[")


class StatCache:
    """Remembered file keys of one source root, keyed by relative path and stat."""

    def __init__(self, store, root: str):
        self.store = store
        self.root = os.path.realpath(root)
        digest = key(("stat-cache", socket.gethostname(), self.root)).hex()[:16]
        self.path = f"cache/stat/{digest}.npz"
        self._entries: dict[str, tuple[int, int, int, bytes]] = {}
        self._dirty = False
        self._load()

    def _load(self) -> None:
        try:
            data = self.store.get(self.path)
        except (FileNotFoundError, OSError):
            return
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                paths = z["paths"].tolist()
                meta = z["meta"]
                keys = z["keys"].reshape(-1, KEY_SIZE)
        except (ValueError, KeyError, OSError):
            return  # unreadable cache: start over
        raw = keys.tobytes()
        self._entries = {
            p: (int(m[0]), int(m[1]), int(m[2]), raw[i * KEY_SIZE : (i + 1) * KEY_SIZE])
            for i, (p, m) in enumerate(zip(paths, meta.tolist()))
        }

    def lookup(self, rel: str, st: FileStat, now_ns: int) -> bytes | None:
        e = self._entries.get(rel)
        if e is None or e[0] != st.size or e[1] != st.mtime_ns or e[2] != st.ino:
            return None
        if now_ns - st.mtime_ns < _RECENT_NS:
            return None  # too recent to trust a coarse mtime
        return e[3]

    def update(self, rel: str, st: FileStat, k: bytes) -> None:
        self._entries[rel] = (st.size, st.mtime_ns, st.ino, bytes(k))
        self._dirty = True

    def prune(self, keep: Iterable[str]) -> None:
        keep = set(keep)
        gone = [p for p in self._entries if p not in keep]
        for p in gone:
            del self._entries[p]
        self._dirty = self._dirty or bool(gone)

    def save(self) -> None:
        if not self._dirty:
            return
        paths = list(self._entries)
        meta = np.array([self._entries[p][:3] for p in paths], dtype=np.int64).reshape(-1, 3)
        keys = np.frombuffer(b"".join(self._entries[p][3] for p in paths), dtype=np.uint8)
        buf = io.BytesIO()
        np.savez(buf, paths=np.array(paths, dtype=str), meta=meta, keys=keys)
        try:
            self.store.put(self.path, buf.getvalue())
            self._dirty = False
        except OSError:
            pass  # only a cache


def file_keys(
    root: str,
    rels: Sequence[str],
    stats: Sequence[FileStat],
    cache: StatCache | None,
    threads: int = 4,
) -> tuple[list[bytes | None], dict[int, str], int]:
    """Keys of the files (from the cache, or hashed in parallel threads).

    Returns the keys (None where a file could not be read), the reasons for
    those, and how many files were hashed.
    """
    now = time.time_ns()
    keys: list[bytes | None] = [None] * len(rels)
    todo = []
    for i, (rel, st) in enumerate(zip(rels, stats)):
        k = cache.lookup(rel, st, now) if cache is not None else None
        if k is None:
            todo.append(i)
        else:
            keys[i] = k
    errors: dict[int, str] = {}

    def one(i: int) -> tuple[int, bytes | None, str | None]:
        path = os.path.join(root, rels[i])
        try:
            return i, bytes(file_key(path)), None
        except OSError as e:
            return i, None, f"cannot read {path}: {e.strerror or e}"

    if todo:
        with ThreadPoolExecutor(max(1, threads)) as ex:
            for i, k, err in ex.map(one, todo):
                keys[i] = k
                if err:
                    errors[i] = err
                elif cache is not None:
                    cache.update(rels[i], stats[i], k)  # type: ignore[arg-type]
    if cache is not None:
        cache.prune(rels)
    return keys, errors, len(todo)
