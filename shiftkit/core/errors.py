"""Exception types used across shiftkit.

Every message reads "``arg`` <problem>: expected <spec>, got <value>" so that a user can
find the offending argument or file without a debugger.
"""

from __future__ import annotations

import difflib
from typing import Iterable


class ShiftkitError(Exception):
    """Base class of every error raised on purpose by shiftkit."""


class InvalidImageError(ShiftkitError, ValueError):
    """An image argument has the wrong shape, channel count, range or values."""


class InvalidArgumentError(ShiftkitError, ValueError):
    """A non-image argument has a wrong value."""


class StainEstimationError(ShiftkitError, RuntimeError):
    """Stain estimation failed for at least one tile and the policy is ``on_failure="raise"``."""


class UnknownNameError(ShiftkitError, KeyError):
    """A name (method, shift, preset) is not registered; the message lists near matches."""

    def __init__(self, arg: str, name: str, choices: Iterable[str]):
        choices = sorted(choices)
        close = difflib.get_close_matches(str(name), choices, n=3)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        msg = f"`{arg}` unknown name: expected one of {choices}, got {name!r}{hint}"
        super().__init__(msg)
        self.message = msg

    def __str__(self) -> str:  # KeyError would quote the whole message otherwise
        return self.message


def expect(condition: bool, arg: str, problem: str, spec: str, got: object, *, exc=InvalidArgumentError):
    """Raise ``exc`` with the house message format unless ``condition`` holds."""
    if not condition:
        raise exc(f"`{arg}` {problem}: expected {spec}, got {got!r}")
