"""What runs inside a task (:mod:`engine.worker`), called directly: :func:`run_chain`
and :func:`run_set` with a :class:`TaskContext` and the records of
:mod:`engine.refs` -- no builder, no planner, no executor.

The chain here is the synthetic pipeline's ``parsed -> smoothed`` over small
files; the set step its ``mean_histogram``.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from engine.refs import (
    AllInput,
    ChainWire,
    ExtWire,
    FileRef,
    Keyed,
    ObjectRef,
    OneInput,
    OneWire,
    PackRef,
    Stored,
    ValueRef,
)
from engine.testing import CALLS, histogram, mean_histogram, parsed, smoothed
from engine.worker import (
    ChainItem,
    ChainResult,
    ChainStep,
    Reader,
    SourceChanged,
    TaskContext,
    run_chain,
    run_set,
)
from flow import Items, node
from flow.errors import ItemError
from flow.keys import KEY_SIZE, bytes_key, item_key, items_key, key
from store import open_store
from store.catalog import load_catalog
from store.objects import read_object
from store.outputs import Recipe


def chain_step(name: str, n, wires: tuple, **params) -> ChainStep:
    """Step ``name`` of node ``n`` as a task sees it (what the builder sends)."""
    p = n.params(params)
    prefix = n.prefix(p)
    recipe = Recipe(n.name, name, n.version, n.fingerprint, asdict(p), bytes(prefix).hex())
    return ChainStep(name, n, asdict(p), bytes(prefix), wires, recipe)


PARSED = chain_step("parsed", parsed, (ExtWire(0),))
SMOOTHED = chain_step("smoothed", smoothed, (ChainWire("parsed"),))
CHAIN = [PARSED, SMOOTHED]


class Study:
    """Small files, a store and the task context of that store."""

    def __init__(self, tmp_path: Path, n: int = 4):
        self.folder = tmp_path / "data"
        self.folder.mkdir()
        self.files: list[Path] = []
        for i in range(n):
            self.write(f"f{i}.bin", np.random.default_rng(i).integers(0, 256, 64, np.uint8))
        self.store = open_store(tmp_path / "store")
        self.ctx = TaskContext.of(self.store.url)

    def write(self, name: str, data) -> Path:
        p = self.folder / name
        p.write_bytes(bytes(data))
        if p not in self.files:
            self.files.append(p)
        return p

    def ext(self, p: Path) -> Keyed:
        """The file as an input of the chain: its content key, and where it is."""
        k = bytes_key(p.read_bytes())
        return Keyed(k, FileRef(str(p), k))

    def items(self, n_steps: int = 2) -> list[ChainItem]:
        """Every file as an item of a chain of ``n_steps`` steps, nothing known."""
        return [
            ChainItem(
                p.name, [self.ext(p)], [{} for _ in range(n_steps)], [set() for _ in range(n_steps)]
            )
            for p in self.files
        ]

    def read(self, manifest: dict) -> dict[str, object]:
        """A pack's values by item id."""
        refs = [PackRef(manifest["node"], manifest["id"], i) for i in range(manifest["n"])]
        return dict(zip(manifest["ids"], Reader(self.store).read_many(refs)))


def manifests(res: ChainResult) -> dict[str, dict]:
    return {m["step"]: m for m in res.manifests}


def rkey(step: ChainStep, *inputs: bytes) -> bytes:
    return bytes(item_key(step.prefix, list(inputs)))


def at(m: dict, field: str, item_id: str) -> bytes:
    """The recipe key (``"rkeys"``) or content key (``"ckeys"``) of an item in a pack."""
    i, n = m["ids"].index(item_id), 2 * KEY_SIZE
    return bytes.fromhex(m[field][n * i : n * (i + 1)])


def stored(m: dict, item_id: str) -> dict[bytes, Stored]:
    """An item's output in pack ``m``, as the client sends it: known by recipe key."""
    return {
        at(m, "rkeys", item_id): Stored(at(m, "ckeys", item_id), m["id"], m["ids"].index(item_id))
    }


# --------------------------------------------------------------------------
# run_chain


