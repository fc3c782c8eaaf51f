"""The planner, a pure function: dict-backed catalogs, no store, no Dask (the graph
it plans is tested in ``test_graph.py``).

A tiny fake executor (:func:`build`) "runs" missing items by recording a
content key for their recipe key, which is all the planner can see of a
store; a ``content`` function decides what a step produces, so early cutoff
(same content from new code) can be staged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import pytest

from flow import Items, node
from flow.graph import Graph, Input
from flow.keys import item_key, items_key, key, params_json
from flow.plan import ItemTable, Status, plan, stale_rows
from flow.snapshot import Previous

F, M, X, B, P = Status.FRESH, Status.MISSING, Status.FAILED, Status.BLOCKED, Status.PENDING


@node(version=1)
def decoded(source, *, scale: float = 1.0):
    return source


@node(version=1)
def feature(image, *, bins: int = 8):
    return image


@node(version=1, kind="set")
def vocabulary(features: Items, *, k: int = 4):
    return np.zeros(k)


@node(version=1)
def encoded(feat, vocab):
    return feat


@node(version=1, kind="set")
def indexed(codes: Items):
    return np.zeros(1)


def pipeline(params: dict | None = None, *, vocab_splits=("train",)) -> Graph:
    """files -> decoded -> feature -> vocabulary(train) -> encoded -> indexed."""
    params = params or {}
    g = Graph()
    g.source("files")
    g.step("decoded", decoded, "files", params=params.get("decoded"))
    g.step("feature", feature, "decoded", params=params.get("feature"))
    g.step(
        "vocabulary",
        vocabulary,
        Input("feature", "all", vocab_splits),
        params=params.get("vocabulary"),
    )
    g.step("encoded", encoded, "feature", "vocabulary")
    g.step("indexed", indexed, "encoded")
    return g


def table(n: int = 4, *, splits=None, broken=()) -> ItemTable:
    ids = [f"img{i}.png" for i in range(n)]
    splits = splits or ["train" if i % 2 == 0 else "test" for i in range(n)]
    keys = [None if i in broken else bytes(key(("file", i))) for i in range(n)]
    return ItemTable(ids, splits, {"files": keys})


@dataclass
class FakeCatalog:
    """What the store holds of one per-item node, as dicts."""

    rows: list[bytes] = field(default_factory=list)
    index: dict[bytes, int] = field(default_factory=dict)
    failed: dict[bytes, int] = field(default_factory=dict)
    prev: dict[tuple[str, str], Previous] = field(default_factory=dict)

    def add(self, rkey: bytes, ckey: bytes) -> None:
        self.index.setdefault(bytes(rkey), len(self.rows))
        self.rows.append(ckey)

    def ckey(self, row: int) -> bytes:
        return self.rows[row]

    def previous(self, step: str, item_id: str) -> Previous | None:
        return self.prev.get((step, item_id))


@dataclass
class FakeObjects:
    objs: dict[bytes, SimpleNamespace] = field(default_factory=dict)
    prev: Previous | None = None

    def get(self, rkey: bytes):
        return self.objs.get(bytes(rkey))

    def previous(self, step: str) -> Previous | None:
        return self.prev


def stores(g: Graph) -> tuple[dict, dict]:
    cats = {s.node_name: FakeCatalog() for s in g.values() if s.kind == "item"}
    objs = {s.node_name: FakeObjects() for s in g.values() if s.kind == "set"}
    return cats, objs


def default_content(step: str, params: str, rkey: bytes, row: int) -> bytes:
    return bytes(key((step, params, rkey)))


def build(g, items, cats, objs, content: Callable = default_content, fail=()) -> list[tuple]:
    """Run every missing instance until the plan is done; returns what ran."""
    ran = []
    for _ in range(len(g) + 1):
        p = plan(g, items, cats, objs)
        if p.done:
            return ran
        for name in p.order:
            sp, step = p.steps[name], g[name]
            for i in p.missing(name):
                ran.append((name, i))
                if step.kind == "item" and (name, i) in fail:
                    cats[step.node_name].failed[bytes(sp.rkeys[i])] = 0
                elif step.kind == "item":
                    ck = content(name, params_json(step.params), sp.rkeys[i], i)
                    cats[step.node_name].add(sp.rkeys[i], ck)
                    # what a real catalog remembers of it (the reasons read it)
                    cats[step.node_name].prev[(name, items.ids[i])] = Previous(
                        str(step.node.version), step.node.fingerprint, params_json(step.params), ""
                    )
                else:
                    ck = content(name, params_json(step.params), sp.rkeys[0], 0)
                    objs[step.node_name].objs[bytes(sp.rkeys[0])] = SimpleNamespace(
                        ckey=ck, failed=False
                    )
    raise AssertionError("build did not converge")


def states(p, name) -> list[Status]:
    return [Status(int(s)) for s in p.steps[name].status]


# --------------------------------------------------------------------------
# states


def test_nothing_stored_is_missing_then_pending():
    g, items = pipeline(), table()
    cats, objs = stores(g)
    p = plan(g, items, cats, objs)
    assert states(p, "files") == [F] * 4
    assert states(p, "decoded") == [M] * 4
    assert p.steps["decoded"].reasons == ["missing"] * 4
    assert states(p, "feature") == [P] * 4 and states(p, "encoded") == [P] * 4
    # waiting on items never built: missing too, not "input changed"
    assert p.steps["feature"].reasons == ["missing"] * 4
    assert states(p, "vocabulary") == [P] and states(p, "indexed") == [P]
    assert p.missing("decoded") == [0, 1, 2, 3] and not p.done
    assert list(stale_rows(p.steps["feature"])) == [0, 1, 2, 3]
    assert p.summary()["decoded"]["missing"] == 4
    assert p.summary()["decoded"]["reasons"] == {"missing": 4}
    assert "files" not in p.summary()


def test_recipe_keys_are_item_keys_of_input_content():
    g, items = pipeline(), table()
    p = plan(g, items, *stores(g))
    sp = p.steps["decoded"]
    assert sp.rkeys == [item_key(g["decoded"].prefix, [k]) for k in items.sources["files"]]
    assert sp.ckeys == [None] * 4


def test_built_is_fresh_and_nothing_reruns():
    g, items = pipeline(), table()
    cats, objs = stores(g)
    ran = build(g, items, cats, objs)
    assert sorted({n for n, _ in ran}) == ["decoded", "encoded", "feature", "indexed", "vocabulary"]
    assert len(ran) == 4 * 3 + 2
    p = plan(g, items, cats, objs)
    assert p.done and all(states(p, n) == [F] * len(p.steps[n].status) for n in p.order)
    row = cats["feature"].index[bytes(p.steps["feature"].rkeys[2])]
    assert p.steps["feature"].ckeys[2] == cats["feature"].ckey(row)
    assert build(g, items, cats, objs) == []


def test_failed_items_block_downstream_and_leave_set_inputs():
    g, items = pipeline(), table()
    cats, objs = stores(g)
    build(g, items, cats, objs, fail={("decoded", 0), ("feature", 3)})
    p = plan(g, items, cats, objs)
    assert states(p, "decoded") == [X, F, F, F]
    assert states(p, "feature") == [B, F, F, X]
    assert states(p, "encoded") == [B, F, F, B]
    voc = p.steps["vocabulary"]
    assert states(p, "vocabulary") == [F] and voc.members == {"feature": [2]}
    assert voc.excluded == 1  # item 0 (train) blocked; item 3 failed but is in "test"
    assert p.steps["indexed"].members == {"encoded": [1, 2]} and p.steps["indexed"].excluded == 2
    assert p.done  # failures are final until retried


def test_retry_failed_turns_failed_into_missing():
    g, items = pipeline(), table()
    cats, objs = stores(g)
    build(g, items, cats, objs, fail={("decoded", 1)})
    p = plan(g, items, cats, objs, retry_failed=True)
    assert states(p, "decoded") == [F, M, F, F]
    assert p.steps["decoded"].reasons[1] == "retry"
    assert states(p, "feature")[1] == P and states(p, "vocabulary") == [F]  # item 1 is "test"
    assert states(p, "indexed") == [P]


def test_unreadable_sources_are_blocked():
    g, items = pipeline(), table(broken={1})
    cats, objs = stores(g)
    build(g, items, cats, objs)
    p = plan(g, items, cats, objs)
    assert states(p, "files") == [F, B, F, F]
    assert states(p, "decoded") == [F, B, F, F] and states(p, "encoded")[1] == B
    assert p.steps["indexed"].members == {"encoded": [0, 2, 3]}


def test_item_table_must_cover_every_source():
    g = pipeline()
    items = table()
    items.sources["files"] = items.sources["files"][:2]
    with pytest.raises(ValueError, match="source 'files'"):
        plan(g, items, *stores(g))


def test_single_file_input():
    @node(version=1)
    def weighted(image, weights):
        return image

    g = Graph()
    g.source("files")
    g.source("weights", "file", path="w.onnx")
    g.step("weighted", weighted, "files", "weights")
    assert g["weighted"].inputs[1] == Input("weights", "one")
    items = table(2)
    items.files["weights"] = bytes(key("w"))
    p = plan(g, items, *stores(g))
    assert states(p, "weighted") == [M, M]
    assert p.steps["weighted"].rkeys[0] == item_key(
        g["weighted"].prefix, [items.sources["files"][0], key("w")]
    )
    items.files["weights"] = None
    p = plan(g, items, *stores(g))
    assert states(p, "weights") == [B] and states(p, "weighted") == [B, B]


# --------------------------------------------------------------------------
# reasons


def _prev_for(g: Graph, name: str, inputs_hex: str, **change) -> Previous:
    s = g[name]
    fields = {
        "version": str(s.node.version),
        "fingerprint": s.node.fingerprint,
        "params": params_json(s.params),
        "inputs": inputs_hex,
    }
    fields.update(change)
    return Previous(**fields)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"version": "0"}, "code changed"),
        ({"fingerprint": "0" * 32}, "code changed"),
        ({"params": '{"scale":3.0}'}, "params changed"),
        ({"inputs": "00" * 16}, "input changed"),
        ({}, "missing"),  # same recipe, but its output is gone (collected)
    ],
)
def test_item_reasons(change, reason):
    g, items = pipeline(), table(1)
    cats, objs = stores(g)
    file_hex = items.sources["files"][0].hex()
    cats["decoded"].prev[("decoded", "img0.png")] = _prev_for(g, "decoded", file_hex, **change)
    p = plan(g, items, cats, objs)
    assert p.steps["decoded"].reasons == [reason]
    assert p.summary()["decoded"]["reasons"] == {reason: 1}
    assert plan(g, items, cats, objs, reasons=False).steps["decoded"].reasons == ["missing"]


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"version": "0"}, "code changed"),
        ({"params": '{"k":5}'}, "params changed"),
        ({"inputs": "ab" * 16}, "input changed"),
        (None, "missing"),
    ],
)
def test_set_reasons(change, reason):
    g, items = pipeline(), table()
    cats, objs = stores(g)
    build(g, items, cats, objs)
    objs["vocabulary"].objs.clear()
    p = plan(g, items, cats, objs)
    digest = b"".join([items_key(*_train(items, p))]).hex()
    if change is not None:
        objs["vocabulary"].prev = _prev_for(g, "vocabulary", digest, **change)
    p = plan(g, items, cats, objs)
    assert states(p, "vocabulary") == [M] and p.steps["vocabulary"].reasons == [reason]


def _train(items, p):
    rows = [i for i, s in enumerate(items.splits) if s == "train"]
    return [items.ids[i] for i in rows], [p.steps["feature"].ckeys[i] for i in rows]


def test_failed_set_step():
    g, items = pipeline(), table()
    cats, objs = stores(g)
    build(g, items, cats, objs)
    p = plan(g, items, cats, objs)
    rk = bytes(p.steps["vocabulary"].rkeys[0])
    objs["vocabulary"].objs[rk] = SimpleNamespace(ckey=None, failed=True)
    p = plan(g, items, cats, objs)
    assert states(p, "vocabulary") == [X] and states(p, "encoded") == [B] * 4
    p = plan(g, items, cats, objs, retry_failed=True)
    assert states(p, "vocabulary") == [M] and p.steps["vocabulary"].reasons == ["retry"]
    assert states(p, "encoded") == [P] * 4


def test_set_step_after_a_failed_set_step_is_blocked():
    g, items = pipeline(), table()
    cats, objs = stores(g)
    build(g, items, cats, objs)
    p = plan(g, items, cats, objs)
    objs["vocabulary"].objs[bytes(p.steps["vocabulary"].rkeys[0])] = SimpleNamespace(
        ckey=None, failed=True
    )
    p = plan(g, items, cats, objs)
    assert states(p, "encoded") == [B] * 4
    assert states(p, "indexed") == [B]


def test_changed_params_rerun_the_step_and_what_follows():
    g, items = pipeline(), table()
    cats, objs = stores(g)
    build(g, items, cats, objs)
    g2 = pipeline({"feature": {"bins": 16}})
    p = plan(g2, items, cats, objs)
    assert states(p, "decoded") == [F] * 4 and states(p, "feature") == [M] * 4
    assert states(p, "encoded") == [P] * 4 and states(p, "vocabulary") == [P]
    ran = build(g2, items, cats, objs)
    assert {n for n, _ in ran} == {"feature", "vocabulary", "encoded", "indexed"}


def test_early_cutoff():
    """New code for `decoded` that produces the same bytes reruns only `decoded`."""
    g, items = pipeline(), table()
    cats, objs = stores(g)

    def same_decoding(step, params, rkey, row):  # decoded's output doesn't depend on `scale`
        if step == "decoded":
            return bytes(key(("decoded", row)))
        return default_content(step, params, rkey, row)

    build(g, items, cats, objs, same_decoding)
    g2 = pipeline({"decoded": {"scale": 2.0}})
    p = plan(g2, items, cats, objs)
    assert states(p, "decoded") == [M] * 4 and states(p, "feature") == [P] * 4
    assert p.steps["feature"].reasons == ["input changed"] * 4
    ran = build(g2, items, cats, objs, same_decoding)
    assert ran == [("decoded", i) for i in range(4)]  # feature and below stayed fresh
    assert plan(g2, items, cats, objs).done


# --------------------------------------------------------------------------
# set steps over splits


def test_set_step_sees_only_its_splits():
    items = table(6, splits=["train", "test", "val", "train", "test", "train"])
    g = pipeline(vocab_splits=("train", "val"))
    cats, objs = stores(g)
    build(g, items, cats, objs, fail={("feature", 5), ("feature", 1)})
    p = plan(g, items, cats, objs)
    voc = p.steps["vocabulary"]
    assert voc.members == {"feature": [0, 2, 3]} and voc.excluded == 1  # 5 failed; 1 is test
    fck = p.steps["feature"].ckeys
    want = item_key(
        g["vocabulary"].prefix,
        [items_key([items.ids[i] for i in (0, 2, 3)], [fck[i] for i in (0, 2, 3)])],
    )
    assert voc.rkeys[0] == want
    # a test-split item changing leaves the vocabulary alone; a train item reruns it
    items.sources["files"][4] = bytes(key("new test file"))
    p = plan(g, items, cats, objs)
    assert states(p, "vocabulary") == [F] and states(p, "decoded")[4] == M
    items.sources["files"][3] = bytes(key("new train file"))
    p = plan(g, items, cats, objs)
    assert states(p, "vocabulary") == [P]


def test_set_step_over_all_splits():
    items = table(4)
    g = pipeline(vocab_splits=None)
    cats, objs = stores(g)
    build(g, items, cats, objs)
    assert plan(g, items, cats, objs).steps["vocabulary"].members == {"feature": [0, 1, 2, 3]}


# --------------------------------------------------------------------------
# the vectorized paths: the store's catalog, the recipe-key cache, set digests


def _keys_matrix(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 16), dtype=np.uint8)


def test_catalog_lookup_many_agrees_with_its_index():
    from store.catalog import Catalog

    rk = _keys_matrix(50, 1)
    rk[10] = rk[3]  # a second copy: the first row wins
    rk[20, :8] = rk[5, :8]  # another key with the same first 8 bytes
    rk[21, :8] = rk[5, :8]
    rk[22] = rk[21]
    cat = Catalog("n", rkeys=rk, ckeys=_keys_matrix(50, 2))
    queries = np.concatenate([rk, _keys_matrix(7, 3), rk[[21, 5, 20, 22]]])
    queries[-1, 15] ^= 1  # same prefix, another key: absent
    want = [cat.index.get(q.tobytes(), -1) for q in queries]
    assert cat.lookup_many(queries).tolist() == want
    assert want[10] == 3 and want[22] == 21 and want[-1] == -1
    assert Catalog("e").lookup_many(queries).tolist() == [-1] * len(queries)
    cat.failed_rkeys, cat.failed_pack = rk[[7, 8]], np.zeros(2, np.int32)
    assert cat.failed_many(queries).tolist() == [q.tobytes() in cat.failed for q in queries]


class _StoreCatalog:
    """A store catalog (lookup_many) built from a FakeCatalog's content."""

    def __init__(self, fake: FakeCatalog, recipes=None):
        from store.catalog import Catalog

        keys = sorted(fake.index, key=fake.index.get)
        rk = np.frombuffer(b"".join(keys), np.uint8).reshape(-1, 16)
        ck = np.frombuffer(b"".join(bytes(fake.ckey(fake.index[k])) for k in keys), np.uint8)
        fr = np.frombuffer(b"".join(fake.failed), np.uint8).reshape(-1, 16)
        self.cat = Catalog("x", rkeys=rk, ckeys=ck.reshape(-1, 16))
        self.cat.failed_rkeys, self.cat.failed_pack = fr, np.zeros(len(fr), np.int32)
        self.cat.recipes = recipes
        self.fake = fake

    def __getattr__(self, name):
        return getattr(self.cat, name)

    def previous(self, step, item_id):
        return self.fake.previous(step, item_id)


