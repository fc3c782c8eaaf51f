"""PHI audit: no patient identifier reaches the store, in any form, anywhere.

A study of phantom DICOMs (every transfer syntax this installation writes) with known
PatientName, PatientID, PatientBirthDate, AccessionNumber, StudyDate and Study/Series/
SOP Instance UIDs -- labels joined on SOPInstanceUID, plus broken files whose failure
reasons end up in manifests -- is built into all three targets through the ``flow``
command.  Then every byte the store holds is searched:

* the raw bytes of every file (manifests, zarr chunks, blobs, caches, refs);
* every zarr array read back (decompressed), every ``.npz`` loaded (numpy keeps
  strings as UTF-32), every JSON document parsed (non-ASCII is escaped there);

for each value in several spellings (``^`` as space or ``", "``, upper/lower case; dates
as YYYYMMDD, YYYY-MM-DD, YYYY/MM/DD, DD.MM.YYYY) and encodings (UTF-8, UTF-16-LE,
UTF-32-LE).  ``tests/cli/test_cli.py`` checks the raw bytes for four tags; this is the
stronger version.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
from click.testing import CliRunner

from app.phantoms import write_bad_files, write_phantom_study
from cli.main import cli
from tests.conftest import project_config, write_project

pytestmark = pytest.mark.slow

#: labels joined on SOPInstanceUID; every target, smaller still than TINY_TARGETS
CONFIG = project_config(
    sources={
        "path": ".",
        "include": ["*.dcm"],
        "exclude": ["store/*"],
        "labels": "labels.csv",
        "join": "SOPInstanceUID",
        "labels_column": "finding_labels",
        "split_column": "split",
    },
    targets={
        "cnn": {"kind": "cnn", "normalize": {"size": 32}, "embedder": {"epochs": 1, "dim": 8}},
        "bovw": {
            "kind": "bovw",
            "normalize": {"size": 48},
            "descriptors": {"n_segments": 20, "patch": 12},
            "vocabulary": {"words": 8, "sample": 500},
        },
        "codes": {"kind": "codes", "coder": {"bits": 8}},
    },
)

TAGS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "AccessionNumber",
    "StudyDate",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
)
DATES = ("PatientBirthDate", "StudyDate")


def identifiers(folder: Path) -> dict[str, set[str]]:
    """Every value of :data:`TAGS` in the DICOM files under ``folder``."""
    out: dict[str, set[str]] = {t: set() for t in TAGS}
    for p in sorted(folder.rglob("*.dcm")):
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
        except Exception:
            continue
        for t in TAGS:
            if v := str(ds.get(t, "") or "").strip():
                out[t].add(v)
    return out


def spellings(tag: str, value: str) -> set[str]:
    forms = {value}
    if tag == "PatientName":
        parts = [p for p in value.split("^") if p]
        forms |= {" ".join(parts), ", ".join(parts[:2]), " ".join(reversed(parts[:2]))}
    if tag in DATES and len(value) == 8 and value.isdigit():
        y, m, d = value[:4], value[4:6], value[6:]
        forms |= {f"{y}-{m}-{d}", f"{y}/{m}/{d}", f"{d}.{m}.{y}", f"{m}/{d}/{y}"}
    forms |= {f.upper() for f in forms} | {f.lower() for f in forms}
    return {f for f in forms if len(f) >= 6}  # shorter forms would match by chance


def needles(ids: dict[str, set[str]]) -> dict[bytes, str]:
    out = {}
    for tag, values in ids.items():
        for v in values:
            for form in spellings(tag, v):
                for enc in ("utf-8", "utf-16-le", "utf-32-le"):
                    out[form.encode(enc)] = f"{tag} {form!r} ({enc})"
    return out


def store_views(root: Path):
    """(where, bytes) for every way the store's content can be read."""
    import zarr
    from zarr.storage import LocalStore

    for p in sorted(root.rglob("*")):
        if not p.is_file():
            continue
        rel = str(p.relative_to(root))
        data = p.read_bytes()
        yield rel, data
        if p.suffix == ".json":
            doc = json.loads(data)
            yield f"{rel} (parsed)", json.dumps(doc, ensure_ascii=False).encode()
            if p.name == "zarr.json" and doc.get("node_type") == "array":
                arr = zarr.open_array(LocalStore(p.parent, read_only=True), mode="r")
                yield f"{rel} (decompressed)", np.ascontiguousarray(arr[...]).tobytes()
        elif p.suffix == ".npz":
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                for k in z.files:
                    yield f"{rel}:{k}", np.ascontiguousarray(z[k]).tobytes()


def find(views, wanted: dict[bytes, str]) -> list[str]:
    hits = []
    for where, data in views:
        for needle, what in wanted.items():
            if needle in data:
                hits.append(f"{what} in {where}")
    return hits


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("phi")
    write_phantom_study(root, n=16, size=64, seed=11)
    bad = write_bad_files(root / "images" / "broken")
    # labels joined on SOPInstanceUID: the UIDs are in the CSV, never in the store
    with open(root / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(("SOPInstanceUID", "split", "finding_labels"))
        for r in rows:
            ds = pydicom.dcmread(root / r["file"], stop_before_pixels=True)
            w.writerow((ds.SOPInstanceUID, r["split"], r["finding_labels"] or "No Finding"))
    write_project(root, CONFIG)
    res = CliRunner().invoke(cli, ["-p", str(root), "-q", "build", "index", "--target=all"])
    assert res.exit_code == 1, res.output  # the broken files fail; the rest is indexed
    for b in bad:
        if b.suffix == ".dcm":
            assert b.name in res.output, res.output
    return root


def test_the_audit_finds_what_it_looks_for(built):
    ids = identifiers(built / "images")
    assert all(ids[t] for t in TAGS), {t: len(v) for t, v in ids.items()}
    assert "ROE^BROKEN^9999" in ids["PatientName"]  # a broken file's patient too
    wanted = needles(ids)
    # the scanner finds identifiers where they are: in the sources and the labels
    src = [(str(p), p.read_bytes()) for p in sorted((built / "images").rglob("*.dcm"))]
    hits = find([*src, ("labels.csv", (built / "labels.csv").read_bytes())], wanted)
    for tag in TAGS:
        assert any(h.startswith(tag) for h in hits), tag
    # ... in any of its encodings, and in arrays read back from zarr
    name = sorted(ids["PatientName"])[0]
    probe = np.array([f"x {name.replace('^', ' ').lower()} y"])  # UTF-32 in numpy
    assert find([("probe", probe.tobytes())], wanted)


def test_no_identifier_anywhere_in_the_store(built):
    store = built / "store"
    assert (store / "packs").is_dir() and (store / "objects").is_dir()
    views = list(store_views(store))
    assert any("decompressed" in w for w, _ in views) and any(".npz:" in w for w, _ in views)
    hits = find(views, needles(identifiers(built / "images")))
    assert not hits, hits[:20]


def test_failure_reasons_are_stored_and_clean(built):
    """The broken files' failures are in manifests (so the scan above covered them)."""
    docs = [json.loads(p.read_bytes()) for p in (built / "store" / "packs").rglob("*.json")]
    reasons = [f["reason"] for d in docs for f in d.get("failures", [])]
    assert any("truncated" in r for r in reasons), reasons
    assert os.path.isdir(built / "images" / "broken")
