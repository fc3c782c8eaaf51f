"""Retrieval quality: AvG@K, precision@K and mAP@K over multi-label items.

For a query q with ranked results r_1..r_K and label sets L(.):

* AvG@K = (1/K) * sum_n |L(q) & L(r_n)| -- the mean number of shared labels;
* precision@K = the fraction of r_1..r_K sharing at least one label with q;
* AP@K = (1/R_K) * sum_{n <= K, r_n relevant} precision@n, where "relevant"
  means sharing a label and R_K is the number of relevant results in the top
  K (AP@K = 0 when there are none); mAP@K is its mean over queries.

"No Finding" is a label like any other in those three, so an image-blind list
of the most common label sets already scores well on them.  The *finding*
metrics (:func:`finding_metrics`) are what a clinician cares about:

* label-macro P@K: for each label, the mean over the queries carrying it of
  the fraction of r_1..r_K carrying it; then the mean over the labels with at
  least ``min_queries`` (3) queries.  Rare findings weigh as much as "No
  Finding";
* abnormal P@K: over the queries with a finding (a label other than the
  normal one), the fraction of r_1..r_K sharing a finding with the query --
  the normal label is not counted as shared;
* normal P@K: over the normal queries (carrying the normal label), the
  fraction of r_1..r_K that are normal;
* normal-to-abnormal@K: over the queries with a finding, the fraction of
  r_1..r_K that are normal (what a radiologist querying an abnormal study
  wades through);
* a per-label table: per label, its number of queries and its P@K.

A query never retrieves itself: the caller excludes it (a query item that is
also in the database is dropped from its own result list before ranking is
cut at K).  The baselines every report shows beside a target are here too:
:func:`random_rankings`, :func:`prior_rankings` (the image-blind list, most
frequent label sets first) and :func:`cosine_rankings` over raw pixels
(:func:`pixel_vectors`).

Labels are given as a boolean matrix (items x label vocabulary), so all three
metrics are computed for every K at once with a few matrix products.

>>> import numpy as np
>>> q = np.array([[1, 0]], bool); db = np.array([[1, 0], [0, 1], [1, 1]], bool)
>>> m = retrieval_metrics(q, db, np.array([[0, 1, 2]]), ks=(1, 3))
>>> round(m["avg"][3], 3), round(m["precision"][3], 3), round(m["map"][3], 3)
(0.667, 0.667, 0.833)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

__all__ = [
    "NORMAL",
    "abnormal_precision",
    "cosine_rankings",
    "finding_metrics",
    "label_macro_precision",
    "label_matrix",
    "normal_precision",
    "per_label_precision",
    "pixel_vectors",
    "prior_rankings",
    "random_rankings",
    "retrieval_metrics",
]

NORMAL = "No Finding"  # the NIH ChestX-ray14 label of a study without findings


def label_matrix(labels: Sequence[Iterable[str]], vocabulary: Sequence[str] | None = None):
    """A boolean (n_items, n_labels) matrix and the label vocabulary used."""
    vocab = (
        sorted({lab for labs in labels for lab in labs}) if vocabulary is None else list(vocabulary)
    )
    index = {lab: i for i, lab in enumerate(vocab)}
    out = np.zeros((len(labels), len(vocab)), dtype=bool)
    for i, labs in enumerate(labels):
        for lab in labs:
            j = index.get(lab)
            if j is not None:
                out[i, j] = True
    return out, vocab


def retrieval_metrics(
    query_labels: np.ndarray,
    db_labels: np.ndarray,
    rankings: np.ndarray,
    ks: Iterable[int] = (1, 5, 10),
) -> dict[str, dict[int, float]]:
    """Mean AvG@K, precision@K and mAP@K for each K in ``ks``.

    ``rankings[i]`` holds database row indices for query ``i``, best first,
    already without the query itself; it must have at least ``max(ks)``
    columns.  Returns ``{"avg": {K: value}, "precision": {...}, "map": {...}}``.
    """
    ks = sorted(set(int(k) for k in ks))
    rankings = np.asarray(rankings)
    if rankings.ndim != 2 or rankings.shape[0] != len(query_labels):
        raise ValueError("rankings must be (n_queries, n_results)")
    kmax = ks[-1]
    if rankings.shape[1] < kmax:
        raise ValueError(f"rankings have {rankings.shape[1]} columns, K={kmax} needs more")
    ranked = rankings[:, :kmax]
    q = np.asarray(query_labels, dtype=np.int32)[:, None, :]  # (nq, 1, L)
    r = np.asarray(db_labels, dtype=np.int32)[ranked]  # (nq, K, L)
    shared = (q * r).sum(axis=2)  # (nq, K): |L(q) & L(r_n)|
    relevant = shared > 0
    cum_shared = np.cumsum(shared, axis=1)
    cum_rel = np.cumsum(relevant, axis=1)
    positions = np.arange(1, kmax + 1)
    prec_at_n = cum_rel / positions  # precision@n for n = 1..K
    ap_terms = np.cumsum(prec_at_n * relevant, axis=1)
    out: dict[str, dict[int, float]] = {"avg": {}, "precision": {}, "map": {}}
    for k in ks:
        out["avg"][k] = float(np.mean(cum_shared[:, k - 1] / k))
        out["precision"][k] = float(np.mean(cum_rel[:, k - 1] / k))
        n_rel = cum_rel[:, k - 1]
        ap = np.divide(ap_terms[:, k - 1], n_rel, out=np.zeros(len(n_rel)), where=n_rel > 0)
        out["map"][k] = float(np.mean(ap))
    return out


def random_rankings(
    n_queries: int, n_db: int, k: int, seed: int = 0, exclude: np.ndarray | None = None
) -> np.ndarray:
    """Uniformly random rankings (the baseline), ``k`` distinct rows per query.

    ``exclude[i]`` (optional) is a database row that query ``i`` must not get
    (itself, when queries are drawn from the database); -1 means none.
    """
    if k > n_db - (exclude is not None):
        raise ValueError(f"cannot draw {k} results from a database of {n_db}")
    rng = np.random.default_rng(seed)
    out = np.empty((n_queries, k), dtype=np.int64)
    for i in range(n_queries):
        pick = rng.choice(n_db, size=k + 1, replace=False)
        if exclude is not None and exclude[i] >= 0:
            pick = pick[pick != exclude[i]]
        out[i] = pick[:k]
    return out


# --------------------------------------------------------------------------
# finding metrics


def _ranked(query_labels: np.ndarray, db_labels: np.ndarray, rankings: np.ndarray, ks) -> tuple:
    """Sorted ``ks``, the query matrix and the (nq, K, L) labels of the top K."""
    ks = sorted(set(int(k) for k in ks))
    rankings = np.asarray(rankings)
    q = np.asarray(query_labels, dtype=bool)
    if rankings.ndim != 2 or rankings.shape[0] != len(q):
        raise ValueError("rankings must be (n_queries, n_results)")
    if not ks or ks[0] < 1 or rankings.shape[1] < ks[-1]:
        raise ValueError(f"rankings have {rankings.shape[1]} columns, K={ks[-1]} needs more")
    return ks, q, np.asarray(db_labels, dtype=bool)[rankings[:, : ks[-1]]]


def _mean_at(hits: np.ndarray, ks: list[int]) -> dict[int, float | None]:
    """Mean over rows of the fraction of the first K columns that are hits;
    None for every K when there are no rows."""
    if len(hits) == 0:
        return {k: None for k in ks}
    cum = np.cumsum(hits, axis=1)
    return {k: float(np.mean(cum[:, k - 1] / k)) for k in ks}


def per_label_precision(
    query_labels: np.ndarray, db_labels: np.ndarray, rankings: np.ndarray, ks=(1, 5, 10)
) -> list[tuple[int, dict[int, float | None]]]:
    """Per label column: (number of queries carrying it, {K: mean over those
    queries of the fraction of their top K carrying it}); None without queries.

    >>> q = np.array([[1, 0], [1, 1]], bool); db = np.array([[1, 0], [0, 1]], bool)
    >>> per_label_precision(q, db, np.array([[0, 1], [1, 0]]), ks=(1, 2))
    [(2, {1: 0.5, 2: 0.5}), (1, {1: 1.0, 2: 0.5})]
    """
    ks, q, r = _ranked(query_labels, db_labels, rankings, ks)
    return [(int(q[:, j].sum()), _mean_at(r[q[:, j], :, j], ks)) for j in range(q.shape[1])]


def label_macro_precision(
    query_labels: np.ndarray,
    db_labels: np.ndarray,
    rankings: np.ndarray,
    ks=(1, 5, 10),
    *,
    min_queries: int = 3,
) -> dict[int, float | None]:
    """Label-macro P@K: the per-label P@K (:func:`per_label_precision`)
    averaged over the labels carried by at least ``min_queries`` queries
    (None when no label is)."""
    table = per_label_precision(query_labels, db_labels, rankings, ks)
    kept = [p for n, p in table if n >= min_queries]
    ks = sorted(set(int(k) for k in ks))
    if not kept:
        return {k: None for k in ks}
    return {k: float(np.mean([p[k] for p in kept])) for k in ks}


def _normal_split(q: np.ndarray, normal: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(finding columns mask, normal column mask) for a label matrix."""
    findings = np.ones(q.shape[1], bool)
    is_normal = np.zeros(q.shape[1], bool)
    if normal is not None:
        findings[normal] = False
        is_normal[normal] = True
    return findings, is_normal


