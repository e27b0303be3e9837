"""Build the tiny random-weight test checkpoints (llava-hf, original LLaVA and InternVL-Chat-1.0 layouts)
into a directory and print their paths."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Let the script run from a plain checkout, without installing the package first.
_REPO_ROOT = Path(__file__).resolve().parent.parent
if str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))

from llava_worker.testing.tiny import build_all  # noqa: E402
from llava_worker.testing.tiny_families import build_family_checkpoints  # noqa: E402
from llava_worker.testing.tiny_internvl_chat import build_internvl_chat_checkpoints  # noqa: E402
from llava_worker.testing.tiny_original import build_original_checkpoints  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out_dir", type=Path, help="directory that receives one folder per checkpoint")
    parser.add_argument("--force", action="store_true", help="rebuild checkpoints that already exist")
    args = parser.parse_args(argv)
    built = (
        build_all(args.out_dir, force=args.force)
        | build_original_checkpoints(args.out_dir, force=args.force)
        | build_internvl_chat_checkpoints(args.out_dir, force=args.force)
        | build_family_checkpoints(args.out_dir, force=args.force)
    )
    for name, path in built.items():
        print(f"{name}\t{path.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
