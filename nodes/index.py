"""Retrieval indices (annoy) and the search API that queries them.

Two set nodes build immutable index files (``Blob``s readers map directly),
with the item ``ids`` in index order; an index of no items has ``count`` 0:

* ``vector_index``: an annoy ``angular`` forest over real vectors, built with
  ``set_seed(seed)`` on one thread (``n_jobs=1``: with two threads five
  builds gave five different files), items added in ``Items`` order, so the
  bytes depend only on inputs and parameters (tested across processes; on
  another CPU kind likely but not promised: annoy is compiled for the CPU's
  vector instructions).
* ``code_index``: an annoy ``hamming`` forest over the codes (annoy takes one
  0/1 value per bit), the packed codes as ``.npy`` (uint8, n x bits/8) and
  the real vectors as ``.npy`` (float32, n x D) for re-ranking.  An exact
  Hamming scan of the packed codes costs about 1 ms per query at 100k and
  finds the true Hamming neighbours; annoy's Hamming forest (splits on
  single bits) was slower and approximate in every setting measured.

The search API (plain classes) serves ``flow query``, ``flow eval`` and the
tests; it imports numpy and annoy only (no zarr, dask, torch, scikit-learn):

* ``VectorSearcher``: annoy lookups; distance ``1 - cos`` (annoy's
  ``sqrt(2 - 2 cos)`` squared and halved).
* ``CodeSearcher``: a Hamming shortlist (exact over the codes, or annoy's)
  re-ranked by exact cosine against the memory-mapped real vectors, or the
  Hamming ranking itself.
* ``ExactSearcher``: brute force over a float32 matrix, the ground truth.
* ``merge_results``: top-k over segments (independent indices over disjoint
  items, local indices offset per segment).

Every search returns ``(indices (n, k) int64, distances (n, k) float32)``,
best first, padded with index ``-1`` / distance ``inf`` where fewer than
``k`` exist.  Order is (distance, index): exact distances are computed in
float64 and rounded to float32, so equal vectors tie exactly and the lower
(global) index wins; merging per-segment exact or re-ranked top-k lists
therefore gives exactly the single index's top-k (property-tested).  For
annoy's candidates a merge is as good as the segments' candidate lists.
``exclude`` drops local indices: one set for all queries, or one per query.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Iterable, Sequence

import numpy as np

from flow import Blob, Items, node

__all__ = [
    "CodeSearcher",
    "ExactSearcher",
    "VectorSearcher",
    "code_index",
    "merge_results",
    "vector_index",
]

_EXACT_ROWS = 1 << 15  # database rows per block in exact distance computations
_EXACT_QUERIES = 128  # queries per block (a block of distances: 32 MiB)

Exclude = set[int] | Sequence[Iterable[int]] | None


# --------------------------------------------------------------------------
# building


def _matrix(items: Items, what: str) -> np.ndarray:
    """The items' vectors as one float32 matrix, each checked."""
    rows = []
    dim = None
    for item_id, value in zip(items.ids, items.values, strict=True):
        v = np.asarray(value)
        if v.ndim != 1 or v.size == 0 or (dim is not None and v.shape[0] != dim):
            want = "a non-empty 1-D array" if dim is None else f"shape ({dim},) like the others"
            raise ValueError(f"{what} of {item_id!r} has shape {v.shape}; need {want}")
        dim = v.shape[0]
        if what == "vector" and (not np.issubdtype(v.dtype, np.number) or not np.isfinite(v).all()):
            raise ValueError(f"vector of {item_id!r} is not finite numbers")
        rows.append(v)
    if not rows:
        return np.zeros((0, 0), np.float32 if what == "vector" else np.uint8)
    if what == "code":
        out = np.stack(rows)
        if out.dtype != np.uint8:
            raise ValueError(f"codes must be packed uint8 bits, got {out.dtype}")
        return out
    return np.stack(rows).astype(np.float32)


def _annoy_bytes(rows: Iterable[list], dim: int, metric: str, trees: int, seed: int) -> bytes:
    """An annoy forest over ``rows`` (item i = i-th row), built on one thread."""
    from annoy import AnnoyIndex

    with tempfile.TemporaryDirectory(prefix="flow-annoy-") as tmp:
        path = os.path.join(tmp, "index.ann")
        index = AnnoyIndex(dim, metric)
        index.set_seed(seed)
        index.on_disk_build(path)
        for i, row in enumerate(rows):
            index.add_item(i, row)
        index.build(trees, n_jobs=1)
        index.unload()
        with open(path, "rb") as f:
            return f.read()


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _check_trees(trees: int) -> None:
    if trees < 1:
        raise ValueError(f"trees must be >= 1, got {trees}")


