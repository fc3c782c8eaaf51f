"""Regions of interest: overlapping tiles of each image, each a bag of visual words.

A ``regions`` target indexes parts of images instead of whole images, so that a
query box (a region of interest drawn on a study) finds matching regions across
the archive.

The rule
--------
On the normalized image (``S`` x ``S``, from ``normalize``), the regions are
``grid`` x ``grid`` overlapping square tiles of side ``tile * S``, their
corners on an even lattice from the top-left to the bottom-right corner
(stride ``(1 - tile) / (grid - 1) * S``).  The default ``grid=3, tile=0.5``
gives 9 tiles of half the image side, overlapping by half a tile: every point
of the image is in 1 to 4 tiles, and any box up to a quarter of the side lies
wholly inside at least one tile.

Each tile is described by the superpixels whose centroids fall inside it (the
``descriptors`` node: SLIC superpixels and a local descriptor at each): the
tf-idf weighted, soft-assigned, L2-normalized histogram of their visual words
(the ``vocabulary`` fit), computed exactly like :func:`nodes.bovw.bovw_histogram`
does for a whole image.  A tile holding fewer than ``min_descriptors``
superpixels (letterbox padding, a blank border) is not a region.

A query box is described by the same function (:func:`box_vector`) on the
query's own descriptors, so a region of the archive and a query box are
vectors of one kind, compared by cosine.

``regions`` (item) returns the tiles' boxes and vectors with the source image's
shape (to report a matched box in its pixels) and its salted study hash (to
group results per study); ``region_index`` (set) builds one annoy forest over
every region of every item, with, per region, the item it belongs to.

Boxes here are ``(x0, y0, x1, y1)`` in normalized-image pixels (float);
:func:`to_normalized` and :func:`from_normalized` convert a box in the source
image's pixels to them and back, given normalize's ``size`` and ``aspect``.
"""

from __future__ import annotations

import io

import numpy as np

from flow import Blob, ItemError, Items, node
from nodes.bovw import _descriptor_array, _sq_distances
from nodes.index import _annoy_bytes

__all__ = [
    "box_vector",
    "from_normalized",
    "region_index",
    "regions",
    "tiles",
    "to_normalized",
]


def tiles(size: float, grid: int, tile: float) -> np.ndarray:
    """The ``grid**2`` tile boxes (x0, y0, x1, y1) of an image of side ``size``,
    row by row from the top-left, float64."""
    if grid < 1 or not 0 < tile <= 1:
        raise ValueError(f"need grid >= 1 and 0 < tile <= 1, got {grid=}, {tile=}")
    side = tile * size
    starts = np.linspace(0.0, size - side, grid) if grid > 1 else np.array([0.0])
    return np.array([(x, y, x + side, y + side) for y in starts for x in starts], np.float64)


def box_vector(
    descriptors: dict,
    vocabulary: dict,
    box: tuple[float, float, float, float] | np.ndarray,
    *,
    neighbours: int = 10,
    sigma: float = 1.0,
) -> tuple[np.ndarray, int]:
    """The word histogram of the descriptors whose centres lie in ``box`` (x0, y0,
    x1, y1 in normalized-image pixels, inclusive) and how many there are.

    tf-idf weighted, soft-assigned (``neighbours`` nearest words, Gaussian
    weights of width ``sigma``), L2-normalized float32; the zero vector for
    a box holding no descriptor.
    """
    if neighbours < 1 or not sigma > 0:
        raise ValueError(f"need neighbours >= 1 and sigma > 0, got {neighbours=}, {sigma=}")
    centroids = np.asarray(vocabulary["centroids"], dtype=np.float64)
    idf = np.asarray(vocabulary["idf"], dtype=np.float64)
    x = _descriptor_array(descriptors, "regions")
    centers = np.asarray(descriptors["centers"], dtype=np.float64).reshape(-1, 2)
    x0, y0, x1, y1 = (float(v) for v in box)
    inside = (
        (centers[:, 1] >= x0)
        & (centers[:, 1] <= x1)
        & (centers[:, 0] >= y0)
        & (centers[:, 0] <= y1)
    )
    x = x[inside]
    hist = np.zeros(len(centroids))
    if len(x) == 0:
        return hist.astype(np.float32), 0
    if x.shape[1] != centroids.shape[1]:
        raise ValueError(
            f"regions: descriptors have {x.shape[1]} dimensions, the vocabulary "
            f"{centroids.shape[1]}; they were made with different descriptor parameters"
        )
    m = min(neighbours, len(centroids))
    d2 = _sq_distances(x, centroids)
    near = np.argsort(d2, axis=1, kind="stable")[:, :m]
    nd = np.take_along_axis(d2, near, axis=1)
    w = np.exp(-(nd - nd[:, :1]) / (2.0 * sigma * sigma))
    w /= w.sum(axis=1, keepdims=True)
    np.add.at(hist, near.ravel(), w.ravel())
    hist *= idf / len(x)
    norm = np.sqrt((hist * hist).sum())
    return (hist / norm if norm > 0 else hist).astype(np.float32), len(x)


