"""Queries and evaluation against a built target.

A :class:`Retriever` opens a target's ref and needs nothing else: the ref
names the index, the item table and the query chain (the item nodes, their
parameters and the fit objects they read).  A query image runs through the
same node functions the build ran -- decode, normalize, embed (or describe
and histogram, or encode) -- so its vector is computed exactly as the
database's were, and then the index is searched.  Nothing is trained or
recomputed, and nothing is written.

If the installed code of a chain node differs from the code the index was
built with (its fingerprint or version changed), the query refuses with a
clear message instead of comparing vectors of two different functions.

Start-up matters here (``flow query`` should answer within a second), so
this module imports only numpy and annoy at the top; the chain's nodes
import what they need (onnxruntime for the CNN, never torch).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flow.errors import FlowError

__all__ = ["Hit", "Retriever"]


@dataclass
class Hit:
    rank: int
    distance: float
    id: str
    labels: tuple[str, ...]
    index: int

    def to_json(self) -> dict:
        return {
            "rank": self.rank,
            "distance": round(float(self.distance), 6),
            "id": self.id,
            "labels": list(self.labels),
        }


@dataclass
class _Segment:
    """One segment of a target's index: its searcher, item ids and labels."""

    ids: tuple[str, ...]
    labels: list[tuple[str, ...]]
    count: int
    searcher: Any

    @classmethod
    def open(cls, store: Any, ref_name: str, seg: dict) -> _Segment:
        from store.objects import read_object, read_object_manifest

        ix_node, ix_rk = seg["index"]
        manifest = read_object_manifest(store, ix_node, bytes.fromhex(ix_rk))
        if manifest is None or "failure" in manifest:
            raise FlowError(f"index {ix_node}/{ix_rk} of ref {ref_name!r} is not in the store")
        attrs = manifest["attrs"]
        ids = tuple(attrs["ids"])
        table = read_object(store, seg["table"][0], bytes.fromhex(seg["table"][1]))
        if tuple(table["ids"]) != ids:
            raise FlowError(f"ref {ref_name!r}: item table and index disagree")
        labels = [tuple(x.split("|")) if x else () for x in table["labels"]]
        count = int(attrs["count"])
        searcher = None
        if count and ix_node == "code_index":
            from nodes.index import CodeSearcher

            # the packed codes give an exact Hamming scan (faster than annoy's here)
            searcher = CodeSearcher(
                None,
                _blob_path(store, ix_node, ix_rk, manifest, "vectors"),
                int(attrs["bits"]),
                codes_path=_blob_path(store, ix_node, ix_rk, manifest, "codes"),
            )
        elif count and attrs.get("backend") == "hnsw":
            from nodes._hnsw import HnswSearcher

            path = _blob_path(store, ix_node, ix_rk, manifest, "hnsw")
            searcher = HnswSearcher(path, int(attrs["dim"]), count)
        elif count:
            from nodes.index import VectorSearcher

            searcher = VectorSearcher(
                _blob_path(store, ix_node, ix_rk, manifest, "annoy"), int(attrs["dim"])
            )
        return cls(ids, labels, count, searcher)


def _blob_path(store: Any, node: str, rkey: str, manifest: dict, name: str) -> str:
    """A local file holding one blob of an object (the store's own file where it has
    one; otherwise a verified copy in the user's cache, made once)."""
    from store.objects import object_blob_path

    rel = object_blob_path(store, node, bytes.fromhex(rkey), manifest, name)
    local = store.local_path(rel)
    if local is not None and os.path.exists(local):
        return local
    meta = manifest["blobs"][name]
    cache = Path(os.environ.get("FLOW_CACHE", Path.home() / ".cache" / "flow")) / "blobs"
    path = cache / f"{meta['key']}.blob"
    if not path.exists():
        from flow.keys import bytes_key

        data = store.get(rel)
        if bytes_key(data).hex() != meta["key"]:
            raise FlowError(f"blob {name} of {node}/{rkey} failed its checksum")
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    return str(path)


