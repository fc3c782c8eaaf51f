"""A store on any fsspec filesystem: ``memory://`` (tests), ``s3://`` (shared).

Object stores have no rename, so a document is published by one whole-object
write (a single PUT is atomic on S3 and S3-compatible servers: readers see
the old object, the new one, or none).  ``put_if_absent`` uses S3's
conditional write (``If-None-Match: *``) where the filesystem offers it
(s3fs ``mode="create"``); elsewhere it is a check-then-write and
``supports_conditional`` is False (refs then rely on unique entry names, see
:mod:`store.refs`).
"""

from __future__ import annotations

import contextlib
import posixpath
from collections.abc import Iterable, Iterator
from typing import Any

from store.abc import Entry, Store, check_path


class FsspecStore(Store):
    def __init__(self, url: str, **storage_options: Any):
        import fsspec

        self.url = url.rstrip("/")
        self.storage_options = storage_options
        self.fs, root = fsspec.core.url_to_fs(self.url, **storage_options)
        self.root = root.rstrip("/")
        self.protocol = (
            self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        )
        self.supports_conditional = self.protocol in ("s3", "s3a")

    def _p(self, path: str) -> str:
        return posixpath.join(self.root, check_path(path)) if path else self.root

    def get(self, path: str) -> bytes:
        try:
            return self.fs.cat_file(self._p(path))
        except FileNotFoundError:
            raise
        except OSError as e:  # some backends wrap a missing key
            if "NoSuchKey" in str(e) or "Not Found" in str(e):
                raise FileNotFoundError(path) from e
            raise

    def put(self, path: str, data: bytes) -> None:
        full = self._p(path)
        if self.protocol in ("memory", "file", "local"):
            self.fs.makedirs(posixpath.dirname(full), exist_ok=True)
        self.fs.pipe_file(full, data)

    def put_if_absent(self, path: str, data: bytes) -> bool:
        full = self._p(path)
        if self.supports_conditional:
            try:
                with self.fs.open(full, "xb") as fh:
                    fh.write(data)
                return True
            except (FileExistsError, OSError) as e:
                if isinstance(e, FileExistsError) or "PreconditionFailed" in str(e):
                    return False
                raise
        if self.fs.exists(full):
            return False
        self.put(path, data)
        return True

    def exists(self, path: str) -> bool:
        return bool(self.fs.isfile(self._p(path)))

    def list(self, prefix: str) -> list[str]:
        try:
            if self.fs.isfile(self._p(prefix)):
                return []  # like a local folder listing: a file has no entries
            names = self.fs.ls(self._p(prefix), detail=False, refresh=True)
        except (FileNotFoundError, NotADirectoryError):
            return []
        base = self._p(prefix).rstrip("/")
        out = []
        for n in names:
            n = n.rstrip("/")
            if n.startswith("/") and not base.startswith("/"):
                n = n[1:]
            out.append(posixpath.basename(n))
        return sorted(set(out) - {""})

    def walk(self, prefix: str = "") -> Iterator[Entry]:
        base = self._p(prefix)
        try:
            found = self.fs.find(base, detail=True, withdirs=False)
        except FileNotFoundError:
            return
        root = self.root.lstrip("/")
        for name, info in sorted(found.items()):
            rel = name.lstrip("/")[len(root) :].lstrip("/")
            mtime = info.get("mtime") or info.get("LastModified") or info.get("created") or 0
            if hasattr(mtime, "timestamp"):
                mtime = mtime.timestamp()
            yield Entry(rel, int(info.get("size") or 0), float(mtime))

    def delete(self, paths: Iterable[str]) -> None:
        full = [self._p(p) for p in paths]
        if not full:
            return
        for f in full:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(f)

    def delete_tree(self, prefix: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self._p(prefix), recursive=True)

    def zarr(self, prefix: str, *, read_only: bool = False) -> Any:
        from zarr.storage import FsspecStore as ZarrFsspecStore

        url = f"{self.url}/{check_path(prefix)}" if prefix else self.url
        return ZarrFsspecStore.from_url(
            url, storage_options=self.storage_options or None, read_only=read_only
        )
