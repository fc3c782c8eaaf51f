"""``flow eval``: retrieval quality of a target, beside baselines computed in the same run."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from flow.errors import FlowError

__all__ = ["evaluate", "evaluate_targets", "label_table", "plot_metrics", "report_table"]


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
    """Retrieval quality of ``target`` for K = 1..k: the eval queries against the eval
    database, beside three baselines computed in the same run.

    Metrics (definitions in :mod:`nodes.metrics` and the README's eval section):
    ``avg`` (AvG@K), ``precision`` (P@K: shares any label), ``map`` (mAP@K),
    ``label_macro`` (per label, the mean over its queries of the share of the top
    K carrying it; averaged over labels with at least 3 queries), ``abnormal``
    (queries with a finding: share of the top K sharing a finding, "No Finding"
    not counted), ``normal`` ("No Finding" queries: share of normal results) and
    ``normal_to_abnormal`` (queries with a finding: share of normal results).
    Baselines: ``random`` (a random ranking), ``prior`` (one image-blind list for
    every query: the most frequent label sets first) and ``pixels`` (cosine of the
    raw pixels of the same normalized images the target sees).  A query never
    retrieves itself.  ``warnings`` says where the target does not beat raw pixels
    on label-macro P@K; ``per_label`` is the per-label table.
    """
    from flow.plan import Status
    from nodes.metrics import (
        NORMAL,
        cosine_rankings,
        finding_metrics,
        label_matrix,
        pixel_vectors,
        prior_rankings,
        random_rankings,
        retrieval_metrics,
    )

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
    ex_rows = np.array([next(iter(e)) if e else -1 for e in exclude])
    rankings = {
        "metrics": idx,
        "random": random_rankings(len(rows), retr.count, k, seed=seed, exclude=ex_rows),
        "prior": prior_rankings(dbm, k, ex_rows),
    }
    pixels = _pixel_rankings(ws, retr, p, rows, k, ex_rows, pixel_vectors, cosine_rankings)
    if pixels is not None:
        rankings["pixels"] = pixels
    out: dict[str, Any] = {
        "target": target,
        "kind": retr.kind,
        "k": k,
        "queries": len(rows),
        "database": retr.count,
        "labels": vocab,
    }
    per_label: dict[str, dict] = {}
    for name, ranking in rankings.items():
        found = finding_metrics(qm, dbm, ranking, ks, vocabulary=vocab)
        out[name] = {
            **retrieval_metrics(qm, dbm, ranking, ks),
            **{m: found[m] for m in ("label_macro", "abnormal", "normal", "normal_to_abnormal")},
        }
        for lab, row in found["per_label"].items():
            entry = per_label.setdefault(lab, {"queries": row["queries"]})
            entry[target if name == "metrics" else name] = row["precision"][k]
        if name == "metrics":
            out["abnormal_queries"] = found["abnormal_queries"]
            out["normal_queries"] = found["normal_queries"]
    out["per_label"] = per_label
    out["normal_label"] = NORMAL if NORMAL in vocab else None
    out["warnings"] = _warnings(out, k)
    return out


def _pixel_rankings(ws, retr, plan, rows, k, ex_rows, pixel_vectors, cosine_rankings):
    """The raw-pixel baseline: cosine over the normalized images of the target's
    chain (what its network or descriptors see), or None without such a step."""
    norm = next((e["step"] for e in retr.chain if e["node"].endswith(":normalized")), None)
    if norm is None or norm not in plan.steps:
        return None
    row_of = {iid: i for i, iid in enumerate(ws.items()[0].ids)}
    db_rows = [row_of.get(iid) for iid in retr.ids]
    if any(r is None for r in db_rows):
        return None  # the eval index holds items the sources no longer give
    q = pixel_vectors(_stored_values(ws, norm, rows, plan))
    d = pixel_vectors(_stored_values(ws, norm, db_rows, plan))
    return cosine_rankings(q, d, k, ex_rows)


def _warnings(result: dict, k: int) -> list[str]:
    """Where the target does not beat raw pixels on label-macro P@K."""
    if "pixels" not in result:
        return []
    ours = result["metrics"]["label_macro"].get(k)
    base = result["pixels"]["label_macro"].get(k)
    if ours is None or base is None or ours > base:
        return []
    return [
        f"{result['target']} does not beat raw pixels on label-macro P@{k} "
        f"({ours:.3f} vs {base:.3f}): its ranking is no more useful than comparing pixels"
    ]


def evaluate_targets(
    ws: Any, targets: list[str] | str = "all", k: int | None = None, **kw: Any
) -> list[dict]:
    """:func:`evaluate` for each target (``"all"``: every whole-image target; a region
    target answers boxes, not images, and is measured by ``bench_serve.py --quality``)."""
    from flow.errors import ConfigError

    if targets in ("all", ["all"]):
        names = [t for t, v in ws.targets.items() if v["kind"] != "regions"]
    else:
        names = [targets] if isinstance(targets, str) else list(targets)
        for t in names:
            if ws.targets.get(t, {}).get("kind") == "regions":
                raise ConfigError(
                    f"flow eval measures whole-image retrieval; {t!r} is a regions target "
                    "(its hit rate: bench/bench_serve.py --quality)"
                )
    k = ws.project.eval_k if k is None else k
    return [evaluate(ws, t, k, **kw) for t in names]


# (result key, line style, color when targets share it, legend name)
_BASELINES = (
    ("random", "--", "gray", "random"),
    ("prior", ":", "black", "image-blind prior"),
    ("pixels", "-.", "tab:brown", "raw pixels"),
)
#: the plot's panels: result key -> title
PANELS = {
    "avg": "AvG@K",
    "precision": "precision@K (shares a label)",
    "map": "mAP@K",
    "label_macro": "label-macro P@K",
    "abnormal": "abnormal queries: P@K sharing a finding",
    "normal": "normal queries: P@K normal",
}


def plot_metrics(results: list[dict], path: str | os.PathLike) -> None:
    """One PNG, a panel per metric against K: every target (solid) and every
    baseline computed in the same run (random dashed, the image-blind prior dotted,
    raw pixels dash-dotted; one of each where the targets share a database)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [m for m in PANELS if any(m in r["metrics"] for r in results)]
    cols = 3
    rows_n = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(13, 3.8 * rows_n), constrained_layout=True)
    axes = list(np.atleast_1d(axes).ravel())
    # targets evaluated on the same database share the baselines' lines
    shared = len({(r["database"], r["queries"]) for r in results}) == 1
    for ax, m in zip(axes, panels):
        for j, r in enumerate(results):
            color = f"C{j}"
            _curve(ax, r["metrics"].get(m), "-o", color, r["target"], ms=3)
            if shared and j > 0:
                continue
            for base, style, gray, name in _BASELINES:
                if base in r:
                    label = name if shared else f"{r['target']} {name}"
                    _curve(ax, r[base].get(m), style, gray if shared else color, label, alpha=0.8)
        ax.set_title(PANELS[m], fontsize=10)
        ax.set_xlabel("K")
        ax.grid(alpha=0.3)
    for ax in axes[len(panels) :]:
        ax.axis("off")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{results[0]['queries']} queries vs {results[0]['database']} items")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _curve(ax: Any, curve: dict | None, style: str, color: str, label: str, **kw: Any) -> None:
    if not curve:
        return
    ks = sorted(int(x) for x in curve)
    ys = [curve.get(x, curve.get(str(x))) for x in ks]
    ys = [np.nan if y is None else y for y in ys]
    ax.plot(ks, ys, style, color=color, label=label, **kw)


