"""Builds into a store on S3 (a moto server on loopback), from other "hosts".

* a synchronous build and a build on a real Dask cluster (a ``dask
  scheduler`` and two ``dask worker`` processes whose working folder is an
  empty folder of their own, with no AWS settings in their environment:
  they learn where the store is, and how to reach it, only from the task's
  ``Context``) store the same content as a local reference build, and a
  rebuild computes nothing;
* two builds in separate processes, started together into the same S3
  store, both succeed and leave a store that verifies and reads back right;
* the ``flow`` command on a project whose ``[store]`` is on S3: build,
  status, query.

Source files are still read by the workers from local paths (the workers run
on this machine).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import pytest

from engine.builder import build
from engine.executors import get_executor
from engine.testing import synthetic_graph, synthetic_inputs
from store import open_store
from store.maintenance import verify
from tests.conftest import project_config, write_project
from tests.processes import (
    BUILD_TIMEOUT,
    ITEM_NODES,
    START_TIMEOUT,
    Processes,
    assert_same_content,
    store_content,
    wait_until,
)

pytestmark = pytest.mark.slow

# the S3 server fixture lives beside the store tests; load it from there
_spec = importlib.util.spec_from_file_location(
    "_flow_s3_server", Path(__file__).resolve().parents[1] / "store" / "conftest.py"
)
_s3_server = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
_spec.loader.exec_module(_s3_server)  # type: ignore[union-attr]
s3 = _s3_server.s3

N = 40
_REPO = Path(__file__).resolve().parents[2]


def _build(st, data: Path, scheduler: str, options: dict):
    items, sources = synthetic_inputs(data, st)
    with get_executor(scheduler) as ex:
        return build(synthetic_graph(), items, sources, st, ex, progress=False,
                     storage_options=options)  # fmt: skip


def _manifest_pids(st) -> dict[str, set[int]]:
    """Per item node, the pids that wrote its packs (recorded in each manifest)."""
    out = {}
    for node in ITEM_NODES:
        names = [n for n in st.list(f"packs/{node}") if n.endswith(".json")]
        out[node] = {json.loads(st.get(f"packs/{node}/{n}"))["pid"] for n in names}
    return out


def _env_without_aws() -> dict[str, str]:
    """This environment with no AWS credentials or endpoint: only the safety switches."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE=os.devnull,
               AWS_SHARED_CREDENTIALS_FILE=os.devnull)  # fmt: skip
    return env


def test_sync_build_into_s3(s3, reference):
    ref = reference(N)
    st = open_store(s3.url("sync"), **s3.options)
    try:
        rep = _build(st, ref.data, "sync", s3.options)
        assert rep.ok, rep.failures
        assert {k: v.computed for k, v in rep.steps.items()} == {
            "parsed": N, "smoothed": N, "histogram": N, "mean_histogram": 1
        }  # fmt: skip
        assert_same_content(store_content(st), ref.content)
        again = _build(st, ref.data, "sync", s3.options)
        assert again.ok and all(s.computed == 0 for s in again.steps.values()), again.steps
    finally:
        st.delete_tree("")


@pytest.mark.cluster
def test_dask_workers_without_a_shared_folder(s3, reference, dask_scheduler, tmp_path):
    from distributed import Client

    ref = reference(N)
    address, _ = dask_scheduler
    procs = Processes(tmp_path)
    homes = [tmp_path / "host-a", tmp_path / "host-b"]
    st = open_store(s3.url("dask"), **s3.options)
    admin = Client(address, timeout="30s")
    try:
        workers = []
        for home in homes:
            home.mkdir()
            scratch = tmp_path / f"scratch-{home.name}"
            args = [sys.executable, "-m", "distributed.cli.dask_worker", address,
                    "--nthreads", "1", "--no-nanny", "--memory-limit", "0", "--no-dashboard",
                    "--death-timeout", "60", "--local-directory", str(scratch),
                    "--name", home.name]  # fmt: skip
            workers.append(procs.start(args, f"{home.name}.log", cwd=home, env=_env_without_aws()))
        try:
            admin.wait_for_workers(2, timeout=START_TIMEOUT)
        except TimeoutError:
            pytest.fail("workers did not connect:\n" + "\n".join(procs.log(w) for w in workers))
        assert set(admin.run(os.getcwd).values()) == {str(h) for h in homes}

        rep = _build(st, ref.data, address, s3.options)
        assert rep.ok, rep.failures
        assert all(rep.steps[n].computed == N and rep.steps[n].tasks > 1 for n in ITEM_NODES)
        assert_same_content(store_content(st), ref.content)  # same keys as the sync build
        # the workers wrote the packs, into the bucket and nowhere on their hosts
        assert set().union(*_manifest_pids(st).values()) == {w.pid for w in workers}
        assert all(list(h.iterdir()) == [] for h in homes)

        again = _build(st, ref.data, address, s3.options)
        assert again.ok and all(s.computed == 0 for s in again.steps.values()), again.steps
    finally:
        st.delete_tree("")
        procs.close()
        wait_until(lambda: not admin.scheduler_info(n_workers=-1)["workers"], START_TIMEOUT,
                   "the scheduler to drop the workers")  # fmt: skip
        admin.close()


