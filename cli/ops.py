"""Operator commands: ``flow log``, ``explain``, ``verify``, ``gc``, ``graph``."""

from __future__ import annotations

import json
import os
import sys
import time

import click

from cli._fmt import table
from cli.main import handle_errors, pass_ctx


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


@click.command("log")
@click.argument("target")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_ctx
@handle_errors
def log(ctx, target, as_json):
    """The history of TARGET's ref: every index it pointed at, newest first."""
    from app.maintenance import ref_log

    hist = ref_log(ctx.workspace, target)
    if as_json:
        click.echo(json.dumps(list(reversed(hist)), indent=2))
        return
    rows = []
    for e in reversed(hist):
        segs = e.get("value", {}).get("segments", [])
        first = segs[0]["index"] if segs else ["", ""]
        rows.append(
            [
                f"#{e['seq']}",
                _when(e["time"]),
                f"{e.get('user', '')}@{e.get('host', '')}",
                sum(s.get("count", 0) for s in segs),
                len(segs),
                f"{first[0]} {first[1][:12]}",
                e.get("message", ""),
            ]
        )
    click.echo(
        table(
            ["seq", "time", "by", "items", "segments", "first segment", "message"],
            rows,
            right={3, 4},
        )
    )
    for e in reversed(hist):
        for what, why in (("withdrawn", "by flow forget"), ("removed", "(files gone)")):
            if e.get(what):
                ids = e[what]
                more = f" and {len(ids) - 10} more" if len(ids) > 10 else ""
                names = ", ".join(ctx.workspace.shown(i) for i in ids[:10])  # keyed ids
                click.echo(f"#{e['seq']} {what} {why}: {names}{more}")


@click.command()
@click.argument("what")
@click.option("--depth", default=8, show_default=True, help="How far to follow inputs.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_ctx
@handle_errors
def explain(ctx, what, depth, as_json):
    """Lineage of a stored KEY, or of everything derived from a FILE.

    For a key (a recipe or content key, or a unique prefix of 6+ hex digits):
    the node, version, parameters, time and host that made it, and the same
    for each of its inputs.  For a source file: what every step made from it,
    and which indices hold it.
    """
    from app.maintenance import explain_file, explain_key, lineage_lines

    ws = ctx.workspace
    if os.path.exists(what):
        found = explain_file(ws, what, depth)
        if as_json:
            click.echo(json.dumps(found.to_json(), indent=2))
            return
        click.echo(f"{what}\nkey {found.key}")
        if found.forgotten:
            f = found.forgotten
            click.echo(
                f"withdrawn with flow forget (forgotten #{f['seq']}, {_when(f['time'])}: "
                f"{f['message']}): no index serves it; `flow gc --delete` purges its data"
            )
        click.echo(
            "\n".join(lineage_lines(found.derived))
            if found.derived
            else "  (nothing stored from this file)"
        )
        for h in found.indices:
            click.echo(
                f"in index {h['target']} (ref #{h['seq']}) as {h['id']!r}, labels "
                f"{h['labels'] or '-'}"
            )
        return
    try:
        recs = explain_key(ws, what, depth)
    except ValueError as e:
        click.echo(f"error: {e}; or give a path to a source file", err=True)
        sys.exit(2)
    if not recs:
        click.echo(f"error: no stored item or object has a key starting with {what}", err=True)
        sys.exit(1)
    if as_json:
        click.echo(json.dumps([r.to_json() for r in recs], indent=2))
        return
    click.echo("\n".join(lineage_lines(recs)))


@click.command()
@click.option("--no-repair", is_flag=True, help="Only report; don't quarantine.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_ctx
@handle_errors
def verify(ctx, no_repair, as_json):
    """Check every stored pack and object against its checksums.

    Arrays carry CRC32C checksums, blobs their BLAKE3 keys, and every item's
    content key is recomputed from what reads back.  Corrupt packs and objects
    are quarantined (their manifests move to quarantine/), so the next build
    recomputes them.  Exit status 1 if anything was corrupt.
    """
    from app.maintenance import verify_store

    checked = {"pack": 0, "object": 0}

    def progress(kind, node, ident, why):
        checked[kind] += 1

    problems = verify_store(ctx.workspace, repair=not no_repair, progress=progress)
    if as_json:
        click.echo(
            json.dumps({"checked": checked, "problems": [p.__dict__ for p in problems]}, indent=2)
        )
    else:
        click.echo(
            f"checked {checked['pack']} packs and {checked['object']} objects: "
            f"{len(problems)} corrupt"
        )
        for p in problems:
            action = "reported" if no_repair else "quarantined; the next build recomputes it"
            click.echo(
                f"  {p.kind} {p.node}/{p.id}"
                f"{f' ({p.items} items)' if p.items else ''}: {p.reason} -- {action}"
            )
    if problems:
        sys.exit(1)


@click.command()
@click.option("--delete", is_flag=True, help="Delete (default: a dry run that only reports).")
@click.option(
    "--keep",
    default=5,
    show_default=True,
    help="Ref history entries (besides the current one) whose objects are kept.",
)
@click.option(
    "--grace",
    default=3600.0,
    show_default=True,
    help="Seconds: anything younger is kept (a build may be writing it).",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_ctx
@handle_errors
def gc(ctx, delete, keep, grace, as_json):
    """Delete what no ref, recent ref history or current build uses.

    Live: objects named by each ref's current entry and its --keep previous
    ones, and everything the current project's plan uses (so the next build
    computes nothing).  Dead: other packs and objects, leftovers of killed
    writers, temporary files, the quarantine.  Dry run unless --delete.
    """
    from app.maintenance import collect_garbage

    res = collect_garbage(ctx.workspace, keep=keep, grace=grace, delete=delete)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "deleted": res.deleted,
                    "files": res.files,
                    "bytes": res.bytes,
                    "kept_packs": res.kept_packs,
                    "kept_objects": res.kept_objects,
                    "dead": {k: [p for p, _ in v] for k, v in res.dead.items()},
                },
                indent=2,
            )
        )
        return
    verb = "deleted" if res.deleted else "would delete"
    click.echo(
        f"{verb} {res.files} files, {_human(res.bytes)}; kept {res.kept_packs} packs "
        f"and {res.kept_objects} objects"
    )
    for reason, files in res.dead.items():
        click.echo(f"  {reason}: {len(files)} files, {_human(sum(s for _, s in files))}")
    if not res.deleted and res.files:
        click.echo("(dry run: rerun with --delete)")


@click.command()
@click.argument("output", type=click.Path(dir_okay=False))
@click.option("-t", "--target", "targets", multiple=True, help="Target(s); default all.")
@pass_ctx
@handle_errors
def graph(ctx, output, targets):
    """Draw the targets' graph to OUTPUT (.svg, .png, .pdf through Graphviz's dot;
    .dot as text): one cluster per target, steps coloured by state, a legend."""
    from app.draw import draw, target_groups
    from cli.build import _targets

    ws = ctx.workspace
    names = ws._names(_targets(targets))
    g = ws.subgraph(names)
    summary = ws.plan(names, reasons=False).summary()
    draw(g, output, summary, title=f"{ws.project.file}", groups=target_groups(g, ws.targets, names))
    click.echo(f"wrote {output}")


commands = [log, explain, verify, gc, graph]
