"""Imported first by the commands of ``bin/``: run them from a source checkout.

When the checkout has the virtual environment ``scripts/setup-python.sh`` makes (``.venv/``, with
psycopg2, stomp.py and the other dependencies) and this interpreter is not that one, the command
runs again under ``.venv/bin/python`` (``os.execv``), so that ``bin/golconded`` works without
activating it; otherwise the checkout is put first on ``sys.path``.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_PYTHON = os.path.join(ROOT, ".venv", "bin", "python")

if (os.path.exists(VENV_PYTHON) and os.path.realpath(sys.prefix) != os.path.realpath(os.path.join(ROOT, ".venv"))
        and not os.environ.get("GOLCONDE_CHECKOUT_EXEC")):     # once: never a loop
    os.environ["GOLCONDE_CHECKOUT_EXEC"] = "1"
    os.execv(VENV_PYTHON, [VENV_PYTHON] + sys.argv)
sys.path.insert(0, ROOT)
