"""The graph as plain data (:mod:`flow.graph`): steps checked as they are added,
wires by kind, ``replace``, and the pure functions ``toposort``, ``cull`` and
``phases`` -- on small hand-built graphs of the nodes below (no store, no plan).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from flow import Items, node
from flow.graph import Graph, Input, Pin, Step, cull, phases, toposort


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


@node(version=1, kind="set")
def calibrated(vocab, codes: Items):
    """A set node with a single-value input and an all-items input."""
    return np.zeros(1)


@node(version=1)
def weighted(image, weights):
    return image


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


# --------------------------------------------------------------------------
# Input


def test_input_defaults_to_one_item_of_its_step():
    inp = Input("feature")
    assert (inp.step, inp.mode, inp.splits, inp.ids) == ("feature", "item", None, None)


@pytest.mark.parametrize("mode", ["item", "one"])
def test_splits_and_ids_only_on_all_inputs(mode):
    with pytest.raises(ValueError, match=r"only apply to inputs of mode 'all'"):
        Input("feature", mode, ("train",))
    with pytest.raises(ValueError, match=r"only apply to inputs of mode 'all'"):
        Input("feature", mode, ids=["a.png"])
    Input("feature", "all", ("train",), ids=["a.png"])  # fine


def test_input_ids_become_a_frozenset_so_inputs_hash_and_compare():
    a = Input("feature", "all", ids=["b.png", "a.png", "a.png"])
    b = Input("feature", "all", ids={"a.png", "b.png"})
    assert a.ids == frozenset({"a.png", "b.png"}) and isinstance(a.ids, frozenset)
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert Input("feature", "all", ("train",)) != Input("feature", "all", ("val",))
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.mode = "item"  # type: ignore[misc]


# --------------------------------------------------------------------------
# Step


def test_step_kinds_and_per_item():
    g = Graph()
    g.source("files")
    g.source("labels", "values")
    g.source("weights", "file", path="w.onnx")
    g.add(Step("pinned", source="object", pin=Pin("vocabulary", "aa", "bb")))
    g.step("decoded", decoded, "files")
    g.step("vocabulary", vocabulary, "decoded")
    kinds = {n: (s.kind, s.per_item) for n, s in g.items()}
    assert kinds == {
        "files": ("source", True),
        "labels": ("source", True),
        "weights": ("source", False),
        "pinned": ("source", False),
        "decoded": ("item", True),
        "vocabulary": ("set", False),
    }
    assert g["weights"].path == "w.onnx" and g["pinned"].pin == ("vocabulary", "aa", "bb")


def test_step_names_and_descriptions():
    g = Graph()
    g.source("files")
    g.step("small", decoded, "files", params={"scale": 0.5})
    assert g["small"].node_name == "decoded"  # the node's name, not the step's
    assert g["files"].node_name == "files"  # a source has none: its own
    assert g["small"].describe() == "small (decoded v1, item)"
    assert g["files"].describe() == "files (source: files)"


def test_step_params_are_the_node_params_checked_and_filled():
    g = Graph()
    g.source("files")
    g.step("a", decoded, "files", params={"scale": 2})
    assert g["a"].params == decoded.params(scale=2.0) and g["a"].params.scale == 2.0
    g.add(Step("b", node=decoded, inputs=(Input("files"),)))  # no params: the defaults
    assert g["b"].params == decoded.params()
    with pytest.raises(TypeError, match="scal"):
        g.step("c", decoded, "files", params={"scal": 2})
    assert "c" not in g


def test_the_prefix_depends_on_the_params_and_is_computed_once():
    g = Graph()
    g.source("files")
    g.step("a", decoded, "files")
    g.step("b", decoded, "files", params={"scale": 2.0})
    g.step("c", decoded, "files", params={"scale": 1.0})  # the default, spelled out
    assert g["a"].prefix != g["b"].prefix
    assert g["a"].prefix == g["c"].prefix
    assert g["a"].prefix is g["a"].prefix  # kept, not hashed again


# --------------------------------------------------------------------------
# Graph: adding steps


def test_graph_step_wires_by_kind():
    g = pipeline()
    assert g["decoded"].inputs == (Input("files", "item"),)
    assert g["vocabulary"].inputs == (Input("feature", "all", ("train",)),)
    assert g["encoded"].inputs == (Input("feature", "item"), Input("vocabulary", "one"))
    assert g["indexed"].inputs == (Input("encoded", "all"),)
    assert g["files"].kind == "source" and g["files"].per_item and not g["vocabulary"].per_item
    assert g.dependencies("encoded") == ["feature", "vocabulary"]


def test_string_inputs_of_single_value_steps_are_wired_one():
    g = Graph()
    g.source("files")
    g.source("weights", "file", path="w.onnx")
    g.add(Step("pinned", source="object", pin=Pin("vocabulary", "aa", "bb")))
    g.step("w", weighted, "files", "weights")
    g.step("e", encoded, "files", "pinned")
    g.step("c", calibrated, "weights", "w")
    assert g["w"].inputs == (Input("files", "item"), Input("weights", "one"))
    assert g["e"].inputs == (Input("files", "item"), Input("pinned", "one"))
    assert g["c"].inputs == (Input("weights", "one"), Input("w", "all"))


def test_wiring_errors():
    g = pipeline()
    with pytest.raises(ValueError, match="'feature' is per item, wire it as 'item' or 'all'"):
        g.add(Step("x", node=encoded, inputs=(Input("feature"), Input("feature", "one"))))
    with pytest.raises(ValueError, match="'vocabulary' has one value, wire it as 'one'"):
        g.add(Step("x", node=encoded, inputs=(Input("feature"), Input("vocabulary", "item"))))
    with pytest.raises(ValueError, match="input 'nope' is not defined"):
        g.step("x", feature, "nope")
    with pytest.raises(ValueError, match="input 'nope' is not defined"):
        g.add(Step("x", node=feature, inputs=(Input("nope"),)))
    with pytest.raises(ValueError, match="per-item inputs must be 'all'"):
        g.add(Step("x", node=indexed, inputs=(Input("encoded", "item"),)))
    with pytest.raises(ValueError, match="takes inputs"):
        g.step("x", encoded, "feature")
    with pytest.raises(ValueError, match="duplicate step name 'feature'"):
        g.step("feature", feature, "decoded")
    with pytest.raises(ValueError, match="duplicate step name 'files'"):
        g.source("files")
    with pytest.raises(ValueError, match="step 'x' needs a node or a source"):
        g.add(Step("x"))
    assert "x" not in g and len(g) == 6


def test_a_file_source_cannot_be_read_per_item():
    g = Graph()
    g.source("weights", "file", path="w.onnx")
    with pytest.raises(ValueError, match="'weights' has one value, wire it as 'one'"):
        g.add(Step("x", node=decoded, inputs=(Input("weights"),)))
    with pytest.raises(ValueError, match="'weights' has one value, wire it as 'one'"):
        g.add(Step("x", node=indexed, inputs=(Input("weights", "all"),)))


def test_a_graph_made_of_steps_checks_them_in_order():
    good = pipeline()
    again = Graph(good.values())
    assert list(again) == list(good) and all(again[n] is good[n] for n in good)
    with pytest.raises(ValueError, match="step 'decoded': input 'files' is not defined"):
        Graph([good["decoded"], good["files"]])  # an input must come first


def test_a_graph_is_a_read_only_mapping():
    g = pipeline()
    assert len(g) == 6 and "feature" in g and "nope" not in g
    assert list(g) == ["files", "decoded", "feature", "vocabulary", "encoded", "indexed"]
    with pytest.raises(KeyError):
        g["nope"]
    with pytest.raises(TypeError):
        g["x"] = g["feature"]  # type: ignore[index]


# --------------------------------------------------------------------------
# Graph.replace


def test_replace_gives_a_copy_with_the_new_step_in_place():
    g = pipeline()
    new = Step("feature", node=feature, params=feature.params(bins=3), inputs=(Input("decoded"),))
    h = g.replace(new)
    assert list(h) == list(g)  # same order
    assert h["feature"] is new and g["feature"] is not new  # g is untouched
    assert all(h[n] is g[n] for n in g if n != "feature")
    assert h["feature"].prefix != g["feature"].prefix
    assert toposort(h) == toposort(g) and phases(h) == phases(g)


def test_replace_a_fit_by_its_pinned_object():
    """What a pinned fit does: the set step becomes an ``object`` source under the
    same name; downstream still reads it as one value, and it is no longer run."""
    g = pipeline()
    h = g.replace(Step("vocabulary", source="object", pin=Pin("vocabulary", "ab", "cd")))
    assert h["vocabulary"].kind == "source" and h["encoded"].inputs[1] == Input("vocabulary", "one")
    assert phases(g) == [(["decoded", "feature"], ["vocabulary"]), (["encoded"], ["indexed"])]
    # nothing feeds the pinned fit any more: encoded joins the first phase
    assert phases(h) == [(["decoded", "feature", "encoded"], ["indexed"])]
    assert list(cull(h, ["encoded"])) == ["files", "decoded", "feature", "vocabulary", "encoded"]
    assert list(cull(h, ["vocabulary"])) == ["vocabulary"]
    assert h.fingerprint() != g.fingerprint()


def test_replace_checks_names_and_inputs():
    g = pipeline()
    with pytest.raises(KeyError, match="nope"):
        g.replace(Step("nope", source="files"))
    bad = Step("feature", node=feature, inputs=(Input("missing"),))
    with pytest.raises(ValueError, match="step 'feature': input 'missing' is not defined"):
        g.replace(bad)
    assert g["feature"] is not bad  # the original is untouched


def test_replace_may_point_at_a_step_defined_later():
    """A replacement is checked against the whole graph, not the steps before it;
    toposort still puts inputs first -- and finds the cycle a replacement can make
    (``replace`` itself does not look for one)."""
    g = Graph()
    g.source("files")
    g.step("a", decoded, "files")
    g.step("b", feature, "a")
    g.step("c", feature, "files", params={"bins": 2})
    h = g.replace(Step("a", node=decoded, params=decoded.params(), inputs=(Input("c"),)))
    assert list(h) == ["files", "a", "b", "c"]
    assert toposort(h) == ["files", "c", "a", "b"]
    loop = g.replace(Step("a", node=decoded, params=decoded.params(), inputs=(Input("b"),)))
    with pytest.raises(ValueError, match="cycle in graph: a -> b -> a"):
        toposort(loop)


# --------------------------------------------------------------------------
# toposort, cull, phases


def test_toposort():
    g = pipeline()
    order = toposort(g)
    assert order == ["files", "decoded", "feature", "vocabulary", "encoded", "indexed"]
    assert toposort(g) == order
    for name in order:
        assert all(order.index(d) < order.index(name) for d in g.dependencies(name))
    assert toposort(g, ["vocabulary"]) == ["files", "decoded", "feature", "vocabulary"]


def test_toposort_visits_a_shared_input_once_and_follows_wire_order():
    g = Graph()
    g.source("files")
    g.source("weights", "file", path="w")
    g.step("left", decoded, "files")
    g.step("right", feature, "files")
    g.step("joined", encoded, "right", Input("weights", "one"))
    g.step("both", weighted, "left", Input("weights", "one"))
    order = toposort(g, ["joined", "both"])
    assert order == ["files", "right", "weights", "joined", "left", "both"]
    assert len(order) == len(set(order))
    assert toposort(g, ["both", "joined"]) == [
        "files",
        "left",
        "weights",
        "both",
        "right",
        "joined",
    ]


def test_toposort_finds_cycles():
    steps = {
        "a": Step("a", node=feature, inputs=(Input("c"),)),
        "b": Step("b", node=feature, inputs=(Input("a"),)),
        "c": Step("c", node=feature, inputs=(Input("b"),)),
    }
    with pytest.raises(ValueError, match="cycle in graph: a -> c -> b -> a"):
        toposort(steps)
    with pytest.raises(ValueError, match="cycle in graph: a -> a"):
        toposort({"a": Step("a", node=feature, inputs=(Input("a"),))})


def test_cull():
    g = pipeline()
    sub = cull(g, ["vocabulary"])
    assert isinstance(sub, Graph)
    assert list(sub) == ["files", "decoded", "feature", "vocabulary"]
    assert sub["feature"] is g["feature"]
    assert list(cull(g, ["feature", "decoded"])) == ["files", "decoded", "feature"]
    assert list(cull(g, ["indexed"])) == list(g)
    assert list(cull(g, [])) == []
    with pytest.raises(KeyError, match="no step named 'nope'; steps are: files, decoded"):
        cull(g, ["nope"])


def test_cull_keeps_the_steps_of_every_target_and_no_other():
    g = pipeline()
    g.step("other", feature, "decoded", params={"bins": 2})
    g.step("other_vocab", vocabulary, "other")
    sub = cull(g, ["other_vocab", "vocabulary"])
    assert set(sub) == {"files", "decoded", "other", "other_vocab", "feature", "vocabulary"}
    assert phases(sub) == [(["decoded", "other", "feature"], ["other_vocab", "vocabulary"])]


def test_phases_group_item_steps_between_set_steps():
    assert phases(pipeline()) == [
        (["decoded", "feature"], ["vocabulary"]),
        (["encoded"], ["indexed"]),
    ]
    g = Graph()
    g.source("files")
    g.step("decoded", decoded, "files")
    assert phases(g) == [(["decoded"], [])]


def test_phases_of_sources_only_and_of_set_steps_on_sources():
    g = Graph()
    g.source("files")
    g.source("weights", "file", path="w")
    assert phases(g) == []
    g.step("fit", indexed, "files")  # a set step straight on a source
    assert phases(g) == [([], ["fit"])]


def test_a_set_step_reading_another_set_step_runs_after_it_in_the_same_phase():
    g = pipeline()
    g.step("calibrated", calibrated, "vocabulary", "feature")
    got = phases(g)
    assert got[0] == (["decoded", "feature"], ["vocabulary", "calibrated"])
    assert got[1] == (["encoded"], ["indexed"])


def test_an_item_step_waits_only_for_the_set_steps_it_reads():
    """An item step added after a fit, reading only sources, still runs in the
    first phase; one reading a fit of the second phase runs in a third."""
    g = pipeline()
    g.step("late", decoded, "files", params={"scale": 3.0})
    g.step("rescored", encoded, "encoded", "indexed")
    assert phases(g) == [
        (["decoded", "feature", "late"], ["vocabulary"]),
        (["encoded"], ["indexed"]),
        (["rescored"], []),
    ]
    for item_steps, set_steps in phases(g):
        assert all(g[n].kind == "item" for n in item_steps)
        assert all(g[n].kind == "set" for n in set_steps)


def test_every_step_is_in_one_phase_after_its_inputs():
    g = pipeline()
    g.step("late", decoded, "files")
    g.step("rescored", encoded, "encoded", "indexed")
    g.step("calibrated", calibrated, "vocabulary", "feature")
    seen: list[str] = [n for n in g if g[n].kind == "source"]
    for item_steps, set_steps in phases(g):
        for n in item_steps:  # item steps need sources, earlier phases and each other
            assert all(d in seen or d in item_steps for d in g.dependencies(n)), n
        seen += item_steps
        for n in set_steps:
            assert all(d in seen or d in set_steps for d in g.dependencies(n)), n
            seen.append(n)
    assert sorted(seen) == sorted(g)


def test_graph_fingerprint():
    base = pipeline().fingerprint()
    assert pipeline().fingerprint() == base
    assert pipeline({"feature": {"bins": 9}}).fingerprint() != base
    assert pipeline(vocab_splits=("train", "val")).fingerprint() != base
    assert pipeline({"feature": {"bins": 8}}).fingerprint() == base  # the default, spelled out
