"""One lock for the fit nodes that change process-wide thread pools.

torch's thread count and deterministic mode, and the BLAS/OpenMP pools that
``threadpoolctl`` limits, belong to the whole process: when two fits run in
threads of one process (the ``threads`` executor, or a small build that runs
in-process), one restoring its settings would change the other's mid-way and
with it the last bits of its result.  Every such fit holds this lock while its
settings are in force, so fits in one process run one at a time; in separate
worker processes it costs nothing.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

POOLS = threading.RLock()


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """BLAS and OpenMP pools limited to one thread, holding :data:`POOLS`."""
    from threadpoolctl import threadpool_limits

    with POOLS, threadpool_limits(limits=1):
        yield
