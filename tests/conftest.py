"""What every test folder shares.

* **Project files**: :func:`app.project.write_project` is the one way a test (or
  a benchmark) writes a ``flow.toml``; :func:`project_config` gives the small,
  fast configuration most end-to-end tests build (every target with tiny
  networks and vocabularies), with any table replaced or extended by keyword.
* **Shared data**: :func:`shared_data` finds ``../shared/data/...`` or skips
  the test with the reason (a user's own machine has no ``../shared``).
* **Processes**: the fixtures of :mod:`tests.processes` (a Dask scheduler and
  workers on loopback, build subprocesses to kill, a reference build), for the
  process-level suites (``distributed/``, ``faults/``, ``slurm/``).

Tests mirror the packages: ``flow/`` (the pure core), ``store/``, ``engine/``,
``nodes/``, ``app/``, ``cli/``; process-level suites are named for what they
exercise: ``distributed/`` (real Dask processes, TLS, S3), ``slurm/`` (a real
Slurm), ``faults/`` (kills, interrupts, corrupt and hostile input).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from app.project import write_project
from tests.processes import cluster, dask_scheduler, reference, spawn_build

__all__ = [
    "REPO",
    "SHARED",
    "TINY_TARGETS",
    "cluster",
    "dask_scheduler",
    "project_config",
    "reference",
    "shared_data",
    "spawn_build",
    "write_project",
]

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"

#: every target kind, with networks and vocabularies small enough for a test
TINY_TARGETS: dict[str, dict] = {
    "cnn": {"kind": "cnn", "normalize": {"size": 32}, "embedder": {"epochs": 2, "dim": 16}},
    "bovw": {
        "kind": "bovw",
        "normalize": {"size": 64},
        "descriptors": {"n_segments": 40, "patch": 12},
        "vocabulary": {"words": 16, "sample": 2000},
    },
    "codes": {"kind": "codes", "coder": {"bits": 16}},
}


def project_config(
    *,
    store: str | Mapping[str, Any] = "store",
    scheduler: str | None = "sync",
    sources: list[Mapping[str, Any]] | Mapping[str, Any] | None = None,
    targets: Mapping[str, Any] | tuple[str, ...] | None = None,
    **tables: Any,
) -> dict:
    """A flow.toml as a dict: a store folder, a ``sync`` build, one source
    (``images`` with ``labels.csv`` unless ``sources`` says otherwise) and the
    :data:`TINY_TARGETS` (all, or those named in a tuple).  Other tables
    (``train``, ``eval``, ``cluster``, ``build`` ...) are taken as given;
    ``scheduler=None`` leaves it unset."""
    config: dict[str, Any] = {
        "store": dict(store) if isinstance(store, Mapping) else {"url": store}
    }
    build = dict(tables.pop("build", {}))
    if scheduler is not None:
        build.setdefault("scheduler", scheduler)
    if build:
        config["build"] = build
    if sources is None:
        sources = [{"path": "images", "labels": "labels.csv"}]
    config["sources"] = [dict(sources)] if isinstance(sources, Mapping) else list(sources)
    if targets is None or isinstance(targets, tuple):
        names = targets or tuple(TINY_TARGETS)
        targets = {t: copy.deepcopy(TINY_TARGETS[t]) for t in names}
    config["targets"] = dict(targets)
    config.update(tables)
    return config


def shared_data(*parts: str) -> Path:
    """``../shared/data/<parts>``, or skip the test saying it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (the shared development data is not on this machine)")
    return path
