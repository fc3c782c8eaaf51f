"""Plain-text tables and number formats for the command line."""

from __future__ import annotations

from collections.abc import Sequence


def table(
    headers: Sequence[str], rows: Sequence[Sequence[object]], right: set[int] | None = None
) -> str:
    """A left/right aligned text table (numbers right-aligned by default)."""
    cells = [[str(h) for h in headers]] + [[_cell(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    if right is None:
        right = {
            i
            for i in range(len(headers))
            if rows and all(isinstance(r[i], int | float) for r in rows)
        }
    lines = []
    for n, r in enumerate(cells):
        line = "  ".join(
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))
        )
        lines.append(line.rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(c: object) -> str:
    if isinstance(c, float):
        return f"{c:.3f}" if abs(c) < 100 else f"{c:.1f}"
    return "" if c is None else str(c)


def seconds(s: float) -> str:
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 120:
        return f"{s:.1f} s"
    return f"{s / 60:.1f} min"


def dumps(obj) -> str:
    """JSON for ``--json`` output (anything unknown printed as text)."""
    import json

    return json.dumps(obj, indent=2, sort_keys=False, default=str)
