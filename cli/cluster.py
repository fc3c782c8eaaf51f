"""``flow submit``: run a whole build as one Slurm batch job (see :mod:`app.submit`)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from cli.main import handle_errors, pass_ctx


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
    from app.submit import batch_job, submit_script, wait_for_job
    from cli.build import build as build_cmd
    from flow.errors import FlowError

    names = [t for v in targets for t in v.split(",") if t] or ["all"]
    job = batch_job(
        ctx.project_path,
        store_url=ctx.store_url,
        verbose=ctx.verbose,
        targets=names,
        build_args=list(build_args),
        job_name=job_name,
        script_path=script_path,
    )
    try:  # a typo in the build's options fails now, not when the job starts
        build_cmd.make_context(
            "flow build", ["index", *job.build_args], parent=click.get_current_context()
        )
    except click.UsageError as e:
        raise click.UsageError(f"options for flow build: {e.format_message()}") from None
    if dry_run:
        click.echo(job.script, nl=False)
        return
    path = job.write()
    if write_only:
        click.echo(f"wrote {path}; submit it with: sbatch {path}")
        return
    job_id = submit_script(path)
    log = job.output.replace("%j", job_id)
    click.echo(f"submitted batch job {job_id} ({path}); output: {log}")
    if not wait:
        return
    try:
        state, code = wait_for_job(
            job_id, timeout=timeout, on_state=lambda s: ctx.log(f"job {job_id}: {s}")
        )
    except TimeoutError as e:
        raise FlowError(f"{e}; it goes on (squeue -j {job_id}, scancel {job_id})") from None
    click.echo(f"job {job_id} {state}, exit code {code or '?'}")
    status = int(code.split(":")[0]) if code[:1].isdigit() else 1
    if state == "COMPLETED" and status == 0:
        return
    try:
        tail = Path(log).read_text(errors="replace").splitlines()[-30:]
        click.echo(f"--- end of {log} ---\n" + "\n".join(tail), err=True)
    except OSError:
        pass
    sys.exit(status or 1)


commands = [submit]