def abnormal_precision(
    query_labels: np.ndarray,
    db_labels: np.ndarray,
    rankings: np.ndarray,
    ks=(1, 5, 10),
    *,
    normal: int | None,
) -> dict[int, float | None]:
    """Abnormal P@K: over the queries with a finding (a label other than column
    ``normal``), the fraction of the top K sharing a finding with the query
    (the normal label does not count as shared).  None without such queries.
    ``normal=None``: every label is a finding.

    >>> q = np.array([[0, 1, 1], [1, 0, 0]], bool)  # column 0 is "No Finding"
    >>> db = np.array([[1, 0, 0], [0, 0, 1], [0, 1, 0]], bool)
    >>> abnormal_precision(q, db, np.array([[0, 1], [0, 1]]), ks=(1, 2), normal=0)
    {1: 0.0, 2: 0.5}
    """
    ks, q, r = _ranked(query_labels, db_labels, rankings, ks)
    findings, _ = _normal_split(q, normal)
    qf = q & findings
    abnormal = qf.any(axis=1)
    shared = (r[abnormal] & qf[abnormal][:, None, :]).any(axis=2)
    return _mean_at(shared, ks)


def normal_precision(
    query_labels: np.ndarray,
    db_labels: np.ndarray,
    rankings: np.ndarray,
    ks=(1, 5, 10),
    *,
    normal: int | None,
) -> dict[int, float | None]:
    """Normal P@K: over the queries carrying the label in column ``normal``,
    the fraction of the top K carrying it too.  None without such queries
    (or ``normal=None``: no normal label in the vocabulary)."""
    ks = sorted(set(int(k) for k in ks))
    if normal is None:
        return {k: None for k in ks}
    ks, q, r = _ranked(query_labels, db_labels, rankings, ks)
    return _mean_at(r[q[:, normal], :, normal], ks)


