"""flow against peers (redun, Snakemake): no-op and 1%-incremental rebuilds.

Run::

    python bench/bench_peers.py [--items 2000] [--runs 3] [--json FILE]
    python bench/bench_peers.py --quick          # 200 items, 1 run

Peers are optional benchmark dependencies, not project dependencies:
``pip install redun`` (adds packages only) and Snakemake in its own venv,
because ``pip install snakemake`` would downgrade ``packaging`` and upgrade
``docutils`` in the system python::

    python -m venv /tmp/peers-venv --system-site-packages
    /tmp/peers-venv/bin/pip install snakemake

``--snakemake`` / ``--redun`` / ``--flow`` give the executables' paths
(default: ``/tmp/peers-venv/bin/snakemake`` if present, else the ones beside
this python, else ``PATH``).  A peer that is not installed is skipped.

What is measured
----------------
One pipeline, the one of ``bench_incremental.py`` (whose image writer and
ONNX export are imported from it): N synthetic 64x64 PNG images -> decode ->
normalize (64 px) -> embed (a fixed, randomly initialized CNN exported to
ONNX and given as the weights file, so no training is measured; dim 32) ->
an annoy index (50 trees, seed 0) over all vectors.  All tools read the same
image folder and the same ``cnn.onnx``; each keeps its own state in its own
folder.  For each tool, in the same run, wall-clock seconds of the command a
user would type, as a subprocess, interpreter start-up included:

* **full**: the first build of N items (once);
* **no-op**: the same command again, nothing changed (median of ``--runs``);
* **incremental**: ``N // 100`` *new* images (never seen before: fresh
  seeds) are added, then the same command (median of ``--runs``; each run
  adds its own new images, so the catalogue grows N -> N+1% -> N+2% ...).

Phases are interleaved (every tool's run r before any tool's run r+1, the
order rotated each round), so load on the shared machine hits all alike.
Before timing, each phase waits 2.1 s after writing images (flow's stat
cache re-hashes files younger than that, as git does; the other tools don't
care), which no tool is charged for.  After the runs each tool's index must
hold every image, and redun's and Snakemake's annoy files must be
byte-identical (same work, same order).

Rows:

* ``flow``: ``flow build index --workers 2`` (default scheduler: a local
  Dask cluster of 2 single-threaded worker processes, started by every
  command, no-op included); the ratios are against this row;
* ``flow-threads``: the same with ``--scheduler threads`` (2 threads, no
  cluster start);
* ``flow-inproc``: ``Workspace.build`` in this process with one long-lived
  local cluster of 2 workers (as ``flow watch`` runs): no interpreter
  start-up, imports or cluster start;
* ``redun``: ``redun run workflow.py main --images DIR --weights FILE``: a
  ``@task`` per image (decode + normalize + embed, returning the vector) and
  an index task over all vectors writing ``index.ann``; default sqlite
  backend in ``.redun``, local executor in its default thread mode with
  ``max_workers = 2``;
* ``snakemake``: ``snakemake --cores 2 --force-use-threads``: a rule per
  image writing ``vectors/<id>.npy`` and an index rule over all of them
  (``glob_wildcards`` over the image folder).

Fairness choices
----------------
* Same per-item work everywhere: the peers call flow's own node functions
  as plain Python (``decoded.fn``, ``normalized.fn``, ``embedding.fn``,
  ``vector_index.fn``, the undecorated functions), so only orchestration,
  bookkeeping and storage differ.  onnxruntime is pinned to one thread by
  ``nodes.embed`` for all.
* Same parallelism: 2 workers everywhere (flow's default on this machine).
* Snakemake's ``run:`` jobs are by default spawned as one
  ``python -m snakemake`` subprocess per job on POSIX; ``--force-use-threads``
  runs them in Snakemake's own thread pool instead, far cheaper per job, so
  it is Snakemake's fastest configuration (``--snakemake-mode processes``
  measures the default).  A no-op runs no job, so the mode does not change
  it.  Snakemake's default rerun triggers (mtime, code, params, input, ...)
  are left on.
* Peers rebuild the whole index on an incremental build (their idiomatic
  "index rule over all outputs"); flow adds a small index segment.  That is
  a design difference the benchmark counts, not hides; ``index_s`` reports
  what one full index build over all vectors costs in-process, for scale.
* Console output of every tool goes to a log file, not a terminal.
* Every tool runs from compiled bytecode: flow's packages are compiled first
  (``_bytecode``), as pip compiles an installed package such as Snakemake.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from bench_incremental import _images, _onnx, project  # noqa: E402

WORKERS = 2
TREES = 50

# --------------------------------------------------------------------------
# the per-item work the peers run: flow's node functions, undecorated


def item_vector(png: str, weights: str) -> np.ndarray:
    """decode -> normalize(64) -> embed of one PNG file, as flow's cnn target does."""
    from flow import Blob
    from nodes.decode import decoded
    from nodes.embed import embedding
    from nodes.normalize import normalized

    image = normalized.fn(decoded.fn(Path(png).read_bytes()), size=64)
    embedder = {"model": Blob(Path(weights).read_bytes()), "size": 64, "dim": 32}
    return embedding.fn([image], embedder)[0]


