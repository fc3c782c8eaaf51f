"""Keeping indices fresh: ``flow watch``, ``flow forget``, ``flow compact``."""

from __future__ import annotations

import signal
import sys
import time

import click

from cli.main import handle_errors, pass_ctx


def _summary(built) -> str:
    rep = built.report
    computed = sum(r.computed for r in rep.steps.values())
    parts = [f"{computed} computed in {rep.seconds:.1f} s"]
    for t, e in built.moved.items():
        segs = e["value"]["segments"]
        parts.append(f"{t}: {sum(s['count'] for s in segs)} items / {len(segs)} segment(s)")
    if rep.failures:
        parts.append(f"{len(rep.failures)} failed")
    for t, why in built.incomplete.items():
        parts.append(f"{t} NOT moved ({why})")
    return "; ".join(parts)


@click.command()
@click.argument("paths", nargs=-1)
@click.option("--id", "ids", multiple=True, help="An item id to withdraw (repeatable).")
@click.option(
    "--study",
    "studies",
    multiple=True,
    help="A DICOM StudyInstanceUID: withdraw every image of that study.",
)
@click.option("--reason", default="", help="Recorded in the ref history.")
@click.option("--no-build", is_flag=True, help="Only record; the next build drops the items.")
@pass_ctx
@handle_errors
def forget(ctx, paths, ids, studies, reason, no_build):
    """Withdraw studies or files from every index.

    PATHS are source files or folders (a study's folder withdraws all its
    images).  The withdrawal is recorded in the store (ref 'forgotten'), so
    later builds never index or train on them again, even while the files are
    still on disk; then the targets are rebuilt so the live indices no longer
    hold them.  `flow gc --delete` afterwards removes their data from the store.
    """
    ws = ctx.workspace
    shown = {i: ws.shown(i) for i in ws.items()[0].ids}  # before: forgotten items go
    gone = ws.forget(list(paths), list(ids), list(studies), reason)
    names = [shown.get(i, i) for i in gone[:10]]  # the files (ids are keyed hashes)
    click.echo(
        f"withdrew {len(gone)} item(s): {', '.join(names)}{' ...' if len(gone) > 10 else ''}"
    )
    pins = ws.pinned()
    if pins:
        click.echo(
            "note: fits trained before this (" + ", ".join(sorted(pins)) + ") may have "
            "seen these items; `flow build --retrain` refits without them",
            err=True,
        )
    if no_build:
        return
    built = ws.build("all", progress=False, log=ctx.debug)
    click.echo(_summary(built))
    if built.incomplete:
        sys.exit(1)


@click.command()
@click.option("-t", "--target", "targets", multiple=True, help="Target(s); default all.")
@pass_ctx
@handle_errors
def compact(ctx, targets):
    """Merge each target's index segments into one index.

    Builds also compact automatically when a target has more than its
    [targets.<name>.segments] max (8) segments, or when the segments besides
    the largest hold more than compact_fraction (0.5) of the items.
    """
    from cli.build import _targets

    ws = ctx.workspace
    built = ws.build(_targets(targets), compact=True, progress=False, log=ctx.debug)
    click.echo(_summary(built))
    if built.incomplete:
        sys.exit(1)


@click.command()
@click.argument("folders", nargs=-1, type=click.Path(file_okay=False))
@click.option("--interval", default=5.0, show_default=True, help="Seconds between polls.")
@click.option(
    "--settle",
    default=10.0,
    show_default=True,
    help="A changed file is built once its size and mtime held still this long "
    "(half-copied files wait).",
)
@click.option("--scheduler", help="Scheduler for the builds (default: the project's).")
@click.option(
    "--poll",
    "poll_only",
    is_flag=True,
    help="Scan every file at every poll instead of following the system's file "
    "notifications (use on network file systems written from other hosts).",
)
@click.option(
    "--rescan",
    default=300.0,
    show_default=True,
    help="Seconds between full scans when following notifications (a safety net).",
)
@pass_ctx
@handle_errors
def watch(ctx, folders, interval, settle, scheduler, poll_only, rescan):
    """Rebuild incrementally whenever source files are added, changed or removed.

    Follows the project's source folders (or FOLDERS, which must be among them):
    every --interval seconds it reads what the system's file notifications
    (inotify, FSEvents) say changed, with a full scan every --rescan seconds, or,
    with --poll or where notifications are unavailable, scans every file.  Once
    every changed file has been still for --settle seconds, it runs
    `flow build index --target=all`, which computes only the new work and adds
    an index segment.  Ctrl-C stops between builds.
    """
    from app.watch import Watcher, only_sources

    project = ctx.workspace.project
    if folders:
        only_sources(project, folders)
    stop = {"now": False}

    def on_signal(signum, frame):
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_signal)
    watcher = Watcher(
        project,
        settle=settle,
        scheduler=scheduler,
        log=ctx.debug,
        warn=ctx.log,
        notify=not poll_only,
        rescan=rescan,
    )
    service = _handoff_service(ctx, watcher)
    ctx.log(
        f"watching {', '.join(str(s.path) for s in project.sources)} "
        f"(every {interval:g} s, settle {settle:g} s, "
        + ("scanning every file" if poll_only else f"notified, full scan every {rescan:g} s")
        + "); Ctrl-C to stop"
        + ("; `flow build` and `flow status` of this project run here" if service else "")
    )
    try:
        while not stop["now"]:
            with watcher.lock:  # a handed-over command prints through sys.stdout too
                built = watcher.poll()
                if built is not None:
                    click.echo(f"{time.strftime('%H:%M:%S')} {_summary(built)}", err=False)
                    sys.stdout.flush()
            time.sleep(interval)
    except KeyboardInterrupt:
        pass
    finally:
        if service is not None:
            service.close()
        watcher.close()
    ctx.log("stopped")


def _handoff_service(ctx, watcher):
    """Take `flow build` and `flow status` of this project from other processes
    (app.handoff), run on this watcher's view of the sources; None if another
    process already takes them."""
    from app.handoff import BuildService, command_of
    from cli.main import Context, cli

    project = watcher.project

    def run(argv, cancel):
        with watcher.lock:
            ws, snap = watcher.workspace()
            ws.cancel = cancel
            obj = Context(ctx.project_path, ctx.store_url, 0, False)
            obj._ws = ws
            try:
                cli.main(args=argv, prog_name="flow", obj=obj, standalone_mode=True)
            except SystemExit as e:
                if command_of(argv) == "build" and e.code in (0, 1):
                    watcher.built(snap)  # what it built, the watcher need not build again
                else:
                    watcher.done_with_workspace()
                raise
            return 0

    service = BuildService(str(project.file), ctx.store_url, run, log=ctx.debug)
    if not service.start():
        ctx.log("another process takes this project's handed-over builds; not this one")
        return None
    return service


commands = [watch, forget, compact]
