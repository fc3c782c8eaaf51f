"""Errors flow raises or records, each naming the input and the reason."""

from __future__ import annotations


class FlowError(Exception):
    """Base class of flow's own errors (shown to users without a traceback)."""


class ItemError(FlowError):
    """A node cannot process one item, for a reason that is the item's fault.

    Raise it from a node for bad input (a DICOM without pixel data, a
    truncated PNG); the item is recorded as failed with ``reason`` and the
    build goes on.  Any other exception is recorded too, with its traceback,
    as a failure of the node's code.
    """

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class ConfigError(FlowError):
    """The project configuration is wrong (names the file, key and reason)."""


class StoreError(FlowError):
    """The store is unreachable, corrupt, or refused a write."""


class CorruptObject(StoreError):
    """A stored object failed its checksum; it is treated as missing."""


class BuildFailed(FlowError):
    """A build finished with failed items (listed in ``failures``)."""

    def __init__(self, message: str, failures: list | None = None):
        super().__init__(message)
        self.failures = failures or []
