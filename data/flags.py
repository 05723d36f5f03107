"""Command-line flags the way train_gpt2.py takes them.

--name value or --name=value, in full (no abbreviations), and errors in one line.
"""

import argparse


class FlagParser(argparse.ArgumentParser):
    def __init__(self, **kwargs):
        super().__init__(allow_abbrev=False, **kwargs)  # --temp would silently mean --temperature

    def error(self, message):  # one line naming the flag, instead of the usage text
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