def _normal_to_abnormal(
    query_labels: np.ndarray, db_labels: np.ndarray, rankings: np.ndarray, ks, normal: int | None
) -> dict[int, float | None]:
    """Over the queries with a finding, the fraction of the top K that are normal."""
    ks, q, r = _ranked(query_labels, db_labels, rankings, ks)
    findings, _ = _normal_split(q, normal)
    abnormal = (q & findings).any(axis=1)
    if normal is None:
        return _mean_at(np.zeros((int(abnormal.sum()), ks[-1]), bool), ks)
    return _mean_at(r[abnormal, :, normal], ks)


def finding_metrics(
    query_labels: np.ndarray,
    db_labels: np.ndarray,
    rankings: np.ndarray,
    ks=(1, 5, 10),
    *,
    vocabulary: Sequence[str],
    normal_label: str = NORMAL,
    min_queries: int = 3,
) -> dict:
    """Every finding metric for each K in ``ks``, the normal label found by name
    in ``vocabulary`` (the label matrices' columns).

    Returns ``{"label_macro": {K: v}, "abnormal": {K: v}, "normal": {K: v},
    "normal_to_abnormal": {K: v}, "per_label": {label: {"queries": n,
    "precision": {K: v}}}, "abnormal_queries": n, "normal_queries": n}``;
    a value is None where no query qualifies.
    """
    vocabulary = list(vocabulary)
    if len(vocabulary) != np.shape(query_labels)[1]:
        raise ValueError("the vocabulary must name every label column")
    normal = vocabulary.index(normal_label) if normal_label in vocabulary else None
    q = np.asarray(query_labels, dtype=bool)
    findings, _ = _normal_split(q, normal)
    table = per_label_precision(query_labels, db_labels, rankings, ks)
    return {
        "label_macro": label_macro_precision(
            query_labels, db_labels, rankings, ks, min_queries=min_queries
        ),
        "abnormal": abnormal_precision(query_labels, db_labels, rankings, ks, normal=normal),
        "normal": normal_precision(query_labels, db_labels, rankings, ks, normal=normal),
        "normal_to_abnormal": _normal_to_abnormal(query_labels, db_labels, rankings, ks, normal),
        "per_label": {
            lab: {"queries": n, "precision": p} for lab, (n, p) in zip(vocabulary, table)
        },
        "abnormal_queries": int((q & findings).any(axis=1).sum()),
        "normal_queries": int(q[:, normal].sum()) if normal is not None else 0,
    }


