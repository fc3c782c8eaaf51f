"""``flow submit``: a whole build as one Slurm batch job.

The job script asks for one node's worth of ``[cluster]`` resources
(``cores``, ``memory``, ``walltime``, ``partition``, ``account``, every
``job_extra`` directive) and runs ``flow build index`` inside the allocation
on a local Dask cluster of ``cores`` workers -- nothing has to stay running
where it was submitted.  (To spread one build over many jobs instead, use
``flow build --cluster slurm``; see :mod:`engine.cluster`.)
"""

from __future__ import annotations

import math
import os
import re
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.cluster import ClusterConfig

__all__ = [
    "BatchJob",
    "batch_job",
    "batch_script",
    "job_state",
    "slurm_memory",
    "submit_script",
    "wait_for_job",
]

_ENTRY = "from cli.main import main; main()"


@dataclass
class BatchJob:
    """An sbatch script for a build, where it goes and where its output will be."""

    script: str
    path: Path
    output: str  # the job's output file, with %j for the job id
    log_directory: str
    build_args: list[str]  # what `flow build` gets inside the job

    def write(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        Path(self.log_directory).mkdir(parents=True, exist_ok=True)
        self.path.write_text(self.script, encoding="utf-8")
        self.path.chmod(0o755)
        return self.path


def build_arguments(config: ClusterConfig, targets: list[str], extra: list[str]) -> list[str]:
    """The ``flow build index`` options the job runs with."""
    inner = [*(f"--target={t}" for t in targets or ["all"]), "--scheduler", "local"]
    return [*inner, "--workers", str(config.cores), "--no-progress", *extra]


def batch_job(
    project_path: str | None,
    *,
    store_url: str | None = None,
    verbose: int = 0,
    targets: list[str] | None = None,
    build_args: list[str] = (),  # type: ignore[assignment]
    job_name: str = "flow-build",
    script_path: str | None = None,
) -> BatchJob:
    """The batch job that builds ``targets`` of the project at ``project_path``."""
    from app.project import load_project
    from engine.cluster import cluster_config

    project = load_project(project_path, store=store_url)
    config = cluster_config(project.cluster, f"{project.file}: [cluster]", root=project.root)
    inner = build_arguments(config, list(targets or ["all"]), list(build_args))
    toml = str(Path(project.file or "flow.toml").resolve())
    command = [config.python or sys.executable, "-c", _ENTRY, "--project", toml]
    if store_url:  # the job runs in the project's folder
        command += ["--store", store_url if "://" in store_url else os.path.abspath(store_url)]
    command += ["-v"] * verbose + ["build", "index", *inner]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(script_path or Path(config.log_directory) / f"{job_name}-{stamp}.sbatch")
    output = str(Path(config.log_directory) / f"{job_name}-%j.out")
    comment = (
        f"Written by `flow submit` on {time.strftime('%Y-%m-%d %H:%M:%S')} for {toml}.\n"
        "Runs `flow build` in one Slurm job on a local Dask cluster of --cpus-per-task\n"
        f"workers.  Submit it (again) with: sbatch {path}"
    )
    script = batch_script(
        config, command, workdir=project.root, job_name=job_name, output=output, comment=comment
    )
    return BatchJob(script, path, output, config.log_directory, inner)


def slurm_memory(size: str) -> str:
    """``'4GB'`` as sbatch writes it (``3815M``: Slurm's M is MiB), rounded up."""
    from dask.utils import parse_bytes

    return f"{math.ceil(parse_bytes(size) / 2**20)}M"


def batch_script(
    config: ClusterConfig,
    command: list[str],
    *,
    workdir: str | os.PathLike,
    job_name: str = "flow-build",
    output: str | None = None,
    comment: str = "",
) -> str:
    """An sbatch script running ``command`` in one job of ``config.cores`` CPUs."""
    output = output or os.path.join(config.log_directory, f"{job_name}-%j.out")
    head = [
        f"--job-name={job_name}",
        f"--output={output}",
        f"--chdir={workdir}",
        *([f"--partition={config.partition}"] if config.partition else []),
        *([f"--account={config.account}"] if config.account else []),
        "--nodes=1",
        "--ntasks=1",
        f"--cpus-per-task={config.cores}",
        f"--mem={slurm_memory(config.memory)}",
        f"--time={config.walltime}",
        *config.job_extra,
    ]
    lines = ["#!/usr/bin/env bash"]
    lines += [f"# {c}" if c else "#" for c in comment.splitlines()]
    lines += [f"#SBATCH {h}" for h in head]
    lines += ["set -euo pipefail", *config.prologue]
    lines += [
        'echo "flow: job ${SLURM_JOB_ID:-?} on $(hostname) with '
        '${SLURM_CPUS_PER_TASK:-?} CPUs, started $(date -Is)"'
    ]
    lines += [shlex.join(command), ""]
    return "\n".join(lines)


def submit_script(path: str | os.PathLike) -> str:
    """``sbatch path``; the job id.  A :class:`ConfigError` with Slurm's reason
    when it refuses the job."""
    from engine.cluster import slurm_command
    from flow.errors import ConfigError

    out = slurm_command(["sbatch", "--parsable", str(path)], check=False)
    if out.returncode != 0:
        why = " ".join((out.stderr or out.stdout).split())
        raise ConfigError(f"sbatch refused {path}: {why}")
    return out.stdout.strip().split(";")[0]


def job_state(job_id: str) -> tuple[str, str]:
    """(state, exit code) of a job: ``("COMPLETED", "0:0")``, ``("RUNNING", "")``...

    Asks ``scontrol`` (which remembers finished jobs for MinJobAge), then
    ``sacct`` where accounting is on; ``("UNKNOWN", "")`` if neither knows."""
    from engine.cluster import slurm_command

    out = slurm_command(["scontrol", "-o", "show", "job", str(job_id)], check=False)
    if out.returncode == 0:
        fields = dict(re.findall(r"(\w+)=(\S*)", out.stdout))
        return fields.get("JobState", "UNKNOWN"), fields.get("ExitCode", "")
    if shutil.which("sacct"):
        out = slurm_command(
            ["sacct", "-n", "-X", "-P", "-j", str(job_id), "-o", "State,ExitCode"], check=False
        )
        if out.returncode == 0 and out.stdout.strip():
            state, _, code = out.stdout.strip().splitlines()[0].partition("|")
            return state.split()[0], code
    return "UNKNOWN", ""


def wait_for_job(
    job_id: str,
    timeout: float | None = None,
    poll: float = 1.0,
    on_state: Callable[[str], None] | None = None,
) -> tuple[str, str]:
    """Poll until the job has ended; its (state, exit code).  ``TimeoutError``
    after ``timeout`` seconds (the job keeps running)."""
    from engine.cluster import LIVE_STATES

    deadline = math.inf if timeout is None else time.monotonic() + timeout
    last = None
    while True:
        state, code = job_state(job_id)
        if state != last and on_state is not None:
            on_state(state)
        last = state
        if state not in LIVE_STATES:
            return state, code
        if time.monotonic() > deadline:
            raise TimeoutError(f"Slurm job {job_id} still {state} after {timeout:.0f} s")
        time.sleep(poll)
