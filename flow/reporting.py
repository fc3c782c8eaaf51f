"""Progress of a node's long work, as the node sees it: one function to call.

A set node that works for minutes (training a network for 80 epochs) says how far
it is, and the framework shows it -- a bar with the loss and the time left in a
terminal, a line every few seconds in a log::

    from flow import progress

    for epoch in range(epochs):
        ...
        progress(epoch + 1, epochs, loss=mean_loss)

Outside a build (a test, a notebook) the call does nothing.  Inside one, the
framework sets where reports go (:func:`reporting`): to the building process's
bars, from a thread of it or from a Dask worker anywhere.  The call may raise
``KeyboardInterrupt`` when the build was interrupted, so a long fit stops at its
next report instead of running to its end.

**Identity.** A statement that only calls ``progress(...)`` is not part of a
node's code fingerprint (:mod:`flow.node`): reporting cannot change what the
node returns, so adding or removing one changes no key.  Its arguments must not
change anything either (pass values the node computed anyway).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar

__all__ = ["progress", "reporting"]

#: where the reports of the running node go: ``sink(done, total, info)``
Sink = Callable[[int, int, dict], None]

_SINK: ContextVar[Sink | None] = ContextVar("flow_progress_sink", default=None)


def progress(done: int, total: int, **info: float | int | str) -> None:
    """Report that ``done`` of ``total`` units of work (epochs, ...) are finished,
    with a few named numbers (``loss=0.41``) to show beside the bar.

    >>> progress(3, 10, loss=0.5)  # outside a build: nothing happens
    """
    sink = _SINK.get()
    if sink is not None:
        sink(int(done), int(total), {k: _plain(v) for k, v in info.items()})


def _plain(v: object) -> float | str:
    """A number as a float (numpy's too), anything else as text."""
    if isinstance(v, str):
        return v
    try:
        return float(v)  # type: ignore[arg-type]  # numbers, numpy scalars
    except (TypeError, ValueError):
        return str(v)


@contextlib.contextmanager
def reporting(sink: Sink | None) -> Iterator[None]:
    """Within this block, :func:`progress` reports to ``sink`` (None: nowhere)."""
    token = _SINK.set(sink)
    try:
        yield
    finally:
        _SINK.reset(token)
