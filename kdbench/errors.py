"""Errors a user can cause. The CLI prints them as one line and exits with code 2."""


class UserError(Exception):
    """Bad input: a recipe key, a missing file, a checkpoint that does not fit. Message says the fix."""
