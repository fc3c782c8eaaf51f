"""The catalog: which recipe keys a store holds for a node, without opening objects.

Planning needs, for every item of every step, "is this recipe key stored,
and what is its content key?" -- at 100k items, in well under a second.  A
pack manifest lists its items' keys, so the catalog of a node is the union
of its manifests.  Reading every manifest at every build would still be slow
on object storage, so the union is cached in ``cache/catalog/<node>.npz``:

* the cache is never the only copy of anything -- it is rebuilt from the
  manifests, and on every load it is reconciled with one listing of
  ``packs/<node>/`` (manifests added since are read and merged; packs that
  were collected are dropped);
* it is written atomically, and two builds that write it at once each write
  a valid cache (any one of them is a correct subset after reconciliation).

Failed items are cataloged too (their recipe key and pack), so that a build
doesn't retry a deterministic failure unless asked to.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from blake3 import blake3

from flow.errors import CorruptObject
from flow.keys import KEY_SIZE, params_json
from flow.snapshot import Previous, RecipeMemo
from store.abc import Store
from store.packs import loads

_CACHE_VERSION = 2


def _hexcat_to_rows(hexcat: str) -> np.ndarray:
    raw = bytes.fromhex(hexcat)
    return np.frombuffer(raw, dtype=np.uint8).reshape(-1, KEY_SIZE)


@dataclass
class PackInfo:
    """The node-level part of a pack's manifest (kept in the catalog)."""

    id: str
    step: str
    prefix: str
    version: str
    fingerprint: str
    params: str  # JSON of the params, for "params changed" reasons
    created: float


