"""Errors that condiff reports to a user as one line (the CLI exits with code 2)."""


class CondiffError(ValueError):
    """Bad input: a wrong argument, a missing or corrupt file, an unknown class."""


class NonFiniteError(CondiffError):
    """A sample or a loss became NaN or infinite."""
