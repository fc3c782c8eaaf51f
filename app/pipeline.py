"""The default medical pipeline: a project's targets as one graph.

::

    files ─ decode ─ normalize ─┬─ descriptors ─┬─ bovw_histogram ───── vector_index[bovw]
                                │   vocabulary ─┘
                                ├─ embedding ──────────────────────────── vector_index[cnn]
                                │   └ embedder (fit on labeled train items, or a weights file)
                                ├─ codes ──────────────────────────────── code_index[codes]
                                │   └ coder (fit: supervised, ITQ without labels)
                                └─ descriptors ─ regions (tiles) ──────── region_index[regions]
                                    vocabulary ─┘  (decode: source shape, study)

Each ``[targets.<name>]`` table has a ``kind`` (``bovw``, ``cnn``, ``codes``
or ``regions``: overlapping tiles of every image, see :mod:`nodes.regions`)
and optional sub-tables of node parameters named after the nodes
(``[targets.cnn.embedder] epochs = 30``); ``[nodes.<node>]`` sets
project-wide defaults.  Steps that come out identical across targets (the
same node, parameters and inputs) are one step, so ``decode`` runs once per
file however many targets read it.  A ``codes`` target re-ranks with the
embedding of the ``cnn`` target it names (``embedding = "cnn"``; the first
``cnn`` target by default).

A target's result is a ref (``refs/<target>``) whose value says everything a
query needs without the project: the index and item table objects, and the
**query chain** -- the item steps from a file's bytes to the vectors the
index holds, with their parameters and the fit objects they read -- so
``flow query`` runs exactly the nodes the build ran, and retrains nothing.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any, NamedTuple

from flow.errors import ConfigError
from flow.graph import Graph, Input, Step, toposort
from flow.node import Node

TARGET_KINDS = ("bovw", "cnn", "codes", "regions")


_NODE_PATHS = {
    "decode": "nodes.decode:decoded",
    "normalize": "nodes.normalize:normalized",
    "descriptors": "nodes.bovw:descriptors",
    "vocabulary": "nodes.bovw:vocabulary",
    "bovw_histogram": "nodes.bovw:bovw_histogram",
    "embedder": "nodes.embed:embedder",
    "embedder_from_weights": "nodes.embed:embedder_from_weights",
    "embedding": "nodes.embed:embedding",
    "coder": "nodes.codes:coder",
    "codes": "nodes.codes:codes",
    "vector_index": "nodes.index:vector_index",
    "code_index": "nodes.index:code_index",
    "item_table": "nodes.table:item_table",
    "regions": "nodes.regions:regions",
    "region_index": "nodes.regions:region_index",
}


class _Nodes(Mapping):
    """The pipeline's nodes by role, imported when first used (a project with
    only a cnn target never imports scikit-image)."""

    def __getitem__(self, role: str) -> Node:
        return load_node(_NODE_PATHS[role])

    def __iter__(self):
        return iter(_NODE_PATHS)

    def __len__(self) -> int:
        return len(_NODE_PATHS)


# target kind -> the node roles it has (its parameter sub-tables)
_ROLES = {
    "bovw": ("decode", "normalize", "descriptors", "vocabulary", "bovw_histogram", "vector_index"),
    "cnn": ("decode", "normalize", "embedder", "embedding", "vector_index"),
    "codes": ("coder", "codes", "code_index"),
    "regions": (
        "decode",
        "normalize",
        "descriptors",
        "vocabulary",
        "regions",
        "region_index",
    ),
}
_TARGET_KEYS = {"kind", "embedding", "weights", "description", "retrain", "segments"}
_KIND_DEFAULTS: dict[str, dict[str, dict]] = {
    # BoVW reads finer structure than the CNN: superpixels need more pixels
    "bovw": {"normalize": {"size": 128}},
    # a tile holds ~25-50 superpixels: 64 words describe it (256 would leave most
    # bins empty) and keep a 100k-image region index (900k regions) at ~230 MB
    "regions": {"normalize": {"size": 128}, "vocabulary": {"words": 64}},
}


class _Builder:
    def __init__(self, project: Any, nodes: Mapping[str, Node]):
        self.p = project
        self.nodes = nodes
        self.g = Graph()
        self.g.source("files", "files")
        self.g.source("labels", "values")
        self._sig: dict[tuple, str] = {}
        self.targets: dict[str, dict[str, str]] = {}

    def params(self, target: str, role: str, kind: str) -> dict:
        out = dict(_KIND_DEFAULTS.get(kind, {}).get(role, {}))
        out.update(self.p.nodes.get(role, {}))
        out.update(self.p.targets[target].get(role, {}))
        return out

    def add(
        self,
        target: str,
        role: str,
        node: Node,
        inputs: tuple[Input, ...],
        params: dict,
        suffix: str = "",
    ) -> str:
        try:
            frozen = node.params(params)
        except TypeError as e:
            raise ConfigError(f"[targets.{target}.{role}]: {e}") from None
        sig = (node.name, repr(asdict(frozen)), inputs)
        if sig in self._sig:
            return self._sig[sig]
        name = node.name if node.name not in self.g else f"{node.name}.{target}{suffix}"
        while name in self.g:
            name += "_"
        self.g.add(Step(name=name, node=node, params=frozen, inputs=inputs))
        self._sig[sig] = name
        return name

    def splits(self, which: tuple[str, ...] | None) -> tuple[str, ...] | None:
        return tuple(which) if which is not None else None

    def front(self, t: str, kind: str) -> str:
        n = self.nodes
        dec = self.add(t, "decode", n["decode"], (Input("files"),), self.params(t, "decode", kind))
        return self.add(
            t, "normalize", n["normalize"], (Input(dec),), self.params(t, "normalize", kind)
        )

    def cnn(self, t: str) -> dict[str, str]:
        n, train = self.nodes, self.splits(self.p.train_splits)
        norm = self.front(t, "cnn")
        weights = self.p.targets[t].get("weights")
        if weights:
            src = f"weights.{t}"
            path = weights if str(weights).startswith("/") else str(self.p.root / weights)
            self.g.add(Step(name=src, source="file", path=path))
            fit = self.add(
                t,
                "embedder",
                n["embedder_from_weights"],
                (Input(src, "one"),),
                self.params(t, "embedder", "cnn"),
            )
        else:
            fit = self.add(
                t,
                "embedder",
                n["embedder"],
                (Input(norm, "all", train), Input("labels", "all", train)),
                self.params(t, "embedder", "cnn"),
            )
        emb = self.add(
            t,
            "embedding",
            n["embedding"],
            (Input(norm), Input(fit, "one")),
            self.params(t, "embedding", "cnn"),
        )
        return {"vectors": emb, "fit": fit}

    def regions(self, t: str) -> dict:
        """decode ─ normalize ─ descriptors ─ regions (with the vocabulary fit); the
        same steps as a bovw target's where the parameters agree (one SLIC run)."""
        n, train, kind = self.nodes, self.splits(self.p.train_splits), "regions"
        dec = self.add(t, "decode", n["decode"], (Input("files"),), self.params(t, "decode", kind))
        norm = self.add(
            t, "normalize", n["normalize"], (Input(dec),), self.params(t, "normalize", kind)
        )
        desc = self.add(
            t, "descriptors", n["descriptors"], (Input(norm),), self.params(t, "descriptors", kind)
        )
        voc = self.add(
            t,
            "vocabulary",
            n["vocabulary"],
            (Input(desc, "all", train),),
            self.params(t, "vocabulary", kind),
        )
        reg = self.add(
            t,
            "regions",
            n["regions"],
            (Input(dec), Input(norm), Input(desc), Input(voc, "one")),
            self.params(t, "regions", kind),
        )
        return {"vectors": reg, "fit": voc, "fits": [voc]}

    def target(self, t: str) -> None:
        spec = self.p.targets[t]
        kind = spec.get("kind", t if t in TARGET_KINDS else None)
        where = f"[targets.{t}]"
        if kind not in TARGET_KINDS:
            raise ConfigError(
                f"{where}: kind must be one of {', '.join(TARGET_KINDS)}, got {kind!r}"
            )
        allowed = (
            _TARGET_KEYS
            | set(_ROLES[kind])
            | ({"decode", "normalize", "embedder", "embedding"} if kind == "codes" else set())
        )
        unknown = sorted(set(spec) - allowed)
        if unknown:
            raise ConfigError(
                f"{where}: unknown key(s) {', '.join(map(repr, unknown))} for kind {kind!r} "
                f"(allowed: {', '.join(sorted(allowed))})"
            )
        n = self.nodes
        train, db = self.splits(self.p.train_splits), self.splits(self.p.database_splits)
        out: dict[str, str] = {"kind": kind}
        if kind == "bovw":
            norm = self.front(t, kind)
            desc = self.add(
                t,
                "descriptors",
                n["descriptors"],
                (Input(norm),),
                self.params(t, "descriptors", kind),
            )
            voc = self.add(
                t,
                "vocabulary",
                n["vocabulary"],
                (Input(desc, "all", train),),
                self.params(t, "vocabulary", kind),
            )
            vec = self.add(
                t,
                "bovw_histogram",
                n["bovw_histogram"],
                (Input(desc), Input(voc, "one")),
                self.params(t, "bovw_histogram", kind),
            )
            out.update(vectors=vec, fit=voc, fits=[voc])
            index_inputs: tuple[Input, ...] = (Input(vec, "all", db),)
            index_node, role = n["vector_index"], "vector_index"
        elif kind == "regions":
            out.update(self.regions(t))
            index_inputs = (Input(out["vectors"], "all", db),)
            index_node, role = n["region_index"], "region_index"
        elif kind == "cnn":
            out.update(self.cnn(t))
            out["fits"] = [out["fit"]]
            index_inputs = (Input(out["vectors"], "all", db),)
            index_node, role = n["vector_index"], "vector_index"
        else:
            base = spec.get("embedding")
            if base is None:
                cnns = [k for k, v in self.p.targets.items() if v.get("kind", k) == "cnn"]
                base = cnns[0] if cnns else None
            if base is not None and self.p.targets.get(base, {}).get("kind", base) != "cnn":
                raise ConfigError(f"{where}: embedding = {base!r} is not a cnn target")
            emb = self.cnn(base if base is not None else t)
            coder = self.add(
                t,
                "coder",
                n["coder"],
                (Input(emb["vectors"], "all", train), Input("labels", "all", train)),
                self.params(t, "coder", kind),
            )
            cod = self.add(
                t,
                "codes",
                n["codes"],
                (Input(emb["vectors"]), Input(coder, "one")),
                self.params(t, "codes", kind),
            )
            out.update(vectors=cod, real=emb["vectors"], fit=coder, fits=[emb["fit"], coder])
            index_inputs = (Input(cod, "all", db), Input(emb["vectors"], "all", db))
            index_node, role = n["code_index"], "code_index"
        out["index"] = self.add(t, role, index_node, index_inputs, self.params(t, role, kind))
        out["index_inputs"] = [i.step for i in index_inputs]
        out["table"] = self.add(t, "item_table", n["item_table"], (Input("labels", "all", db),), {})
        # the same index over the eval database split, for `flow eval`
        ev = self.splits(self.p.eval_database)
        ev_inputs = tuple(Input(i.step, "all", ev) for i in index_inputs)
        out["eval_index"] = self.add(
            t, role, index_node, ev_inputs, self.params(t, role, kind), suffix=".eval"
        )
        out["eval_table"] = self.add(
            t, "item_table", n["item_table"], (Input("labels", "all", ev),), {}, suffix=".eval"
        )
        self.targets[t] = out


