"""A montage of a query beside its results, each captioned with its labels.

Pictures are made by the target's own query chain up to ``normalize`` (so a
radiologist sees what the index saw); results whose source file is not at
hand (no project, file moved) are drawn as an empty panel with their id.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np


def picture(retriever: Any, image: str | os.PathLike | bytes) -> np.ndarray | None:
    """The normalized image the index saw for ``image`` (None if it can't be made)."""
    from flow.errors import FlowError

    chain = retriever.chain
    stop = next((i for i, e in enumerate(chain) if e["node"].endswith(":normalized")), None)
    if stop is None:
        return None
    try:
        values = retriever.vectors(image, upto=chain[stop]["step"])
    except FlowError:
        return None
    out = values[chain[stop]["step"]]
    return np.asarray(out) if np.ndim(out) == 2 else None


def montage(
    retriever: Any,
    query: str,
    hits: list,
    paths: dict[str, str],
    out: str,
    known: tuple[str, tuple[str, ...]] | None = None,
) -> None:
    """``known``: the query's own (id, labels) when it is an item of the project."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    caption = os.path.basename(str(query))
    if known is not None:
        caption = f"{known[0]}\n{'|'.join(known[1]) or '(no labels)'}"
    panels = [("query", picture(retriever, query), caption)]
    for h in hits:
        p = paths.get(h.id)
        img = picture(retriever, p) if p and os.path.exists(p) else None
        panels.append(
            (
                f"#{h.rank}  d={h.distance:.3f}",
                img,
                f"{h.id}\n{'|'.join(h.labels) or '(no labels)'}",
            )
        )
    cols = min(6, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.9 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (title, img, caption) in zip(axes.ravel(), panels):
        if img is not None:
            ax.imshow(img, cmap="gray", vmin=0, vmax=1)
        else:
            ax.text(0.5, 0.5, "(image not\navailable)", ha="center", va="center", fontsize=8)
        ax.set_title(title, fontsize=9, color="tab:red" if title == "query" else "black")
        ax.text(
            0.5,
            -0.04,
            caption,
            transform=ax.transAxes,
            ha="center",
            va="top",
            fontsize=7,
            wrap=True,
        )
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
