"""``python -m safe_lora``: the same as the ``safe-lora`` command."""

from __future__ import annotations

import sys

from safe_lora.cli import main

if __name__ == "__main__":
    sys.exit(main())
