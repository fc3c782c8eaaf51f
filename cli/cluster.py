"""``flow submit``: run a whole build as one Slurm batch job.

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
from pathlib import Path
from typing import TYPE_CHECKING

import click

from cli.main import handle_errors, pass_ctx

if TYPE_CHECKING:
    from engine.cluster import ClusterConfig

_ENTRY = "from cli.main import main; main()"


@click.command(context_settings={"ignore_unknown_options": True})
@click.option(
    "-t",
    "--target",
    "targets",
    multiple=True,
    help="Target(s) to build, comma-separated or repeated (default: all).",
)
@click.option(
    "--script",
    "script_path",
    type=click.Path(dir_okay=False),
    help="Where to write the sbatch script (default: [cluster] log_directory, "
    ".flow/slurm/flow-build-<time>.sbatch).",
)
@click.option("--dry-run", is_flag=True, help="Print the script; write and submit nothing.")
@click.option("--write-only", is_flag=True, help="Write the script but don't submit it.")
@click.option(
    "--wait",
    is_flag=True,
    help="Wait for the job to end and exit with its build's status (0: built).",
)
@click.option("--timeout", type=float, help="With --wait: stop waiting after this many seconds.")
@click.option("--job-name", default="flow-build", show_default=True, help="Slurm job name.")
@click.argument("build_args", nargs=-1, type=click.UNPROCESSED)
@pass_ctx
@handle_errors
def submit(ctx, targets, script_path, dry_run, write_only, wait, timeout, job_name, build_args):
    """Run `flow build index` as one Slurm batch job (sbatch).

    Writes an sbatch script with #SBATCH lines from flow.toml's [cluster]
    (partition, account, cores, memory, walltime, job_extra) that runs the
    build on `cores` local workers inside the job, and submits it.  The job's
    output goes to [cluster] log_directory (default .flow/slurm/).  Options
    after `--` go to `flow build`, e.g. `flow submit -- --retry-failed`.
    """
    from app.project import load_project
    from cli.build import build as build_cmd
    from engine.cluster import cluster_config
    from flow.errors import FlowError

    project = load_project(ctx.project_path, store=ctx.store_url)
    where = f"{project.file}: [cluster]"
    config = cluster_config(project.cluster, where, root=project.root)
    names = [t for v in targets for t in v.split(",") if t] or ["all"]
    inner = [*(f"--target={t}" for t in names), "--scheduler", "local"]
    inner += ["--workers", str(config.cores), "--no-progress", *build_args]
    try:  # a typo in the build's options fails now, not when the job starts
        build_cmd.make_context("flow build", ["index", *inner], parent=click.get_current_context())
    except click.UsageError as e:
        raise click.UsageError(f"options for flow build: {e.format_message()}") from None
    toml = str(Path(project.file or "flow.toml").resolve())
    command = [config.python or sys.executable, "-c", _ENTRY, "--project", toml]
    if ctx.store_url:  # the job runs in the project's folder
        url = ctx.store_url
        command += ["--store", url if "://" in url else os.path.abspath(url)]
    command += ["-v"] * ctx.verbose + ["build", "index", *inner]

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
    if dry_run:
        click.echo(script, nl=False)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    Path(config.log_directory).mkdir(parents=True, exist_ok=True)
    path.write_text(script, encoding="utf-8")
    path.chmod(0o755)
    if write_only:
        click.echo(f"wrote {path}; submit it with: sbatch {path}")
        return
    job = submit_script(path)
    log = output.replace("%j", job)
    click.echo(f"submitted batch job {job} ({path}); output: {log}")
    if not wait:
        return
    try:
        state, code = wait_for_job(
            job, timeout=timeout, on_state=lambda s: ctx.log(f"job {job}: {s}")
        )
    except TimeoutError as e:
        raise FlowError(f"{e}; it goes on (squeue -j {job}, scancel {job})") from None
    click.echo(f"job {job} {state}, exit code {code or '?'}")
    status = int(code.split(":")[0]) if code[:1].isdigit() else 1
    if state == "COMPLETED" and status == 0:
        return
    try:
        tail = Path(log).read_text(errors="replace").splitlines()[-30:]
        click.echo(f"--- end of {log} ---\n" + "\n".join(tail), err=True)
    except OSError:
        pass
    sys.exit(status or 1)


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


commands = [submit]
