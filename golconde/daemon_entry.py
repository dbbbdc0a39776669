"""``python -m golconde.daemon_entry`` runs golconded (same as the ``golconded`` command)."""
import sys

from .cli import daemon_main

if __name__ == "__main__":
    sys.exit(daemon_main())
