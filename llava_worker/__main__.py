"""`python -m llava_worker`: the command-line entry point."""

from llava_worker.cli import main

if __name__ == "__main__":
    main()
