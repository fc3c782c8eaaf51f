"""Builds on Slurm: Dask workers as Slurm jobs (``flow build --cluster slurm``,
through dask-jobqueue) and a whole build as one batch job (``flow submit``),
against a real single-node Slurm started by the ``slurm`` fixture.

The first tests need no Slurm: ``[cluster]`` validation, the script ``flow
submit`` writes, and ``--cluster local``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from engine.builder import build
from engine.cluster import check_job_script, cluster_config, cluster_executor
from engine.executors import get_executor
from engine.testing import synthetic_graph, synthetic_inputs, write_synthetic_files
from flow.errors import ConfigError, FlowError
from store import open_store
from store.catalog import load_catalog
from store.objects import read_object_manifests
from store.refs import read_ref
from tests.conftest import project_config, write_project

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-c", "from cli.main import main; main()"]
N_PHANTOMS = 24
#: the targets of a Slurm build: small, and codes from the cnn embedding
TARGETS = {
    "cnn": {"kind": "cnn", "normalize": {"size": 32}, "embedder": {"epochs": 1, "width": 4}},
    "bovw": {"kind": "bovw", "vocabulary": {"words": 16}},
    "codes": {"kind": "codes", "embedding": "cnn", "coder": {"bits": 16}},
}
#: a [cluster] table for worker jobs
WORKER_JOBS = {"partition": "flow", "cores": 1, "memory": "2GB", "walltime": "00:20:00"}


def content_keys(st) -> dict[str, set[tuple[bytes, bytes]]]:
    """(recipe key, content key) of everything the synthetic pipeline stored."""
    out = {}
    for node in ("parsed", "smoothed", "histogram"):
        cat = load_catalog(st, node, write_cache=False)
        out[node] = {(cat.rkeys[r].tobytes(), cat.ckey(r)) for r in range(len(cat))}
    docs = read_object_manifests(st, "mean_histogram")
    out["mean_histogram"] = {(d["rkey"], d["ckey"]) for d in docs if "failure" not in d}
    return out


def manifest_pids(root: Path) -> set[int]:
    """The process ids that wrote the synthetic pipeline's packs."""
    return {json.loads(p.read_bytes())["pid"] for p in (root / "packs").glob("*/*.json")}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """120 synthetic files and the content keys of a sync build of them."""
    folder = tmp_path_factory.mktemp("synthetic")
    write_synthetic_files(folder / "data", 120)
    st = open_store(folder / "sync")
    items, sources = synthetic_inputs(folder / "data", st)
    with get_executor("sync") as ex:
        rep = build(synthetic_graph(), items, sources, st, ex, progress=False)
    assert rep.ok
    return folder / "data", content_keys(st)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    from app.phantoms import write_phantom_study

    folder = tmp_path_factory.mktemp("phantoms")
    write_phantom_study(folder, n=N_PHANTOMS, size=64, seed=0)
    return folder


def project(folder: Path, phantoms: Path, cluster: dict) -> Path:
    """A project over the phantom study with this ``[cluster]`` table (no ``[build]``)."""
    config = project_config(
        store=".flow/store",
        scheduler=None,
        sources={"path": phantoms / "images", "labels": phantoms / "labels.csv"},
        targets=TARGETS,
        cluster=cluster,
    )
    write_project(folder, config)
    return folder


