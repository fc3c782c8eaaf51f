"""``flow init`` and ``flow demo``."""

from __future__ import annotations

import click

from cli.main import handle_errors, pass_ctx


@click.command()
@click.argument("folder", required=False, default=".", type=click.Path(file_okay=False))
@click.option("--images", default="images", help="The source folder (relative to FOLDER).")
@click.option("--labels", default=None, help="A labels CSV (relative to FOLDER).")
@click.option("--force", is_flag=True, help="Overwrite an existing flow.toml.")
@handle_errors
def init(folder, images, labels, force):
    """Write a commented flow.toml in FOLDER."""
    from app.init import write_init

    click.echo(f"wrote {write_init(folder, images, labels, force)}")


@click.command()
@click.argument("folder", required=False, default="flow-demo", type=click.Path(file_okay=False))
@click.option(
    "-n", "--images", "n", default=200, show_default=True, help="How many phantom studies to write."
)
@click.option("--epochs", default=15, show_default=True, help="Embedder training epochs.")
@click.option("--scheduler", default="local", show_default=True)
@click.option(
    "-k", default=5, show_default=True, type=click.IntRange(min=1), help="Results per query."
)
@pass_ctx
@handle_errors
def demo(ctx, folder, n, epochs, scheduler, k):
    """Make a labeled phantom study, build every index, query and evaluate it.

    Writes FOLDER/images (DICOM files of synthetic chest radiographs with
    findings, in several transfer syntaxes), FOLDER/labels.csv and
    FOLDER/flow.toml, then runs build, query and eval there.  Running it
    again reuses everything already built.
    """
    from app.demo import demo_probe, prepare_demo
    from app.workspace import Workspace

    root = prepare_demo(folder, n=n, epochs=epochs, scheduler=scheduler, log=ctx.log)
    ctx._ws = Workspace.open(root)
    ctx.project_path = str(root)
    cctx = click.get_current_context()
    from cli.build import build
    from cli.query import evaluate, query

    try:
        cctx.invoke(
            build,
            what="index",
            targets=("all",),
            scheduler=None,
            workers=None,
            retry_failed=False,
            fail_fast=False,
            retrain=False,
            compact=False,
            progress=None,
            as_json=False,
        )
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    probe, labels = demo_probe(ctx.workspace)
    click.echo(f"\nquery: {probe} (labels: {'|'.join(labels)})")
    cctx.invoke(
        query, image=probe, target="cnn", k=k, roi=None, as_json=False, montage=None, search_k=None
    )
    click.echo("")
    cctx.invoke(
        evaluate, targets=("all",), k=10, as_json=False, plot=str(root / "eval.png"), scheduler=None
    )
    click.echo(
        f"\nsearch it in a browser: flow -p {root} serve   (then open http://127.0.0.1:8000/)"
    )


commands = [init, demo]
