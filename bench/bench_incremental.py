"""Incremental re-indexing cost.  Run: ``python bench/bench_incremental.py [--items 10000]``.

A catalog of synthetic 64x64 PNG images goes through the real pipeline
(decode -> normalize -> embedding with a small CNN -> index): the CNN is
fixed and randomly initialized, given to the target as its weights file
(``weights = ...``), so the benchmark measures the framework and the nodes,
not training.  ``--net`` says which CNN:

* ``flow`` (default): the network flow's ``cnn`` target trains (width 32: a
  5x5 stem and three conv blocks of 64/128/256 channels), as a torch
  state_dict that flow exports to ONNX itself;
* ``tiny``: a toy network with 8/16/32 channels, ~16x less compute per image
  (what earlier runs of this benchmark used; the per-build fixed cost then
  weighs ~4x more in the ratio).

Then 1% new images are added and the same build runs again.  Both builds
include scanning, planning, the new index segment and the ref move, and are
timed in the same run; the ratio is incremental / full.  ``--mode`` says how a build runs:

* ``cluster`` (default): ``Workspace.build`` on one long-lived local Dask
  cluster of ``--workers`` processes, shared by all builds;
* ``watch``: ``flow watch``'s own loop (:class:`app.watch.Watcher`, settle 0)
  in this process: a build is one poll (reading what the file notifications
  name, or a full scan with ``--poll``), each making its own executor (a local
  cluster for big builds, threads of this process below ``[build]
  threads_below`` stale items);
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


def project(weights: str, images: str = "images", workers: int | None = None) -> dict:
    """The benchmark's flow.toml (written by ``app.project.write_project``): one
    source, one ``cnn`` target over the fixed network in ``weights``."""
    cnn = {
        "kind": "cnn",
        "weights": weights,
        "normalize": {"size": 64},
        "embedder": {"dim": 32, "size": 64},
    }
    config: dict = {"store": {"url": "store"}, "sources": [{"path": images}]}
    config["targets"] = {"cnn": cnn}
    if workers is not None:
        config["build"] = {"workers": workers}
    return config


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


def _flow_net(path: Path, dim: int = 32) -> None:
    """flow's own embedding network (nodes._cnn.network), randomly initialized."""
    import torch

    from nodes import _cnn

    torch.manual_seed(0)
    torch.save(_cnn.network(dim, 32, 64).eval().state_dict(), path)


def _onnx(path: Path, dim: int = 32) -> None:
    """The toy network (``--net tiny``), as ONNX."""
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


def run(
    root: Path,
    items: int,
    workers: int,
    mode: str = "cluster",
    n_rounds: int = 1,
    net: str = "flow",
    notify: bool = True,
) -> dict:
    from app.project import load_project, write_project
    from app.watch import Watcher
    from app.workspace import Workspace
    from engine.executors import get_executor

    _images(root / "images", 0, items)
    weights = "cnn.pt" if net == "flow" else "cnn.onnx"
    (_flow_net if net == "flow" else _onnx)(root / weights)
    write_project(root, project(weights, workers=workers))
    ex = get_executor("local", workers) if mode == "cluster" else None
    watcher = Watcher(load_project(root), settle=0, notify=notify) if mode == "watch" else None

    def build() -> tuple[float, dict, list]:
        if mode == "cli":
            s, doc = _cli_build(root)
            assert doc["ok"], doc["failures"]
            steps = {k: v["computed"] for k, v in doc["steps"].items() if v["computed"]}
            segs = [s["count"] for s in doc["refs"].get("cnn", [])]
            return s, steps, segs
        t0 = time.perf_counter()
        if watcher is not None:  # one poll of `flow watch`: its scan, then its build
            built = watcher.poll()
        else:  # one long-lived cluster for every build
            built = Workspace.open(root).build("all", executor=ex, progress=False)
        s = time.perf_counter() - t0
        if built is None:  # the watcher saw nothing new: a scan, no build
            return s, {}, []
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
        if watcher is not None:
            watcher.close()
    return {
        "mode": mode + ("" if notify or mode != "watch" else " --poll"),
        "net": net,
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
        help="cluster: Workspace.build on one long-lived local cluster; watch: polls of "
        "flow watch's Watcher in this process (settle 0); cli: "
        "`flow build index --target=all` subprocesses, start-up included",
    )
    ap.add_argument(
        "--net",
        choices=("flow", "tiny"),
        default="flow",
        help="flow: the cnn target's own network (width 32); tiny: a toy 8/16/32-channel net",
    )
    ap.add_argument(
        "--poll",
        action="store_true",
        help="watch mode: scan every file at every poll (flow watch --poll)",
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
            r = run(tmp, args.items, args.workers, args.mode, args.rounds, args.net, not args.poll)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        results.append(r)
        print(
            f"[{r['mode']}, {r['net']} net] {r['items']} items, full build {r['full_s']} s; "
            f"+{r['added']} items: "
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
