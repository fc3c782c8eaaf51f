"""``flow eval``: retrieval quality of a target, beside baselines computed in the same run."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from flow.errors import FlowError

__all__ = ["evaluate", "plot_metrics"]


def _stored_values(ws: Any, step: str, rows: list[int], plan: Any) -> list[Any]:
    """Values of a per-item step for item ``rows``, read from its packs."""
    from engine.refs import PackRef
    from engine.worker import Reader
    from store.catalog import load_catalog

    node = ws.graph[step].node_name
    cat = load_catalog(ws.store, node)
    refs = []
    for i in rows:
        rk = plan.steps[step].rkeys[i]
        pack, pos = cat.location(cat.index[rk])
        refs.append(PackRef(node, pack, pos))
    return Reader(ws.store).read_many(refs)


def evaluate(
    ws: Any,
    target: str,
    k: int = 10,
    *,
    scheduler: str | None = None,
    executor: Any = None,
    seed: int = 0,
    log: Any = None,
) -> dict:
    """AvG@K, precision@K and mAP@K for K = 1..k of the eval queries against the
    eval database, beside a random ranking of the same database (same run)."""
    from flow.plan import Status
    from nodes.metrics import label_matrix, random_rankings, retrieval_metrics

    built = ws.build(
        [target], eval=True, scheduler=scheduler, executor=executor, progress=False, log=log
    )
    if target in built.incomplete:
        raise FlowError(f"eval index of {target!r} could not be built: {built.incomplete[target]}")
    retr = ws.retriever(target, eval=True)
    items, _, meta = ws.items()
    p = built.report.after
    qsplits = set(ws.project.eval_queries)
    steps = retr.vector_steps
    fresh = np.ones(len(items), bool)
    for st in steps:
        fresh &= np.asarray(p.steps[st].status) == Status.FRESH
    rows = [i for i in np.flatnonzero(fresh).tolist() if items.splits[i] in qsplits]
    if not rows:
        raise FlowError(
            f"no query items: no built item has split {sorted(qsplits)} (see [eval] queries)"
        )
    if retr.count <= k:
        raise FlowError(f"the eval database has {retr.count} items; K={k} needs more")
    vecs = [np.stack([np.asarray(v) for v in _stored_values(ws, st, rows, p)]) for st in steps]
    pos = {iid: j for j, iid in enumerate(retr.ids)}
    exclude = [{pos[items.ids[i]]} if items.ids[i] in pos else set() for i in rows]
    idx, _ = retr.search_vectors(vecs, k, exclude=exclude)
    if (idx < 0).any():
        raise FlowError("the index returned fewer than K results for some queries")
    q_labels = [meta["labels"][i] for i in rows]
    qm, vocab = label_matrix(q_labels + retr.labels)
    qm, dbm = qm[: len(rows)], qm[len(rows) :]
    ks = list(range(1, k + 1))
    ours = retrieval_metrics(qm, dbm, idx, ks)
    ex_rows = np.array([next(iter(e)) if e else -1 for e in exclude])
    rand = retrieval_metrics(
        qm, dbm, random_rankings(len(rows), retr.count, k, seed=seed, exclude=ex_rows), ks
    )
    prior = retrieval_metrics(qm, dbm, _prior_rankings(dbm, k, ex_rows), ks)
    return {
        "target": target,
        "kind": retr.kind,
        "k": k,
        "queries": len(rows),
        "database": retr.count,
        "labels": vocab,
        "metrics": ours,
        "random": rand,
        "prior": prior,
    }


def _prior_rankings(db_labels: np.ndarray, k: int, exclude: np.ndarray) -> np.ndarray:
    """The label-prior baseline: one ranking for every query, ignoring the image --
    the database items sharing the most labels with the rest of the database (the
    expected overlap with a query drawn like the database).  On a set where most
    images share one label ("No Finding") it is a much stronger floor than random."""
    m = np.asarray(db_labels, dtype=np.float64)
    score = m @ m.sum(axis=0) - (m * m).sum(axis=1)  # overlap with every other item
    order = np.argsort(-score, kind="stable")
    out = np.empty((len(exclude), k), dtype=np.int64)
    for i, ex in enumerate(exclude.tolist()):
        out[i] = order[order != ex][:k] if ex >= 0 else order[:k]
    return out


# (result key, line style, color when targets share it, legend name)
_BASELINES = (("random", "--", "gray", "random"), ("prior", ":", "black", "label prior"))


def plot_metrics(results: list[dict], path: str | os.PathLike) -> None:
    """One PNG: AvG@K, precision@K and mAP@K against K for every target, with
    the random baseline dashed and the label-prior baseline dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4), constrained_layout=True)
    titles = {"avg": "AvG@K", "precision": "precision@K", "map": "mAP@K"}
    # targets evaluated on the same database share one random baseline
    shared = len({r["database"] for r in results}) == 1
    for ax, (m, title) in zip(axes, titles.items()):
        for j, r in enumerate(results):
            ks = sorted(int(x) for x in r["metrics"][m])
            color = f"C{j}"
            ax.plot(
                ks, [r["metrics"][m][x] for x in ks], "-o", ms=3, color=color, label=r["target"]
            )
            if shared and j > 0:
                continue
            for base, style, gray, name in _BASELINES:
                ax.plot(
                    ks,
                    [r[base][m][x] for x in ks],
                    style,
                    color=gray if shared else color,
                    alpha=0.7,
                    label=name if shared else f"{r['target']} {name}",
                )
        ax.set_title(title)
        ax.set_xlabel("K")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{results[0]['queries']} queries vs {results[0]['database']} items")
    fig.savefig(path, dpi=120)
    plt.close(fig)


#: names of the rankings an evaluation result holds beside the target's own
BASELINE_NAMES = {"random": "random", "prior": "label prior", "pixels": "raw pixels"}
_METRIC_NAMES = {"avg": "AvG", "precision": "P", "map": "mAP"}


def report_table(results: list[dict], k: int) -> tuple[list[str], list[list]]:
    """The evaluation as a table: per target, one row for its own ranking and one for
    every baseline computed in the same run, every metric at ``k`` in the columns."""
    metrics = list(dict.fromkeys(m for r in results for m in r["metrics"]))
    headers = ["target", "ranking", *(f"{_METRIC_NAMES.get(m, m)}@{k}" for m in metrics)]
    rows: list[list] = []
    for r in results:
        rankings = [("metrics", f"{r['target']} ({r['kind']})")]
        rankings += [
            (b, f"  {BASELINE_NAMES.get(b, b)}")
            for b in list(BASELINE_NAMES) + sorted(set(r) - set(BASELINE_NAMES))
            if b in r and b != "metrics" and _is_metrics(r[b], metrics)
        ]
        for j, (b, name) in enumerate(rankings):
            vals = [_at(r[b].get(m, {}), k) for m in metrics]
            rows.append([r["target"] if j == 0 else "", name.strip() if j == 0 else name, *vals])
    return headers, rows


def _is_metrics(v: object, metrics: list[str]) -> bool:
    return isinstance(v, dict) and any(m in v and isinstance(v[m], dict) for m in metrics)


def _at(curve: dict, k: int) -> float | str:
    v = curve.get(k, curve.get(str(k)))
    return "-" if v is None else float(v)