def test_a_chain_runs_every_step_and_writes_one_pack_per_step(tmp_path):
    s = Study(tmp_path)
    res = run_chain(s.ctx, CHAIN, s.items(), [])
    assert res.computed == {"parsed": 4, "smoothed": 4}
    assert res.reused == res.failed == {"parsed": 0, "smoothed": 0}
    assert set(res.seconds) == {"parsed", "smoothed"}
    packs = manifests(res)
    assert [m["node"] for m in res.manifests] == ["parsed", "smoothed"]
    for p in s.files:
        data = p.read_bytes()
        want_p, want_s = parsed(data), smoothed(parsed(data))
        np.testing.assert_array_equal(s.read(packs["parsed"])[p.name], want_p)
        np.testing.assert_array_equal(s.read(packs["smoothed"])[p.name], want_s)
    # each output under its recipe key: the step prefix and the input content keys
    pk = bytes_key(s.files[2].read_bytes())
    ck_parsed = bytes(key(parsed(s.files[2].read_bytes())))
    assert at(packs["parsed"], "rkeys", "f2.bin") == rkey(PARSED, pk)
    assert at(packs["parsed"], "ckeys", "f2.bin") == ck_parsed
    assert at(packs["smoothed"], "rkeys", "f2.bin") == rkey(SMOOTHED, ck_parsed)


def test_known_outputs_are_reused_not_computed(tmp_path):
    s = Study(tmp_path)
    first = manifests(run_chain(s.ctx, CHAIN, s.items(), []))
    items = s.items()
    for it in items:
        it.known[0] = stored(first["parsed"], it.id)
    calls = dict(CALLS)
    res = run_chain(s.ctx, CHAIN, items, [])
    assert res.reused == {"parsed": 4, "smoothed": 0} and res.computed == {
        "parsed": 0,
        "smoothed": 4,
    }
    assert CALLS["parsed"] == calls["parsed"]  # read from the pack instead
    assert [m["step"] for m in res.manifests] == ["smoothed"]  # nothing new for parsed
    again, before = s.read(res.manifests[0]), s.read(first["smoothed"])
    for p in s.files:
        np.testing.assert_array_equal(again[p.name], before[p.name])


def test_every_output_known_reads_no_source_at_all(tmp_path):
    s = Study(tmp_path, n=2)
    first = manifests(run_chain(s.ctx, CHAIN, s.items(), []))
    items = s.items()
    for it in items:
        it.known = [stored(first[step.name], it.id) for step in CHAIN]
    for p in s.files:
        p.unlink()  # not read: every output is known
    res = run_chain(s.ctx, CHAIN, items, [])
    assert res.manifests == [] and res.computed == {"parsed": 0, "smoothed": 0}
    assert res.reused == {"parsed": 2, "smoothed": 2} and res.failed == {"parsed": 0, "smoothed": 0}


def test_early_cutoff_finds_the_downstream_output_among_the_candidates(tmp_path):
    """``parsed`` is recomputed under new code (another prefix) with the same output:
    ``smoothed``'s recipe key is then one of the candidates the client sent, and is
    reused; a candidate under another key is not."""
    s = Study(tmp_path, n=3)
    first = manifests(run_chain(s.ctx, CHAIN, s.items(), []))
    new_prefix = bytes(key(("new code", PARSED.prefix)))
    new_parsed = dataclasses.replace(PARSED, prefix=new_prefix)
    chain = [new_parsed, SMOOTHED]
    items = s.items()
    for it in items:
        other = {bytes(key(("another recipe", it.id))): Stored(b"x" * KEY_SIZE, "nope", 0)}
        it.known[1] = {**stored(first["smoothed"], it.id), **other}
    items[0].known[1] = {}  # no candidates for this one: computed
    calls = dict(CALLS)
    res = run_chain(s.ctx, chain, items, [])
    assert res.computed == {"parsed": 3, "smoothed": 1} and res.reused == {
        "parsed": 0,
        "smoothed": 2,
    }
    assert CALLS["smoothed"] - calls["smoothed"] == 1
    assert manifests(res)["smoothed"]["ids"] == [items[0].id]


def test_a_failed_recipe_is_not_retried_unless_asked(tmp_path):
    s = Study(tmp_path, n=3)
    items = s.items()
    bad = items[1]
    bad.failed[0] = {rkey(PARSED, bad.ext[0].ckey)}
    res = run_chain(s.ctx, CHAIN, items, [])
    assert res.failed == {"parsed": 1, "smoothed": 0}  # its downstream is blocked, not failed
    assert res.computed == {"parsed": 2, "smoothed": 2}
    assert all(bad.id not in m["ids"] for m in res.manifests)
    assert all(m["failures"] == [] for m in res.manifests)  # nothing new recorded
    items = s.items()
    items[1].failed[0] = set(bad.failed[0])
    res = run_chain(s.ctx, CHAIN, items, [], retry_failed=True)
    assert res.computed == {"parsed": 3, "smoothed": 3} and res.failed == {
        "parsed": 0,
        "smoothed": 0,
    }


