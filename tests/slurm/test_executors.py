"""Workers started as Slurm jobs (dask-jobqueue) pass the executor conformance
suite (engine.testing.ExecutorTests), on a real single-node Slurm."""

from __future__ import annotations

import pytest

from engine.cluster import cluster_config, cluster_executor
from engine.testing import ExecutorTests

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


class TestSlurmJobs(ExecutorTests):
    @pytest.fixture(scope="class")
    def executor(self, slurm, tmp_path_factory):
        cfg = cluster_config(
            {
                "partition": "flow",
                "cores": 1,
                "memory": "1GB",
                "walltime": "00:10:00",
                "jobs": 2,
                "start_timeout": 120,
            },
            root=tmp_path_factory.mktemp("slurm-conformance"),
        )
        with cluster_executor(cfg, "slurm") as ex:
            ex.client.wait_for_workers(2, timeout=120)
            yield ex
        assert slurm.queue() == []  # every job released
