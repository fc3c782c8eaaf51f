"""The Dask executors pass the conformance suite (engine.testing.ExecutorTests):
a local ``dask.distributed`` cluster (the default ``local``), and an existing
scheduler reached by its address (a real scheduler and workers on loopback)."""

from __future__ import annotations

import pytest

from engine.executors import DaskExecutor
from engine.testing import ExecutorTests

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


class TestLocalCluster(ExecutorTests):
    @pytest.fixture(scope="class")
    def executor(self):
        with DaskExecutor(None, 2) as ex:
            yield ex


class TestSchedulerAddress(ExecutorTests):
    @pytest.fixture(scope="class")
    def executor(self, dask_scheduler, tmp_path_factory):
        from tests.processes import Cluster, Processes

        address, _ = dask_scheduler
        procs = Processes(tmp_path_factory.mktemp("workers"))
        with DaskExecutor(address) as ex:
            workers = Cluster(address, procs, ex.client)
            try:
                workers.add_worker("a")
                workers.add_worker("b")
                workers.wait_for_workers(2)
                yield ex
            finally:
                workers.stop_workers()
                procs.close()
