"""``flow demo``: a labeled phantom study, its project, and a query to show.

The study is synthetic chest radiographs with findings (:mod:`app.phantoms`),
written as real DICOM in several transfer syntaxes; running the demo again
reuses the files, the project and everything already built.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["DEMO_TOML", "demo_probe", "prepare_demo"]

DEMO_TOML = """\
# The flow demo: synthetic chest phantoms written as DICOM by `flow demo`.
[store]
url = ".flow/store"

[build]
scheduler = "{scheduler}"

[[sources]]
path = "images"
labels = "labels.csv"

[train]
splits = ["train"]

[eval]
queries = ["val"]
database = ["train"]
k = 10

[targets.cnn]
kind = "cnn"
[targets.cnn.normalize]
size = 64
[targets.cnn.embedder]
epochs = {epochs}
batch_size = 16    # 150 training images: more, smaller steps for the findings head

[targets.bovw]
kind = "bovw"

[targets.codes]
kind = "codes"
embedding = "cnn"
[targets.codes.coder]
bits = 32

# regions of every image (overlapping tiles), for region-of-interest queries:
# `flow query IMAGE --target regions --roi x,y,w,h`, or draw a box in `flow serve`
[targets.regions]
kind = "regions"
"""


def prepare_demo(
    folder: str | Path,
    *,
    n: int = 200,
    epochs: int = 15,
    scheduler: str = "local",
    log: Any = None,
) -> Path:
    """Write the phantom study (unless there) and its flow.toml (unless there)
    into ``folder``; the folder."""
    from app.phantoms import write_phantom_study

    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "labels.csv").exists():
        if log:
            log(f"writing {n} phantom studies to {root / 'images'}")
        write_phantom_study(root, n=n, seed=0)
    toml = root / "flow.toml"
    if not toml.exists():
        toml.write_text(DEMO_TOML.format(scheduler=scheduler, epochs=epochs), encoding="utf-8")
    return root


def demo_probe(ws: Any) -> tuple[str, tuple[str, ...]]:
    """The study the demo queries with (the first ``val`` one): its file and labels."""
    items, _, meta = ws.items()
    val = [i for i, s in enumerate(items.splits) if s == "val"]
    i = val[0] if val else 0
    return meta["paths"][i], tuple(meta["labels"][i])
