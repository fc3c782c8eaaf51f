"""Item labels as the fit nodes read them."""

from __future__ import annotations

from typing import Any

import numpy as np


def label_tuple(value: Any, item_id: str) -> tuple[str, ...]:
    """An item's labels as a sorted tuple of strings ('A|B' is split)."""
    if value is None:
        return ()
    if isinstance(value, str):
        value = value.split("|")
    elif isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, list | tuple):
        raise ValueError(f"labels of {item_id!r} must be a tuple of strings, got {value!r}")
    out = set()
    for lab in value:
        if not isinstance(lab, str):
            raise ValueError(f"labels of {item_id!r} must be strings, got {lab!r}")
        if lab.strip():
            out.add(lab.strip())
    return tuple(sorted(out))
