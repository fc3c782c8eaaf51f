"""End to end through the ``flow`` command: the operator's features.

Index segments answer like one index (and compact into exactly the index a
fresh store builds), ``flow compact`` and automatic compaction, ``flow watch``
as a real process (a half-copied file waits until it is whole), ``flow verify``
catching a flipped byte and the rebuild recomputing only what it quarantined,
and ``flow gc`` (a dry run deletes nothing; ``--delete`` frees what it reported).

One study is built once per module (``base``); tests that change a project
work on a copy of it (``shutil.copytree``, store included).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.phantoms import phantom_image, write_phantom_study
from tests.cli.test_cli import run, run_json, study_config
from tests.conftest import write_project

REPO = Path(__file__).resolve().parents[2]
TARGETS = ("cnn", "bovw", "codes")
N_DICOM, N_PNG, N_NEW = 24, 2, 5
N_BASE = N_DICOM + N_PNG


def _png(path: Path, findings: tuple[str, ...], seed: int) -> None:
    img = phantom_image(findings, size=64, rng=np.random.default_rng(seed))
    Image.fromarray((img >> 4).astype(np.uint8)).save(path)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def _new_images(tmp: Path, into: Path, n: int, seed: int) -> list[Path]:
    """``n`` new (unlabeled) phantom DICOMs copied into ``into``; their paths."""
    write_phantom_study(tmp, n=n, size=64, seed=seed)
    shutil.copytree(tmp / "images", into)
    return sorted(into.rglob("*.dcm"))


def _segments(root: Path, target: str) -> list[dict]:
    return run_json(root, "log", target)[0]["value"]["segments"]


def _counts(root: Path, target: str) -> list[int]:
    return [s["count"] for s in _segments(root, target)]


def _assert_indexed(root: Path, image: Path, target: str) -> None:
    """``image`` (a file under ``root``) is in ``target``'s live index with its
    content: by cosine (bovw) a query with it finds it first at distance ~0;
    findings vectors (cnn, codes) rank by inner product, where an item need not
    come first for itself, so it is looked for among every item's results."""
    rel = str(image.relative_to(root))
    if target == "bovw":
        res = _query(root, image, target, k=2)
        assert res[0]["file"] == rel and res[0]["distance"] < 1e-5, (target, res)
    else:
        res = _query(root, image, target, k=200, exact=True)
        assert rel in {r["file"] for r in res}, (target, rel)


def _query(root: Path, image: Path, target: str, k: int = 10, exact: bool = False) -> list[dict]:
    # annoy is approximate: its default search_k (trees x k) may miss a neighbour
    # that a smaller segment's search finds; 10**6 inspects every leaf here
    more = ["--search-k", str(10**6)] if exact else []
    args = ["query", str(image), "--target", target, "-k", str(k), *more]
    return run_json(root, *args)["results"]


def _assert_same_ranking(a: list[dict], b: list[dict], tol: float = 1e-6) -> None:
    """Same ids and distances, in the same order up to exact ties."""
    assert len(a) == len(b), (a, b)
    da = np.array([r["distance"] for r in a])
    db = np.array([r["distance"] for r in b])
    np.testing.assert_allclose(da, db, atol=tol, rtol=0)
    cuts = [j for j in range(1, len(a)) if da[j] - da[j - 1] > tol]
    for s, e in itertools.pairwise([0, *cuts, len(a)]):
        if e == len(a) and e - s > 1:
            continue  # a tie cut off at k: either side may hold other members of it
        assert {r["id"] for r in a[s:e]} == {r["id"] for r in b[s:e]}, (s, a[s:e], b[s:e])


def _files(root: Path) -> dict[str, tuple[int, int, str]]:
    """Every file of the store but its caches (which any command may refresh):
    relative path -> (size, mtime_ns, sha1)."""
    out = {}
    for p in sorted((root / "store").rglob("*")):
        if p.is_file() and p.relative_to(root / "store").parts[0] != "cache":
            st = p.stat()
            out[str(p.relative_to(root / "store"))] = (
                st.st_size,
                st.st_mtime_ns,
                hashlib.sha1(p.read_bytes()).hexdigest(),
            )
    return out


