"""Errors a user can cause. The CLI prints them as one line and exits with code 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """Bad input: a recipe key, a missing file, a checkpoint that does not fit. Message says the fix."""


def did_you_mean(word: str, choices: Iterable[str], n: int = 1) -> str:
    """"did you mean 'x'? " for the closest of ``choices`` to a mistyped ``word`` ("" if none is close)."""
    close = difflib.get_close_matches(str(word), list(choices), n=n)
    return f"did you mean {', '.join(map(repr, close))}? " if close else ""


class Stopped(Exception):
    """Raised by a run's ``on_eval`` hook to stop it early (a pruned trial). The run ends KILLED in
    MLflow, with ``tags`` set on it, not FAILED."""

    def __init__(self, reason: str, tags: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.tags = dict(tags or {})


class NonFiniteLoss(UserError):
    """A loss term became NaN or infinite: the recipe's settings diverge (a UserError: one line, exit
    2). The run ends FAILED with this message."""
