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

A :class:`Retriever` is one ref's index, fixed: it never changes under a
query.  :class:`LiveRetriever` follows a target's ref: ``refresh()`` (called
by ``flow serve`` every few seconds, or by the user) opens the new ref's index
completely, warms it with one query, and only then swaps it in, so a query in
flight keeps the index it started with and none sees a half-loaded one.

Region targets (``kind = "regions"``, :mod:`nodes.regions`) hold tiles of
every image.  A query box (``roi``, ``(x, y, w, h)`` in the query image's
pixels) is described like the tiles (the words of the superpixels inside it)
and the results are regions -- an item and a box in its pixels -- at most one
per study (images without a study UID count as their own study).  Whole-image
targets take ``roi`` as a crop of the query image.

Start-up matters here (``flow query`` should answer within a second), so
this module imports only numpy and annoy at the top; the chain's nodes
import what they need (onnxruntime for the CNN, never torch).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flow.errors import FlowError

__all__ = [
    "Hit",
    "LiveRetriever",
    "Result",
    "Retriever",
    "built_targets",
    "open_target",
    "parse_roi",
    "unknown_target",
]

# what a query's own decoded attributes may show (decode's whitelist, without the
# salted study hash, which means nothing to a reader)
QUERY_ATTRS = ("format", "modality", "photometric", "frames", "rows", "columns", "view_position")


@dataclass
class Hit:
    rank: int
    distance: float
    id: str
    labels: tuple[str, ...]
    index: int
    box: tuple[int, int, int, int] | None = None  # region targets: x, y, w, h in its pixels
    size: tuple[int, int] | None = None  # region targets: the item's width, height

    def to_json(self) -> dict:
        out = {
            "rank": self.rank,
            "distance": round(float(self.distance), 6),
            "id": self.id,
            "labels": list(self.labels),
        }
        if self.box is not None:
            out["box"] = list(self.box)
        if self.size is not None:
            out["size"] = list(self.size)
        return out


@dataclass
class Result:
    """A query's hits, and what the query image was (whitelisted attributes only)."""

    hits: list[Hit]
    target: str
    kind: str
    seq: int
    query: dict
    roi: tuple[int, int, int, int] | None = None


def built_targets(store: Any) -> list[str]:
    """The targets that have an index in ``store`` (their refs)."""
    from store.refs import list_refs

    return [n for n in list_refs(store) if "/" not in n and n != "forgotten"]


def open_target(project: Any, store: str | None, target: str) -> Retriever:
    """The index of ``target`` for ``flow query``: the project at ``project`` (a path;
    its store, or ``store`` instead), or a store URL alone."""
    from app.project import load_project

    if store and not project:
        from store import open_store

        return Retriever.open(open_store(store), target)
    proj = load_project(project, store=store)
    return Retriever.open(proj.open_store(), target, declared=list(proj.targets))


def unknown_target(store: Any, name: str, declared: Any = None) -> FlowError:
    """The error for a target with no index: not built yet (a project target, exit 1),
    or no such target (a usage error naming the valid ones, exit 2)."""
    from flow.errors import ConfigError

    target = name.split("/")[-1]
    built = built_targets(store)
    if declared is not None and target in declared:
        return FlowError(
            f"target {target!r} has no index yet in {store.url}: run `flow build index "
            f"--target={target}` first"
        )
    names = sorted(set(built) | set(declared or ()))
    return ConfigError(
        f"no target {target!r}; "
        + (f"the targets are: {', '.join(names)}" if names else "this project has none built yet")
    )


def parse_roi(text: str | None) -> tuple[int, int, int, int] | None:
    """``"x,y,w,h"`` (pixels; integers) as a tuple, or FlowError naming the problem."""
    if text is None or str(text).strip() == "":
        return None
    parts = str(text).replace(" ", "").split(",")
    try:
        vals = tuple(int(float(p)) for p in parts)
    except ValueError:
        vals = ()
    if len(vals) != 4 or vals[2] < 1 or vals[3] < 1 or vals[0] < 0 or vals[1] < 0:
        raise FlowError(f"roi {text!r}: expected x,y,w,h in image pixels (x, y >= 0; w, h >= 1)")
    return vals  # type: ignore[return-value]