def test_a_blocked_input_skips_the_item(tmp_path):
    s = Study(tmp_path, n=3)
    items = s.items()
    items[0].ext[0] = None  # its source is unreadable: the client sends no reference
    res = run_chain(s.ctx, CHAIN, items, [])
    assert res.computed == {"parsed": 2, "smoothed": 2} and res.failed == {
        "parsed": 0,
        "smoothed": 0,
    }
    assert all(items[0].id not in m["ids"] for m in res.manifests)


def test_an_item_error_fails_that_item_only(tmp_path):
    s = Study(tmp_path)
    s.write("f1.bin", b"BAD" + bytes(20))
    res = run_chain(s.ctx, CHAIN, s.items(), [])
    assert res.computed == {"parsed": 3, "smoothed": 3}
    assert res.failed == {"parsed": 1, "smoothed": 0}
    packs = manifests(res)
    [f] = packs["parsed"]["failures"]
    assert (f["id"], f["type"], f["reason"], f["bad_input"], f["transient"]) == (
        "f1.bin", "ItemError", "file starts with BAD", True, False)  # fmt: skip
    assert f["rkey"] == rkey(PARSED, bytes_key(b"BAD" + bytes(20))).hex() and f["traceback"] == ""
    assert "f1.bin" not in packs["parsed"]["ids"] and packs["smoothed"]["failures"] == []
    cat = load_catalog(s.store, "parsed", write_cache=False)
    assert list(cat.failed) == [bytes.fromhex(f["rkey"])]  # remembered as failed


def test_a_bug_is_recorded_with_its_traceback(tmp_path):
    @node(version=1)
    def broken(values: np.ndarray) -> np.ndarray:
        if values.size == 50:
            raise ZeroDivisionError("a bug")
        return values

    s = Study(tmp_path)
    s.write("f2.bin", bytes(50))
    steps = [PARSED, chain_step("broken", broken, (ChainWire("parsed"),))]
    res = run_chain(s.ctx, steps, s.items(), [])
    [f] = manifests(res)["broken"]["failures"]
    assert (f["id"], f["type"], f["reason"], f["bad_input"]) == (
        "f2.bin", "ZeroDivisionError", "a bug", False)  # fmt: skip
    assert 'raise ZeroDivisionError("a bug")' in f["traceback"]
    assert res.computed == {"parsed": 4, "broken": 3} and res.failed["broken"] == 1


def test_a_source_changed_under_the_task_is_a_transient_failure(tmp_path):
    s = Study(tmp_path)
    items = s.items()  # keyed as the files are now
    s.write("f0.bin", b"rewritten since the build planned")
    s.files[3].unlink()
    res = run_chain(s.ctx, CHAIN, items, [])
    assert res.computed == {"parsed": 2, "smoothed": 2}
    fails = {f["id"]: f for f in manifests(res)["parsed"]["failures"]}
    assert set(fails) == {"f0.bin", "f3.bin"}
    for f in fails.values():
        assert (f["type"], f["bad_input"], f["transient"]) == ("SourceChanged", True, True)
    assert "changed while the build was running" in fails["f0.bin"]["reason"]
    assert "disappeared during the build" in fails["f3.bin"]["reason"]
    # transient: reported, not remembered -- the next build plans with the new content
    assert load_catalog(s.store, "parsed", write_cache=False).failed == {}
    assert issubclass(SourceChanged, ItemError) and SourceChanged.transient


def test_an_unreadable_source_fails_its_item_and_is_remembered(tmp_path):
    s = Study(tmp_path, n=2)
    items = s.items()
    os.mkdir(s.folder / "adir")
    items[1].ext[0] = Keyed(bytes(key("a dir")), FileRef(str(s.folder / "adir")))
    res = run_chain(s.ctx, CHAIN, items, [])
    [f] = manifests(res)["parsed"]["failures"]
    assert f["id"] == "f1.bin" and f["type"] == "ItemError" and not f["transient"]
    # stored with the item: no path (a folder may be named after a patient)
    assert f["reason"].startswith("cannot read the source file: ")
    assert str(s.folder) not in f["reason"]
    assert len(load_catalog(s.store, "parsed", write_cache=False).failed) == 1


