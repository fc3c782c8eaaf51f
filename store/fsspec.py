"""A store on any fsspec filesystem: ``memory://`` (tests), ``s3://`` (shared).

Object stores have no rename, so a document is published by one whole-object
write: a single PUT (or a multipart upload, which appears only when it is
completed) is atomic on S3 and S3-compatible servers -- readers see the old
object, the new one, or none.  Reads are one GET each (s3fs would otherwise
split a large object into concurrent range requests, which could mix two
versions of a replaced document).

``put_if_absent`` on S3 is a conditional write (``PUT`` with
``If-None-Match: *``, s3fs ``pipe_file(mode="create")``): the server lets
exactly one of racing writers create the object and answers the others
``412 Precondition Failed`` (AWS S3 since August 2024; S3-compatible
servers vary).  A server that ignored the header would silently overwrite,
so the first conditional write of a store is preceded by a probe (create a
scratch object under ``tmp/`` twice: the second must be refused), and
``supports_conditional`` is True only if the probe passed.  The probe can't
see whether a server decides *racing* creates atomically; AWS documents
that it does.  Elsewhere ``put_if_absent`` is a check-then-write and
``supports_conditional`` is False: refs then give entries unique names (see
:mod:`store.refs`).

Listing caches are turned off (``use_listings_cache=False`` unless the
storage options say otherwise): other hosts write into the same store, and a
cached listing would hide their packs and refs.
"""

from __future__ import annotations

import contextlib
import posixpath
import time
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

from store.abc import Entry, Store, check_path

_S3 = ("s3", "s3a")
_LOCAL = ("memory", "file", "local")
# a PUT is one request up to 5 GB; s3fs switches to a multipart upload (which
# does not carry the If-None-Match condition) above twice its chunk size
_MAX_SINGLE_PUT = 5 * 2**30
_CONFLICT_RETRIES = 5


def _has_magic(path: str) -> bool:
    return any(c in path for c in "*?[")