@dataclass
class Catalog:
    """Everything the store holds for one node, as plain arrays.

    Row ``i`` is one stored item: ``rkeys[i]`` (recipe key), ``ckeys[i]``
    (content key), ``pack[i]`` (index into ``packs``), ``pos[i]`` (position in
    that pack), ``ids[i]`` (item id) and ``inputs[i]`` (hex of its input keys).
    ``failed`` maps recipe keys of failed items to their pack index.
    """

    node: str
    packs: list[PackInfo] = field(default_factory=list)
    rkeys: np.ndarray = field(default_factory=lambda: np.zeros((0, KEY_SIZE), np.uint8))
    ckeys: np.ndarray = field(default_factory=lambda: np.zeros((0, KEY_SIZE), np.uint8))
    pack: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    pos: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    ids: list[str] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)
    failed_rkeys: np.ndarray = field(default_factory=lambda: np.zeros((0, KEY_SIZE), np.uint8))
    failed_pack: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    failed_ids: list[str] = field(default_factory=list)
    _index: dict | None = None
    _failed_index: dict | None = None
    _latest: dict | None = None
    _by_id: dict | None = None
    _id_set: set | None = None  # every item id with a row: a cheap "none" for new ids
    _failed_by_id: dict | None = None
    _ckey_list: list | None = None
    _loc: tuple | None = None
    _sorted: tuple | None = None
    _failed_sorted: tuple | None = None
    _uncached: int = 0  # packs added or dropped since the cache file was read or written
    #: remembered recipe keys for the planner (:class:`RecipeMemo`), set by :func:`load_catalog`
    recipes: RecipeMemo | None = None

    # -- lookups --------------------------------------------------------------

    @property
    def index(self) -> dict[bytes, int]:
        """Recipe key -> row (the first stored copy wins)."""
        if self._index is None:
            raw = self.rkeys.tobytes()
            keys = [raw[i : i + KEY_SIZE] for i in range(0, len(raw), KEY_SIZE)]
            idx = dict(zip(reversed(keys), range(len(keys) - 1, -1, -1)))  # first copy wins
            self._index = idx
        return self._index

    @property
    def failed(self) -> dict[bytes, int]:
        """Recipe key of a failed item -> pack index of its failure record."""
        if self._failed_index is None:
            raw = self.failed_rkeys.tobytes()
            self._failed_index = {
                raw[i * KEY_SIZE : (i + 1) * KEY_SIZE]: int(self.failed_pack[i])
                for i in range(len(self.failed_rkeys))
            }
        return self._failed_index

    def lookup_many(self, rkeys: np.ndarray) -> np.ndarray:
        """The row of each recipe key (an ``n x KEY_SIZE`` uint8 array), -1 where absent.

        The vectorized :attr:`index`: the same rows (the first stored copy wins)
        without a dict of every key.
        """
        if self._sorted is None:
            self._sorted = _sorted_keys(self.rkeys)
        return _find(self._sorted, self.rkeys, rkeys)

    def failed_many(self, rkeys: np.ndarray) -> np.ndarray:
        """Whether each recipe key (``n x KEY_SIZE`` uint8) has a failure recorded."""
        if not len(self.failed_rkeys):
            return np.zeros(len(rkeys), bool)
        if self._failed_sorted is None:
            self._failed_sorted = _sorted_keys(self.failed_rkeys)
        return _find(self._failed_sorted, self.failed_rkeys, rkeys) >= 0

    def ckeys_of(self, rows: np.ndarray) -> np.ndarray:
        """The content keys of ``rows`` as an ``n x KEY_SIZE`` uint8 array."""
        return self.ckeys[rows]

    def previous(self, step: str, item_id: str) -> Previous | None:
        """The newest stored recipe of ``item_id`` in ``step`` (for stale reasons)."""
        if self._latest is None and not self._has_id(item_id):
            return None  # a new item: no index needed (yet)
        if self._latest is None:
            latest: dict[tuple[str, str], int] = {}
            steps = [p.step for p in self.packs]
            for row, (pk, iid) in enumerate(zip(self.pack.tolist(), self.ids)):
                latest[(steps[pk], iid)] = row  # rows are in pack creation order
            self._latest = latest
        found = self._latest.get((step, item_id))
        if found is None:
            return None
        row = found
        p = self.packs[int(self.pack[row])]
        return Previous(p.version, p.fingerprint, p.params, self.inputs[row])

    def rows_for(self, step: str, item_id: str) -> list[int]:
        """Stored rows of ``item_id`` in ``step`` (candidates for early cutoff)."""
        if self._by_id is None:
            if not self._has_id(item_id):  # a new item: no index needed (yet)
                return []
            self._by_id = {}
            self._index_ids(0)
        rows = self._by_id.get(item_id)
        if not rows:
            return []
        return [r for r in rows if self.packs[int(self.pack[r])].step == step]

    def _has_id(self, item_id: str) -> bool:
        """Whether any row is of ``item_id`` (a set of the ids, made once)."""
        if self._id_set is None:
            self._id_set = set(self.ids)
        return item_id in self._id_set

    def _index_ids(self, start: int) -> None:
        """Add rows ``start``.. to the rows-per-item-id index."""
        by = self._by_id
        assert by is not None
        for row in range(start, len(self.ids)):
            rows = by.get(self.ids[row])
            if rows is None:
                by[self.ids[row]] = [row]
            else:
                rows.append(row)

    def failed_for(self, step: str, item_id: str) -> set[bytes]:
        """Recipe keys of recorded failures of ``item_id`` in ``step``."""
        if self._failed_by_id is None:
            by: dict[tuple[str, str], set[bytes]] = {}
            steps = [p.step for p in self.packs]
            for i, (pk, iid) in enumerate(zip(self.failed_pack.tolist(), self.failed_ids)):
                by.setdefault((steps[pk], iid), set()).add(self.failed_rkeys[i].tobytes())
            self._failed_by_id = by
        return self._failed_by_id.get((step, item_id), set())

    def ckey(self, row: int) -> bytes:
        if self._ckey_list is None:
            raw = self.ckeys.tobytes()
            self._ckey_list = [raw[i : i + KEY_SIZE] for i in range(0, len(raw), KEY_SIZE)]
        return self._ckey_list[row]

    def location(self, row: int) -> tuple[str, int]:
        if self._loc is None:
            ids = [p.id for p in self.packs]
            self._loc = ([ids[p] for p in self.pack.tolist()], self.pos.tolist())
        return self._loc[0][row], self._loc[1][row]

    def __len__(self) -> int:
        return len(self.rkeys)

    # -- merging ----------------------------------------------------------------

    def _add_manifests(self, docs: list[dict]) -> None:
        first_new = len(self.ids)
        self._uncached += len(docs)
        rk, ck, pk, ps, frk, fpk = (
            [self.rkeys],
            [self.ckeys],
            [self.pack],
            [self.pos],
            [self.failed_rkeys],
            [self.failed_pack],
        )
        for doc in docs:
            p = len(self.packs)
            self.packs.append(
                PackInfo(
                    id=doc["id"],
                    step=doc["step"],
                    prefix=doc["prefix"],
                    version=str(doc["version"]),
                    fingerprint=doc["fingerprint"],
                    params=_params_json(doc["params"]),
                    created=float(doc["created"]),
                )
            )
            n = doc["n"]
            if n:
                rk.append(_hexcat_to_rows(doc["rkeys"]))
                ck.append(_hexcat_to_rows(doc["ckeys"]))
                pk.append(np.full(n, p, np.int32))
                ps.append(np.arange(n, dtype=np.int32))
                self.ids.extend(doc["ids"])
                self.inputs.extend(doc["inputs"])
            # transient failures (a source changing under the build) are reported
            # once, never remembered: the next build tries again
            fails = [f for f in doc.get("failures") or [] if not f.get("transient")]
            if fails:
                frk.append(_hexcat_to_rows("".join(f["rkey"] for f in fails)))
                fpk.append(np.full(len(fails), p, np.int32))
                self.failed_ids.extend(f["id"] for f in fails)
        self.rkeys, self.ckeys = np.concatenate(rk), np.concatenate(ck)
        self.pack, self.pos = np.concatenate(pk), np.concatenate(ps)
        self.failed_rkeys, self.failed_pack = np.concatenate(frk), np.concatenate(fpk)
        if self._by_id is not None:  # rows only grow here: extend it, don't rebuild it
            self._index_ids(first_new)
        if self._id_set is not None:
            self._id_set.update(self.ids[first_new:])
        self._index = self._failed_index = self._latest = None
        self._failed_by_id = self._ckey_list = self._loc = self._sorted = None
        self._failed_sorted = None

    def _keep_packs(self, keep: set[str]) -> None:
        """Drop the rows of packs not in ``keep`` (they were collected)."""
        old = self.packs
        mapping = np.full(len(old) + 1, -1, np.int32)
        new_packs: list[PackInfo] = []
        for i, p in enumerate(old):
            if p.id in keep:
                mapping[i] = len(new_packs)
                new_packs.append(p)
        rows = mapping[self.pack] >= 0
        self.packs = new_packs
        self.rkeys, self.ckeys = self.rkeys[rows], self.ckeys[rows]
        self.pack, self.pos = mapping[self.pack[rows]], self.pos[rows]
        self.ids = [x for x, k in zip(self.ids, rows) if k]
        self.inputs = [x for x, k in zip(self.inputs, rows) if k]
        frows = mapping[self.failed_pack] >= 0
        self.failed_rkeys = self.failed_rkeys[frows]
        self.failed_pack = mapping[self.failed_pack[frows]]
        self.failed_ids = [x for x, k in zip(self.failed_ids, frows) if k]
        self._index = self._failed_index = self._latest = self._by_id = self._id_set = None
        self._failed_by_id = self._ckey_list = self._loc = self._sorted = None
        self._failed_sorted = None

    # -- cache ------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(
            buf,
            version=np.array(_CACHE_VERSION),
            rkeys=self.rkeys,
            ckeys=self.ckeys,
            pack=self.pack,
            pos=self.pos,
            ids=np.array(self.ids, dtype=str),
            inputs=np.array(self.inputs, dtype=str),
            failed_rkeys=self.failed_rkeys,
            failed_pack=self.failed_pack,
            failed_ids=np.array(self.failed_ids, dtype=str),
            packs=np.array(
                [
                    [p.id, p.step, p.prefix, p.version, p.fingerprint, p.params, repr(p.created)]
                    for p in self.packs
                ],
                dtype=str,
            ).reshape(-1, 7),
        )
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, node: str, data: bytes) -> Catalog:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            if int(z["version"]) != _CACHE_VERSION:
                raise ValueError("old catalog cache")
            packs = [PackInfo(r[0], r[1], r[2], r[3], r[4], r[5], float(r[6])) for r in z["packs"]]
            return cls(
                node=node,
                packs=packs,
                rkeys=z["rkeys"].reshape(-1, KEY_SIZE),
                ckeys=z["ckeys"].reshape(-1, KEY_SIZE),
                pack=z["pack"],
                pos=z["pos"],
                ids=z["ids"].tolist(),
                inputs=z["inputs"].tolist(),
                failed_rkeys=z["failed_rkeys"].reshape(-1, KEY_SIZE),
                failed_pack=z["failed_pack"],
                failed_ids=z["failed_ids"].tolist(),
            )