# --------------------------------------------------------------------------
# baselines


def prior_rankings(db_labels: np.ndarray, k: int, exclude: np.ndarray) -> np.ndarray:
    """The image-blind prior: one list for every query, the database items whose
    exact label set is most frequent first (ties: the item sharing the most
    labels with the rest of the database, then the lower row).  One row per
    query: ``exclude[i]`` is a row query ``i`` must not get (itself), -1 none.

    >>> prior_rankings(np.array([[0, 1], [1, 0], [1, 0]], bool), 2, np.array([-1, 1]))
    array([[1, 2],
           [2, 0]])
    """
    m = np.asarray(db_labels, dtype=bool)
    n = len(m)
    if k > n - 1:
        raise ValueError(f"cannot draw {k} results from a database of {n}")
    _, inverse, counts = np.unique(m, axis=0, return_inverse=True, return_counts=True)
    set_freq = counts[inverse.reshape(-1)]
    f = m.astype(np.float64)
    overlap = f @ f.sum(axis=0) - (f * f).sum(axis=1)
    order = np.lexsort((np.arange(n), -overlap, -set_freq))
    ex = np.asarray(exclude)
    out = np.empty((len(ex), k), dtype=np.int64)
    for i, e in enumerate(ex.tolist()):
        out[i] = order[order != e][:k] if e >= 0 else order[:k]
    return out


def pixel_vectors(images: Sequence[np.ndarray]) -> np.ndarray:
    """The raw-pixel baseline's vectors: each image flattened, mean-centred and
    scaled to unit length (float64; a constant image gives the zero vector)."""
    x = np.stack([np.asarray(im, dtype=np.float64).ravel() for im in images])
    x -= x.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def cosine_rankings(
    query_vectors: np.ndarray, db_vectors: np.ndarray, k: int, exclude: np.ndarray | None = None
) -> np.ndarray:
    """Exact cosine kNN: for each query the ``k`` database rows of highest cosine
    (ties: the lower row), without ``exclude[i]`` (a row, or -1 for none)."""
    q = np.asarray(query_vectors, dtype=np.float64)
    d = np.asarray(db_vectors, dtype=np.float64)
    qn = np.linalg.norm(q, axis=1, keepdims=True)
    dn = np.linalg.norm(d, axis=1, keepdims=True)
    q = np.divide(q, qn, out=np.zeros_like(q), where=qn > 0)
    d = np.divide(d, dn, out=np.zeros_like(d), where=dn > 0)
    scores = q @ d.T
    if exclude is not None:
        ex = np.asarray(exclude)
        rows = np.flatnonzero(ex >= 0)
        scores[rows, ex[rows]] = -np.inf
    if k > d.shape[0] - (exclude is not None):
        raise ValueError(f"cannot draw {k} results from a database of {d.shape[0]}")
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]