@dataclass
class _Segment:
    """One segment of a target's index: its searcher, item ids and labels."""

    ids: tuple[str, ...]
    labels: list[tuple[str, ...]]
    count: int
    searcher: Any
    regions: int = 0  # region targets: how many regions the segment holds

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
        if ix_node == "region_index":
            from nodes.regions import RegionSearcher

            n_regions = int(attrs["regions"])
            if n_regions:
                searcher = RegionSearcher(
                    _blob_path(store, ix_node, ix_rk, manifest, "annoy"),
                    _blob_path(store, ix_node, ix_rk, manifest, "table"),
                    int(attrs["dim"]),
                )
            return cls(ids, labels, count, searcher, n_regions)
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
    """Search one target's index (one ref entry, fixed) with images or vectors."""

    def __init__(self, store: Any, ref: dict):
        self.store = store
        self.ref = ref
        self.name = ref.get("name", "")
        self.seq = int(ref.get("seq", 0))
        value = ref["value"]
        self.kind = value["kind"]
        self.segments = [_Segment.open(store, ref["name"], seg) for seg in value["segments"]]
        self.ids: tuple[str, ...] = tuple(i for seg in self.segments for i in seg.ids)
        self.labels = [lab for seg in self.segments for lab in seg.labels]
        self.offsets = np.cumsum([0] + [seg.count for seg in self.segments])[:-1].tolist()
        self.count = sum(seg.count for seg in self.segments)
        self.regions = sum(seg.regions for seg in self.segments)
        self._objects: dict[tuple[str, str], Any] = {}
        self.chain = value["query"]
        self.vector_steps: list[str] = value["vectors"]
        self._nodes: dict[str, Any] = {}
        self._mips: set[str] | None = None
        self._positions: dict[str, int] | None = None
        self._rates: dict[str, float] | None = None

    @classmethod
    def open(cls, store: Any, name: str, declared: Any = None) -> Retriever:
        """The current index of target ``name``.  ``declared``: the project's target
        names, where a project is at hand (to tell "not built yet" from a typo)."""
        from store.refs import read_ref

        ref = read_ref(store, name)
        if ref is None:
            raise unknown_target(store, name, declared)
        return cls(store, ref)

    # -- what it holds -----------------------------------------------------------------

    def position(self, item_id: str) -> int | None:
        """The global row of ``item_id`` in this index, or None."""
        if self._positions is None:
            self._positions = {iid: j for j, iid in enumerate(self.ids)}
        return self._positions.get(item_id)

    def label_rates(self) -> dict[str, float]:
        """Each label's share of the indexed items (the archive's base rates)."""
        if self._rates is None:
            counts: dict[str, int] = {}
            for labs in self.labels:
                for lab in labs:
                    counts[lab] = counts.get(lab, 0) + 1
            n = max(self.count, 1)
            self._rates = {lab: c / n for lab, c in sorted(counts.items())}
        return self._rates

    def warm(self) -> None:
        """Load the chain's nodes and fit objects and run one query, so that the
        first real query pays no start-up cost (best effort)."""
        from app.pipeline import FitWire, query_wire

        for entry in self.chain:
            self._node(entry)
            for w in map(query_wire, entry["wires"]):
                if isinstance(w, FitWire):
                    self._object(w.node, w.rkey)
        self._mips_steps()
        self.position("")
        self.label_rates()
        with contextlib.suppress(FlowError):
            self.search(_warm_image(), k=1)

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

    def _step(self, suffix: str) -> dict | None:
        """The chain entry whose node is ``module:<suffix>`` (e.g. ``decoded``)."""
        return next((e for e in self.chain if e["node"].endswith(":" + suffix)), None)

    def vectors(
        self,
        image: str | os.PathLike | bytes,
        *,
        roi: tuple[int, int, int, int] | None = None,
        upto: str | None = None,
    ) -> dict[str, Any]:
        """Run the query chain on one image; the values of every chain step.

        ``roi`` crops the decoded image to that box (x, y, w, h in its pixels)
        before the rest of the chain; ``upto`` stops after that step."""
        from flow.errors import ItemError
        from store.outputs import canonical_output

        if isinstance(image, bytes | bytearray | memoryview):
            data, name = bytes(image), "<upload>"
        else:
            name = os.fspath(image)
            try:
                data = Path(name).read_bytes()
            except OSError as e:
                raise FlowError(f"cannot read query image {name}: {e.strerror or e}") from None
        from app.pipeline import FitWire, ImageWire, StepWire, query_wire

        values: dict[str, Any] = {}
        for entry in self.chain:
            n = self._node(entry)
            wires = [query_wire(w) for w in entry["wires"]]
            args = []
            for w in wires:
                if isinstance(w, ImageWire):
                    args.append(data)
                elif isinstance(w, StepWire):
                    args.append(values[w.step])
                else:
                    args.append(self._object(w.node, w.rkey))
            try:
                if n.batched:
                    item_args = [a if isinstance(w, FitWire) else [a] for a, w in zip(args, wires)]
                    out = n.fn(*item_args, **entry["params"])[0]
                else:
                    out = n.fn(*args, **entry["params"])
            except ItemError as e:
                raise FlowError(f"query image {name}: {entry['step']}: {e.reason}") from None
            out = canonical_output(out, node=n.name, allow_blobs=False)
            if roi is not None and entry["node"].endswith(":decoded"):
                out = _cropped(out, roi, name)
            values[entry["step"]] = out
            if upto is not None and entry["step"] == upto:
                break
        return values

    def _mips_steps(self) -> set[str]:
        """Chain steps whose vectors are searched by inner product: those whose
        fit object (the embedder) says ``"query": "mips"``.  Their stored
        vectors are in database form; a query takes ``_cnn.query_form``."""
        if self._mips is None:
            from app.pipeline import FitWire, query_wire

            mips = set()
            for entry in self.chain:
                for w in map(query_wire, entry["wires"]):
                    if isinstance(w, FitWire):
                        obj = self._object(w.node, w.rkey)
                        if isinstance(obj, dict) and obj.get("query") == "mips":
                            mips.add(entry["step"])
            self._mips = mips
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
        segment; results are global rows, best first (``-1``/inf pad).  A region
        index takes one region vector per query and ranks items by their best region."""
        from nodes.index import merge_results

        if self.kind == "regions":
            return self._search_region_rows(vecs[0], k, search_k, exclude)
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

    # -- regions ---------------------------------------------------------------------

    def search_regions(
        self,
        vector: np.ndarray,
        k: int,
        *,
        by_study: bool = True,
        exclude: set[int] = frozenset(),  # type: ignore[assignment]
        search_k: int = -1,
    ) -> list[tuple[int, int, int, float]]:
        """``(global item row, segment, region row, distance)``, best first: the
        nearest region of up to ``k`` studies (or items), over every segment."""
        found: list[tuple[float, int, int, int, Any]] = []
        for j, seg in enumerate(self.segments):
            if seg.searcher is None:
                continue
            lo = self.offsets[j]
            local = {g - lo for g in exclude if lo <= g < lo + seg.count}
            for item, r, d in seg.searcher.search(
                vector, k, by_study=by_study, exclude=local, search_k=search_k
            ):
                grp = seg.searcher.group(item) if by_study else None
                key = grp if isinstance(grp, str) else self.ids[lo + item]
                found.append((d, lo + item, j, r, key))
        found.sort(key=lambda t: (t[0], t[1]))
        out, seen = [], set()
        for d, g, j, r, key in found:
            if key in seen:
                continue
            seen.add(key)
            out.append((g, j, r, d))
            if len(out) == k:
                break
        return out

    def _search_region_rows(self, vecs: np.ndarray, k: int, search_k: int, exclude: Any):
        q = np.asarray(vecs, np.float32).reshape(-1, np.asarray(vecs).shape[-1])
        out_i = np.full((len(q), k), -1, np.int64)
        out_d = np.full((len(q), k), np.inf, np.float32)
        for i, v in enumerate(q):
            ex = set(exclude[i]) if exclude is not None else set()
            hits = self.search_regions(v, k, by_study=False, exclude=ex, search_k=search_k)
            for c, (g, _, _, d) in enumerate(hits):
                out_i[i, c], out_d[i, c] = g, d
        return out_i, out_d

    def _region_query(self, image: Any, roi: tuple | None) -> tuple[np.ndarray, dict]:
        """The query box's region vector (the whole image without ``roi``), and
        the decoded value (for its attributes)."""
        from nodes.regions import box_vector, to_normalized

        entry = self._step("regions")
        dec, norm = self._step("decoded"), self._step("normalized")
        if entry is None or dec is None or norm is None:
            raise FlowError(f"ref {self.name!r}: a region index without its query chain")
        from app.pipeline import query_wire

        self._node(entry)  # refuses when the regions code changed since the build
        # regions(decoded, normalized, descriptors, vocabulary): see nodes.regions
        _, _, desc, vocab_wire = (query_wire(w) for w in entry["wires"])
        desc_step = desc.step
        values = self.vectors(image, upto=desc_step)
        decoded, normalized = values[dec["step"]], values[norm["step"]]
        vocab = self._object(vocab_wire.node, vocab_wire.rkey)
        size = int(np.asarray(normalized).shape[0])
        shape = np.asarray(decoded["pixels"]).shape
        if roi is None:
            box = np.array([0.0, 0.0, size, size])
        else:
            _check_roi(roi, shape)
            box = to_normalized(roi, shape, size, norm["params"].get("aspect", "pad"))
        params = {k: v for k, v in entry["params"].items() if k in ("neighbours", "sigma")}
        vec, count = box_vector(values[desc_step], vocab, box, **params)
        if count == 0:
            raise FlowError(
                "the region of interest holds no image structure (no superpixel centre "
                "inside it): draw a larger box"
            )
        return vec, decoded

    # -- queries ----------------------------------------------------------------------

    def search(
        self,
        image: str | os.PathLike | bytes,
        k: int = 10,
        *,
        roi: tuple[int, int, int, int] | None = None,
        search_k: int | None = None,
        exclude_ids: tuple[str, ...] = (),
    ) -> Result:
        """The ``k`` nearest items (region targets: regions, one per study) to
        ``image`` (a path or its bytes), with the query's whitelisted attributes."""
        if k < 1:
            raise FlowError(f"k must be at least 1, got {k}")
        if not self.count:
            raise FlowError(
                f"the index of target {self.name!r} (ref #{self.seq}) holds no items: "
                "nothing to search (`flow status` shows why; `flow log "
                f"{self.name.split('/')[-1]}` its history)"
            )
        sk = -1 if search_k is None else search_k
        exclude = {p for p in (self.position(i) for i in exclude_ids) if p is not None}
        if self.kind == "regions":
            vec, decoded = self._region_query(image, roi)
            hits = []
            for rank, (g, j, r, d) in enumerate(
                self.search_regions(vec, k, exclude=exclude, search_k=sk), 1
            ):
                hits.append(self._region_hit(rank, g, j, r, d))
        else:
            values = self.vectors(image, roi=roi)
            dec = self._step("decoded")
            decoded = values[dec["step"]] if dec else {}
            vecs = [np.asarray(values[s])[None] for s in self.vector_steps]
            idx, dist = self.search_vectors(
                vecs, k, search_k=sk, exclude=[exclude] if exclude else None
            )
            hits = [
                Hit(r + 1, float(d), self.ids[i], self.labels[i], int(i))
                for r, (i, d) in enumerate(zip(idx[0].tolist(), dist[0].tolist()))
                if i >= 0
            ]
        attrs = {a: decoded[a] for a in QUERY_ATTRS if isinstance(decoded, dict) and a in decoded}
        return Result(hits, self.name, self.kind, self.seq, attrs, roi)

    def _region_hit(self, rank: int, g: int, j: int, r: int, d: float) -> Hit:
        from nodes.regions import from_normalized

        seg = self.segments[j]
        s = seg.searcher
        item = g - self.offsets[j]
        shape = tuple(int(v) for v in s.shapes[item])
        norm = self._step("normalized")
        size = int(norm["params"].get("size", 64)) if norm else 64
        aspect = norm["params"].get("aspect", "pad") if norm else "pad"
        box = from_normalized(s.boxes[r], shape, size, aspect)
        return Hit(rank, d, self.ids[g], self.labels[g], g, box, (shape[1], shape[0]))

    def query(
        self,
        image: str | os.PathLike | bytes,
        k: int = 10,
        *,
        search_k: int | None = None,
        roi: tuple[int, int, int, int] | None = None,
    ) -> list[Hit]:
        return self.search(image, k, roi=roi, search_k=search_k).hits

    def picture(self, data: bytes) -> np.ndarray:
        """The image as the build decoded it (the chain's decode step: same VOI
        window), float32 in [0, 1]."""
        dec = self._step("decoded")
        if dec is None:
            raise FlowError(f"ref {self.name!r}: no decode step in its query chain")
        return np.asarray(self.vectors(data, upto=dec["step"])[dec["step"]]["pixels"])


