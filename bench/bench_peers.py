"""flow against peers (redun, Snakemake): no-op and 1%-incremental rebuilds.

Run::

    python bench/bench_peers.py [--items 2000] [--runs 3] [--json FILE]
    python bench/bench_peers.py --quick          # 200 items, 1 run

Peers are optional benchmark dependencies, not project dependencies.  They
live in their own venv (``pip install snakemake`` would downgrade ``packaging``
and upgrade ``docutils`` in flow's python), made by the script itself::

    python bench/bench_peers.py --setup-peers    # /tmp/peers-venv: snakemake, redun

which is::

    python -m venv --system-site-packages /tmp/peers-venv   # *this* python
    /tmp/peers-venv/bin/pip install 'snakemake>=9,<10' redun

The venv must be made from the interpreter that runs flow (``sys.executable``,
not whatever ``python3`` is first on ``PATH``): its ``--system-site-packages``
are then flow's, so the peers' jobs import the pipeline's nodes (numpy,
onnxruntime, Pillow, annoy) from there.  Before timing anything, each peer's
own interpreter (read from its executable's ``#!`` line) is asked to import
the nodes (:func:`preflight`); a peer that can't is skipped with the reason
and the command that fixes it.  The peers' jobs put this checkout first on
``sys.path``, so they run the same node code as the ``flow`` row.

``--snakemake`` / ``--redun`` give the executables' paths (default:
``/tmp/peers-venv/bin/NAME`` if present, else the one beside this python, else
``PATH``); a peer that is not installed is skipped.  flow runs as
``python -c "from cli.main import main; main()"`` with ``PYTHONPATH`` set to
this checkout (as ``bench_cli.py`` runs it), so the checkout measured is the
one the script is in; ``--flow EXE`` runs an installed ``flow`` instead.

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

* ``flow``: ``flow build index --workers 2`` (default scheduler: 2 workers;
  a no-op starts none, a small build runs in threads, a big one on a local
  Dask cluster started on first use); the ratios are against this row;
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
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
if str(REPO) not in sys.path:
    sys.path.insert(1, str(REPO))
PEERS_VENV = Path("/tmp/peers-venv")
PEERS = ("snakemake>=9,<10", "redun")

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


def preflight() -> None:
    """Import what the peers' jobs run (in the peer's own interpreter)."""
    import annoy  # noqa: F401
    import onnxruntime  # noqa: F401
    import PIL  # noqa: F401

    import nodes.decode
    import nodes.embed
    import nodes.index
    import nodes.normalize  # noqa: F401


# --------------------------------------------------------------------------
# the tools


REDUN_WORKFLOW = '''"""redun: a task per image, then an index task over all vectors."""
import os
import sys

sys.path[:0] = [@BENCH@, @REPO@]

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

sys.path[:0] = [@BENCH@, @REPO@]
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

    def __init__(self, name: str, folder: Path, cmd: list[str], env: dict | None = None):
        self.name, self.folder, self.cmd, self.env = name, folder, cmd, env
        self.log = folder / "bench.log"

    def run(self) -> float:
        with open(self.log, "ab") as log:
            log.write(f"\n$ {' '.join(self.cmd)}\n".encode())
            log.flush()
            t0 = time.perf_counter()
            rc = subprocess.run(
                self.cmd, cwd=self.folder, stdout=log, stderr=log, env=self.env
            ).returncode
            dt = time.perf_counter() - t0
        if rc:
            tail = self.log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{self.name}: {' '.join(self.cmd)} exited {rc}:\n{tail}")
        return dt

    def close(self) -> None:
        pass


class _FlowWatched(_Cmd):
    """``flow build`` with a ``flow watch`` of the project running (after the full
    build): the command hands over to it (app.handoff), as on a project kept fresh
    by a watcher.  The watcher never builds by itself (settle: an hour)."""

    def __init__(self, name: str, folder: Path, cmd: list[str], env: dict | None, watch: list):
        super().__init__(name, folder, cmd, env)
        self.watch_cmd, self.proc = watch, None

    def run(self) -> float:
        dt = super().run()
        if self.proc is None:  # the full build ran cold; from now on, a watcher
            self._start()
        return dt

    def _start(self) -> None:
        from app.handoff import socket_path

        log = open(self.folder / "watch.log", "wb")  # noqa: SIM115 - the watcher's
        self.proc = subprocess.Popen(
            [*self.watch_cmd, "-v", "watch", "--settle", "3600", "--interval", "0.5"],
            cwd=self.folder,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
        )
        sock = socket_path(str(self.folder / "flow.toml"))
        deadline = time.monotonic() + 300
        while not (sock.exists() and b" computed in " in (self.folder / "watch.log").read_bytes()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((self.folder / "watch.log").read_text(errors="replace")[-3000:])
            time.sleep(0.2)

    def close(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=60)
            handed = (self.folder / "watch.log").read_text(errors="replace").count("handed over")
            print(f"  {self.name}: {handed} builds handed over to flow watch", flush=True)


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
    folders = [PEERS_VENV / "bin", Path(sys.executable).parent]
    found = [f / name for f in folders if (f / name).exists()]
    return str(found[0]) if found else shutil.which(name)


def _python_of(exe: str) -> str:
    """The interpreter a console script runs under (its ``#!`` line)."""
    with open(exe, "rb") as fh:
        first = fh.readline().decode(errors="replace").strip()
    if first.startswith("#!"):
        words = first[2:].split()
        if words and Path(words[0]).name == "env" and len(words) > 1:
            return shutil.which(words[1]) or words[1]
        if words:
            return words[0]
    return sys.executable


def _peer_python(exe: str, code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in the peer's interpreter, with the peers' ``sys.path``."""
    head = f"import sys; sys.path[:0] = [{str(BENCH)!r}, {str(REPO)!r}]\n"
    return subprocess.run(
        [_python_of(exe), "-c", head + code], capture_output=True, text=True, timeout=300
    )


def _version(exe: str, dist: str) -> str:
    """The peer's version as its own interpreter sees it (not this one's)."""
    out = _peer_python(exe, f"import importlib.metadata as m; print(m.version({dist!r}))")
    return out.stdout.strip() if out.returncode == 0 else "?"


def _check_peer(exe: str) -> str | None:
    """None if the peer's interpreter imports the pipeline's nodes, else why not."""
    out = _peer_python(exe, "import bench_peers; bench_peers.preflight()")
    if out.returncode == 0:
        return None
    py = _python_of(exe)
    err = (out.stderr.strip().splitlines() or ["?"])[-1]
    return (
        f"{py} cannot import the pipeline's nodes ({err}); make the venv from the python "
        f"that runs flow: python bench/bench_peers.py --setup-peers (or "
        f"{py} -m pip install numpy onnxruntime Pillow annoy blake3)"
    )


def setup_peers(venv: Path = PEERS_VENV) -> None:
    """Make the peers' venv from this interpreter and install Snakemake and redun."""
    if not (venv / "bin" / "python").exists():
        subprocess.run(
            [sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True
        )
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", *PEERS], check=True)
    for name in ("snakemake", "redun"):
        exe = venv / "bin" / name
        why = _check_peer(str(exe)) if exe.exists() else "not installed"
        print(f"{name}: {_version(str(exe), name) if exe.exists() else '-'} {why or 'ok'}")


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

    for pkg in ("flow", "store", "engine", "nodes", "app", "cli"):
        compileall.compile_dir(str(REPO / pkg), quiet=1)


def _flow_cmd(given: str | None) -> tuple[list[str], dict | None]:
    """How flow runs: this checkout (``PYTHONPATH``), or an installed ``--flow``."""
    if given:
        return [given], None
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(
            os.pathsep
        ),
    }
    return [sys.executable, "-c", "from cli.main import main; main()"], env


def _tools(root: Path, images: Path, weights: Path, args) -> tuple[list, dict]:
    tools, versions, skipped = [], {}, {}
    _bytecode()
    flow_cmd, flow_env = _flow_cmd(args.flow)
    want = set(args.tools.split(","))
    if "flow" in want:
        _flow_project(root / "flow", images, weights)
        cmd = [*flow_cmd, "build", "index", "--workers", "2"]
        tools.append(_Cmd("flow", root / "flow", cmd, flow_env))
    if "flow-threads" in want:
        _flow_project(root / "flow-threads", images, weights)
        cmd = [*flow_cmd, "build", "index", "--scheduler", "threads", "--workers", "2"]
        tools.append(_Cmd("flow-threads", root / "flow-threads", cmd, flow_env))
    if "flow-watch" in want:
        _flow_project(root / "flow-watch", images, weights)
        cmd = [*flow_cmd, "build", "index", "--workers", "2"]
        tools.append(_FlowWatched("flow-watch", root / "flow-watch", cmd, flow_env, flow_cmd))
    if "flow-inproc" in want:
        _flow_project(root / "flow-inproc", images, weights)
        tools.append(_FlowInProc(root / "flow-inproc"))
    versions["flow"] = md.version("flow-cbir")
    peers = {"redun": args.redun, "snakemake": args.snakemake}
    exes = {}
    for name in ("redun", "snakemake"):
        if name not in want:
            continue
        exe = _exe(name, peers[name])
        why = (
            "not installed (python bench/bench_peers.py --setup-peers)"
            if exe is None
            else _check_peer(exe)
        )
        if why:
            skipped[name] = why
            print(f"  skipping {name}: {why}", flush=True)
        else:
            exes[name] = exe
            versions[name] = _version(exe, name)
    if "redun" in exes:
        folder = root / "redun"
        (folder / ".redun").mkdir(parents=True)
        (folder / ".redun" / "redun.ini").write_text(REDUN_INI)
        workflow = REDUN_WORKFLOW.replace("@BENCH@", repr(str(BENCH)))
        (folder / "workflow.py").write_text(workflow.replace("@REPO@", repr(str(REPO))))
        cmd = [exes["redun"], "run", "workflow.py", "main", "--images", str(images)]
        tools.append(_Cmd("redun", folder, [*cmd, "--weights", str(weights)]))
    if "snakemake" in exes:
        folder = root / "snakemake"
        folder.mkdir()
        snakefile = SNAKEFILE.replace("@BENCH@", repr(str(BENCH)))
        snakefile = snakefile.replace("@REPO@", repr(str(REPO)))
        snakefile = snakefile.replace("@IMAGES@", repr(str(images)))
        (folder / "Snakefile").write_text(snakefile.replace("@WEIGHTS@", repr(str(weights))))
        cmd = [exes["snakemake"], "--cores", str(WORKERS)]
        if args.snakemake_mode == "threads":
            cmd.append("--force-use-threads")
        tools.append(_Cmd("snakemake", folder, cmd))
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
        help="comma-separated subset of flow,flow-threads,flow-inproc,flow-watch,redun,snakemake "
        "(flow-watch: flow build handed over to a running flow watch)",
    )
    ap.add_argument(
        "--setup-peers",
        action="store_true",
        help=f"make {PEERS_VENV} from this python with Snakemake and redun, then exit",
    )
    ap.add_argument("--flow", help="an installed flow executable (default: this checkout)")
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
    if args.setup_peers:
        setup_peers()
        return
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
