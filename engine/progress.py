"""Progress of a build: a bar per step in a terminal, a heartbeat line elsewhere.

* In a terminal, one tqdm bar per step on stderr.  The build's log lines are
  written through tqdm (:meth:`Progress.write`), so they never cut through a bar.
* Not in a terminal (a log file, a CI job, a Slurm output), one line every
  :data:`HEARTBEAT` seconds says what runs, how far it is and the time left.
* A node's own reports (:func:`flow.progress`: a fit's epochs and loss) reach
  the bars through a :class:`Channel`: directly from a thread of the building
  process, or as a Dask event on the channel's topic from a worker anywhere
  (:func:`task_sink`).  The builder drains the channel while it waits.

``Progress(False)`` shows nothing; ``Progress(None)`` (the default) bars when
stderr is a terminal, heartbeat lines when it is not.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from queue import Empty, SimpleQueue
from typing import Any

__all__ = ["HEARTBEAT", "Channel", "Progress", "StepProgress", "task_sink"]

#: seconds between heartbeat lines when stderr is not a terminal
HEARTBEAT = float(os.environ.get("FLOW_HEARTBEAT", "10"))


@dataclass(frozen=True)
class StepProgress:
    """A node's report: ``done`` of ``total`` units of ``step``, with named numbers."""

    step: str
    done: int
    total: int
    info: dict = field(default_factory=dict)


# --------------------------------------------------------------------------
# from tasks to the building process

_CHANNELS: dict[str, Channel] = {}
_COUNTER = itertools.count()


class Channel:
    """Where the tasks of one build send their nodes' reports.

    ``cancelled``: the build was interrupted; a node's next report raises
    ``KeyboardInterrupt`` in the threads of this process, so a fit stops there.
    """

    def __init__(self) -> None:
        self.name = f"flow-progress-{os.getpid()}-{next(_COUNTER)}-{time.time_ns()}"
        self.queue: SimpleQueue[StepProgress] = SimpleQueue()
        self.cancelled = False
        _CHANNELS[self.name] = self

    def put(self, report: StepProgress) -> None:
        self.queue.put(report)

    def on_event(self, event: Any) -> None:
        """A Dask event on this channel's topic: ``(time, message)``."""
        msg = event[1] if isinstance(event, tuple | list) and len(event) == 2 else event
        with contextlib.suppress(KeyError, TypeError, ValueError):
            self.put(StepProgress(msg["step"], int(msg["done"]), int(msg["total"]), msg["info"]))

    def drain(self) -> list[StepProgress]:
        out = []
        while True:
            try:
                out.append(self.queue.get_nowait())
            except Empty:
                return out

    def close(self) -> None:
        _CHANNELS.pop(self.name, None)


def task_sink(channel: str, step: str) -> Callable[[int, int, dict], None] | None:
    """Where :func:`flow.progress` reports of ``step`` go, inside a task of the build
    whose channel is ``channel``: that channel (a thread of the building process),
    a Dask event (a worker process), or nowhere."""
    if not channel:
        return None
    ch = _CHANNELS.get(channel)
    if ch is not None:

        def local(done: int, total: int, info: dict) -> None:
            if ch.cancelled:
                raise KeyboardInterrupt
            ch.put(StepProgress(step, done, total, info))

        return local
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return None
    last = [0.0]

    def remote(done: int, total: int, info: dict) -> None:
        now = time.monotonic()
        if done < total and now - last[0] < 0.5:
            return  # at most two events a second
        last[0] = now
        worker.log_event(channel, {"step": step, "done": done, "total": total, "info": info})

    return remote


# --------------------------------------------------------------------------
# showing it


@dataclass
class _Step:
    total: int
    unit: str
    started: float
    done: int = 0
    info: dict = field(default_factory=dict)
    finished: bool = False


