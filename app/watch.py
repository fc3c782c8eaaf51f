"""What ``flow watch`` runs: follow the sources, build once the changes have settled.

>>> with Watcher(project, settle=10) as w:  # doctest: +SKIP
...     while True:
...         built = w.poll()                 # a Built when it built, else None
...         time.sleep(5)

**Finding changes.**  The first poll scans every source (one ``stat`` per
file).  After that, where the operating system notifies file changes
(inotify on Linux, FSEvents on macOS, ReadDirectoryChangesW on Windows, through
the ``watchdog`` library), a poll re-reads only what it was told changed: the
files named in the notifications (:func:`engine.scan.stat_file`) and, for
folders created, moved or removed, those sub-trees (``scan_folder(under=)``).
A poll with no notification costs nothing, however large the archive.  A full
scan still runs every ``rescan`` seconds (default 300) as a safety net:
notifications can be lost (an overflowing kernel queue) and are not sent for
changes seen through a symbolic link or made on another host of a network
file system.  Without notifications (``notify=False``, ``flow watch --poll``,
or where they cannot start) every poll is a full scan.  Either way the result
is what a full scan would list, the same filters included.

**A source folder that goes away** (unmounted, removed) is a change of its
own, not an empty folder: the build after it says which folder is missing, as
``flow build`` would, and until it is back every poll is a full scan (its
notifications went with it).

**Settling.**  A file counts as settled when its size and mtime held still for
``settle`` seconds, so a half-copied file waits; the first poll builds at once
(catching up with what changed while nobody watched).

**Sharing between builds.**  A watcher is a long-lived process, so its builds
share what a cold ``flow build`` must read again: a build starts from the
poll's own scan, and the item catalogs stay loaded from build to build,
brought up to date with the store's listing at the start of each
(:func:`store.catalog.refresh_catalog`: packs other writers published are
added, collected ones dropped), instead of being read from and written back to
their cache files every time.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

from engine.scan import paused_gc, scan_folder, stat_file
from flow.errors import ConfigError

_MISSING = (-1, -1)  # the snapshot's entry for a source folder that is not there


class _Notifications:
    """The files and folders changed under each source root since the last
    :meth:`take`, as the operating system reports them (``watchdog``)."""

    def __init__(self, roots: dict[Any, str]):
        from watchdog import events as ev
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer

        # what changes the files: not reads (a build reads every new image), which
        # the kernel then does not even report, nor a folder's own mtime (its
        # entries' events say what changed); watchdog delivers nothing else
        wanted = [
            ev.FileCreatedEvent,
            ev.FileDeletedEvent,
            ev.FileModifiedEvent,
            ev.FileMovedEvent,
            ev.FileClosedEvent,
            ev.DirCreatedEvent,
            ev.DirDeletedEvent,
            ev.DirMovedEvent,
        ]

        self._lock = threading.Lock()
        self._changed: dict[Any, tuple[set[str], set[str]]] = {}
        outer = self

        class Handler(FileSystemEventHandler):
            def __init__(self, key: Any, real: str):
                self.key, self.real = key, real

            def on_any_event(self, event: Any) -> None:
                paths = [event.src_path]
                if getattr(event, "dest_path", ""):
                    paths.append(event.dest_path)
                for p in paths:
                    p = os.fsdecode(p)
                    rel = os.path.relpath(p, self.real).replace(os.sep, "/")
                    if rel == ".." or rel.startswith("../"):
                        continue
                    outer._note(self.key, rel, event.is_directory)

        self._observer = Observer()
        for key, real in roots.items():
            self._observer.schedule(Handler(key, real), real, recursive=True, event_filter=wanted)
        self._observer.daemon = True
        self._observer.start()

    def _note(self, key: Any, rel: str, is_dir: bool) -> None:
        with self._lock:
            files, dirs = self._changed.setdefault(key, (set(), set()))
            (dirs if is_dir else files).add("" if rel == "." else rel)

    def take(self) -> dict[Any, tuple[set[str], set[str]]]:
        """(files, folders) changed per root since the last call, relative paths."""
        with self._lock:
            changed, self._changed = self._changed, {}
        return changed

    def close(self) -> None:
        self._observer.stop()
        self._observer.join(timeout=5)


def _labels_stats(project: Any) -> tuple:
    """(size, mtime) of every labels CSV: a changed CSV changes the items' labels."""
    out = []
    for src in project.sources:
        if src.labels is None:
            out.append(None)
            continue
        try:
            st = os.stat(src.labels)
            out.append((st.st_size, st.st_mtime_ns))
        except OSError:
            out.append(None)
    return tuple(out)