def test_a_single_value_input_is_read_once_per_task(tmp_path, monkeypatch):
    """One read for every item and every step of the chain that takes it."""

    @node(version=1)
    def shifted(values: np.ndarray, offset: np.ndarray) -> np.ndarray:
        return values - offset[0]

    s = Study(tmp_path)
    reads = []
    real = Reader.read_many

    def counting(self, refs):
        reads.append([type(r).__name__ for r in refs])
        return real(self, refs)

    monkeypatch.setattr(Reader, "read_many", counting)
    offset = Keyed(bytes(key("offset 5")), ValueRef(np.array([5.0], np.float32)))
    steps = [
        PARSED,
        chain_step("shifted", shifted, (ChainWire("parsed"), OneWire(0))),
        chain_step("twice", shifted, (ChainWire("shifted"), OneWire(0))),
    ]
    res = run_chain(s.ctx, steps, s.items(3), [offset])
    assert res.computed == {"parsed": 4, "shifted": 4, "twice": 4}
    assert reads.count(["ValueRef"]) == 1
    once, twice = (
        s.read(manifests(res)["shifted"]),
        s.read(manifests(res)["twice"]),
    )
    for p in s.files:
        np.testing.assert_array_equal(once[p.name], parsed(p.read_bytes()) - 5)
        np.testing.assert_array_equal(twice[p.name], parsed(p.read_bytes()) - 10)
    # the recipe key covers the single value's content key
    ck = bytes(key(parsed(s.files[0].read_bytes())))
    assert at(manifests(res)["shifted"], "rkeys", "f0.bin") == rkey(steps[1], ck, offset.ckey)


# batched nodes: one call for many items; a failing item is isolated

BATCH_CALLS: list[int] = []


@node(version=1, batched=True, batch_size=3)
def summed(values: list, offset: np.ndarray) -> list:
    """Sums of each item's values plus one shared offset, a batch at a time."""
    BATCH_CALLS.append(len(values))
    if any(v.size < 30 for v in values):
        raise ItemError("too short")
    return [np.array([v.sum() + offset[0]], np.float32) for v in values]


def test_a_batched_node_is_called_per_batch_and_isolates_a_failing_item(tmp_path):
    s = Study(tmp_path, n=7)
    s.write("f4.bin", bytes(10))  # too short: its batch fails, then runs item by item
    offset = Keyed(bytes(key("offset 1")), ValueRef(np.array([1.0], np.float32)))
    steps = [PARSED, chain_step("summed", summed, (ChainWire("parsed"), OneWire(0)))]
    BATCH_CALLS.clear()
    res = run_chain(s.ctx, steps, s.items(), [offset])
    # batches of 3: [f0 f1 f2] [f3 f4 f5] [f6]; the second again one by one
    assert BATCH_CALLS == [3, 3, 1, 1, 1, 1]
    assert res.computed == {"parsed": 7, "summed": 6} and res.failed == {"parsed": 0, "summed": 1}
    m = manifests(res)["summed"]
    assert [f["id"] for f in m["failures"]] == ["f4.bin"]
    got = s.read(m)
    for p in s.files:
        if p.name != "f4.bin":
            want = parsed(p.read_bytes()).sum() + 1
            assert got[p.name][0] == pytest.approx(want), p.name


def test_a_batched_node_returning_too_few_outputs_fails_the_items_it_cannot_run(tmp_path):
    @node(version=1, batched=True)
    def short(values: list) -> list:
        return [np.zeros(1, np.float32)] * max(1, len(values) - 1)

    s = Study(tmp_path, n=3)
    steps = [PARSED, chain_step("short", short, (ChainWire("parsed"),))]
    res = run_chain(s.ctx, steps, s.items(), [])
    # the batch call is refused (2 outputs for 3 items); alone, each item gets one
    assert res.computed == {"parsed": 3, "short": 3} and res.failed["short"] == 0


# --------------------------------------------------------------------------
# run_set


def test_run_set_writes_the_object_under_its_recipe_key(tmp_path):
    s = Study(tmp_path)
    hist = chain_step("histogram", histogram, (ChainWire("smoothed"),))
    res = run_chain(s.ctx, [PARSED, SMOOTHED, hist], s.items(3), [])
    m = manifests(res)["histogram"]
    ids = m["ids"]
    ckeys = [at(m, "ckeys", i) for i in ids]
    refs = [PackRef("histogram", m["id"], i) for i in range(len(ids))]
    step = chain_step("mean_histogram", mean_histogram, ())
    digests = [bytes(items_key(ids, ckeys))]
    doc = run_set(s.ctx, step, [AllInput(ids, ckeys, refs)], digests)
    assert "failure" not in doc and doc["step"] == "mean_histogram"
    assert doc["rkey"] == rkey(step, *digests).hex()
    got = read_object(s.store, "mean_histogram", bytes.fromhex(doc["rkey"]))
    hists = Reader(s.store).read_many(refs)
    np.testing.assert_array_equal(got, np.mean([h["hist"] for h in hists], axis=0))
    assert doc["ckey"] == bytes(key(got)).hex()