def _same_plans(a, b) -> None:
    assert a.order == b.order
    for name in a.order:
        x, y = a.steps[name], b.steps[name]
        assert x.status.tolist() == y.status.tolist(), name
        assert list(x.rkeys) == list(y.rkeys) and x.rkeys == list(y.rkeys), name
        assert list(x.ckeys) == list(y.ckeys), name
        assert x.reasons == y.reasons and x.members == y.members, name


def test_store_catalogs_and_the_recipe_cache_plan_like_dicts(tmp_path):
    from store import open_store
    from store.catalog import load_recipes, save_recipes

    g = pipeline()
    items = table(4)
    cats, objs = stores(g)
    build(g, items, cats, objs, fail=[("feature", 1)])
    st = open_store(tmp_path / "s")

    def fast_catalogs():  # as a new process loads them: the memo from the store
        return {n: _StoreCatalog(c, load_recipes(st, n)) for n, c in cats.items()}

    for retry in (False, True):
        for reasons in (False, True):
            want = plan(g, items, cats, objs, retry_failed=retry, reasons=reasons)
            for _ in range(2):  # the second time from the recipe cache
                fast = fast_catalogs()
                got = plan(g, items, fast, objs, retry_failed=retry, reasons=reasons)
                _same_plans(got, want)
                save_recipes(st, fast, got)
            assert not got.memos  # the second time, nothing was derived anew
    assert states(want, "feature") == [F, M, F, F] and want.steps["feature"].reasons[1] == "retry"
    # a damaged or foreign cache entry is derived again
    path = next(f"cache/recipes/feature/{n}" for n in st.list("cache/recipes/feature"))
    data = bytearray(st.get(path))
    data[-5] ^= 1
    st.put(path, bytes(data))
    fast = fast_catalogs()
    again = plan(g, items, fast, objs)
    _same_plans(again, plan(g, items, cats, objs))
    assert "feature" in again.memos.get("feature", {})  # derived again ...
    save_recipes(st, fast, again)
    assert st.get(path) != bytes(data)  # ... and rewritten
    other = ItemTable(
        items.ids, items.splits, {"files": [bytes(key(("new", i))) for i in range(4)]}
    )
    _same_plans(plan(g, other, fast_catalogs(), objs), plan(g, other, cats, objs))


