"""Packs: how per-item outputs sit in the store, and how anything is published.

Per-item outputs are written in **packs**: one pack per executed batch, many
items per zarr array, so a million images are a few thousand files, not a
million.  Set-node outputs (a vocabulary, a model, an index) are **objects**,
one per recipe key (:mod:`store.objects`).  Layout under the store root::

    packs/<node>/<pack-id>/<field>        zarr v3 arrays (stacked or ragged)
    packs/<node>/<pack-id>.json           the manifest, written last
    objects/<node>/<rkey>/<payload-id>/   zarr arrays and ``<field>.blob`` files
    objects/<node>/<rkey>.json            the manifest, written last

A pack or object exists when, and only when, its manifest exists: the
manifest is published atomically after every array it names is written, so
a writer killed at any point leaves only files nothing refers to (``flow gc``
removes them).  Pack and payload ids are random, so two writers never write
the same file; two builds that compute the same item both succeed and the
catalog keeps either copy (they have the same content key).

Each manifest carries the recipe (node, version, code fingerprint,
parameters, per-item input keys, library versions, host, seconds) and every
item's recipe key (``rkey``) and content key (``ckey`` = :func:`flow.keys.key`
of the output), which is what ``flow verify`` re-checks.  Arrays are written
with a CRC32C codec, so a corrupted chunk fails on read.

Output values are brought to a canonical form before they are keyed and
stored (:func:`store.outputs.canonical_output`), so what is read back keys the same.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from flow.errors import CorruptObject, StoreError
from flow.keys import KEY_SIZE, bytes_key
from store.abc import Store
from store.outputs import _BARE, ItemResult, Recipe, _retuple, _split, _untuple, environment

__all__ = ["FORMAT", "PackReader", "loads", "write_pack"]

FORMAT = "flow/1"
_INNER_CHUNK_BYTES = 1 << 20
# arrays up to this many bytes are encoded by zarr into memory and written as
# plain files (Store.put_new): zarr's own store round trips cost ~3 ms an array,
# most of a small pack's write; bigger arrays stream through Store.zarr
_IN_MEMORY_BYTES = 32 << 20


# --------------------------------------------------------------------------
# canonical output values


# --------------------------------------------------------------------------
# recipes


# --------------------------------------------------------------------------
# writing


def _codecs():
    from zarr.codecs import BytesCodec, Crc32cCodec, ZstdCodec

    return BytesCodec(), [ZstdCodec(level=1), Crc32cCodec()]


def _write_array(zstore: Any, name: str, data: np.ndarray) -> Any:
    import zarr

    serializer, compressors = _codecs()
    if data.ndim == 0:
        data = data.reshape(1)
    shape = data.shape
    item_bytes = max(1, data[0:1].nbytes) if shape[0] else 1
    per_chunk = max(1, min(shape[0], _INNER_CHUNK_BYTES // item_bytes)) if shape[0] else 1
    chunks = (per_chunk, *shape[1:])
    shards = None
    if shape[0] > per_chunk:
        shards = (math.ceil(shape[0] / per_chunk) * per_chunk, *shape[1:])
    arr = zarr.create_array(
        zstore,
        name=name,
        shape=shape,
        dtype=data.dtype,
        chunks=chunks,
        shards=shards,
        serializer=serializer,
        compressors=compressors,
        fill_value=0,
        zarr_format=3,
        # every chunk is written, even all-zero ones: a missing chunk file is then
        # corruption (zarr would otherwise read it back as zeros)
        config={"write_empty_chunks": True},
    )
    if data.size:
        arr[...] = data
    return arr


def _write_arrays(store: Store, base: str, arrays: dict[str, np.ndarray]) -> list[str]:
    """Write ``arrays`` as zarr v3 arrays ``<base>/<name>``; their chunk files.

    Small arrays are encoded by zarr into a memory store, then their files (the
    same files zarr would write) are put with :meth:`Store.put_new`, one array
    at a time; big ones are written by zarr into the store directly.
    """
    from zarr.storage import MemoryStore

    files: list[str] = []
    mem: dict[str, Any] = {}
    direct = None
    for name, data in arrays.items():
        if data.nbytes > _IN_MEMORY_BYTES:
            direct = direct or store.zarr(base)
            files += _chunk_files(f"{base}/{name}", _write_array(direct, name, data))
            continue
        _write_array(MemoryStore(mem), name, data)
        mine = {k: mem.pop(k).to_bytes() for k in [k for k in mem if k.startswith(f"{name}/")]}
        store.put_new({f"{base}/{k}": v for k, v in mine.items()})
        files += [f"{base}/{k}" for k in mine if k.startswith(f"{name}/c/")]
    if mem:  # the root group's zarr.json, as zarr writes it
        store.put_new({f"{base}/{k}": v.to_bytes() for k, v in mem.items()})
    return files


def _layout_fields(node: str, values: Sequence[dict[str, np.ndarray]]) -> tuple[dict, dict]:
    """Group per-item arrays into stacked or ragged pack arrays."""
    names = set(values[0]) if values else set()
    for v in values:
        if set(v) != names:
            raise TypeError(
                f"node {node!r} returned different array fields for different items: "
                f"{sorted(names)} vs {sorted(v)}"
            )
    arrays, meta = {}, {}
    for name in sorted(names):
        col = [v[name] for v in values]
        dtypes = {a.dtype.str for a in col}
        if len(dtypes) != 1:
            raise TypeError(f"node {node!r} field {name!r} has mixed dtypes {sorted(dtypes)}")
        shapes = [a.shape for a in col]
        if all(s == shapes[0] for s in shapes):
            arrays[name] = np.stack(col)
            meta[name] = {"layout": "stacked", "dtype": col[0].dtype.str, "shape": shapes[0]}
        else:
            sizes = [a.size for a in col]
            offsets = np.concatenate([[0], np.cumsum(sizes)]).tolist()
            arrays[name] = np.concatenate([a.ravel() for a in col])
            meta[name] = {
                "layout": "ragged",
                "dtype": col[0].dtype.str,
                "shapes": [list(s) for s in shapes],
                "offsets": offsets,
            }
    return arrays, meta


def write_pack(
    store: Store, recipe: Recipe, results: Sequence[ItemResult], extra: dict | None = None
) -> dict:
    """Write one pack of item results and publish its manifest; returns the manifest.

    ``extra`` overrides manifest fields (a rewritten pack keeps its provenance).
    """
    pack_id = uuid.uuid4().hex
    base = f"packs/{recipe.node}/{pack_id}"
    ok = [r for r in results if r.error is None]
    failed = [r for r in results if r.error is not None]
    splits = [_split(r.value) for r in ok]
    arrays, fields = _layout_fields(recipe.node, [s[0] for s in splits])
    attr_names = sorted({k for s in splits for k in s[1]})
    attrs = {a: [_untuple(s[1].get(a)) for s in splits] for a in attr_names}
    if ok and any(s[2] for s in splits):
        raise TypeError(f"node {recipe.node!r}: item nodes cannot return Blobs")
    started = time.time()
    written = _write_arrays(store, base, arrays) if arrays else []
    manifest = {
        "format": FORMAT,
        "kind": "pack",
        "id": pack_id,
        **recipe.to_json(),
        **environment(),
        "pid": os.getpid(),
        "created": time.time(),
        "write_seconds": round(time.time() - started, 6),
        "n": len(ok),
        "ids": [r.id for r in ok],
        "rkeys": "".join(r.rkey.hex() for r in ok),
        "ckeys": "".join(r.ckey.hex() for r in ok),  # type: ignore[union-attr]  # ok: computed
        "inputs": ["".join(k.hex() for k in r.inputs) for r in ok],
        "seconds": [round(r.seconds, 6) for r in ok],
        "fields": fields,
        "attrs": attrs,
        "failures": [
            {
                "id": r.id,
                "rkey": r.rkey.hex(),
                "inputs": "".join(k.hex() for k in r.inputs),
                **r.error,  # type: ignore[dict-item]  # an error: a dict
            }
            for r in failed
        ],
    }
    manifest.update(extra or {})
    _publish(store, base, manifest, written)
    return manifest


_DIGEST = b',"digest":"'


def _publish(store: Store, base: str, manifest: dict, files: list[str]) -> None:
    """Write the manifest, then make sure every chunk it vouches for is still there.

    Something that deletes unpublished files (``flow gc`` with no grace) could
    remove a writer's arrays just before its manifest lands; the manifest is
    then taken back and the write fails (the task is retried), so nothing
    incomplete stays readable.
    """
    store.put(f"{base}.json", _dumps(manifest))
    try:
        for where in files:
            if not store.exists(where):
                raise CorruptObject(f"{where}: chunk file is missing")
    except CorruptObject as e:
        store.delete([f"{base}.json"])
        raise StoreError(f"{base}: arrays vanished while publishing ({e}); retracted") from e


def _dumps(doc: dict) -> bytes:
    """The manifest's JSON, ending in a digest of every byte before it."""
    body = json.dumps(doc, separators=(",", ":"), sort_keys=False).encode()
    digest = bytes_key(body).hex().encode()
    return body[:-1] + _DIGEST + digest + b'"}'