def test_run_set_with_a_single_value_input_and_a_failure(tmp_path):
    @node(version=1, kind="set")
    def scaled(values: Items, factor: np.ndarray) -> np.ndarray:
        if factor[0] == 0:
            raise ValueError("factor 0")
        return np.array([sum(float(v.sum()) for v in values) * factor[0]])

    s = Study(tmp_path, n=2)
    res = run_chain(s.ctx, [PARSED], s.items(1), [])
    m = manifests(res)["parsed"]
    ids = m["ids"]
    ckeys = [at(m, "ckeys", i) for i in ids]
    values = AllInput(ids, ckeys, [PackRef("parsed", m["id"], i) for i in range(2)])
    step = chain_step("scaled", scaled, ())
    two = OneInput(bytes(key("two")), ValueRef(np.array([2.0])))
    doc = run_set(s.ctx, step, [values, two], [bytes(items_key(ids, ckeys)), two.ckey])
    total = sum(float(parsed(p.read_bytes()).sum()) for p in s.files)
    got = read_object(s.store, "scaled", bytes.fromhex(doc["rkey"]))
    assert got[0] == pytest.approx(2 * total)
    zero = OneInput(bytes(key("zero")), ValueRef(np.array([0.0])))
    doc = run_set(s.ctx, step, [values, zero], [bytes(items_key(ids, ckeys)), zero.ckey])
    f = doc["failure"]
    assert (f["type"], f["reason"], f["bad_input"]) == ("ValueError", "factor 0", False)
    assert "ckey" not in doc and "payload" not in doc  # nothing stored but the failure


# --------------------------------------------------------------------------
# Reader


def test_read_many_reads_every_kind_of_reference_in_order(tmp_path):
    s = Study(tmp_path)
    res = run_chain(s.ctx, CHAIN, s.items(), [])
    packs = manifests(res)
    hist_step = chain_step("mean_histogram", mean_histogram, ())
    model = run_set(s.ctx, hist_step, [AllInput([], [], [])], [bytes(items_key([], []))])
    p = packs["parsed"]
    sm = packs["smoothed"]
    refs = [
        PackRef("smoothed", sm["id"], 2),
        FileRef(str(s.files[1])),
        PackRef("parsed", p["id"], 0),
        ValueRef(("Effusion", "Mass")),
        FileRef(str(s.files[0]), bytes_key(s.files[0].read_bytes())),
        ObjectRef("mean_histogram", bytes.fromhex(model["rkey"])),
        PackRef("parsed", p["id"], 3),
        PackRef("smoothed", sm["id"], 0),
    ]
    reader = Reader(s.store)
    got = reader.read_many(refs)

    def source(name):
        return s.folder.joinpath(name).read_bytes()

    np.testing.assert_array_equal(got[0], smoothed(parsed(source(sm["ids"][2]))))
    assert got[1] == s.files[1].read_bytes() and got[4] == s.files[0].read_bytes()
    np.testing.assert_array_equal(got[2], parsed(source(p["ids"][0])))
    assert got[3] == ("Effusion", "Mass")
    assert got[5].shape == (0,)
    np.testing.assert_array_equal(got[6], parsed(source(p["ids"][3])))
    np.testing.assert_array_equal(got[7], smoothed(parsed(source(sm["ids"][0]))))
    assert set(reader.packs) == {("parsed", p["id"]), ("smoothed", sm["id"])}  # opened once each
    assert reader.read_many([]) == []


def test_read_many_checks_a_file_against_its_key_and_refuses_unknown_references(tmp_path):
    s = Study(tmp_path, n=1)
    reader = Reader(s.store)
    with pytest.raises(SourceChanged, match="changed while the build was running"):
        reader.read_many([FileRef(str(s.files[0]), bytes(key("something else")))])
    with pytest.raises(ValueError, match="unknown value reference"):
        reader.read_many([("pack", "parsed", "x", 0)])  # a tuple is no longer a reference
