"""Index segments: new studies add a small index instead of rebuilding the big one.

A target's index is held as one or more **segments**, each an ordinary
``vector_index`` / ``code_index`` set step over an explicit set of items
(plus its ``item_table``).  The ref lists the segments; queries search each
and merge (:class:`app.retrieval.Retriever`).

At each build, after the item steps are done (so every vector's content key
is known), :func:`assign` decides the segments:

1. each segment of the current ref is re-planned over its own items: if it
   is still fresh (same items, same vectors -> same recipe key), it is kept
   as it is -- nothing is rebuilt;
2. a segment that lost an item (forgotten, deleted, failed) or whose items'
   vectors changed is dissolved, and its remaining items join the new items;
3. the new items (and dissolved segments' items) form one new segment;
4. **compaction**: when there would be more than ``max_segments`` segments,
   or the segments other than the largest hold more than
   ``compact_fraction`` of all items, everything is merged into one segment
   (``flow compact`` forces this).  Defaults: 8 and 0.5.

A target configures this with ``[targets.<name>.segments]`` (``max`` and
``compact_fraction``).  Segments are content-addressed like everything else:
merging back into one segment over the same items gives the same key as a
fresh single index, so nothing is ever built twice.
"""

from __future__ import annotations

from dataclasses import dataclass

from flow.errors import ConfigError
from flow.graph import Graph, Input, Step

DEFAULT_MAX = 8
DEFAULT_FRACTION = 0.5


@dataclass(frozen=True)
class Policy:
    max_segments: int = DEFAULT_MAX
    compact_fraction: float = DEFAULT_FRACTION

    @classmethod
    def from_target(cls, target: str, spec: dict) -> Policy:
        seg = spec.get("segments", {})
        if not isinstance(seg, dict):
            raise ConfigError(
                f"[targets.{target}] segments must be a table (max, compact_fraction)"
            )
        unknown = set(seg) - {"max", "compact_fraction"}
        if unknown:
            raise ConfigError(f"[targets.{target}.segments]: unknown key(s) {sorted(unknown)}")
        mx = seg.get("max", DEFAULT_MAX)
        fr = seg.get("compact_fraction", DEFAULT_FRACTION)
        if not isinstance(mx, int) or mx < 1:
            raise ConfigError(f"[targets.{target}.segments] max must be a positive integer")
        if not isinstance(fr, int | float) or not 0 < fr <= 1:
            raise ConfigError(f"[targets.{target}.segments] compact_fraction must be in (0, 1]")
        return cls(mx, float(fr))


def assign(
    previous: list[list[str]],
    still_fresh: list[bool],
    database: list[str],
    policy: Policy,
    *,
    compact: bool = False,
) -> list[list[str]]:
    """The segments (lists of item ids, sorted) for this build.

    ``previous`` are the current ref's segments, ``still_fresh[j]`` whether
    segment ``j`` re-plans fresh over exactly its items, ``database`` the ids
    of every item the index must hold now.
    """
    db = sorted(database)
    if not db:
        return []
    if len(previous) == 1 and still_fresh[0] and previous[0] == db:  # nothing changed
        return [db]
    present = set(db)
    kept = [
        sorted(seg) for seg, ok in zip(previous, still_fresh) if ok and seg and set(seg) <= present
    ]
    covered = {i for seg in kept for i in seg}
    new = [i for i in db if i not in covered]
    segments = kept + ([new] if new else [])
    if compact or len(segments) > policy.max_segments:
        return [db]
    if len(segments) > 1:
        largest = max(len(s) for s in segments)
        if (len(db) - largest) / len(db) > policy.compact_fraction:
            return [db]
    return segments


def segment_steps(
    graph: Graph,
    target: str,
    index_step: str,
    table_step: str,
    segments: list[list[str]],
) -> tuple[Graph, list[tuple[str, str]]]:
    """``graph`` with one index and one table step per segment (named
    ``<target>.index.<n>`` and ``<target>.table.<n>``); returns the new graph
    and the (index, table) names."""
    ix, tb = graph[index_step], graph[table_step]
    g = Graph(graph.values())
    names = []
    for n, members in enumerate(segments):
        ids = frozenset(members)
        ix_inputs = tuple(Input(i.step, "all", i.splits, ids) for i in ix.inputs)
        tb_inputs = tuple(Input(i.step, "all", i.splits, ids) for i in tb.inputs)
        a, b = f"{target}.index.{n}", f"{target}.table.{n}"
        g.add(Step(name=a, node=ix.node, params=ix.params, inputs=ix_inputs))
        g.add(Step(name=b, node=tb.node, params=tb.params, inputs=tb_inputs))
        names.append((a, b))
    return g, names
