"""The small interface every storage backend implements.

flow keeps two kinds of bytes in a store: small documents (pack and object
manifests, refs, caches) written whole with :meth:`Store.put`, and arrays
written through zarr v3 (:meth:`Store.zarr`).  Backends are chosen by URL
(:func:`store.open_store`): a local folder, ``memory://`` for tests, and any
fsspec URL (``s3://bucket/path``) for shared storage.

Concurrency contract (what :class:`store.testing.StoreTests` checks):

* :meth:`put` publishes a document atomically: a reader sees the old bytes,
  the new bytes, or nothing -- never a prefix.  A local folder gets this by
  writing a temporary file and renaming it; object stores by a single PUT.
* Nothing is ever modified in place by flow: every array and document is
  written once under a fresh name, and a manifest written last (with
  :meth:`put`) is what makes it visible.  So two writers never race on the
  same bytes, and a killed writer leaves only unreferenced files behind
  (``flow gc`` removes them).
* :meth:`put_if_absent` is the one conditional write (``supports_conditional``
  says whether the backend makes it atomic); refs use it to order history
  entries.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any


def check_path(path: str) -> str:
    """``path`` if it is a plain relative store path, else :class:`ValueError`.

    Store paths are made by flow from node names, keys and random ids, never
    from source file names; this check is the backstop that keeps any path
    from escaping the store root.
    """
    parts = path.split("/")
    if not path or "\\" in path or "\x00" in path or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid store path {path!r}: must be relative, without '..' or '//'")
    return path


@dataclass(frozen=True, slots=True)
class Entry:
    """One file in a store listing."""

    path: str
    size: int
    mtime: float


class Store(ABC):
    """Bytes and zarr arrays under one root, addressed by ``/``-separated paths."""

    #: a URL that :func:`store.open_store` turns back into this store
    url: str
    #: ``put_if_absent`` is atomic (no two writers both succeed)
    supports_conditional: bool = False
    #: files can be memory-mapped through :meth:`local_path`
    supports_local_paths: bool = False

    @abstractmethod
    def get(self, path: str) -> bytes:
        """The bytes at ``path``; :class:`FileNotFoundError` if there are none."""

    @abstractmethod
    def put(self, path: str, data: bytes) -> None:
        """Publish ``data`` at ``path`` atomically, replacing what was there."""

    def put_new(self, files: dict[str, bytes]) -> None:
        """Write files at fresh paths that nothing reads until a manifest put later
        names them (pack and payload arrays).  Each need not be atomic, so a
        backend may skip :meth:`put`'s temporary file; the default puts each."""
        for path, data in files.items():
            self.put(path, data)

    @abstractmethod
    def put_if_absent(self, path: str, data: bytes) -> bool:
        """Publish ``data`` only if nothing is at ``path``; True if it was written."""

    @abstractmethod
    def exists(self, path: str) -> bool:
        """Whether a file is at ``path``."""

    @abstractmethod
    def list(self, prefix: str) -> list[str]:
        """Names directly under the folder ``prefix`` (files and folders), sorted."""

    @abstractmethod
    def walk(self, prefix: str = "") -> Iterator[Entry]:
        """Every file under ``prefix``, recursively, with size and mtime."""

    @abstractmethod
    def delete(self, paths: Iterable[str]) -> None:
        """Remove files (missing ones are ignored)."""

    @abstractmethod
    def delete_tree(self, prefix: str) -> None:
        """Remove a folder and everything under it (missing is fine)."""

    @abstractmethod
    def zarr(self, prefix: str, *, read_only: bool = False) -> Any:
        """A zarr v3 store rooted at ``prefix``."""

    def local_path(self, path: str) -> str | None:
        """A local filesystem path for ``path`` when the backend has one."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections (optional)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"
