"""Incremental re-indexing cost.  Run: ``python bench/bench_incremental.py [--items 10000]``.

A catalog of synthetic 64x64 PNG images goes through the real pipeline
(decode -> normalize -> embedding with a small CNN -> index): the CNN is a
fixed, randomly initialized network exported to ONNX and given to the target
as its weights file (``weights = ...``), so the benchmark measures the
framework and the nodes, not training.  Then 1% new images are added and the
same build runs again.  Both builds include scanning, planning, the new
index segment and the ref move, and are timed in the same run; the ratio is
incremental / full.  ``--mode`` says how a build runs:

* ``cluster`` (default): ``Workspace.build`` on one long-lived local Dask
  cluster of ``--workers`` processes, shared by all builds;
* ``watch``: ``Workspace.build`` with no executor given, as ``flow watch``
  calls it: each build makes its own (a local cluster for big builds, threads
  of this process below ``[build] threads_below`` stale items);
* ``cli``: ``flow build index --target=all`` as a subprocess, what a user
  types: interpreter start-up, imports and the executor included.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

TOML = """
[store]
url = "store"
[[sources]]
path = "images"
[targets.cnn]
kind = "cnn"
weights = "cnn.onnx"
[targets.cnn.normalize]
size = 64
[targets.cnn.embedder]
dim = 32
size = 64
"""


def _images(folder: Path, start: int, n: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:64, :64]
    for i in range(start, start + n):
        rng = np.random.default_rng(i)
        img = 60 + 40 * np.sin(xx / (4 + rng.random() * 8)) + rng.normal(0, 12, (64, 64))
        for _ in range(rng.integers(1, 4)):
            cy, cx, r = [*rng.integers(8, 56, 2).tolist(), int(rng.integers(3, 10))]
            img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] += rng.integers(40, 120)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"im{i:06d}.png")


def _onnx(path: Path, dim: int = 32) -> None:
    import torch
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 8, 5, stride=2, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, dim),
    ).eval()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net,
            (torch.zeros(1, 1, 64, 64),),
            str(path),
            dynamo=False,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "n"}},
        )


def _cli_build(root: Path) -> tuple[float, dict]:
    """``flow build index --target=all --json`` as a user runs it: (seconds, report)."""
    import json
    import subprocess
    import sys

    flow = str(Path(sys.executable).parent / "flow")
    t0 = time.perf_counter()
    out = subprocess.run(
        [flow, "-q", "build", "index", "--target=all", "--json"],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    )
    return time.perf_counter() - t0, json.loads(out.stdout[out.stdout.index("{") :])


def run(root: Path, items: int, workers: int, mode: str = "cluster", n_rounds: int = 1) -> dict:
    from flow.schedule import get_executor
    from nodes.api import Workspace

    _images(root / "images", 0, items)
    _onnx(root / "cnn.onnx")
    (root / "flow.toml").write_text(TOML + f"[build]\nworkers = {workers}\n")
    ex = get_executor("local", workers) if mode == "cluster" else None

    def build() -> tuple[float, dict, list]:
        if mode == "cli":
            s, doc = _cli_build(root)
            assert doc["ok"], doc["failures"]
            steps = {k: v["computed"] for k, v in doc["steps"].items() if v["computed"]}
            segs = [s["count"] for s in doc["refs"].get("cnn", [])]
            return s, steps, segs
        t0 = time.perf_counter()
        # "cluster": one long-lived cluster for every build; "watch": each build makes
        # its own executor as `flow watch` does (a cluster only for big builds)
        built = Workspace.open(root).build("all", executor=ex, progress=False)
        s = time.perf_counter() - t0
        assert built.report.ok, built.incomplete
        steps = {k: v.computed for k, v in built.report.steps.items() if v.computed}
        moved = built.moved.get("cnn")
        return s, steps, [g["count"] for g in moved["value"]["segments"]] if moved else []

    try:
        full, _, segs = build()
        assert segs == [items], segs
        add = max(1, items // 100)
        rounds = []
        for r in range(n_rounds):  # each round adds 1% never seen before
            time.sleep(2.1)
            _images(root / "images", items + r * add, add)
            time.sleep(2.1)  # the new files are older than the stat cache's "too recent" window
            inc, steps, segs = build()
            rounds.append(inc)
        noop, _, _ = build()
    finally:
        if ex is not None:
            ex.close()
    return {
        "mode": mode,
        "items": items,
        "added": add,
        "full_s": round(full, 2),
        "incremental_s": round(rounds[0], 3),
        "ratio": round(rounds[0] / full, 4),
        "rounds_s": [round(x, 3) for x in rounds],
        "later_ratio": round(statistics.median(rounds[1:]) / full, 4) if n_rounds > 1 else None,
        "noop_s": round(noop, 3),
        "computed": steps,
        "segments": segs,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=10_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument(
        "--mode",
        choices=("cluster", "watch", "cli"),
        default="cluster",
        help="cluster: Workspace.build on one long-lived local cluster; watch: "
        "Workspace.build making its own executor per build (as `flow watch`); cli: "
        "`flow build index --target=all` subprocesses, start-up included",
    )
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="successive +1%% builds per run; later_ratio is the median of rounds 2.. "
        "(a long-lived `flow watch` process past its first build)",
    )
    args = ap.parse_args()
    results = []
    for _ in range(args.runs):
        tmp = Path(tempfile.mkdtemp(prefix="flow-inc-"))
        try:
            r = run(tmp, args.items, args.workers, args.mode, args.rounds)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        results.append(r)
        print(
            f"[{r['mode']}] {r['items']} items, full build {r['full_s']} s; +{r['added']} items: "
            f"{r['incremental_s']} s = {100 * r['ratio']:.2f}% of full; no-op {r['noop_s']} s; "
            f"computed {r['computed']}; segments {r['segments']}"
            + (
                f"; rounds {r['rounds_s']}, later rounds {100 * r['later_ratio']:.2f}%"
                if r["later_ratio"] is not None
                else ""
            ),
            flush=True,
        )
    if len(results) > 1:
        print(f"median ratio {statistics.median(r['ratio'] for r in results):.4f}")
        if results[0]["later_ratio"] is not None:
            later = statistics.median(r["later_ratio"] for r in results)
            print(f"median ratio of later rounds {later:.4f}")
    os._exit(0)


if __name__ == "__main__":
    main()