def only_sources(project: Any, folders: list[str] | tuple[str, ...]) -> None:
    """Keep only the project's sources at ``folders`` (each must be one of them:
    a :class:`ConfigError` names those that are not)."""
    wanted = {os.path.realpath(f) for f in folders}
    have = {os.path.realpath(s.path) for s in project.sources}
    missing = wanted - have
    if missing:
        raise ConfigError(f"{', '.join(sorted(missing))} is not a source of {project.file}")
    project.sources = [s for s in project.sources if os.path.realpath(s.path) in wanted]


class Watcher:
    """Follows a project's sources and builds ``all`` targets when they settle."""

    def __init__(
        self,
        project: Any,
        *,
        settle: float = 10.0,
        scheduler: str | None = None,
        log: Callable[[str], None] | None = None,
        warn: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        notify: bool = True,
        rescan: float = 300.0,
    ):
        """``log``: the builds' progress lines; ``warn``: what the operator should
        know (notifications unavailable)."""
        self.project = project
        self.settle = settle
        self.scheduler = scheduler
        self.log = log or (lambda msg: None)
        self.warn = warn or self.log
        self.clock = clock
        self.notify = notify  # use the OS's file notifications where they start
        self.rescan = rescan  # seconds between full scans when notified
        self._notes: _Notifications | None = None
        self._noted: set[str] = set()  # the source folders notifications follow
        self._full_at: float | None = None  # when the last full scan ran
        self._built: dict | None = None  # the snapshot the last build saw
        self._seen: dict[str, tuple[int, int]] = {}
        self._scans: dict = {}  # the last poll's scans (by source path)
        self._changed_at: dict[str, float] = {}
        # item catalogs kept from build to build (refreshed from the store's
        # listing by each build): no cache file read or rewritten per build
        self._catalogs: dict = {}
        # one build at a time: the watcher's own, or one handed over by a
        # `flow build` (app.handoff)
        self.lock = threading.RLock()
        self._scanned: tuple | None = None  # (scans, labels files' stats, Project.items)
        self._last_ws: tuple | None = None

    # -- finding changes --------------------------------------------------------------

    def _start_notifications(self, present: set[str]) -> None:
        if self._notes is not None:
            self._notes.close()
            self._notes = None
        roots = {path: os.path.realpath(path) for path in present}
        try:
            self._notes = _Notifications(roots)
            self._noted = present
        except Exception as e:  # no watchdog, or the OS refused (inotify watch limit)
            self.notify = False
            self.warn(f"file notifications unavailable ({type(e).__name__}: {e}); polling")

    def _full_scan(self) -> dict:
        from flow.errors import ConfigError

        if self.notify:
            # a folder removed takes its notifications with it, and one mounted
            # later has none yet: follow the folders there now, before the scan
            # (nothing falls between)
            present = {s.path for s in self.project.sources if os.path.isdir(s.path)}
            if self._notes is None or present != self._noted:
                self._start_notifications(present)
            else:
                self._notes.take()  # the scan sees all of that
        scans = {}
        for src in self.project.sources:
            try:
                scans[src.path] = self.project.scan(src)
            except ConfigError:  # not there (yet): left out, it may be mounted later
                continue
        return scans

    def _rescanned(self, changes: dict) -> dict:
        """The last scans with the notified files and folders read again."""
        scans = dict(self._scans)
        for src in self.project.sources:
            files, dirs = changes.get(src.path, ((), ()))
            if src.path not in scans or not (files or dirs):
                continue
            if not os.path.isdir(src.path):  # the source folder went away
                del scans[src.path]  # as a full scan (its last events may be late)
                continue
            pattern = (src.include, src.exclude, src.extensionless)
            content = {"by_content": src.by_content}
            rels, stats = scans[src.path]
            now = dict(zip(rels, stats))
            try:
                for d in dirs:
                    if not d:  # the root itself: everything
                        now = dict(zip(*scan_folder(src.path, *pattern, **content)))
                        continue
                    inside = d + "/"
                    for rel in [r for r in now if r.startswith(inside)]:
                        del now[rel]
                    now.update(zip(*scan_folder(src.path, *pattern, under=d, **content)))
            except FileNotFoundError:  # the source folder went away: as a full scan
                del scans[src.path]
                continue
            for rel in files:
                st = stat_file(src.path, rel, *pattern, **content)
                if st is None:
                    now.pop(rel, None)
                else:
                    now[rel] = st
            order = sorted(now)
            scans[src.path] = (order, [now[r] for r in order])
        return scans

    def _scan(self) -> tuple[dict, dict[str, tuple[int, int]]]:
        """(scans by source path, {file: (size, mtime_ns)})."""
        now = self.clock()
        with paused_gc():
            notified = (
                self._notes is not None
                and self._full_at is not None
                and now - self._full_at < self.rescan
                # a source folder missing: full scans until it is back
                and len(self._scans) == len(self.project.sources)
            )
            if notified:
                changes = self._notes.take()  # type: ignore[union-attr]
                if not changes:  # nothing happened: no system call at all
                    return self._scans, self._seen
                scans = self._rescanned(changes)
            else:
                scans = self._full_scan()
                self._full_at = now
            if scans == self._scans:  # the same names and stats: the same snapshot
                return scans, self._seen
            snap = {}
            for path, (rels, stats) in scans.items():
                base = f"{path}/"
                snap.update(zip([base + r for r in rels], [(st.size, st.mtime_ns) for st in stats]))
            for src in self.project.sources:
                if src.path not in scans:  # missing, not empty: a change of its own,
                    snap[f"{src.path}/"] = _MISSING  # which its build reports
        self._scans = scans
        return scans, snap

    @property
    def pending(self) -> bool:
        """Changes seen that no build has taken in yet."""
        return self._seen != self._built

    # -- polling -------------------------------------------------------------------------

    def _observe(self) -> tuple[dict, dict, float]:
        """Scan (or read the notifications) and note what changed when: (scans,
        snapshot, now)."""
        now = self.clock()
        scans, snap = self._scan()
        seen = self._seen
        if snap is not seen:
            for path, st in snap.items():
                if seen.get(path) != st:
                    self._changed_at[path] = now
            for path in seen.keys() - snap.keys():
                self._changed_at[path] = now
            self._seen = snap
        return scans, snap, now

    def poll(self) -> Any:
        """Look for changes; build if something changed and everything changed has
        settled (or nothing was built yet).  The :class:`app.workspace.Built`, or None."""
        from app.workspace import Workspace

        with self.lock:
            scans, snap, now = self._observe()
            calm = all(now - t >= self.settle for t in self._changed_at.values())
            if not (self.pending and (calm or self._built is None)):
                return None
            ws = Workspace(self.project, retrain=False, scans=scans)
            built = ws.build(
                "all",
                scheduler=self.scheduler,
                progress=False,
                log=self.log,
                catalogs=self._catalogs,
            )
            self._built = snap
            self._changed_at = {p: t for p, t in self._changed_at.items() if now - t < self.settle}
            return built

    def workspace(self) -> tuple[Any, dict]:
        """A workspace over the sources as they are now (what the notifications
        say changed is read again), with this watcher's warm catalogs, for a
        command handed over by ``flow build`` / ``flow status``; and the snapshot
        it saw, for :meth:`built`.  Call it holding :attr:`lock`."""
        from app.workspace import Workspace

        scans, snap, _ = self._observe()
        ws = Workspace(self.project, retrain=False, scans=scans)
        ws.catalogs = self._catalogs
        labels = _labels_stats(self.project)
        last = self._scanned
        if last is not None and (last[0] is scans or last[0] == scans) and last[1] == labels:
            ws.scanned = last[2]  # the same files and labels: the same items
        self._last_ws = (ws, scans, labels)
        return ws, snap

    def built(self, snap: dict) -> None:
        """A handed-over build took in ``snap``: nothing there is pending any more."""
        self._built = snap
        self.done_with_workspace()

    def done_with_workspace(self) -> None:
        """Remember what the last :meth:`workspace` scanned, for the next one."""
        if self._last_ws is not None:
            ws, scans, labels = self._last_ws
            if ws.scanned is not None:
                self._scanned = (scans, labels, ws.scanned)
            self._last_ws = None

    def close(self) -> None:
        """Stop listening for notifications."""
        if self._notes is not None:
            self._notes.close()
            self._notes = None

    def __enter__(self) -> Watcher:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
