"""The hnswlib backend of ``vector_index`` (an optional dependency: ``pip install hnswlib``).

Vectors are L2-normalized first and indexed in hnswlib's inner-product space,
so distances are ``1 - cos`` exactly as in the annoy backend (a zero vector
stays zero: distance 1 to everything), and results from either backend merge
across segments.  The graph is built on one thread with a fixed seed, which
makes the saved bytes reproducible (tested).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Sequence

import numpy as np


def _hnswlib():
    try:
        import hnswlib
    except ImportError:
        raise ValueError(
            "vector_index backend 'hnsw' needs hnswlib: pip install hnswlib (or flow-cbir[hnsw])"
        ) from None
    return hnswlib


def unit_rows(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, n, out=np.zeros_like(x), where=n > 0).astype(np.float32)


def hnsw_bytes(x: np.ndarray, *, m: int, ef_construction: int, seed: int) -> bytes:
    """An HNSW graph over the rows of ``x`` (item i = row i), as file bytes."""
    hnswlib = _hnswlib()
    if m < 2 or ef_construction < 1:
        raise ValueError(f"hnsw needs m >= 2 and ef_construction >= 1, got {m}, {ef_construction}")
    index = hnswlib.Index(space="ip", dim=int(x.shape[1]))
    index.init_index(max_elements=len(x), ef_construction=ef_construction, M=m, random_seed=seed)
    index.set_num_threads(1)
    index.add_items(unit_rows(x), np.arange(len(x)))
    with tempfile.TemporaryDirectory(prefix="flow-hnsw-") as tmp:
        path = os.path.join(tmp, "index.bin")
        index.save_index(path)
        with open(path, "rb") as f:
            return f.read()


class HnswSearcher:
    """Approximate cosine search in a ``vector_index`` built with ``backend="hnsw"``.

    ``search_k`` is hnswlib's ``ef`` (candidates kept while searching; -1: 64 or
    ``k``, whichever is larger).  Same contract as ``VectorSearcher.search``.
    """

    def __init__(self, path: str | os.PathLike, dim: int, count: int):
        self.dim, self.count = int(dim), int(count)
        self._index = _hnswlib().Index(space="ip", dim=self.dim)
        self._index.load_index(os.fspath(path), max_elements=self.count)
        self._index.set_num_threads(1)

    def search(
        self,
        vectors: np.ndarray,
        k: int,
        search_k: int = -1,
        exclude: set[int] | Sequence[Iterable[int]] | None = None,
    ):
        from nodes.index import _exclusions, _padded, _queries, _ranked

        q = unit_rows(_queries(vectors, self.dim).astype(np.float32))
        skip = _exclusions(exclude, len(q))
        extra = max((len(s) for s in skip), default=0)
        want = min(self.count, k + extra)
        self._index.set_ef(max(want, search_k if search_k > 0 else 64))
        labels, dists = self._index.knn_query(q, k=want)
        lists, values = [], []
        for row, d, ex in zip(labels.tolist(), dists.tolist(), skip):
            keep = [(int(i), float(v)) for i, v in zip(row, d) if int(i) not in ex]
            lists.append([i for i, _ in keep])
            values.append([v for _, v in keep])
        idx, dist = _padded(lists, values)
        return _ranked(idx, np.clip(dist, 0.0, 2.0), k)

    def close(self) -> None:
        self._index = None
