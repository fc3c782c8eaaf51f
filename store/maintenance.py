"""Keeping a store healthy: verify, quarantine, garbage collection.

``verify`` re-reads every pack and object: zarr's CRC32C codec catches a
flipped bit in a chunk, blob sizes and BLAKE3 keys are compared with their
manifest, and every item's content key is recomputed from the values read
back and compared with the ``ckey`` the manifest recorded.  A corrupt pack or
object is **quarantined**: its manifest moves to ``quarantine/`` (kept for
inspection, never read by builds), so the catalog stops listing it and the
next build recomputes its items.  Nothing else is touched.

``gc`` deletes what nothing needs.  Live are:

* the objects the refs name, in their current entry and their ``keep``
  most recent history entries (so ``flow log`` can still roll back);
* everything a plan of the current project uses (``live`` keys passed in:
  fresh item outputs and failure records, set outputs) -- so a build right
  after gc computes nothing;
* anything younger than ``grace`` seconds (a build running now may be
  writing it, and its manifest comes last).

Dead are packs none of whose items are live, objects no ref or plan names,
payload folders no manifest names (a killed writer's leftovers), temporary
files, and the quarantine.  ``gc`` is a dry run unless ``delete=True`` and
reports what it would free, in files and bytes.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from flow.errors import CorruptObject, StoreError
from flow.keys import KEY_SIZE, key
from store.abc import Store
from store.objects import read_object
from store.packs import PackReader, loads
from store.refs import list_refs, ref_history

# --------------------------------------------------------------------------
# verify


@dataclass
class Problem:
    kind: str  # "pack" or "object"
    node: str
    id: str  # pack id or object rkey
    reason: str
    items: int = 0


def id_key(item_id: str) -> str:
    """How ``flow forget`` records a withdrawn item id (a key, not the name)."""
    return key(("forgotten-id", item_id)).hex()


def quarantine(store: Store, kind: str, node: str, ident: str, reason: str) -> None:
    """Take a pack's or object's manifest out of service (the next build redoes it)."""
    src = f"{'packs' if kind == 'pack' else 'objects'}/{node}/{ident}.json"
    try:
        data = store.get(src)
    except FileNotFoundError:
        return
    stamp = time.strftime("%Y%m%dT%H%M%S")
    store.put(f"quarantine/{kind}s/{node}/{ident}.{stamp}.json", data)
    store.put(f"quarantine/{kind}s/{node}/{ident}.{stamp}.reason.txt", reason.encode())
    store.delete([src])


def _nodes(store: Store, top: str) -> list[str]:
    return [n for n in store.list(top) if not n.endswith(".json")]


def verify_pack(store: Store, node: str, pack_id: str) -> str | None:
    """None if the pack reads back intact, else the reason it doesn't."""
    try:
        reader = PackReader.open(store, node, pack_id)
    except (StoreError, CorruptObject) as e:
        return str(e)
    n = reader.manifest["n"]
    if not n:
        return None
    try:
        values = reader.read(list(range(n)))
    except CorruptObject as e:
        return str(e.__cause__ or e)
    except Exception as e:
        return f"unreadable: {type(e).__name__}: {e}"
    for pos, v in enumerate(values):
        if bytes(key(v)) != reader.ckey(pos):
            item = reader.manifest["ids"][pos]
            return f"item {item} reads back with a different content key"
    return None


def verify_object(store: Store, node: str, rkey_hex: str) -> str | None:
    where = f"objects/{node}/{rkey_hex}.json"
    try:
        doc = loads(store.get(where), where)
    except FileNotFoundError:
        return None
    except CorruptObject as e:
        return str(e)
    if "failure" in doc:
        return None
    try:
        value = read_object(store, node, bytes.fromhex(rkey_hex), doc)
    except (CorruptObject, StoreError) as e:
        return str(e)
    except Exception as e:
        return f"unreadable: {type(e).__name__}: {e}"
    if key(value).hex() != doc["ckey"]:
        return "reads back with a different content key"
    return None


def verify(store: Store, *, repair: bool = True, progress: Any = None) -> list[Problem]:
    """Check every pack and object; quarantine the corrupt ones (``repair``)."""
    problems: list[Problem] = []
    todo: list[tuple[str, str, str]] = []
    for node in _nodes(store, "packs"):
        for name in store.list(f"packs/{node}"):
            if name.endswith(".json"):
                todo.append(("pack", node, name[:-5]))
    for node in _nodes(store, "objects"):
        for name in store.list(f"objects/{node}"):
            if name.endswith(".json"):
                todo.append(("object", node, name[:-5]))
    for kind, node, ident in todo:
        why = (
            verify_pack(store, node, ident) if kind == "pack" else verify_object(store, node, ident)
        )
        if progress is not None:
            progress(kind, node, ident, why)
        if why is None:
            continue
        n = 0
        if kind == "pack":
            with contextlib.suppress(FileNotFoundError, CorruptObject):
                n = loads(store.get(f"packs/{node}/{ident}.json"), ident).get("n", 0)
        problems.append(Problem(kind, node, ident, why, n))
        if repair:
            quarantine(store, kind, node, ident, why)
    return problems


