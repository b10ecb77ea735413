"""The one exception type that the CLIs turn into a single stderr line and exit code 2."""


class UsageError(Exception):
    """Bad user input: the message names the problem and the fix, in one line."""
