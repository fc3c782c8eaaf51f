"""Hostile files are contained: a decode that balloons or does not come back costs its
item (failed with "exceeded 256 MiB" / "timed out after 2 s"), never the build.

The crafted files (tests/faults/hostile.py) are real DICOM: a deflate bomb that pydicom
inflates while reading the header, before any size check can refuse it."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from app.phantoms import write_phantom_study
from cli.main import cli
from tests.conftest import project_config, write_project
from tests.faults.hostile import busy_frame, deflate_bomb

pytestmark = pytest.mark.slow


@pytest.fixture
def project(tmp_path):
    write_phantom_study(tmp_path, n=12, size=48, seed=5)
    deflate_bomb(tmp_path / "images" / "hostile" / "bomb.dcm", 1 << 30)
    busy_frame(tmp_path / "images" / "hostile" / "busy.dcm")
    return tmp_path


def _build(root, **limits):
    cfg = project_config(targets=("bovw",), build={"scheduler": "threads", **limits})
    write_project(root, cfg)
    res = CliRunner().invoke(cli, ["-p", str(root), "-q", "build", "--json"])
    out = res.output
    return res.exit_code, json.loads(out[out.index("{") :])


def test_a_balloon_exceeds_the_memory_limit_and_the_build_goes_on(project):
    code, doc = _build(project, item_timeout=120, item_memory="256 MiB")
    assert code == 1
    why = {f["file"]: f["reason"] for f in doc["failures"]}
    assert why == {
        "images/hostile/bomb.dcm": "exceeded 256 MiB",
        "images/hostile/busy.dcm": "exceeded 256 MiB",
    }, why
    assert all(f["bad_input"] for f in doc["failures"])
    assert [s["count"] for s in doc["refs"]["bovw"]] == [12]  # the rest is indexed


def test_a_decode_that_does_not_come_back_times_out(project):
    # 2 s: the bomb takes 4-5 s of CPU; a phantom's decode takes milliseconds (1 s
    # was once too short for one of them on a machine with load 10)
    code, doc = _build(project, item_timeout=2, item_memory=0)
    assert code == 1
    why = {f["file"]: f["reason"] for f in doc["failures"]}
    assert why["images/hostile/busy.dcm"] == "timed out after 2 s", why
    assert [s["count"] for s in doc["refs"]["bovw"]] == [12]
    # recorded, not retried by the next build ...
    code, doc = _build(project, item_timeout=2, item_memory=0)
    assert all(s["computed"] == 0 for s in doc["steps"].values())
    # ... until asked, with more time and a memory limit
    write_project(project, project_config(targets=("bovw",), build={"scheduler": "threads",
                  "item_timeout": 120, "item_memory": "256 MiB"}))  # fmt: skip
    res = CliRunner().invoke(cli, ["-p", str(project), "-q", "build", "--json", "--retry-failed"])
    doc = json.loads(res.output[res.output.index("{") :])
    why = {f["file"]: f["reason"] for f in doc["failures"]}
    assert why["images/hostile/busy.dcm"] == "exceeded 256 MiB", why
