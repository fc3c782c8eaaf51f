"""Item ids: what names an item in the store, without naming a patient.

An item id reaches the store in many places: the item tables and index objects of
every target, the manifests of every pack (one entry per item), the keys of set
steps (:func:`flow.keys.items_key` hashes the ids of a fit's or an index's
items).  Until issue 13 an id was the file's path relative to its source, so a
folder named after a patient (``DOE^JOHN/``) was written into a dozen store
files.  Now an id is made by one of two **schemes**:

``keyed`` (the default for a new store)
    32 hex digits: BLAKE3 in keyed mode over the item's *name* (``<source
    name>/<path in the source>`` for a folder; ``<source name>/<study>/<series>/
    <instance UID>`` for a DICOMweb source), keyed with a 256-bit **salt** kept in
    the project folder, outside the store (``.flow/id-salt``, or ``[ids]
    salt_file``).  Without the salt an id cannot be tested against guessed
    names (a plain hash of ``DOE^JOHN/1.dcm`` could be), so the store alone says
    nothing about a patient; with the sources at hand, the project maps ids back
    to files (:class:`IdMap`, a cache in the project folder rebuilt by every
    scan), so ``flow query`` and build reports still show the file.
``path``
    the name itself (the old behaviour; an explicit choice, ``[ids] scheme =
    "path"``).

**What changing the scheme does to keys.**  Per-item work keys only on content
(a decode's key is its node's and its file's), so no image is decoded, embedded
or coded again.  But every set step keys the ids of its items: item tables and
index segments (and fits that are not pinned) get new keys and are rebuilt --
minutes of index building on a large archive, not hours of per-item work.

**Old stores keep their ids.**  Which scheme a store uses is recorded in the
store (the ref ``ids``: the scheme and a short digest of the salt, never the
salt).  A store with refs but no such record was built before issue 13 with path
ids: it keeps them (a no-op build stays a no-op, and nothing is written to it)
until ``[ids] scheme = "keyed"`` asks for the change.  A new store starts keyed.
A store whose record names a different salt than the project's (the salt file
lost, or another checkout's) is an error that says so, never a silent re-key.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flow.errors import ConfigError
from flow.keys import key

__all__ = ["SCHEMES", "IdScheme", "record_scheme", "resolve_scheme"]

SCHEMES = ("keyed", "path")
MARKER = "ids"  # the ref that records a store's scheme
DEFAULT_SALT = ".flow/id-salt"
_ID_BYTES = 16


@dataclass(frozen=True)
class IdScheme:
    """How item names become ids (see the module doc)."""

    scheme: str
    salt: bytes | None = None
    salt_file: Path | None = None
    recorded: bool = False  # the store records this scheme already

    def ids(self, names: list[str]) -> list[str]:
        """The ids of ``names`` (``<source>/<path>``, or a DICOMweb source's UIDs)."""
        if self.scheme == "path":
            return names
        from blake3 import blake3

        assert self.salt is not None
        salt = self.salt
        return [blake3(n.encode("utf-8", "surrogateescape"), key=salt).hexdigest(_ID_BYTES)
                for n in names]  # fmt: skip

    @property
    def digest(self) -> str:
        """A short, non-secret digest of the salt (what the store records)."""
        return key(("flow-id-salt", self.salt or b"")).hex()[:16]


def _read_salt(path: Path, create: bool) -> bytes | None:
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        if not create:
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        salt = secrets.token_bytes(32)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(salt.hex() + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)  # never replaces a salt another process just made
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
        return _read_salt(path, create=False)
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"id salt {path}: cannot read it ({e})") from None
    try:
        salt = bytes.fromhex(text)
    except ValueError:
        salt = b""
    if len(salt) != 32:
        raise ConfigError(f"id salt {path}: expected 64 hex digits (a 256-bit salt)")
    return salt


def resolve_scheme(project: Any, store: Any) -> IdScheme:
    """The id scheme of ``project`` over ``store`` (see the module doc).

    ``project.ids`` is the ``[ids]`` table: ``scheme`` (unset: what the store
    uses; keyed for a new one) and ``salt_file``."""
    from store.refs import list_refs, read_ref

    conf = project.ids or {}
    salt_file = Path(conf.get("salt_file") or (project.root / DEFAULT_SALT))
    where = f"{project.file or 'flow.toml'}: [ids]"
    marker = read_ref(store, MARKER) if store is not None else None
    recorded = (marker or {}).get("value", {})
    scheme = conf.get("scheme")
    if scheme is None:
        if recorded.get("scheme") in SCHEMES:
            scheme = recorded["scheme"]
        elif store is not None and any(r != MARKER for r in list_refs(store)):
            # built before ids were keyed: path ids stay until asked otherwise
            return IdScheme("path", recorded=False)
        else:
            scheme = "keyed"
    if scheme == "path":
        return IdScheme("path", recorded=recorded.get("scheme") == "path")
    same_scheme = recorded.get("scheme") == "keyed"
    salt = _read_salt(salt_file, create=not same_scheme)
    if salt is None:
        raise ConfigError(
            f"{where}: this store's item ids are keyed with a salt that is not here "
            f"({salt_file} is missing). Copy that file from the machine that built the "
            "store (or point [ids] salt_file at it). A new salt would give every item a "
            "new id: every index and item table rebuilt (no per-item work); to accept "
            "that, remove the store's ref 'ids' first"
        )
    s = IdScheme("keyed", salt, salt_file)
    if same_scheme and recorded.get("salt") != s.digest:
        raise ConfigError(
            f"{where}: this store's item ids were keyed with another salt than {salt_file} "
            f"(digest {recorded.get('salt')}, here {s.digest}). Use the salt file of the "
            "machine that built the store, or remove the store's ref 'ids' to re-key every "
            "index (no per-item work)"
        )
    return IdScheme("keyed", salt, salt_file, recorded=same_scheme)


def record_scheme(store: Any, scheme: IdScheme) -> None:
    """Record ``scheme`` in ``store`` (the ref ``ids``), unless it is recorded.

    A store built with path ids before issue 13 is left as it was (nothing
    recorded) while it keeps them."""
    from store.refs import list_refs, move_ref

    if scheme.recorded:
        return
    if scheme.scheme == "path" and any(r != MARKER for r in list_refs(store)):
        from store.refs import read_ref

        if read_ref(store, MARKER) is None:
            return  # an old store that keeps its path ids: written as it was
    value = {"scheme": scheme.scheme}
    if scheme.scheme == "keyed":
        value["salt"] = scheme.digest
    move_ref(store, MARKER, value, message=f"item ids: {scheme.scheme}")
