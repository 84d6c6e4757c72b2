"""Progress bars for long work (`-p`, as qemu-img): drawn on stderr only when it is a terminal.

tqdm is imported only when a bar is really drawn: every other run of the
command pays nothing for it.
"""
from __future__ import annotations

import os
import sys

PERCENT_STEPS = 1000


class Progress:
    """Units done out of a total (bytes by default, `%` for a fraction done); `update`, `to`, `set_total`, `close`.

    The bar is drawn from the first call that knows the total, so it never shows a total-less first frame.
    """

    def __init__(self, enabled: bool = False, desc: str = "", total: int | None = None, unit: str = "B") -> None:
        self.active = enabled and sys.stderr.isatty()
        self._bar = None
        self._desc, self._unit = desc, unit
        self._total = PERCENT_STEPS if unit == "%" else total

    def _draw(self):
        if self._bar is None and self.active:
            from tqdm import tqdm

            try:
                columns, rows = os.get_terminal_size(sys.stderr.fileno())
            except OSError:
                columns = rows = 0
            fraction = self._unit == "%"  # work measured as a fraction done (`to`): no counts to show
            # A terminal of unknown size (a fresh pseudo-terminal) would make tqdm draw nothing: 80x24 then.
            self._bar = tqdm(total=self._total, unit=self._unit, unit_scale=self._unit == "B",
                             unit_divisor=1024 if self._unit == "B" else 1000, desc=self._desc, file=sys.stderr,
                             ncols=columns or 80, nrows=rows or 24, leave=True, mininterval=0.1,
                             bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining}" if fraction else None)
        return self._bar

    def set_total(self, total: int) -> None:
        if self.active and self._unit != "%":
            self._total = total
            if self._bar is not None:
                self._bar.total = total
                self._bar.refresh()

    def to(self, fraction: float) -> None:
        """Move a `%` bar to `fraction` (0 to 1) of the work: the callback operations such as check take."""
        bar = self._draw()
        if bar is not None:
            bar.update(max(0, min(PERCENT_STEPS, round(fraction * PERCENT_STEPS)) - bar.n))

    def update(self, n: int) -> None:
        bar = self._draw()
        if bar is not None and n:
            bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            bar, self._bar = self._bar, None
            bar.close()
        self.active = False

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: The bar that draws nothing: the default of every operation that takes one.
QUIET = Progress()
