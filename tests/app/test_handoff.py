"""A warm process: ``flow build`` / ``flow status`` handed to a running ``flow watch``.

Real processes: a ``flow watch`` of a small project, and ``flow`` commands started
beside it that hand over (or, where they must not, run themselves).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.handoff import (
    BuildService,
    code_identity,
    command_of,
    find_project_file,
    socket_path,
    try_handoff,
)
from tests.conftest import REPO, project_config, write_project

pytestmark = pytest.mark.slow
CLI = [sys.executable, "-c", "from cli.main import main; main()"]


def _images(folder: Path, start: int, n: int) -> None:
    from app.phantoms import phantom_image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n):
        img = phantom_image(("No Finding",), size=64, rng=np.random.default_rng(i))
        Image.fromarray((img >> 4).astype(np.uint8)).save(folder / f"im{i:03d}.png")


def _flow(root: Path, *args: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CLI, *args],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        **kw,
    )


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "p"
    _images(root / "images", 0, 8)
    write_project(
        root,
        project_config(
            store=".flow/store",
            sources={"path": "images", "default_split": "train"},
            targets=("bovw",),
            build={},
        ),
    )
    time.sleep(2.1)  # older than the stat cache's "too recent" window
    return root


@pytest.fixture
def watcher(project: Path):
    """A ``flow -v watch`` of the project, listening for handed-over commands."""
    log = project / "watch.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [*CLI, "-v", "watch", "--interval", "0.2", "--settle", "3"],
            cwd=project,
            stdout=fh,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            start_new_session=True,
        )
    sock = socket_path(str(project / "flow.toml"))
    deadline = time.monotonic() + 120
    while not (sock.exists() and "built" in _built_lines(log)) and time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        time.sleep(0.1)
    assert sock.exists(), log.read_text()
    try:
        yield proc, log
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    assert not sock.exists()  # a watcher that stops takes its socket with it


def _built_lines(log: Path) -> str:
    text = log.read_text()
    return "built" if any(" computed in " in line for line in text.splitlines()) else ""


def _handed(log: Path) -> int:
    return log.read_text().count("handed over: flow")


def test_build_and_status_are_handed_to_the_watcher(project: Path, watcher):
    proc, log = watcher
    res = _flow(project, "build", "index", "--target=all", "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["ok"] and doc["unchanged"] == ["bovw"]
    assert sum(s["computed"] for s in doc["steps"].values()) == 0
    assert _handed(log) == 1
    res = _flow(project, "status")
    assert res.returncode == 0, res.stderr
    assert "bovw" in res.stdout and _handed(log) == 2
    # from a subfolder too: the project is found upward, as git finds a repository
    (project / "images" / "sub").mkdir()
    res = _flow(project / "images" / "sub", "-q", "build")
    assert res.returncode == 0, res.stderr
    assert _handed(log) == 3
    # a usage error is the watcher's to report, with the same exit status
    res = _flow(project, "build", "--no-such-option")
    assert res.returncode == 2 and "No such option" in res.stderr
    assert proc.poll() is None  # and the watcher goes on


def test_new_files_built_by_a_handed_build_are_not_built_again(project: Path, watcher):
    _, log = watcher
    _images(project / "images", 8, 2)  # the watcher waits 3 s for them to settle
    res = _flow(project, "-q", "build", "index", "--target=all", "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["steps"]["decoded"]["computed"] == 2
    assert [s["count"] for s in doc["refs"]["bovw"]] == [8, 2]
    time.sleep(4.0)  # many polls of the watcher, past its settle time
    assert log.read_text().count(" computed in ") == 1  # only its first build


def test_without_a_watcher_or_when_told_not_to_the_command_runs_here(project: Path, watcher):
    _, log = watcher
    res = _flow(project, "-q", "build", env={"FLOW_HANDOFF": "0"})
    assert res.returncode == 0, res.stderr
    assert _handed(log) == 0


def test_a_watcher_of_other_code_declines(tmp_path: Path, monkeypatch):
    pfile = tmp_path / "flow.toml"
    pfile.write_text("")
    calls = []
    service = BuildService(str(pfile), None, lambda argv, cancel: calls.append(argv) or 0)
    service.code = "an older flow"
    assert service.start()
    try:
        monkeypatch.chdir(tmp_path)
        assert try_handoff(["build"]) is None  # declined: the command runs here
        assert calls == []
        service.code = code_identity()
        assert try_handoff(["-q", "build"]) == 0 and calls == [["-q", "build"]]
        assert try_handoff(["query", "x.png"]) is None  # not a command a watcher runs
        # a second service on the same project does not take over
        assert not BuildService(str(pfile), None, lambda a, c: 0).start()
    finally:
        service.close()
    assert try_handoff(["build"]) is None  # nobody listens: run here


def test_interrupting_the_client_stops_the_handed_build(tmp_path: Path):
    """Ctrl-C of the ``flow build`` that handed over: it exits 130 at once, and the
    watcher's build is told to stop (the cancel event a Ctrl-C would set)."""
    pfile = tmp_path / "flow.toml"
    pfile.write_text("")
    started, stopped = threading.Event(), threading.Event()

    def handler(argv, cancel):
        print("building", flush=True)
        started.set()
        if cancel.wait(60):
            stopped.set()
            print("interrupted", file=sys.stderr)
            return 130
        return 0

    with BuildService(str(pfile), None, handler) as service:
        assert service.start()
        client = subprocess.Popen(
            [*CLI, "build"],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        assert started.wait(60)
        assert client.stdout.readline() == "building\n"  # relayed as it is printed
        client.send_signal(signal.SIGINT)
        _, err = client.communicate(timeout=60)
        assert client.returncode == 130, err
        assert "interrupted" in err and "Traceback" not in err
        assert stopped.wait(10)


def test_command_lines_are_read_without_click(tmp_path: Path, monkeypatch):
    assert command_of(["-v", "-p", "x", "build", "--target=all"]) == "build"
    assert command_of(["--store=s3://b/p", "status"]) == "status"
    assert command_of(["-q"]) is None
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "flow.toml").write_text("")
    monkeypatch.chdir(tmp_path / "a" / "b")
    assert find_project_file(None) == os.path.realpath(tmp_path / "flow.toml")
    assert find_project_file(str(tmp_path)) == os.path.realpath(tmp_path / "flow.toml")
    assert find_project_file(str(tmp_path / "a")) is None
    assert socket_path("/x/flow.toml") != socket_path("/x/flow.toml", "s3://b")
