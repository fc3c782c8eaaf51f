"""What a user waits for: fresh ``flow`` processes on real image files.

Run: ``python bench/bench_cli.py --items 10000 [--runs 5] [--keep DIR] [--compare CHECKOUT]``

A project of ``--items`` synthetic 64x64 PNG chest-like images (the helpers of
``bench_incremental.py``) with one ``cnn`` target whose network is a fixed,
randomly initialized ONNX file (``weights = ...``: training is not measured) is
built once by ``flow build``; then every timing is the wall time of a fresh
process, interpreter start-up, imports and project load included, exactly as a
user types it:

* ``noop``: ``flow -q build index --target=all`` with nothing stale (``--runs`` times);
* ``status``: ``flow -q status`` (``--runs`` times);
* ``incremental`` (``--incremental``): 1% new images are added, then one
  ``flow build``; its time as a share of the full build (``--rounds`` rounds).

``--watch`` runs a ``flow watch`` of the project (``--settle`` an hour, so it
never builds by itself) while the same fresh ``flow build`` / ``flow status``
processes are timed: they hand over to it (``app.handoff``), which is how a
project kept fresh by a watcher answers.  Those rows are ``*_handoff``.

``--compare CHECKOUT`` times another checkout of flow (e.g. a git worktree of an
older commit) in the same run, alternating the two run by run so that the
machine's load drifts over both alike; each gets its own copy of the project's
store (their caches differ), the images are shared (hard links).  Both run as
``python -c "from cli.main import main; main()"`` with ``PYTHONPATH`` set to
their checkout, so start-up is measured alike.  The report gives medians, the
runs, and the load average at the start and the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

from bench_incremental import _images, _onnx  # noqa: E402

from app.project import write_project  # noqa: E402


def _config(weights: str) -> dict:
    return {
        "store": {"url": "store"},
        "build": {"workers": 2},
        "sources": [{"path": "images"}],
        "targets": {
            "cnn": {
                "kind": "cnn",
                "weights": weights,
                "normalize": {"size": 64},
                "embedder": {"dim": 32, "size": 64},
            }
        },
    }


def make_project(root: Path, items: int) -> float:
    """Images, weights and flow.toml in ``root``; the full build's seconds (a fresh CLI)."""
    if (root / "store" / "refs").exists():
        return float(json.loads((root / "full.json").read_text())["seconds"])
    _images(root / "images", 0, items)
    _onnx(root / "cnn.onnx")
    write_project(root, _config("cnn.onnx"))
    time.sleep(2.1)  # older than the stat cache's "too recent" window
    t0 = time.perf_counter()
    out = flow(REPO, root, "build", "index", "--target=all")
    full = time.perf_counter() - t0
    assert out.returncode == 0, out.stderr[-2000:]
    (root / "full.json").write_text(json.dumps({"seconds": full, "items": items}))
    return full


