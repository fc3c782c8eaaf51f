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

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from app.pipeline import pipeline, ref_value, target_steps
from app.project import Project, load_project
from engine.refs import FileRef, ObjectRef
from flow.errors import ConfigError
from flow.graph import Graph, cull
from flow.plan import Plan, Status, plan

__all__ = ["Workspace"]


@dataclass
class Built:
    report: Any
    moved: dict[str, dict] = field(default_factory=dict)  # target -> new ref entry
    unchanged: list[str] = field(default_factory=list)
    incomplete: dict[str, str] = field(default_factory=dict)  # target -> why not moved
    fits: list[str] = field(default_factory=list)  # fit steps whose pin moved

    @property
    def idle(self) -> bool:
        """Nothing was stale: nothing computed, failed or moved."""
        rep = self.report
        return not (
            any(r.computed or r.reused or r.failed for r in rep.steps.values())
            or rep.failures
            or self.moved
            or self.fits
            or self.incomplete
            or rep.interrupted
        )

    def step_rows(self) -> list[dict]:
        """Per step that did something in this build (computed, cut off or failed):
        its counts and time; steps with nothing to do are left out."""
        rep = self.report
        rows = []
        for name, sp in rep.before.steps.items():
            r = rep.steps.get(name)
            if sp.kind == "source" or r is None or not (r.computed or r.reused or r.failed):
                continue
            after = rep.after.steps.get(name)
            rows.append(
                {
                    "step": name,
                    "kind": sp.kind,
                    "computed": r.computed,
                    "cut off": r.reused,
                    "failed": r.failed,
                    "fresh": after.counts()["fresh"] if after is not None else 0,
                    "seconds": r.seconds,
                }
            )
        return rows

    def hints(self) -> list[str]:
        """What a person can do about this build's failures, one line each."""
        from engine.builder import NO_SPLIT_ITEMS

        out = []
        if any(NO_SPLIT_ITEMS in f.reason for f in self.report.failures):
            out.append(
                "an item's split comes from its source's labels CSV (split_column) "
                "or from default_split in [[sources]]; [train] splits names those the "
                "fits learn from"
            )
        return out