BUILD = r"""
import json, sys, time
from pathlib import Path
from engine.builder import build
from engine.executors import get_executor
from engine.testing import synthetic_graph, synthetic_inputs
from store import open_store

cfg = json.loads(sys.argv[1])
st = open_store(cfg["url"], **cfg["options"])
items, sources = synthetic_inputs(cfg["data"], st)
print("ready", flush=True)
while not Path(cfg["go"]).exists():  # start together with the other build
    time.sleep(0.01)
with get_executor("threads", 2) as ex:
    rep = build(synthetic_graph(), items, sources, st, ex, progress=False,
                storage_options=cfg["options"])
print(json.dumps({"ok": rep.ok, "computed": {k: v.computed for k, v in rep.steps.items()}}))
sys.exit(0 if rep.ok else 1)
"""


def test_two_builds_at_once_into_one_s3_store(s3, reference, tmp_path):
    ref = reference(N)
    url = s3.url("concurrent")
    go = tmp_path / "go"
    (tmp_path / "script").mkdir()  # not beside a folder that could shadow a package
    script = tmp_path / "script" / "build.py"
    script.write_text(BUILD)
    procs = Processes(tmp_path)
    st = open_store(url, **s3.options)
    try:
        cfg = {"url": url, "options": s3.options, "data": str(ref.data), "go": str(go)}
        builds = [procs.start([sys.executable, str(script), json.dumps(cfg)], f"build{i}.log",
                              cwd=_REPO) for i in range(2)]  # fmt: skip
        wait_until(lambda: all("ready" in procs.log(p) for p in builds), START_TIMEOUT,
                   "both builds to be ready")  # fmt: skip
        go.touch()
        deadline = time.monotonic() + BUILD_TIMEOUT
        for p in builds:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
        logs = [procs.log(p) for p in builds]
        assert [p.returncode for p in builds] == [0, 0], logs
        # they overlapped: both wrote packs of the first step
        assert _manifest_pids(st)["parsed"] == {p.pid for p in builds}, logs
        got = store_content(st)
        assert_same_content(got, ref.content)
        assert all(got.rows[n] >= N for n in ITEM_NODES)  # duplicates are allowed ...
        assert verify(st) == []  # ... and every pack and object reads back intact
        again = _build(st, ref.data, "sync", s3.options)
        assert again.ok and all(s.computed == 0 for s in again.steps.values()), again.steps
    finally:
        st.delete_tree("")
        procs.close()


def test_nested_storage_options_reach_the_workers(s3, reference):
    ref = reference(N)
    st = open_store(s3.url("nested"), **s3.client_options)
    try:
        rep = _build(st, ref.data, "sync", s3.client_options)
        reasons = {f.reason for f in rep.failures}
        assert rep.ok, reasons
    finally:
        st.delete_tree("")


def _flow(root: Path, *args: str) -> dict | list:
    from click.testing import CliRunner

    from cli.main import cli

    res = CliRunner().invoke(cli, ["-p", str(root), "-q", *args, "--json"],
                             catch_exceptions=False)  # fmt: skip
    assert res.exit_code == 0, f"flow {' '.join(args)} -> {res.exit_code}\n{res.output}"
    out = res.output
    return json.loads(out[min(i for i in (out.find("{"), out.find("[")) if i >= 0) :])


def test_flow_command_with_the_store_on_s3(s3, tmp_path):
    from app.phantoms import write_phantom_study

    root = tmp_path / "study"
    write_phantom_study(root, n=40, size=64, seed=3)
    url = s3.url("cli")
    config = project_config(
        store={"url": url, "options": s3.options},
        sources={"path": ".", "include": ["*.dcm"], "labels": "labels.csv"},
        targets={
            "cnn": {"kind": "cnn", "normalize": {"size": 32}, "embedder": {"epochs": 1, "dim": 16}}
        },
    )
    write_project(root, config)
    st = open_store(url, **s3.options)
    try:
        doc = _flow(root, "build")
        assert doc["ok"], doc["failures"]
        assert doc["steps"]["decoded"]["computed"] == 40 and set(doc["refs"]) == {"cnn"}
        assert {"packs", "objects", "refs"} <= set(st.list(""))
        # nothing went to a local store (.flow/ holds the project's id salt only)
        assert sorted(p.name for p in (root / ".flow").iterdir()) == ["id-salt"]
        rows = _flow(root, "status")
        assert rows and all(r["stale"] == 0 for r in rows), rows
        again = _flow(root, "build")
        assert all(s["computed"] == 0 for s in again["steps"].values()), again["steps"]
        probe = next((root / "images").rglob("*.dcm"))
        # findings vectors rank by inner product: the probe is among all 40 results
        hits = _flow(root, "query", str(probe), "-t", "cnn", "-k", "40")["results"]
        assert len(hits) == 40 and str(probe.relative_to(root)) in {h["file"] for h in hits}
        # --store picks another S3 store; the project's [store] options still apply
        rows = _flow(root, "--store", s3.url("other"), "status")
        assert all(r["fresh"] == 0 for r in rows if r["kind"] == "item"), rows
    finally:
        st.delete_tree("")
