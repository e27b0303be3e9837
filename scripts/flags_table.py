"""Print the README's `## Flags` table, generated from WorkerConfig's fields and their docstrings."""

from __future__ import annotations

import sys
from pathlib import Path

# Let the script run from a plain checkout, without installing the package first.
_REPO_ROOT = Path(__file__).resolve().parent.parent
if str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))

from llava_worker.flags import flags_table  # noqa: E402

if __name__ == "__main__":
    print(flags_table())
