"""A DICOMweb source against a real Orthanc (with its DICOMweb plugin) on loopback.

Orthanc holds the corpus of ``../shared/data/dicom`` and pydicom's test files; the
fixture starts it with a throw-away configuration and storage, HTTP basic auth on,
and stops it after.  Skipped where Orthanc is not installed (``.ci/dicom.sh``), and
required under ``FLOW_REQUIRE_DICOM=1``.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from app.project import load_project
from tests.conftest import REPO, project_config, shared_data, write_project
from tests.dicomnet import Orthanc, corpus, pydicom_data_roots

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


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    with Orthanc(tmp_path_factory.mktemp("orthanc")) as o:
        files = corpus(shared_data("dicom")) + corpus(*pydicom_data_roots())
        assert o.upload(p for p, _, _ in files) > 100
        yield o


def _flow(root, *args, env=None):
    return subprocess.run(
        [*CLI, "-p", str(root), *args], capture_output=True, text=True, cwd=REPO,
        timeout=900, env=env,
    )  # fmt: skip


@pytest.fixture(scope="module")
def project(orthanc, tmp_path_factory):
    root = tmp_path_factory.mktemp("web")
    src = {
        "name": "pacs",
        "dicomweb": orthanc.dicomweb,
        "username": orthanc.user,
        "password_env": "FLOW_TEST_PACS_PASSWORD",
        "default_split": "train",
    }
    write_project(root, project_config(sources=[src], targets=BOVW, build={"scheduler": "threads"}))
    return root


@pytest.fixture(scope="module")
def env(orthanc):
    import os

    return {**os.environ, "PYTHONPATH": str(REPO), "FLOW_TEST_PACS_PASSWORD": orthanc.password}


def test_first_build_fetches_and_indexes_the_archive(project, env, orthanc):
    res = _flow(project, "build", "--json", env=env)
    doc = json.loads(res.stdout)
    assert doc["refs"]["bovw"][0]["count"] > 50, res.stderr[-3000:]
    assert "QIDO-RS" in res.stderr and "instance(s) fetched" in res.stderr
    cache = project / ".flow" / "dicomweb" / "pacs"
    cached = [p for p in cache.rglob("*.dcm")]
    from flow.keys import file_key

    for p in cached[:20]:  # content-addressed: the name is the key of the bytes
        assert p.stem == file_key(str(p)).hex()
    # failures name the cached file, never a UID
    assert all(f["file"].startswith(".flow/dicomweb/pacs/") for f in doc["failures"])


def test_a_no_op_build_makes_one_qido_request_and_downloads_nothing(project, env):
    from app.dicomweb import sync

    p = load_project(project)
    import os

    os.environ["FLOW_TEST_PACS_PASSWORD"] = env["FLOW_TEST_PACS_PASSWORD"]
    listing = sync(p.dicomweb[0])
    assert listing.fetched == 0
    # one study-level page, plus one instance listing and fetch per study that
    # could not be completed (the corpus has a series Orthanc cannot serve)
    assert listing.requests["qido"] <= 1 + len(listing.errors), listing.requests
    res = _flow(project, "build", "--json", env=env)
    doc = json.loads(res.stdout)
    assert all(s["computed"] == 0 for s in doc["steps"].values()), doc["steps"]


def test_new_and_deleted_instances_are_seen(project, env, orthanc, tmp_path):
    import pydicom

    from app.phantoms import write_phantom_study

    p = load_project(project)
    before = set(_names(p))
    write_phantom_study(tmp_path, n=1, size=48, seed=99)
    (new,) = sorted((tmp_path / "images").rglob("*.dcm"))
    study = str(pydicom.dcmread(new, stop_before_pixels=True).StudyInstanceUID)
    assert orthanc.upload([new]) == 1
    doc = json.loads(_flow(project, "build", "--json", env=env).stdout)
    assert doc["steps"]["decoded"]["computed"] == 1
    after = set(_names(p))
    (added,) = after - before
    assert added.startswith(study)
    # forget works on DICOMweb items: by study
    res = _flow(project, "forget", "--study", study, env=env)
    assert "withdrew 1 item" in res.stdout, res.stdout + res.stderr
    # deleted from the archive: gone from the listing at the next build
    sop = added.split("/")[-1]
    orthanc.delete_instance(sop)
    _flow(project, "build", env=env)
    assert added not in set(_names(p))


def _names(p):
    import os

    os.environ.setdefault("FLOW_TEST_PACS_PASSWORD", "")
    from app.dicomweb import _load_state

    doc = _load_state(p.dicomweb[0])
    return [
        f"{st}/{v[0]}/{sop}"
        for st, e in doc["studies"].items()
        for sop, v in e["instances"].items()
    ]


def test_wrong_credentials_are_reported_and_the_build_uses_what_it_has(project, env):
    bad = {**env, "FLOW_TEST_PACS_PASSWORD": "wrong"}
    res = _flow(project, "build", "--json", env=bad)
    assert "401" in res.stderr and "building with the instances fetched before" in res.stderr
    doc = json.loads(res.stdout)
    assert all(s["computed"] == 0 for s in doc["steps"].values())