@node(version=1)
def regions(
    decoded: dict,
    normalized: np.ndarray,
    descriptors: dict,
    vocabulary: dict,
    *,
    grid: int = 3,
    tile: float = 0.5,
    min_descriptors: int = 3,
    neighbours: int = 10,
    sigma: float = 1.0,
) -> dict:
    """An image's regions: ``{"boxes": float32 (r, 4) x0,y0,x1,y1 in normalized
    pixels, "vectors": float32 (r, words), "shape": int32 (rows, cols) of the
    source image, "study": salted study hash or ""}``."""
    if min_descriptors < 1:
        raise ValueError(f"min_descriptors must be >= 1, got {min_descriptors}")
    img = np.asarray(normalized)
    pixels = np.asarray(decoded["pixels"]) if isinstance(decoded, dict) else np.asarray(decoded)
    if img.ndim != 2 or pixels.ndim != 2:
        raise ItemError(f"regions needs 2-D images, got {img.shape} and {pixels.shape}")
    words = len(np.asarray(vocabulary["centroids"]))
    boxes, vectors = [], []
    for box in tiles(img.shape[0], grid, tile):
        vec, n = box_vector(descriptors, vocabulary, box, neighbours=neighbours, sigma=sigma)
        if n >= min_descriptors:
            boxes.append(box)
            vectors.append(vec)
    study = decoded.get("study", "") if isinstance(decoded, dict) else ""
    return {
        "boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
        "vectors": np.asarray(vectors, np.float32).reshape(-1, words),
        "shape": np.asarray(pixels.shape, np.int32),
        "study": str(study or ""),
    }


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{k: np.ascontiguousarray(v) for k, v in arrays.items()})
    return buf.getvalue()


@node(version=1, kind="set")
def region_index(regions: Items, *, trees: int = 50, seed: int = 0) -> dict:
    """One annoy ``angular`` forest over every region of every item (region j =
    the j-th row of the items' ``vectors``, in ``Items`` order), and a table of
    the regions: ``{"annoy": Blob, "table": Blob(.npz: owner (item position),
    boxes, shapes per item, study per item), "dim", "count" (items), "regions",
    "ids"}``."""
    if trees < 1:
        raise ValueError(f"trees must be >= 1, got {trees}")
    vecs, boxes, owners, shapes, studies = [], [], [], [], []
    dim = None
    for pos, (item_id, v) in enumerate(zip(regions.ids, regions.values, strict=True)):
        x = np.asarray(v["vectors"], np.float32)
        if x.ndim != 2 or (dim is not None and len(x) and x.shape[1] != dim):
            raise ValueError(f"region vectors of {item_id!r} have shape {x.shape}")
        if len(x):
            dim = x.shape[1]
        vecs.append(x)
        boxes.append(np.asarray(v["boxes"], np.float32).reshape(-1, 4))
        owners.append(np.full(len(x), pos, np.int32))
        shapes.append(np.asarray(v["shape"], np.int32))
        studies.append(str(v.get("study", "")))
    n_regions = sum(len(x) for x in vecs)
    if n_regions:
        x = np.concatenate([x for x in vecs if len(x)])
        data = _annoy_bytes((row.tolist() for row in x), int(dim), "angular", trees, seed)
    else:
        data = b""
    table = _npz_bytes(
        owner=np.concatenate(owners) if owners else np.zeros(0, np.int32),
        boxes=np.concatenate(boxes) if boxes else np.zeros((0, 4), np.float32),
        shapes=np.stack(shapes) if shapes else np.zeros((0, 2), np.int32),
        studies=np.asarray(studies, dtype="U64") if studies else np.zeros(0, "U64"),
    )
    return {
        "annoy": Blob(data),
        "table": Blob(table),
        "backend": "annoy",
        "dim": int(dim or 0),
        "count": len(regions),
        "regions": int(n_regions),
        "ids": tuple(regions.ids),
        "metric": "angular",
    }


