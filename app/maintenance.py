"""Operating a project's store: what is live for ``flow gc``, and where a source
file ended up (``flow explain FILE``).

Garbage collection itself (listing, grace periods, deleting, purging withdrawn
items) is the store's business (:func:`store.maintenance.collect`); what is
*live* is the application's: everything the project's current plans reach
(so the next build computes nothing), in the build indices and the eval
indices alike, plus what refs and their recent history name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from flow.errors import ConfigError
from flow.plan import FAILED, FRESH

__all__ = [
    "FileLineage",
    "collect_garbage",
    "explain_file",
    "explain_key",
    "forgotten_entry",
    "indices_holding",
    "lineage_lines",
    "live_set",
    "ref_log",
    "verify_store",
]


def live_set(ws: Any) -> tuple[dict[str, set[bytes]], set[tuple[str, str]]]:
    """What the project's plans use: per-item recipe keys by node, and set
    outputs as ``(node, rkey hex)`` -- fresh ones and recorded failures (a
    failure record keeps a deterministic failure from being retried)."""
    live_items: dict[str, set[bytes]] = {}
    live_objects: set[tuple[str, str]] = set()
    for ev in (False, True):
        p = ws.plan("all", eval=ev, reasons=False)
        g = ws.subgraph("all", eval=ev)
        for name, sp in p.steps.items():
            st = g[name]
            if st.kind == "source":
                continue
            keep = [
                rk for s, rk in zip(sp.status, sp.rkeys) if s in (FRESH, FAILED) and rk is not None
            ]
            if st.kind == "item":
                live_items.setdefault(st.node_name, set()).update(keep)
            else:
                live_objects.update((st.node_name, bytes(rk).hex()) for rk in keep)
    return live_items, live_objects


def collect_garbage(ws: Any, *, keep: int = 5, grace: float = 3600.0, delete: bool = False):
    """``flow gc``: collect what neither a ref (nor its ``keep`` previous entries) nor
    the project's plans use; a dry run unless ``delete``.  Withdrawn items
    (``flow forget``) are purged.  Returns :class:`store.maintenance.Collection`."""
    from store.maintenance import collect

    live_items, live_objects = live_set(ws)
    return collect(
        ws.store,
        live_items=live_items,
        live_objects=live_objects,
        keep=keep,
        grace=grace,
        delete=delete,
        purge=ws.forgotten_ids(),
    )


def indices_holding(ws: Any, path: str | os.PathLike) -> list[dict]:
    """The targets whose current index holds the item of source file ``path``:
    ``{"target", "seq", "id", "labels"}`` each."""
    from app.retrieval import Retriever
    from store.refs import read_ref

    items, _, meta = ws.items()
    real = os.path.realpath(path)
    ids = [i for i, p in zip(items.ids, meta["paths"]) if p == real]
    out: list[dict] = []
    if not ids:
        return out
    for t in ws.targets:
        ref = read_ref(ws.store, t)
        if ref is None:
            continue
        try:
            r = Retriever(ws.store, ref)
        except Exception:
            continue
        for iid in ids:
            if iid in r.ids:
                j = r.ids.index(iid)
                out.append(
                    {"target": t, "seq": ref["seq"], "id": iid, "labels": "|".join(r.labels[j])}
                )
    return out


def ref_log(ws: Any, target: str) -> list[dict]:
    """Every entry of ``target``'s ref, oldest first.  An entry whose index lost items
    the entry before held names them: ``withdrawn`` (by ``flow forget``) and
    ``removed`` (their files left the sources).  A ref that does not exist is an
    error naming the ones that do."""
    from app.retrieval import unknown_target
    from store.refs import list_refs, ref_history

    hist = ref_history(ws.store, target)
    if not hist:
        if target in ws.targets:
            raise unknown_target(ws.store, target, ws.targets)
        names = sorted(set(list_refs(ws.store)) | set(ws.targets))
        raise ConfigError(f"no ref named {target!r}; the refs are: {', '.join(names) or 'none'}")
    from store.maintenance import id_key

    forgotten = ws.forgotten_ids()
    before: set[str] | None = None
    for e in hist:
        ids = _entry_ids(ws.store, e)
        if before is not None and ids is not None:
            gone = sorted(before - ids)
            withdrawn = [i for i in gone if id_key(i) in forgotten]
            if withdrawn:
                e["withdrawn"] = withdrawn
            if len(withdrawn) < len(gone):
                e["removed"] = [i for i in gone if id_key(i) not in forgotten]
        before = ids
    return hist


def _entry_ids(store: Any, entry: dict) -> set[str] | None:
    """The item ids of a ref entry's index (its tables), or None where one is gone."""
    from store.objects import read_object

    ids: set[str] = set()
    for seg in entry.get("value", {}).get("segments", []):
        try:
            node, rkey = seg["table"]
            ids.update(read_object(store, node, bytes.fromhex(rkey))["ids"])
        except Exception:
            return None
    return ids


@dataclass
class FileLineage:
    """What the store made from one source file, and which indices hold it."""

    file: str
    key: str
    derived: list  # store.lineage records, downstream of the file
    indices: list[dict]
    forgotten: dict | None = None  # the `flow forget` that withdrew it

    def to_json(self) -> dict:
        return {
            "file": self.file,
            "key": self.key,
            "derived": [r.to_json() for r in self.derived],
            "indices": self.indices,
            "forgotten": self.forgotten,
        }


def explain_file(ws: Any, path: str, depth: int = 8) -> FileLineage:
    """``flow explain FILE``: every step's output made from ``path``'s bytes."""
    from flow.keys import file_key
    from store.lineage import Lineage

    k = file_key(path).hex()
    return FileLineage(
        path,
        k,
        Lineage(ws.store).downstream(k, depth),
        indices_holding(ws, path),
        forgotten_entry(ws, k),
    )


def forgotten_entry(ws: Any, file_key_hex: str) -> dict | None:
    """The ``flow forget`` that withdrew the file of this content key (its ref entry:
    ``seq``, ``time``, ``message``), or None."""
    from store.refs import ref_history

    for e in ref_history(ws.store, "forgotten"):
        if file_key_hex in e.get("value", {}).get("keys", []):
            return {k: e.get(k) for k in ("seq", "time", "message", "user", "host")}
    return None


def explain_key(ws: Any, prefix: str, depth: int = 8) -> list:
    """``flow explain KEY``: the stored items or objects whose recipe or content key
    starts with ``prefix`` (6+ hex digits), with their inputs ``depth`` deep.
    A ``ValueError`` when the prefix is not one."""
    from store.lineage import Lineage

    lin = Lineage(ws.store)
    return [lin.upstream(r, depth) for r in lin.find(prefix)]


def lineage_lines(records: list) -> list[str]:
    """Lineage records as an indented tree, one line each."""
    from store.lineage import tree

    return tree(records)


def verify_store(ws: Any, *, repair: bool = True, progress: Any = None) -> list:
    """``flow verify``: check every stored pack and object against its checksums;
    corrupt ones are quarantined (unless ``repair=False``).  The problems found."""
    from store.maintenance import verify

    return verify(ws.store, repair=repair, progress=progress)