def pipeline(project: Any, nodes: Mapping[str, Node] | None = None) -> tuple[Graph, dict]:
    """The graph of every target of ``project`` and, per target, its step names
    (``index``, ``table``, ``vectors``, ``fit``, ``eval_index``, ``eval_table``)."""
    b = _Builder(project, nodes or _Nodes())
    for t in project.targets:
        b.target(t)
    return b.g, b.targets


def target_steps(targets: dict, names: list[str] | str, *, eval: bool = False) -> list[str]:
    """The step names a build of ``names`` (or ``"all"``) must reach."""
    if names == "all" or names == ["all"]:
        names = list(targets)
    if isinstance(names, str):
        names = [names]
    out = []
    for t in names:
        if t not in targets:
            raise ConfigError(f"no target {t!r}; targets are: {', '.join(targets)}")
        out += (
            [targets[t]["eval_index"], targets[t]["eval_table"]]
            if eval
            else [targets[t]["index"], targets[t]["table"]]
        )
    return out


# --------------------------------------------------------------------------
# what a ref records


class ImageWire(NamedTuple):
    """A chain step's input is the query image's bytes (stored as ``["files"]``)."""

    def to_json(self) -> list:
        return ["files"]


class StepWire(NamedTuple):
    """A chain step's input is an earlier chain step's output (``["item", step]``)."""

    step: str

    def to_json(self) -> list:
        return ["item", self.step]


