"""Errors that point at the user's pattern file and line."""
from __future__ import annotations

import os
import sys

_PKG_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _skip(filename: str) -> bool:
    f = os.path.abspath(filename)
    if f.startswith(_PKG_DIR + os.sep):
        return True
    parts = f.split(os.sep)
    return "torch" in parts or "<frozen" in filename or "hypothesis" in parts


def user_site() -> str:
    """``file:line`` of the innermost frame that belongs to the user, not attndsl or torch."""
    frame = sys._getframe(1)
    while frame is not None:
        if not _skip(frame.f_code.co_filename):
            return f"{frame.f_code.co_filename}:{frame.f_lineno}"
        frame = frame.f_back
    return "<unknown>"


class PatternError(Exception):
    """A pattern uses a construct the DSL cannot compile (the message names file:line)."""

    def __init__(self, what: str, hint: str = "", site: str | None = None):
        self.site = site or user_site()
        msg = f"{self.site}: {what}"
        if hint:
            msg += f" ({hint})"
        super().__init__(msg)