def loads(data: bytes, where: str) -> dict:
    """A manifest, checked: its digest (a flipped bit anywhere is caught), and for a
    pack, that its key lists and per-item lists agree with its item count."""
    cut = data.rfind(_DIGEST)
    if cut > 0 and data.endswith(b'"}'):
        body = data[:cut] + b"}"
        if bytes_key(body).hex().encode() != data[cut + len(_DIGEST) : -2]:
            raise CorruptObject(f"{where}: manifest fails its checksum")
        data = body
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptObject(f"{where}: manifest is not valid JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        fmt = doc.get("format") if isinstance(doc, dict) else None
        raise CorruptObject(f"{where}: not a flow manifest (format {fmt!r})")
    if doc.get("kind") == "pack":
        _check_pack(doc, where)
    return doc


def _check_pack(doc: dict, where: str) -> None:
    try:
        n = doc["n"]
        ok = (
            isinstance(n, int)
            and n >= 0
            and isinstance(doc["created"], int | float)
            and isinstance(doc["id"], str)
            and len(doc["ids"]) == n
            and len(doc["inputs"]) == n
            and len(doc["seconds"]) == n
            and len(doc["rkeys"]) == len(doc["ckeys"]) == 2 * KEY_SIZE * n
            and isinstance(doc["fields"], dict)
            and all(len(col) == n for col in doc["attrs"].values())
        )
        bytes.fromhex(doc["rkeys"])
        bytes.fromhex(doc["ckeys"])
        for f in doc.get("failures", []):
            bytes.fromhex(f["rkey"])
    except (KeyError, TypeError, ValueError, AttributeError):
        ok = False
    if not ok:
        raise CorruptObject(f"{where}: pack manifest is inconsistent")


# --------------------------------------------------------------------------
# reading


@dataclass
class PackReader:
    """Reads items of one pack; keeps its arrays open for repeated reads."""

    store: Store
    node: str
    pack_id: str
    manifest: dict = field(default_factory=dict)
    _arrays: dict = field(default_factory=dict)

    @classmethod
    def open(cls, store: Store, node: str, pack_id: str) -> PackReader:
        where = f"packs/{node}/{pack_id}.json"
        try:
            manifest = loads(store.get(where), where)
        except FileNotFoundError:
            raise StoreError(f"pack {node}/{pack_id} is gone (was it collected?)") from None
        return cls(store, node, pack_id, manifest)

    def _array(self, name: str) -> Any:
        arr = self._arrays.get(name)
        if arr is None:
            import zarr

            base = f"packs/{self.node}/{self.pack_id}"
            zs = self.store.zarr(base, read_only=True)
            arr = zarr.open_array(zs, path=name, mode="r", zarr_format=3)
            meta = self.manifest["fields"][name]
            n = self.manifest["n"]
            want = (n, *meta["shape"]) if meta["layout"] == "stacked" else (meta["offsets"][-1],)
            if tuple(arr.shape) != want or not _same_dtype(arr.dtype, meta["dtype"]):
                raise CorruptObject(
                    f"{base}/{name}: array is {arr.shape} {arr.dtype}, its manifest says "
                    f"{want} {meta['dtype']}"
                )
            _check_chunks(self.store, f"{base}/{name}", arr)
            self._arrays[name] = arr
        return arr

    def read(self, positions: Sequence[int]) -> list[Any]:
        """Values of the items at ``positions`` (in that order)."""
        positions = [int(p) for p in positions]
        fields = self.manifest["fields"]
        cols: dict[str, list[np.ndarray]] = {}
        try:
            for name, meta in fields.items():
                arr = self._array(name)
                if meta["layout"] == "stacked":
                    if len(positions) == self.manifest["n"] and positions == sorted(positions):
                        block = arr[...]
                        rows = positions
                    else:
                        uniq = sorted(set(positions))
                        block = arr.oindex[uniq]
                        where = {p: i for i, p in enumerate(uniq)}
                        rows = [where[p] for p in positions]
                    cols[name] = [np.asarray(block[r]) for r in rows]
                else:
                    offs, shapes = meta["offsets"], meta["shapes"]
                    lo = min(offs[p] for p in positions) if positions else 0
                    hi = max(offs[p + 1] for p in positions) if positions else 0
                    flat = arr[lo:hi]
                    cols[name] = [
                        flat[offs[p] - lo : offs[p + 1] - lo].reshape(shapes[p]) for p in positions
                    ]
        except CorruptObject:
            raise
        except Exception as e:
            raise CorruptObject(f"pack {self.node}/{self.pack_id}: cannot read ({e})") from e
        attrs = self.manifest["attrs"]
        out: list[Any] = []
        for i, p in enumerate(positions):
            if list(fields) == [_BARE] and not attrs:
                out.append(cols[_BARE][i])
                continue
            v: dict[str, Any] = {n: cols[n][i] for n in fields}
            for a, col in attrs.items():
                v[a] = _retuple(col[p])
            out.append(v)
        return out

    def rkey(self, pos: int) -> bytes:
        s = self.manifest["rkeys"]
        return bytes.fromhex(s[pos * 2 * KEY_SIZE : (pos + 1) * 2 * KEY_SIZE])

    def ckey(self, pos: int) -> bytes:
        s = self.manifest["ckeys"]
        return bytes.fromhex(s[pos * 2 * KEY_SIZE : (pos + 1) * 2 * KEY_SIZE])


def _same_dtype(a: Any, b: Any) -> bool:
    """Equal up to byte order (zarr stores little-endian; keys ignore byte order)."""
    return np.dtype(a).newbyteorder("<") == np.dtype(b).newbyteorder("<")


def _chunk_files(path: str, arr: Any) -> list[str]:
    """The chunk (or shard) files of a written array (every one is written)."""
    if not arr.size:
        return []
    import itertools

    grid = [range(math.ceil(n / c)) for n, c in zip(arr.shape, arr.shards or arr.chunks)]
    return [f"{path}/c/{'/'.join(map(str, idx))}" for idx in itertools.product(*grid)]


def _check_chunks(store: Store, path: str, arr: Any) -> None:
    """Every chunk (or shard) file of a stored array must be there."""
    for where in _chunk_files(path, arr):
        if not store.exists(where):
            raise CorruptObject(f"{where}: chunk file is missing")
