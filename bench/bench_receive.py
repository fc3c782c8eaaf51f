"""Studies arriving over DICOM and DICOMweb (issue 13).  Three benchmarks:

``python bench/bench_receive.py searchable [--items 10000] [--studies 120]``
    A project indexing ``--items`` synthetic 64x64 images (bench_incremental's
    catalog and fixed CNN) is built; then ``flow receive`` runs as a subprocess
    (the real command, settle 2 s) and dcmtk's ``storescu`` sends one 20-instance
    study per second (one association each) for ``--studies`` seconds.  For each
    study: the time from its last instance acknowledged (storescu returned) to a
    query with one of its images returning that image's item -- the bench polls
    the target's ref every 0.2 s and queries once the study's ids are in it (the
    query's own time counted).  p50 and p95 over the studies; the receiver's own
    log of first-instance-to-searchable is summarized beside it.

``python bench/bench_receive.py throughput [--runs 5]``
    The DICOM corpus of ``../shared/data/dicom`` and pydicom's test files
    (pydicom-data) sent with storescu -- to ``flow receive --no-build`` and, in the
    same run, alternating, to dcmtk's own ``storescp`` (``+xa -dhl``, writing every
    instance to a folder, no fsync) and to a bare pynetdicom SCP whose handler
    stores nothing (pynetdicom's own ceiling); a fresh folder per run.  Instances
    per second acknowledged; median of ``--runs``.

``python bench/bench_receive.py sandbox [--items 10000] [--runs 3]``
    Full builds of bench_incremental's catalog with the per-item limits on (decode
    in a child process per worker) and off, alternating: what containment costs.

``python bench/bench_receive.py dicomweb [--instances 1000]``
    Orthanc (with its DICOMweb plugin, on loopback) holds ``--instances``
    synthetic instances (20 per study); a project with it as a DICOMweb source is
    built, then built again: the no-op's QIDO-RS and WADO-RS requests and
    instances fetched, and its time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CLI = [sys.executable, "-c", "from cli.main import main; main()"]
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture
EXPLICIT_LE = "1.2.840.10008.1.2.1"
STORESCP = ["+xa", "-dhl"]  # every transfer syntax; no reverse DNS of the peer
# (bench ... --bit-preserving adds +B)


def _load() -> str:
    return f"{os.getloadavg()[0]:.2f}"


def write_studies(folder: Path, n_studies: int, per_study: int = 20, seed: int = 0) -> list[Path]:
    """``n_studies`` folders of ``per_study`` synthetic 64x64 DICOM images."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import generate_uid

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:64, :64]
    out = []
    for s in range(n_studies):
        study, series = generate_uid(), generate_uid()
        d = folder / f"study{s:04d}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_study):
            img = 800 + 300 * np.sin(xx / (3 + rng.random() * 9)) + rng.normal(0, 60, (64, 64))
            cy, cx = rng.integers(8, 56, 2)
            img[(yy - cy) ** 2 + (xx - cx) ** 2 < int(rng.integers(9, 80))] += 900
            ds = Dataset()
            ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE, generate_uid()
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
            ds.PatientName, ds.PatientID, ds.Modality = f"BENCH^{s}", f"P{s:05d}", "OT"
            ds.InstanceNumber = i + 1
            ds.Rows = ds.Columns = 64
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
            ds.PixelData = np.clip(img, 0, 4095).astype(np.uint16).tobytes()
            ds.file_meta = FileMetaDataset()
            ds.file_meta.MediaStorageSOPClassUID = CT_IMAGE
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.file_meta.TransferSyntaxUID = EXPLICIT_LE
            p = d / f"im{i:02d}.dcm"
            pydicom.dcmwrite(p, ds, enforce_file_format=True)
            out.append(p)
    return out


# --------------------------------------------------------------------------
# time to searchable


def _receive(root: Path, log: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [*CLI, "-p", str(root), "receive", *extra],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO,
        )  # fmt: skip
    deadline = time.monotonic() + 120
    while "receiving as" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(log.read_text())
        time.sleep(0.1)
    return proc


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()


