"""Quality and speed on real chest X-rays.  Run: ``python bench/bench_nih.py [--runs 5]``.

On ``../shared/data/nih-dev`` (800 64x64 PNG chest X-rays with NIH multi-labels;
``train`` is the database and trains the fit nodes, ``val`` queries it), with the
project's default targets (``flow init``'s ``cnn``, ``bovw`` and ``codes``):

* **build**: wall time of ``flow build index --target=all`` on a fresh store, as a
  user runs it (a subprocess: start-up, scanning, decoding, training the
  embedder, the vocabulary and the coder, every index);
* **quality**: ``flow eval --json`` of every target: AvG@10, precision@10, mAP@10,
  and the random baseline computed in the same run; and raw-pixel cosine kNN
  (the issue's second baseline) computed here from the same normalized pixels;
* **query**: end-to-end wall time of ``flow query IMAGE --target T -k 10 --json``
  (a fresh interpreter each time, start-up included), median of ``--runs``.

Prints a Markdown table; ``--json FILE`` writes the numbers too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
NIH = REPO / ".." / "shared" / "data" / "nih-dev"
CLI = [sys.executable, "-c", "from cli.main import main; main()"]


def _flow(root: Path, *args: str) -> tuple[float, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    t = time.perf_counter()
    res = subprocess.run(
        [*CLI, "-q", "-p", str(root), *args], capture_output=True, text=True, env=env
    )
    wall = time.perf_counter() - t
    if res.returncode != 0:
        sys.exit(f"flow {' '.join(args)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return wall, res.stdout


def _project(root: Path) -> None:
    from click.testing import CliRunner

    from cli.main import cli

    images = os.path.relpath(NIH.resolve() / "images", root)
    labels = os.path.relpath(NIH.resolve() / "labels.csv", root)
    res = CliRunner().invoke(cli, ["init", str(root), "--images", images, "--labels", labels])
    assert res.exit_code == 0, res.output


def _raw_pixel_baseline(k: int) -> dict:
    """Cosine kNN over the 64x64 pixels (mean-centred per image), val vs train."""
    import csv

    from PIL import Image

    from nodes.metrics import label_matrix, retrieval_metrics

    rows = list(csv.DictReader((NIH / "labels.csv").open()))
    by = {"train": [], "val": []}
    for r in rows:
        if r["split"] in by:
            by[r["split"]].append(r)

    def vectors(rs):
        x = np.stack([np.asarray(Image.open(NIH / r["file"]).convert("L"), np.float32).ravel()
                      for r in rs])  # fmt: skip
        x -= x.mean(axis=1, keepdims=True)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    db, q = vectors(by["train"]), vectors(by["val"])
    order = np.argsort(-(q @ db.T), axis=1, kind="stable")[:, :k]
    labs = [tuple(r["finding_labels"].split("|")) for r in by["train"] + by["val"]]
    y, _ = label_matrix(labs)
    ydb, yq = y[: len(db)], y[len(db) :]
    m = retrieval_metrics(yq, ydb, order, (k,))
    return {name: m[name][k] for name in ("avg", "precision", "map")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5, help="query timings (median)")
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    ap.add_argument("--keep", type=Path, help="build in this folder and keep it")
    args = ap.parse_args()
    if not (NIH / "labels.csv").is_file():
        sys.exit(f"no nih-dev data at {NIH}")
    tmp = tempfile.TemporaryDirectory(prefix="bench-nih-")
    root = args.keep or Path(tmp.name)
    root.mkdir(parents=True, exist_ok=True)
    _project(root)
    load = os.getloadavg()[0]
    print(f"load average before: {load:.2f}; {os.cpu_count()} CPUs", file=sys.stderr)

    build_s, _ = _flow(root, "build", "index", "--target=all")
    print(f"build (all targets, fresh store): {build_s:.1f} s", file=sys.stderr)
    noop_s, _ = _flow(root, "build", "index", "--target=all")
    _, out = _flow(root, "eval", "--json")
    evals = json.loads(out)
    raw = _raw_pixel_baseline(10)

    probe = sorted((NIH / "images").glob("*.png"))[0]
    query = {}
    for t in ("cnn", "bovw", "codes"):
        _flow(root, "query", str(probe), "--target", t, "--json")  # warm the page cache
        walls = [_flow(root, "query", str(probe), "--target", t, "--json")[0]
                 for _ in range(args.runs)]  # fmt: skip
        query[t] = {"median_s": statistics.median(walls), "runs": walls}

    doc = {"load_before": load, "build_s": build_s, "noop_s": noop_s, "eval": evals,
           "raw_pixels": raw, "query": query}  # fmt: skip
    print(f"\nflow build index --target=all: {build_s:.1f} s (no-op rebuild {noop_s:.2f} s)")
    print("\n| target | AvG@10 | P@10 | mAP@10 | random AvG@10 | query median (s) |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in evals:
        m, b = r["metrics"], r["random"]
        q = query[r["target"]]["median_s"]
        print(f"| {r['target']} | {m['avg']['10']:.3f} | {m['precision']['10']:.3f} | "
              f"{m['map']['10']:.3f} | {b['avg']['10']:.3f} | {q:.2f} |")  # fmt: skip
    print(f"| raw pixels (cosine) | {raw['avg']:.3f} | {raw['precision']:.3f} | "
          f"{raw['map']:.3f} | | |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
