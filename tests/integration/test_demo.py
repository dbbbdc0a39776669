"""The README's demo, shortened: pgbench via triggers and the slides' packets via the client flow,
ending with `golconde compare` reporting every table equal on both targets."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.demo
def test_demo_ends_with_every_table_equal():
    if not os.path.exists(os.path.join(os.path.dirname(sys.executable), "golconde")):
        pytest.fail("the golconde command is not installed beside %s (run scripts/setup.sh)" % sys.executable)
    result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "demo.py"), "--seconds", "5",
                             "--clients", "2", "--timeout", "300", "--http-port", "18080"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "all targets equal" in result.stdout
    for table in ("pgbench_branches", "pgbench_tellers", "pgbench_accounts", "pgbench_history", "friendships"):
        for target in ("target1", "target2"):
            assert "-> %s public.%s: equal" % (target, table) in result.stdout
