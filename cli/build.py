"""``flow build`` and ``flow status``."""

from __future__ import annotations

import sys

import click

from cli._fmt import seconds, table
from cli.main import handle_errors, interrupted, pass_ctx


def _targets(values: tuple[str, ...]) -> list[str] | str:
    out = [t for v in values for t in v.split(",") if t]
    return "all" if not out or "all" in out else out


@click.command()
@click.argument("what", required=False, default="index", type=click.Choice(["index"]))
@click.option(
    "-t",
    "--target",
    "targets",
    multiple=True,
    help="Target(s) to build, comma-separated or repeated; 'all' (default) for every "
    "target in flow.toml.",
)
@click.option(
    "--scheduler",
    help="sync | threads | local (default) | tcp://host:port of an existing dask scheduler.",
)
@click.option(
    "--workers",
    type=int,
    help="Workers of a local cluster (default: one per core); with --cluster, the number of jobs.",
)
@click.option(
    "--cluster",
    "cluster_kind",
    type=click.Choice(["slurm", "local"]),
    help="Start the workers from flow.toml's [cluster]: as Slurm jobs through dask-jobqueue "
    "(slurm), or a local cluster of that shape (local); every job is released when the build "
    'ends.  [build] scheduler = "slurm" does the same.',
)
@click.option(
    "--retry-failed",
    is_flag=True,
    help="Run items that failed in an earlier build again (default: a recorded "
    "failure of the same recipe is reported, not retried).",
)
@click.option(
    "--fail-fast",
    is_flag=True,
    help="Stop scheduling new work after the first failed item (default: keep going, "
    "finish everything else, exit 1 and list the failures).",
)
@click.option(
    "--retrain",
    is_flag=True,
    help="Refit vocabularies, embedders and coders on the current training items "
    "(default: a fit is pinned once built and new studies don't retrain it).",
)
@click.option("--compact", is_flag=True, help="Merge each target's index segments into one.")
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Progress bars (default: when stderr is a terminal).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the build report as JSON.")
@click.option(
    "--tls-ca-file",
    type=click.Path(exists=True, dir_okay=False, resolve_path=True),
    help="For a tls:// scheduler: the CA certificate (PEM); overrides [build.tls] ca_file.",
)
@click.option(
    "--tls-cert",
    type=click.Path(exists=True, dir_okay=False, resolve_path=True),
    help="For a tls:// scheduler: this client's certificate (PEM).",
)
@click.option(
    "--tls-key",
    type=click.Path(exists=True, dir_okay=False, resolve_path=True),
    help="For a tls:// scheduler: the certificate's key, if not in --tls-cert.",
)
@pass_ctx
@handle_errors
def build(
    ctx,
    what,
    targets,
    scheduler,
    workers,
    retry_failed,
    fail_fast,
    retrain,
    compact,
    progress,
    as_json,
    tls_ca_file=None,
    tls_cert=None,
    tls_key=None,
    cluster_kind=None,
):
    """Build the targets' indices, computing only what is stale.

    Every item that fails (a broken file, a node error) is recorded with its
    reason; the build keeps going with the rest, moves each target's ref once
    its index is complete, and exits with status 1 listing the failures.
    Interrupting (Ctrl-C) loses nothing that finished: rerun to continue.
    """
    from app.preflight import preflight

    ws = ctx.workspace
    ws.retrain = retrain
    for line in preflight(ws, _targets(targets)).report(brief=True):
        ctx.log(line)
    ctx.log(f"store {ws.store.url}")
    built = ws.build(
        _targets(targets),
        scheduler=scheduler,
        cluster=cluster_kind,
        workers=workers,
        tls={
            k: v for k, v in (("ca_file", tls_ca_file), ("cert", tls_cert), ("key", tls_key)) if v
        },
        retry_failed=retry_failed,
        fail_fast=fail_fast,
        compact=compact,
        progress=False if ctx.quiet else progress,
        log=ctx.log,
    )
    rep = built.report
    if rep.interrupted and not as_json:
        interrupted()  # one line: the table of a stopped build says nothing useful
    if as_json:
        doc = rep.to_json()
        doc["refs"] = {t: e["value"]["segments"] for t, e in built.moved.items()}
        doc["fits"] = built.fits
        doc["unchanged"] = built.unchanged
        doc["incomplete"] = built.incomplete
        for f in doc["failures"]:  # ids are keyed hashes: the file, for who has it
            f["file"] = ws.shown(f["id"])
        from cli._fmt import dumps

        click.echo(dumps(doc))
    else:
        _print_report(ctx, built)
    if rep.interrupted:
        interrupted()
    if rep.failures or built.incomplete:
        sys.exit(1)


