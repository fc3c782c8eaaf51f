"""``flow serve``: the HTTP API and the web viewer (see :mod:`app.serve`)."""

from __future__ import annotations

import os

import click

from cli.main import handle_errors, pass_ctx

_UNITS = {"": 1, "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20, "g": 1 << 30}


def _size(text: str) -> int:
    t = text.strip().lower().replace(" ", "")
    num = t.rstrip("kmgib")
    unit = t[len(num) :]
    if not num.isdigit() or unit not in _UNITS:
        raise click.BadParameter(f"{text!r}: a size such as 64MiB, 512k or 1048576")
    return int(num) * _UNITS[unit]


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", default=8000, show_default=True, type=int)
@click.option(
    "--token-file",
    type=click.Path(dir_okay=False, exists=True),
    help="A file holding the bearer token API calls must send (or FLOW_SERVE_TOKEN); "
    "required for any bind other than loopback.",
)
@click.option("-t", "--target", "targets", multiple=True, help="Serve only these targets.")
@click.option("--max-upload", default="64MiB", show_default=True, help="Largest request body.")
@click.option(
    "--cors-origin", "cors", multiple=True, help="Allow this origin (CORS); none by default."
)
@click.option("--poll", default=2.0, show_default=True, help="Seconds between ref checks.")
@click.option("--access-log", is_flag=True, help="Log every request.")
@pass_ctx
@handle_errors
def serve(ctx, host, port, token_file, targets, max_upload, cors, poll, access_log):
    """Serve the indices over HTTP, with a web viewer at /.

    Loads each target's current index once and follows ref moves (a build, a
    compaction, a forget) without a restart.  API: POST /api/query, GET
    /api/targets, GET /api/items/ID/image, /health, /metrics; description at
    /openapi.json.
    """
    from app.serve import ServeConfig
    from app.serve import serve as run
    from flow.errors import ConfigError

    token = None
    if token_file:
        with open(token_file, encoding="utf-8") as f:
            token = f.read().strip()
        if not token:
            raise ConfigError(f"--token-file {token_file} is empty")
    else:
        token = os.environ.get("FLOW_SERVE_TOKEN") or None
    project = ctx.project_path
    if project is None and not ctx.store_url:
        project = "."
    cfg = ServeConfig(
        project=project,
        store=ctx.store_url,
        targets=tuple(targets),
        host=host,
        port=port,
        token=token,
        max_upload=_size(max_upload),
        cors_origins=tuple(cors),
        poll=poll,
        access_log=access_log,
    )
    run(cfg, echo=lambda m: click.echo(m, err=True))


commands = [serve]