# --------------------------------------------------------------------------
# gc


@dataclass
class Collection:
    """What gc found: paths to delete and why, with their sizes."""

    dead: dict[str, list[tuple[str, int]]] = field(default_factory=dict)  # reason -> files
    kept_packs: int = 0
    kept_objects: int = 0
    deleted: bool = False

    @property
    def files(self) -> int:
        return sum(len(v) for v in self.dead.values())

    @property
    def bytes(self) -> int:
        return sum(s for v in self.dead.values() for _, s in v)

    def add(self, reason: str, path: str, size: int) -> None:
        self.dead.setdefault(reason, []).append((path, size))


def ref_roots(store: Store, keep: int = 5) -> set[tuple[str, str]]:
    """(node, rkey) of the objects named by every ref's latest ``keep + 1`` entries."""
    roots: set[tuple[str, str]] = set()
    for name in list_refs(store):
        for entry in ref_history(store, name)[-(keep + 1) :]:
            for node, rk in entry.get("objects", []):
                roots.add((node, rk))
    return roots


def collect(
    store: Store,
    *,
    live_items: dict[str, Iterable[bytes]] | None = None,
    live_objects: Iterable[tuple[str, str]] = (),
    keep: int = 5,
    grace: float = 3600.0,
    delete: bool = False,
    purge: set[str] | None = None,
) -> Collection:
    """Find (and with ``delete=True`` remove) what no ref, history or plan needs.

    ``live_items`` maps a node to the recipe keys (fresh or failed) that the
    current plan uses; ``live_objects`` are ``(node, rkey_hex)`` set outputs
    it uses.  ``live_items=None`` keeps every pack (a caller without a plan).

    ``purge`` are keys (:func:`id_key`) of item ids withdrawn by ``flow forget``:
    packs holding such items are rewritten without them, and index objects
    holding them are dead even when a ref's history names them (that history
    entry can no longer be restored).
    """
    purge_keys = purge or set()
    memo: dict[str, bool] = {}

    def purged(ids: Iterable[str]) -> set[str]:
        out = set()
        for i in ids:
            hit = memo.get(i)
            if hit is None:
                hit = memo[i] = id_key(i) in purge_keys
            if hit:
                out.add(i)
        return out

    now = time.time()
    out = Collection()
    files = {e.path: e for e in store.walk("")}

    def young(path: str) -> bool:
        # a path the walk didn't see appeared after it began: it is new
        e = files.get(path)
        return e is None or now - e.mtime < grace

    def under(prefix: str) -> list[str]:
        return [p for p in files if p.startswith(prefix)]

    roots = ref_roots(store, keep) | set(live_objects)
    # objects
    for node in _nodes(store, "objects"):
        names = store.list(f"objects/{node}")
        manifests = {n[:-5] for n in names if n.endswith(".json")}
        for rk in sorted(manifests):
            base = f"objects/{node}/{rk}"
            holds_purged = False
            if purge_keys:
                try:
                    obj = loads(store.get(f"{base}.json"), base)
                    holds_purged = bool(purged(obj.get("attrs", {}).get("ids", ())))
                except (FileNotFoundError, CorruptObject):
                    pass
            if not holds_purged and ((node, rk) in roots or young(f"{base}.json")):
                out.kept_objects += 1
                try:
                    payload = loads(store.get(f"{base}.json"), base).get("payload")
                except (FileNotFoundError, CorruptObject):
                    payload = None
                for p in under(f"{base}/"):
                    stale = payload is None or p.split("/")[3] != payload
                    if stale and not young(p):
                        out.add("unreferenced object payloads", p, files[p].size)
                continue
            for p in [f"{base}.json", *under(f"{base}/")]:
                if p in files:
                    out.add("objects no ref or plan uses", p, files[p].size)
        for d in sorted(set(n for n in names if not n.endswith(".json")) - manifests):
            for p in under(f"objects/{node}/{d}/"):
                if not young(p):
                    out.add("payloads of unfinished writes", p, files[p].size)
    # packs
    for node in _nodes(store, "packs"):
        names = store.list(f"packs/{node}")
        manifests = {n[:-5] for n in names if n.endswith(".json")}
        live = None if live_items is None else {bytes(k) for k in live_items.get(node, ())}
        for pid in sorted(manifests):
            base = f"packs/{node}/{pid}"
            doc: dict | None = None
            if purge_keys:
                try:
                    doc = loads(store.get(f"{base}.json"), base)
                except (FileNotFoundError, CorruptObject):
                    doc = {"rkeys": "", "failures": [], "ids": []}
                hit = purged([*doc.get("ids", []), *(f["id"] for f in doc["failures"])])
                if hit:
                    out.add(
                        "packs rewritten without forgotten items",
                        f"{base}.json",
                        files[f"{base}.json"].size if f"{base}.json" in files else 0,
                    )
                    if delete:
                        rewrite_pack(store, node, pid, hit)
                    continue
            keep_it = live is None or young(f"{base}.json")
            if not keep_it:
                if doc is None:
                    try:
                        doc = loads(store.get(f"{base}.json"), base)
                    except (FileNotFoundError, CorruptObject):
                        doc = {"rkeys": "", "failures": []}
                raw = bytes.fromhex(doc.get("rkeys", ""))
                rks = {raw[i : i + KEY_SIZE] for i in range(0, len(raw), KEY_SIZE)}
                rks |= {bytes.fromhex(f["rkey"]) for f in doc.get("failures", [])}
                keep_it = bool(rks & live)  # type: ignore[operator]  # live is a set here
            if keep_it:
                out.kept_packs += 1
                continue
            for p in [f"{base}.json", *under(f"{base}/")]:
                if p in files:
                    out.add("packs no plan uses", p, files[p].size)
        for d in sorted(set(n for n in names if not n.endswith(".json")) - manifests):
            for p in under(f"packs/{node}/{d}/"):
                if not young(p):
                    out.add("packs of unfinished writes", p, files[p].size)
    for p in under("tmp/"):
        if not young(p):
            out.add("temporary files", p, files[p].size)
    for p in under("quarantine/"):
        out.add("quarantined manifests", p, files[p].size)
    if delete:
        for reason, paths in out.dead.items():
            if reason == "packs rewritten without forgotten items":
                continue  # done above
            store.delete([p for p, _ in paths])
        _prune_empty_dirs(store, max(grace, 60.0))
        out.deleted = True
    return out