def save_item_vector(png: str, weights: str, out: str) -> None:
    np.save(out, item_vector(png, weights), allow_pickle=False)


def save_index(ids: list[str], vectors: list, out: str) -> None:
    """An annoy file over the vectors (flow's ``vector_index`` node, defaults)."""
    from flow import Items
    from nodes.index import vector_index

    built = vector_index.fn(Items(ids, ids, [np.asarray(v) for v in vectors]), trees=TREES)
    Path(out).write_bytes(built["annoy"].data)


def save_index_of_files(npys: list[str], out: str) -> None:
    save_index([Path(p).stem for p in npys], [np.load(p) for p in npys], out)


# --------------------------------------------------------------------------
# the tools


REDUN_WORKFLOW = '''"""redun: a task per image, then an index task over all vectors."""
import os
import sys

sys.path.insert(0, @BENCH@)

from redun import Dir, File, task

import bench_peers

redun_namespace = "flow_bench"


@task()
def embed_item(image: File, weights: File):
    return bench_peers.item_vector(image.path, weights.path)


@task()
def build_index(ids: list, vectors: list, out: str) -> File:
    bench_peers.save_index(ids, vectors, out)
    return File(out)


@task()
def main(images: Dir, weights: File, out: str = "index.ann") -> File:
    files = sorted(images.files(), key=lambda f: f.path)
    ids = [os.path.basename(f.path) for f in files]
    return build_index(ids, [embed_item(f, weights) for f in files], out)
'''

REDUN_INI = f"""[executors.default]
type = local
max_workers = {WORKERS}
"""

SNAKEFILE = """import os
import sys

sys.path.insert(0, @BENCH@)
import bench_peers

IMAGES = @IMAGES@
WEIGHTS = @WEIGHTS@
IDS = sorted(glob_wildcards(os.path.join(IMAGES, "{id}.png")).id)

wildcard_constraints:
    id="[^/]+"

rule all:
    input: "index.ann"

rule embed:
    input: png=os.path.join(IMAGES, "{id}.png"), weights=WEIGHTS
    output: "vectors/{id}.npy"
    run:
        bench_peers.save_item_vector(input.png, input.weights, output[0])

rule index:
    input: expand("vectors/{id}.npy", id=IDS)
    output: "index.ann"
    run:
        bench_peers.save_index_of_files(list(input), output[0])
"""


class _Cmd:
    """A tool run as the command a user types, in its own folder."""

    def __init__(self, name: str, folder: Path, cmd: list[str]):
        self.name, self.folder, self.cmd = name, folder, cmd
        self.log = folder / "bench.log"

    def run(self) -> float:
        with open(self.log, "ab") as log:
            log.write(f"\n$ {' '.join(self.cmd)}\n".encode())
            log.flush()
            t0 = time.perf_counter()
            rc = subprocess.run(self.cmd, cwd=self.folder, stdout=log, stderr=log).returncode
            dt = time.perf_counter() - t0
        if rc:
            tail = self.log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{self.name}: {' '.join(self.cmd)} exited {rc}:\n{tail}")
        return dt

    def close(self) -> None:
        pass


class _FlowInProc:
    """``Workspace.build`` with one long-lived local cluster (as ``flow watch``)."""

    def __init__(self, folder: Path):
        from engine.executors import get_executor

        self.name, self.folder = "flow-inproc", folder
        self.executor = get_executor("local", WORKERS)

    def run(self) -> float:
        from app.workspace import Workspace

        t0 = time.perf_counter()
        built = Workspace.open(self.folder).build("all", executor=self.executor, progress=False)
        dt = time.perf_counter() - t0
        if not built.report.ok or built.incomplete:
            raise RuntimeError(f"flow-inproc: build failed: {built.incomplete}")
        return dt

    def close(self) -> None:
        self.executor.close()


def _exe(name: str, given: str | None) -> str | None:
    if given:
        return given
    folders = [Path(sys.executable).parent]
    if name == "snakemake":
        folders.insert(0, Path("/tmp/peers-venv/bin"))
    found = [f / name for f in folders if (f / name).exists()]
    return str(found[0]) if found else shutil.which(name)


def _version(exe: str) -> str:
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"? ({e})"
    return (out.stdout or out.stderr).strip().splitlines()[-1] if out.returncode == 0 else "?"


def _flow_project(folder: Path, images: Path, weights: Path) -> None:
    from app.project import write_project

    folder.mkdir(parents=True)
    write_project(folder, project(str(weights), images=str(images)))


