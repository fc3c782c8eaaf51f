"""The ``flow`` command: a click group with a lazy project context.

Heavy imports (torch, dask, zarr) happen inside the commands that need
them, so ``flow --help`` is instant.  Errors flow knows about are printed
as one line naming the input and the reason (``-v`` adds the traceback);
exit codes: 0 success, 1 a build finished with failed items, 2 bad usage or
configuration, 130 interrupted.
"""

from __future__ import annotations

import contextlib
import os
import sys
from functools import update_wrapper
from typing import Any

import click

from cli import COMMANDS


class Context:
    """What every command shares: where the project is, and how loud to be."""

    def __init__(self, project: str | None, store: str | None, verbose: int, quiet: bool):
        self.project_path = project
        self.store_url = store
        self.verbose = verbose
        self.quiet = quiet
        self._ws = None

    @property
    def workspace(self):
        if self._ws is None:
            from app.workspace import Workspace

            self._ws = Workspace.open(self.project_path, store=self.store_url)
            self._ws.source_log = self.log  # a DICOMweb source's listing and downloads
        return self._ws

    def log(self, msg: str) -> None:
        if not self.quiet:
            click.echo(msg, err=True)

    def debug(self, msg: str) -> None:
        if self.verbose:
            click.echo(msg, err=True)


pass_ctx = click.make_pass_decorator(Context)

INTERRUPTED = "interrupted: everything finished so far is stored; rerun to continue"


def interrupted() -> None:
    """End the command as interrupted: one line, status 130."""
    import signal

    def again(signum: int, frame: Any) -> None:
        os._exit(130)  # a second Ctrl-C while exiting (threads still finishing): at once

    signal.signal(signal.SIGINT, again)
    signal.signal(signal.SIGTERM, again)
    with contextlib.suppress(Exception):
        click.echo(INTERRUPTED, err=True)
    sys.exit(130)


def handle_errors(f):
    """Turn flow's errors into a one-line message and an exit code."""

    @click.pass_context
    def wrapper(cctx: click.Context, *args: Any, **kwargs: Any) -> Any:
        from flow.errors import BuildFailed, ConfigError, FlowError

        try:
            return cctx.invoke(f, *args, **kwargs)
        except KeyboardInterrupt:
            interrupted()
        except BuildFailed as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        except (ConfigError, FileNotFoundError) as e:
            if cctx.find_object(Context) and cctx.find_object(Context).verbose:
                raise
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except FlowError as e:
            if cctx.find_object(Context) and cctx.find_object(Context).verbose:
                raise
            click.echo(f"error: {e}", err=True)
            sys.exit(1)

    return update_wrapper(wrapper, f)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "-p",
    "--project",
    envvar="FLOW_PROJECT",
    type=click.Path(),
    help="flow.toml, or the folder holding it (default: ./flow.toml).",
)
@click.option(
    "--store",
    envvar="FLOW_STORE",
    help="Store URL overriding the project's (a folder, s3://bucket/prefix).",
)
@click.option("-v", "--verbose", count=True, help="More output; tracebacks on errors.")
@click.option("-q", "--quiet", is_flag=True, help="Only results and errors.")
@click.version_option(package_name="flow-cbir")
@click.pass_context
def cli(
    cctx: click.Context, project: str | None, store: str | None, verbose: int, quiet: bool
) -> None:
    """flow: build and keep fresh content-based medical image retrieval indices."""
    if isinstance(cctx.obj, Context):  # given by the caller (a handed-over command)
        cctx.obj.verbose, cctx.obj.quiet = verbose, quiet
    else:
        cctx.obj = Context(project, store, verbose, quiet)


def _register() -> None:
    import importlib

    for module in COMMANDS:
        mod = importlib.import_module(f"cli.{module}")
        for cmd in mod.commands:
            cli.add_command(cmd)


if __name__ == "__main__":  # python -m cli.main: the real module registers and runs
    from cli.main import main as _main

    _main()
else:
    _register()


def main() -> None:
    """``flow``: an interrupt (Ctrl-C, SIGTERM) anywhere -- in a command, while click
    parses, while a module loads -- ends it with one line and status 130."""
    import signal

    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a kill is a Ctrl-C
    try:
        from app.handoff import try_handoff

        code = try_handoff(sys.argv[1:])  # a running `flow watch` of the project takes it
    except KeyboardInterrupt:
        interrupted()
    if code is not None:
        sys.exit(code)
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
    try:
        code = cli.main(prog_name="flow", standalone_mode=False)
    except KeyboardInterrupt:
        interrupted()
    except click.exceptions.Abort as e:
        if isinstance(e.__context__, KeyboardInterrupt):
            interrupted()
        click.echo("Aborted!", err=True)
        sys.exit(1)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    sys.exit(code if isinstance(code, int) else 0)
