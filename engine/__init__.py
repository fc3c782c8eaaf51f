"""The engine: runs a plan into the store.

Executors (sync, threads, a local or remote Dask cluster, Slurm), the builder
that plans and submits work in waves, the worker functions that run inside a
task, and the scanner that turns source folders into keyed items.  See
ARCHITECTURE.md for where it sits between the core and the application.
"""
