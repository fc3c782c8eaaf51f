"""``flow query`` and ``flow eval``."""

from __future__ import annotations

import click

from cli._fmt import table
from cli.main import handle_errors, pass_ctx


@click.command()
@click.argument("image", type=click.Path(exists=True, dir_okay=False))
@click.option("-t", "--target", default="cnn", show_default=True, help="Which index to search.")
@click.option(
    "-k", default=10, show_default=True, type=click.IntRange(min=1), help="How many results."
)
@click.option(
    "--search-k",
    type=click.IntRange(min=1),
    default=None,
    help="annoy search_k: nodes inspected per query (more: slower, closer to exact).",
)
@click.option(
    "--roi",
    help="A region of interest x,y,w,h in IMAGE's pixels: regions targets return "
    "matching regions (one per study); other targets search with that crop.",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option(
    "--montage",
    type=click.Path(dir_okay=False),
    help="Write a PNG of the query beside its results, with labels.",
)
@pass_ctx
@handle_errors
def query(ctx, image, target, k, search_k, roi, as_json, montage):
    """Find the K most similar prior images to IMAGE (DICOM, PNG or JPEG).

    Runs the same decode/normalize/embed nodes the index was built with on
    IMAGE, then searches the target's current index.  Reads only the ref, the
    index and the fit objects: nothing is trained or recomputed.
    """
    from app.retrieval import open_target, parse_roi

    box = parse_roi(roi)
    retr = open_target(ctx.project_path, ctx.store_url, target)
    import os

    from app.workspace import known_items

    hits = retr.query(image, k=k, search_k=search_k, roi=box)
    paths, by_path = known_items(ctx.project_path, ctx.store_url)
    known = by_path.get(os.path.realpath(image))  # the query is an item: its own labels
    files = _relative(ctx, paths)  # ids are keyed hashes: the files, for who has them
    if as_json:
        import json

        doc = {"query": image, "target": target, "results": [h.to_json() for h in hits]}
        if known is not None:
            doc["query_item"] = {"id": known[0], "labels": list(known[1])}
            if known[0] in files:
                doc["query_item"]["file"] = files[known[0]]
        for h, r in zip(hits, doc["results"]):
            r["path"] = paths.get(h.id)  # the file to open (None: not in this project)
            if h.id in files:
                r["file"] = files[h.id]  # the same, relative to the project
        if box:
            doc["roi"] = list(box)
        click.echo(json.dumps(doc, indent=2))
    else:
        if known is not None:
            shown = files.get(known[0], known[0])
            click.echo(f"query {shown}: labels {'|'.join(known[1]) or '(none)'}")
        regions = retr.kind == "regions"
        click.echo(
            table(
                ["rank", "distance", "item", *(["box x,y,w,h"] if regions else []), "labels"],
                [
                    [
                        h.rank,
                        round(h.distance, 4),
                        files.get(h.id, h.id),
                        *([",".join(map(str, h.box or ()))] if regions else []),
                        "|".join(h.labels),
                    ]
                    for h in hits
                ],
                right={0, 1},
            )
        )
    if montage:
        from app.montage import montage as draw

        draw(retr, image, hits, paths, montage, known=known)
        ctx.log(f"wrote {montage}")


def _relative(ctx, paths: dict[str, str]) -> dict[str, str]:
    """Item id -> its file, relative to the project folder where inside it."""
    import os

    from app.project import load_project

    try:
        root = str(load_project(ctx.project_path, store=ctx.store_url).root) + os.sep
    except Exception:
        return dict(paths)
    return {i: p[len(root) :] if p.startswith(root) else p for i, p in paths.items()}


@click.command("eval")
@click.option(
    "-t", "--target", "targets", multiple=True, help="Target(s) to evaluate (default: all)."
)
@click.option(
    "-k", default=None, type=click.IntRange(min=1), help="Largest K (default: [eval] k, 10)."
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option(
    "--plot",
    type=click.Path(dir_okay=False),
    help="Write a PNG of the metrics against K for every target.",
)
@click.option("--scheduler", help="For building what the evaluation needs (default: project's).")
@pass_ctx
@handle_errors
def evaluate(ctx, targets, k, as_json, plot, scheduler):
    """Retrieval quality of each target, beside random, the image-blind prior and
    raw pixels computed in the same run.

    Queries are the items of the [eval] queries split, searched in an index of the
    [eval] database split (built on demand, like any target, and reused).  Metrics:
    AvG@K, precision@K and mAP@K (a shared label, "No Finding" included), label-macro
    P@K (every finding weighs alike), abnormal queries' P@K of results sharing a
    finding, normal queries' P@K of normal results (README: Evaluation).
    """
    from app.evaluation import evaluate_targets, label_table, report_table
    from cli.build import _targets

    ws = ctx.workspace
    results = evaluate_targets(ws, _targets(targets), k, scheduler=scheduler, log=ctx.debug)
    k = results[0]["k"]
    if as_json:
        import json

        click.echo(json.dumps(results, indent=2))
    else:
        click.echo(
            f"{results[0]['queries']} queries ({', '.join(ws.project.eval_queries)}: "
            f"{results[0]['abnormal_queries']} with a finding, "
            f"{results[0]['normal_queries']} normal) against {results[0]['database']} items "
            f"({', '.join(ws.project.eval_database)}), K={k}"
        )
        headers, rows = report_table(results, k)
        click.echo(table(headers, rows, right=set(range(2, len(headers)))))
        for r in results:
            headers, rows = label_table(r)
            click.echo(f"\nper label, {r['target']}:")
            click.echo(table(headers, rows, right=set(range(1, len(headers)))))
    for r in results:
        for w in r["warnings"]:
            click.echo(f"warning: {w}", err=True)
    if plot:
        from app.evaluation import plot_metrics

        plot_metrics(results, plot)
        ctx.log(f"wrote {plot}")


commands = [query, evaluate]
