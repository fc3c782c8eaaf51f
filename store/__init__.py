"""The content-addressed store: backends, packs and objects, refs.

>>> from store import open_store
>>> s = open_store("memory://doctest-store")
>>> s.put("refs/x", b"1"); s.get("refs/x")
b'1'
"""

from __future__ import annotations

import os
from typing import Any

from store.abc import Entry, Store

__all__ = ["Entry", "Store", "open_store"]


def open_store(url: str | os.PathLike, **storage_options: Any) -> Store:
    """The store at ``url``: a folder path or ``file://`` URL, ``memory://name``,
    or any fsspec URL such as ``s3://bucket/prefix`` (options are passed on to
    fsspec, e.g. ``endpoint_url`` for an S3-compatible server)."""
    url = os.fspath(url)
    if url.startswith("file://"):
        url = url[len("file://") :]
    if "://" not in url:
        from store.local import LocalStore

        return LocalStore(url)
    from store.fsspec import FsspecStore

    return FsspecStore(url, **storage_options)
