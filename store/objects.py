"""Objects: the outputs of set nodes (a vocabulary, a model, an index), one per recipe key.

Layout under the store root::

    objects/<node>/<rkey>/<payload-id>/   zarr arrays and ``<field>.blob`` files
    objects/<node>/<rkey>.json            the manifest, written last

An object exists when, and only when, its manifest does (see :mod:`store.packs`
for how publishing works).  :class:`ObjectCatalog` is what the planner reads of
a node's objects: their states, loaded once per build by :func:`load_objects`
(one listing, a cache of states, the manifests of objects new since).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np

from flow.errors import CorruptObject, StoreError
from flow.keys import Key, bytes_key, key, params_json
from flow.snapshot import ObjectState, Previous
from flow.values import Blob
from store.abc import Store
from store.outputs import _BARE, ItemResult, Recipe, _retuple, _split, _untuple, environment
from store.packs import FORMAT, _check_chunks, _publish, _same_dtype, _write_arrays, loads

__all__ = [
    "ObjectCatalog",
    "load_objects",
    "object_blob_path",
    "read_object",
    "read_object_manifest",
    "read_object_manifests",
    "write_object",
]


def write_object(
    store: Store, recipe: Recipe, rkey: bytes, inputs: Sequence[bytes], result: ItemResult
) -> dict:
    """Write a set node's output (or its failure) and publish its manifest.

    ``inputs`` are the digests the recipe key was derived from: one per input
    (for an ``"all"`` input, :func:`flow.keys.items_key` of its items).
    """
    payload = uuid.uuid4().hex
    base = f"objects/{recipe.node}/{Key(rkey).hex()}"
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "kind": "object",
        **recipe.to_json(),
        **environment(),
        "pid": os.getpid(),
        "created": time.time(),
        "rkey": Key(rkey).hex(),
        "inputs": "".join(bytes(k).hex() for k in inputs),
        "seconds": round(result.seconds, 6),
    }
    if result.error is not None:
        manifest["failure"] = result.error
    else:
        arrays, attrs, blobs = _split(result.value)
        written = _write_arrays(store, f"{base}/{payload}", arrays) if arrays else []
        blob_meta = {}
        for name, blob in blobs.items():
            store.put(f"{base}/{payload}/{name}.blob", blob.data)
            blob_meta[name] = {"size": len(blob.data), "key": bytes_key(blob.data).hex()}
        manifest.update(
            payload=payload,
            ckey=Key(result.ckey).hex(),  # type: ignore[arg-type]  # no error: computed
            arrays={n: {"dtype": a.dtype.str, "shape": list(a.shape)} for n, a in arrays.items()},
            blobs=blob_meta,
            attrs={k: _untuple(v) for k, v in attrs.items()},
        )
    _publish(store, base, manifest, written if result.error is None else [])
    return manifest


def read_object_manifest(store: Store, node: str, rkey: bytes) -> dict | None:
    where = f"objects/{node}/{Key(rkey).hex()}.json"
    try:
        return loads(store.get(where), where)
    except FileNotFoundError:
        return None


def read_object(store: Store, node: str, rkey: bytes, manifest: dict | None = None) -> Any:
    """The stored value of a set node's output."""
    doc = manifest or read_object_manifest(store, node, rkey)
    if doc is None:
        raise StoreError(f"object {node}/{Key(rkey).hex()} is not in the store")
    if "failure" in doc:
        raise StoreError(f"object {node}/{Key(rkey).hex()} is a recorded failure")
    base = f"objects/{node}/{Key(rkey).hex()}/{doc['payload']}"
    value: dict[str, Any] = {}
    if doc["arrays"]:
        import zarr

        zs = store.zarr(base, read_only=True)
        for name, meta in doc["arrays"].items():
            try:
                z = zarr.open_array(zs, path=name, mode="r", zarr_format=3)
                expect = math.prod(meta["shape"]) if meta["shape"] else 1
                if not _same_dtype(z.dtype, meta["dtype"]) or z.size != expect:
                    raise ValueError(
                        f"array is {z.shape} {z.dtype}, the manifest says "
                        f"{meta['shape']} {meta['dtype']}"
                    )
                _check_chunks(store, f"{base}/{name}", z)
                arr = np.asarray(z[...]).reshape(meta["shape"])
            except CorruptObject:
                raise
            except Exception as e:
                raise CorruptObject(f"object {node}/{Key(rkey).hex()}: array {name}: {e}") from e
            value[name] = arr
    for name, meta in doc["blobs"].items():
        try:
            data = store.get(f"{base}/{name}.blob")
        except FileNotFoundError:
            raise CorruptObject(f"object {node}/{Key(rkey).hex()}: blob {name} missing") from None
        if len(data) != meta["size"] or bytes_key(data).hex() != meta["key"]:
            raise CorruptObject(f"object {node}/{Key(rkey).hex()}: blob {name} checksum mismatch")
        value[name] = Blob(data)
    for name, v in doc["attrs"].items():
        value[name] = _retuple(v)
    if set(value) == {_BARE}:
        return value[_BARE]
    return value


def object_blob_path(store: Store, node: str, rkey: bytes, manifest: dict, name: str) -> str:
    """Store path of one blob of an object (for readers that map files)."""
    return f"objects/{node}/{Key(rkey).hex()}/{manifest['payload']}/{name}.blob"


def output_key(value: Any) -> Key:
    """The content key of a canonical output value."""
    return key(value)