class Retriever:
    """Search one target's index with images or vectors."""

    def __init__(self, store: Any, ref: dict):
        self.store = store
        self.ref = ref
        value = ref["value"]
        self.kind = value["kind"]
        self.segments = [_Segment.open(store, ref["name"], seg) for seg in value["segments"]]
        self.ids: tuple[str, ...] = tuple(i for seg in self.segments for i in seg.ids)
        self.labels = [lab for seg in self.segments for lab in seg.labels]
        self.offsets = np.cumsum([0] + [seg.count for seg in self.segments])[:-1].tolist()
        self.count = sum(seg.count for seg in self.segments)
        self._objects: dict[tuple[str, str], Any] = {}
        self.chain = value["query"]
        self.vector_steps: list[str] = value["vectors"]
        self._nodes: dict[str, Any] = {}
        self._mips: set[str] | None = None

    @classmethod
    def open(cls, store: Any, name: str) -> Retriever:
        from store.refs import read_ref

        ref = read_ref(store, name)
        if ref is None:
            raise FlowError(
                f"no index for target {name!r} in {store.url}: run `flow build index "
                f"--target={name.split('/')[-1]}` first"
            )
        return cls(store, ref)

    # -- the query chain ------------------------------------------------------------

    def _node(self, entry: dict) -> Any:
        n = self._nodes.get(entry["step"])
        if n is None:
            from app.pipeline import load_node

            n = load_node(entry["node"])
            if str(n.version) != str(entry["version"]) or n.fingerprint != entry["fingerprint"]:
                raise FlowError(
                    f"the installed code of node {n.name!r} differs from the code this index "
                    f"was built with (version {entry['version']}, fingerprint "
                    f"{entry['fingerprint'][:12]}; now {n.version}, {n.fingerprint[:12]}): "
                    "rebuild the index (`flow build`) before querying"
                )
            self._nodes[entry["step"]] = n
        return n

    def _object(self, node: str, rkey: str) -> Any:
        k = (node, rkey)
        if k not in self._objects:
            from store.objects import read_object

            self._objects[k] = read_object(self.store, node, bytes.fromhex(rkey))
        return self._objects[k]

    def vectors(self, image: str | os.PathLike | bytes) -> dict[str, Any]:
        """Run the query chain on one image; the values of every chain step."""
        from flow.errors import ItemError
        from store.outputs import canonical_output

        if isinstance(image, bytes):
            data, name = image, "<bytes>"
        else:
            name = os.fspath(image)
            try:
                data = Path(name).read_bytes()
            except OSError as e:
                raise FlowError(f"cannot read query image {name}: {e.strerror or e}") from None
        values: dict[str, Any] = {}
        for entry in self.chain:
            n = self._node(entry)
            args = []
            for w in entry["wires"]:
                if w[0] == "files":
                    args.append(data)
                elif w[0] == "item":
                    args.append(values[w[1]])
                else:
                    args.append(self._object(w[1], w[2]))
            try:
                if n.batched:
                    item_args = [
                        [a] if w[0] != "object" else a for a, w in zip(args, entry["wires"])
                    ]
                    out = n.fn(*item_args, **entry["params"])[0]
                else:
                    out = n.fn(*args, **entry["params"])
            except ItemError as e:
                raise FlowError(f"query image {name}: {entry['step']}: {e.reason}") from None
            values[entry["step"]] = canonical_output(out, node=n.name, allow_blobs=False)
        return values

    def _mips_steps(self) -> set[str]:
        """Chain steps whose vectors are searched by inner product: those whose
        fit object (the embedder) says ``"query": "mips"``.  Their stored
        vectors are in database form; a query takes ``_cnn.query_form``."""
        if self._mips is None:
            self._mips = set()
            for entry in self.chain:
                for w in entry["wires"]:
                    if w[0] == "object":
                        obj = self._object(w[1], w[2])
                        if isinstance(obj, dict) and obj.get("query") == "mips":
                            self._mips.add(entry["step"])
        return self._mips

    def _query_vectors(self, vecs: list[np.ndarray]) -> list[np.ndarray]:
        mips = self._mips_steps()
        if not mips:
            return vecs
        from nodes._cnn import query_form

        return [
            query_form(v) if step in mips else v
            for v, step in zip(vecs, self.vector_steps, strict=True)
        ]

    def _local_exclude(self, exclude: Any, seg: int) -> Any:
        """Global row exclusions (one set per query) as one segment's local rows."""
        if exclude is None:
            return None
        lo, hi = self.offsets[seg], self.offsets[seg] + self.segments[seg].count
        return [{j - lo for j in ex if lo <= j < hi} for ex in exclude]

    def search_vectors(
        self,
        vecs: list[np.ndarray],
        k: int,
        *,
        search_k: int = -1,
        exclude: Any = None,
        shortlist: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Search with the index's input vectors (one array per input step) in every
        segment; results are global rows, best first (``-1``/inf pad)."""
        from nodes.index import merge_results

        vecs = self._query_vectors([np.asarray(v) for v in vecs])
        n = len(vecs[0])
        live = [j for j, seg in enumerate(self.segments) if seg.searcher is not None]
        if not live:
            return np.full((n, k), -1, np.int64), np.full((n, k), np.inf, np.float32)
        if len(vecs) == 1:  # real vectors: annoy per segment, merged by distance
            parts = [
                (
                    *self.segments[j].searcher.search(
                        vecs[0], k, search_k, self._local_exclude(exclude, j)
                    ),
                    self.offsets[j],
                )
                for j in live
            ]
            return merge_results(parts, k)
        # binary codes: one Hamming shortlist over all segments, then exact cosine
        codes, real = vecs
        s = max(k, shortlist if shortlist is not None else max(100, 10 * k))
        parts = [
            (
                *self.segments[j].searcher.search(
                    None, s, search_k, self._local_exclude(exclude, j), codes=codes, rerank=False
                ),
                self.offsets[j],
            )
            for j in live
        ]
        cand, _ = merge_results(parts, s)
        q = real / np.maximum(np.linalg.norm(real, axis=1, keepdims=True), 1e-12)
        out_i = np.full((n, k), -1, np.int64)
        out_d = np.full((n, k), np.inf, np.float32)
        for r in range(n):
            rows = cand[r][cand[r] >= 0]
            if not len(rows):
                continue
            vec = self._rows(rows)
            cos = vec.astype(np.float64) @ q[r].astype(np.float64)
            d = np.clip(1.0 - cos, 0.0, 2.0).astype(np.float32)
            order = np.lexsort((rows, d))[:k]
            out_i[r, : len(order)] = rows[order]
            out_d[r, : len(order)] = d[order]
        return out_i, out_d

    def _rows(self, rows: np.ndarray) -> np.ndarray:
        """Unit real vectors of global ``rows`` (code segments keep them for re-ranking)."""
        out = []
        for g in rows.tolist():
            j = int(np.searchsorted(self.offsets, g, side="right")) - 1
            v = np.asarray(self.segments[j].searcher.vectors[g - self.offsets[j]], np.float64)
            out.append(v / max(np.linalg.norm(v), 1e-12))
        return np.stack(out)

    def query(
        self, image: str | os.PathLike | bytes, k: int = 10, *, search_k: int | None = None
    ) -> list[Hit]:
        values = self.vectors(image)
        vecs = [np.asarray(values[s])[None] for s in self.vector_steps]
        idx, dist = self.search_vectors(vecs, k, search_k=-1 if search_k is None else search_k)
        return [
            Hit(r + 1, float(d), self.ids[i], self.labels[i], int(i))
            for r, (i, d) in enumerate(zip(idx[0].tolist(), dist[0].tolist()))
            if i >= 0
        ]


# --------------------------------------------------------------------------
# evaluation
