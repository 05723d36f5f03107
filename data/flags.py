"""Command-line flags the way train_gpt2.py takes them, and the way every tool ends.

--name value or --name=value, in full (no abbreviations), and errors in one line.
"""

import argparse
import sys


class FlagParser(argparse.ArgumentParser):
    """An error is one line naming the flag, never the usage text: by default `prog: message` and exit
    status 2, as argparse's own; with `error_type` that exception, for a caller that reports errors itself."""

    def __init__(self, error_type=None, **kwargs):
        super().__init__(allow_abbrev=False, **kwargs)  # --temp would silently mean --temperature
        self.error_type = error_type

    def error(self, message):
        if self.error_type is not None:
            raise self.error_type(f"{message} (see --help)")
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def at_least(low, high=None):
    """argparse type: an int from `low` to `high` (inclusive), named in the error otherwise."""

    def convert(text):
        value = int(text)
        if value < low or (high is not None and value > high):
            bound = f"at least {low}" if high is None else f"from {low} to {high}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value

    convert.__name__ = "int"  # argparse says "invalid int value: 'x'" for text that is not a number
    return convert


def run_tool(main, prog):
    """A tool's entry point: Ctrl-C ends it with one line and exit status 130, never a traceback."""
    try:
        return main()
    except KeyboardInterrupt:
        print(f"{prog}: stopped (Ctrl-C)", file=sys.stderr)
        sys.exit(130)
