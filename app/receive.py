"""What ``flow receive`` runs: a DICOM Storage SCP that keeps the indices fresh.

>>> with Receiver(project) as r:             # doctest: +SKIP
...     r.start()                             # listening (pynetdicom, its own threads)
...     while True:
...         r.poll()                          # builds the studies that settled
...         time.sleep(0.2)

**Receiving.**  Modalities and PACS send instances with C-STORE to the AE title
and port of ``[receive]``; only the calling AE titles in ``allowed`` are
accepted (any, when it is empty).  Every storage SOP class is accepted in every
transfer syntax pynetdicom knows, compressed ones included.  Each instance is
written **durably before it is acknowledged**: to a hidden temporary file in its
study's folder, flushed and ``fsync``-ed, renamed into place
(``<folder>/<StudyInstanceUID>/<SOPInstanceUID>.dcm``), and the folder itself
``fsync``-ed -- so a success status means the instance survives a power cut, and
a crash mid-write leaves at most a hidden ``.tmp`` file that no scan lists.  A
failed write answers "out of resources" (0xA700): the sender keeps the instance
and sends it again.

**Re-sends.**  An instance whose file exists with the same bytes is a no-op (the
file is not touched, so nothing is rebuilt).  One with the same SOP Instance UID
and other bytes (rewritten tags) replaces it: same item id, new content key; the
build decodes it again and early cutoff stops there when the pixels are the same.

**Non-image objects** (structured reports, RT plans, presentation states, ...:
no pixel data) are accepted, stored under ``<folder>/.nonimage/`` (a hidden
folder: never an item) and reported, never indexed.

**Building.**  A study is built once it has *settled*: no instance for it arrived
for ``settle`` seconds, or -- sooner -- every association that sent to it was
released and half a second passed (a sender closes its association when the
study is sent).  A poll builds all settled studies at once (the watcher's build:
only the new items are computed; each index grows a segment) and logs, per
study, the time from its first instance received to its items being searchable
(the refs moved).  Studies still arriving wait for the next poll; the first
poll builds at once whatever is in the folder (catching up with instances
received while no build ran).  Between builds the folder is not scanned again:
the receiver knows what it wrote; a full scan every ``rescan`` seconds (300)
sees what was added or removed by hand.  The receive folder is a source of the project
(named ``received``), so ``flow build`` and ``flow status`` see the same items.

Item ids of received instances are keyed hashes of ``received/<study>/<sop>.dcm``
(:mod:`app.ids`): no UID reaches the store.
"""

from __future__ import annotations

import contextlib
import os
import re
import struct
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.scan import FileStat

__all__ = ["Receiver", "StudyTiming"]

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
NONIMAGE = ".nonimage"
_RELEASED_QUIET = 0.5  # seconds after the last association released
_PIXELS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # PixelData, Float-, DoubleFloatPixelData

# DIMSE statuses (PS3.4 Annex B)
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000


@dataclass
class _Study:
    first: float  # monotonic time of its first instance in this session
    last: float
    instances: int = 0
    assocs: set[int] = field(default_factory=set)  # associations that sent to it, still open
    files: dict[str, FileStat] = field(default_factory=dict)  # rel -> stat, not built yet
    first_wall: float = 0.0


@dataclass(frozen=True)
class StudyTiming:
    """One study made searchable: its tag (a keyed hash), instances, seconds from
    its first and from its last instance received to searchable."""

    tag: str
    instances: int
    from_first: float
    from_last: float


def _safe_uid(value: Any) -> str | None:
    v = str(value or "").strip().rstrip("\x00")
    return v if v and len(v) <= 64 and _UID.match(v) else None


