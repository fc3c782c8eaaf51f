"""Lineage: how a stored value was made, and what was made from a file.

Every pack manifest records, per item, its recipe key, content key and input
keys, and per pack the node, version, code fingerprint, parameters, library
versions, host and time; object manifests record the same for set outputs
(their inputs are digests of item sets, which are summarized, not expanded).
That is enough to walk the graph backwards from any key (``upstream``) and
forwards from a source file's key (``downstream``) using only the store.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from flow.errors import CorruptObject
from flow.keys import KEY_SIZE
from store.abc import Store
from store.catalog import Catalog, load_catalog
from store.packs import loads


@dataclass
class Record:
    kind: str  # "item" or "object"
    node: str
    step: str
    rkey: str
    ckey: str | None
    item: str  # item id ("" for objects)
    version: str
    fingerprint: str
    params: dict
    inputs: list[str]
    host: str
    created: float
    seconds: float | None
    location: str
    libs: dict = field(default_factory=dict)
    failure: dict | None = None
    children: list[Record] = field(default_factory=list)  # inputs (up) or outputs (down)

    def to_json(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "children"}
        d["children"] = [c.to_json() for c in self.children]
        return d


class Lineage:
    """Key lookups over every node's catalog and object manifests."""

    def __init__(self, store: Store):
        self.store = store
        self.catalogs: dict[str, Catalog] = {
            n: load_catalog(store, n) for n in store.list("packs") if not n.endswith(".json")
        }
        self._objects: list[dict] | None = None
        self._manifests: dict[tuple[str, str], dict] = {}

    def objects(self) -> list[dict]:
        if self._objects is None:
            docs = []
            for node in self.store.list("objects"):
                for name in self.store.list(f"objects/{node}"):
                    if name.endswith(".json"):
                        where = f"objects/{node}/{name}"
                        try:
                            docs.append(loads(self.store.get(where), where))
                        except (FileNotFoundError, CorruptObject):
                            continue
            self._objects = docs
        return self._objects

    def _manifest(self, node: str, pack: str) -> dict:
        k = (node, pack)
        if k not in self._manifests:
            where = f"packs/{node}/{pack}.json"
            self._manifests[k] = loads(self.store.get(where), where)
        return self._manifests[k]

    def _item_record(self, node: str, row: int) -> Record:
        cat = self.catalogs[node]
        pack, pos = cat.location(row)
        m = self._manifest(node, pack)
        inputs = m["inputs"][pos]
        return Record(
            kind="item",
            node=node,
            step=m["step"],
            rkey=cat.rkeys[row].tobytes().hex(),
            ckey=cat.ckey(row).hex(),
            item=m["ids"][pos],
            version=str(m["version"]),
            fingerprint=m["fingerprint"],
            params=m["params"],
            inputs=[inputs[i : i + 2 * KEY_SIZE] for i in range(0, len(inputs), 2 * KEY_SIZE)],
            host=m.get("host", ""),
            created=m["created"],
            seconds=m["seconds"][pos],
            location=f"packs/{node}/{pack}#{pos}",
            libs=m.get("libs", {}),
        )

    def _object_record(self, doc: dict) -> Record:
        inputs = doc.get("inputs", "")
        return Record(
            kind="object",
            node=doc["node"],
            step=doc["step"],
            rkey=doc["rkey"],
            ckey=doc.get("ckey"),
            item="",
            version=str(doc["version"]),
            fingerprint=doc["fingerprint"],
            params=doc["params"],
            inputs=[inputs[i : i + 2 * KEY_SIZE] for i in range(0, len(inputs), 2 * KEY_SIZE)],
            host=doc.get("host", ""),
            created=doc["created"],
            seconds=doc.get("seconds"),
            location=f"objects/{doc['node']}/{doc['rkey']}",
            libs=doc.get("libs", {}),
            failure=doc.get("failure"),
        )

    def find(self, hexprefix: str, *, by: str = "any") -> list[Record]:
        """Records whose recipe or content key starts with ``hexprefix``."""
        hexprefix = hexprefix.lower()
        if len(hexprefix) < 6 or any(c not in "0123456789abcdef" for c in hexprefix):
            raise ValueError(f"{hexprefix!r} is not a key (at least 6 hex digits)")
        even = bytes.fromhex(hexprefix[: len(hexprefix) // 2 * 2])
        probe = np.frombuffer(even, np.uint8)
        out: list[Record] = []
        for node, cat in self.catalogs.items():
            for arr, what in ((cat.rkeys, "rkey"), (cat.ckeys, "ckey")):
                if by not in ("any", what) or not len(arr):
                    continue
                hits = np.flatnonzero((arr[:, : len(probe)] == probe).all(axis=1))
                for row in hits.tolist():
                    rec = self._item_record(node, row)
                    if getattr(rec, what).startswith(hexprefix) and rec not in out:
                        out.append(rec)
        for doc in self.objects():
            for what in ("rkey", "ckey"):
                if by in ("any", what) and (doc.get(what) or "").startswith(hexprefix):
                    out.append(self._object_record(doc))
                    break
        return out

    def producer(self, ckey_hex: str) -> Record | None:
        """The stored item or object whose content key is ``ckey_hex``."""
        found = [r for r in self.find(ckey_hex, by="ckey") if r.ckey == ckey_hex]
        return found[0] if found else None

    def upstream(self, rec: Record, depth: int = 8) -> Record:
        """``rec`` with its inputs' producers as children, recursively."""
        if depth <= 0:
            return rec
        for k in rec.inputs:
            child = self.producer(k)
            if child is None:
                child = Record(
                    "source",
                    "",
                    "",
                    k,
                    k,
                    "",
                    "",
                    "",
                    {},
                    [],
                    "",
                    0.0,
                    None,
                    "a source file, or a set of items (digest)",
                )
            else:
                self.upstream(child, depth - 1)
            rec.children.append(child)
        return rec

    def consumers(self, key_hex: str) -> list[Record]:
        """Stored items that took ``key_hex`` as an input."""
        out = []
        for node, cat in self.catalogs.items():
            for row, inputs in enumerate(cat.inputs):
                if key_hex in inputs and (inputs.index(key_hex) % (2 * KEY_SIZE) == 0):
                    out.append(self._item_record(node, row))
        return out

    def downstream(self, key_hex: str, depth: int = 8) -> list[Record]:
        """What was computed from ``key_hex`` (a source file's key or a content key)."""
        recs = self.consumers(key_hex)
        if depth > 1:
            for r in recs:
                if r.ckey:
                    r.children = self.downstream(r.ckey, depth - 1)
        return recs


def describe(rec: Record) -> str:
    """One line for a record."""
    params = ", ".join(f"{k}={v}" for k, v in sorted(rec.params.items()))
    when = ""
    if rec.created:
        import time

        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(rec.created))
    secs = f" {rec.seconds:.3f}s" if rec.seconds is not None else ""
    what = f"{rec.step}" + (f" [{rec.item}]" if rec.item else "")
    if rec.kind == "source":
        return f"input {rec.rkey[:12]}: {rec.location}"
    status = " FAILED" if rec.failure else ""
    return (
        f"{what}: {rec.node} v{rec.version} ({params}) rkey {rec.rkey[:12]} -> "
        f"ckey {(rec.ckey or '-')[:12]}{status}; {when} on {rec.host}{secs}"
    )


def tree(recs: list[Record], indent: str = "") -> list[str]:
    lines = []
    for i, r in enumerate(recs):
        last = i == len(recs) - 1
        lines.append(f"{indent}{'└─ ' if last else '├─ '}{describe(r)}")
        lines += tree(r.children, indent + ("   " if last else "│  "))
    return lines


__all__ = ["Lineage", "Record", "describe", "tree"]
