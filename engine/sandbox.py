"""Contained item calls: one item at a time in a child process, with a time and a memory limit.

A hostile file -- a crafted compressed frame that sends a decoder into a loop, a
deflated dataset that inflates to tens of gigabytes, a C library that crashes
on it -- must cost one item, never the build nor the worker that runs it.  The
steps that read a source file's bytes (``decode`` in the default pipeline; the
builder marks them, :class:`ChainStep.limits <engine.worker.ChainStep>`) run
each item through a :class:`Sandbox`:

* a **child process** per running task, started on first use and kept in a
  pool for the next tasks and builds (its start, ~0.25 s of imports, is paid
  once);
* the **time limit** is the parent's wait for the answer: past it the child is
  killed and the item fails with ``timed out after 30 s``;
* the **memory limit** is the child's address-space limit (``RLIMIT_AS``), set
  before each item to what the process maps then plus the limit, so it bounds
  what the item allocates itself; an allocation past it raises
  ``MemoryError`` and the item fails with ``exceeded 2 GiB``.  (Linux; where
  ``RLIMIT_AS`` is not enforced -- macOS -- only the time limit holds);
* a child that dies (a segfault, an abort in a codec) fails its item with the
  signal's name;
* after a timeout, a memory failure or a death the child is **replaced** (the
  next item starts a fresh one), never the build: the other items of the batch
  go on.

These failures are the input's (``bad_input``, as an :class:`flow.ItemError`):
the item is left out of the index and reported, and ``--retry-failed`` tries
it again.  Limits are execution hints: they are not part of any key.

What travels to the child: the node by name (``module:function``; by value
with cloudpickle where it is not importable), its parameters and the item's
arguments; back: the canonical output or the error record, both pickled over
a pipe (the bytes of a decoded 2k x 2k image cross in about 10 ms).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from typing import Any, NamedTuple

__all__ = ["Limits", "Sandbox", "borrowed", "format_size"]


class Limits(NamedTuple):
    """Per-item limits of a contained step: seconds (0: none), bytes (0: none)."""

    seconds: float = 30.0
    memory: int = 2 << 30

    @property
    def active(self) -> bool:
        return bool(self.seconds or self.memory)


class Call(NamedTuple):
    """Parent -> child: run ``node`` on one item."""

    node: str  # "module:name", or "" with ``pickled`` set
    pickled: bytes
    params: dict
    args: list
    batched: bool
    memory: int


class Answer(NamedTuple):
    """Child -> parent: the canonical output, or an error record (engine.worker._error)."""

    value: Any
    error: dict | None
    fatal: bool = False  # the child exits after this answer (memory exhausted)


def format_size(n: int) -> str:
    """``2147483648`` -> ``'2 GiB'``."""
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            v = n / size
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{n} B"


def _failure(kind: str, reason: str) -> dict:
    return {
        "type": kind,
        "reason": reason,
        "traceback": "",
        "bad_input": True,
        "transient": False,
    }


class Sandbox:
    """One child process that runs contained item calls (see the module doc)."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self._proc: subprocess.Popen | None = None
        self._send: Any = None
        self._recv: Any = None
        self.started = 0  # children started (tests count replacements)

    # -- the child ----------------------------------------------------------------

    def _start(self) -> None:
        from multiprocessing.connection import Connection

        p2c_r, p2c_w = os.pipe()
        c2p_r, c2p_w = os.pipe()
        env = dict(os.environ)
        # one thread: BLAS pools and malloc arenas would map address space per thread
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = "1"
        env.setdefault("MALLOC_ARENA_MAX", "2")
        code = (
            "import sys; sys.path[:0] = sys.argv[3:]; "
            "from engine.sandbox import _serve; _serve(int(sys.argv[1]), int(sys.argv[2]))"
        )
        paths = [p for p in sys.path if p]
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-c", code, str(p2c_r), str(c2p_w), *paths],
                pass_fds=(p2c_r, c2p_w),
                env=env,
                stdin=subprocess.DEVNULL,
                close_fds=True,
            )
        finally:
            os.close(p2c_r)
            os.close(c2p_w)
        self._send = Connection(p2c_w, readable=False)
        self._recv = Connection(c2p_r, writable=False)
        self.started += 1
        _LIVE.add(self)

    def close(self) -> None:
        """Stop the child (killed: it may be stuck in an item)."""
        proc, self._proc = self._proc, None
        for conn in (self._send, self._recv):
            if conn is not None:
                with contextlib.suppress(OSError):
                    conn.close()
        self._send = self._recv = None
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        _LIVE.discard(self)

    # -- one call -----------------------------------------------------------------

    def call(self, node: Any, params: dict, args: list, batched: bool) -> tuple[Any, dict | None]:
        """(canonical output, None) or (None, error record) for one item."""
        if self._proc is None or self._proc.poll() is not None:
            self.close()
            self._start()
        name, pickled = _node_ref(node)
        msg = Call(name, pickled, params, list(args), batched, self.limits.memory)
        try:
            self._send.send(msg)
        except (BrokenPipeError, OSError):
            return None, self._died()
        # the child says when the item starts: its own start and the node's import
        # (seconds, the first time) do not count against the item's time
        try:
            if not self._recv.poll(_START_TIMEOUT):
                self.close()
                return None, _failure("ItemCrash", "the process reading it did not start")
            ans: Answer = self._recv.recv()
        except (EOFError, OSError):
            return None, self._died()
        if not (isinstance(ans.value, str) and ans.value == _STARTED):
            return ans.value, ans.error  # the node could not be loaded
        timeout = self.limits.seconds or None
        try:
            ready = self._recv.poll(timeout)
        except (EOFError, OSError):
            ready = True
        if not ready:
            self.close()
            return None, _failure("ItemTimeout", f"timed out after {self.limits.seconds:g} s")
        try:
            ans = self._recv.recv()
        except (EOFError, OSError):
            return None, self._died()
        if ans.fatal:
            self.close()
        return ans.value, ans.error

    def _died(self) -> dict:
        proc = self._proc
        code = None
        if proc is not None:
            try:
                code = proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                code = None
        self.close()
        if code is not None and code < 0:
            try:
                sig = signal.Signals(-code).name
            except ValueError:
                sig = f"signal {-code}"
            why = f"the process reading it died ({sig})"
            if -code in (signal.SIGABRT, signal.SIGKILL) and self.limits.memory:
                why += f"; it may have exceeded {format_size(self.limits.memory)}"
            return _failure("ItemCrash", why)
        return _failure("ItemCrash", f"the process reading it exited (status {code})")


