"""Progress bars for long work (`-p`, as qemu-img): drawn on stderr only when it is a terminal.

tqdm is imported only when a bar is really drawn: every other run of the
command pays nothing for it.
"""
from __future__ import annotations

import sys


class Progress:
    """Units done out of a total (bytes by default); `update`, `set_total`, `close`."""

    def __init__(self, enabled: bool = False, desc: str = "", total: int | None = None, unit: str = "B") -> None:
        self._bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit=unit, unit_scale=unit == "B", unit_divisor=1024 if unit == "B" else 1000,
                             desc=desc, file=sys.stderr, dynamic_ncols=True, leave=True, mininterval=0.1)

    @property
    def active(self) -> bool:
        return self._bar is not None

    def set_total(self, total: int) -> None:
        if self._bar is not None:
            self._bar.total = total
            self._bar.refresh()

    def update(self, n: int) -> None:
        if self._bar is not None and n:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            bar, self._bar = self._bar, None
            bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: The bar that draws nothing: the default of every operation that takes one.
QUIET = Progress()
