"""Process-level tests of flow's core (real Dask processes, kills, concurrency)."""