def searchable(items: int, n_studies: int, settle: float) -> dict:
    from bench.bench_incremental import _flow_net, _images
    from tests.dicomnet import corpus, free_port, send

    tmp = Path(tempfile.mkdtemp(prefix="flow-tts-"))
    try:
        root = tmp / "project"
        _images(root / "images", 0, items)
        _flow_net(root / "cnn.pt")
        port = free_port()
        from app.project import write_project

        write_project(root, {
            "store": {"url": "store"},
            "build": {"workers": 2},
            "sources": [{"path": "images"}],
            "receive": {"folder": "incoming", "port": port, "settle": settle},
            "targets": {"cnn": {"kind": "cnn", "weights": "cnn.pt", "normalize": {"size": 64},
                                "embedder": {"dim": 32, "size": 64}}},
        })  # fmt: skip
        t0 = time.perf_counter()
        res = subprocess.run([*CLI, "-p", str(root), "-q", "build", "--json"], cwd=REPO,
                             capture_output=True, text=True, env={**os.environ,
                             "PYTHONPATH": str(REPO)})  # fmt: skip
        full = time.perf_counter() - t0
        doc = json.loads(res.stdout[res.stdout.index("{") :])
        assert doc["refs"]["cnn"][0]["count"] == items, res.stderr[-2000:]
        files = write_studies(tmp / "studies", n_studies)
        studies = [corpus(tmp / "studies" / f"study{s:04d}") for s in range(n_studies)]
        log = tmp / "receive.log"
        proc = _receive(root, log)
        acked: dict[int, float] = {}
        searchable_at: dict[int, float] = {}

        def sender() -> None:
            start = time.monotonic()
            threads = []
            for s, part in enumerate(studies):
                time.sleep(max(0.0, start + s - time.monotonic()))  # one study a second

                def one(s=s, part=part) -> None:
                    if proc.poll() is None:
                        send(part, port)
                        acked[s] = time.monotonic()

                t = threading.Thread(target=one)
                t.start()
                threads.append(t)
            for t in threads:
                t.join()

        snd = threading.Thread(target=sender)
        snd.start()
        try:
            _watch(root, studies, acked, searchable_at, snd, n_studies)
        finally:
            snd.join()
            _stop(proc)
            text = log.read_text()
            print(text[-3000:] if proc.returncode else "", flush=True)
        own = [float(m) for m in re.findall(r"searchable ([0-9.]+) s after the first", text)]
        own_last = [float(m) for m in re.findall(r"\(([0-9.]+) s after the last\)", text)]
        lat = sorted(searchable_at[s] - acked[s] for s in searchable_at)
        missing = n_studies - len(lat)
        builds = text.count(" computed in ")
        del files
        return {
            "items": items,
            "studies": n_studies,
            "full_build_s": round(full, 1),
            "p50_s": round(_pct(lat, 50), 2),
            "p95_s": round(_pct(lat, 95), 2),
            "max_s": round(lat[-1], 2) if lat else None,
            "never_searchable": missing,
            "receiver_first_to_searchable_p50_p95": [
                round(_pct(sorted(own), q), 2) for q in (50, 95)
            ],
            "receiver_last_to_searchable_p50_p95": [
                round(_pct(sorted(own_last), q), 2) for q in (50, 95)
            ],
            "builds": builds,
            "load": _load(),
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _watch(root, studies, acked, searchable_at, sender, n_studies) -> None:
    """Poll the cnn ref; once a study's ids are in it, query one of its images."""
    from app.ids import resolve_scheme
    from app.project import load_project
    from app.retrieval import Retriever
    from store.refs import read_ref

    project = load_project(root)
    store = project.open_store()
    scheme = resolve_scheme(project, store)
    ids = []
    for part in studies:
        import pydicom

        names = []
        for p, _, _ in part:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
            names.append(f"received/{ds.StudyInstanceUID}/{ds.SOPInstanceUID}.dcm")
        ids.append(scheme.ids(names))
    seq = None
    retr = None
    deadline = None
    while len(searchable_at) < n_studies:
        now = time.monotonic()
        if not sender.is_alive():
            deadline = deadline or now + 120
            if now > deadline:
                break
        ref = read_ref(store, "cnn")
        if ref is not None and ref["seq"] != seq:
            seq = ref["seq"]
            retr = Retriever(store, ref)
            have = set(retr.ids)
            for s, want in enumerate(ids):
                if s in searchable_at or s not in acked or not set(want) <= have:
                    continue
                probe = studies[s][0][0]
                hits = retr.query(str(probe), k=5)
                if want[0] in {h.id for h in hits}:
                    searchable_at[s] = time.monotonic()
        time.sleep(0.2)


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    return float(np.percentile(np.asarray(xs), q))


# --------------------------------------------------------------------------
# throughput


def throughput(runs: int) -> dict:
    from tests.conftest import SHARED
    from tests.dicomnet import acknowledged, corpus, dcmtk, free_port, pydicom_data_roots, send

    files = corpus(SHARED / "dicom") + corpus(*pydicom_data_roots())
    ours, theirs, ceiling = [], [], []
    tmp = Path(tempfile.mkdtemp(prefix="flow-rx-"))
    try:
        for r in range(runs):
            order = ("flow", "storescp", "null") if r % 2 == 0 else ("null", "storescp", "flow")
            for who in order:
                port = free_port()
                out = tmp / f"{who}{r}"
                out.mkdir()
                if who == "null":  # pynetdicom's own ceiling: a handler that stores nothing
                    proc = _null_scp(port)
                elif who == "flow":
                    from app.project import write_project

                    write_project(out, {"store": {"url": "store"},
                                        "receive": {"folder": "incoming", "port": port},
                                        "targets": {"cnn": {"kind": "cnn"}}})  # fmt: skip
                    proc = _receive(out, out / "log", "--no-build")
                else:
                    proc = subprocess.Popen(
                        [dcmtk("storescp"), *STORESCP, "-aet", "FLOW", "-od", str(out), str(port)],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    )  # fmt: skip
                    time.sleep(0.5)
                n = 0
                t0 = time.perf_counter()
                for lo in range(0, len(files), 60):
                    n += len(acknowledged(send(files[lo : lo + 60], port, check=False)))
                dt = time.perf_counter() - t0
                _stop(proc)
                {"flow": ours, "storescp": theirs, "null": ceiling}[who].append(n / dt)
                print(f"  run {r + 1} {who}: {n} instances in {dt:.2f} s = {n / dt:.1f}/s",
                      flush=True)  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    size = sum(p.stat().st_size for p, _, _ in files)
    return {
        "files": len(files),
        "mib": round(size / 2**20, 1),
        "flow_per_s": round(statistics.median(ours), 1),
        "storescp_per_s": round(statistics.median(theirs), 1),
        "ratio": round(statistics.median(ours) / statistics.median(theirs), 3),
        "pynetdicom_null_handler_per_s": round(statistics.median(ceiling), 1),
        "runs": runs,
        "storescp_options": " ".join(STORESCP),
        "load": _load(),
    }


def _null_scp(port: int) -> subprocess.Popen:
    """A pynetdicom Storage SCP configured as flow receive's, whose handler only
    answers success: what pynetdicom itself costs per instance."""
    code = f"""
import time
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
ae = AE(ae_title="FLOW")
for cx in AllStoragePresentationContexts:
    ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
ae.maximum_pdu_size = 0
ae.start_server(("127.0.0.1", {port}), block=False,
                evt_handlers=[(evt.EVT_C_STORE, lambda e: 0x0000)])
print("listening", flush=True)
while True:
    time.sleep(1)
"""
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and "listening" in proc.stdout.readline()
    return proc


# --------------------------------------------------------------------------
# dicomweb


def dicomweb(instances: int) -> dict:
    from app.dicomweb import sync
    from app.project import load_project, write_project
    from app.workspace import Workspace
    from tests.dicomnet import Orthanc

    tmp = Path(tempfile.mkdtemp(prefix="flow-web-"))
    try:
        files = write_studies(tmp / "studies", max(1, instances // 20))
        with Orthanc(tmp / "orthanc") as o:
            assert o.upload(files) == len(files)
            os.environ["FLOW_BENCH_PACS_PASSWORD"] = o.password
            root = tmp / "project"
            write_project(root, {
                "store": {"url": "store"},
                "build": {"scheduler": "threads"},
                "sources": [{"dicomweb": o.dicomweb, "username": o.user,
                             "password_env": "FLOW_BENCH_PACS_PASSWORD",
                             "default_split": "train"}],
                "targets": {"bovw": {"kind": "bovw", "normalize": {"size": 48},
                                     "descriptors": {"n_segments": 20, "patch": 12},
                                     "vocabulary": {"words": 8, "sample": 500}}},
            })  # fmt: skip
            project = load_project(root)
            t0 = time.perf_counter()
            first = sync(project.dicomweb[0])
            fetch_s = time.perf_counter() - t0
            ws = Workspace(load_project(root))
            built = ws.build("all", progress=False)
            assert built.moved, built.incomplete
            t0 = time.perf_counter()
            again = sync(project.dicomweb[0])
            sync_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            built = Workspace(load_project(root)).build("all", progress=False)
            noop_s = time.perf_counter() - t0
            computed = sum(r.computed for r in built.report.steps.values())
        return {
            "instances": len(first.names),
            "first_sync": {**first.requests, "fetched": first.fetched, "s": round(fetch_s, 2)},
            "noop_sync": {**again.requests, "fetched": again.fetched, "s": round(sync_s, 3)},
            "noop_build_s": round(noop_s, 3),
            "noop_computed": computed,
            "load": _load(),
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------
# the cost of containment


def sandbox_cost(items: int, runs: int) -> dict:
    """Full builds of ``items`` images with the per-item limits on (the default)
    and off (``item_timeout = 0``, ``item_memory = 0``), alternating, fresh stores."""
    from app.project import write_project
    from app.workspace import Workspace
    from bench.bench_incremental import _flow_net, _images

    tmp = Path(tempfile.mkdtemp(prefix="flow-box-"))
    times: dict[str, list[float]] = {"on": [], "off": []}
    try:
        _images(tmp / "images", 0, items)
        _flow_net(tmp / "cnn.pt")
        for r in range(runs):
            for mode in ("on", "off") if r % 2 == 0 else ("off", "on"):
                limits = {} if mode == "on" else {"item_timeout": 0, "item_memory": 0}
                shutil.rmtree(tmp / "store", ignore_errors=True)
                write_project(tmp, {
                    "store": {"url": "store"},
                    "build": {"workers": 2, **limits},
                    "sources": [{"path": "images"}],
                    "targets": {"cnn": {"kind": "cnn", "weights": "cnn.pt",
                                        "normalize": {"size": 64},
                                        "embedder": {"dim": 32, "size": 64}}},
                })  # fmt: skip
                t0 = time.perf_counter()
                built = Workspace.open(tmp).build("all", progress=False)
                times[mode].append(time.perf_counter() - t0)
                assert built.report.ok, built.incomplete
                print(f"  run {r + 1} limits {mode}: {times[mode][-1]:.2f} s", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    on, off = statistics.median(times["on"]), statistics.median(times["off"])
    return {
        "items": items,
        "limits_on_s": round(on, 2),
        "limits_off_s": round(off, 2),
        "overhead": round(on / off - 1, 3),
        "load": _load(),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="what", required=True)
    a = sub.add_parser("searchable")
    a.add_argument("--items", type=int, default=10_000)
    a.add_argument("--studies", type=int, default=120)
    a.add_argument("--settle", type=float, default=2.0)
    b = sub.add_parser("throughput")
    b.add_argument("--runs", type=int, default=5)
    b.add_argument(
        "--bit-preserving",
        action="store_true",
        help="storescp +B: write each dataset as received (no re-encoding)",
    )
    d = sub.add_parser("sandbox")
    d.add_argument("--items", type=int, default=10_000)
    d.add_argument("--runs", type=int, default=3)
    c = sub.add_parser("dicomweb")
    c.add_argument("--instances", type=int, default=1000)
    args = ap.parse_args()
    # dcmtk leaves Nagle's algorithm on unless TCP_NODELAY=1: with it off, storescu and
    # storescp stall ~40-90 ms per instance on loopback (delayed ACKs).  Both sides
    # get it, in every benchmark (storescu is the sender for flow and storescp alike).
    os.environ["TCP_NODELAY"] = "1"
    print(f"load average at start {_load()}", flush=True)
    if args.what == "searchable":
        r = searchable(args.items, args.studies, args.settle)
    elif args.what == "throughput":
        if args.bit_preserving:
            STORESCP.append("+B")
        r = throughput(args.runs)
    elif args.what == "sandbox":
        r = sandbox_cost(args.items, args.runs)
    else:
        r = dicomweb(args.instances)
    print(json.dumps(r, indent=2), flush=True)
    os._exit(0)


if __name__ == "__main__":
    main()
