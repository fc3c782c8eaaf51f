"""The application: a project's file, the medical pipeline wired into targets,
the workspace (build, status, query, evaluate), watching, and the demo data.

>>> from app import Workspace  # doctest: +SKIP
>>> ws = Workspace.open("flow.toml")  # doctest: +SKIP

Submodules are imported where used (``flow query`` must not pay for the
build machinery), so ``Workspace`` here is resolved on first access.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Workspace"]


def __getattr__(name: str) -> Any:
    if name == "Workspace":
        from app.workspace import Workspace

        return Workspace
    raise AttributeError(f"module 'app' has no attribute {name!r}")
