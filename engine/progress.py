"""Progress of a build: one bar per step (tqdm, on stderr)."""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["Progress"]


class Progress:
    """One progress bar per step (tqdm, on stderr; quiet when not a terminal)."""

    def __init__(self, enabled: bool | None):
        self.enabled = enabled
        self.bars: dict[str, Any] = {}

    def start(self, name: str, total: int, unit: str = "item") -> None:
        if self.enabled is False:
            return
        from tqdm.auto import tqdm

        self.bars[name] = tqdm(
            total=total,
            desc=f"{name:>14}",
            unit=unit,
            leave=True,
            disable=None if self.enabled is None else not self.enabled,
            file=sys.stderr,
            dynamic_ncols=True,
        )

    def update(self, name: str, n: int) -> None:
        bar = self.bars.get(name)
        if bar is not None:
            bar.update(n)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()
