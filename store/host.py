"""Which machine this is: recorded in every manifest and ref entry."""

from __future__ import annotations

import os

__all__ = ["hostname"]


def hostname() -> str:
    """This machine's name (``socket.gethostname()``; read from ``uname`` where
    there is one, which a no-op build can do without importing socket)."""
    if hasattr(os, "uname"):
        return os.uname().nodename
    import socket

    return socket.gethostname()
