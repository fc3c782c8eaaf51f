"""A warm process: ``flow build`` and ``flow status`` handed to a running ``flow watch``.

A fresh ``flow`` process pays for its interpreter, its imports (numpy alone is a
tenth of a second), loading the project, scanning every source file and loading
every catalog -- before it finds that nothing is stale.  A ``flow watch`` of the
same project has all of that at hand: the file notifications say what changed
since its last scan, and its catalogs are in memory.  So the ``flow`` command,
before importing anything heavy, looks for a watcher of its project and, when
one answers, hands it the command line and relays what it prints:

* the watcher listens on a Unix socket named after the project file and the
  store override (``$XDG_RUNTIME_DIR/flow``, else ``/tmp/flow-<uid>``, mode
  0700: only this user can connect);
* the client sends its arguments, working directory, whether its stderr is a
  terminal and an identity of the installed code; a watcher running other code
  (flow was upgraded since it started) declines, and the command runs here;
* the watcher runs the command exactly as the command line would, on its own
  up-to-date view of the sources and its warm catalogs, one at a time and never
  beside a build of its own; output, progress bars and the exit status come
  back over the socket;
* Ctrl-C (or a kill) of the client closes the socket: the watcher stops the
  build at its next check, as a Ctrl-C would, and everything finished stays
  stored;
* when no watcher answers (none running, a stale socket, any error before the
  command started), the command runs in this process as always.
  ``FLOW_HANDOFF=0`` turns handing off off.

Two builders on one store are safe (the store's own guarantees), but a handed-off
build and the watcher's own are serialized anyway, so the watcher's view of what
it has built stays true.

This module imports only the standard library at the top: the client side runs
before anything else of flow is imported.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "BuildService",
    "code_identity",
    "command_of",
    "find_project_file",
    "socket_path",
    "try_handoff",
]

PROTOCOL = 1
HANDED = ("build", "status")  # commands a watcher can run
_GLOBAL_WITH_VALUE = {"-p", "--project", "--store"}
_FILENAME = "flow.toml"
_PACKAGES = ("flow", "store", "engine", "nodes", "app", "cli")


def find_project_file(project: str | None) -> str | None:
    """The project file the command means, as the command line finds it: ``-p``
    (a file or the folder holding ``flow.toml``), else ``flow.toml`` here or in
    the nearest folder above that has one.  None if there is none."""
    if project:
        p = Path(project)
        p = p / _FILENAME if p.is_dir() else p
        return os.path.realpath(p) if p.is_file() else None
    here = Path.cwd()
    for folder in (here, *here.parents):
        if (folder / _FILENAME).is_file():
            return os.path.realpath(folder / _FILENAME)
    return None


def _runtime_dir() -> Path:
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and os.path.isdir(base):
        return Path(base) / "flow"
    return Path("/tmp") / f"flow-{os.getuid()}"


def socket_path(project_file: str, store: str | None = None) -> Path:
    """Where a watcher of ``project_file`` (with ``--store`` ``store``) listens."""
    digest = hashlib.blake2b(
        f"{os.path.realpath(project_file)}\0{store or ''}".encode(), digest_size=12
    ).hexdigest()
    return _runtime_dir() / f"{digest}.sock"


def code_identity() -> str:
    """The installed flow: where its packages are and their files' sizes and times.
    A watcher started before an upgrade has another identity and declines."""
    here = Path(__file__).resolve().parents[1]
    h = hashlib.blake2b(digest_size=12)
    h.update(str(here).encode())
    for pkg in _PACKAGES:
        with contextlib.suppress(OSError):
            for entry in sorted(os.scandir(here / pkg), key=lambda e: e.name):
                if entry.name.endswith(".py"):
                    st = entry.stat()
                    h.update(f"{pkg}/{entry.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _parse(argv: list[str]) -> tuple[str | None, str | None, str | None]:
    """(command, --project, --store) from a command line, without click."""
    project = os.environ.get("FLOW_PROJECT")
    store = os.environ.get("FLOW_STORE")
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in _GLOBAL_WITH_VALUE and i + 1 < len(argv):
            if a == "--store":
                store = argv[i + 1]
            else:
                project = argv[i + 1]
            i += 2
            continue
        if a.startswith("--project="):
            project = a.split("=", 1)[1]
        elif a.startswith("--store="):
            store = a.split("=", 1)[1]
        elif not a.startswith("-"):
            return a, project, store
        i += 1
    return None, project, store


def command_of(argv: list[str]) -> str | None:
    """The command a ``flow`` command line runs (``build``, ``status`` ...)."""
    return _parse(argv)[0]


def _send(sock: socket.socket, doc: dict, lock: threading.Lock | None = None) -> None:
    data = (json.dumps(doc) + "\n").encode()
    if lock is None:
        sock.sendall(data)
    else:
        with lock:
            sock.sendall(data)


def try_handoff(argv: list[str], *, timeout: float = 0.5) -> int | None:
    """Run ``flow ARGV`` in a watcher of its project: the exit status, or None
    when none takes it (then the command runs here)."""
    if os.environ.get("FLOW_HANDOFF", "1") == "0":
        return None
    command, project, store = _parse(argv)
    if command not in HANDED or "-h" in argv or "--help" in argv:
        return None
    pfile = find_project_file(project)
    if pfile is None:
        return None
    path = socket_path(pfile, store)
    if not path.exists():
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(str(path))
        _send(
            sock,
            {
                "protocol": PROTOCOL,
                "code": code_identity(),
                "argv": argv,
                "cwd": os.getcwd(),
                "tty": sys.stderr.isatty(),
                "columns": _columns(),
            },
        )
        reader = sock.makefile("r", encoding="utf-8")
        first = reader.readline()
        sock.settimeout(None)  # the command runs as long as it runs
        if not first:
            return None
        doc = json.loads(first)
        if "decline" in doc:
            return None
    except (OSError, ValueError):
        sock.close()
        return None
    try:
        while doc is not None:
            if "out" in doc:
                sys.stdout.write(doc["out"])
                sys.stdout.flush()
            elif "err" in doc:
                sys.stderr.write(doc["err"])
                sys.stderr.flush()
            elif "exit" in doc:
                return int(doc["exit"])
            line = reader.readline()
            doc = json.loads(line) if line else None
        sys.stderr.write("error: the flow watch running the build went away; rerun to finish\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("interrupted: everything finished so far is stored; rerun to continue\n")
        return 130
    finally:
        sock.close()


def _columns() -> int:
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns
    except (OSError, ValueError):
        return 80


class _Relay:
    """A text stream that sends what is written to the client (stdout or stderr)."""

    def __init__(self, sock: socket.socket, lock: threading.Lock, kind: str, tty: bool, cols: int):
        self.sock, self.lock, self.kind, self.tty, self.cols = sock, lock, kind, tty, cols
        self.encoding = "utf-8"
        self.broken = False

    def write(self, text: str | bytes) -> int:
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        if text and not self.broken:
            try:
                _send(self.sock, {self.kind: text}, self.lock)
            except OSError:
                self.broken = True  # the client went away: the build is being stopped
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return self.tty

    def fileno(self) -> int:
        raise OSError("a relayed stream has no file descriptor")


Handler = Callable[[list[str], threading.Event], int]


class BuildService:
    """Listens for handed-off commands of one project and runs them with ``handler``
    (``handler(argv, cancel) -> exit status``; it prints to ``sys.stdout`` and
    ``sys.stderr``, which are the client's while it runs), one at a time."""

    def __init__(
        self,
        project_file: str,
        store: str | None,
        handler: Handler,
        *,
        log: Callable[[str], None] | None = None,
    ):
        self.path = socket_path(project_file, store)
        self.handler = handler
        self.log = log or (lambda msg: None)
        self.code = code_identity()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._run_lock = threading.Lock()

    def start(self) -> bool:
        """Listen; False (and nothing listens) if another live process already does."""
        folder = self.path.parent
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(folder, 0o700)
        if self.path.exists():
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.settimeout(0.5)
                probe.connect(str(self.path))
                _send(probe, {"protocol": PROTOCOL, "code": "", "argv": [], "probe": True})
                return False  # someone answers: leave it theirs
            except OSError:
                self.path.unlink(missing_ok=True)  # stale: its process is gone
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(self.path))
        sock.listen(8)
        sock.settimeout(0.5)
        self._sock = sock
        self._thread = threading.Thread(target=self._serve, name="flow-handoff", daemon=True)
        self._thread.start()
        return True

    def _serve(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        lock = threading.Lock()
        with conn:
            try:
                conn.settimeout(5.0)
                req = json.loads(conn.makefile("r", encoding="utf-8").readline() or "{}")
                conn.settimeout(None)
            except (OSError, ValueError):
                return
            if req.get("probe"):
                return
            if req.get("protocol") != PROTOCOL or req.get("code") != self.code:
                with contextlib.suppress(OSError):
                    _send(conn, {"decline": "this flow watch runs other code"}, lock)
                return
            cancel = threading.Event()
            with contextlib.suppress(OSError):
                _send(conn, {"accepted": True}, lock)
            threading.Thread(target=self._watch_client, args=(conn, cancel), daemon=True).start()
            tty, cols = bool(req.get("tty")), int(req.get("columns") or 80)
            out = _Relay(conn, lock, "out", tty, cols)
            err = _Relay(conn, lock, "err", tty, cols)
            with self._run_lock:
                self.log(f"handed over: flow {' '.join(req['argv'])}")
                old = sys.stdout, sys.stderr
                here = os.getcwd()
                sys.stdout, sys.stderr = out, err  # type: ignore[assignment]
                try:
                    # relative paths in the command line mean the client's folder
                    os.chdir(req.get("cwd") or here)
                    code = self.handler(list(req["argv"]), cancel)
                except SystemExit as e:
                    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                except BaseException as e:  # never take the watcher down with a command
                    err.write(f"error: {type(e).__name__}: {e}\n")
                    code = 1
                finally:
                    sys.stdout, sys.stderr = old
                    os.chdir(here)
            with contextlib.suppress(OSError):
                _send(conn, {"exit": code}, lock)

    @staticmethod
    def _watch_client(conn: socket.socket, cancel: threading.Event) -> None:
        """The client sends nothing after its request: end of stream means it is gone."""
        try:
            while conn.recv(64):
                pass
        except OSError:
            pass
        cancel.set()

    def close(self) -> None:
        self._stop.set()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self.path.unlink(missing_ok=True)
            self._sock = None
        if self._thread is not None:
            self._thread.join(timeout=2)

    def __enter__(self) -> BuildService:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