def _print_report(ctx, built) -> None:
    rep = built.report
    if built.idle:
        n = len(ctx.workspace.items()[0])
        click.echo(f"nothing stale: {n} items, every index up to date ({seconds(rep.seconds)})")
        return
    rows = [
        [r["step"], r["kind"], r["computed"], r["cut off"], r["failed"], r["fresh"],
         seconds(r["seconds"])]
        for r in built.step_rows()
    ]  # fmt: skip
    if rows and not ctx.quiet:
        click.echo(
            table(
                ["step", "kind", "computed", "cut off", "failed", "fresh", "time"],
                rows,
                right={2, 3, 4, 5, 6},
            )
        )
    for t, e in built.moved.items():
        segs = e["value"]["segments"]
        click.echo(
            f"ref {t} -> #{e['seq']}: {sum(s['count'] for s in segs)} items in "
            f"{len(segs)} segment(s)"
        )
    for f in built.fits:
        ctx.log(f"fit {f} pinned (later builds reuse it; --retrain refits)")
    for t in built.unchanged:
        ctx.log(f"ref {t} unchanged")
    for t, why in built.incomplete.items():
        click.echo(f"ref {t} NOT moved: {why}", err=True)
    if rep.failures:
        new = [f for f in rep.failures if f.new]
        old = [f for f in rep.failures if not f.new]
        click.echo(
            f"{len(rep.failures)} failed item(s) ({len(new)} in this build, "
            f"{len(old)} recorded earlier; --retry-failed reruns those):",
            err=True,
        )
        for f in rep.failures[:50]:
            shown = ctx.workspace.shown(f.id)  # the file (ids name no path)
            click.echo(f"  {f.step}: {shown}: {f.type}: {f.reason}", err=True)
            if ctx.verbose and f.traceback:
                click.echo("    " + f.traceback.replace("\n", "\n    "), err=True)
        if len(rep.failures) > 50:
            click.echo(f"  ... and {len(rep.failures) - 50} more (--json lists all)", err=True)
        for hint in built.hints():
            click.echo(f"hint: {hint}", err=True)
    ctx.log(f"done in {seconds(rep.seconds)} on {rep.executor}")


@click.command()
@click.option("-t", "--target", "targets", multiple=True, help="Target(s); default all.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_ctx
@handle_errors
def status(ctx, targets, as_json):
    """Show, per target and step, what is fresh, stale (and why) or failed.

    Index and table steps count index segments, as the next build lays them
    out ("items to index: N": new or changed items it computes first).  Computes
    nothing: it hashes new or changed source files (remembered in the stat
    cache) and reads the store's catalogs and the targets' refs.
    """
    from app.preflight import preflight
    from app.status import status_rows
    from cli._fmt import dumps

    rows = status_rows(ctx.workspace, _targets(targets))
    if as_json:
        click.echo(dumps(rows))
        return
    for line in preflight(ctx.workspace, _targets(targets)).report():
        click.echo(line)
    click.echo()
    click.echo(
        table(
            ["target", "step", "kind", "fresh", "stale", "failed", "blocked", "why stale"],
            [
                [
                    r["target"],
                    r["step"],
                    r["kind"],
                    r["fresh"],
                    r["stale"],
                    r["failed"],
                    r["blocked"],
                    ", ".join(f"{k}: {v}" for k, v in sorted(r["reasons"].items())),
                ]
                for r in rows
            ],
            right={3, 4, 5, 6},
        )
    )


commands = [build, status]