# --------------------------------------------------------------------------
# geometry: source-image pixels <-> normalized-image pixels


def _frame(shape: tuple[int, int], size: int, aspect: str) -> tuple[float, float, float, float]:
    """(scale_x, scale_y, offset_x, offset_y): normalized = source * scale + offset."""
    h, w = int(shape[0]), int(shape[1])
    if aspect == "stretch":
        return size / w, size / h, 0.0, 0.0
    if aspect == "crop":
        side = min(h, w)
        s = size / side
        return s, s, -((w - side) // 2) * s, -((h - side) // 2) * s
    scale = size / max(h, w)
    nh, nw = max(1, min(size, round(h * scale))), max(1, min(size, round(w * scale)))
    return nw / w, nh / h, float((size - nw) // 2), float((size - nh) // 2)


def to_normalized(box, shape, size: int, aspect: str = "pad") -> np.ndarray:
    """A box ``(x, y, w, h)`` in source-image pixels as (x0, y0, x1, y1) in the
    normalized image's pixels."""
    sx, sy, ox, oy = _frame(shape, size, aspect)
    x, y, w, h = (float(v) for v in box)
    return np.array([x * sx + ox, y * sy + oy, (x + w) * sx + ox, (y + h) * sy + oy])


def from_normalized(box, shape, size: int, aspect: str = "pad") -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) in normalized pixels as ``(x, y, w, h)`` in source-image
    pixels, clipped to the image."""
    sx, sy, ox, oy = _frame(shape, size, aspect)
    h_img, w_img = int(shape[0]), int(shape[1])
    x0 = min(max((float(box[0]) - ox) / sx, 0.0), w_img)
    y0 = min(max((float(box[1]) - oy) / sy, 0.0), h_img)
    x1 = min(max((float(box[2]) - ox) / sx, 0.0), w_img)
    y1 = min(max((float(box[3]) - oy) / sy, 0.0), h_img)
    return round(x0), round(y0), max(1, round(x1 - x0)), max(1, round(y1 - y0))


# --------------------------------------------------------------------------
# searching


class RegionSearcher:
    """Cosine search over a ``region_index``: the best region per group.

    ``annoy_path`` and ``table_path``: the index's ``annoy`` and ``table``
    files; ``dim``: its ``dim``.  :meth:`search` asks annoy for more and more
    regions until ``k`` groups (items, or studies) have one, or every region
    was seen; each group is represented by its nearest region.
    """

    def __init__(self, annoy_path: str, table_path: str, dim: int):
        from nodes.index import VectorSearcher

        self.vectors = VectorSearcher(annoy_path, dim)
        with np.load(table_path, allow_pickle=False) as z:
            self.owner = z["owner"].astype(np.int64)
            self.boxes = z["boxes"].astype(np.float32)
            self.shapes = z["shapes"].astype(np.int64)
            self.studies = z["studies"].tolist()
        self.dim = int(dim)
        self.count = len(self.owner)

    def search(
        self,
        vector: np.ndarray,
        k: int,
        *,
        by_study: bool = True,
        exclude: set[int] | frozenset[int] = frozenset(),
        search_k: int = -1,
    ) -> list[tuple[int, int, float]]:
        """Up to ``k`` ``(item position, region row, distance)``, best first, one
        per study (``by_study``; items without a study are their own) or per item;
        ``exclude``: item positions left out."""
        if self.count == 0 or k <= 0:
            return []
        n = min(self.count, max(50, 8 * k))
        while True:
            idx, dist = self.vectors.search(np.asarray(vector, np.float32)[None], n, search_k)
            out: list[tuple[int, int, float]] = []
            seen: set = set()
            for r, d in zip(idx[0].tolist(), dist[0].tolist()):
                if r < 0:
                    break
                item = int(self.owner[r])
                if item in exclude:
                    continue
                group = self.group(item) if by_study else item
                if group in seen:
                    continue
                seen.add(group)
                out.append((item, r, float(d)))
                if len(out) == k:
                    return out
            if n >= self.count:
                return out
            n = min(self.count, n * 4)

    def group(self, item: int) -> str | int:
        study = self.studies[item] if item < len(self.studies) else ""
        return f"s:{study}" if study else item

    def close(self) -> None:
        self.vectors.close()
