"""The graph is plain data: named steps, each a node applied to inputs.

A :class:`Step` is a node with frozen parameters and a tuple of
:class:`Input` wires.  Steps are not per item: an item step stands for its
node applied to every item of the build, so a graph over a million images
is still a handful of steps (the planner expands items with arrays, not
objects).  Sources are steps too:

* ``files`` -- one file per item; the key is the hash of the file's bytes,
  the value the bytes themselves;
* ``values`` -- one small value per item supplied by the project (e.g. the
  item's labels); the key is :func:`flow.keys.key` of the value;
* ``file`` -- one file for the whole build (a user's weights file);
* ``object`` -- one stored set output, pinned by key (a fit that new items
  must not retrain: it stands in for the fit step, under the same name).

Wires say how an input is seen:

* ``"item"``: item ``i`` of an item step or source (per-item node inputs);
* ``"all"``: every item of an item step as :class:`flow.node.Items`,
  optionally only those whose split is in ``splits`` and/or whose id is in
  ``ids`` (set node inputs; ``ids`` makes index segments);
* ``"one"``: the single output of a set step or ``file`` source.

Functions here are pure: :func:`toposort`, :func:`cull` (the steps a set of
targets needs) and :func:`phases` (item steps grouped between set steps, the
unit the scheduler fuses into one task per batch).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from flow.keys import Key, key
from flow.node import Node

__all__ = ["Graph", "Input", "Pin", "Step", "cull", "phases", "toposort"]

SourceKind = Literal["files", "values", "file", "object"]


class Pin(NamedTuple):
    """The stored object an ``object`` source stands for (hex keys)."""

    node: str
    rkey: str
    ckey: str


@dataclass(frozen=True, slots=True)
class Input:
    """One wire into a step."""

    step: str
    mode: Literal["item", "all", "one"] = "item"
    splits: tuple[str, ...] | None = None  # for mode "all": only these splits
    ids: frozenset[str] | None = None  # for mode "all": only these items (index segments)

    def __post_init__(self) -> None:
        if (self.splits is not None or self.ids is not None) and self.mode != "all":
            raise ValueError("splits= and ids= only apply to inputs of mode 'all'")
        if self.ids is not None and not isinstance(self.ids, frozenset):
            object.__setattr__(self, "ids", frozenset(self.ids))  # hashable, like the rest


@dataclass(frozen=True, eq=False)
class Step:
    """A node with parameters and inputs, or a source."""

    name: str
    node: Node | None = None
    params: Any = None
    inputs: tuple[Input, ...] = ()
    source: SourceKind | None = None
    path: str | None = None  # for a "file" source
    pin: Pin | None = None  # for an "object" source
    _prefix: list = field(default_factory=list, repr=False, compare=False)

    @property
    def kind(self) -> Literal["source", "item", "set"]:
        if self.source is not None:
            return "source"
        assert self.node is not None
        return self.node.kind

    @property
    def per_item(self) -> bool:
        """Whether this step has one value per item."""
        return self.source in ("files", "values") or (self.node is not None and self.kind == "item")

    @property
    def prefix(self) -> Key:
        """The node-level key (computed once: it hashes the node's source code)."""
        if not self._prefix:
            assert self.node is not None
            self._prefix.append(self.node.prefix(self.params))
        return self._prefix[0]

    @property
    def node_name(self) -> str:
        return self.node.name if self.node is not None else self.name

    def describe(self) -> str:
        if self.source:
            return f"{self.name} (source: {self.source})"
        assert self.node is not None
        return f"{self.name} ({self.node.name} v{self.node.version}, {self.kind})"


class Graph(Mapping[str, Step]):
    """Steps by name, checked as they are added (inputs must exist, kinds must fit)."""

    def __init__(self, steps: Iterable[Step] = ()):
        self._steps: dict[str, Step] = {}
        for s in steps:
            self.add(s)

    def __getitem__(self, name: str) -> Step:
        return self._steps[name]

    def __iter__(self):
        return iter(self._steps)

    def __len__(self) -> int:
        return len(self._steps)

    def add(self, step: Step) -> Step:
        if step.name in self._steps:
            raise ValueError(f"duplicate step name {step.name!r}")
        if step.source is None:
            if step.node is None:
                raise ValueError(f"step {step.name!r} needs a node or a source")
            if len(step.inputs) != len(step.node.inputs):
                raise ValueError(
                    f"step {step.name!r}: node {step.node.name!r} takes inputs "
                    f"{step.node.inputs}, got {len(step.inputs)} wires"
                )
            if step.params is None:
                object.__setattr__(step, "params", step.node.params())
        for inp in step.inputs:
            up = self._steps.get(inp.step)
            if up is None:
                raise ValueError(f"step {step.name!r}: input {inp.step!r} is not defined")
            if inp.mode in ("item", "all") and not up.per_item:
                raise ValueError(
                    f"step {step.name!r}: input {inp.step!r} has one value, wire it as 'one'"
                )
            if inp.mode == "one" and up.per_item:
                raise ValueError(
                    f"step {step.name!r}: input {inp.step!r} is per item, wire it as "
                    "'item' or 'all'"
                )
            if inp.mode == "item" and step.kind == "set":
                raise ValueError(f"set step {step.name!r}: per-item inputs must be 'all'")
        self._steps[step.name] = step
        return step

    # convenience builders -------------------------------------------------------

    def source(self, name: str, kind: SourceKind = "files", path: str | None = None) -> str:
        self.add(Step(name=name, source=kind, path=path))
        return name

    def step(
        self,
        name: str,
        node: Node,
        *inputs: str | Input,
        params: Mapping[str, Any] | None = None,
    ) -> str:
        """Add ``node`` as step ``name``; string inputs are wired by kind."""
        wires = []
        for inp in inputs:
            if isinstance(inp, Input):
                wires.append(inp)
                continue
            up = self._steps.get(inp)
            if up is None:
                raise ValueError(f"step {name!r}: input {inp!r} is not defined")
            if not up.per_item:
                wires.append(Input(inp, "one"))
            else:
                wires.append(Input(inp, "item" if node.kind == "item" else "all"))
        self.add(Step(name=name, node=node, params=node.params(params or {}), inputs=tuple(wires)))
        return name

    def replace(self, step: Step) -> Graph:
        """A copy of the graph with ``step`` in place of the step of the same name."""
        if step.name not in self._steps:
            raise KeyError(step.name)
        g = Graph()
        for n, s in self._steps.items():
            if n == step.name:
                g._steps[n] = step  # inputs of a replacement are checked below
            else:
                g._steps[n] = s
        for n, s in g._steps.items():
            for inp in s.inputs:
                if inp.step not in g._steps:
                    raise ValueError(f"step {n!r}: input {inp.step!r} is not defined")
        return g

    def dependencies(self, name: str) -> list[str]:
        return [i.step for i in self._steps[name].inputs]

    def fingerprint(self) -> Key:
        """A key of the whole graph's structure and every step's prefix."""
        parts = []
        for n in toposort(self):
            s = self._steps[n]
            parts.append(
                (
                    n,
                    s.source or "",
                    bytes(s.prefix) if s.node else b"",
                    [(i.step, i.mode, list(i.splits or ())) for i in s.inputs],
                )
            )
        return key(parts)


def toposort(graph: Mapping[str, Step], names: Iterable[str] | None = None) -> list[str]:
    """Step names in dependency order (inputs first); stable for a given graph."""
    wanted = list(graph) if names is None else list(names)
    order: list[str] = []
    state: dict[str, int] = {}

    def visit(n: str, trail: tuple[str, ...]) -> None:
        s = state.get(n)
        if s == 2:
            return
        if s == 1:
            raise ValueError(f"cycle in graph: {' -> '.join((*trail, n))}")
        state[n] = 1
        for inp in graph[n].inputs:
            visit(inp.step, (*trail, n))
        state[n] = 2
        order.append(n)

    for n in wanted:
        visit(n, ())
    return order


def cull(graph: Graph, targets: Iterable[str]) -> Graph:
    """The subgraph of the steps ``targets`` need."""
    targets = list(targets)
    for t in targets:
        if t not in graph:
            raise KeyError(f"no step named {t!r}; steps are: {', '.join(graph)}")
    keep = toposort(graph, targets)
    return Graph(graph[n] for n in keep)


def phases(graph: Mapping[str, Step]) -> list[tuple[list[str], list[str]]]:
    """Group steps into ``(item_steps, set_steps)`` phases in execution order.

    A phase's item steps need only sources, earlier phases and each other, so
    one task can run a batch of items through all of them; its set steps
    follow once every item of the phase is done.
    """
    level: dict[str, int] = {}
    for n in toposort(graph):
        s = graph[n]
        if s.kind == "source":
            level[n] = 0
            continue
        lv = 0
        for inp in s.inputs:
            up = graph[inp.step]
            upl = level[inp.step]
            # an item step after a set step starts the next phase
            lv = max(lv, upl + 1 if (up.kind == "set" and s.kind == "item") else upl)
        if s.kind == "set":
            # a set step runs after the item steps of its own level
            level[n] = lv
        else:
            level[n] = lv
    out: list[tuple[list[str], list[str]]] = []
    for lv in sorted(set(level.values())):
        members = [n for n in toposort(graph) if level[n] == lv and graph[n].kind != "source"]
        items = [n for n in members if graph[n].kind == "item"]
        sets = [n for n in members if graph[n].kind == "set"]
        if items or sets:
            out.append((items, sets))
    return out