def flow(*args: str, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


# --------------------------------------------------------------------------
# no Slurm needed


@pytest.mark.parametrize(
    "table, message",
    [
        ({"partiton": "cpu"}, "unknown key 'partiton' (did you mean 'partition'?)"),
        ({"cores": 0}, "cores must be an integer >= 1"),
        ({"cores": 4, "processes": 3}, "processes (3) must divide cores (4)"),
        ({"memory": "lots"}, "memory must be a size"),
        ({"walltime": "2 hours"}, "walltime must be"),
        ({"jobs": 2, "adaptive_max": 4}, "set jobs (a fixed number) or adaptive"),
        ({"adaptive_min": 3, "adaptive_max": 2}, "adaptive_min (3) > adaptive_max (2)"),
        ({"adaptive_min": 1}, "adaptive_min needs adaptive_max"),
        ({"partition": "a", "queue": "b"}, "partition or queue"),
        ({"job_extra": ["qos=long"]}, "not an sbatch option"),
        ({"start_timeout": "soon"}, "start_timeout must be a number"),
    ],
)
def test_cluster_table_is_checked(table, message):
    with pytest.raises(ConfigError) as e:
        cluster_config(table, "flow.toml: [cluster]")
    assert message in str(e.value) and "flow.toml: [cluster]" in str(e.value)


def test_cluster_config_defaults_and_shapes(tmp_path):
    c = cluster_config({}, root=tmp_path)
    assert (c.cores, c.processes, c.jobs, c.adaptive, c.memory) == (1, 1, 1, False, "2GB")
    assert c.log_directory == str(tmp_path / ".flow/slurm")
    c = cluster_config(
        {
            "queue": "q",
            "cores": 4,
            "processes": 2,
            "adaptive_max": 3,
            "job_extra": "#SBATCH --qos=long",
        }
    )
    assert (c.partition, c.threads, c.adaptive, c.adaptive_min, c.max_jobs) == ("q", 2, True, 0, 3)
    assert c.job_extra == ("--qos=long",)


def test_bad_cluster_key_exits_2_naming_it(tmp_path, phantoms):
    from cli.main import cli

    root = project(tmp_path, phantoms, {"partiton": "cpu", "cores": 2})
    res = CliRunner().invoke(cli, ["-p", str(root), "build", "--cluster", "slurm"])
    assert res.exit_code == 2, res.output
    assert "[cluster]: unknown key 'partiton'" in res.output
    assert "did you mean 'partition'" in res.output


def test_submit_dry_run_writes_the_sbatch_script(tmp_path, phantoms):
    from cli.main import cli

    cluster = {
        **WORKER_JOBS,
        "cores": 3,
        "account": "lab",
        "job_extra": ["--qos=long"],
        "prologue": ["export FOO=1"],
    }
    root = project(tmp_path / "p", phantoms, cluster)
    runner = CliRunner()
    res = runner.invoke(
        cli, ["-p", str(root), "submit", "--dry-run", "-t", "bovw", "--", "--retry-failed"]
    )
    assert res.exit_code == 0, res.output
    script = res.output
    assert script.startswith("#!/usr/bin/env bash\n")
    directives = re.findall(r"^#SBATCH (.*)$", script, re.M)
    for want in (
        "--partition=flow",
        "--account=lab",
        "--cpus-per-task=3",
        "--mem=1908M",
        "--time=00:20:00",
        "--qos=long",
        f"--chdir={root}",
        "--job-name=flow-build",
    ):
        assert want in directives, (want, directives)
    last = script.strip().splitlines()[-1]
    assert "build index --target=bovw --scheduler local --workers 3" in last
    assert last.endswith("--retry-failed") and str(root / "flow.toml") in last
    assert "export FOO=1" in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    assert not (root / ".flow").exists()  # a dry run writes nothing
    # a typo in the build's options is refused before anything is queued
    res = runner.invoke(cli, ["-p", str(root), "submit", "--dry-run", "--", "--bogus"])
    assert res.exit_code == 2 and "--bogus" in res.output


def test_ctrl_c_still_interrupts_after_dask_jobqueue_is_imported():
    """dask-jobqueue 0.9.0 sets SIGINT to sys.exit() on import; flow keeps its own."""
    if importlib.util.find_spec("dask_jobqueue") is None:
        pytest.skip("dask-jobqueue is not installed")
    code = (
        "import signal\n"
        "from engine.cluster import slurm_cluster_class\n"
        "slurm_cluster_class()\n"
        "assert 'sys.exit' not in str(signal.getsignal(signal.SIGINT))\n"
        "print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.stdout.strip() == "True", out.stderr


def test_local_cluster_of_the_same_shape(tmp_path, synthetic):
    data, want = synthetic
    cfg = cluster_config({"cores": 1, "jobs": 2, "memory": "1GB"}, root=tmp_path)
    st = open_store(tmp_path / "store")
    items, sources = synthetic_inputs(data, st)
    with cluster_executor(cfg, "local") as ex:
        assert len(ex.client.scheduler_info()["workers"]) == 2
        rep = build(synthetic_graph(), items, sources, st, ex, progress=False)
    assert rep.ok and content_keys(st) == want


# --------------------------------------------------------------------------
# a real Slurm


@pytest.mark.cluster
def test_slurm_rejects_a_bad_partition_before_queueing(slurm, tmp_path):
    assert slurm.queue() == []
    cfg = cluster_config({"partition": "nosuch", "memory": "1GB"}, root=tmp_path)
    with pytest.raises(ConfigError, match=r"Slurm would not run the job: .*(?i:partition)"):
        cluster_executor(cfg, "slurm")
    assert slurm.queue() == []
    check_job_script("#!/bin/sh\n#SBATCH --mem=1G\ntrue\n")  # a good script passes


@pytest.mark.cluster
def test_worker_jobs_that_cannot_start_fail_the_build_with_their_log(slurm, tmp_path):
    table = {"python": "/nonexistent/python3", "memory": "1GB", "jobs": 2, "start_timeout": 60}
    with pytest.raises(FlowError, match="ended before its worker connected") as e:
        cluster_executor(cluster_config(table, root=tmp_path), "slurm")
    assert "/nonexistent/python3" in str(e.value)  # the tail of the job's log
    assert slurm.queue() == []


@pytest.mark.slow
@pytest.mark.cluster
def test_synthetic_build_on_two_slurm_jobs_matches_sync(slurm, tmp_path, synthetic):
    data, want = synthetic
    cfg = cluster_config(
        {
            "partition": "flow",
            "cores": 1,
            "memory": "1GB",
            "walltime": "00:10:00",
            "jobs": 2,
            "start_timeout": 120,
        },
        root=tmp_path,
    )
    st = open_store(tmp_path / "store")
    items, sources = synthetic_inputs(data, st)
    logs: list[str] = []
    with cluster_executor(cfg, "slurm", log=logs.append) as ex:
        ids = ex.job_ids()
        assert len(ids) == 2 and ex.n_workers == 2
        queued = {line.split()[0]: line.split()[1:] for line in slurm.queue()}
        assert set(ids) <= set(queued) and all(queued[i][0] == "flow-worker" for i in ids)
        ex.client.wait_for_workers(2, timeout=120)
        rep = build(synthetic_graph(), items, sources, st, ex, progress=False, batch_size=10)
        assert rep.ok and "slurm cluster (2 jobs" in ex.name
    assert content_keys(st) == want
    # the work ran in the jobs' worker processes, on both of them
    pids = manifest_pids(tmp_path / "store")
    assert os.getpid() not in pids and len(pids) >= 2
    # released: nothing left in squeue, the jobs were cancelled
    assert slurm.queue() == []
    states = {j["JobId"]: j["JobState"] for j in slurm.jobs()}
    assert all(states[i] in ("CANCELLED", "COMPLETED") for i in ids), states
    assert any(line.startswith("dashboard: http") for line in logs)
    assert any("released 2 job(s)" in line for line in logs)


@pytest.mark.slow
@pytest.mark.cluster
def test_cli_build_on_adaptive_slurm_jobs(slurm, tmp_path, phantoms):
    before = {j["JobId"] for j in slurm.jobs()}
    cluster = {**WORKER_JOBS, "adaptive_min": 0, "adaptive_max": 2, "start_timeout": 120}
    root = project(tmp_path, phantoms, cluster)
    res = flow("build", "index", "--target=all", "--cluster", "slurm", cwd=root)
    assert res.returncode == 0, res.stdout + res.stderr
    assert re.search(r"^dashboard: http://\S+", res.stderr, re.M), res.stderr
    assert "on slurm cluster (0..2 jobs (adaptive) x 1 core(s)" in res.stderr
    for t in ("cnn", "bovw", "codes"):
        assert f"ref {t} -> #1: {N_PHANTOMS} items" in res.stdout
    assert slurm.queue() == []  # every worker job released before flow exited
    new = [j for j in slurm.jobs() if j["JobId"] not in before]
    assert len(new) >= 1 and all(j["JobName"] == "flow-worker" for j in new), new
    assert all(j["JobState"] in ("CANCELLED", "COMPLETED") for j in new), new


@pytest.mark.slow
@pytest.mark.cluster
def test_sigterm_releases_the_worker_jobs(slurm, tmp_path, phantoms):
    root = project(tmp_path, phantoms, {**WORKER_JOBS, "jobs": 2})
    proc = subprocess.Popen(
        [*CLI, "build", "index", "--cluster", "slurm"],
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out = []
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            out.append(line)
            if line.startswith("phase "):  # the build is running on the worker jobs
                break
        assert len(slurm.queue()) == 2, "".join(out)
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = "".join(out) + rest
    # handled, not killed by the signal (130 once app.workspace returns interrupted
    # first-stage reports without moving refs; 1 until then)
    assert proc.returncode in (1, 130), log
    assert "released 2 job(s)" in log
    assert slurm.queue() == [], log


@pytest.mark.slow
@pytest.mark.cluster
def test_submit_runs_the_build_as_one_batch_job(slurm, tmp_path, phantoms):
    root = project(tmp_path, phantoms, {**WORKER_JOBS, "cores": 2})
    script = tmp_path / "build.sbatch"
    res = flow("submit", "--write-only", "--script", str(script), "-t", "bovw", cwd=root)
    assert res.returncode == 0 and script.is_file(), res.stderr
    check = subprocess.run(["sbatch", "--test-only", str(script)], capture_output=True, text=True)
    assert check.returncode == 0 and "to start at" in check.stderr, check.stderr
    assert slurm.queue() == []

    res = flow("submit", "-t", "bovw", cwd=root)
    assert res.returncode == 0, res.stderr
    job = re.search(r"submitted batch job (\d+)", res.stdout).group(1)
    assert read_ref(open_store(root / ".flow/store"), "bovw") is None
    state, code = slurm.wait_job(job, timeout=150)
    log = root / f".flow/slurm/flow-build-{job}.out"
    assert (state, code) == ("COMPLETED", "0:0"), log.read_text() if log.exists() else state
    assert f"ref bovw -> #1: {N_PHANTOMS} items" in log.read_text()
    assert slurm.queue() == []
    ref = read_ref(open_store(root / ".flow/store"), "bovw")
    assert ref is not None and sum(s["count"] for s in ref["value"]["segments"]) == N_PHANTOMS
    assert read_ref(open_store(root / ".flow/store"), "cnn") is None  # only what was asked

    # --wait mirrors the build's exit status: a bad target fails the job
    res = flow("submit", "--wait", "-t", "nosuch", cwd=root, timeout=200)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "FAILED" in res.stdout and "no target 'nosuch'" in res.stderr