def rewrite_pack(store: Store, node: str, pack_id: str, drop: set[str]) -> dict | None:
    """Publish a copy of a pack without the items (and failures) whose id is in
    ``drop``, then delete the original; None if nothing is left to keep."""
    from store.outputs import ItemResult, Recipe
    from store.packs import write_pack

    reader = PackReader.open(store, node, pack_id)
    m = reader.manifest
    keep = [p for p, i in enumerate(m["ids"]) if i not in drop]
    fails = [f for f in m.get("failures", []) if f["id"] not in drop]
    new = None
    if keep or fails:
        values = reader.read(keep) if keep else []
        h = 2 * KEY_SIZE
        results = [
            ItemResult(
                m["ids"][p],
                reader.rkey(p),
                tuple(
                    bytes.fromhex(m["inputs"][p][j : j + h])
                    for j in range(0, len(m["inputs"][p]), h)
                ),
                v,
                reader.ckey(p),
                None,
                m["seconds"][p],
            )
            for p, v in zip(keep, values)
        ]
        for f in fails:
            err = {k: f[k] for k in ("type", "reason", "traceback", "bad_input") if k in f}
            results.append(
                ItemResult(
                    f["id"],
                    bytes.fromhex(f["rkey"]),
                    tuple(
                        bytes.fromhex(f["inputs"][j : j + h]) for j in range(0, len(f["inputs"]), h)
                    ),
                    error=err,
                )
            )
        recipe = Recipe(
            m["node"], m["step"], m["version"], m["fingerprint"], m["params"], m["prefix"]
        )
        new = write_pack(
            store,
            recipe,
            results,
            extra={
                "created": m["created"],
                "host": m.get("host", ""),
                "libs": m.get("libs", {}),
                "rewritten_from": pack_id,
                "rewritten": time.time(),
            },
        )
    store.delete([f"packs/{node}/{pack_id}.json"])
    store.delete_tree(f"packs/{node}/{pack_id}")
    return new


def _prune_empty_dirs(store: Store, age: float) -> None:
    """Remove empty folders older than ``age`` seconds (a writer may have just made
    one); the store's skeleton (``tmp``, ``packs/<node>``, ``objects/<node>``...)
    stays."""
    root = store.local_path("")
    if root is None:
        return  # object stores have no folders
    import os

    now = time.time()
    for dirpath, dirs, files in os.walk(root, topdown=False):
        rel = os.path.relpath(dirpath, root)
        if dirpath == root or rel.count(os.sep) < 2 or rel.split(os.sep)[0] == "tmp":
            continue
        if dirs or files:
            continue
        with contextlib.suppress(OSError):
            if now - os.stat(dirpath).st_mtime >= age:
                os.rmdir(dirpath)