def _hi(keys: np.ndarray) -> np.ndarray:
    """The first 8 bytes of each key as an unsigned big-endian integer (sorts as bytes)."""
    return np.ascontiguousarray(keys[:, :8]).view(">u8").ravel().astype(np.uint64)


def _sorted_keys(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keys ordered by their first 8 bytes, ties in row order: (order, sorted prefixes)."""
    hi = _hi(keys)
    order = np.argsort(hi, kind="stable")
    return order, hi[order]


def _find(
    sorted_keys: tuple[np.ndarray, np.ndarray], keys: np.ndarray, queries: np.ndarray
) -> np.ndarray:
    """The first row of ``keys`` equal to each query (-1 where none)."""
    order, shi = sorted_keys
    n = len(queries)
    out = np.full(n, -1, np.int64)
    if not n or not len(order):
        return out
    queries = np.asarray(queries, np.uint8).reshape(n, KEY_SIZE)
    qhi = _hi(queries)
    qo = np.argsort(qhi)  # sorted queries search faster
    pos = np.empty(n, np.int64)
    pos[qo] = np.searchsorted(shi, qhi[qo])
    inside = pos < len(shi)
    at = np.minimum(pos, len(shi) - 1)
    same_hi = inside & (shi[at] == qhi)
    cand = order[at]
    # the first row with this prefix: a full match is the first copy of that key
    hit = same_hi & (keys[cand] == queries).all(axis=1)
    out[hit] = cand[hit]
    # a prefix shared by different keys (never seen with BLAKE3 keys): walk the run
    for i in np.flatnonzero(same_hi & ~hit).tolist():
        j = int(pos[i])
        while j < len(shi) and shi[j] == qhi[i]:
            r = int(order[j])
            if (keys[r] == queries[i]).all():
                out[i] = r
                break
            j += 1
    return out


def _params_json(params: dict) -> str:
    return params_json(params)


def load_catalog(
    store: Store, node: str, *, write_cache: bool = True, steps: list[str] | None = None
) -> Catalog:
    """The catalog of ``node``, reconciled with the store's current listing, with
    the recipe keys remembered for ``steps`` (every step it has memos of, if None)."""
    try:
        cat = Catalog.from_bytes(node, store.get(_cache_path(node)))
    except Exception:  # none yet, or unreadable: read every manifest
        cat = Catalog(node)
    cat.recipes = load_recipes(store, node, steps)
    refresh_catalog(store, cat, write_cache=write_cache)
    return cat


def refresh_catalog(
    store: Store, cat: Catalog, *, write_cache: bool = True, cache_every: int = 1
) -> None:
    """Bring ``cat`` up to date with the store's listing: packs collected since it
    was read are dropped, packs published since (by any writer) are added.

    The cache file is rewritten once ``cache_every`` packs came or went since it
    was last read or written.  A long-lived process (``flow watch``) that keeps
    its catalogs passes a larger number: each rewrite costs a few ms per 10k
    items, and a stale cache only means reading those few manifests at the next
    cold load.
    """
    node = cat.node
    listing = store.list(f"packs/{node}")
    present = {n[:-5] for n in listing if n.endswith(".json")}
    known = {p.id for p in cat.packs}
    gone = known - present
    if gone:
        cat._keep_packs(present)
        cat._uncached += len(gone)
    new = sorted(present - known)
    if new:
        docs = _read_manifests(store, node, new)
        cat._add_manifests(sorted(docs, key=lambda d: (d["created"], d["id"])))
    if write_cache and cat._uncached >= max(1, cache_every):
        save_catalog(store, cat)


def save_catalog(store: Store, cat: Catalog) -> None:
    """Rewrite ``cat``'s cache file if packs came or went since it was read or
    written.  A build saves the catalogs it loaded when it ends, so that the
    next load finds them whole instead of reading all the build's manifests
    again (which doubled the first no-op after a build of 100k items)."""
    if cat._uncached:
        with contextlib.suppress(OSError):  # a cache we couldn't write: a slower next load
            store.put(_cache_path(cat.node), cat.to_bytes())
            cat._uncached = 0


def _cache_path(node: str) -> str:
    return f"cache/catalog/{node}.npz"


_MEMO_MAGIC = b"flow-recipes-v2\x00"  # v1 (no length, no step name) is ignored


def _memo_path(node: str, step: str) -> str:
    return f"cache/recipes/{node}/{blake3(step.encode()).hexdigest(16)}.bin"


def load_recipes(store: Store, node: str, steps: list[str] | None = None) -> RecipeMemo:
    """The recipe keys the planner derived for ``node``'s steps in earlier
    processes (a :class:`flow.snapshot.RecipeMemo`): a disposable cache.

    Deriving a recipe key is a pure function of the node prefix and the input
    keys (:func:`flow.keys.item_key`), so the keys of a whole step can be
    remembered and reused when the *entire* input is the same again: an entry
    is found by a ``token`` -- the planner's BLAKE3 digest of every derived
    key's full hash input -- and is kept only if a checksum of the stored keys
    matches.  Anything else (no file, a damaged file, a store we can't read)
    means "derive them again"; the cache is never the only copy of anything
    (DESIGN, principle 3).  Stored at ``cache/recipes/<node>/<step digest>.bin``.
    """
    if steps is None:
        try:
            names = [n for n in store.list(f"cache/recipes/{node}") if n.endswith(".bin")]
        except OSError:
            return RecipeMemo()
        wanted: dict[str, str | None] = {f"cache/recipes/{node}/{n}": None for n in names}
    else:
        wanted = {_memo_path(node, st): st for st in steps}
    entries: dict[str, tuple[bytes, bytes]] = {}
    head = len(_MEMO_MAGIC)
    for path, step in wanted.items():
        try:
            data = store.get(path)
        except (FileNotFoundError, OSError):
            continue
        if len(data) < head + 64 + 4 or data[:head] != _MEMO_MAGIC:
            continue
        token, check, rest = data[head : head + 32], data[head + 32 : head + 64], data[head + 64 :]
        if step is None:  # listed: the step's name is stored after the keys' length
            n_keys = int.from_bytes(rest[:4], "little")
            keys, name = rest[4 : 4 + n_keys * KEY_SIZE], rest[4 + n_keys * KEY_SIZE :]
            step = name.decode("utf-8", "surrogateescape")
        else:
            n_keys = int.from_bytes(rest[:4], "little")
            keys = rest[4 : 4 + n_keys * KEY_SIZE]
        if len(keys) != n_keys * KEY_SIZE or blake3(keys).digest() != check:
            continue  # damaged: derive again
        entries[step] = (token, keys)
    return RecipeMemo(entries)


def save_recipes(store: Store, catalogs: dict, plan: Any) -> None:
    """Remember the recipe keys ``plan`` derived anew (:attr:`flow.plan.Plan.memos`):
    in the catalogs' memos, and in the store for later processes."""
    for node, steps in plan.memos.items():
        cat = catalogs.get(node)
        memo = getattr(cat, "recipes", None)
        if memo is None:
            continue
        for step, (token, keys) in steps.items():
            if memo.entries.get(step) == (token, keys):
                continue
            memo.entries[step] = (token, keys)
            name = step.encode("utf-8", "surrogateescape")
            n = (len(keys) // KEY_SIZE).to_bytes(4, "little")
            doc = b"".join((_MEMO_MAGIC, token, blake3(keys).digest(), n, keys, name))
            with contextlib.suppress(OSError):  # only a cache
                store.put(_memo_path(node, step), doc)


def _read_manifests(store: Store, node: str, ids: list[str]) -> list[dict]:
    def one(pid: str) -> dict | None:
        where = f"packs/{node}/{pid}.json"
        try:
            return loads(store.get(where), where)
        except FileNotFoundError:
            return None  # collected between listing and reading
        except CorruptObject:
            return None  # reported by `flow verify`; its items count as missing

    if len(ids) > 8:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(8) as ex:
            docs = list(ex.map(one, ids))
    else:
        docs = [one(i) for i in ids]
    return [d for d in docs if d is not None]
