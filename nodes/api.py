"""The Python API of a project: status, build, query, eval.

>>> ws = Workspace.open("flow.toml")                       # doctest: +SKIP
>>> report = ws.build(["all"], scheduler="local")         # doctest: +SKIP
>>> hits = ws.query("new_study.dcm", target="cnn", k=10)  # doctest: +SKIP

The command line (``flow build``, ``flow query``, ...) is a thin layer over
this module.  A build scans the sources, plans against the store, runs what
is stale, and then moves each target's ref -- only when its index and item
table are complete, and only if they changed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flow.errors import ConfigError, FlowError
from flow.graph import Graph, cull
from flow.plan import Plan, Status, plan
from flow.project import Project, load_project
from nodes.pipeline import pipeline, ref_value, target_steps

__all__ = ["Workspace"]


@dataclass
class Built:
    report: Any
    moved: dict[str, dict] = field(default_factory=dict)  # target -> new ref entry
    unchanged: list[str] = field(default_factory=list)
    incomplete: dict[str, str] = field(default_factory=dict)  # target -> why not moved


class Workspace:
    """A project and its store, with the graph of its targets."""

    def __init__(self, project: Project):
        self.project = project
        self.store = project.open_store()
        self._graph: tuple[Graph, dict] | None = None
        self._items: tuple | None = None

    @classmethod
    def open(cls, path: str | Path | None = None, *, store: str | None = None) -> Workspace:
        return cls(load_project(path, store=store))

    # -- the graph over the current sources -------------------------------------------

    @property
    def graph(self) -> Graph:
        return self._pipeline()[0]

    @property
    def targets(self) -> dict:
        return self._pipeline()[1]

    def _pipeline(self) -> tuple[Graph, dict]:
        if self._graph is None:
            self._graph = pipeline(self.project)
        return self._graph

    def items(self, refresh: bool = False):
        """(item table, worker sources, metadata) -- scanned once per workspace."""
        if self._items is None or refresh:
            items, sources, meta = self.project.items(self.store)
            for name, step in self.graph.items():
                if step.source == "file":
                    self._add_file_source(items, sources, name, step.path)
            self._items = (items, sources, meta)
        return self._items

    def _add_file_source(self, items, sources, name: str, path: str | None) -> None:
        from flow.keys import file_key

        try:
            k = bytes(file_key(str(path)))
        except OSError as e:
            raise ConfigError(f"{name}: cannot read {path}: {e.strerror or e}") from None
        items.files[name] = k
        sources.one[name] = ("file", str(path), k)

    def subgraph(self, targets: list[str] | str = "all", *, eval: bool = False) -> Graph:
        return cull(self.graph, target_steps(self.targets, targets, eval=eval))

    def _catalogs(self, graph: Graph):
        from store.catalog import ObjectCatalog, load_catalog

        cats = {s.node_name: load_catalog(self.store, s.node_name)
                for s in graph.values() if s.kind == "item"}  # fmt: skip
        objs = {s.node_name: ObjectCatalog(self.store, s.node_name)
                for s in graph.values() if s.kind == "set"}  # fmt: skip
        return cats, objs

    def plan(self, targets: list[str] | str = "all", *, eval: bool = False,
             reasons: bool = True) -> Plan:  # fmt: skip
        """The current state of every step the targets need (reads no arrays)."""
        g = self.subgraph(targets, eval=eval)
        items = self.items()[0]
        cats, objs = self._catalogs(g)
        return plan(g, items, cats, objs, reasons=reasons)

    # -- build ---------------------------------------------------------------------

    def build(
        self,
        targets: list[str] | str = "all",
        *,
        executor: Any = None,
        scheduler: str | None = None,
        workers: int | None = None,
        eval: bool = False,
        retry_failed: bool = False,
        fail_fast: bool = False,
        progress: bool | None = None,
        log: Any = None,
    ) -> Built:
        from flow.schedule import build as run_build
        from flow.schedule import get_executor

        g = self.subgraph(targets, eval=eval)
        items, sources, _ = self.items()
        own = executor is None
        if own:
            executor = get_executor(
                scheduler or self.project.scheduler, workers or self.project.workers
            )
            if log and executor.dashboard:
                log(f"dashboard: {executor.dashboard}")
        try:
            report = run_build(
                g, items, sources, self.store, executor,
                retry_failed=retry_failed, fail_fast=fail_fast, progress=progress,
                batch_size=self.project.batch_size,
                storage_options=self.project.storage_options, log=log,
            )  # fmt: skip
        finally:
            if own:
                executor.close()
        return self._move_refs(g, report, targets, eval=eval)

    def _move_refs(self, g: Graph, report: Any, targets, *, eval: bool) -> Built:
        from store.refs import move_ref, read_ref

        out = Built(report)
        names = list(self.targets) if targets in ("all", ["all"]) else list(targets)
        for t in names:
            steps = self.targets[t]
            ix, tb = (steps["eval_index"], steps["eval_table"]) if eval else (
                steps["index"], steps["table"])  # fmt: skip
            states = [report.after.steps[s].status[0] for s in (ix, tb)]
            if any(s != Status.FRESH for s in states):
                why = Status(max(states)).name.lower()
                out.incomplete[t] = f"index {why}"
                continue
            # items that failed because of their input (a broken file) are left out
            # of the index and reported; items a node's code failed on stop the ref
            upstream = set(cull(g, [ix]))
            bugs = [f for f in report.failures if f.step in upstream and not f.bad_input]
            if bugs:
                out.incomplete[t] = (
                    f"{len(bugs)} item(s) failed with code errors in "
                    f"{', '.join(sorted({f.step for f in bugs}))} (not bad input); fix and "
                    "rebuild with --retry-failed"
                )
                continue
            value, objects = ref_value(g, steps, report.after, eval=eval)
            name = f"eval/{t}" if eval else t
            cur = read_ref(self.store, name)
            if cur is not None and cur.get("value") == value:
                out.unchanged.append(t)
                continue
            if cur is not None and self._index_count(value) == 0 and self._index_count(
                cur["value"]
            ):
                out.incomplete[t] = "the new index would be empty; the current one is kept"
                continue
            out.moved[t] = move_ref(self.store, name, value, objects=objects,
                                    message=f"build of {t}")  # fmt: skip
        return out

    def _index_count(self, value: dict) -> int:
        from store.packs import read_object_manifest

        node, rk = value["index"]
        m = read_object_manifest(self.store, node, bytes.fromhex(rk))
        return int(m["attrs"].get("count", 0)) if m and "attrs" in m else 0

    # -- query and eval --------------------------------------------------------------

    def retriever(self, target: str, *, eval: bool = False):
        from nodes.retrieval import Retriever

        return Retriever.open(self.store, f"eval/{target}" if eval else target)

    def query(self, image: str | Path | bytes, target: str, k: int = 10, **kw: Any) -> list:
        return self.retriever(target).query(image, k=k, **kw)

    def evaluate(self, target: str, k: int | None = None, **kw: Any) -> dict:
        from nodes.retrieval import evaluate

        return evaluate(self, target, k or self.project.eval_k, **kw)


def status_rows(ws: Workspace, targets: list[str] | str = "all") -> list[dict]:
    """Per target and step: counts of fresh/stale/failed items, with reasons."""
    p = ws.plan(targets)
    names = list(ws.targets) if targets in ("all", ["all"]) else list(targets)
    g = ws.subgraph(targets)
    rows = []
    for t in names:
        steps = ws.targets[t]
        sub = cull(g, [steps["index"], steps["table"]])
        for s in sub:
            st = sub[s]
            if st.kind == "source":
                continue
            sp = p.steps[s]
            c = sp.counts()
            rows.append({
                "target": t, "step": s, "node": st.node_name, "kind": st.kind,
                "fresh": c["fresh"], "stale": c["missing"] + c["pending"],
                "failed": c["failed"], "blocked": c["blocked"],
                "reasons": sp.reason_counts(),
            })  # fmt: skip
    return rows


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=False, default=str)


__all__ += ["FlowError", "status_rows"]
