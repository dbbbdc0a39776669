"""pyflakes over the package and the benchmark: a name used but never defined or imported (a
NameError waiting in an error path, where tests seldom go) fails here. The supervising loop
of every listener once named BrokerError without importing it: the first exception it caught
ended the thread."""
from __future__ import annotations

import io
import os

from pyflakes.api import checkRecursive
from pyflakes.reporter import Reporter

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_pyflakes_finds_nothing_in_the_package_and_the_benchmark():
    out, err = io.StringIO(), io.StringIO()
    count = checkRecursive([os.path.join(ROOT, "golconde"), os.path.join(ROOT, "bench")],
                           Reporter(out, err))
    assert count == 0 and not err.getvalue(), out.getvalue() + err.getvalue()
