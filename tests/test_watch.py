"""``flow watch``'s loop (:class:`nodes.watch.Watcher`) on a fake clock.

The build itself is replaced by a recorder here (tests/test_operate.py runs
``flow watch`` as a real process end to end); what is checked is when the
watcher builds, and that a build starts from the poll's own scan.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from flow.project import Project, load_project
from nodes.api import Workspace
from nodes.watch import Watcher

TOML = """
[store]
url = "store"
[[sources]]
path = "images"
[targets.cnn]
kind = "cnn"
"""


@pytest.fixture
def project(tmp_path: Path) -> Project:
    (tmp_path / "flow.toml").write_text(TOML)
    (tmp_path / "images").mkdir()
    for i in range(3):
        (tmp_path / "images" / f"old{i}.png").write_bytes(b"png %d" % i)
    return load_project(tmp_path)


class Recorder:
    """Stands in for Workspace.build: the item ids each build saw, and scans."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.builds: list[list[str]] = []
        self.scans = 0
        real_scan = Project.scan

        def scan(project, src):
            self.scans += 1
            return real_scan(project, src)

        def build(ws: Workspace, targets, **kw):
            assert targets == "all" and kw["progress"] is False
            self.builds.append(list(ws.items()[0].ids))
            return "built"

        monkeypatch.setattr(Project, "scan", scan)
        monkeypatch.setattr(Workspace, "build", build)


def _touch(path: Path, data: bytes, when: float) -> None:
    path.write_bytes(data)
    os.utime(path, (when, when))


def test_watcher_builds_when_changes_settle(project, monkeypatch):
    rec = Recorder(monkeypatch)
    now = [1000.0]
    w = Watcher(project, settle=10, clock=lambda: now[0])
    images = Path(project.sources[0].path)

    assert w.poll() == "built"  # the first poll catches up at once
    assert rec.builds == [["old0.png", "old1.png", "old2.png"]]
    now[0] += 5
    assert w.poll() is None and not w.pending  # nothing changed

    _touch(images / "new.png", b"half", 1_700_000_000)  # a copy under way
    now[0] += 5
    assert w.poll() is None and w.pending
    _touch(images / "new.png", b"half and the rest", 1_700_000_005)
    now[0] += 8
    assert w.poll() is None  # changed 8 s ago: not settled
    now[0] += 8
    assert w.poll() is None  # settled, but it changed again 8 s after the first
    now[0] += 3
    assert w.poll() == "built"  # 11 s after its last change
    assert rec.builds[-1] == ["new.png", "old0.png", "old1.png", "old2.png"]
    assert not w.pending

    (images / "old1.png").unlink()
    now[0] += 1
    assert w.poll() is None
    now[0] += 10
    assert w.poll() == "built"
    assert rec.builds[-1] == ["new.png", "old0.png", "old2.png"]
    assert len(rec.builds) == 3
    # 8 polls, 8 scans: each of the 3 builds used its poll's scan
    assert rec.scans == 8