class Workspace:
    """A project and its store, with the graph of its targets."""

    def __init__(self, project: Project, *, retrain: bool = False, scans: dict | None = None):
        self.project = project
        self.store = project.open_store()
        self._retrain = retrain
        self._graph: tuple[Graph, dict] | None = None
        self._items: tuple | None = None
        self._scans = scans  # sources scanned already (Project.items)
        self.source_log: Any = None  # progress lines of source listings (DICOMweb)
        #: item catalogs kept warm by a long-lived caller (``flow watch``), by node
        #: name: builds and plans refresh and use them instead of loading them
        self.catalogs: dict | None = None
        #: set (from another thread) to stop a build as a Ctrl-C would
        self.cancel: threading.Event | None = None
        #: what the project's sources gave (``Project.items``), before withdrawn items
        #: and fits are applied: a caller that knows the sources did not change since
        #: (``flow watch``) hands the last one in
        self.scanned: tuple | None = None

    @classmethod
    def open(
        cls, path: str | Path | None = None, *, store: str | None = None, retrain: bool = False
    ) -> Workspace:
        return cls(load_project(path, store=store), retrain=retrain)

    @property
    def retrain(self) -> bool:
        """Ignore pinned fits: refit every target's fits on the current items."""
        return self._retrain

    @retrain.setter
    def retrain(self, value: bool) -> None:
        if value != self._retrain:
            self._retrain, self._graph, self._items = value, None, None

    # -- the graph over the current sources -------------------------------------------

    @property
    def graph(self) -> Graph:
        return self._pipeline()[0]

    @property
    def targets(self) -> dict:
        return self._pipeline()[1]

    def _pipeline(self) -> tuple[Graph, dict]:
        if self._graph is None:
            g, targets = pipeline(self.project)
            self._graph = (self._pin_fits(g, targets), targets)
        return self._graph

    # -- pinned fits ------------------------------------------------------------------

    def _pin_fits(self, g: Graph, targets: dict) -> Graph:
        """Stand each fit in for the object it produced last time, unless its
        recipe (node, version, code, parameters) changed or a target retrains.

        New studies therefore never retrain a vocabulary, embedder or coder by
        themselves; ``retrain = true`` in a target (or ``flow build --retrain``)
        refits on the current training items.
        """
        from flow.graph import Pin, Step
        from store.refs import read_ref

        retrain = set()
        for t, steps in targets.items():
            if self.retrain or self.project.targets[t].get("retrain", False):
                retrain.update(steps.get("fits", []))
        for steps in targets.values():
            for name in steps.get("fits", []):
                if name in retrain or g[name].kind != "set":
                    continue
                ref = read_ref(self.store, f"fits/{name}")
                if ref is None:
                    continue
                v = ref["value"]
                if v.get("prefix") != g[name].prefix.hex() or v.get("node") != g[name].node_name:
                    continue  # the fit's recipe changed: fit again
                if not self.store.exists(f"objects/{v['node']}/{v['rkey']}.json"):
                    continue
                g = g.replace(
                    Step(name=name, source="object", pin=Pin(v["node"], v["rkey"], v["ckey"]))
                )
        return g

    def pinned(self) -> dict[str, tuple[str, str, str]]:
        """Fit steps standing in for a stored object: name -> (node, rkey, ckey)."""
        return {n: s.pin for n, s in self.graph.items() if s.source == "object" and s.pin}

    def _move_fit_refs(self, g: Graph, plan: Plan) -> list[str]:
        from flow.plan import FRESH
        from store.refs import move_ref, read_ref

        moved = []
        fits = {f for steps in self.targets.values() for f in steps.get("fits", [])}
        for name in sorted(fits & set(g)):
            st = g[name]
            sp = plan.steps[name]
            if st.kind != "set" or sp.status[0] != FRESH:
                continue
            n_items = sum(len(r) for r in sp.members.values())
            value = {
                "node": st.node_name,
                "rkey": sp.rkeys[0].hex(),
                "ckey": sp.ckeys[0].hex(),
                "prefix": st.prefix.hex(),
                "items": n_items,
            }
            cur = read_ref(self.store, f"fits/{name}")
            if cur is not None and cur["value"]["rkey"] == value["rkey"]:
                continue
            move_ref(
                self.store,
                f"fits/{name}",
                value,
                objects=[(value["node"], value["rkey"])],
                message=f"fit on {n_items} items",
            )
            moved.append(name)
        return moved

    def forgotten(self) -> dict[str, list[str]]:
        """What ``flow forget`` withdrew: keys of item ids and of file contents (hex).

        Ids are recorded as keys, not names, so the store keeps no trace of a
        withdrawn study's file name either.
        """
        from store.refs import read_ref

        ref = read_ref(self.store, "forgotten")
        v = ref["value"] if ref else {}
        return {"ids": list(v.get("id_keys", [])), "keys": list(v.get("keys", []))}

    def forgotten_ids(self) -> set[str]:
        """Keys of withdrawn item ids (what gc purges)."""
        return set(self.forgotten()["ids"])

    def items(self, refresh: bool = False):
        """(item table, worker sources, metadata) -- scanned once per workspace.

        Items withdrawn with ``flow forget`` (by id or by file content) are left
        out, so no index holds them and no fit trains on them again.
        """
        if self._items is None or refresh:
            if self.scanned is not None and not refresh:
                items, sources, meta = self.scanned
            else:
                items, sources, meta = self.project.items(
                    self.store, scans=self._scans, log=self.source_log
                )
                self.scanned = (items, sources, meta)
            self._scans = None  # a refresh scans again
            gone = self.forgotten()
            if gone["ids"] or gone["keys"]:
                drop = set(gone["ids"])
                items, sources, meta = _without(
                    items,
                    sources,
                    meta,
                    {i for i in items.ids if _id_key(i) in drop},
                    {bytes.fromhex(k) for k in gone["keys"]},
                )
            for name, step in self.graph.items():
                if step.source == "file":
                    self._add_file_source(items, sources, name, step.path)
                elif step.source == "object" and step.pin is not None:
                    node, rk, ck = step.pin
                    items.files[name] = bytes.fromhex(ck)
                    sources.one[name] = ObjectRef(node, bytes.fromhex(rk))
            self._items = (items, sources, meta)
        return self._items

    def shown(self, item_id: str) -> str:
        """What the user knows an item by: its source file, withdrawn ones included
        (the id where the sources do not have it)."""
        import os

        self.items()
        items, _, meta = self.scanned if self.scanned is not None else self.items()
        if "_shown" not in meta:
            meta["_shown"] = dict(zip(items.ids, meta["paths"]))
        p = meta["_shown"].get(item_id)
        if p is None:
            return item_id
        root = str(self.project.root)
        return os.path.relpath(p, root) if p.startswith(root + os.sep) else p

    def _add_file_source(self, items, sources, name: str, path: str | None) -> None:
        from flow.keys import file_key

        try:
            k = bytes(file_key(str(path)))
        except OSError as e:
            raise ConfigError(f"{name}: cannot read {path}: {e.strerror or e}") from None
        items.files[name] = k
        sources.one[name] = FileRef(str(path), k)

    def subgraph(self, targets: list[str] | str = "all", *, eval: bool = False) -> Graph:
        return cull(self.graph, target_steps(self.targets, targets, eval=eval))

    def _catalogs(self, graph: Graph, loaded: dict | None = None):
        from engine.builder import load_holdings

        if loaded is None and self.catalogs is not None:
            from store.catalog import refresh_catalog

            loaded = self.catalogs
            nodes = {s.node_name for s in graph.values() if s.kind == "item"}
            for n in nodes & set(loaded):
                refresh_catalog(self.store, loaded[n], cache_every=32)
            cats, objs = load_holdings(self.store, graph, loaded)
            loaded.update(cats)
            return cats, objs
        return load_holdings(self.store, graph, loaded)

    def _plan(self, graph: Graph, cats: dict, objs: dict, **kw: Any) -> Plan:
        """``plan()`` over loaded holdings; the recipe keys it derives are remembered."""
        from store.catalog import save_recipes

        p = plan(graph, self.items()[0], cats, objs, **kw)
        save_recipes(self.store, cats, p)
        return p

    def plan(
        self, targets: list[str] | str = "all", *, eval: bool = False, reasons: bool = True
    ) -> Plan:
        """The current state of every step the targets need (reads no arrays)."""
        g = self.subgraph(targets, eval=eval)
        cats, objs = self._catalogs(g)
        return self._plan(g, cats, objs, reasons=reasons)

    # -- build ---------------------------------------------------------------------

    def _names(self, targets: list[str] | str) -> list[str]:
        if targets in ("all", ["all"]):
            return list(self.targets)
        names = [targets] if isinstance(targets, str) else list(targets)
        for t in names:
            if t not in self.targets:
                raise ConfigError(f"no target {t!r}; targets are: {', '.join(self.targets)}")
        return names

    def build(
        self,
        targets: list[str] | str = "all",
        *,
        executor: Any = None,
        scheduler: str | None = None,
        cluster: str | None = None,
        workers: int | None = None,
        tls: dict | None = None,
        eval: bool = False,
        compact: bool = False,
        retry_failed: bool = False,
        fail_fast: bool = False,
        progress: bool | None = None,
        log: Any = None,
        catalogs: dict | None = None,
    ) -> Built:
        """Build ``targets``: their item steps and fits, then their index segments
        (see :mod:`app.segments`), then move their refs.  ``eval=True`` builds the
        eval indices instead (one segment over the eval database split).

        ``catalogs``: item catalogs by node name that a long-lived caller keeps
        between builds (``flow watch``); they are brought up to date with the
        store first, missing ones are loaded into it, and the build keeps them
        current.

        ``cluster``: ``"slurm"`` starts the workers as Slurm jobs from the project's
        ``[cluster]`` table (``"local"``: a local cluster of that shape); so does a
        project or ``scheduler`` of ``"slurm"``.  Every job is released at the end."""
        from engine.executors import get_executor, tls_security
        from store.catalog import refresh_catalog

        names = self._names(targets)
        from app.ids import record_scheme

        if log is not None and self.source_log is None:
            self.source_log = log
        record_scheme(self.store, self.items()[2]["scheme"])
        own = executor is None
        if own and (cluster or (scheduler or self.project.scheduler) == "slurm"):
            from engine.cluster import cluster_executor

            executor = cluster_executor(self.project, cluster or "slurm", workers=workers, log=log)
        elif own:

            def started(ex: Any) -> None:
                if log and ex.dashboard:
                    log(f"dashboard: {ex.dashboard}")

            executor = get_executor(
                scheduler or self.project.scheduler,
                workers or self.project.workers,
                lazy=True,
                on_start=started,
                threads_below=self.project.threads_below,
                security=tls_security(**{**self.project.tls, **(tls or {})}),
            )
        kw = dict(
            retry_failed=retry_failed,
            fail_fast=fail_fast,
            progress=progress,
            log=log,
            cancel=self.cancel,
        )
        try:
            if eval:
                g = self.subgraph(names, eval=True)
                report = self._run(g, executor, **kw)
                layout = {
                    t: [(self.targets[t]["eval_index"], self.targets[t]["eval_table"])]
                    for t in names
                }
            else:
                vectors = [v for t in names for v in self.targets[t]["index_inputs"]]
                # the two builds share the item catalogs (the first keeps them
                # current), and the second starts from the first's final plan
                if catalogs is None:
                    catalogs = self.catalogs if self.catalogs is not None else {}
                cats: dict = catalogs
                for cat in cats.values():
                    refresh_catalog(self.store, cat, cache_every=32)
                g = cull(self.graph, vectors)
                first = self._run(g, executor, catalogs=cats, **kw)
                if first.interrupted or first.error:
                    # nothing more runs, no ref moves: what finished is stored
                    return Built(first, incomplete={t: "the build stopped" for t in names})
                # a target whose database items are not all computed (their tasks
                # failed, or --fail-fast stopped the build) gets no index segments:
                # a ref never moves to an index lacking items it should hold
                unfinished = {t: self._unfinished(t, first.after) for t in names}
                ready = [t for t in names if not unfinished[t]]
                g, layout = self._segmented(ready, first.after, compact=compact, catalogs=cats)
                g = cull(g, [s for segs in layout.values() for pair in segs for s in pair])
                second = self._run(g, executor, catalogs=cats, known=first.after.steps, **kw)
                report = _joined(first, second)
                if report.interrupted or report.error:
                    return Built(report, incomplete={t: "the build stopped" for t in names})
        finally:
            if own:
                executor.close()
        if eval:
            ready, unfinished = names, {}
        built = self._move_refs(g, report, ready, layout, eval=eval)
        for t, n in unfinished.items():
            if n:
                built.incomplete[t] = (
                    f"{n} item(s) of its database were not computed (see the failures "
                    "above); rebuild to finish"
                )
        built.fits = self._move_fit_refs(g, report.after)
        return built

    def _database(self) -> np.ndarray:
        """Which items the indices hold (the [database] splits; all by default)."""
        items = self.items()[0]
        if self.project.database_splits is None:
            return np.ones(len(items), bool)
        return items.in_splits(self.project.database_splits)

    def _unfinished(self, target: str, after: Plan) -> int:
        """Database items of ``target`` whose vectors are still to compute in ``after``
        (not failed: those an index leaves out, or that stop its ref)."""
        from flow.plan import MISSING, PENDING

        todo = np.zeros(len(self.items()[0]), bool)
        for v in self.targets[target]["index_inputs"]:
            todo |= np.isin(np.asarray(after.steps[v].status), (MISSING, PENDING))
        return int(np.count_nonzero(todo & self._database()))

    def _run(self, g: Graph, executor: Any, **kw: Any) -> Any:
        from engine.builder import build as run_build
        from engine.sandbox import Limits

        items, sources, _ = self.items()
        limits = Limits(*self.project.item_limits)
        return run_build(
            g,
            items,
            sources,
            self.store,
            executor,
            batch_size=self.project.batch_size,
            storage_options=self.project.storage_options,
            limits=limits if limits.active else None,
            **kw,
        )

    def _segmented(
        self, names: list[str], after: Plan, *, compact: bool, catalogs: dict | None = None
    ):
        """The graph with each target's index segments, and (index, table) per segment.

        ``after``: the current plan of the steps before the segments (taken as it
        is); ``catalogs``: item catalogs already loaded (by node name)."""
        from app.segments import Policy, assign, segment_steps
        from flow.plan import FRESH
        from store.refs import read_ref

        items = self.items()[0]
        g = self.graph
        layout: dict[str, list[tuple[str, str]]] = {}
        for t in names:
            steps = self.targets[t]
            ix, tb = steps["index"], steps["table"]
            db = self.project.database_splits
            fresh = np.ones(len(items), bool)
            for v in steps["index_inputs"]:
                fresh &= np.asarray(after.steps[v].status) == FRESH
            if db is not None:
                fresh &= items.in_splits(db)
            database = (
                list(items.ids)
                if fresh.all()
                else [items.ids[i] for i in np.flatnonzero(fresh).tolist()]
            )
            previous: list[list[str]] = []
            ref = read_ref(self.store, t)
            for seg in (ref or {}).get("value", {}).get("segments", []):
                try:
                    previous.append(_table_ids(self.store, seg["table"][0], seg["table"][1]))
                except Exception:
                    previous.append([])
            ok = [False] * len(previous)
            if previous:
                gp, pairs = segment_steps(cull(g, [ix, tb]), t, ix, tb, previous)
                gp = cull(gp, [s for pair in pairs for s in pair])
                cats, objs = self._catalogs(gp, catalogs)
                pp = self._plan(gp, cats, objs, reasons=False, known=after.steps)
                for j, (a, _) in enumerate(pairs):
                    members = pp.steps[a].members
                    n = len(next(iter(members.values()))) if members else 0
                    ok[j] = pp.steps[a].status[0] == FRESH and n == len(previous[j])
            segs = assign(
                previous,
                ok,
                database,
                Policy.from_target(t, self.project.targets[t]),
                compact=compact,
            )
            if not segs:
                segs = [[]]
            g, pairs = segment_steps(g, t, ix, tb, segs)
            layout[t] = pairs
        return g, layout

    def _move_refs(
        self, g: Graph, report: Any, names: list[str], layout: dict, *, eval: bool
    ) -> Built:
        """Move each target's ref to its new index -- only when the index is complete,
        holds every item the plan says it should, and no node's code failed."""
        from store.refs import move_ref, read_ref

        out = Built(report)
        for t in names:
            pairs = layout[t]
            # items that failed because of their input (a broken file) are left out
            # of the index and reported; items a node's code failed on stop the ref
            upstream = set(cull(g, [s for pair in pairs for s in pair]))
            fails = [f for f in report.failures if f.step in upstream and not f.bad_input]
            unfit = sorted({f.step for f in fails if self._had_no_items(f, report.after)})
            bugs = [f for f in fails if f.step not in unfit]
            if bugs:
                out.incomplete[t] = (
                    f"{len(bugs)} item(s) failed with code errors in "
                    f"{', '.join(sorted({f.step for f in bugs}))} (not bad input); fix and "
                    "rebuild with --retry-failed"
                )
                continue
            if unfit:
                out.incomplete[t] = (
                    f"{', '.join(unfit)} had no items to learn from ({self._why_no_items()}); "
                    "see the preflight (`flow status`)"
                )
                continue
            states = [
                report.after.steps[s].status[0] if s in report.after.steps else Status.MISSING
                for pair in pairs
                for s in pair
            ]
            if any(s != Status.FRESH for s in states):
                why = Status(int(max(states))).name.lower()
                out.incomplete[t] = f"index {why}"
                continue
            value, objects = ref_value(g, self.targets[t]["kind"], pairs, report.after)
            count = sum(seg["count"] for seg in value["segments"])
            lacking = self._lacking(t, report.after, count, eval=eval)
            if lacking:
                out.incomplete[t] = lacking
                continue
            name = f"eval/{t}" if eval else t
            cur = read_ref(self.store, name)
            if cur is not None and cur.get("value") == value:
                out.unchanged.append(t)
                continue
            out.moved[t] = move_ref(
                self.store,
                name,
                value,
                objects=objects,
                message=f"build of {t}: {count} items in {len(value['segments'])} segment(s)",
            )
        return out

    def _had_no_items(self, failure: Any, after: Plan) -> bool:
        """Whether a failure is a set step's that had no input items at all (a fit
        with nothing to learn from: the data's fault, not the code's)."""
        from engine.builder import NO_SPLIT_ITEMS

        if NO_SPLIT_ITEMS in failure.reason:
            return True
        sp = after.steps.get(failure.step)
        return (
            failure.id == "<set>"
            and sp is not None
            and sp.kind == "set"
            and bool(sp.members)
            and not any(len(rows) for rows in sp.members.values())
        )

    def _why_no_items(self) -> str:
        items, _, meta = self.items()
        if not len(items):
            return (
                "every item was withdrawn with flow forget"
                if meta.get("forgotten")
                else "the sources hold no image files"
            )
        train = self.project.train_splits
        if not items.in_splits(train).any():
            return f"no item is in the [train] split(s) {', '.join(map(repr, train))}"
        return "every training item failed"

    def _lacking(self, target: str, after: Plan, count: int, *, eval: bool) -> str:
        """Why an index of ``count`` items must not be served ("" if it may): it lacks
        items the plan says it holds, or holds none while the sources have some."""
        from flow.plan import FRESH

        items, _, meta = self.items()
        if eval:
            return "" if count or not len(items) else "the evaluation index would be empty"
        db = self._database()
        fresh = db.copy()
        for v in self.targets[target]["index_inputs"]:
            fresh &= np.asarray(after.steps[v].status) == FRESH
        want = int(np.count_nonzero(fresh))
        if count < want:
            return f"the new index holds {count} items, its database {want}: rebuild to finish"
        if count:
            return ""
        if not len(items):
            if meta.get("forgotten"):
                return ""  # every item withdrawn: an empty index is the truth
            return "the sources hold no image files (see `flow status`)"
        if not db.any():
            splits = ", ".join(map(repr, self.project.database_splits or ()))
            return f"no item is in the [database] split(s) {splits}: the index would be empty"
        return "every item of its database failed: the index would be empty"

    # -- forget ----------------------------------------------------------------------

    def forget(
        self, paths: list[str] = (), ids: list[str] = (), studies: list[str] = (), reason: str = ""
    ) -> list[str]:
        """Withdraw items (by source path -- a file or a folder --, item id, or DICOM
        StudyInstanceUID) from every index.  Returns the ids withdrawn; the next
        build makes refs without them and ``flow gc --delete`` purges their data."""
        import os

        from store.refs import move_ref

        items, _, meta = self.items(refresh=True)
        chosen: set[int] = set()
        for p in paths:
            real = os.path.realpath(p)
            hit = [
                i
                for i, q in enumerate(meta["paths"])
                if q == real or q.startswith(real.rstrip("/") + "/")
            ]
            if not hit:
                raise ConfigError(f"forget: {p} is not a source file or folder of this project")
            chosen.update(hit)
        for iid in ids:
            if iid not in items.ids:
                raise ConfigError(f"forget: no item with id {iid!r}")
            chosen.add(items.ids.index(iid))
        if studies:
            from nodes.decode import dicom_identifiers

            want = set(studies)
            for i, path in enumerate(meta["paths"]):
                try:
                    if dicom_identifiers(path).get("StudyInstanceUID") in want:
                        chosen.add(i)
                except Exception:
                    continue
        if not chosen:
            raise ConfigError("forget: nothing matched")
        gone = self.forgotten()
        new_ids = sorted({items.ids[i] for i in chosen})
        keys = {
            items.sources["files"][i].hex() for i in chosen if items.sources["files"][i] is not None
        }
        value = {
            "id_keys": sorted(set(gone["ids"]) | {_id_key(i) for i in new_ids}),
            "keys": sorted(set(gone["keys"]) | keys),
        }
        move_ref(self.store, "forgotten", value, message=reason or f"forget {len(new_ids)} item(s)")
        self._items = None
        return new_ids

    # -- query and eval --------------------------------------------------------------

    def retriever(self, target: str, *, eval: bool = False):
        from app.retrieval import Retriever

        return Retriever.open(self.store, f"eval/{target}" if eval else target)

    def query(self, image: str | Path | bytes, target: str, k: int = 10, **kw: Any) -> list:
        return self.retriever(target).query(image, k=k, **kw)

    def evaluate(self, target: str, k: int | None = None, **kw: Any) -> dict:
        from app.evaluation import evaluate

        return evaluate(self, target, k or self.project.eval_k, **kw)