def test_the_planner_reads_nothing_but_its_arguments(tmp_path):
    """Holdings loaded from a real store, then every method of that store raises:
    plan() still plans (it does no I/O), and returns the recipe keys it derived."""
    from engine.builder import build as run_build
    from engine.builder import load_holdings
    from engine.testing import synthetic_graph, synthetic_inputs, write_synthetic_files
    from store import open_store

    write_synthetic_files(tmp_path / "data", 6)
    real = open_store(tmp_path / "store")
    g = synthetic_graph()
    items, sources = synthetic_inputs(tmp_path / "data", real)
    assert run_build(g, items, sources, real).ok

    class Store:
        """The real store until ``broken``; then any use raises."""

        broken = False

        def __getattr__(self, name):
            if Store.broken:
                raise AssertionError(f"the planner used the store: .{name}")
            return getattr(real, name)

    cats, objs = load_holdings(Store(), g)
    Store.broken = True
    p = plan(g, items, cats, objs, reasons=True)
    assert p.done
    assert all(sp.count(Status.FRESH) == len(sp.status) for sp in p.steps.values())
    # a new planning of the same holdings from scratch: the recipe keys come back
    # in p.memos for the caller to keep (nothing was remembered before: no memo file)
    assert set(p.memos) <= {s.node_name for s in g.values() if s.kind == "item"}


