"""Print the README's "common errors and their fixes" section (markdown), generated from the preflight's
messages (src/training/preflight.py: MESSAGES), so the README says what train.py says.

    python -m scripts.common_errors > common_errors.md
"""
from __future__ import annotations

import sys

from src.training.preflight import common_errors_markdown


def main() -> int:
    sys.stdout.write(common_errors_markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