class Progress:
    """One progress bar per step (tqdm, on stderr), or heartbeat lines (see the module doc).

    ``log``: where heartbeat lines go (the build's log); none, no heartbeat."""

    def __init__(
        self,
        enabled: bool | None,
        log: Callable[[str], None] | None = None,
        heartbeat: float | None = None,
    ):
        heartbeat = HEARTBEAT if heartbeat is None else heartbeat
        self.enabled = enabled
        self.bars: dict[str, Any] = {}
        self.steps: dict[str, _Step] = {}
        self.terminal = enabled if enabled is not None else _isatty()
        self._log = log
        self._beat = heartbeat if (enabled is None and not self.terminal and log) else 0.0
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def start(self, name: str, total: int, unit: str = "item") -> None:
        self.steps[name] = _Step(total, unit, time.monotonic())
        if not self.terminal:
            return
        from tqdm.auto import tqdm

        self.bars[name] = tqdm(
            total=total,
            desc=f"{name:>14}",
            unit=unit,
            leave=True,
            file=sys.stderr,
            dynamic_ncols=True,
        )

    def update(self, name: str, n: int) -> None:
        st = self.steps.get(name)
        if st is not None:
            st.done += n
        bar = self.bars.get(name)
        if bar is not None:
            bar.update(n)

    def report(self, r: StepProgress) -> None:
        """A node's own report: its units (epochs) replace the step's one "fit"."""
        st = self.steps.get(r.step)
        if st is None or st.finished:
            return
        if st.unit == "fit":
            st.unit, st.started = "epoch", time.monotonic()
        st.total, st.done, st.info = max(r.total, 1), r.done, dict(r.info)
        bar = self.bars.get(r.step)
        if bar is not None:
            if bar.unit != "epoch":
                bar.reset(total=st.total)
                bar.unit = "epoch"
            bar.total = st.total
            bar.update(r.done - bar.n)
            if r.info:
                bar.set_postfix({k: _short(v) for k, v in r.info.items()}, refresh=True)

    def finish(self, name: str) -> None:
        """The step is done (a fit's bar full, whatever its units)."""
        st = self.steps.get(name)
        if st is not None:
            st.done, st.finished = st.total, True
        bar = self.bars.get(name)
        if bar is not None:
            bar.update(bar.total - bar.n)

    def write(self, msg: str, log: Callable[[str], None] | None) -> None:
        """``log(msg)`` without cutting through the bars."""
        if log is None:
            return
        if not self.bars:
            log(msg)
            return
        from tqdm.auto import tqdm

        with self._lock, tqdm.external_write_mode(file=sys.stderr):
            log(msg)

    def tick(self) -> None:
        """Where no bars show: one line every ``heartbeat`` seconds (what runs, how
        far, the time left)."""
        if not self._beat or self._log is None:
            return
        now = time.monotonic()
        if now - self._last < self._beat:
            return
        self._last = now
        line = self.heartbeat(now)
        if line:
            self._log(line)

    def heartbeat(self, now: float | None = None) -> str:
        """What runs now, in one line (steps with the same progress grouped)."""
        now = time.monotonic() if now is None else now
        groups: dict[tuple, list[str]] = {}
        for name, st in self.steps.items():
            if st.finished or (st.done >= st.total and st.unit != "fit"):
                continue
            groups.setdefault((st.done, st.total, st.unit, st.started), []).append(name)
        parts = []
        for (done, total, unit, started), names in groups.items():
            st = self.steps[names[0]]
            elapsed = now - started
            if unit == "fit":
                parts.append(f"{', '.join(names)}: fitting, {_duration(elapsed)} so far")
                continue
            text = f"{', '.join(names)}: {done}/{total} {unit}s"
            text += "".join(f", {k} {_short(v)}" for k, v in st.info.items())
            if done:
                text += f", about {_duration(elapsed * (total - done) / done)} left"
            parts.append(text)
        return ("working: " + "; ".join(parts)) if parts else ""

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()
        self.steps.clear()


def _isatty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _duration(s: float) -> str:
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"
