"""``flow watch``'s loop (:class:`app.watch.Watcher`) on a fake clock.

The build itself is replaced by a recorder here (tests/cli/test_operate.py runs
``flow watch`` as a real process end to end); what is checked is when the
watcher builds, and that a build starts from the poll's own scan.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import ClassVar

import pytest

from app.project import Project, load_project
from app.watch import _MISSING, Watcher
from app.workspace import Workspace
from tests.conftest import project_config, write_project


@pytest.fixture
def project(tmp_path: Path) -> Project:
    config = project_config(
        scheduler=None, sources={"path": "images"}, targets={"cnn": {"kind": "cnn"}}
    )
    write_project(tmp_path, config)
    (tmp_path / "images").mkdir()
    for i in range(3):
        (tmp_path / "images" / f"old{i}.png").write_bytes(b"png %d" % i)
    return load_project(tmp_path)


class Recorder:
    """Stands in for Workspace.build: the items each build saw (their paths in the
    source, sorted: ids are keyed hashes), and scans."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.builds: list[list[str]] = []
        self.scans = 0
        real_scan = Project.scan

        def scan(project, src, **kw):
            self.scans += 1
            return real_scan(project, src, **kw)

        def build(ws: Workspace, targets, **kw):
            assert targets == "all" and kw["progress"] is False
            names = ws.items()[2]["names"]  # "<source>/<path in it>"
            self.builds.append(sorted(n.split("/", 1)[1] for n in names))
            return "built"

        monkeypatch.setattr(Project, "scan", scan)
        monkeypatch.setattr(Workspace, "build", build)


def _touch(path: Path, data: bytes, when: float) -> None:
    path.write_bytes(data)
    os.utime(path, (when, when))


def test_watcher_builds_when_changes_settle(project, monkeypatch):
    rec = Recorder(monkeypatch)
    now = [1000.0]
    w = Watcher(project, settle=10, clock=lambda: now[0], notify=False)
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


def _notifications_or_skip(folder: Path) -> None:
    """Skip where this machine gives no file notifications (no inotify in the
    container, its watch limit reached): the watcher then polls, tested below."""
    from app.watch import _Notifications

    try:
        _Notifications({"probe": str(folder)}).close()
    except Exception as e:
        pytest.skip(f"no file notifications here: {type(e).__name__}: {e}")


def _until(cond, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.05)


def test_notified_polls_read_only_what_changed(project, monkeypatch):
    """Following the system's notifications, a poll re-reads only the files and
    folders it was told of, and the result is what a full scan lists."""
    _notifications_or_skip(Path(project.sources[0].path))
    rec = Recorder(monkeypatch)
    now = [0.0]
    images = Path(project.sources[0].path)
    src = project.sources[0]
    from engine.scan import scan_folder

    def full() -> tuple:  # what a full scan lists (not counted as the watcher's)
        return scan_folder(src.path, src.include, src.exclude, src.extensionless)

    def caught_up() -> bool:  # notifications arrive on their own thread
        return w.poll() is None and w._scans[src.path] == full()

    with Watcher(project, settle=0, clock=lambda: now[0]) as w:
        assert w.poll() == "built" and rec.scans == 1  # a full scan, then notifications
        assert w._notes is not None
        assert w.poll() is None and rec.scans == 1  # told of nothing: read nothing

        (images / "new.png").write_bytes(b"new")
        (images / ".hidden.png").write_bytes(b"hidden")  # a full scan skips these
        (images / "notes.txt").write_bytes(b"not an image")
        (images / "old0.png").unlink()
        (images / "old1.png").write_bytes(b"rewritten, longer")
        (images / "study").mkdir()
        (images / "study" / "s1.png").write_bytes(b"s1")
        _until(caught_up, "notified state equal to a full scan")
        assert not w.pending and rec.scans == 1  # built, and never a full scan
        assert rec.builds[-1] == ["new.png", "old1.png", "old2.png", "study/s1.png"]

        os.rename(images / "study", images / "moved")  # a folder moved
        _until(caught_up, "the move")
        assert rec.builds[-1] == ["moved/s1.png", "new.png", "old1.png", "old2.png"]
        assert rec.scans == 1
        now[0] += 301  # past --rescan: a full scan again
        w.poll()
        assert rec.scans == 2
    assert w._notes is None  # closed