_TABLE_IDS: dict[tuple[str, str, str], list[str]] = {}


def _table_ids(store: Any, node: str, rkey: str) -> list[str]:
    """The item ids of a stored item table; an object never changes under its key,
    so a long-lived process (``flow watch``) reads each one once."""
    from store.objects import read_object

    k = (store.url, node, rkey)
    ids = _TABLE_IDS.get(k)
    if ids is None:
        ids = list(read_object(store, node, bytes.fromhex(rkey))["ids"])
        if len(_TABLE_IDS) > 64:
            _TABLE_IDS.clear()
        _TABLE_IDS[k] = ids
    return ids


def item_paths(path: str | Path | None = None, store: str | None = None) -> dict[str, str]:
    """Item id -> source file of the project at ``path``, or {} where there is no
    project at hand (a query against a store alone)."""
    try:
        ws = Workspace.open(path, store=store)
        items, _, meta = ws.items()
        return dict(zip(items.ids, meta["paths"]))
    except Exception:
        return {}


def known_items(
    path: str | Path | None = None, store: str | None = None
) -> tuple[dict[str, str], dict[str, tuple[str, tuple[str, ...]]]]:
    """(item id -> source file, source file -> (item id, labels)) of the project at
    ``path``; empty where there is no project at hand (a store alone)."""
    try:
        ws = Workspace.open(path, store=store)
        items, _, meta = ws.items()
    except Exception:
        return {}, {}
    by_path = {p: (i, tuple(lab)) for i, p, lab in zip(items.ids, meta["paths"], meta["labels"])}
    return dict(zip(items.ids, meta["paths"])), by_path


