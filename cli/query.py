"""``flow query`` and ``flow eval``."""

from __future__ import annotations

import click

from cli._fmt import table
from cli.main import handle_errors, pass_ctx


@click.command()
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("-t", "--target", default="cnn", show_default=True, help="Which index to search.")
@click.option("-k", default=10, show_default=True, help="How many results.")
@click.option(
    "--search-k",
    type=int,
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
    from app.retrieval import Retriever, parse_roi

    box = parse_roi(roi)
    store = _store(ctx)
    retr = Retriever.open(store, target)
    hits = retr.query(image, k=k, search_k=search_k, roi=box)
    files = _files(ctx, [h.id for h in hits])
    if as_json:
        import json

        results = [h.to_json() for h in hits]
        for r in results:
            if r["id"] in files:
                r["file"] = files[r["id"]]
        doc = {"query": image, "target": target, "results": results}
        if box:
            doc["roi"] = list(box)
        click.echo(json.dumps(doc, indent=2))
    else:
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

        paths = _paths(ctx)
        draw(retr, image, hits, paths, montage)
        ctx.log(f"wrote {montage}")


def _store(ctx):
    from app.project import open_project_store

    return open_project_store(ctx.project_path, ctx.store_url)


def _files(ctx, ids: list[str]) -> dict[str, str]:
    """Item id -> its file (relative to the project where inside it), from the
    project's id map (:class:`app.ids.IdMap`, kept by builds): keyed ids name no
    path, and a query must not scan the sources."""
    if not ctx.project_path and ctx.store_url:
        return {}
    try:
        from app.ids import IdMap
        from app.project import load_project

        project = load_project(ctx.project_path, store=ctx.store_url)
    except Exception:
        return {}
    idmap = IdMap.of(project)
    return {i: p for i in ids if (p := idmap.get(i)) is not None}


def _paths(ctx) -> dict[str, str]:
    from app.workspace import item_paths

    return item_paths(ctx.project_path, ctx.store_url)


@click.command("eval")
@click.option(
    "-t", "--target", "targets", multiple=True, help="Target(s) to evaluate (default: all)."
)
@click.option("-k", default=None, type=int, help="Largest K (default: [eval] k, 10).")
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
    """Retrieval quality: AvG@K, precision@K and mAP@K of the eval queries.

    Queries are the items of the [eval] queries split, searched in an index
    of the [eval] database split (built on demand, like any target, and
    reused); a random ranking of the same database is scored in the same run.
    """
    from cli.build import _targets

    ws = ctx.workspace
    names = _targets(targets)
    if names == "all":
        # a region index answers boxes, not images: see BENCHMARKS.md for its hit rate
        names = [t for t, v in ws.targets.items() if v["kind"] != "regions"]
    else:
        for t in names:
            if ws.targets.get(t, {}).get("kind") == "regions":
                from flow.errors import ConfigError

                raise ConfigError(
                    f"flow eval measures whole-image retrieval; {t!r} is a regions target "
                    "(its hit rate: bench/bench_serve.py --quality)"
                )
    k = k or ws.project.eval_k
    results = [ws.evaluate(t, k, scheduler=scheduler, log=ctx.debug) for t in names]
    if as_json:
        import json

        click.echo(json.dumps(results, indent=2))
    else:
        rows = []
        for r in results:
            m, b, pr = r["metrics"], r["random"], r["prior"]
            rows.append(
                [
                    r["target"],
                    r["kind"],
                    m["avg"][k],
                    m["precision"][k],
                    m["map"][k],
                    b["avg"][k],
                    b["precision"][k],
                    b["map"][k],
                    pr["avg"][k],
                ]
            )
        click.echo(
            f"{results[0]['queries']} queries ({', '.join(ws.project.eval_queries)}) "
            f"against {results[0]['database']} items "
            f"({', '.join(ws.project.eval_database)}), K={k}"
        )
        click.echo(
            table(
                [
                    "target",
                    "kind",
                    f"AvG@{k}",
                    f"P@{k}",
                    f"mAP@{k}",
                    f"random AvG@{k}",
                    f"random P@{k}",
                    f"random mAP@{k}",
                    f"label-prior AvG@{k}",
                ],
                rows,
            )
        )
    if plot:
        from app.evaluation import plot_metrics

        plot_metrics(results, plot)
        ctx.log(f"wrote {plot}")


commands = [query, evaluate]
