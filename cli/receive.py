"""``flow receive``: a DICOM Storage SCP that builds studies as they arrive."""

from __future__ import annotations

import signal
import sys
import time

import click

from cli.main import handle_errors, pass_ctx


@click.command()
@click.option("--port", type=int, help="TCP port (default: [receive] port).")
@click.option("--ae-title", help="Our AE title (default: [receive] ae_title).")
@click.option("--settle", type=float, help="Seconds without an instance before a study is built.")
@click.option("--scheduler", help="Scheduler for the builds (default: the project's).")
@click.option("--no-build", is_flag=True, help="Only store what arrives; build nothing.")
@click.option("--interval", default=0.2, show_default=True, help="Seconds between polls.")
@pass_ctx
@handle_errors
def receive(ctx, port, ae_title, settle, scheduler, no_build, interval):
    """Receive DICOM instances (C-STORE) and keep the indices fresh.

    Listens on the [receive] port as its AE title; each instance is written
    durably to the [receive] folder before it is acknowledged.  A study is
    built once no instance arrived for it for --settle seconds (sooner once its
    sender released the association), and the time from its first instance to
    searchable is logged.  Ctrl-C or SIGTERM stops; received instances that were
    not built yet are built by the next `flow receive` or `flow build`.
    """
    from app.receive import Receiver

    project = ctx.workspace.project
    if project.receive is None:
        click.echo(
            f"error: {project.file}: no [receive] table (folder, ae_title, port, allowed)",
            err=True,
        )
        sys.exit(2)
    conf = project.receive
    if port is not None:
        conf.port = port
    if ae_title:
        conf.ae_title = ae_title
    if settle is not None:
        conf.settle = settle
    stop = {"now": False}

    def on_signal(signum, frame):
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_signal)

    def log(msg: str) -> None:
        click.echo(f"{time.strftime('%H:%M:%S')} {msg}")
        sys.stdout.flush()

    r = Receiver(project, scheduler=scheduler, build=not no_build, log=log, debug=ctx.debug)
    host, bound = r.start()
    allowed = ", ".join(conf.allowed) if conf.allowed else "any calling AE title"
    log(
        f"receiving as {conf.ae_title} on {host}:{bound} ({allowed}) into {conf.folder}; "
        f"studies settle after {conf.settle:g} s; Ctrl-C to stop"
    )
    try:
        while not stop["now"]:
            built = r.poll()
            if built is not None:
                from cli.incremental import _summary

                log(_summary(built))
                if built.report.interrupted:  # Ctrl-C during a build: stop receiving
                    break
            time.sleep(interval)
    except KeyboardInterrupt:
        pass
    finally:
        r.stop()
    c = r.counts
    log(
        f"stopped: {c['stored']} stored, {c['replaced']} replaced, {c['duplicate']} "
        f"duplicate(s), {c['nonimage']} non-image, {c['failed']} refused; "
        f"{r.pending} study(ies) not built yet"
    )


commands = [receive]