def flow(checkout: Path, root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    return subprocess.run(
        [sys.executable, "-c", "from cli.main import main; main()", "-q", *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
    )


def timed(checkout: Path, root: Path, *args: str) -> float:
    t0 = time.perf_counter()
    out = flow(checkout, root, *args)
    dt = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"flow {' '.join(args)} in {root} failed:\n{out.stderr[-3000:]}")
    return dt


def clone(root: Path, to: Path) -> Path:
    """A copy of the project for another checkout: its own store, the same images."""
    if to.exists():
        shutil.rmtree(to)
    to.mkdir(parents=True)
    subprocess.run(["cp", "-al", str(root / "images"), str(to / "images")], check=True)
    shutil.copy2(root / "cnn.onnx", to / "cnn.onnx")
    shutil.copy2(root / "flow.toml", to / "flow.toml")
    shutil.copytree(root / "store", to / "store")
    return to


def handoff(root: Path, items: int, runs: int, full: float, rounds: int) -> dict:
    """The same fresh processes, with a ``flow watch`` of the project to hand over to."""
    from app.handoff import socket_path

    log = open(root / "watch.log", "w")  # noqa: SIM115 - closed below
    watch = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from cli.main import main; main()",
            "-v",
            "watch",
            "--settle",
            "3600",
            "--interval",
            "0.5",
        ],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    out: dict = {}
    try:
        sock = socket_path(str(root / "flow.toml"))
        deadline = time.monotonic() + 600
        while not sock.exists() or " computed in " not in (root / "watch.log").read_text():
            if watch.poll() is not None or time.monotonic() > deadline:
                raise SystemExit((root / "watch.log").read_text()[-3000:])
            time.sleep(0.5)
        before = (root / "watch.log").read_text().count("handed over")
        for what, args in (("noop", ("build", "index", "--target=all")), ("status", ("status",))):
            out[f"{what}_handoff"] = summary([timed(REPO, root, *args) for _ in range(runs)])
        add = max(1, items // 100)
        inc = []
        start = items + 1_000_000  # names no other round uses
        for r in range(rounds):
            _images(root / "images", start + r * add, add)
            time.sleep(2.1)
            inc.append(timed(REPO, root, "build", "index", "--target=all"))
        if inc:
            out["incremental_handoff"] = {
                **summary(inc),
                "share_of_full": round(statistics.median(inc) / full, 4),
            }
        handed = (root / "watch.log").read_text().count("handed over") - before
        assert handed == 2 * runs + len(inc), f"only {handed} commands were handed over"
    finally:
        watch.terminate()
        watch.wait(timeout=60)
        log.close()
    return out


def summary(xs: list[float]) -> dict:
    return {"median": round(statistics.median(xs), 3), "runs": [round(x, 3) for x in xs]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=10_000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--keep", type=Path, help="Project folder to make or reuse.")
    ap.add_argument("--compare", type=Path, help="Another checkout of flow to time beside.")
    ap.add_argument("--incremental", action="store_true", help="Also time +1% builds.")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--watch", action="store_true", help="Also time handing over to flow watch.")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()

    load0 = os.getloadavg()[0]
    base = a.keep or Path(tempfile.mkdtemp(prefix="bench-cli-"))
    root = base / "project"
    root.mkdir(parents=True, exist_ok=True)
    full = make_project(root, a.items)
    checkouts = {"this": (REPO, root)}
    if a.compare:
        checkouts["compare"] = (a.compare.resolve(), clone(root, base / "compare"))
    # one untimed run each: the other checkout writes its own caches once
    for checkout, proj in checkouts.values():
        timed(checkout, proj, "build", "index", "--target=all")
    res: dict = {"items": a.items, "full_build_s": round(full, 2)}
    for what, args in (("noop", ("build", "index", "--target=all")), ("status", ("status",))):
        times: dict[str, list[float]] = {k: [] for k in checkouts}
        for _ in range(a.runs):
            for name, (checkout, proj) in checkouts.items():
                times[name].append(timed(checkout, proj, *args))
        res[what] = {k: summary(v) for k, v in times.items()}
    if a.incremental:
        add = max(1, a.items // 100)
        inc: dict[str, list[float]] = {k: [] for k in checkouts}
        for r in range(a.rounds):
            start = a.items + r * add
            _images(root / "images", start, add)  # hard links: the clones see them too
            time.sleep(2.1)
            for name, (checkout, proj) in checkouts.items():
                if proj != root:
                    for i in range(start, start + add):
                        f = f"im{i:06d}.png"
                        if not (proj / "images" / f).exists():
                            os.link(root / "images" / f, proj / "images" / f)
                inc[name].append(timed(checkout, proj, "build", "index", "--target=all"))
        res["incremental"] = {
            k: {**summary(v), "share_of_full": round(statistics.median(v) / full, 4)}
            for k, v in inc.items()
        }
    if a.watch:
        res.update(handoff(root, a.items, a.runs, full, a.rounds if a.incremental else 0))
    res["load"] = [round(load0, 2), round(os.getloadavg()[0], 2)]
    print(json.dumps(res, indent=1))
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
