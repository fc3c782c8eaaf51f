"""Scheduling: run what the planner found stale, on Dask, in batches and waves.

Policy
------
A build alternates planning and running, phase by phase (see
:func:`flow.graph.phases`):

1. plan the whole graph (pure, fast: no array I/O);
2. for the next phase whose item steps have work, cut the items that need
   any of its steps into batches and send each batch as **one task** that
   runs it through every item step of the phase (:func:`engine.worker.run_chain`);
3. run the phase's stale set steps, one task each (:func:`engine.worker.run_set`);
4. fold the manifests the tasks return into the catalogs and plan again --
   early cutoff falls out of this: downstream recipe keys are derived from
   the content keys just produced, and are often already stored.

Tasks are submitted in **waves**: at most ``2 x workers + 1`` are in flight
and the next is submitted as one finishes, so a million items never make a
million-task graph -- a Dask task per batch, never per image.  Workers read
their inputs from the store and write their outputs to it themselves; only
small manifests travel back to the client.

State
-----
The client keeps only what the store already says (catalogs) plus the
manifests of tasks finished in this build.  Killing it at any moment loses
nothing that was published: the next build plans against the store and
computes only what is missing.

Executors
---------
The builder only submits and waits; where tasks run is an executor's business
(:mod:`engine.executors`: sync, threads, a local or remote Dask cluster, Slurm).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.executors import Executor, SyncExecutor
from engine.progress import Channel, Progress
from engine.refs import (
    AllInput,
    ChainWire,
    ExtWire,
    Keyed,
    ObjectRef,
    OneInput,
    OneWire,
    PackRef,
    Ref,
    Stored,
    Wire,
)
from engine.worker import ChainItem, ChainStep, TaskContext, run_chain, run_set
from flow.graph import Graph, Step, phases, toposort
from flow.plan import BLOCKED, FAILED, FRESH, MISSING, PENDING, ItemTable, Plan, plan

if TYPE_CHECKING:  # imported where used: a no-op build starts no executor
    pass

__all__ = ["BuildReport", "Builder", "Failure", "StepReport", "build"]


# --------------------------------------------------------------------------
# the build


@dataclass
class StepReport:
    computed: int = 0
    reused: int = 0  # early cutoff: recomputed upstream, same content, stored already
    failed: int = 0
    seconds: float = 0.0  # summed task time
    tasks: int = 0


@dataclass
class Failure:
    step: str
    id: str
    type: str
    reason: str
    traceback: str = ""
    new: bool = True  # failed in this build (False: recorded by an earlier one)
    bad_input: bool = False  # an ItemError: the item's fault, not the code's


@dataclass
class BuildReport:
    before: Plan
    after: Plan
    steps: dict[str, StepReport] = field(default_factory=dict)
    failures: list[Failure] = field(default_factory=list)
    seconds: float = 0.0
    executor: str = ""
    dashboard: str | None = None
    interrupted: bool = False
    error: str | None = None  # the build itself stopped (not an item)

    @property
    def ok(self) -> bool:
        return not self.failures and self.after.done and not self.interrupted

    def to_json(self) -> dict:
        return {
            "ok": self.ok,
            "interrupted": self.interrupted,
            "error": self.error,
            "seconds": round(self.seconds, 3),
            "executor": self.executor,
            "steps": {k: asdict(v) for k, v in self.steps.items()},
            "failures": [asdict(f) for f in self.failures],
            "before": self.before.summary(),
            "after": self.after.summary(),
        }


@dataclass
class SourceRefs:
    """Where workers find each source's values: per item for ``files`` and
    ``values`` sources (a :class:`~engine.refs.FileRef` / :class:`~engine.refs.ValueRef`
    per item), one reference for ``file`` sources and pinned fits."""

    refs: dict[str, Sequence[Ref]]
    one: dict[str, Ref] = field(default_factory=dict)


def _recipe(step: Step) -> Any:
    from store.outputs import Recipe

    assert step.node is not None
    return Recipe(
        node=step.node.name,
        step=step.name,
        version=step.node.version,
        fingerprint=step.node.fingerprint,
        params=asdict(step.params),
        prefix=step.prefix.hex(),
    )


def _batch_size(steps: list[Step], n_work: int, n_workers: int, override: int | None) -> int:
    if override:
        return override
    workers = max(1, n_workers)
    auto = math.ceil(n_work / (4 * workers))
    # four tasks per worker balance the load; below 16 items a task, a task's
    # fixed cost (a pack per step: ~10 ms of zarr metadata, chunk and manifest
    # writes) outweighs that, so a small build gets one task per worker
    size = min(1000, auto) if auto >= 16 else max(1, math.ceil(n_work / workers))
    hints = [s.node.batch_size for s in steps if s.node is not None and s.node.batch_size]
    if hints and not any(s.node.batched for s in steps if s.node is not None):
        size = min(size, min(hints))
    return size


def load_holdings(
    store: Any, graph: Graph, catalogs: Mapping[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """What ``store`` holds for ``graph``'s steps, as the planner reads it: the item
    catalogs (with the recipe keys remembered for the graph's steps) and the set
    outputs, by node name.  ``catalogs``: item catalogs loaded already (kept as
    they are).  This is the build's only reading of the store before it plans."""
    from store.catalog import load_catalog
    from store.objects import load_objects

    catalogs = catalogs or {}
    steps: dict[str, list[str]] = {}
    for s in graph.values():
        if s.kind == "item":
            steps.setdefault(s.node_name, []).append(s.name)
    cats = {
        n: catalogs[n] if n in catalogs else load_catalog(store, n, steps=names)
        for n, names in steps.items()
    }
    objs = {
        n: load_objects(store, n)
        for n in sorted({s.node_name for s in graph.values() if s.kind == "set"})
    }
    return cats, objs


#: what a set step's failure reason says when its splits select no item at all
NO_SPLIT_ITEMS = "no item is in the split(s)"


class Builder:
    """Runs one build: plan, execute phase by phase, re-plan (see the module doc)."""

    def __init__(
        self,
        graph: Graph,
        items: ItemTable,
        sources: SourceRefs,
        store: Any,
        executor: Executor,
        *,
        retry_failed: bool = False,
        fail_fast: bool = False,
        progress: bool | None = None,
        batch_size: int | None = None,
        storage_options: dict | None = None,
        log: Callable[[str], None] | None = None,
        known: Mapping[str, Any] | None = None,
        catalogs: dict | None = None,
        cancel: Any = None,
        limits: Any = None,
    ):
        """``known``: step plans still current (see :func:`flow.plan.plan`), used
        until this build runs something for them; ``catalogs``: item catalogs
        loaded (and kept current) by an earlier build of this process, by node
        name -- the ones missing are loaded and added to it; ``cancel``: an event
        another thread sets to stop the build as a Ctrl-C would; ``limits``
        (:class:`engine.sandbox.Limits`): per-item time and memory limits of the
        steps that read source files (None: none)."""
        self.graph, self.items, self.sources = graph, items, sources
        self.store, self.executor = store, executor
        self.retry_failed, self.fail_fast = retry_failed, fail_fast
        self.progress = Progress(progress, log)
        self.batch_override = batch_size
        self.log = lambda msg: self.progress.write(msg, log)
        self.limits = limits
        self.channel = Channel()  # the nodes' own progress reports (flow.progress)
        self.ctx = TaskContext.of(store.url, storage_options, self.channel.name)
        self.catalogs = catalogs if catalogs is not None else {}
        # the catalogs this build loads are its own: it saves them when it ends
        # (a caller that keeps its catalogs decides when they are saved)
        nodes_item = {s.node_name for s in graph.values() if s.kind == "item"}
        self._loaded = sorted(nodes_item - set(self.catalogs))
        cats, self.objects = load_holdings(store, graph, self.catalogs)
        self.catalogs.update(cats)
        self._known = dict(known or {})
        self._cancel = cancel  # a threading.Event set from elsewhere: stop as at a Ctrl-C
        self.report: BuildReport | None = None
        self._failures: list[Failure] = []
        self._stop = False
        self._interrupted = False
        self._gave_up: set[str] = set()
        self._submitted = 0  # tasks submitted so far: a plan made since is still current

    def plan(self, reasons: bool = False) -> Plan:
        from store.catalog import save_recipes

        p = plan(
            self.graph,
            self.items,
            self.catalogs,
            self.objects,
            retry_failed=self.retry_failed,
            reasons=reasons,
            known=self._known,
        )
        save_recipes(self.store, self.catalogs, p)
        return p

    # -- item phases --------------------------------------------------------------

    def _chain_tasks(
        self, p: Plan, chain: list[str]
    ) -> tuple[list[ChainStep], list[str], list[Keyed]]:
        """Static parts of a phase's tasks: steps with wires, the 'one' inputs."""
        ext_names: list[str] = []
        one_names: list[str] = []
        steps = []
        for name in chain:
            st = self.graph[name]
            wires: list[Wire] = []
            for inp in st.inputs:
                if inp.mode == "one":
                    if inp.step not in one_names:
                        one_names.append(inp.step)
                    wires.append(OneWire(one_names.index(inp.step)))
                elif inp.step in chain:
                    wires.append(ChainWire(inp.step))
                else:
                    if inp.step not in ext_names:
                        ext_names.append(inp.step)
                    wires.append(ExtWire(ext_names.index(inp.step)))
            assert st.node is not None
            reads_files = any(self.graph[i.step].source == "files" for i in st.inputs)
            steps.append(
                ChainStep(
                    name,
                    st.node,
                    asdict(st.params),
                    bytes(st.prefix),
                    tuple(wires),
                    _recipe(st),
                    self.limits if reads_files else None,
                )
            )
        ones: list[Keyed] = []
        for name in one_names:
            up = self.graph[name]
            sp = p.steps[name]
            ck = sp.ckeys[0]
            assert ck is not None and sp.rkeys[0] is not None
            if up.kind == "source":
                ones.append(Keyed(ck, self.sources.one[name]))
            else:
                ones.append(Keyed(ck, ObjectRef(up.node_name, sp.rkeys[0])))
        return steps, ext_names, ones

    def _ext_entry(self, p: Plan, name: str, i: int) -> Keyed | None:
        sp = p.steps[name]
        if sp.status[i] != FRESH:
            return None
        up = self.graph[name]
        ck = sp.ckeys[i]
        assert ck is not None
        if up.kind == "source":
            return Keyed(ck, self.sources.refs[name][i])
        cat = self.catalogs[up.node_name]
        row = cat.index[sp.rkeys[i]]  # type: ignore[index]
        pack, pos = cat.location(row)
        return Keyed(ck, PackRef(up.node_name, pack, pos))

    def _chain_items(
        self, p: Plan, chain: list[str], ext_names: list[str], batch: list[int]
    ) -> list[ChainItem]:
        """What a task needs to know of each item of ``batch``: its inputs from
        outside the chain, and per chain step the outputs stored already (and the
        recipes that failed).  Lookups per step are made once per batch: in a
        build of fresh items each item costs a few list reads."""
        steps = []
        for name in chain:
            sp = p.steps[name]
            cat = self.catalogs[self.graph[name].node_name]
            steps.append((name, sp, cat, sp.status[batch].tolist()))
        ext_cols = [(name, p.steps[name].status[batch].tolist()) for name in ext_names]
        out = []
        for j, i in enumerate(batch):
            item_id = self.items.ids[i]
            known: list[dict[bytes, Stored]] = []
            failed: list[set] = []
            for name, sp, cat, status in steps:
                st = status[j]
                k: dict[bytes, Stored] = {}
                f: set = set()
                if st == FRESH:
                    row = cat.index[sp.rkeys[i]]  # type: ignore[index]
                    k[sp.rkeys[i]] = Stored(sp.ckeys[i], *cat.location(row))  # type: ignore[index,arg-type]
                elif st == FAILED:
                    f.add(sp.rkeys[i])
                elif st == PENDING:
                    for row in cat.rows_for(name, item_id):
                        k[cat.rkeys[row].tobytes()] = Stored(cat.ckey(row), *cat.location(row))
                    f.update(cat.failed_for(name, item_id))
                known.append(k)
                failed.append(f)
            ext = [
                self._ext_entry(p, name, i) if status[j] == FRESH else None
                for name, status in ext_cols
            ]
            out.append(ChainItem(item_id, ext, known, failed))
        return out

    def _run_item_phase(self, p: Plan, chain: list[str]) -> None:
        waiting = np.zeros(len(self.items), bool)
        for name in chain:
            waiting |= np.isin(p.steps[name].status, (MISSING, PENDING))
        work = np.flatnonzero(waiting).tolist()
        if not work:
            return
        steps, ext_names, ones = self._chain_tasks(p, chain)
        size = _batch_size(
            [self.graph[c] for c in chain], len(work), self.executor.n_workers, self.batch_override
        )
        batches = [work[lo : lo + size] for lo in range(0, len(work), size)]
        self._known = {}  # item steps run: later plans derive everything again
        for name in chain:
            self.progress.start(name, len(work))
        self.log(
            f"phase {', '.join(chain)}: {len(work)} items in {len(batches)} tasks of <= {size}"
        )
        max_in_flight = 2 * self.executor.n_workers + 1
        in_flight: dict[Any, list[int]] = {}
        queue = list(batches)
        try:
            while queue or in_flight:
                while queue and len(in_flight) < max_in_flight and not self._stop:
                    batch = queue.pop(0)
                    items = self._chain_items(p, chain, ext_names, batch)
                    self._submitted += 1
                    fut = self.executor.submit(
                        run_chain, self.ctx, steps, items, ones, self.retry_failed
                    )
                    in_flight[fut] = batch
                if not in_flight:
                    break
                done, _ = self._wait(set(in_flight))
                for fut in done:
                    batch = in_flight.pop(fut)
                    self._collect_chain(fut, batch, chain)
        except BaseException:
            self.executor.cancel(in_flight)
            raise

    def _collect_chain(self, fut: Any, batch: list[int], chain: list[str]) -> None:
        assert self.report is not None
        try:
            res = self.executor.result(fut)
        except Exception as e:
            for name in chain:
                self.progress.update(name, len(batch))
            self._failures.append(
                Failure(chain[0], f"<{len(batch)} items>", type(e).__name__, f"task failed: {e}")
            )
            self._after_task_error(e)
            if self.fail_fast:
                self._stop = True
            return
        for m in res.manifests:
            self.catalogs[m["node"]]._add_manifests([m])
            for f in m.get("failures", []):
                self._failures.append(
                    Failure(
                        m["step"],
                        f["id"],
                        f["type"],
                        f["reason"],
                        f.get("traceback", ""),
                        bad_input=bool(f.get("bad_input")),
                    )
                )
                if self.fail_fast:
                    self._stop = True
        for name in chain:
            r = self.report.steps.setdefault(name, StepReport())
            r.computed += res.computed.get(name, 0)
            r.reused += res.reused.get(name, 0)
            r.failed += res.failed.get(name, 0)
            r.seconds += res.seconds.get(name, 0.0)
            r.tasks += 1
            self.progress.update(name, len(batch))

    # -- set steps --------------------------------------------------------------

    def _set_inputs(self, p: Plan, name: str) -> tuple[list[AllInput | OneInput], list[bytes]]:
        from flow.keys import items_key

        st = self.graph[name]
        sp = p.steps[name]
        inputs: list[AllInput | OneInput] = []
        digests: list[bytes] = []
        for inp in st.inputs:
            up = self.graph[inp.step]
            usp = p.steps[inp.step]
            if inp.mode == "one":
                ck, rk = usp.ckeys[0], usp.rkeys[0]
                assert ck is not None and rk is not None
                ref: Ref = (
                    self.sources.one[inp.step]
                    if up.kind == "source"
                    else ObjectRef(up.node_name, rk)
                )
                inputs.append(OneInput(ck, ref))
                digests.append(ck)
                continue
            rows = sp.members[inp.step]
            ids = [self.items.ids[i] for i in rows]
            ckeys = [usp.ckeys[i] for i in rows]
            refs = [self._ext_entry(p, inp.step, i).ref for i in rows]  # type: ignore[union-attr]
            inputs.append(AllInput(ids, ckeys, refs))  # type: ignore[arg-type]
            digests.append(items_key(ids, ckeys))  # type: ignore[arg-type]
        return inputs, digests

    def _run_set_steps(self, set_steps: list[str], p: Plan | None = None) -> Plan:
        """Run the ready set steps until none is; ``p``: a plan that is still current."""
        assert self.report is not None
        p = p or self.plan()
        while True:
            # a set step whose task raised in this build is not tried again here
            ready = [
                n for n in set_steps if p.steps[n].status[0] == MISSING and n not in self._gave_up
            ]
            if not ready or self._stop:
                return p
            futs = {}
            if any(name in self._known for name in ready):
                self._known = {}
            for name in ready:
                st = self.graph[name]
                inputs, digests = self._set_inputs(p, name)
                n_in = max((len(i.ids) for i in inputs if isinstance(i, AllInput)), default=0)
                self.log(f"{name}: fitting over {n_in} items")
                self.progress.start(name, 1, unit="fit")
                chain_step = ChainStep(
                    name, st.node, asdict(st.params), bytes(st.prefix), (), _recipe(st)
                )  # type: ignore[arg-type]
                self._submitted += 1
                futs[self.executor.submit(run_set, self.ctx, chain_step, inputs, digests)] = name
            pending = set(futs)
            try:
                while pending:
                    done, pending = self._wait(pending)
                    for fut in done:
                        name = futs[fut]
                        r = self.report.steps.setdefault(name, StepReport())
                        r.tasks += 1
                        self.progress.finish(name)
                        try:
                            m = self.executor.result(fut)
                        except Exception as e:
                            reason = f"task failed: {e}{self._split_hint(name)}"
                            self._failures.append(Failure(name, "<set>", type(e).__name__, reason))
                            r.failed += 1
                            self._gave_up.add(name)
                            self._after_task_error(e)
                            self._stop = self._stop or self.fail_fast
                            continue
                        st = self.graph[name]
                        self.objects[st.node_name].add(bytes.fromhex(m["rkey"]), m)
                        r.seconds += m.get("seconds", 0.0)
                        if "failure" in m:
                            r.failed += 1
                            f = m["failure"]
                            self._failures.append(
                                Failure(
                                    name,
                                    "<set>",
                                    f["type"],
                                    f["reason"] + self._split_hint(name),
                                    f.get("traceback", ""),
                                    bad_input=bool(f.get("bad_input")),
                                )
                            )
                            self._stop = self._stop or self.fail_fast
                        else:
                            r.computed += 1
            except BaseException:
                self.executor.cancel(pending)
                raise
            p = self.plan()

    def _split_hint(self, name: str) -> str:
        """Why the set step ``name`` had nothing to learn from, where the splits
        its inputs take select no item at all (else "")."""
        if not len(self.items.ids):
            return ""
        empty = sorted(
            {
                s
                for inp in self.graph[name].inputs
                if inp.splits is not None and not self.items.in_splits(inp.splits).any()
                for s in inp.splits
            }
        )
        if not empty:
            return ""
        return f" ({NO_SPLIT_ITEMS} {', '.join(map(repr, empty))} it learns from)"

    def _after_task_error(self, e: BaseException) -> None:
        """A task that met a corrupt input quarantined it: re-read the catalogs so
        this build's plans no longer count on it (the next build recomputes it)."""
        if type(e).__name__ == "CorruptInput":
            self._known = {}
            cats, self.objects = load_holdings(self.store, self.graph)
            self.catalogs.update(cats)

    # -- interrupts -------------------------------------------------------------------

    def _wait(self, futures: set) -> tuple[set, set]:
        """Wait for any future, in short polls so that Ctrl-C is noticed between them."""
        while True:
            done, pending = self.executor.wait_any(futures, timeout=0.2)
            for r in self.channel.drain():
                self.progress.report(r)
            if self._interrupted or (self._cancel is not None and self._cancel.is_set()):
                self.channel.cancelled = True  # a fit in a thread stops at its next report
                raise KeyboardInterrupt
            self.progress.tick()
            if done:
                return done, pending

    def _on_sigint(self, signum: int, frame: Any) -> None:
        # A KeyboardInterrupt raised inside concurrent.futures.wait can leave a
        # future's lock held and hang the worker threads for good; so the first
        # Ctrl-C (or SIGTERM) only sets a flag that _wait acts on -- also while a
        # local cluster starts, which then starts completely and is closed.  A
        # second one raises at once.
        if self._interrupted:
            raise KeyboardInterrupt
        self._interrupted = True
        self.channel.cancelled = True

    # -- the whole build ----------------------------------------------------------

    def run(self) -> BuildReport:
        import signal
        import threading

        handlers = {}
        if (
            not isinstance(self.executor, SyncExecutor)
            and threading.current_thread() is threading.main_thread()
        ):
            for sig in (signal.SIGINT, signal.SIGTERM):
                handlers[sig] = signal.signal(sig, self._on_sigint)
        self.executor.subscribe(self.channel.name, self.channel.on_event)
        try:
            return self._run()
        finally:
            self.executor.unsubscribe(self.channel.name)
            self.channel.close()
            for sig, h in handlers.items():
                signal.signal(sig, h)

    def _run(self) -> BuildReport:
        t0 = time.perf_counter()
        before = self.plan(reasons=True)
        expect = getattr(self.executor, "expect", None)
        if expect is not None:
            expect(before)
        self.report = BuildReport(
            before, before, executor=self.executor.name, dashboard=self.executor.dashboard
        )
        # re-planning reads every catalog again: done only after work was submitted
        p, p_at = before, self._submitted
        try:
            for item_steps, set_steps in phases(self.graph):
                if self._cancel is not None and self._cancel.is_set():
                    raise KeyboardInterrupt
                if self._stop or self._interrupted:
                    break
                if item_steps and any(not p.steps[n].done for n in item_steps):
                    self._run_item_phase(p, item_steps)
                    p, p_at = self.plan(), self._submitted
                if set_steps:
                    p = self._run_set_steps(set_steps, p if p_at == self._submitted else None)
                    p_at = self._submitted
        except KeyboardInterrupt:
            self.report.interrupted = True
        except Exception as e:
            # the executor itself failed (a lost scheduler, a dead cluster): end the
            # build with what is known; everything published stays published
            self.report.error = (
                f"the build stopped: {type(e).__name__}: {e} (could not reach, or lost, "
                "the Dask scheduler or its workers?); everything finished is stored: "
                "rerun to finish"
            )
            self._failures.append(
                Failure("<build>", "<executor>", type(e).__name__, self.report.error)
            )
        finally:
            self.progress.close()
        # a Ctrl-C that came when nothing was left to wait for still stops the build
        self.report.interrupted = self.report.interrupted or self._interrupted
        current = p_at == self._submitted and not self.report.error and not self.report.interrupted
        after = p if current else self.plan()
        self.report.after = after
        self.report.failures = self._failures + self._old_failures(after)
        self._save_catalogs()
        self.report.seconds = time.perf_counter() - t0
        return self.report

    def _save_catalogs(self) -> None:
        from store.catalog import save_catalog

        for n in self._loaded:
            save_catalog(self.store, self.catalogs[n])

    def _old_failures(self, p: Plan) -> list[Failure]:
        """Failures recorded by earlier builds that this build's targets still hit."""
        from store.packs import loads

        new = {(f.step, f.id) for f in self._failures}
        out: list[Failure] = []
        docs: dict[tuple[str, str], dict] = {}
        for name in toposort(self.graph):
            st = self.graph[name]
            sp = p.steps[name]
            if st.kind == "source":
                errs = self.items.source_errors.get(name, {})
                for i, _s in sorted(errs.items()):
                    if sp.status[i] == BLOCKED:
                        out.append(
                            Failure(
                                name,
                                self.items.ids[i],
                                "SourceError",
                                errs[i],
                                new=False,
                                bad_input=True,
                            )
                        )
                continue
            for i in np.flatnonzero(sp.status == FAILED).tolist():
                item_id = self.items.ids[i] if st.kind == "item" else "<set>"
                if (name, item_id) in new:
                    continue
                if st.kind == "set":
                    obj = self.objects[st.node_name].get(sp.rkeys[i])  # type: ignore[arg-type]
                    f = (obj.failure or {}) if obj else {}
                    out.append(
                        Failure(
                            name,
                            item_id,
                            f.get("type", "?"),
                            f.get("reason", "?") + self._split_hint(name),
                            new=False,
                            bad_input=bool(f.get("bad_input")),
                        )
                    )
                    continue
                cat = self.catalogs[st.node_name]
                pk = cat.failed.get(sp.rkeys[i])  # type: ignore[arg-type]
                if pk is None:
                    continue
                pack_id = cat.packs[pk].id
                doc = docs.get((st.node_name, pack_id))
                if doc is None:
                    where = f"packs/{st.node_name}/{pack_id}.json"
                    doc = docs[(st.node_name, pack_id)] = loads(self.store.get(where), where)
                rk = sp.rkeys[i].hex()  # type: ignore[union-attr]
                for f in doc.get("failures", []):
                    if f["rkey"] == rk:
                        out.append(
                            Failure(
                                name,
                                item_id,
                                f["type"],
                                f["reason"],
                                f.get("traceback", ""),
                                new=False,
                                bad_input=bool(f.get("bad_input")),
                            )
                        )
                        break
        return out


def build(
    graph: Graph,
    items: ItemTable,
    sources: SourceRefs,
    store: Any,
    executor: Executor | None = None,
    **kw: Any,
) -> BuildReport:
    """Build every step of ``graph`` over ``items`` into ``store`` (see :class:`Builder`)."""
    own = executor is None
    ex = executor or SyncExecutor()
    try:
        return Builder(graph, items, sources, store, ex, **kw).run()
    finally:
        if own:
            ex.close()