@node(version=1, kind="set")
def vector_index(
    vectors: Items,
    *,
    backend: str = "annoy",
    trees: int = 50,
    m: int = 16,
    ef_construction: int = 200,
    seed: int = 0,
) -> dict:
    """A cosine index over the vectors, item i = the i-th of ``vectors``.

    ``backend="annoy"`` (a forest of ``trees`` random-projection trees) or
    ``"hnsw"`` (hnswlib's graph, ``m`` links per node, ``ef_construction``),
    which answers faster at higher recall (BENCHMARKS.md).  Returns
    ``{<backend>: Blob, "backend", "dim", "count", "ids", "metric": "angular"}``.
    """
    x = _matrix(vectors, "vector")
    n, dim = x.shape
    if backend == "annoy":
        _check_trees(trees)
        rows = (row.tolist() for row in x)
        data = _annoy_bytes(rows, dim, "angular", trees, seed) if n else b""
    elif backend == "hnsw":
        from nodes._hnsw import hnsw_bytes

        data = hnsw_bytes(x, m=m, ef_construction=ef_construction, seed=seed) if n else b""
    else:
        raise ValueError(f"vector_index backend must be 'annoy' or 'hnsw', not {backend!r}")
    return {
        backend: Blob(data),
        "backend": backend,
        "dim": int(dim),
        "count": int(n),
        "ids": tuple(vectors.ids),
        "metric": "angular",
    }


@node(version=1, kind="set")
def code_index(codes: Items, vectors: Items, *, trees: int = 50, seed: int = 0) -> dict:
    """An annoy Hamming index over packed codes, with the real vectors for re-ranking.

    ``codes`` and ``vectors`` must hold the same items.  Returns ``{"hamming":
    Blob(annoy), "codes": Blob(.npy uint8 n x bits/8), "vectors": Blob(.npy
    float32 n x D), "bits", "dim", "count", "ids", "trees"}``.
    """
    _check_trees(trees)
    if tuple(codes.ids) != tuple(vectors.ids):
        missing = sorted(set(codes.ids) ^ set(vectors.ids))[:5]
        raise ValueError(
            f"codes ({len(codes)}) and vectors ({len(vectors)}) must hold the same items; "
            f"differing ids include {missing}"
        )
    c = _matrix(codes, "code")
    x = _matrix(vectors, "vector")
    bits = c.shape[1] * 8
    rows = (np.unpackbits(row).tolist() for row in c)
    data = _annoy_bytes(rows, bits, "hamming", trees, seed) if len(c) else b""
    return {
        "hamming": Blob(data),
        "codes": Blob(_npy_bytes(c)),
        "vectors": Blob(_npy_bytes(x)),
        "bits": int(bits),
        "dim": int(x.shape[1]),
        "count": len(c),
        "ids": tuple(codes.ids),
        "trees": trees,
    }


# --------------------------------------------------------------------------
# searching


def _queries(vectors: np.ndarray, dim: int | None = None) -> np.ndarray:
    q = np.asarray(vectors)
    q = q[None] if q.ndim == 1 else q
    if q.ndim != 2 or (dim is not None and q.shape[1] != dim):
        raise ValueError(f"queries of shape {np.shape(vectors)}; need (n, {dim}) or ({dim},)")
    if not np.isfinite(q).all():
        raise ValueError("queries hold NaN or infinite values")
    return q


def _exclusions(exclude: Exclude, n: int) -> list[set[int]]:
    """One set of excluded local indices per query."""
    if exclude is None:
        return [set()] * n
    if isinstance(exclude, set | frozenset):
        return [set(exclude)] * n
    per_query = [set(map(int, e)) for e in exclude]
    if len(per_query) != n:
        raise ValueError(f"exclude has {len(per_query)} sets for {n} queries")
    return per_query


