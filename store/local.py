"""A store in a local (or shared POSIX) folder.

Documents are published by writing ``<root>/tmp/<random>`` and renaming it
over the destination (``os.replace`` is atomic on POSIX within one
filesystem); ``put_if_absent`` uses ``os.link``, which fails if the
destination exists, so exactly one of two racing writers wins.  Arrays go
through ``zarr.storage.LocalStore`` (or :meth:`LocalStore.put_new`).

Published documents are fsynced before the rename, except under ``cache/``:
caches are disposable (a torn one after a power cut reads as damaged and is
rebuilt), and a build rewrites several of them, ~2-5 ms each.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from store.abc import Entry, Store, check_path


class LocalStore(Store):
    supports_conditional = True
    supports_local_paths = True

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().absolute()
        self.url = str(self.root)
        self._tmp = self.root / "tmp"

    def _path(self, path: str) -> Path:
        return self.root / check_path(path) if path else self.root

    def _tmpfile(self) -> Path:
        self._tmp.mkdir(parents=True, exist_ok=True)
        return self._tmp / f"{uuid.uuid4().hex}.part"

    def get(self, path: str) -> bytes:
        with open(self._path(path), "rb") as fh:
            return fh.read()

    def _write_tmp(self, data: bytes, durable: bool = True) -> Path:
        tmp = self._tmpfile()
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                if durable:
                    fh.flush()
                    os.fsync(fh.fileno())
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()  # a full disk must not leave half a file behind
            raise
        return tmp

    def put(self, path: str, data: bytes) -> None:
        dest = self._path(path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._write_tmp(data, durable=not path.startswith("cache/"))
        try:
            os.replace(tmp, dest)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise

    def put_new(self, files: dict[str, bytes]) -> None:
        # written in place, as zarr's LocalStore writes chunks: nothing reads
        # these paths before the manifest (fsynced by put) names them
        made: set[Path] = set()
        for path, data in files.items():
            dest = self._path(path)
            if dest.parent not in made:
                dest.parent.mkdir(parents=True, exist_ok=True)
                made.add(dest.parent)
            try:
                with open(dest, "wb") as fh:
                    fh.write(data)
            except BaseException:
                with contextlib.suppress(OSError):
                    dest.unlink()  # a full disk leaves no half file behind
                raise

    def put_if_absent(self, path: str, data: bytes) -> bool:
        dest = self._path(path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._write_tmp(data)
        try:
            os.link(tmp, dest)
            return True
        except FileExistsError:
            return False
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()

    def exists(self, path: str) -> bool:
        return self._path(path).is_file()

    def list(self, prefix: str) -> list[str]:
        try:
            return sorted(os.listdir(self._path(prefix)))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def walk(self, prefix: str = "") -> Iterator[Entry]:
        base = self._path(prefix) if prefix else self.root
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                full = os.path.join(dirpath, name)
                try:
                    st = os.stat(full)
                except FileNotFoundError:
                    continue
                rel = os.path.relpath(full, self.root).replace(os.sep, "/")
                yield Entry(rel, st.st_size, st.st_mtime)

    def delete(self, paths: Iterable[str]) -> None:
        for p in paths:
            with contextlib.suppress(FileNotFoundError):
                self._path(p).unlink()

    def delete_tree(self, prefix: str) -> None:
        shutil.rmtree(self._path(prefix), ignore_errors=True)

    def zarr(self, prefix: str, *, read_only: bool = False) -> Any:
        from zarr.storage import LocalStore as ZarrLocalStore

        return ZarrLocalStore(self._path(prefix), read_only=read_only)

    def local_path(self, path: str) -> str | None:
        return str(self._path(path))