class ObjectCatalog:
    """The set outputs of one node, as the planner reads them: an in-memory snapshot
    (:class:`flow.snapshot.ObjectState` per stored recipe key), loaded by
    :func:`load_objects`.  The builder adds the objects it writes (:meth:`add`)."""

    def __init__(self, node: str, states: dict[bytes, ObjectState] | None = None):
        self.node = node
        self.states: dict[bytes, ObjectState] = dict(states or {})
        self._latest: dict[str, ObjectState] | None = None

    def get(self, rkey: bytes) -> ObjectState | None:
        return self.states.get(bytes(rkey))

    def add(self, rkey: bytes, manifest: dict) -> None:
        """Record an object this process just wrote (its manifest)."""
        self.states[bytes(rkey)] = object_state(manifest)
        self._latest = None

    def previous(self, step: str) -> Previous | None:
        """The recipe of the newest object ``step`` made (for "why is it stale?")."""
        if self._latest is None:
            latest: dict[str, ObjectState] = {}
            for st in sorted(self.states.values(), key=lambda o: o.created):
                latest[st.step] = st
            self._latest = latest
        found = self._latest.get(step)
        return found.previous if found is not None else None

    def __len__(self) -> int:
        return len(self.states)


def object_state(doc: dict) -> ObjectState:
    """What the planner needs of an object manifest."""
    failure = doc.get("failure")
    return ObjectState(
        ckey=None if failure is not None else bytes.fromhex(doc["ckey"]),
        failed=failure is not None,
        step=str(doc.get("step", "")),
        created=float(doc.get("created", 0.0)),
        previous=Previous(
            str(doc["version"]),
            doc["fingerprint"],
            params_json(doc["params"]),
            doc.get("inputs", ""),
        ),
        failure=dict(failure) if failure is not None else None,
    )


_OBJECTS_CACHE_VERSION = 1


def load_objects(store: Store, node: str, *, write_cache: bool = True) -> ObjectCatalog:
    """The objects of ``node``: one listing of ``objects/<node>/``, the states
    remembered in ``cache/objects/<node>.json`` for the objects still listed, and
    the manifests of the others read (in parallel).  Like the item catalog's cache,
    this one is never the only copy of anything: objects are immutable, and an
    entry whose object is gone (collected) is dropped by the listing."""
    try:
        names = [n for n in store.list(f"objects/{node}") if n.endswith(".json")]
    except FileNotFoundError:
        names = []
    present = {n[:-5] for n in names}
    cached: dict[str, dict] = {}
    try:
        doc = json.loads(store.get(_objects_cache_path(node)))
        if doc.get("version") == _OBJECTS_CACHE_VERSION:
            cached = doc["objects"]
    except Exception:  # none yet, or unreadable: read the manifests
        cached = {}
    states: dict[bytes, ObjectState] = {}
    keep = {}
    for rk in present & set(cached):
        try:
            states[bytes.fromhex(rk)] = _state_from_json(cached[rk])
            keep[rk] = cached[rk]
        except (KeyError, ValueError, TypeError):
            continue
    missing = sorted(present - set(keep))
    changed = len(keep) != len(cached)
    for rk, m in zip(missing, _read_object_manifests(store, node, missing), strict=True):
        if m is None:
            continue
        st = object_state(m)
        states[bytes.fromhex(rk)] = st
        keep[rk] = _state_to_json(st)
        changed = True
    if write_cache and changed:
        body = json.dumps({"version": _OBJECTS_CACHE_VERSION, "objects": keep}, sort_keys=True)
        with contextlib.suppress(OSError):  # only a cache
            store.put(_objects_cache_path(node), body.encode())
    return ObjectCatalog(node, states)


def read_object_manifests(store: Store, node: str) -> list[dict]:
    """Every object manifest of ``node`` (whole, with attributes), oldest first."""
    names = sorted(n[:-5] for n in store.list(f"objects/{node}") if n.endswith(".json"))
    docs = [d for d in _read_object_manifests(store, node, names) if d is not None]
    return sorted(docs, key=lambda d: d["created"])


def _read_object_manifests(store: Store, node: str, rkeys: list[str]) -> list[dict | None]:
    def one(rk: str) -> dict | None:
        where = f"objects/{node}/{rk}.json"
        try:
            return loads(store.get(where), where)
        except (FileNotFoundError, CorruptObject):
            return None  # collected since the listing, or reported by `flow verify`

    if len(rkeys) > 8:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(8) as ex:
            return list(ex.map(one, rkeys))
    return [one(rk) for rk in rkeys]


def _objects_cache_path(node: str) -> str:
    return f"cache/objects/{node}.json"


def _state_to_json(st: ObjectState) -> dict:
    prev = st.previous
    return {
        "ckey": st.ckey.hex() if st.ckey is not None else None,
        "step": st.step,
        "created": st.created,
        "previous": list(prev) if prev is not None else None,
        "failure": dict(st.failure) if st.failure is not None else None,
    }


def _state_from_json(d: dict) -> ObjectState:
    failure = d.get("failure")
    prev = d.get("previous")
    return ObjectState(
        ckey=bytes.fromhex(d["ckey"]) if d["ckey"] is not None else None,
        failed=failure is not None,
        step=d["step"],
        created=float(d["created"]),
        previous=Previous(*prev) if prev is not None else None,
        failure=failure,
    )