def _id_key(item_id: str) -> str:
    from store.maintenance import id_key  # a build that forgets nothing never needs it

    return id_key(item_id)


def _without(items: Any, sources: Any, meta: dict, ids: set[str], keys: set[bytes]):
    """The item table without the given ids and source keys."""
    from engine.builder import SourceRefs
    from flow.plan import ItemTable

    files = items.sources["files"]
    keep = [i for i, iid in enumerate(items.ids) if iid not in ids and files[i] not in keys]
    pos = {old: new for new, old in enumerate(keep)}
    out = ItemTable(
        ids=[items.ids[i] for i in keep],
        splits=[items.splits[i] for i in keep],
        sources={k: [v[i] for i in keep] for k, v in items.sources.items()},
        files=items.files,
        source_errors={
            k: {pos[i]: r for i, r in v.items() if i in pos} for k, v in items.source_errors.items()
        },
    )
    src = SourceRefs({k: [v[i] for i in keep] for k, v in sources.refs.items()}, sources.one)
    m = {
        k: ([v[i] for i in keep] if isinstance(v, list) else v)
        for k, v in meta.items()
        if k != "_shown"
    }
    m["forgotten"] = len(items.ids) - len(keep)
    return out, src, m


def _joined(first: Any, second: Any) -> Any:
    """One report for a build that ran in two stages (items, then segments)."""
    from flow.plan import Plan as P

    out = second
    steps = dict(second.before.steps)
    steps.update(first.before.steps)
    out.before = P(steps, list(dict.fromkeys(first.before.order + second.before.order)))
    for name, r in first.steps.items():
        out.steps.setdefault(name, r)
    # the second stage finds the first's failures stored ("recorded earlier"):
    # one entry per (step, item), new if either stage saw it fail
    merged: dict = {}
    for f in first.failures + second.failures:
        had = merged.get((f.step, f.id))
        if had is None or (f.new and not had.new):
            merged[(f.step, f.id)] = f
    out.failures = list(merged.values())
    out.seconds += first.seconds
    out.interrupted = first.interrupted or second.interrupted
    return out
