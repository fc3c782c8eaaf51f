"""What ``flow status`` shows: per target and step, fresh / stale (and why) / failed."""

from __future__ import annotations

import numpy as np

from app.workspace import Workspace
from flow.graph import cull

__all__ = ["status_rows"]


def status_rows(ws: Workspace, targets: list[str] | str = "all") -> list[dict]:
    """Per target and step: counts of fresh/stale/failed items, with reasons.

    A target's index and table are counted in segments, as ``flow build`` lays
    them out now (the ref's segments, a new one for items not indexed yet,
    compaction where the policy calls for it).  Items whose vectors the next
    build computes first (new ones, or changed) are counted in ``reasons`` as
    ``items to index``, with one more stale segment for them."""
    from collections import Counter

    from flow.plan import BLOCKED, FAILED, FRESH

    p = ws.plan(targets)
    names = list(ws.targets) if targets in ("all", ["all"]) else list(targets)
    g = ws.subgraph(targets)
    items = ws.items()[0]
    seg_g, layout = ws._segmented(names, p, compact=False)
    seg_g = cull(seg_g, [s for t in names for pair in layout[t] for s in pair])
    cats, objs = ws._catalogs(seg_g)
    segs = ws._plan(seg_g, cats, objs, known=p.steps)
    rows = []
    for t in names:
        steps = ws.targets[t]
        # items whose vectors the next build computes, then indexes
        todo = np.ones(len(items), bool)
        if ws.project.database_splits is not None:
            todo &= items.in_splits(ws.project.database_splits)
        up = np.zeros(len(items), bool)
        for v in steps["index_inputs"]:
            status = np.asarray(p.steps[v].status)
            up |= (status != FRESH) & ~np.isin(status, (FAILED, BLOCKED))
        waiting = int(np.count_nonzero(todo & up))
        sub = cull(g, [steps["index"], steps["table"]])
        for s in sub:
            st = sub[s]
            if st.kind == "source":
                continue
            extra = {}
            if s in (steps["index"], steps["table"]):
                which = 0 if s == steps["index"] else 1
                c, reasons = Counter[str](), Counter[str]()
                for pair in layout[t]:
                    c.update(segs.steps[pair[which]].counts())
                    reasons.update(segs.steps[pair[which]].reason_counts())
                if waiting:
                    c["missing"] += 1
                    reasons["items to index"] += waiting
                extra = {"segments": len(layout[t])}
            else:
                c, reasons = p.steps[s].counts(), p.steps[s].reason_counts()
            rows.append(
                {
                    "target": t,
                    "step": s,
                    "node": st.node_name,
                    "kind": st.kind,
                    "fresh": c["fresh"],
                    "stale": c["missing"] + c["pending"],
                    "failed": c["failed"],
                    "blocked": c["blocked"],
                    "reasons": dict(reasons),
                    **extra,
                }
            )
    return rows
