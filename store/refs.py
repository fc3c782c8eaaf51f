"""Named refs: targets point at the keys of their current index, with history.

A ref is a folder of immutable entries, ``refs/<name>/<seq>.json``; the entry
with the highest sequence number is the ref's current value and the others
are its history (``flow log``).  Moving a ref writes entry ``seq + 1`` with
:meth:`Store.put_if_absent`; if another writer took that number first, the
move retries with the next one, so concurrent moves are serialized and no
history is lost.  Nothing is ever rewritten, which is also what object
stores need: there is no rename, but a conditional create is enough.

A ref names objects (``[node, rkey]`` pairs); :func:`move_ref` refuses to
move it unless every named object's manifest is in the store, so a ref never
points at something incomplete.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any

from flow.errors import StoreError
from store.abc import Store
from store.host import hostname

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*(/[A-Za-z0-9][A-Za-z0-9_.\-]*)*$")
_SEQ_DIGITS = 12


def _check_name(name: str) -> str:
    if not _NAME.match(name):
        raise ValueError(
            f"invalid ref name {name!r}: letters, digits, '_', '.', '-' and '/' between parts"
        )
    return name


def _files(store: Store, name: str) -> list[tuple[int, str]]:
    """(seq, file name) of a ref's entries, oldest first.

    Entries are ``<seq>.json`` where the store has an atomic conditional
    create, else ``<seq>-<random>.json``: two writers racing for one number
    then both keep their entry (ordered by time), and no history is lost.
    """
    out = []
    for entry in store.list(f"refs/{name}"):
        if not entry.endswith(".json"):
            continue
        seq = entry[:-5].split("-", 1)[0]
        if seq.isdigit():
            out.append((int(seq), entry))
    return sorted(out)


def _entries(store: Store, name: str) -> list[dict]:
    docs = []
    for _, fname in _files(store, name):
        try:
            docs.append(json.loads(store.get(f"refs/{name}/{fname}")))
        except (FileNotFoundError, ValueError):
            continue
    return sorted(docs, key=lambda e: (e.get("seq", 0), e.get("time", 0), e.get("nonce", "")))


def _seqs(store: Store, name: str) -> list[int]:
    return [seq for seq, _ in _files(store, name)]


def read_ref(store: Store, name: str) -> dict | None:
    """The current entry of ref ``name``, or None if it was never set."""
    entries = _entries(store, _check_name(name))
    return entries[-1] if entries else None


def ref_history(store: Store, name: str) -> list[dict]:
    """Every entry of ref ``name``, oldest first."""
    return _entries(store, _check_name(name))


def list_refs(store: Store, prefix: str = "") -> list[str]:
    """Names of all refs (recursively under ``refs/``)."""
    names = set()
    for e in store.walk("refs"):
        parts = e.path.split("/")
        if len(parts) >= 3 and parts[-1].endswith(".json"):
            names.add("/".join(parts[1:-1]))
    return sorted(n for n in names if n.startswith(prefix))


def move_ref(
    store: Store,
    name: str,
    value: dict[str, Any],
    *,
    objects: list[tuple[str, str]] = (),  # type: ignore[assignment]  # read only
    message: str = "",
) -> dict:
    """Point ref ``name`` at ``value``; returns the new entry.

    ``objects`` are the ``(node, rkey_hex)`` pairs the value names; each must
    be complete in the store, or :class:`StoreError` is raised and the ref
    does not move.
    """
    _check_name(name)
    for node, rkey in objects:
        if not store.exists(f"objects/{node}/{rkey}.json"):
            raise StoreError(f"ref {name!r} not moved: object {node}/{rkey} is not complete")
    seqs = _seqs(store, name)
    seq = (seqs[-1] + 1) if seqs else 1
    previous = seqs[-1] if seqs else None
    for _ in range(1000):
        entry = {
            "name": name,
            "seq": seq,
            "previous": previous,
            "time": time.time(),
            "host": hostname(),
            "user": _user(),
            "message": message,
            "objects": [list(o) for o in objects],
            "value": value,
        }
        if store.supports_conditional:
            fname = f"{seq:0{_SEQ_DIGITS}d}.json"
        else:
            entry["nonce"] = uuid.uuid4().hex
            fname = f"{seq:0{_SEQ_DIGITS}d}-{entry['nonce']}.json"
        data = json.dumps(entry, sort_keys=True).encode()
        if store.put_if_absent(f"refs/{name}/{fname}", data):
            return entry
        previous, seq = seq, seq + 1
    raise StoreError(f"ref {name!r}: could not find a free sequence number")


def _user() -> str:
    import getpass  # here: reading refs (every build, a no-op too) needs it not

    try:
        return getpass.getuser()
    except Exception:  # no user database in some containers
        return "unknown"
