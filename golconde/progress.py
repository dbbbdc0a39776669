"""Progress bars for long admin operations, shown only when standard output is a terminal (tqdm).

:func:`progress` wraps an iterable; :func:`echo` prints a line above any bar. Without a terminal
(scripts, cron, CI) the bar is disabled and the output is the plain lines alone.
"""
from __future__ import annotations

import sys
from typing import Iterable, Optional, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def interactive() -> bool:
    """True when standard output is a terminal."""
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):   # replaced or closed stream
        return False


def progress(items: Iterable[T], desc: str, total: Optional[int] = None,
             unit: str = "item") -> Iterable[T]:
    """``items``, with a progress bar on standard error while standard output is a terminal.
    The bar is removed when done (the lines printed with :func:`echo` stay)."""
    return tqdm(items, desc=desc, total=total, unit=unit, file=sys.stderr, leave=False,
                disable=not interactive(), dynamic_ncols=True)


def echo(line: str) -> None:
    """Print ``line`` to standard output without breaking a progress bar."""
    tqdm.write(line, file=sys.stdout)