def test_set_digests_match_items_key_for_any_ids():
    from flow.plan import StepPlan, _items_digest

    ck = [bytes(_keys_matrix(1, i)[0]) for i in range(5)]
    sp = StepPlan("u", "item", np.zeros(5, np.int8), ck, ck, [None] * 5)
    for ids in (["a", "bb", "", "d/e.png", "f"], ["é", "b", "c", "\udcff", "x"]):
        for rows in ([0, 1, 2, 3, 4], [1, 3], []):
            got = _items_digest(ids, np.array(rows, np.int64), sp)
            assert got == items_key([ids[i] for i in rows], [ck[i] for i in rows])
            assert _items_digest(ids, np.array(rows, np.int64), sp) == got  # remembered
    # remembered per step plan and row set, and only for the same id list
    assert len(sp._digests) == 3


def test_known_step_plans_are_taken_as_they_are():
    g = pipeline()
    items = table(4)
    cats, objs = stores(g)
    build(g, items, cats, objs, fail=[("feature", 1)])
    full = plan(g, items, cats, objs)
    some = {n: full.steps[n] for n in full.order if n != full.order[-1]}
    again = plan(g, items, cats, objs, known=some)
    _same_plans(again, full)
    assert all(again.steps[n] is some[n] for n in some)  # reused, not derived again
    assert again.steps[full.order[-1]] is not full.steps[full.order[-1]]
