"""``flow receive``: dcmtk's storescu sends real DICOM to flow's Storage SCP.

The corpus is ``../shared/data/dicom`` and pydicom's test files (pydicom-data where
installed), sent as they are (compressed transfer syntaxes included).  These tests
need dcmtk (``.ci/dicom.sh`` installs it); elsewhere they skip with the reason, and
under ``FLOW_REQUIRE_DICOM=1`` they must run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pydicom
import pytest

from app.project import load_project
from app.receive import Receiver
from tests.conftest import REPO, project_config, shared_data, write_project
from tests.dicomnet import acknowledged, corpus, dcmtk, free_port, need, pydicom_data_roots, send

pytestmark = pytest.mark.slow
CLI = [sys.executable, "-c", "from cli.main import main; main()"]
BOVW = {
    "bovw": {
        "kind": "bovw",
        "normalize": {"size": 48},
        "descriptors": {"n_segments": 20, "patch": 12},
        "vocabulary": {"words": 8, "sample": 500},
    }
}


@pytest.fixture(autouse=True)
def _dcmtk():
    need("dcmtk's storescu", dcmtk("storescu"))


def _project(root: Path, port: int, **receive) -> Path:
    cfg = project_config(
        sources=[],
        targets=BOVW,
        build={"scheduler": "threads"},
        receive={
            "folder": "incoming",
            "port": port,
            "settle": 1.0,
            "default_split": "train",
            **receive,
        },
    )
    del cfg["sources"]
    write_project(root, cfg)
    return root


def _image_studies(files) -> dict[str, set[str]]:
    """Study folder -> instance names the receiver gives the files with pixel data
    (UIDs where valid; a file without a usable SOP Instance UID is named by content)."""
    from app.receive import _safe_uid

    out: dict[str, set[str]] = {}
    for p, _, _ in files:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(p, stop_before_pixels=False, defer_size=64)
        if any(t in ds for t in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
            study = _safe_uid(ds.get("StudyInstanceUID")) or "unknown-study"
            sop = _safe_uid(ds.get("SOPInstanceUID")) or f"file:{p}"
            out.setdefault(study, set()).add(sop)
    return out


def _wait(pred, timeout: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.2)
    raise AssertionError(f"{what} within {timeout} s" + (f":\n{log.read_text()}" if log else ""))


@pytest.fixture
def receiver(tmp_path):
    """A ``flow receive`` process over a fresh project; its project, port and log."""
    port = free_port()
    root = _project(tmp_path / "p", port)
    log = tmp_path / "receive.log"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [*CLI, "-p", str(root), "receive"], stdout=out, stderr=subprocess.STDOUT, env=env,
            cwd=REPO,
        )  # fmt: skip
    try:
        _wait(lambda: "receiving as FLOW" in log.read_text(), 60, "flow receive listening", log)
        yield root, port, log, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


def _query_files(root: Path, image: Path, k: int = 500) -> set[str]:
    res = subprocess.run(
        [*CLI, "-p", str(root), "query", str(image), "-t", "bovw", "-k", str(k), "--json"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    return {r.get("file") for r in json.loads(res.stdout)["results"]}


def test_the_corpus_sent_by_storescu_is_stored_built_and_searchable(receiver):
    root, port, log, proc = receiver
    files = corpus(shared_data("dicom")) + corpus(*pydicom_data_roots())
    acked: set[Path] = set()
    for lo in range(0, len(files), 60):  # an association holds 128 contexts at most
        acked |= acknowledged(send(files[lo : lo + 60], port, check=False))
    assert len(acked) > 0.9 * len(files), (len(acked), len(files))  # storescu refuses a few
    studies = _image_studies([f for f in files if f[0] in acked])
    n = sum(len(s) for s in studies.values())
    stored = lambda: sorted((root / "incoming").glob("*/*.dcm"))  # noqa: E731
    # storescu returned: every instance was acknowledged, so it is on disk (same
    # SOP Instance UID in several encodings: one file, replaced by each re-send)
    assert len(stored()) == n, (len(stored()), n)
    # every study settled, was built, and logged its time to searchable
    _wait(lambda: log.read_text().count("searchable") >= len(studies), 600, "all built", log)
    text = log.read_text()
    assert "no pixel data: kept, not indexed" in text  # non-image objects: reported
    assert list((root / "incoming" / ".nonimage").rglob("*.dcm"))
    assert proc.poll() is None, text  # never crashed the receiver
    # a received image is found by a query with its own file
    probe = next(p for p in stored() if "1.2.840.10008" not in p.name)
    rel = str(probe.relative_to(root))
    assert rel in _query_files(root, probe), rel
    # no UID reaches the store: ids are keyed hashes of received/<study>/<sop>.dcm
    data = b"".join(p.read_bytes() for p in (root / "store").rglob("*") if p.is_file())
    for study, sops in list(studies.items())[:20]:
        assert study.encode() not in data
        for sop in sops:
            assert sop.encode() not in data, sop


def test_resends_are_no_ops_and_changed_tags_cut_off_after_decode(tmp_path):
    src = corpus(Path(pydicom.data.get_testdata_file("CT_small.dcm")).parent)
    ct = next(f for f in src if f[0].name == "CT_small.dcm")
    port = free_port()
    root = _project(tmp_path, port, settle=0.5)
    project = load_project(root)
    lines: list[str] = []
    with Receiver(project, log=lines.append) as r:
        r.start()
        send([ct], port)
        _wait(lambda: r.pending == 1, 30, "stored")
        time.sleep(0.6)
        built = r.poll()
        assert built.report.steps["decoded"].computed == 1 and "bovw" in built.moved
        (stored,) = (root / "incoming").glob("*/*.dcm")
        before = stored.stat()
        send([ct], port)  # the same bytes again
        time.sleep(0.3)
        assert r.counts["duplicate"] == 1 and stored.stat().st_mtime_ns == before.st_mtime_ns
        assert r.poll() is None  # nothing to build
        # the same instance with a rewritten name: replaced; decoded again, cut off there
        ds = pydicom.dcmread(ct[0])
        ds.PatientName = "RENAMED^AGAIN"
        changed = tmp_path / "changed.dcm"
        ds.save_as(changed, enforce_file_format=True)
        send([(changed, ct[1], ct[2])], port)
        _wait(lambda: r.counts["replaced"] == 1, 30, "replaced")
        assert stored.stat().st_ino != before.st_ino  # a new file, renamed into place
        time.sleep(0.6)
        built = r.poll()
        steps = built.report.steps
        assert steps["decoded"].computed == 1
        assert steps["normalized"].computed == 0 and steps["normalized"].reused == 1
        assert built.moved == {} and built.unchanged == ["bovw"]
        # a non-image object is accepted and reported, never an item
        sr = next(f for f in src if f[0].name == "rtplan.dcm")
        send([sr], port)
        _wait(lambda: r.counts["nonimage"] == 1, 30, "non-image stored")
        assert r.pending == 0
    assert any("no pixel data" in m for m in lines)
    assert any("searchable" in m for m in lines)


def test_a_failed_write_is_not_acknowledged(tmp_path, monkeypatch):
    """Disk full (or any write error): the sender is told to retry; nothing half-written."""
    ct = (Path(pydicom.data.get_testdata_file("CT_small.dcm")), "", "")
    ds = pydicom.dcmread(ct[0])
    ct = (ct[0], str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
    port = free_port()
    project = load_project(_project(tmp_path, port))

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    with Receiver(project) as r:
        r.start()
        monkeypatch.setattr("app.receive._sync", full)  # the data never reached the disk
        res = send([ct], port, check=False)
        assert r.counts["failed"] == 1 and r.counts["stored"] == 0
        out = (res.stdout + res.stderr).lower()
        assert "refused: outofresources" in out, out
        assert not [p for p in (tmp_path / "incoming").rglob("*") if p.is_file()]


def test_only_allowed_callers_are_accepted(tmp_path):
    ct = (Path(pydicom.data.get_testdata_file("CT_small.dcm")), "", "")
    ds = pydicom.dcmread(ct[0])
    ct = (ct[0], str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
    port = free_port()
    project = load_project(_project(tmp_path, port, allowed=["MODALITY1"]))
    with Receiver(project) as r:
        r.start()
        res = send([ct], port, calling="INTRUDER", check=False)
        assert res.returncode != 0 and r.counts["stored"] == 0
        send([ct], port, calling="MODALITY1")
        assert r.counts["stored"] == 1


def test_stopped_before_a_study_was_built_loses_nothing(tmp_path):
    """SIGTERM after the instances were acknowledged, before any build (--no-build):
    the next `flow build` builds them all."""
    port = free_port()
    root = _project(tmp_path / "p", port)
    files = corpus(shared_data("dicom", "pylibjpeg", "ds", "JPEGBaseline"))
    log = tmp_path / "log"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(log, "w") as out:
        proc = subprocess.Popen([*CLI, "-p", str(root), "receive", "--no-build"], stdout=out,
                                stderr=subprocess.STDOUT, env=env, cwd=REPO)  # fmt: skip
    try:
        _wait(lambda: "receiving as" in log.read_text(), 60, "listening", log)
        send(files, port)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    stored = list((root / "incoming").glob("*/*.dcm"))
    assert stored and "searchable" not in log.read_text()
    assert "not built yet" in log.read_text()
    res = subprocess.run([*CLI, "-p", str(root), "-q", "build", "--json"], capture_output=True,
                         text=True, cwd=REPO, timeout=600)  # fmt: skip
    doc = json.loads(res.stdout)
    assert sum(s["count"] for s in doc["refs"]["bovw"]) + len(doc["failures"]) == len(stored)