def _ranked(cand: np.ndarray, dist: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best of candidate rows (n x m, -1 = none) by (distance, index)."""
    n = len(cand)
    dist = np.where(cand >= 0, dist, np.inf).astype(np.float32)
    big = np.where(cand >= 0, cand, np.iinfo(np.int64).max)
    order = np.lexsort((big, dist), axis=-1)[:, :k]
    idx = np.take_along_axis(cand, order, axis=1)
    d = np.take_along_axis(dist, order, axis=1)
    if idx.shape[1] < k:
        pad = k - idx.shape[1]
        idx = np.concatenate([idx, np.full((n, pad), -1, np.int64)], axis=1)
        d = np.concatenate([d, np.full((n, pad), np.inf, np.float32)], axis=1)
    return idx.astype(np.int64), d


def _padded(lists: list[list[int]], values: list[list[float]]) -> tuple[np.ndarray, np.ndarray]:
    width = max((len(x) for x in lists), default=0)
    idx = np.full((len(lists), width), -1, np.int64)
    val = np.full((len(lists), width), np.inf, np.float64)
    for i, (ids, vs) in enumerate(zip(lists, values)):
        idx[i, : len(ids)] = ids
        val[i, : len(vs)] = vs
    return idx, val


def _inv_norms(rows: np.ndarray) -> np.ndarray:
    """1/|row| in float64 (0 for zero rows); the same value for a row in any matrix."""
    sq = np.sum(rows * rows, axis=-1)
    out = np.zeros_like(sq)
    np.divide(1.0, np.sqrt(sq), out=out, where=sq > 0)
    return out


def _unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length in float64 (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float64)
    return x * _inv_norms(x)[..., None]


def _distances(unit_queries: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Cosine distances (n x m float32 in [0, 2]) of unit queries to rows.

    float64 throughout, rounded to float32 at the end, so a pair gets the
    same float32 distance whichever block or segment its row is in (to
    within the ~1e-16 BLAS-dependent rounding, far below float32's).
    """
    r = np.asarray(rows, dtype=np.float64)
    cos = (unit_queries @ r.T) * _inv_norms(r)
    return np.clip(1.0 - cos, 0.0, 2.0).astype(np.float32)


class _AnnoyFile:
    """An annoy index memory-mapped from a file (none when the file is empty)."""

    def __init__(self, path: str | os.PathLike, dim: int, metric: str, prefault: bool):
        self.index = None
        self.count = 0
        if os.path.getsize(path):
            from annoy import AnnoyIndex

            self.index = AnnoyIndex(dim, metric)
            self.index.load(os.fspath(path), prefault)
            self.count = self.index.get_n_items()

    def nearest(self, row: list, n: int, search_k: int) -> tuple[list[int], list[float]]:
        if self.index is None or n <= 0:
            return [], []
        return self.index.get_nns_by_vector(row, min(n, self.count), search_k, True)

    def close(self) -> None:
        if self.index is not None:
            self.index.unload()
            self.index = None


class VectorSearcher:
    """Approximate cosine search in a ``vector_index`` annoy file.

    ``path``: the index's ``annoy`` file; ``dim``: its ``dim``.  ``search_k``
    is annoy's: nodes inspected per query (-1: trees x wanted results); more
    is slower and closer to exact.
    """

    def __init__(self, path: str | os.PathLike, dim: int, *, prefault: bool = False):
        self.dim = int(dim)
        self._annoy = _AnnoyFile(path, self.dim, "angular", prefault)
        self.count = self._annoy.count

    def search(
        self, vectors: np.ndarray, k: int, search_k: int = -1, exclude: Exclude = None
    ) -> tuple[np.ndarray, np.ndarray]:
        q = _queries(vectors, self.dim).astype(np.float32)
        skip = _exclusions(exclude, len(q))
        lists, dists = [], []
        for row, ex in zip(q.tolist(), skip):
            ids, ds = self._annoy.nearest(row, k + len(ex), search_k)
            keep = [(i, d) for i, d in zip(ids, ds) if i not in ex]
            lists.append([i for i, _ in keep])
            dists.append([d * d / 2 for _, d in keep])
        idx, d = _padded(lists, dists)
        return _ranked(idx, np.clip(d, 0.0, 2.0), k)

    def close(self) -> None:
        self._annoy.close()

    def __enter__(self) -> VectorSearcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _words(packed: np.ndarray) -> np.ndarray:
    """Packed codes (n x bytes uint8) as 64-bit words (n x ceil(bytes/8)), zero-padded."""
    packed = np.ascontiguousarray(packed, dtype=np.uint8)
    pad = -packed.shape[1] % 8
    if pad:
        packed = np.concatenate([packed, np.zeros((len(packed), pad), np.uint8)], axis=1)
    return packed.view(np.uint64)


_POPCOUNT8 = np.array([bin(i).count("1") for i in range(256)], np.uint8)


def _popcount(words: np.ndarray) -> np.ndarray:
    """Set bits per row of a uint64 matrix (int32)."""
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        counts = np.bitwise_count(words)
    else:
        counts = _POPCOUNT8[words.view(np.uint8)]
    if counts.shape[1] == 1:
        return counts[:, 0].astype(np.int32)
    return counts.sum(axis=1, dtype=np.int32)


class CodeSearcher:
    """Hamming shortlist from a ``code_index``, re-ranked by exact cosine.

    ``hamming_path``, ``vectors_path``, ``codes_path``: the index's
    ``hamming``, ``vectors`` and ``codes`` files; ``bits``: its ``bits``.
    With ``codes_path`` the shortlist is the exact Hamming top (brute force
    over the packed codes: about 0.6 ms per query at 100k 64-bit codes);
    without it, annoy's approximate Hamming neighbours (``search_k``).
    ``coder`` (the ``coder`` node's output) lets ``search`` encode query
    vectors itself; otherwise pass ``codes=``.
    """

    def __init__(
        self,
        hamming_path: str | os.PathLike | None,
        vectors_path: str | os.PathLike,
        bits: int,
        *,
        codes_path: str | os.PathLike | None = None,
        coder: dict | None = None,
        prefault: bool = False,
    ):
        self.bits = int(bits)
        self.coder = coder
        self.vectors = np.load(os.fspath(vectors_path), mmap_mode="r", allow_pickle=False)
        self.count = len(self.vectors)
        self.dim = self.vectors.shape[1] if self.vectors.ndim == 2 else 0
        self._annoy = None
        self._words = None
        if codes_path is not None:
            packed = np.load(os.fspath(codes_path), allow_pickle=False)
            if packed.shape != (self.count, self.bits // 8):
                raise ValueError(f"codes of shape {packed.shape} for {self.count} items")
            self._words = _words(packed)
        elif hamming_path is not None:
            self._annoy = _AnnoyFile(hamming_path, self.bits, "hamming", prefault)
        else:
            raise ValueError("CodeSearcher needs the index's codes or hamming file")

    def _exact_shortlist(
        self, packed: np.ndarray, n: int, exclude: set[int]
    ) -> tuple[list[int], list[float]]:
        """The n nearest codes by (Hamming distance, index), exactly."""
        d = _popcount(self._words ^ _words(packed[None]))
        skip = [j for j in exclude if 0 <= j < self.count]
        d[skip] = self.bits + 1
        n = min(n, self.count - len(skip))
        if n <= 0:
            return [], []
        # the smallest distance t with at least n items within t; ties by index
        t = int(np.searchsorted(np.cumsum(np.bincount(d, minlength=self.bits + 2)), n))
        ids = np.flatnonzero(d < t)
        ids = np.concatenate([ids, np.flatnonzero(d == t)[: n - len(ids)]])
        return ids.tolist(), d[ids].astype(np.float64).tolist()

    def _annoy_shortlist(
        self, packed: np.ndarray, n: int, exclude: set[int], search_k: int
    ) -> tuple[list[int], list[float]]:
        ids, ds = self._annoy.nearest(np.unpackbits(packed).tolist(), n + len(exclude), search_k)
        keep = [(j, d) for j, d in zip(ids, ds) if j not in exclude][:n]
        return [j for j, _ in keep], [d for _, d in keep]

    def search(
        self,
        vectors: np.ndarray | None,
        k: int,
        search_k: int = -1,
        exclude: Exclude = None,
        *,
        codes: np.ndarray | None = None,
        shortlist: int | None = None,
        rerank: bool = True,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` of a ``shortlist`` (default ``max(100, 10 k)``) of Hamming
        neighbours, by cosine distance to ``vectors`` (``rerank=False``: the
        Hamming ranking itself, distances in bits as float32)."""
        if codes is None:
            if self.coder is None:
                raise ValueError("pass codes= or open the CodeSearcher with a coder")
            from nodes.codes import encode

            codes = encode(_queries(vectors, self.dim), self.coder)
        codes = _queries(codes, self.bits // 8).astype(np.uint8)
        n = len(codes)
        if rerank:
            q = _unit(_queries(vectors, self.dim))
            if len(q) != n:
                raise ValueError(f"{len(q)} query vectors for {n} codes")
        shortlist = max(k, shortlist if shortlist is not None else max(100, 10 * k))
        skip = _exclusions(exclude, n)
        lists, dists = [], []
        for i, ex in enumerate(skip):
            if self._words is not None:
                ids, ds = self._exact_shortlist(codes[i], shortlist, ex)
            else:
                ids, ds = self._annoy_shortlist(codes[i], shortlist, ex, search_k)
            if rerank and ids:
                order = np.sort(np.asarray(ids, np.int64))
                ids = order.tolist()
                ds = _distances(q[i : i + 1], self.vectors[order])[0].tolist()
            lists.append(ids)
            dists.append(ds)
        idx, d = _padded(lists, dists)
        return _ranked(idx, d, k)

    def close(self) -> None:
        if self._annoy is not None:
            self._annoy.close()
        self.vectors = None
        self._words = None

    def __enter__(self) -> CodeSearcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ExactSearcher:
    """Brute-force cosine search over a float32 matrix (n x D): the ground truth."""

    def __init__(self, vectors: np.ndarray):
        v = np.asarray(vectors)
        if v.ndim != 2:
            raise ValueError(f"vectors must be a matrix (n, D), got shape {v.shape}")
        self.vectors = v
        self.count, self.dim = v.shape

    @classmethod
    def from_npy(cls, path: str | os.PathLike) -> ExactSearcher:
        """Over a ``.npy`` file (e.g. a ``code_index``'s ``vectors``), memory-mapped."""
        return cls(np.load(os.fspath(path), mmap_mode="r", allow_pickle=False))

    def search(
        self, vectors: np.ndarray, k: int, exclude: Exclude = None
    ) -> tuple[np.ndarray, np.ndarray]:
        q = _unit(_queries(vectors, self.dim))
        skip = _exclusions(exclude, len(q))
        out_i, out_d = [], []
        for qs in range(0, len(q), _EXACT_QUERIES):
            block = q[qs : qs + _EXACT_QUERIES]
            lists: list[list[int]] = [[] for _ in block]
            dists: list[list[float]] = [[] for _ in block]
            for start in range(0, self.count, _EXACT_ROWS):
                rows = self.vectors[start : start + _EXACT_ROWS]
                d = _distances(block, rows)
                kk = min(k, d.shape[1])
                if kk == 0:
                    continue
                for i, ex in enumerate(skip[qs : qs + len(block)]):
                    d[i, [j - start for j in ex if start <= j < start + len(rows)]] = np.inf
                # the chunk's k best and everything tied with the k-th
                kth = np.partition(d, kk - 1, axis=1)[:, kk - 1]
                for i in range(len(block)):
                    sel = np.flatnonzero((d[i] <= kth[i]) & np.isfinite(d[i]))
                    lists[i].extend((sel + start).tolist())
                    dists[i].extend(d[i, sel].tolist())
            idx, dist = _padded(lists, dists)
            idx, dist = _ranked(idx, dist, k)
            out_i.append(idx)
            out_d.append(dist)
        if not out_i:
            return _ranked(np.zeros((0, 0), np.int64), np.zeros((0, 0)), k)
        return np.concatenate(out_i), np.concatenate(out_d)


def merge_results(
    parts: Sequence[tuple[np.ndarray, np.ndarray, int]], k: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k over segments: ``parts`` are ``(indices, distances, offset)`` for
    the same queries, local indices (``-1`` = none) shifted by ``offset`` to
    global ones; ``k`` defaults to the widest part.  Ties go to the lower
    global index, as in a single index over all segments."""
    if not parts:
        raise ValueError("merge_results needs at least one segment's results")
    n = len(parts[0][0])
    cands, dists = [], []
    for idx, dist, offset in parts:
        idx = np.asarray(idx, np.int64).reshape(n, -1)
        cands.append(np.where(idx >= 0, idx + int(offset), -1))
        dists.append(np.asarray(dist, np.float32).reshape(n, -1))
    width = max(c.shape[1] for c in cands) if k is None else k
    return _ranked(np.concatenate(cands, axis=1), np.concatenate(dists, axis=1), width)
