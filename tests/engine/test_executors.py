"""Every in-process executor passes the conformance suite (engine.testing.ExecutorTests).

The Dask executors (a local cluster, an existing scheduler's address) pass it in
tests/distributed/test_executors.py, and Slurm jobs in tests/slurm/test_executors.py.
"""

from __future__ import annotations

import pytest

from engine.executors import LazyExecutor, SyncExecutor, ThreadExecutor, get_executor
from engine.testing import ExecutorTests


class TestSync(ExecutorTests):
    inline = True

    @pytest.fixture
    def executor(self):
        with SyncExecutor() as ex:
            yield ex


class TestThreads(ExecutorTests):
    @pytest.fixture(scope="class")
    def executor(self):
        with ThreadExecutor(2) as ex:
            yield ex


class TestLazyLocalFallingBackToThreads(ExecutorTests):
    """``local`` with little stale work runs in threads of this process (no cluster)."""

    @pytest.fixture(scope="class")
    def executor(self):
        from flow.plan import Plan

        ex = get_executor("local", 2, lazy=True, threads_below=10**9)
        assert isinstance(ex, LazyExecutor)
        ex.expect(Plan({}, []))  # no stale work at all: threads
        with ex:
            yield ex
            assert ex.name == "threads"


def test_unknown_scheduler_names_the_choices():
    from flow.errors import FlowError

    with pytest.raises(FlowError, match=r"unknown scheduler 'lcoal'.*sync, threads, local"):
        get_executor("lcoal")
