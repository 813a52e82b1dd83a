"""The entry point moved out of the core (bot/ never imports adapters/): say where to."""

import sys

print("error: start the bot with `python -m launcher [run|console|check]` (or `make run`)", file=sys.stderr)
sys.exit(2)
