"""Drawing the graph: steps in dependency layers, coloured by their state.

Layout is deliberately simple (a step's column is its depth in the DAG,
rows spread evenly), which reads well for pipelines of a few dozen steps.
Output is PNG or SVG by the file's extension (matplotlib, no graphviz).
"""

from __future__ import annotations

import os
from typing import Any

from flow.graph import Graph, toposort

COLORS = {
    "fresh": "#9ed99e",
    "stale": "#ffc46b",
    "failed": "#ff8a80",
    "source": "#cfd8dc",
    "unknown": "#e0e0e0",
}


def _state(counts: dict[str, int] | None) -> str:
    if counts is None:
        return "unknown"
    if counts.get("missing", 0) or counts.get("pending", 0):
        return "stale"
    if counts.get("failed", 0) and not counts.get("fresh", 0):
        return "failed"
    return "fresh"


def draw(
    graph: Graph, path: str | os.PathLike, summary: dict[str, dict] | None = None, title: str = ""
) -> None:
    """Write the graph to ``path`` (.png or .svg); ``summary`` is ``Plan.summary()``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch

    order = toposort(graph)
    depth: dict[str, int] = {}
    for n in order:
        depth[n] = 1 + max((depth[i.step] for i in graph[n].inputs), default=-1)
    cols: dict[int, list[str]] = {}
    for n in order:
        cols.setdefault(depth[n], []).append(n)
    height = max(len(v) for v in cols.values())
    pos = {}
    for d, names in cols.items():
        for j, n in enumerate(names):
            pos[n] = (d * 3.2, (height - 1) / 2 - j + (len(names) - 1) / 2 - (height - 1) / 2)
    fig_w = 2.2 + 2.4 * len(cols)
    fig, ax = plt.subplots(figsize=(fig_w, 1.0 + 1.1 * height))
    for n in order:
        x, y = pos[n]
        for inp in graph[n].inputs:
            x0, y0 = pos[inp.step]
            style = "-" if inp.mode == "item" else ("--" if inp.mode == "all" else ":")
            ax.annotate(
                "",
                xy=(x - 1.1, y),
                xytext=(x0 + 1.1, y0),
                arrowprops={"arrowstyle": "->", "lw": 1, "ls": style, "color": "#607d8b"},
            )
    for n in order:
        x, y = pos[n]
        st = graph[n]
        counts = (summary or {}).get(n)
        state = "source" if st.kind == "source" else _state(counts)
        ax.add_patch(
            FancyBboxPatch(
                (x - 1.1, y - 0.32),
                2.2,
                0.64,
                boxstyle="round,pad=0.02",
                fc=COLORS[state],
                ec="#37474f",
            )
        )
        label = n if st.kind == "source" else f"{n}\n{st.node_name} ({st.kind})"
        if counts is not None and st.kind != "source":
            stale = counts.get("missing", 0) + counts.get("pending", 0)
            label += f"\n{counts.get('fresh', 0)} fresh" + (f", {stale} stale" if stale else "")
            if counts.get("failed"):
                label += f", {counts['failed']} failed"
        ax.text(x, y, label, ha="center", va="center", fontsize=7)
    xs = [p[0] for p in pos.values()]
    ys = [p[1] for p in pos.values()]
    ax.set_xlim(min(xs) - 1.4, max(xs) + 1.4)
    ax.set_ylim(min(ys) - 0.8, max(ys) + 0.8)
    ax.axis("off")
    handles = [plt.Rectangle((0, 0), 1, 1, fc=c) for c in COLORS.values()]
    ax.legend(
        handles,
        list(COLORS),
        loc="upper left",
        fontsize=7,
        ncol=5,
        frameon=False,
        bbox_to_anchor=(0, 1.08),
    )
    if title:
        ax.set_title(title, fontsize=9, loc="right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def dot(graph: Graph, summary: dict[str, Any] | None = None) -> str:
    """The graph in Graphviz DOT (for people who have graphviz)."""
    lines = ["digraph flow {", "  rankdir=LR; node [shape=box, style=filled];"]
    for n in toposort(graph):
        st = graph[n]
        state = "source" if st.kind == "source" else _state((summary or {}).get(n))
        lines.append(f'  "{n}" [fillcolor="{COLORS[state]}"];')
        for i in st.inputs:
            lines.append(f'  "{i.step}" -> "{n}";')
    lines.append("}")
    return "\n".join(lines)
