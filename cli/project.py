"""``flow init`` and ``flow demo``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from cli.main import handle_errors, pass_ctx

TEMPLATE = """\
# flow project: what to index, where to keep it, and which indices to build.
# Paths are relative to this file.  Run `flow status` to see what is stale and
# `flow build index --target=all` to build.

[store]
# A folder (created if missing) or an fsspec URL such as "s3://bucket/prefix".
url = ".flow/store"
# options = { endpoint_url = "http://127.0.0.1:9000" }   # passed to fsspec

[build]
# sync | threads | local (a local Dask cluster) | tcp://host:port (existing scheduler)
scheduler = "local"
# workers = 2          # local cluster size (default: one per core)
# threads_below = 400  # "local": fewer stale item computations than this run in
#                      # threads of the flow process (no cluster start-up); 0: never
# [build.tls]          # for a tls:// scheduler (or flow build --tls-ca-file/-cert/-key)
# ca_file = "ca.pem"
# cert = "client.pem"
# key = "client.key"

# [cluster]                 # `flow build --cluster slurm`: workers as Slurm jobs
# partition = "cpu"
# cores = 1               # per job (one worker process with this many threads)
# memory = "4GB"
# walltime = "01:00:00"
# jobs = 4                # or adaptive_min = 0 / adaptive_max = 8
# job_extra = ["--qos=normal"]

[[sources]]
# A folder of DICOM / PNG / JPEG files, scanned recursively.
path = "{images}"
# include = ["*.dcm", "*.png", "*.jpg", "*.jpeg"]
# extensionless = true   # also take files without an extension (DICOM archives)
# An optional labels CSV: one row per image, joined on `file_column` (a path relative
# to the CSV or the source folder, or a bare file name), or on a DICOM identifier
# with join = "SOPInstanceUID" (or StudyInstanceUID, AccessionNumber).
{labels_line}
# labels_column = "finding_labels"   # labels joined by labels_separator ("|")
# split_column = "split"              # e.g. train / val

[train]
# Items of these splits train the fit nodes (vocabulary, embedder, coder).
splits = ["train"]

# [database]
# splits = ["train"]    # which items go into the indices (default: every item)

[eval]
queries = ["val"]       # `flow eval`: these items query ...
database = ["train"]    # ... an index of these
k = 10

# Targets: each is one index.  kind = bovw | cnn | codes.  Sub-tables set the
# parameters of the target's nodes; `flow status` shows which steps a change
# makes stale.
[targets.cnn]
kind = "cnn"
# weights = "my_embedder.onnx"   # use your own network instead of training one
[targets.cnn.normalize]
size = 64
# [targets.cnn.embedder]
# epochs = 80            # training epochs (defaults: dim 64, width 32)
# batch_size = 64        # with only a few hundred training images, 16-32 gives the
#                        # findings head enough steps
# vectors = "findings"   # index the head's finding probabilities, ranked by inner
#                        # product (expected shared findings); "embedding": the
#                        # metric embedding, by cosine
# augment = false        # affine warp + intensity jitter while training

[targets.bovw]
kind = "bovw"
[targets.bovw.vocabulary]
words = 256

[targets.codes]
kind = "codes"          # binary codes from the cnn embedding, re-ranked by it
embedding = "cnn"
[targets.codes.coder]
bits = 64
"""


@click.command()
@click.argument("folder", required=False, default=".", type=click.Path(file_okay=False))
@click.option("--images", default="images", help="The source folder (relative to FOLDER).")
@click.option("--labels", default=None, help="A labels CSV (relative to FOLDER).")
@click.option("--force", is_flag=True, help="Overwrite an existing flow.toml.")
def init(folder, images, labels, force):
    """Write a commented flow.toml in FOLDER."""
    path = Path(folder) / "flow.toml"
    if path.exists() and not force:
        click.echo(f"error: {path} exists (use --force to overwrite)", err=True)
        sys.exit(2)
    path.parent.mkdir(parents=True, exist_ok=True)
    labels_line = f"labels = {json.dumps(labels)}" if labels else '# labels = "labels.csv"'
    text = TEMPLATE.replace("{images}", json.dumps(images)[1:-1]).replace(
        "{labels_line}", labels_line
    )
    path.write_text(text, encoding="utf-8")
    click.echo(f"wrote {path}")


DEMO_TOML = """\
# The flow demo: synthetic chest phantoms written as DICOM by `flow demo`.
[store]
url = ".flow/store"

[build]
scheduler = "{scheduler}"

[[sources]]
path = "images"
labels = "labels.csv"

[train]
splits = ["train"]

[eval]
queries = ["val"]
database = ["train"]
k = 10

[targets.cnn]
kind = "cnn"
[targets.cnn.normalize]
size = 64
[targets.cnn.embedder]
epochs = {epochs}
batch_size = 16    # 150 training images: more, smaller steps for the findings head

[targets.bovw]
kind = "bovw"

[targets.codes]
kind = "codes"
embedding = "cnn"
[targets.codes.coder]
bits = 32

# regions of every image (overlapping tiles), for region-of-interest queries:
# `flow query IMAGE --target regions --roi x,y,w,h`, or draw a box in `flow serve`
[targets.regions]
kind = "regions"
"""


@click.command()
@click.argument("folder", required=False, default="flow-demo", type=click.Path(file_okay=False))
@click.option(
    "-n", "--images", "n", default=200, show_default=True, help="How many phantom studies to write."
)
@click.option("--epochs", default=15, show_default=True, help="Embedder training epochs.")
@click.option("--scheduler", default="local", show_default=True)
@click.option("-k", default=5, show_default=True, help="Results per query.")
@pass_ctx
@handle_errors
def demo(ctx, folder, n, epochs, scheduler, k):
    """Make a labeled phantom study, build every index, query and evaluate it.

    Writes FOLDER/images (DICOM files of synthetic chest radiographs with
    findings, in several transfer syntaxes), FOLDER/labels.csv and
    FOLDER/flow.toml, then runs build, query and eval there.  Running it
    again reuses everything already built.
    """
    from app.phantoms import write_phantom_study
    from app.workspace import Workspace

    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "labels.csv").exists():
        ctx.log(f"writing {n} phantom studies to {root / 'images'}")
        write_phantom_study(root, n=n, seed=0)
    toml = root / "flow.toml"
    if not toml.exists():
        toml.write_text(DEMO_TOML.format(scheduler=scheduler, epochs=epochs), encoding="utf-8")
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
    ws = ctx.workspace
    items, _, meta = ws.items()
    val = [i for i, s in enumerate(items.splits) if s == "val"]
    probe = meta["paths"][val[0]] if val else meta["paths"][0]
    click.echo(f"\nquery: {probe} (labels: {'|'.join(meta['labels'][val[0] if val else 0])})")
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