def _check_roi(roi: tuple, shape: tuple) -> None:
    x, y, w, h = roi
    rows, cols = int(shape[0]), int(shape[1])
    if x >= cols or y >= rows or x + w <= 0 or y + h <= 0:
        raise FlowError(f"roi {x},{y},{w},{h} lies outside the image ({cols} x {rows} pixels)")


def _cropped(decoded: Any, roi: tuple, name: str) -> Any:
    """The decoded value with its pixels cut to ``roi`` (clipped to the image)."""
    if not isinstance(decoded, dict):
        return decoded
    px = np.asarray(decoded["pixels"])
    _check_roi(roi, px.shape)
    x, y, w, h = roi
    x1, y1 = min(px.shape[1], x + w), min(px.shape[0], y + h)
    out = dict(decoded)
    out["pixels"] = np.ascontiguousarray(px[max(0, y) : y1, max(0, x) : x1])
    return out


def _warm_image() -> bytes:
    """A small PNG with some structure (a warm-up query must get through the chain)."""
    import io

    from PIL import Image

    yy, xx = np.mgrid[0:64, 0:64]
    img = (127 + 60 * np.sin(xx / 5.0) * np.cos(yy / 7.0)).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


class LiveRetriever:
    """A target's index that follows its ref.

    >>> live = LiveRetriever(store, "cnn")            # doctest: +SKIP
    >>> live.search("study.dcm", k=10).hits           # doctest: +SKIP
    >>> live.refresh()   # True when the ref moved  # doctest: +SKIP

    ``current`` is a fixed :class:`Retriever`; :meth:`refresh` opens and warms
    the ref's new index before swapping it in (one assignment), so concurrent
    queries each see one whole index, old or new.  A ref that moved to an index
    that cannot be opened leaves the current one in place (``error`` says why).
    """

    def __init__(self, store: Any, name: str, *, warm: bool = True):
        self.store = store
        self.name = name
        self.error: str | None = None
        self._lock = threading.Lock()
        cur = Retriever.open(store, name)
        if warm:
            cur.warm()
        self._current = cur

    @property
    def current(self) -> Retriever:
        return self._current

    def refresh(self, *, warm: bool = True) -> bool:
        """Swap in the ref's current index if the ref moved; True if swapped."""
        from store.refs import read_ref

        with self._lock:  # one refresh at a time
            ref = read_ref(self.store, self.name)
            if ref is None or int(ref.get("seq", 0)) == self._current.seq:
                return False
            try:
                new = Retriever(self.store, ref)
                if warm:
                    new.warm()
            except Exception as e:  # keep serving the index we have
                self.error = f"ref {self.name!r} seq {ref.get('seq')}: {e}"
                return False
            self.error = None
            self._current = new
            return True

    def search(self, image: Any, k: int = 10, **kw: Any) -> Result:
        return self._current.search(image, k, **kw)

    def query(self, image: Any, k: int = 10, **kw: Any) -> list[Hit]:
        return self._current.query(image, k, **kw)


# --------------------------------------------------------------------------
# evaluation