class FitWire(NamedTuple):
    """A chain step's input is a stored object, e.g. the embedder
    (``["object", node, rkey hex]``)."""

    node: str
    rkey: str

    def to_json(self) -> list:
        return ["object", self.node, self.rkey]


QueryWire = ImageWire | StepWire | FitWire


def query_wire(doc: list) -> QueryWire:
    """A query-chain wire as a ref stores it (a JSON list), typed."""
    if doc[:1] == ["files"]:
        return ImageWire()
    if doc[:1] == ["item"] and len(doc) == 2:
        return StepWire(doc[1])
    if doc[:1] == ["object"] and len(doc) == 3:
        return FitWire(doc[1], doc[2])
    raise ValueError(f"not a query-chain wire: {doc!r}")


def _node_path(n: Node) -> str:
    return f"{n.fn.__module__}:{n.fn.__qualname__}"


def load_node(path: str) -> Node:
    """The node at ``module:qualname`` (as recorded in a ref's query chain)."""
    mod, _, name = path.partition(":")
    obj = importlib.import_module(mod)
    for part in name.split("."):
        obj = getattr(obj, part)
    if not isinstance(obj, Node):
        raise ConfigError(f"{path} is not a flow node")
    return obj


def query_chain(graph: Graph, index_step: str, plan: Any) -> list[dict]:
    """The item steps from the files source to the index's per-item inputs,
    with parameters and the fit objects they read (from ``plan``)."""
    wanted: set[str] = set()
    stack = [i.step for i in graph[index_step].inputs]
    while stack:
        s = stack.pop()
        st = graph[s]
        if st.kind != "item" or s in wanted:
            continue
        wanted.add(s)
        stack.extend(i.step for i in st.inputs)
    chain = []
    for s in toposort(graph, sorted(wanted)):
        st = graph[s]
        if st.kind != "item":
            continue
        wires: list[QueryWire] = []
        for i in st.inputs:
            up = graph[i.step]
            if up.source == "files":
                wires.append(ImageWire())
            elif up.kind == "item":
                wires.append(StepWire(i.step))
            elif up.kind == "set":
                wires.append(FitWire(up.node_name, plan.steps[i.step].rkeys[0].hex()))
            elif up.source == "object":
                assert up.pin is not None
                wires.append(FitWire(up.pin.node, up.pin.rkey))
            else:
                raise ConfigError(f"step {s}: input {i.step} cannot be given at query time")
        assert st.node is not None
        chain.append(
            {
                "step": s,
                "node": _node_path(st.node),
                "version": st.node.version,
                "fingerprint": st.node.fingerprint,
                "params": asdict(st.params),
                "wires": [w.to_json() for w in wires],
            }
        )
    return chain


def ref_value(
    graph: Graph,
    kind: str,
    segments: list[tuple[str, str]],
    plan: Any,
) -> tuple[dict, list]:
    """The value a target's ref records (its segments, each an index and an item
    table, and the query chain), and the objects it names."""
    value: dict[str, Any] = {"kind": kind, "segments": []}
    objects: list[tuple[str, str]] = []
    for ix, tb in segments:
        ix_rk = plan.steps[ix].rkeys[0].hex()
        tb_rk = plan.steps[tb].rkeys[0].hex()
        members = plan.steps[ix].members
        count = len(next(iter(members.values()))) if members else 0
        value["segments"].append(
            {
                "index": [graph[ix].node_name, ix_rk],
                "table": [graph[tb].node_name, tb_rk],
                "count": count,
            }
        )
        objects += [(graph[ix].node_name, ix_rk), (graph[tb].node_name, tb_rk)]
    first = segments[0][0]
    value["query"] = query_chain(graph, first, plan)
    value["vectors"] = [i.step for i in graph[first].inputs]
    for c in value["query"]:
        for w in map(query_wire, c["wires"]):
            if isinstance(w, FitWire):
                objects.append((w.node, w.rkey))
    return value, objects