def _bytecode() -> None:
    """Compile flow's packages to ``__pycache__`` as ``pip install`` does for an
    installed package (the peers' packages were compiled when pip installed them).
    An editable checkout under ``PYTHONDONTWRITEBYTECODE=1`` (as on the project's
    machines) would otherwise compile flow from source in every command: about
    60 ms of a 0.25 s no-op."""
    import compileall

    repo = Path(__file__).resolve().parents[1]
    for pkg in ("flow", "nodes", "store", "cli"):
        compileall.compile_dir(str(repo / pkg), quiet=1)


def _tools(root: Path, images: Path, weights: Path, args) -> tuple[list, dict]:
    tools, versions, skipped = [], {}, {}
    _bytecode()
    flow_exe = _exe("flow", args.flow)
    want = set(args.tools.split(","))
    if "flow" in want:
        _flow_project(root / "flow", images, weights)
        tools.append(_Cmd("flow", root / "flow", [flow_exe, "build", "index", "--workers", "2"]))
    if "flow-threads" in want:
        _flow_project(root / "flow-threads", images, weights)
        cmd = [flow_exe, "build", "index", "--scheduler", "threads", "--workers", "2"]
        tools.append(_Cmd("flow-threads", root / "flow-threads", cmd))
    if "flow-inproc" in want:
        _flow_project(root / "flow-inproc", images, weights)
        tools.append(_FlowInProc(root / "flow-inproc"))
    versions["flow"] = md.version("flow-cbir")
    if "redun" in want:
        exe = _exe("redun", args.redun)
        if exe is None:
            skipped["redun"] = "not installed (pip install redun)"
        else:
            folder = root / "redun"
            (folder / ".redun").mkdir(parents=True)
            (folder / ".redun" / "redun.ini").write_text(REDUN_INI)
            (folder / "workflow.py").write_text(REDUN_WORKFLOW.replace("@BENCH@", repr(str(BENCH))))
            cmd = [exe, "run", "workflow.py", "main", "--images", str(images)]
            tools.append(_Cmd("redun", folder, [*cmd, "--weights", str(weights)]))
            versions["redun"] = md.version("redun")
    if "snakemake" in want:
        exe = _exe("snakemake", args.snakemake)
        if exe is None:
            skipped["snakemake"] = "not installed (see the docstring)"
        else:
            folder = root / "snakemake"
            folder.mkdir()
            snakefile = SNAKEFILE.replace("@BENCH@", repr(str(BENCH)))
            snakefile = snakefile.replace("@IMAGES@", repr(str(images)))
            (folder / "Snakefile").write_text(snakefile.replace("@WEIGHTS@", repr(str(weights))))
            cmd = [exe, "--cores", str(WORKERS)]
            if args.snakemake_mode == "threads":
                cmd.append("--force-use-threads")
            tools.append(_Cmd("snakemake", folder, cmd))
            versions["snakemake"] = _version(exe)
    return tools, {"versions": versions, "skipped": skipped}


# --------------------------------------------------------------------------
# checks after the runs


def _check(tools: list, n: int) -> dict:
    """Every tool's index holds all n images; redun's and Snakemake's agree."""
    counts = {}
    for t in tools:
        if t.name.startswith("flow"):
            from app.workspace import Workspace

            counts[t.name] = Workspace.open(t.folder).retriever("cnn").count
        else:
            from annoy import AnnoyIndex

            ix = AnnoyIndex(32, "angular")
            ix.load(str(t.folder / "index.ann"))
            counts[t.name] = ix.get_n_items()
            ix.unload()
    bad = {k: v for k, v in counts.items() if v != n}
    if bad:
        raise RuntimeError(f"indices don't hold all {n} images: {bad}")
    names = {t.name: t for t in tools}
    same = None
    if "redun" in names and "snakemake" in names:
        a = (names["redun"].folder / "index.ann").read_bytes()
        b = (names["snakemake"].folder / "index.ann").read_bytes()
        same = a == b
        if not same:
            raise RuntimeError("redun's and Snakemake's index files differ")
    return {"counts": counts, "peer_indices_identical": same}


def _index_seconds(images: Path, weights: Path) -> float:
    """One full index build over all images' vectors, in-process (for scale)."""
    pngs = sorted(images.glob("*.png"))
    vecs = [item_vector(str(p), str(weights)) for p in pngs]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        save_index([p.name for p in pngs], vecs, str(Path(tmp) / "index.ann"))
        return time.perf_counter() - t0


# --------------------------------------------------------------------------
# the benchmark


def _flow_version() -> dict:
    """The flow commit measured, and whether its code differs from it."""

    def git(*a: str) -> str:
        cmd = ["git", "-C", str(BENCH.parent), *a]
        return subprocess.run(cmd, capture_output=True, text=True).stdout.strip()

    dirty = git("status", "--porcelain", "--", "flow", "nodes", "store", "cli")
    return {"commit": git("rev-parse", "--short", "HEAD"), "code_dirty": bool(dirty)}