def _store_bytes(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted((root / "store").rglob("*")) if p.is_file())


def _failure_ids(root: Path) -> set[str]:
    """Item ids of every failure record in the store's pack manifests."""
    out = set()
    for m in (root / "store" / "packs").glob("*/*.json"):
        out.update(f["id"] for f in json.loads(m.read_text()).get("failures", []))
    return out


def _probes(root: Path) -> list[Path]:
    dcm = sorted((root / "images").rglob("*.dcm"))
    return [dcm[0], dcm[len(dcm) // 2], root / "png" / "p1.png"]


# --------------------------------------------------------------------------
# shared studies


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A labeled study (DICOM + PNG), built into all three targets."""
    root = tmp_path_factory.mktemp("base")
    write_phantom_study(root, n=N_DICOM, size=64, seed=3)
    labels = (root / "labels.csv").read_text().splitlines()
    (root / "png").mkdir()
    for i, f in enumerate([("Cardiomegaly",), ("Effusion",)]):
        _png(root / "png" / f"p{i}.png", f, 100 + i)
        labels.append(f"png/p{i}.png,{'train' if i == 0 else 'val'},{'|'.join(f)}")
    (root / "labels.csv").write_text("\n".join(labels) + "\n")
    write_project(root, study_config())
    doc = run_json(root, "build", "index", "--target=all")
    assert doc["ok"], doc["failures"]
    assert {t: [s["count"] for s in v] for t, v in doc["refs"].items()} == {
        t: [N_BASE] for t in TARGETS
    }
    return root


@pytest.fixture(scope="module")
def grown(base, tmp_path_factory) -> Path:
    """``base`` plus five new unlabeled images, built again: two segments per target."""
    root = _copy(base, tmp_path_factory.mktemp("grown") / "p")
    _new_images(tmp_path_factory.mktemp("gen"), root / "new", N_NEW, seed=77)
    doc = run_json(root, "build")
    assert doc["ok"], doc["failures"]
    assert doc["steps"]["embedding"]["computed"] == N_NEW
    return root


@pytest.fixture(scope="module")
def fresh_all(grown, tmp_path_factory) -> Path:
    """The same source files as ``grown`` built at once into a new, empty store."""
    root = tmp_path_factory.mktemp("fresh") / "p"
    shutil.copytree(grown, root, ignore=shutil.ignore_patterns("store"))
    doc = run_json(root, "build", "index", "--target=all")
    assert doc["ok"], doc["failures"]
    return root


# --------------------------------------------------------------------------
# segments


@pytest.mark.slow
def test_two_segments_answer_like_one_fresh_index(grown, fresh_all):
    for t in TARGETS:
        assert _counts(grown, t) == [N_BASE, N_NEW]
        assert _counts(fresh_all, t) == [N_BASE + N_NEW]
    new = sorted((grown / "new").rglob("*.dcm"))
    probes = [*_probes(grown), new[0], new[-1]]
    for probe in probes:
        other = fresh_all / probe.relative_to(grown)
        for t in TARGETS:
            a, b = _query(grown, probe, t, exact=True), _query(fresh_all, other, t, exact=True)
            assert len(a) == 10
            _assert_same_ranking(a, b)
            # the probe is in both indices (new ones in the second segment); by
            # cosine (bovw) it finds itself first -- findings vectors rank by inner
            # product, where it need not (the reachability check below covers them)
            if t == "bovw":
                assert a[0]["file"] == str(probe.relative_to(grown)), (t, a[0])
    # every item of both segments is reachable: a query for all of them
    everything = _query(grown, new[0], "cnn", k=100, exact=True)
    assert len(everything) == N_BASE + N_NEW
    _assert_same_ranking(
        everything,
        _query(fresh_all, fresh_all / new[0].relative_to(grown), "cnn", k=100, exact=True),
    )


@pytest.mark.slow
def test_compact_merges_into_the_fresh_index_without_item_work(grown, fresh_all, tmp_path):
    root = _copy(grown, tmp_path / "p")
    probes = [*_probes(root), sorted((root / "new").rglob("*.dcm"))[0]]
    before = {(p, t): _query(root, p, t, exact=True) for p in probes for t in TARGETS}
    packs = {k for k in _files(root) if k.startswith("packs/")}
    out = run(root, "-q", "compact")
    for t in TARGETS:
        assert f"{t}: {N_BASE + N_NEW} items / 1 segment(s)" in out, out
    computed = int(re.search(r"(\d+) computed", out).group(1))
    assert 1 <= computed <= 2 * len(TARGETS), out  # an index (and table) per target
    assert {k for k in _files(root) if k.startswith("packs/")} == packs  # no item step ran
    for t in TARGETS:
        segs = _segments(root, t)
        assert len(segs) == 1
        # content addressed: the merged index *is* the index a fresh store builds
        assert segs == _segments(fresh_all, t), t
    for (p, t), res in before.items():
        _assert_same_ranking(_query(root, p, t, exact=True), res)
    doc = run_json(root, "build")
    assert doc["refs"] == {} and all(s["computed"] == 0 for s in doc["steps"].values())
    # compacting what is already one segment changes nothing
    assert re.match(r"0 computed", run(root, "-q", "compact"))
    assert len(run_json(root, "log", "cnn")) == 3


@pytest.mark.slow
def test_builds_compact_automatically_past_the_configured_limits(base, tmp_path):
    root = _copy(base, tmp_path / "p")
    config = study_config()
    config["targets"]["cnn"]["segments"] = {"max": 2}
    config["targets"]["bovw"]["segments"] = {"compact_fraction": 0.05}
    write_project(root, config)
    _new_images(tmp_path / "g1", root / "new1", 3, seed=41)
    doc = run_json(root, "build")
    got = {t: [s["count"] for s in v] for t, v in doc["refs"].items()}
    # cnn: 2 segments <= max 2; bovw: 3/29 of the items outside the largest > 0.05
    assert got == {"cnn": [N_BASE, 3], "bovw": [N_BASE + 3], "codes": [N_BASE, 3]}
    _new_images(tmp_path / "g2", root / "new2", 3, seed=42)
    doc = run_json(root, "build")
    got = {t: [s["count"] for s in v] for t, v in doc["refs"].items()}
    # cnn: 3 segments > max 2 -> one; bovw stays one; codes keeps the defaults (8, 0.5)
    assert got == {"cnn": [N_BASE + 6], "bovw": [N_BASE + 6], "codes": [N_BASE, 3, 3]}
    for step in ("decoded", "embedding", "descriptors", "codes"):
        assert doc["steps"][step]["computed"] == 3, (step, doc["steps"][step])
    probe = sorted((root / "new1").rglob("*.dcm"))[0]
    for t in TARGETS:
        _assert_indexed(root, probe, t)
    config["targets"]["cnn"]["segments"]["max"] = 0
    write_project(root, config)
    out = run(root, "build", code=2)
    assert "targets.cnn.segments" in out and "max" in out, out


# --------------------------------------------------------------------------
# watch


def _wait(what, deadline: float, proc: subprocess.Popen, err: Path):
    while True:
        got = what()
        if got:
            return got
        if proc.poll() is not None:
            pytest.fail(f"flow watch exited with {proc.returncode}:\n{err.read_text()}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out; flow watch said:\n{err.read_text()}")
        time.sleep(0.3)


def _flow(root: Path, *args: str) -> tuple[list[str], dict]:
    """The command line and environment of ``flow -p ROOT ARGS`` as its own process."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    # a terminal's Ctrl-C: Python ignores SIGINT if the parent's shell did (nohup, &)
    code = (
        "import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "from cli.main import main; main()"
    )
    return [sys.executable, "-c", code, "-p", str(root), *args], env


@pytest.mark.slow
def test_watch_refuses_a_folder_that_is_not_a_source(base, tmp_path):
    cmd, env = _flow(base, "watch", str(tmp_path), "--interval", "0.2")
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "is not a source" in res.stderr, res
    assert str(tmp_path) in res.stderr


@pytest.mark.slow
def test_watch_indexes_new_files_once_they_settle(base, tmp_path):
    root = _copy(base, tmp_path / "p")
    gen = tmp_path / "gen"
    write_phantom_study(gen, n=3, size=64, seed=55)
    srcs = sorted((gen / "images").rglob("*.dcm"))
    seq0 = run_json(root, "log", "cnn")[0]["seq"]
    out, err = tmp_path / "watch.out", tmp_path / "watch.err"
    cmd, env = _flow(root, "watch", "--interval", "0.3", "--settle", "5")
    with open(out, "w") as fo, open(err, "w") as fe:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=fo, stderr=fe)
    try:
        # its first scan builds at once (nothing new: the ref stays)
        _wait(lambda: "computed" in out.read_text(), time.monotonic() + 90, proc, err)
        incoming = root / "incoming"
        incoming.mkdir()
        shutil.copy(srcs[0], incoming / "a.dcm")
        shutil.copy(srcs[1], incoming / "b.dcm")
        data = srcs[2].read_bytes()
        slow = incoming / "slow.dcm"
        with open(slow, "wb") as fh:  # half of it, a pause of a few scans, the rest
            fh.write(data[: len(data) // 2])
            fh.flush()
            os.fsync(fh.fileno())
            time.sleep(1.0)  # > 3 scans, well within --settle on a loaded machine
            fh.write(data[len(data) // 2 :])
        deadline = time.monotonic() + 90
        for t in TARGETS:
            _wait(lambda t=t: sum(_counts(root, t)) == N_BASE + 3, deadline, proc, err)
        added = run_json(root, "log", "cnn")[0]
        # a removed file leaves the indices at the next build
        (incoming / "a.dcm").unlink()
        deadline = time.monotonic() + 90
        for t in TARGETS:
            _wait(lambda t=t: sum(_counts(root, t)) == N_BASE + 2, deadline, proc, err)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
    stderr, stdout = err.read_text(), out.read_text()
    assert rc in (0, 130), (rc, stderr)
    assert "Traceback" not in stderr + stdout, stderr
    assert "stopped" in stderr or rc == 130, stderr
    assert "failed" not in stdout, stdout
    # one build, after the slow file was whole: one new segment of the three files;
    # then one more without the removed file
    assert added["seq"] == seq0 + 1, added
    assert [s["count"] for s in added["value"]["segments"]] == [N_BASE, 3]
    assert run_json(root, "log", "cnn")[0]["seq"] == seq0 + 2
    assert _counts(root, "cnn") == [N_BASE, 2]
    assert "incoming/a.dcm" not in {r["id"] for r in _query(root, srcs[0], "cnn", k=50)}
    # the half-copied file was never recorded as a failed (broken) item ...
    assert not {i for i in _failure_ids(root) if i.startswith("incoming/")}
    # ... and is indexed with its full content
    for t in TARGETS:
        _assert_indexed(root, slow, t)
    doc = run_json(root, "build")
    assert doc["ok"] and not doc["failures"]
    assert all(s["computed"] == 0 for s in doc["steps"].values()), doc["steps"]


# --------------------------------------------------------------------------
# verify


@pytest.mark.slow
def test_verify_quarantines_a_corrupt_pack_and_the_build_redoes_its_items(base, tmp_path):
    root = _copy(base, tmp_path / "p")
    probe = _probes(root)[0]
    before = _query(root, probe, "cnn")
    packs = sorted((root / "store" / "packs" / "embedding").glob("*.json"))
    manifest = packs[0]
    pid, n = manifest.stem, json.loads(manifest.read_text())["n"]
    assert 0 < n <= N_BASE  # a small build writes one pack per worker
    chunks = [p for p in (manifest.parent / pid).rglob("*") if p.is_file() and "zarr" not in p.name]
    assert chunks
    chunk = max(chunks, key=lambda p: p.stat().st_size)
    raw = bytearray(chunk.read_bytes())
    for j in range(len(raw) // 2, len(raw) // 2 + 4):
        raw[j] ^= 0xFF
    chunk.write_bytes(bytes(raw))

    # --no-repair reports, exit 1, and leaves the pack where it is
    doc = run_json(root, "verify", "--no-repair", code=1)
    assert doc["checked"]["pack"] >= 5 and doc["checked"]["object"] > 3  # every pack of each step
    assert [(p["kind"], p["node"], p["id"], p["items"]) for p in doc["problems"]] == [
        ("pack", "embedding", pid, n)
    ]
    assert manifest.exists()
    # repair: quarantined, so the catalog no longer lists it
    doc = run_json(root, "verify", code=1)
    assert [(p["node"], p["id"]) for p in doc["problems"]] == [("embedding", pid)]
    assert not manifest.exists()
    assert list((root / "store" / "quarantine").rglob(f"{pid}*.json"))
    assert run_json(root, "verify")["problems"] == []

    doc = run_json(root, "build", "index", "--target=all")
    assert doc["ok"], doc["failures"]
    computed = {s: v["computed"] for s, v in doc["steps"].items() if v["computed"]}
    assert computed == {"embedding": n}, doc["steps"]  # exactly its items, nothing else
    assert doc["refs"] == {}  # same vectors, same index: the refs stay
    out = run(root, "verify")
    assert " 0 corrupt" in out, out
    assert _query(root, probe, "cnn") == before

    # gc clears the quarantine and the corrupt chunk the manifest left behind
    doc = run_json(root, "gc", "--delete", "--grace", "0")
    assert doc["deleted"] and "quarantined manifests" in doc["dead"]
    assert not chunk.exists()
    assert not [p for p in (root / "store" / "quarantine").rglob("*") if p.is_file()]
    assert " 0 corrupt" in run(root, "verify")
    doc = run_json(root, "build")
    assert all(s["computed"] == 0 for s in doc["steps"].values()), doc["steps"]


@pytest.mark.slow
def test_verify_quarantines_a_corrupt_index_and_the_build_rebuilds_only_it(base, tmp_path):
    root = _copy(base, tmp_path / "p")
    probe = _probes(root)[1]
    before = _query(root, probe, "bovw")
    node, rkey = _segments(root, "bovw")[0]["index"]
    blob = next((root / "store" / "objects" / node / rkey).rglob("annoy.blob"))
    raw = bytearray(blob.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    blob.write_bytes(bytes(raw))
    doc = run_json(root, "verify", code=1)
    assert [(p["kind"], p["node"], p["id"]) for p in doc["problems"]] == [("object", node, rkey)]
    assert "checksum" in doc["problems"][0]["reason"]
    doc = run_json(root, "build")
    computed = {s: v["computed"] for s, v in doc["steps"].items() if v["computed"]}
    assert computed == {"bovw.index.0": 1}, doc["steps"]
    assert doc["refs"] == {}  # rebuilt under the same key: the ref stays
    assert (root / "store" / "objects" / node / f"{rkey}.json").exists()
    assert " 0 corrupt" in run(root, "verify")
    assert _query(root, probe, "bovw") == before


# --------------------------------------------------------------------------
# gc


def _gc(root: Path, *args: str) -> dict:
    return run_json(root, "gc", "--grace", "0", *args)


def _assert_gc_frees_what_it_reported(root: Path, dry: dict, *args: str) -> None:
    """``gc --delete`` reports what the dry run did and deletes exactly that."""
    files = _files(root)
    done = _gc(root, "--delete", *args)
    assert done["deleted"]
    assert (done["files"], done["bytes"], done["dead"]) == (dry["files"], dry["bytes"], dry["dead"])
    listed = {p for ps in done["dead"].values() for p in ps}
    assert sum(files[p][0] for p in listed) == done["bytes"]
    after = _files(root)
    gone, added = set(files) - set(after), set(after) - set(files)
    assert listed <= gone
    # besides what it listed, only packs rewritten without a forgotten item change:
    # their payload goes, a copy without the item comes
    rewritten = done["dead"].get("packs rewritten without forgotten items", [])
    dirs = tuple(p.removesuffix(".json") + "/" for p in rewritten)
    assert all(p.startswith(dirs) for p in gone - listed), sorted(gone - listed)
    assert all(p.startswith("packs/") for p in added), sorted(added)
    assert bool(added) == bool(rewritten)
    for p in set(after) & set(files):
        assert after[p][2] == files[p][2], p  # nothing else rewritten


@pytest.mark.slow
def test_gc_dry_run_deletes_nothing_and_delete_frees_what_it_reported(base, tmp_path):
    root = _copy(base, tmp_path / "p")
    # garbage: codes built with 8 bits, then the project goes back to 16
    config = study_config()
    assert config["targets"]["codes"]["coder"] == {"bits": 16}
    config["targets"]["codes"]["coder"]["bits"] = 8
    write_project(root, config)
    doc = run_json(root, "build", "-t", "codes")
    assert doc["steps"]["codes"]["computed"] == N_BASE
    write_project(root, study_config())
    doc = run_json(root, "build")
    assert all(s["computed"] == 0 for s in doc["steps"].values()), doc["steps"]
    probe = _probes(root)[0]
    before = {t: _query(root, probe, t) for t in TARGETS}

    files = _files(root)
    dry = _gc(root, "--keep", "0")
    assert not dry["deleted"] and dry["files"] > 0 and dry["bytes"] > 0
    assert "packs no plan uses" in dry["dead"]
    listed = {p for ps in dry["dead"].values() for p in ps}
    assert {p.split("/")[1] for p in listed if p.startswith("packs/")} == {"codes"}
    assert listed <= set(files)
    assert _files(root) == files  # the dry run touched nothing
    assert _gc(root, "--keep", "0") == dry  # and reports the same again

    _assert_gc_frees_what_it_reported(root, dry, "--keep", "0")
    doc = run_json(root, "build")
    assert all(s["computed"] == 0 for s in doc["steps"].values()), doc["steps"]
    for t in TARGETS:
        assert _query(root, probe, t) == before[t]
    assert _gc(root, "--keep", "0")["files"] == 0


@pytest.mark.slow
def test_gc_after_forget_dry_run_keeps_the_data_delete_purges_it(base, tmp_path):
    root = _copy(base, tmp_path / "p")
    victim = sorted((root / "images").rglob("*.dcm"))[-1]
    rel = str(victim.relative_to(root))
    # its id (a keyed hash: the path itself never reaches the store)
    (vid,) = [r["id"] for r in _query(root, victim, "bovw", k=50) if r["file"] == rel]
    assert rel.encode() not in _store_bytes(root)
    assert "withdrew 1 item" in run(root, "forget", str(victim))
    assert rel not in {r.get("file") for r in _query(root, victim, "cnn", k=50)}

    files = _files(root)
    dry = _gc(root)
    assert not dry["deleted"] and dry["bytes"] > 0
    assert dry["dead"]["packs rewritten without forgotten items"]
    assert _files(root) == files
    assert vid.encode() in _store_bytes(root)  # nothing purged yet

    _assert_gc_frees_what_it_reported(root, dry)
    assert vid.encode() not in _store_bytes(root)
    assert rel not in {r.get("file") for r in _query(root, victim, "codes", k=50)}
    doc = run_json(root, "build")
    assert all(s["computed"] == 0 for s in doc["steps"].values()), doc["steps"]
    assert " 0 corrupt" in run(root, "verify")
