"""Ctrl-C and kill of a real ``flow build`` at any moment: one line, status 130,
nothing published lost, no ref moved to an index lacking items, and the next build
finishes the work.

The signals go to the build's whole process group, as a terminal's Ctrl-C does:
that is how they reach a local cluster's workers while it starts (a worker
killed during start-up once printed its traceback, the build fitted every index
over 0 items and moved the refs to them).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app.phantoms import write_phantom_study
from tests.conftest import REPO, project_config, write_project

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

N_ITEMS = 24
TARGETS = {
    # long enough training (a few seconds) for interrupts to land in it
    "cnn": {"kind": "cnn", "normalize": {"size": 32}, "embedder": {"epochs": 60, "dim": 16}},
    "bovw": {
        "kind": "bovw",
        "normalize": {"size": 64},
        "descriptors": {"n_segments": 40, "patch": 12},
        "vocabulary": {"words": 16, "sample": 2000},
    },
}


def _flow(root: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "FLOW_HEARTBEAT": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", "from cli.main import main; main()", "-p", str(root), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,  # its own process group, signalled as a terminal would
    )


def _refs(root: Path) -> dict[str, dict]:
    """Each target's current ref entry (read as the store lays them out)."""
    from store import open_store
    from store.refs import read_ref

    st = open_store(str(root / "store"))
    return {t: r for t in TARGETS if (r := read_ref(st, t)) is not None}


def _count(ref: dict) -> int:
    return sum(s["count"] for s in ref["value"]["segments"])


@pytest.fixture
def project(tmp_path) -> Path:
    write_phantom_study(tmp_path, n=N_ITEMS, size=64, seed=5)
    config = project_config(
        scheduler="local", targets=TARGETS, build={"workers": 2, "threads_below": 0}
    )
    write_project(tmp_path, config)
    return tmp_path


def _stop(proc: subprocess.Popen, sig: int, after: float) -> tuple[int, str, bool]:
    """Signal the build's process group ``after`` seconds in (unless it ended);
    returns (exit status, stderr, whether the signal was sent)."""
    deadline = time.monotonic() + after
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    sent = proc.poll() is None
    if sent:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        pytest.fail(f"flow build hangs {after:.1f} s after the signal:\n{err[-3000:]}")
    return proc.returncode, err, sent


def _check_refs(root: Path, before: dict[str, dict], err: str) -> None:
    """Every ref is unchanged or complete: never an index lacking items."""
    for t, ref in _refs(root).items():
        if before.get(t, {}).get("seq") == ref["seq"]:
            continue
        assert _count(ref) == N_ITEMS, f"ref {t} moved to {_count(ref)} items:\n{err}"


def test_sigint_at_any_moment_of_a_build(project):
    """SIGINT every 0.5 s into a build (cluster start-up, phases, training, index
    segments, ref moves), one build per moment, each continuing the last."""
    delays = [0.5 * i for i in range(1, 60)]
    interrupted = 0
    for delay in delays:
        before = _refs(project)
        code, err, sent = _stop(_flow(project, "build"), signal.SIGINT, delay)
        assert "Traceback" not in err, f"SIGINT at {delay} s:\n{err}"
        _check_refs(project, before, err)
        if code == 0 and not sent:
            break  # the build finished before the signal: the work is done
        assert code == 130, f"SIGINT at {delay} s -> {code}:\n{err}"
        assert err.rstrip().splitlines()[-1].startswith("interrupted: "), err
        interrupted += 1
    assert interrupted >= 4, "every build finished before its interrupt"
    proc = _flow(project, "build")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    refs = _refs(project)
    assert set(refs) == set(TARGETS) and all(_count(r) == N_ITEMS for r in refs.values()), err
    proc = _flow(project, "build")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "nothing stale" in out + err, out + err


def test_sigterm_of_a_build_exits_130_in_one_line(project):
    """``kill`` of the build (SIGTERM to its process) is an interrupt too."""
    proc = _flow(project, "build")
    time.sleep(4.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert err.rstrip().splitlines()[-1].startswith("interrupted: "), err
    _check_refs(project, {}, err)