def _rotated(tools: list, r: int) -> list:
    k = r % len(tools)
    return tools[k:] + tools[:k]


def run(root: Path, items: int, runs: int, args) -> dict:
    images, weights = root / "images", root / "cnn.onnx"
    flow_at = _flow_version()
    _images(images, 0, items)
    _onnx(weights)
    tools, info = _tools(root, images, weights, args)
    if not tools:
        raise SystemExit("no tool to run")
    res: dict = {t.name: {"noop_s": [], "incremental_s": []} for t in tools}
    add = max(1, items // 100)
    load = [os.getloadavg()]
    try:
        time.sleep(2.1)
        for t in tools:
            res[t.name]["full_s"] = t.run()
            print(f"  full  {t.name:13s} {res[t.name]['full_s']:8.2f} s", flush=True)
        time.sleep(2.1)
        for r in range(runs):
            for t in _rotated(tools, r):
                res[t.name]["noop_s"].append(t.run())
                print(f"  no-op {t.name:13s} {res[t.name]['noop_s'][-1]:8.3f} s", flush=True)
        n = items
        for r in range(runs):
            _images(images, n, add)
            n += add
            time.sleep(2.1)
            for t in _rotated(tools, r):
                res[t.name]["incremental_s"].append(t.run())
                print(
                    f"  +{add:<4d} {t.name:13s} {res[t.name]['incremental_s'][-1]:8.3f} s",
                    flush=True,
                )
        load.append(os.getloadavg())
        checks = _check(tools, n)
    finally:
        for t in tools:
            t.close()
    for v in res.values():
        v["noop_median_s"] = statistics.median(v["noop_s"])
        v["incremental_median_s"] = statistics.median(v["incremental_s"])
    base = res.get("flow") or res.get(tools[0].name)
    for v in res.values():
        v["noop_ratio"] = v["noop_median_s"] / base["noop_median_s"]
        v["incremental_ratio"] = v["incremental_median_s"] / base["incremental_median_s"]
    return {
        "items": items,
        "added_per_run": add,
        "runs": runs,
        "final_items": n,
        "workers": WORKERS,
        "snakemake_mode": args.snakemake_mode,
        "cpus": os.cpu_count(),
        "loadavg_before_after": load,
        "index_s": _index_seconds(images, weights),
        "tools": res,
        "flow_at_start_end": [flow_at, _flow_version()],
        **info,
        **checks,
    }


def _table(out: dict) -> str:
    base = "flow" if "flow" in out["tools"] else next(iter(out["tools"]))
    lines = [
        f"{out['items']} items, +{out['added_per_run']} new per incremental run, "
        f"median of {out['runs']} run(s); ratios = tool / {base}",
        f"{'tool':13s} {'full s':>8s} {'no-op s':>8s} {'incr s':>8s} "
        f"{'no-op x':>8s} {'incr x':>8s}",
    ]
    for name, v in out["tools"].items():
        lines.append(
            f"{name:13s} {v['full_s']:8.2f} {v['noop_median_s']:8.3f} "
            f"{v['incremental_median_s']:8.3f} {v['noop_ratio']:8.2f} {v['incremental_ratio']:8.2f}"
        )
    lines.append(f"one full index build over {out['final_items']} vectors: {out['index_s']:.3f} s")
    load = out["loadavg_before_after"]
    lines.append(f"versions: {out['versions']}; load average before/after: {load}")
    lines.append(f"flow code at start, end: {out['flow_at_start_end']}")
    for k, why in out["skipped"].items():
        lines.append(f"skipped {k}: {why}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=2000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="200 items, 1 run")
    ap.add_argument("--json", help="write the numbers to this file")
    ap.add_argument(
        "--tools",
        default="flow,flow-threads,flow-inproc,redun,snakemake",
        help="comma-separated subset of flow,flow-threads,flow-inproc,redun,snakemake",
    )
    ap.add_argument("--flow", help="flow executable")
    ap.add_argument("--redun", help="redun executable")
    ap.add_argument("--snakemake", help="snakemake executable")
    ap.add_argument(
        "--snakemake-mode",
        choices=["threads", "processes"],
        default="threads",
        help="run: jobs in Snakemake's thread pool (--force-use-threads, default) or "
        "one subprocess per job (Snakemake's own default)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args()
    items, runs = (200, 1) if args.quick else (args.items, args.runs)
    root = Path(tempfile.mkdtemp(prefix="flow-peers-"))
    try:
        out = run(root, items, runs, args)
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    print(_table(out))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    sys.stdout.flush()
    os._exit(0)  # don't wait on the local cluster's atexit teardown


if __name__ == "__main__":
    main()
