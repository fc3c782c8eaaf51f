"""Progress a person can follow: bars not cut by log lines, a node's own reports
(epochs, loss, time left), heartbeat lines where no bar shows."""

from __future__ import annotations

import io
import sys

from engine.progress import Channel, Progress, StepProgress, task_sink


def test_log_lines_do_not_cut_through_the_bars(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    p = Progress(True)
    p.start("decoded", 10)
    p.update("decoded", 3)
    p.write("codes.index.1: fitting over 10 items", lambda m: print(m, file=sys.stderr))
    p.update("decoded", 7)
    p.close()
    out = err.getvalue()
    # the line stands alone: the bar was cleared before it and drawn again after
    before, line, _ = out.partition("codes.index.1: fitting over 10 items")
    assert line and before.endswith("\r"), repr(out)
    assert "decoded: 100%" in out


def test_a_fit_bar_shows_epochs_loss_and_time_left(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    p = Progress(True)
    p.start("embedder", 1, unit="fit")
    p.report(StepProgress("embedder", 3, 40, {"loss": 0.4125}))
    assert p.bars["embedder"].total == 40 and p.bars["embedder"].n == 3
    p.finish("embedder")
    p.close()
    out = err.getvalue()
    assert "3/40" in out and "loss=0.4125" in out and "epoch" in out


def test_heartbeat_lines_where_no_bar_shows():
    lines: list[str] = []
    p = Progress(None, lines.append, heartbeat=0.0001)
    p.terminal = False
    p.start("decoded", 100)
    p.start("normalized", 100)
    p.start("embedder", 1, unit="fit")
    p.update("decoded", 25)
    p.update("normalized", 25)
    p.report(StepProgress("embedder", 10, 80, {"loss": 0.5}))
    line = p.heartbeat()
    assert "decoded: 25/100 items" in line and "about" in line and "left" in line
    assert "embedder: 10/80 epochs, loss 0.5" in line
    assert not p.bars


def test_reports_from_a_thread_of_the_build_and_the_interrupt():
    ch = Channel()
    try:
        sink = task_sink(ch.name, "embedder")
        assert sink is not None
        sink(1, 5, {"loss": 1.0})
        assert ch.drain() == [StepProgress("embedder", 1, 5, {"loss": 1.0})]
        ch.cancelled = True  # the build was interrupted: the next report stops the fit
        try:
            sink(2, 5, {})
        except KeyboardInterrupt:
            pass
        else:
            raise AssertionError("a report after an interrupt must raise")
    finally:
        ch.close()
    assert task_sink(ch.name, "embedder") is None  # closed, and not in a Dask worker
