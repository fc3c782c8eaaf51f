"""Drawing the graph (``flow graph``): Graphviz's ``dot`` lays it out.

One cluster per target holds the steps only that target uses; steps shared by
several targets (decode, normalize) stand outside.  A step's colour is its state
(fresh, stale, failed; a source; a pinned fit, which stands in for the object a
fit made before), its label the node, kind and counts; an edge's style is how the
step takes its input (per item, all items, one value).  A legend says all of that.

The graph is made with the ``graphviz`` Python package and rendered by the ``dot``
program (Debian/Ubuntu: ``apt-get install graphviz``; macOS: ``brew install
graphviz``); ``.dot`` output needs no program.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

from flow.errors import FlowError
from flow.graph import Graph, cull, toposort

__all__ = ["COLORS", "EDGE_STYLES", "digraph", "dot", "draw", "target_groups"]

COLORS = {
    "fresh": "#9ed99e",
    "stale": "#ffc46b",
    "failed": "#ff8a80",
    "source": "#cfd8dc",
    "pinned fit": "#b3d4fc",
    "unknown": "#eeeeee",
}

#: how a step takes its input -> (dot edge style, legend text)
EDGE_STYLES = {
    "item": ("solid", "per item"),
    "all": ("dashed", "all items (a fit, an index)"),
    "one": ("dotted", "one value (a fitted model)"),
}


def _state(counts: dict[str, int] | None) -> str:
    if counts is None:
        return "unknown"
    if counts.get("missing", 0) or counts.get("pending", 0):
        return "stale"
    if counts.get("failed", 0) and not counts.get("fresh", 0):
        return "failed"
    return "fresh"


def target_groups(graph: Graph, targets: dict, names: list[str]) -> dict[str, list[str]]:
    """The steps of ``graph`` each target alone uses, by target (shared steps in none)."""
    uses: dict[str, set[str]] = {}
    for t in names:
        ends = [s for s in (targets[t].get("index"), targets[t].get("table")) if s in graph]
        ends += [s for s in graph if s.startswith(f"{t}.")]  # its index segments
        for s in cull(graph, ends) if ends else ():
            uses.setdefault(s, set()).add(t)
    out: dict[str, list[str]] = {t: [] for t in names}
    for s in toposort(graph):
        if len(uses.get(s, ())) == 1:
            out[next(iter(uses[s]))].append(s)
    return out


def digraph(
    graph: Graph,
    summary: dict[str, dict] | None = None,
    groups: dict[str, list[str]] | None = None,
    title: str = "",
) -> Any:
    """The graph as a ``graphviz.Digraph`` (clusters, colours, legend)."""
    import graphviz

    summary = summary or {}
    g = graphviz.Digraph("flow", graph_attr={"rankdir": "LR", "fontsize": "11", "label": title,
                         "labelloc": "t", "fontname": "Helvetica"},
                         node_attr={"shape": "box", "style": "rounded,filled",
                                    "fontname": "Helvetica", "fontsize": "10"},
                         edge_attr={"color": "#546e7a"})  # fmt: skip
    placed: set[str] = set()

    def add(sub: Any, n: str) -> None:
        st = graph[n]
        counts = summary.get(n)
        if st.kind == "source":
            state = "pinned fit" if st.source == "object" and st.pin else "source"
            label = n if state == "source" else f"{n}\n{st.pin[0] if st.pin else ''}\npinned fit"
        else:
            state = _state(counts)
            label = f"{n}\n{st.node_name} ({st.kind})"
            if counts is not None:
                stale = counts.get("missing", 0) + counts.get("pending", 0)
                label += f"\n{counts.get('fresh', 0)} fresh" + (f", {stale} stale" if stale else "")
                if counts.get("failed"):
                    label += f", {counts['failed']} failed"
        sub.node(n, label, fillcolor=COLORS[state])
        placed.add(n)

    for t, steps in (groups or {}).items():
        if not steps:
            continue
        with g.subgraph(name=f"cluster_{t}") as c:
            c.attr(label=f"target {t}", style="rounded", color="#90a4ae", fontsize="11")
            for n in steps:
                add(c, n)
    for n in toposort(graph):
        if n not in placed:
            add(g, n)
    for n in toposort(graph):
        for inp in graph[n].inputs:
            g.edge(inp.step, n, style=EDGE_STYLES.get(inp.mode, ("solid", ""))[0])
    with g.subgraph(name="cluster_legend") as leg:
        leg.attr(label="legend", style="rounded", color="#cfd8dc", fontsize="10")
        prev = None
        for state, color in COLORS.items():
            leg.node(f"_legend_{state}", state, fillcolor=color, fontsize="9")
            if prev is not None:
                leg.edge(prev, f"_legend_{state}", style="invis")
            prev = f"_legend_{state}"
        for mode, (style, text) in EDGE_STYLES.items():
            a, b = f"_legend_{mode}_a", f"_legend_{mode}_b"
            leg.node(a, "", shape="point", width="0.05")
            leg.node(b, text, shape="plaintext", style="", fontsize="9")
            leg.edge(a, b, style=style)
    return g


def dot(graph: Graph, summary: dict[str, Any] | None = None, **kw: Any) -> str:
    """The graph in Graphviz DOT."""
    return digraph(graph, summary, **kw).source


def draw(
    graph: Graph,
    path: str | os.PathLike,
    summary: dict[str, dict] | None = None,
    title: str = "",
    groups: dict[str, list[str]] | None = None,
) -> None:
    """Write the graph to ``path``: .dot as text, any other extension (.svg, .png,
    .pdf) rendered by Graphviz's ``dot``."""
    path = os.fspath(path)
    g = digraph(graph, summary, groups, title)
    fmt = os.path.splitext(path)[1].lstrip(".").lower()
    if fmt in ("dot", "gv"):
        with open(path, "w") as fh:
            fh.write(g.source + "\n")
        return
    if shutil.which("dot") is None:
        raise FlowError(
            f"drawing {path} needs Graphviz's dot program (Debian/Ubuntu: apt-get install "
            "graphviz; macOS: brew install graphviz); `flow graph out.dot` writes the graph "
            "as text without it"
        )
    import graphviz

    try:
        data = g.pipe(format=fmt)
    except (ValueError, graphviz.ExecutableNotFound, graphviz.CalledProcessError) as e:
        raise FlowError(f"cannot draw {path}: {e}") from None
    with open(path, "wb") as fh:
        fh.write(data)