def test_without_notifications_every_poll_scans(project, monkeypatch):
    rec = Recorder(monkeypatch)
    warned = []
    monkeypatch.setattr(
        "app.watch._Notifications.__init__",
        lambda self, roots: (_ for _ in ()).throw(OSError("inotify watch limit reached")),
    )
    w = Watcher(project, settle=0, clock=lambda: 0.0, warn=warned.append)
    assert w.poll() == "built" and w.poll() is None and w.poll() is None
    assert rec.scans == 3
    assert warned == [
        "file notifications unavailable (OSError: inotify watch limit reached); polling"
    ]


def test_a_source_folder_removed_while_notified(project, monkeypatch):
    """The poll drops its files (as a full scan would); the build then says which
    folder is missing, as one line, not a traceback from the watcher."""
    import shutil

    from flow.errors import ConfigError

    images = Path(project.sources[0].path)
    _notifications_or_skip(images)
    Recorder(monkeypatch)
    with Watcher(project, settle=0, clock=lambda: 0.0) as w:
        assert w.poll() == "built"
        shutil.rmtree(images)

        def gone() -> bool:
            try:
                w.poll()
            except ConfigError as e:
                assert str(images) in str(e)
                return True
            return False

        _until(gone, "the missing source reported")
        assert w._seen == {f"{images}/": _MISSING}  # its files left the snapshot


class FakeNotifications:
    """Stands in for the OS's notifications: the test says what arrives when."""

    started: ClassVar[list[set]] = []  # the roots of each start
    last: ClassVar[FakeNotifications]

    def __init__(self, roots: dict):
        FakeNotifications.started.append(set(roots))
        self.queue: dict = {}
        FakeNotifications.last = self

    def arrive(self, path: str, files=(), dirs=()) -> None:
        self.queue[path] = (set(files), set(dirs))

    def take(self) -> dict:
        queue, self.queue = self.queue, {}
        return queue

    def close(self) -> None:
        pass


def test_a_source_emptied_then_removed_is_reported(project, monkeypatch):
    """``rm -r images``: the files' deletions may reach a poll before the folder's
    own.  The poll then sees an empty folder (and builds nothing new); the folder's
    removal, at a later poll, is still a change, reported by the build.  Once the
    folder is back, the watcher follows it again."""
    import shutil

    from flow.errors import ConfigError

    monkeypatch.setattr("app.watch._Notifications", FakeNotifications)
    FakeNotifications.started = []
    rec = Recorder(monkeypatch)
    src = project.sources[0].path
    images = Path(src)
    with Watcher(project, settle=0, clock=lambda: 0.0) as w:
        assert w.poll() == "built"
        assert FakeNotifications.started == [{src}]

        for f in images.iterdir():
            f.unlink()
        FakeNotifications.last.arrive(src, files=["old0.png", "old1.png", "old2.png"])
        assert w.poll() == "built" and rec.builds[-1] == []

        images.rmdir()
        FakeNotifications.last.arrive(src, dirs=[""])
        with pytest.raises(ConfigError, match=str(src)):
            w.poll()
        with pytest.raises(ConfigError, match=str(src)):  # until it is back
            w.poll()
        # the first poll's full scan, the builds of the last two polls each trying
        # to scan the missing folder, and the last poll's own full scan
        assert rec.scans == 4

        images.mkdir()
        (images / "back.png").write_bytes(b"back")
        assert w.poll() == "built" and rec.builds[-1] == ["back.png"]
        assert FakeNotifications.started == [{src}, set(), {src}]  # followed again
        (images / "more.png").write_bytes(b"more")
        FakeNotifications.last.arrive(src, files=["more.png"])
        assert w.poll() == "built" and rec.builds[-1] == ["back.png", "more.png"]
        assert rec.scans == 5  # notified again: no full scan after the one that found it

        shutil.rmtree(images)  # only the files' events came (the rest are late)
        FakeNotifications.last.arrive(src, files=["back.png", "more.png"])
        with pytest.raises(ConfigError, match=str(src)):
            w.poll()


@pytest.mark.parametrize("notify", [False, True])
def test_an_empty_source_removed_is_reported(project, monkeypatch, notify):
    """Missing is not empty: a source folder emptied, built, then removed is a
    change too, whether scanned or notified."""
    from flow.errors import ConfigError

    monkeypatch.setattr("app.watch._Notifications", FakeNotifications)
    Recorder(monkeypatch)
    images = Path(project.sources[0].path)
    for f in images.iterdir():
        f.unlink()
    with Watcher(project, settle=0, clock=lambda: 0.0, notify=notify) as w:
        assert w.poll() == "built"
        images.rmdir()
        if notify:
            FakeNotifications.last.arrive(project.sources[0].path, dirs=[""])
        with pytest.raises(ConfigError, match=str(images)):
            w.poll()
