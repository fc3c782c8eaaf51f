"""The preflight: what the sources and labels hold, and the data mistakes that would
spoil a build, said before it runs (``flow status``, and the start of every build).

* per source: files found, files under the folder not taken and why (hidden, not
  an image by name or content, a DICOMDIR index, excluded);
* per labels CSV: its rows, the rows that matched no file, the files without a row;
* items per split, and items withdrawn with ``flow forget``;
* per fit: how many items it learns from (its splits), and none is a problem.

A **problem** stops a target from being built right (no items; a fit with nothing
to learn from; a labels CSV none of whose rows matches a file); a **warning** is
worth a look (files without labels, rows matching no file, files skipped).  Nothing
here reads an image: it works on the scan the build makes anyway.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Preflight", "preflight"]

_EXAMPLES = 3


@dataclass
class Preflight:
    lines: list[str] = field(default_factory=list)  # what was found, one fact a line
    warnings: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    items: int = 0
    splits: dict[str, int] = field(default_factory=dict)
    fits: dict[str, int] = field(default_factory=dict)  # fit step -> training items

    def to_json(self) -> dict:
        return {
            "items": self.items,
            "splits": self.splits,
            "fits": self.fits,
            "lines": self.lines,
            "warnings": self.warnings,
            "problems": self.problems,
        }

    def report(self, *, brief: bool = False) -> list[str]:
        """Lines to show a person; ``brief``: the facts of the sources only, then
        warnings and problems (the start of a build)."""
        facts = [ln for ln in self.lines if not brief or ln.startswith("source ")]
        return (
            facts
            + [f"warning: {w}" for w in self.warnings]
            + [f"problem: {p}" for p in self.problems]
        )


def _some(names: list[str]) -> str:
    shown = ", ".join(names[:_EXAMPLES])
    return shown + (f", ... ({len(names) - _EXAMPLES} more)" if len(names) > _EXAMPLES else "")


def preflight(ws: Any, targets: list[str] | str = "all") -> Preflight:
    """The preflight of a workspace's project (see the module doc)."""
    items, _, meta = ws.items()
    out = Preflight(items=len(items))
    for rep in meta.get("sources", ()):
        skipped = sum(len(v) for v in rep.skipped.values())
        line = f"source {rep.name} ({rep.path}): {rep.files} image file(s)"
        if skipped:
            why = "; ".join(
                f"{len(v)} {reason} ({_some(v)})" for reason, v in sorted(rep.skipped.items())
            )
            line += f"; {skipped} other file(s) skipped: {why}"
        out.lines.append(line)
        if not rep.files:
            out.problems.append(
                f"source {rep.name}: no image file (DICOM, PNG, JPEG) under {rep.path}"
                + (f" ({skipped} other file(s) there)" if skipped else "")
            )
        if rep.labels is None:
            continue
        matched = rep.rows - len(rep.unmatched)
        out.lines.append(
            f"labels {rep.labels}: {rep.rows} row(s), {matched} matching a file; "
            f"{rep.files - len(rep.unlabeled)} of {rep.files} file(s) labeled"
        )
        if rep.rows and not matched and rep.files:
            out.problems.append(
                f"labels {rep.labels}: none of its {rep.rows} rows matches a file of source "
                f"{rep.name} (rows name e.g. {_some(rep.unmatched)}; files are e.g. "
                f"{_some(_files(ws, rep))}): check file_column and the paths"
            )
        elif rep.unmatched:
            out.warnings.append(
                f"labels {rep.labels}: {len(rep.unmatched)} row(s) match no file: "
                f"{_some(rep.unmatched)}"
            )
        if rep.unlabeled and (matched or not rep.rows):
            out.warnings.append(
                f"source {rep.name}: {len(rep.unlabeled)} file(s) have no label row (indexed "
                f"with no labels, in the source's default split): {_some(rep.unlabeled)}"
            )
    out.splits = dict(sorted(Counter(items.splits).items()))
    if len(items):
        out.lines.append(
            "items by split: "
            + ", ".join(f"{s or '(none)'} {n}" for s, n in out.splits.items())
            + (f"; {meta['forgotten']} withdrawn by flow forget" if meta.get("forgotten") else "")
        )
    elif meta.get("forgotten"):
        out.lines.append(f"every item ({meta['forgotten']}) was withdrawn by flow forget")
    elif not out.problems:
        out.problems.append("the sources hold no image file")
    names = ws._names(targets)  # an unknown target: the error naming the valid ones
    pins = ws.pinned()
    seen: set[str] = set()
    for t in names:
        for fit in ws.targets[t].get("fits", []):
            if fit in seen or fit not in ws.graph:
                continue
            seen.add(fit)
            if fit in pins:
                out.lines.append(f"fit {fit} ({t}): pinned (built before; --retrain refits)")
                continue
            splits = {s for inp in ws.graph[fit].inputs if inp.splits for s in inp.splits}
            n = int(items.in_splits(splits).sum()) if splits else len(items)
            out.fits[fit] = n
            where = f"split(s) {', '.join(sorted(splits))}" if splits else "every item"
            out.lines.append(f"fit {fit} ({t}): {n} training item(s) ({where})")
            if not n and len(items):
                out.problems.append(
                    f"fit {fit} ({t}) has no training items: no item is in the {where} "
                    "(an item's split comes from its labels CSV's split column or the "
                    "source's default_split; [train] splits names those fits learn from)"
                )
    return out


def _files(ws: Any, rep: Any) -> list[str]:
    meta = ws.items()[2]
    prefix = rep.path.rstrip("/") + "/"
    return [p[len(prefix) :] for p in meta["paths"][: _EXAMPLES * 50] if p.startswith(prefix)]
