"""Superpixel bag of visual words: descriptors, a vocabulary, tf-idf histograms.

The classic medical BoVW baseline in three nodes:

* ``descriptors`` (item): SLIC superpixels (scikit-image) on the normalized
  grayscale image, and one local descriptor at the centroid of each.
* ``vocabulary`` (set, the fit): k-means (scikit-learn) on a seeded sample of
  the training descriptors, and the inverse document frequency of each word
  over the training items.
* ``bovw_histogram`` (item): soft assignment of an image's descriptors to its
  nearest words, tf-idf weighted, L2-normalized: a float32 vector of length
  ``words`` for cosine (annoy angular) retrieval.

The descriptor
--------------
At each superpixel centroid (rounded to a pixel), a ``patch`` x ``patch``
window (edge-padded at the borders) is reduced to ``grid`` x ``grid`` cell
means, mean-centred and scaled to unit length: the *local contrast pattern*,
independent of brightness.  Two more components bring back what that drops,
with a weight each: the superpixel's mean intensity (``intensity_weight``)
and its centroid ``(row, col) / size`` (``position_weight``).  So a word is
"this local pattern, about this bright, about here": a chest radiograph's
anatomy sits in roughly the same place in every image, and position-aware
words let the orderless histogram keep the coarse layout that a plain BoVW
throws away.  ``d = grid**2 + 2 + 1`` (19 by default).

Why this descriptor.  Selected on nih-dev train with patient-grouped 4-fold
cross-validation (AvG@10; random 0.330, raw-pixel cosine 0.393): at 64 px,
pattern + intensity + position 0.371, DAISY (104-d, dense, sampled at the
centroids) + the same extras 0.358-0.364, per-patch HOG 0.361; at 128 px,
pattern + extras 0.381-0.388, DAISY + pattern + extras 0.383 -- equal within
noise (about +-0.01), so the 19-d descriptor won on cost: k-means on it takes
seconds and it avoids HOG's per-patch call (~70 ms per image).  Position and
intensity were worth more than the choice of the texture part (0.359 ->
0.371 at 64 px), and 128 px beat 64 px.  On nih-dev val (train as database)
the defaults give AvG@10 0.365, precision@10 0.360, mAP@10 0.460: level with
raw-pixel cosine (0.366 / 0.362 / 0.481) and above random (0.326).  Defaults
are tuned for 128 px images (``patch=24`` is 3/16 of the side); at 64 px use
``n_segments=100, patch=12``.

Assignment and weighting
------------------------
Each descriptor votes for its ``neighbours`` nearest words with Gaussian
weights ``exp(-(d^2 - d_min^2) / (2 sigma^2))`` normalized to sum 1 (the
"kernel codebook"; ``neighbours=1`` is hard assignment).  Term frequency is
the votes divided by the number of descriptors; ``idf = ln((1 + N) / (1 +
df)) + 1`` (smoothed, never zero) where ``df`` counts the training items in
which the word is some descriptor's nearest word.  Soft assignment gave a
small, consistent gain (AvG@10 +0.006) over hard.

Empty images.  A constant image (max - min below ``1e-6``: blank, padding,
a failed window) has no content to describe: ``descriptors`` returns ``(0,
d)`` arrays and ``bovw_histogram`` returns the **zero vector**.  Its cosine
with everything is 0, the least any two (non-negative) histograms can have,
and annoy's angular distance to it is sqrt(2), like an orthogonal vector;
a uniform vector instead would look like a real, featureless image.
Indexes must accept zero vectors.

Determinism
-----------
SLIC is deterministic (grid-initialized).  Distances to the words are
computed without BLAS, dimension by dimension in a fixed order, in float64
(every operation is a single IEEE rounding), so the chosen words do not
depend on threads or batch composition.  k-means runs with BLAS and OpenMP
pinned to one thread (``threadpoolctl``) from ``random_state=seed`` with a
fixed ``n_init``, so the vocabulary is bit-identical across processes and
thread settings on one machine; on a different CPU, BLAS kernels may round
differently and k-means could settle elsewhere (rare; not guaranteed).
Outputs are published as float32.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from flow import ItemError, Items, node
from nodes._threads import single_threaded

__all__ = ["bovw_histogram", "descriptors", "vocabulary"]

_FLAT = 1e-6  # an image with max - min below this is blank
_CONTRAST_EPS = 1e-3  # keeps near-flat patches from blowing up when scaled
_CHUNK = 4096  # descriptors per distance block (x words x 8 bytes)


def _check_image(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim != 2 or min(img.shape) < 1:
        raise ItemError(f"descriptors needs a 2-D grayscale image, got shape {img.shape}")
    if not np.issubdtype(img.dtype, np.number) or np.iscomplexobj(img):
        raise ItemError(f"descriptors needs a real-valued image, got dtype {img.dtype}")
    img = img.astype(np.float64)
    if not np.isfinite(img).all():
        raise ItemError("image has NaN or infinite pixels")
    return img


def _cell_means(patches: np.ndarray, grid: int) -> np.ndarray:
    """(n, p, p) patches -> (n, grid*grid) means over a grid of near-equal cells."""
    p = patches.shape[1]
    edges = np.linspace(0, p, grid + 1).round().astype(np.intp)
    sums = np.add.reduceat(np.add.reduceat(patches, edges[:-1], axis=1), edges[:-1], axis=2)
    sizes = np.diff(edges)
    return (sums / np.outer(sizes, sizes)).reshape(len(patches), grid * grid)


@node(version=1)
def descriptors(
    image: np.ndarray,
    *,
    n_segments: int = 200,
    compactness: float = 0.1,
    patch: int = 24,
    grid: int = 4,
    intensity_weight: float = 4.0,
    position_weight: float = 4.0,
) -> dict:
    """Local descriptors at the centroids of an image's SLIC superpixels.

    Returns ``{"descriptors": float32 (n, grid**2 + 3), "centers": float32
    (n, 2)}`` with centres as (row, col) pixel coordinates; ``n == 0`` for a
    constant image.
    """
    if n_segments < 1 or patch < 1 or not 1 <= grid <= patch:
        raise ValueError(
            f"need n_segments >= 1 and 1 <= grid <= patch, got {n_segments=}, {patch=}, {grid=}"
        )
    img = _check_image(image)
    dim = grid * grid + 3
    if img.max() - img.min() < _FLAT:
        return {
            "descriptors": np.zeros((0, dim), np.float32),
            "centers": np.zeros((0, 2), np.float32),
        }
    from skimage.segmentation import slic  # imported here: a query or a plan needs neither

    seg = slic(
        img,
        n_segments=n_segments,
        compactness=compactness,
        channel_axis=None,
        start_label=0,
        enforce_connectivity=True,
    )
    _, labels = np.unique(seg, return_inverse=True)
    labels = labels.ravel()
    n = int(labels.max()) + 1
    count = np.bincount(labels, minlength=n).astype(np.float64)
    rows, cols = np.indices(img.shape, dtype=np.float64)
    cy = np.bincount(labels, rows.ravel(), n) / count
    cx = np.bincount(labels, cols.ravel(), n) / count
    mean = np.bincount(labels, img.ravel(), n) / count

    half = patch // 2
    padded = np.pad(img, half, mode="edge")
    windows = sliding_window_view(padded, (patch, patch))
    iy = np.clip(np.rint(cy).astype(np.intp), 0, img.shape[0] - 1)
    ix = np.clip(np.rint(cx).astype(np.intp), 0, img.shape[1] - 1)
    pattern = _cell_means(windows[iy, ix], grid)
    pattern -= pattern.mean(axis=1, keepdims=True)
    pattern /= np.sqrt((pattern * pattern).sum(axis=1, keepdims=True)) + _CONTRAST_EPS
    side = np.array(img.shape, np.float64)
    centers = np.stack([cy, cx], axis=1)
    out = np.concatenate(
        [pattern, intensity_weight * mean[:, None], position_weight * centers / side], axis=1
    )
    return {"descriptors": out.astype(np.float32), "centers": centers.astype(np.float32)}


def _sq_distances(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """(n, k) squared Euclidean distances, float64, in a fixed order without BLAS."""
    out = np.zeros((len(x), len(centroids)))
    for j in range(x.shape[1]):
        diff = x[:, j, None] - centroids[None, :, j]
        out += diff * diff
    return out


def _nearest(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    out = np.empty(len(x), np.intp)
    for s in range(0, len(x), _CHUNK):
        out[s : s + _CHUNK] = np.argmin(_sq_distances(x[s : s + _CHUNK], centroids), axis=1)
    return out


def _descriptor_array(value: dict, what: str) -> np.ndarray:
    try:
        arr = np.asarray(value["descriptors"], dtype=np.float64)
    except (KeyError, TypeError, ValueError):
        raise ItemError(f"{what}: expected a descriptors dict with a 'descriptors' array") from None
    if arr.ndim != 2:
        raise ItemError(f"{what}: descriptors must be (n, d), got shape {arr.shape}")
    return arr


@node(version=1, kind="set")
def vocabulary(descriptors: Items, *, words: int = 256, sample: int = 50000, seed: int = 0) -> dict:
    """Visual words (k-means centroids) and their idf over the training items.

    Returns ``{"centroids": float32 (words, d), "idf": float32 (words,),
    "items": N, "sampled": descriptors clustered, "inertia": float}``.
    """
    if words < 1 or sample < 1:
        raise ValueError(f"need words >= 1 and sample >= 1, got {words=}, {sample=}")
    arrays = [
        _descriptor_array(v, f"vocabulary item {i}")
        for i, v in zip(descriptors.ids, descriptors.values)
    ]
    dims = {a.shape[1] for a in arrays if len(a)}
    if len(dims) > 1:
        raise ValueError(f"vocabulary: training descriptors have mixed dimensions {sorted(dims)}")
    if not dims:
        raise ValueError("vocabulary: no training item has any descriptor (all blank?)")
    data = np.concatenate([a for a in arrays if len(a)])
    rng = np.random.default_rng(seed)
    if len(data) > sample:
        data = data[np.sort(rng.choice(len(data), size=sample, replace=False))]
    distinct = len(np.unique(data, axis=0))
    if distinct < words:
        raise ValueError(
            f"vocabulary: {distinct} distinct sampled descriptors for {words} words; "
            "lower words= or raise sample= / add training images"
        )
    from sklearn.cluster import KMeans

    with single_threaded():
        km = KMeans(
            n_clusters=words,
            init="k-means++",
            n_init=1,
            max_iter=300,
            random_state=seed,
            algorithm="lloyd",
        ).fit(data)
    centroids = km.cluster_centers_.astype(np.float32)
    c64 = centroids.astype(np.float64)
    df = np.zeros(words, np.int64)
    for a in arrays:
        if len(a):
            df[np.unique(_nearest(a, c64))] += 1
    n_items = len(arrays)
    idf = np.log((1.0 + n_items) / (1.0 + df)) + 1.0
    return {
        "centroids": centroids,
        "idf": idf.astype(np.float32),
        "items": n_items,
        "sampled": len(data),
        "inertia": float(km.inertia_),
    }


@node(version=1)
def bovw_histogram(
    descriptors: dict, vocabulary: dict, *, neighbours: int = 10, sigma: float = 1.0
) -> np.ndarray:
    """The image's tf-idf weighted, L2-normalized word histogram, float32 (words,).

    Each descriptor votes for its ``neighbours`` nearest words (1 = hard
    assignment) with Gaussian weights of width ``sigma``.  An image without
    descriptors gets the zero vector.
    """
    if neighbours < 1 or not sigma > 0:
        raise ValueError(f"need neighbours >= 1 and sigma > 0, got {neighbours=}, {sigma=}")
    centroids = np.asarray(vocabulary["centroids"], dtype=np.float64)
    idf = np.asarray(vocabulary["idf"], dtype=np.float64)
    k = len(centroids)
    x = _descriptor_array(descriptors, "bovw_histogram")
    hist = np.zeros(k)
    if len(x) == 0:
        return hist.astype(np.float32)
    if x.shape[1] != centroids.shape[1]:
        raise ValueError(
            f"bovw_histogram: descriptors have {x.shape[1]} dimensions, the vocabulary "
            f"{centroids.shape[1]}; they were made with different descriptor parameters"
        )
    m = min(neighbours, k)
    for s in range(0, len(x), _CHUNK):
        d2 = _sq_distances(x[s : s + _CHUNK], centroids)
        # stable sort: ties go to the lower word index, in any process
        near = np.argsort(d2, axis=1, kind="stable")[:, :m]
        nd = np.take_along_axis(d2, near, axis=1)
        w = np.exp(-(nd - nd[:, :1]) / (2.0 * sigma * sigma))
        w /= w.sum(axis=1, keepdims=True)
        np.add.at(hist, near.ravel(), w.ravel())
    hist *= idf / len(x)
    norm = np.sqrt((hist * hist).sum())
    return (hist / norm).astype(np.float32)