def _node_ref(node: Any) -> tuple[str, bytes]:
    """A node as the child finds it: by module and name, else by value."""
    cached = _REFS.get(id(node))
    if cached is not None and cached[0] is node:
        return cached[1]
    fn = getattr(node, "fn", None)
    mod, name = getattr(fn, "__module__", None), getattr(fn, "__name__", None)
    ref: tuple[str, bytes]
    try:
        import importlib

        found = getattr(importlib.import_module(mod), name) if mod and name else None
    except Exception:
        found = None
    if found is node:
        ref = (f"{mod}:{name}", b"")
    else:
        import cloudpickle

        ref = ("", cloudpickle.dumps(node))
    _REFS[id(node)] = (node, ref)
    return ref


_STARTED = "flow-sandbox: item started"
_START_TIMEOUT = 300.0  # seconds for a child to start and import a node
_REFS: dict[int, tuple[Any, tuple[str, bytes]]] = {}
_LIVE: set[Sandbox] = set()
_IDLE: list[Sandbox] = []
_POOL_LOCK = threading.Lock()


@contextlib.contextmanager
def borrowed(limits: Limits):
    """A sandbox for ``limits``, for the calling thread alone while inside.

    Sandboxes are kept in a process-wide pool between tasks and builds (a
    thread pool's threads come and go; their children must not pile up): at
    most one idle child per CPU is kept, the others are stopped."""
    with _POOL_LOCK:
        box = next((b for b in _IDLE if b.limits == limits), None)
        if box is not None:
            _IDLE.remove(box)
    if box is None:
        box = Sandbox(limits)
    try:
        yield box
    finally:
        with _POOL_LOCK:
            _IDLE.append(box)
            extra = _IDLE[: max(0, len(_IDLE) - (os.cpu_count() or 1))]
            del _IDLE[: len(extra)]
        for b in extra:
            b.close()


@atexit.register
def _close_all() -> None:
    for box in list(_LIVE):
        box.close()


# --------------------------------------------------------------------------
# inside the child


def _die_with_parent() -> None:
    """Exit when the parent process is gone, even in the middle of an item.

    A thread watches the parent's pid (``PR_SET_PDEATHSIG`` would fire when the
    parent *thread* that started this child ends -- a pool thread, between builds)."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(70)

    threading.Thread(target=watch, daemon=True, name="flow-sandbox-parent").start()


def _mapped() -> int | None:
    """Bytes of address space this process maps now (Linux), else None."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


def _limit_memory(extra: int) -> bool:
    try:
        import resource
    except ImportError:
        return False
    now = _mapped()
    if now is None:
        return False
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    soft = now + extra if extra else resource.RLIM_INFINITY
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    return True


def _serve(rfd: int, wfd: int) -> None:
    from multiprocessing.connection import Connection

    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    recv = Connection(rfd, writable=False)
    send = Connection(wfd, readable=False)
    nodes: dict[str, Any] = {}
    while True:
        try:
            msg: Call = recv.recv()
        except (EOFError, OSError):
            return
        ans = _run(msg, nodes, send)
        try:
            send.send(ans)
        except MemoryError:
            send.send(Answer(None, _memory_error(msg.memory), True))
        except (BrokenPipeError, OSError):
            return
        if ans.fatal:
            return


def _memory_error(memory: int) -> dict:
    return _failure("ItemMemory", f"exceeded {format_size(memory)}")


def _run(msg: Call, nodes: dict, send: Any) -> Answer:
    from engine.worker import _error
    from store.outputs import canonical_output

    try:
        node = nodes.get(msg.node) if msg.node else None
        if node is None:
            if msg.node:
                import importlib

                mod, _, name = msg.node.partition(":")
                node = nodes[msg.node] = getattr(importlib.import_module(mod), name)
            else:
                node = pickle.loads(msg.pickled)
    except Exception as e:
        return Answer(None, _error(e))
    send.send(Answer(_STARTED, None))
    limited = _limit_memory(msg.memory) if msg.memory else False
    try:
        out = node.fn(*msg.args, **msg.params)
        if msg.batched:
            out = out[0]
        value = canonical_output(out, node=node.name, allow_blobs=False)
        return Answer(value, None)
    except MemoryError:
        return Answer(None, _memory_error(msg.memory) if limited else _error(MemoryError()), True)
    except Exception as e:
        # a library may turn MemoryError into its own error: judge by the cause
        cause: BaseException | None = e
        while cause is not None:
            if isinstance(cause, MemoryError) and limited:
                return Answer(None, _memory_error(msg.memory), True)
            cause = cause.__cause__ or cause.__context__
        return Answer(None, _error(e))
    finally:
        if limited:
            _limit_memory(0)
