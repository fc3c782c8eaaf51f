"""``flow serve`` benchmark: latency under concurrent load, hot swap, memory, region quality.

Setup: a phantom project (``flow demo``'s generator, 128 px DICOM) with a ``cnn``
target (its real, trained network) and a ``regions`` target, built once under
``--work``.  Beside the project's own refs, two synthetic refs are written into its
store with the same query chains: ``bench-cnn`` (``--items`` vectors drawn around
the real database's findings vectors) and ``bench-regions`` (``--items`` images x
9 regions drawn around real region vectors).  A ``flow serve`` process serves them.

Measured, in one run:

* **baseline**: ``flow query`` of the 64x64 PNG against ``bench-cnn`` as a fresh
  process (wall time, median of ``--baseline-runs``);
* **cnn load**: ``--clients`` concurrent clients (asyncio + httpx in a separate
  process) POST the 64x64 PNG to ``/api/query`` for ``--duration`` s: p50, p99,
  queries/s, failures;
* **region load**: the same with ``target=bench-regions`` and a box;
* **hot swap**: a ``--swap-duration`` s cnn load while the ref moves ``--swaps``
  times (alternating between two 100k indices): failures, and how long the server
  took to serve each move;
* **memory**: the server's RSS with both 100k indices loaded;
* ``--quality``: region retrieval hit rate on the phantoms (a hit: a returned
  region overlapping a lesion of the query box's finding), beside random regions
  and whole-image retrieval (cnn, bovw-free) -- see :func:`quality`.

    python bench/bench_serve.py --json serve.json            # everything
    python bench/bench_serve.py --items 20000 --duration 5 --swap-duration 15   # quick
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.phantoms import phantom_lesions, write_phantom_study  # noqa: E402
from app.project import write_project  # noqa: E402

N_PHANTOMS = 240
SIZE = 128
TARGETS = {
    "cnn": {"kind": "cnn", "normalize": {"size": 64}, "embedder": {"epochs": 20, "batch_size": 16}},
    "regions": {"kind": "regions"},
}


def project(work: Path) -> Path:
    folder = work / "project"
    if not (folder / "labels.csv").exists():
        write_phantom_study(folder, n=N_PHANTOMS, size=SIZE, seed=0)
    config = {
        "store": {"url": "store"},
        "build": {"scheduler": "threads"},
        "sources": [{"path": "images", "labels": "labels.csv"}],
        "targets": TARGETS,
    }
    write_project(folder, config)
    from app.workspace import Workspace

    built = Workspace.open(folder).build("all", progress=False)
    assert not built.incomplete, built.incomplete
    return folder


# --------------------------------------------------------------------------
# synthetic 100k refs with the real query chains


def _put(store, node_fn, value: dict, tag: str) -> str:
    from flow.keys import key
    from store.packs import ItemResult, Recipe, canonical_output, output_key, write_object

    value = canonical_output(value, node=node_fn.name)
    rkey = bytes(key(("bench_serve", tag)))
    recipe = Recipe(
        node=node_fn.name,
        step=node_fn.name,
        version=node_fn.version,
        fingerprint=node_fn.fingerprint,
        params={},
        prefix=bytes(key(("bench_serve", node_fn.name))).hex(),
    )
    result = ItemResult(id="", rkey=rkey, inputs=(), value=value, ckey=bytes(output_key(value)))
    write_object(store, recipe, rkey, [], result)
    return rkey.hex()


def synthetic_refs(folder: Path, n: int, seed: int = 0) -> dict:
    """Write ``bench-cnn`` (two versions) and ``bench-regions``; their ref values."""
    from app.project import load_project
    from app.retrieval import Retriever
    from flow import Items
    from flow.keys import key
    from nodes.index import vector_index
    from nodes.regions import region_index
    from nodes.table import item_table
    from store.refs import move_ref

    store = load_project(folder).open_store()
    rng = np.random.default_rng(seed)
    out = {}
    ids = [f"synthetic/{i:06d}.dcm" for i in range(n)]
    keys = [key(i) for i in ids]
    # cnn: vectors around the real database vectors, labels from the real label sets
    cnn = Retriever.open(store, "cnn")
    seg = cnn.segments[0]
    real = np.stack([seg.searcher._annoy.index.get_item_vector(i) for i in range(seg.count)])
    pick = rng.integers(len(real), size=n)
    labels = [cnn.labels[i] for i in pick.tolist()]
    table = item_table.fn(Items(ids, keys, labels))
    tb_rk = _put(store, item_table, table, f"table-{n}")
    values = []
    for version in (0, 1):
        vecs = real[pick] + rng.normal(0, 0.03, (n, real.shape[1]))
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        t = time.perf_counter()
        ix = vector_index.fn(Items(ids, keys, list(vecs.astype(np.float32))), seed=version)
        print(f"  bench-cnn index {version}: {n} items in {time.perf_counter() - t:.1f} s")
        ix_rk = _put(store, vector_index, ix, f"cnn-{n}-{version}")
        value = dict(cnn.ref["value"])
        value["segments"] = [
            {"index": ["vector_index", ix_rk], "table": ["item_table", tb_rk], "count": n}
        ]
        values.append(value)
    out["bench-cnn"] = values
    objects = lambda v: [tuple(v["segments"][0]["index"]), tuple(v["segments"][0]["table"])]  # noqa: E731
    move_ref(store, "bench-cnn", values[0], objects=objects(values[0]), message="bench")
    # regions: 9 regions per image around real region vectors
    reg = Retriever.open(store, "regions")
    rs = reg.segments[0].searcher
    rv = np.stack([rs.vectors._annoy.index.get_item_vector(i) for i in range(rs.count)])
    per = 9
    src = rng.integers(len(rv), size=(n, per))
    items = []
    boxes = rs.boxes[:per]
    for i in range(n):
        v = rv[src[i]] + rng.normal(0, 0.02, (per, rv.shape[1]))
        v = np.clip(v, 0, None)
        v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
        items.append(
            {
                "boxes": boxes,
                "vectors": v.astype(np.float32),
                "shape": np.array([SIZE, SIZE], np.int32),
                "study": "",
            }
        )
    t = time.perf_counter()
    rix = region_index.fn(Items(ids, keys, items))
    print(f"  bench-regions index: {n * per} regions in {time.perf_counter() - t:.1f} s")
    rix_rk = _put(store, region_index, rix, f"regions-{n}")
    value = dict(reg.ref["value"])
    value["segments"] = [
        {"index": ["region_index", rix_rk], "table": ["item_table", tb_rk], "count": n}
    ]
    move_ref(store, "bench-regions", value, objects=objects(value), message="bench")
    out["bench-regions"] = value
    return out


# --------------------------------------------------------------------------
# load


def query_png() -> bytes:
    from PIL import Image

    from app.phantoms import phantom_image

    img = phantom_image(("Nodule",), size=64, rng=np.random.default_rng(12345))
    buf = io.BytesIO()
    Image.fromarray((img >> 4).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


async def _load(
    url: str, data: bytes, fields: dict, clients: int, duration: float, rate: float = 0.0
) -> dict:
    """``clients`` concurrent clients for ``duration`` s; each sends its next query as
    soon as the last one is answered, or (``rate`` > 0: total queries/s) on a fixed
    schedule, latency counted from the scheduled send time (no coordinated omission)."""
    import httpx

    lat: list[float] = []
    failures: list[str] = []
    seqs: set[int] = set()
    deadline = time.perf_counter() + duration
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:

        async def worker(n: int) -> None:
            period = clients / rate if rate > 0 else 0.0
            due = time.perf_counter() + n * period / clients
            while time.perf_counter() < deadline:
                if period:
                    await asyncio.sleep(max(0.0, due - time.perf_counter()))
                    t, due = due, due + period
                else:
                    t = time.perf_counter()
                try:
                    r = await client.post(
                        "/api/query", files={"file": ("q.png", data, "image/png")}, data=fields
                    )
                    ok = r.status_code == 200
                    if ok:
                        seqs.add(r.json()["seq"])
                    else:
                        failures.append(f"{r.status_code} {r.text[:200]}")
                except httpx.HTTPError as e:
                    failures.append(repr(e))
                    ok = False
                if ok:
                    lat.append(time.perf_counter() - t)

        started = time.perf_counter()
        await asyncio.gather(*(worker(n) for n in range(clients)))
        wall = time.perf_counter() - started
    lat.sort()
    pct = lambda p: 1000 * lat[min(len(lat) - 1, int(p * len(lat)))] if lat else float("nan")  # noqa: E731
    return {
        "requests": len(lat) + len(failures),
        "failed": len(failures),
        "failures": failures[:5],
        "p50_ms": round(pct(0.50), 2),
        "p90_ms": round(pct(0.90), 2),
        "p99_ms": round(pct(0.99), 2),
        "qps": round(len(lat) / wall, 1),
        "seqs": sorted(seqs),
    }


def load_main() -> None:
    """Run as ``bench_serve.py --load URL FIELDS CLIENTS DURATION RATE`` (its own process)."""
    url, fields = sys.argv[2], json.loads(sys.argv[3])
    clients, duration, rate = int(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6])
    res = asyncio.run(_load(url, query_png(), fields, clients, duration, rate))
    print(json.dumps(res))


def load(url: str, fields: dict, clients: int, duration: float, rate: float = 0.0) -> dict:
    return json.loads(load_start(url, fields, clients, duration, rate).communicate()[0])


def load_start(
    url: str, fields: dict, clients: int, duration: float, rate: float = 0.0
) -> subprocess.Popen:
    args = [url, json.dumps(fields), str(clients), str(duration), str(rate)]
    return subprocess.Popen(
        [sys.executable, __file__, "--load", *args], stdout=subprocess.PIPE, text=True
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def flow_cmd(folder: Path, *args: str) -> list[str]:
    return [sys.executable, "-c", "from cli.main import main; main()", "-p", str(folder), *args]


def baseline(folder: Path, png: Path, runs: int) -> dict:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run(
            flow_cmd(folder, "query", str(png), "-t", "bench-cnn", "-k", "10", "--json"),
            check=True,
            capture_output=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        times.append(time.perf_counter() - t)
    return {
        "runs_s": [round(x, 3) for x in times],
        "median_ms": round(1000 * statistics.median(times), 1),
    }


# --------------------------------------------------------------------------
# region retrieval quality on the phantoms


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)


def quality(folder: Path, k: int = 10, seed: int = 0) -> dict:
    """Queries: every val image's lesion (box = the lesion's bounding box, grown to at
    least 24 px), against the whole archive (its own image left out).  A returned
    region is a hit if its item has the query's finding and its box overlaps that
    lesion's mask.  Beside it: ``random`` regions of the index (same rule, mean over
    draws), whole-image retrieval by the cnn target (a hit: the item has the finding;
    its whole image overlaps the lesion), and the cnn target queried with the box's crop."""
    from app.project import load_project
    from app.retrieval import Retriever

    store = load_project(folder).open_store()
    reg = Retriever.open(store, "regions")
    cnn = Retriever.open(store, "cnn")
    lesions = {
        f.removeprefix("images/"): m for f, m in phantom_lesions(n=N_PHANTOMS, size=SIZE).items()
    }
    import csv

    with open(folder / "labels.csv") as f:
        split = {r["file"].removeprefix("images/"): r["split"] for r in csv.DictReader(f)}
    rng = np.random.default_rng(seed)
    rs = reg.segments[0].searcher
    rows = {name: [] for name in ("regions", "random", "cnn_whole", "cnn_crop")}
    per_finding: dict[str, dict[str, list[float]]] = {}

    def region_hit(item_id: str, box: tuple, finding: str) -> bool:
        mask = lesions.get(item_id, {}).get(finding)
        if mask is None:
            return False
        x, y, w, h = box
        return bool(mask[y : y + h, x : x + w].any())

    for item_id, masks in sorted(lesions.items()):
        if split.get(item_id) != "val":
            continue
        path = folder / "images" / item_id
        for finding, mask in masks.items():
            if not mask.any():
                continue
            x, y, w, h = _bbox(mask)
            grow_w, grow_h = max(0, 24 - w), max(0, 24 - h)
            x, y = max(0, x - grow_w // 2), max(0, y - grow_h // 2)
            w, h = min(SIZE - x, w + grow_w), min(SIZE - y, h + grow_h)
            roi = (x, y, w, h)
            hits = reg.search(path.read_bytes(), k, roi=roi, exclude_ids=(item_id,)).hits
            score = {"regions": np.mean([region_hit(h.id, h.box, finding) for h in hits])}
            own = reg.position(item_id)
            cand = np.flatnonzero(rs.owner != own)
            draws = []
            for _ in range(20):
                pick = rng.choice(cand, size=k, replace=False)
                draws.append(
                    np.mean(
                        [
                            region_hit(
                                reg.ids[int(rs.owner[r])],
                                _pixels(rs.boxes[r]),
                                finding,
                            )
                            for r in pick
                        ]
                    )
                )
            score["random"] = float(np.mean(draws))
            whole = cnn.search(path.read_bytes(), k, exclude_ids=(item_id,)).hits
            score["cnn_whole"] = np.mean([finding in h.labels for h in whole])
            crop = cnn.search(path.read_bytes(), k, roi=roi, exclude_ids=(item_id,)).hits
            score["cnn_crop"] = np.mean([finding in h.labels for h in crop])
            for name, v in score.items():
                rows[name].append(float(v))
                per_finding.setdefault(finding, {}).setdefault(name, []).append(float(v))
    return {
        "queries": len(rows["regions"]),
        "k": k,
        "overall": {n: round(float(np.mean(v)), 3) for n, v in rows.items()},
        "by_finding": {
            f: {
                "queries": len(d["regions"]),
                **{n: round(float(np.mean(v)), 3) for n, v in d.items()},
            }
            for f, d in sorted(per_finding.items())
        },
    }


def _pixels(box_norm) -> tuple[int, int, int, int]:
    from nodes.regions import from_normalized

    return from_normalized(box_norm, (SIZE, SIZE), SIZE, "pad")


# --------------------------------------------------------------------------


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--load":
        return load_main()
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/flow-bench-serve")
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--swap-duration", type=float, default=60.0)
    ap.add_argument("--swaps", type=int, default=10)
    ap.add_argument("--rate", type=float, default=120.0, help="paced cnn runs: queries/s")
    ap.add_argument("--region-rate", type=float, default=40.0, help="paced region runs")
    ap.add_argument("--baseline-runs", type=int, default=5)
    ap.add_argument("--quality", action="store_true", help="only the region quality")
    ap.add_argument("--json")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    report: dict = {
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
    }
    t = time.perf_counter()
    folder = project(work)
    print(f"project built in {time.perf_counter() - t:.0f} s: {folder}")
    if args.quality:
        report["quality"] = quality(folder)
        print(json.dumps(report["quality"], indent=2))
        _save(args, report)
        return
    cached = work / f"refs-{args.items}.json"
    if cached.exists():  # the synthetic indices of an earlier run (same store)
        values = json.loads(cached.read_text())
    else:
        values = synthetic_refs(folder, args.items)
        cached.write_text(json.dumps(values))
    png = work / "query64.png"
    png.write_bytes(query_png())
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        flow_cmd(
            folder,
            "serve",
            "--port",
            str(port),
            "--poll",
            "1",
            "-t",
            "bench-cnn",
            "-t",
            "bench-regions",
        ),
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        start_new_session=True,
    )
    try:
        import httpx

        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and server.poll() is None, "server did not start"
            time.sleep(0.5)
        report["server_rss_mib"] = round(rss_mib(server.pid), 1)
        print(f"server up; RSS {report['server_rss_mib']} MiB")
        report["baseline_flow_query"] = baseline(folder, png, args.baseline_runs)
        print("baseline", report["baseline_flow_query"])
        fields = {"target": "bench-cnn", "k": "10"}
        rfields = {"target": "bench-regions", "k": "10", "roi": "16,16,24,24"}
        runs = {
            "cnn_one_client": (fields, 1, 0.0),
            "cnn_load": (fields, args.clients, 0.0),
            "cnn_paced": (fields, args.clients, args.rate),
            "regions_one_client": (rfields, 1, 0.0),
            "regions_load": (rfields, args.clients, 0.0),
            "regions_paced": (rfields, args.clients, args.region_rate),
        }
        for name, (f, clients, rate) in runs.items():
            report[name] = load(url, f, clients, args.duration, rate)
            print(name, report[name])
        report["server_rss_mib_after"] = round(rss_mib(server.pid), 1)
        # hot swap: the ref moves --swaps times during one load run
        from app.project import load_project
        from store.refs import move_ref

        store = load_project(folder).open_store()
        proc = load_start(url, fields, args.clients, args.swap_duration, args.rate)
        gap = args.swap_duration / (args.swaps + 1)
        picked = []
        for i in range(args.swaps):
            time.sleep(gap)
            v = values["bench-cnn"][(i + 1) % 2]
            seg = v["segments"][0]
            entry = move_ref(
                store,
                "bench-cnn",
                v,
                objects=[tuple(seg["index"]), tuple(seg["table"])],
                message=f"swap {i}",
            )
            t0 = time.perf_counter()
            while (
                httpx.get(url + "/health", timeout=5).json()["targets"]["bench-cnn"] != entry["seq"]
            ):
                time.sleep(0.05)
            picked.append(round(time.perf_counter() - t0, 2))
        res = json.loads(proc.communicate()[0])
        res["swaps"] = args.swaps
        res["seconds_to_serve_each_move"] = picked
        report["hot_swap"] = res
        print("hot swap", res)
        report["server_rss_mib_end"] = round(rss_mib(server.pid), 1)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)
    report["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    _save(args, report)
    print(json.dumps(report, indent=2))


def served(url: str) -> dict:
    import httpx

    return httpx.get(url + "/health", timeout=5).json()["targets"]


def _save(args, report) -> None:
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