# the file's data and size (fdatasync: no timestamps); its name is the folder's fsync
_sync = getattr(os, "fdatasync", os.fsync)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Receiver:
    """A Storage SCP over a project's ``[receive]`` folder (see the module doc)."""

    def __init__(
        self,
        project: Any,
        *,
        scheduler: str | None = None,
        build: bool = True,
        log: Callable[[str], None] | None = None,
        debug: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        if project.receive is None:
            from flow.errors import ConfigError

            raise ConfigError(
                f"{project.file or 'flow.toml'}: no [receive] table (folder, ae_title, port)"
            )
        self.project = project
        self.conf = project.receive
        self.folder = Path(self.conf.folder)
        self.scheduler = scheduler
        self.building = build
        self.log = log or (lambda msg: None)
        self.debug = debug or (lambda msg: None)
        self.clock = clock
        self._lock = threading.Lock()
        self._studies: dict[str, _Study] = {}
        self._scan: dict[str, FileStat] | None = None  # the folder as the next build sees it
        self._catalogs: dict = {}
        self._server: Any = None
        self._first = True
        self._scanned_at = 0.0
        self.rescan = 300.0  # seconds between full scans of the folder (a safety net)
        self.address: tuple[str, int] | None = None
        self.timings: list[StudyTiming] = []
        self.counts = {"stored": 0, "duplicate": 0, "replaced": 0, "nonimage": 0, "failed": 0}

    # -- the SCP ---------------------------------------------------------------------

    def start(self) -> tuple[str, int]:
        """Listen (in pynetdicom's threads); the (host, port) bound."""
        from pynetdicom import (
            AE,
            ALL_TRANSFER_SYNTAXES,
            AllStoragePresentationContexts,
            evt,
        )
        from pynetdicom.sop_class import Verification

        self.folder.mkdir(parents=True, exist_ok=True)
        ae = AE(ae_title=self.conf.ae_title)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        ae.require_called_aet = True
        if self.conf.allowed:
            ae.require_calling_aet = list(self.conf.allowed)
        ae.maximum_associations = 64
        # no PDU size limit of ours: senders use their largest PDUs (storescu: 64 KiB
        # and more instead of 16 KiB), four to eight times fewer PDUs to decode
        ae.maximum_pdu_size = 0
        handlers = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_RELEASED, self._on_closed),
            (evt.EVT_ABORTED, self._on_closed),
            (evt.EVT_CONN_CLOSE, self._on_closed),
        ]
        self._server = ae.start_server(
            (self.conf.host, self.conf.port), block=False, evt_handlers=handlers
        )
        self.address = self._server.server_address[:2]
        return self.address  # type: ignore[return-value]

    def stop(self) -> None:
        """Stop listening (associations in progress are ended)."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def __enter__(self) -> Receiver:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _on_closed(self, event: Any) -> None:
        aid = id(event.assoc)
        with self._lock:
            for st in self._studies.values():
                st.assocs.discard(aid)

    def _on_store(self, event: Any) -> int:
        try:
            raw = event.encoded_dataset(include_meta=True)
            study, image, sop_class = _header(event)
        except Exception as e:
            self.counts["failed"] += 1
            self.log(f"receive: an instance from {_peer(event)} could not be read ({e}); refused")
            return CANNOT_UNDERSTAND
        sop = _safe_uid(event.request.AffectedSOPInstanceUID)
        study = _safe_uid(study) or "unknown-study"
        if sop is None:
            from flow.keys import bytes_key

            sop = "x" + bytes_key(raw).hex()[:32]  # no usable UID: named by content
        where = Path(study) if image else Path(NONIMAGE) / study
        try:
            outcome = self._write(where, f"{sop}.dcm", raw)
        except OSError as e:
            self.counts["failed"] += 1
            self.log(f"receive: cannot store an instance ({e.strerror or e}); the sender retries")
            return OUT_OF_RESOURCES
        self.counts[outcome] += 1
        if not image:
            self.counts["nonimage"] += 1
            name = getattr(sop_class, "name", str(sop_class))
            self.log(f"receive: stored a {name} instance (no pixel data: kept, not indexed)")
            return SUCCESS
        if outcome == "duplicate":
            return SUCCESS
        rel = f"{study}/{sop}.dcm"
        st_ = os.stat(self.folder / rel)
        fst = FileStat(st_.st_size, st_.st_mtime_ns, st_.st_ino)
        now = self.clock()
        with self._lock:
            s = self._studies.get(study)
            if s is None:
                s = self._studies[study] = _Study(now, now, first_wall=time.time())
            s.last = now
            s.instances += 1
            s.assocs.add(id(event.assoc))
            s.files[rel] = fst
        return SUCCESS

    def _write(self, folder: Path, name: str, raw: bytes) -> str:
        """Store ``raw`` durably as ``folder/name``: stored, duplicate or replaced."""
        from flow.keys import bytes_key, file_key

        d = self.folder / folder
        final = d / name
        existed = final.exists()
        if existed:
            try:
                if file_key(str(final)) == bytes_key(raw):
                    return "duplicate"
            except OSError:
                pass
        new_dir = not d.is_dir()
        d.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=d, prefix=f".{name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(raw)
                fh.flush()
                _sync(fh.fileno())
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        _fsync_dir(d)
        if new_dir:
            _fsync_dir(d.parent)
            if d.parent != self.folder:
                _fsync_dir(self.folder)
        return "replaced" if existed else "stored"

    # -- building ----------------------------------------------------------------------

    def _settled(self, now: float) -> list[str]:
        settle = self.conf.settle
        quiet = min(settle, _RELEASED_QUIET)
        return [
            k
            for k, s in self._studies.items()
            if now - s.last >= settle or (not s.assocs and now - s.last >= quiet)
        ]

    @property
    def pending(self) -> int:
        """Studies received and not built yet."""
        with self._lock:
            return len(self._studies)

    def poll(self) -> Any:
        """Build the studies that settled (all of the folder at the first poll).
        The :class:`app.workspace.Built`, or None when nothing was due."""
        now = self.clock()
        with self._lock:
            ready = self._settled(now)
            if not ready and not self._first:
                return None
            if self._scan is not None and now - self._scanned_at >= self.rescan:
                self._scan = None  # files removed or added by hand: see them
            if self._scan is None:
                self._scanned_at = now
                rels, stats = self.project.scan(self.conf.source())
                unsettled = {r for s in self._studies.values() for r in s.files}
                self._scan = {r: st for r, st in zip(rels, stats) if r not in unsettled}
            studies = [(k, self._studies.pop(k)) for k in ready]
            for _, s in studies:
                self._scan.update(s.files)
            order = sorted(self._scan)
            scans = {self.conf.folder: (order, [self._scan[r] for r in order])}
        first, self._first = self._first, False
        if not self.building or (first and not order):
            return None  # nothing received yet: nothing to catch up with
        from app.workspace import Workspace

        ws = Workspace(self.project, scans=scans)
        built = ws.build(
            "all", scheduler=self.scheduler, progress=False, log=self.debug, catalogs=self._catalogs
        )
        done = self.clock()
        if built.incomplete:
            why = "; ".join(f"{t}: {w}" for t, w in built.incomplete.items())
            self.log(f"receive: {len(studies)} study(ies) built, but not searchable ({why})")
            return built
        scheme = ws.items()[2]["scheme"]
        tags = scheme.ids([f"received/{k}" for k, _ in studies])
        for (_, s), tag in zip(studies, tags):
            t = StudyTiming(tag[:12], s.instances, done - s.first, done - s.last)
            self.timings.append(t)
            self.log(
                f"study {t.tag}: {t.instances} instance(s) searchable {t.from_first:.2f} s "
                f"after the first was received ({t.from_last:.2f} s after the last)"
            )
        return built


def _header(event: Any) -> tuple[Any, bool, Any]:
    """(StudyInstanceUID, has pixel data, SOP class) of a C-STORE's dataset.

    Reads only the first elements of the dataset as sent (up to the Study Instance
    UID); pixel data is looked for as its tag's bytes (a false "yes" only makes
    the item's decode fail and be reported; a "no" is certain).  Deflated datasets
    are decoded whole."""
    import io

    from pydicom.filereader import read_dataset
    from pydicom.uid import UID

    req = event.request
    sop_class = UID(str(req.AffectedSOPClassUID or ""))
    ts = event.context.transfer_syntax
    if ts.is_deflated:
        ds = event.dataset
        return ds.get("StudyInstanceUID"), any(t in ds for t in _PIXELS), sop_class
    stream = req.DataSet.getvalue()
    ds = read_dataset(
        io.BytesIO(stream),
        ts.is_implicit_VR,
        ts.is_little_endian,
        stop_when=lambda tag, vr, length: tag > 0x0020000D,
    )
    order = "<" if ts.is_little_endian else ">"
    marks = [struct.pack(f"{order}HH", t >> 16, t & 0xFFFF) for t in _PIXELS]
    return ds.get("StudyInstanceUID"), any(m in stream for m in marks), sop_class


def _peer(event: Any) -> str:
    try:
        req = event.assoc.requestor
        return f"{req.ae_title} at {req.address}"
    except Exception:
        return "a peer"
