"""Retrieval quality: AvG@K, precision@K and mAP@K over multi-label items.

For a query q with ranked results r_1..r_K and label sets L(.):

* AvG@K = (1/K) * sum_n |L(q) & L(r_n)| -- the mean number of shared labels;
* precision@K = the fraction of r_1..r_K sharing at least one label with q;
* AP@K = (1/R_K) * sum_{n <= K, r_n relevant} precision@n, where "relevant"
  means sharing a label and R_K is the number of relevant results in the top
  K (AP@K = 0 when there are none); mAP@K is its mean over queries.

"No Finding" is a label like any other.  A query never retrieves itself: the
caller excludes it (a query item that is also in the database is dropped from
its own result list before ranking is cut at K).

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

__all__ = ["label_matrix", "random_rankings", "retrieval_metrics"]


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
