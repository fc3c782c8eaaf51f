"""No PHI in item ids: markers planted in DICOM tags and in folder names never reach
the store, raw or decompressed -- unless ``[ids] scheme = "path"`` (the old behaviour,
an explicit option) is asked for, where the folder marker does (so the scan works).

Issue 13 found a folder ``DOE^<marker>`` in 11 store files (index objects and
manifests) when ids were paths."""

from __future__ import annotations

import secrets
from pathlib import Path

import pydicom
import pytest
from click.testing import CliRunner

from app.phantoms import write_phantom_study
from cli.main import cli
from tests.conftest import project_config, write_project
from tests.faults.test_phi import find, store_views

pytestmark = pytest.mark.slow


def _plant(root: Path, marker: str) -> None:
    """Phantoms in a folder named after a patient, with the marker in their tags."""
    write_phantom_study(root, n=12, size=48, seed=21)
    images = root / "images"
    folder = images / f"DOE^{marker}"
    folder.mkdir()
    for i, p in enumerate(sorted(images.rglob("*.dcm"))):
        ds = pydicom.dcmread(p)
        ds.PatientName = f"DOE^{marker}"
        ds.PatientID = f"ID{marker}"
        ds.AccessionNumber = f"A{marker}"[:16]
        ds.save_as(folder / f"{marker}_{i}.dcm", enforce_file_format=True)
        p.unlink()
    # the labels follow the files (joined on the file name)
    lines = (root / "labels.csv").read_text().splitlines()
    out = [lines[0]]
    for i, line in enumerate(lines[1:]):
        out.append(",".join([f"{marker}_{i}.dcm", *line.split(",")[1:]]))
    (root / "labels.csv").write_text("\n".join(out) + "\n")


def _needles(marker: str) -> dict[bytes, str]:
    forms = {marker, marker.upper(), f"DOE^{marker}", f"DOE {marker}"}
    return {f.encode(enc): f"{f!r} ({enc})" for f in forms for enc in ("utf-8", "utf-16-le",
            "utf-32-le")}  # fmt: skip


@pytest.mark.parametrize("scheme", [None, "path"])
def test_markers_in_tags_and_folder_names_never_reach_the_store(tmp_path, scheme):
    marker = "zq" + secrets.token_hex(5)
    _plant(tmp_path, marker)
    extra = {"ids": {"scheme": scheme}} if scheme else {}
    cfg = project_config(sources=[{"path": "images", "labels": "labels.csv"}], **extra)
    write_project(tmp_path, cfg)
    res = CliRunner().invoke(cli, ["-p", str(tmp_path), "-q", "build", "index", "--target=all"])
    assert res.exit_code == 0, res.output
    views = list((w, d) for w, d in store_views(tmp_path / "store"))
    assert any("decompressed" in w for w, _ in views)
    hits = find(views, _needles(marker))
    if scheme == "path":  # the old behaviour: the folder is in every item table ...
        assert any("objects/" in h or "packs/" in h for h in hits), hits
        return
    assert not hits, hits[:20]
    # ... the user who has the sources still sees the files
    probe = next((tmp_path / "images").rglob("*.dcm"))
    res = CliRunner().invoke(cli, ["-p", str(tmp_path), "query", str(probe), "-t", "bovw"])
    assert f"DOE^{marker}/" in res.output