def _s3_error_code(e: BaseException) -> str:
    """The S3 error code behind an exception s3fs translated (``""`` if none)."""
    response = getattr(e.__cause__, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


class FsspecStore(Store):
    def __init__(self, url: str, **storage_options: Any):
        import fsspec

        self.url = url.rstrip("/")
        self.storage_options = storage_options
        protocol = fsspec.core.split_protocol(self.url)[0] or "file"
        self._fs_options = dict(storage_options)
        if protocol not in _LOCAL:
            self._fs_options.setdefault("use_listings_cache", False)
        self.fs, root = fsspec.core.url_to_fs(self.url, **self._fs_options)
        self.root = root.rstrip("/")
        self.protocol = (
            self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        )
        self._s3 = self.protocol in _S3
        self._conditional: bool | None = None if self._s3 else False

    @property
    def supports_conditional(self) -> bool:  # type: ignore[override]  # a property here
        """Whether ``put_if_absent`` is atomic (on S3: the server honours If-None-Match)."""
        if self._conditional is None:
            self._conditional = self._probe_conditional()
        return self._conditional

    def _probe_conditional(self) -> bool:
        full = self._p(f"tmp/conditional-probe-{uuid.uuid4().hex}")
        try:
            try:
                self.fs.pipe_file(full, b"1", mode="create")
            except (FileNotFoundError, PermissionError):
                raise  # no bucket, no write access: not an answer about the server
            except Exception:  # the server (or botocore) refuses the condition
                return False
            try:
                self.fs.pipe_file(full, b"2", mode="create")
            except FileExistsError:
                return True
            return False  # the header was ignored: the second create overwrote
        finally:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(full)

    def _p(self, path: str) -> str:
        return posixpath.join(self.root, check_path(path)) if path else self.root

    def get(self, path: str) -> bytes:
        full = self._p(path)
        try:
            if self._s3:
                return self.fs.cat_file(full, max_concurrency=1)
            return self.fs.cat_file(full)
        except FileNotFoundError:
            raise
        except OSError as e:  # some backends wrap a missing key
            if "NoSuchKey" in str(e) or "Not Found" in str(e):
                raise FileNotFoundError(path) from e
            raise

    def put(self, path: str, data: bytes) -> None:
        full = self._p(path)
        if self.protocol in _LOCAL:
            self.fs.makedirs(posixpath.dirname(full), exist_ok=True)
        self.fs.pipe_file(full, data)

    def put_if_absent(self, path: str, data: bytes) -> bool:
        full = self._p(path)
        if not self.supports_conditional:
            if self.fs.exists(full):
                return False
            self.put(path, data)
            return True
        if len(data) > _MAX_SINGLE_PUT:
            raise ValueError(f"put_if_absent({path!r}): {len(data)} bytes is more than one PUT")
        for attempt in range(_CONFLICT_RETRIES):
            try:
                self.fs.pipe_file(full, data, mode="create", chunksize=_MAX_SINGLE_PUT)
                return True
            except FileExistsError:
                return False
            except OSError as e:
                code = _s3_error_code(e)
                if code == "PreconditionFailed":
                    return False
                # AWS answers 409 ConditionalRequestConflict while another
                # conditional write of the key is in flight: ask again
                if code != "ConditionalRequestConflict" or attempt == _CONFLICT_RETRIES - 1:
                    raise
                time.sleep(0.05 * 2**attempt)
        raise AssertionError("unreachable")

    def exists(self, path: str) -> bool:
        try:
            return self.fs.info(self._p(path))["type"] == "file"
        except FileNotFoundError:
            return False

    def list(self, prefix: str) -> list[str]:
        full = self._p(prefix)
        try:
            infos = self.fs.ls(full, detail=True, refresh=True)
        except (FileNotFoundError, NotADirectoryError):
            return []
        base = full.strip("/")
        out = set()
        for info in infos:
            name = info["name"].strip("/")
            if name == base:
                continue  # the listing of a file is the file: it has no entries
            out.add(posixpath.basename(name))
        return sorted(out - {""})

    def walk(self, prefix: str = "") -> Iterator[Entry]:
        base = self._p(prefix)
        try:
            found = self.fs.find(base, detail=True, withdirs=False)
        except FileNotFoundError:
            return
        root = self.root.lstrip("/")
        for name, info in sorted(found.items()):
            rel = name.lstrip("/")[len(root) :].lstrip("/")
            if not rel or rel == prefix:
                continue  # ``prefix`` is a file, not a folder: nothing is under it
            mtime = info.get("mtime") or info.get("LastModified") or info.get("created") or 0
            if hasattr(mtime, "timestamp"):
                mtime = mtime.timestamp()
            yield Entry(rel, int(info.get("size") or 0), float(mtime))

    def delete(self, paths: Iterable[str]) -> None:
        full = [self._p(p) for p in paths]
        if self._s3:  # DeleteObjects: up to 1000 keys a request, missing keys are fine
            bulk = [f for f in full if not _has_magic(f)]
            if bulk:
                self.fs.rm(bulk)
            full = [f for f in full if _has_magic(f)]
        for f in full:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(f)

    def delete_tree(self, prefix: str) -> None:
        base = self._p(prefix)
        if self._s3:  # every object under ``prefix/`` (a listing, then bulk deletes)
            self.delete(e.path for e in self.walk(prefix))
            return
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(base, recursive=True)

    def zarr(self, prefix: str, *, read_only: bool = False) -> Any:
        from zarr.storage import FsspecStore as ZarrFsspecStore

        url = f"{self.url}/{check_path(prefix)}" if prefix else self.url
        options = dict(self._fs_options)
        if self._s3:  # a chunk is one GET (s3fs first asks for the size to split big reads)
            options.setdefault("max_concurrency", 1)
        return ZarrFsspecStore.from_url(url, storage_options=options or None, read_only=read_only)
