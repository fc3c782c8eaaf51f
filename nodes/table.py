"""The item table of an index: which item is at which position, with its labels.

(Until the application moved out of ``nodes/`` this node lived in
``nodes/pipeline.py``; its code, and so its key, is unchanged.)
"""

from __future__ import annotations

from flow import Items, node

__all__ = ["item_table"]


@node(version=1, kind="set")
def item_table(labels: Items) -> dict:
    """The ids and labels of an index's items, in index order (for query results)."""
    return {
        "ids": tuple(labels.ids),
        "labels": tuple("|".join(v) for v in labels.values),
    }