#: names of the rankings an evaluation result holds beside the target's own
BASELINE_NAMES = {"random": "random", "prior": "label prior", "pixels": "raw pixels"}
_METRIC_NAMES = {
    "avg": "AvG",
    "precision": "P",
    "map": "mAP",
    "label_macro": "label-macro P",
    "abnormal": "abnormal P",
    "normal": "normal P",
    "normal_to_abnormal": "normals to abnormal",
}


def report_table(results: list[dict], k: int) -> tuple[list[str], list[list]]:
    """The evaluation as a table: per target, one row for its own ranking and one for
    every baseline computed in the same run, every metric at ``k`` in the columns."""
    metrics = [m for m in dict.fromkeys(m for r in results for m in r["metrics"]) if m in PANELS]
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


def label_table(result: dict) -> tuple[list[str], list[list]]:
    """The per-label table of one result: each label's queries and P@K of the target
    and of every baseline."""
    k = result["k"]
    names = [result["target"], *(b for b in BASELINE_NAMES if b in result)]
    headers = ["label", "queries", *(f"{BASELINE_NAMES.get(n, n)} P@{k}" for n in names)]
    rows = []
    for lab, row in sorted(result["per_label"].items(), key=lambda kv: -kv[1]["queries"]):
        if row["queries"]:
            rows.append([lab, row["queries"], *(_num(row.get(n)) for n in names)])
    return headers, rows


def _num(v: Any) -> float | str:
    return "-" if v is None else float(v)


def _is_metrics(v: object, metrics: list[str]) -> bool:
    return isinstance(v, dict) and any(m in v and isinstance(v[m], dict) for m in metrics)


def _at(curve: dict, k: int) -> float | str:
    v = curve.get(k, curve.get(str(k)))
    return "-" if v is None else float(v)
