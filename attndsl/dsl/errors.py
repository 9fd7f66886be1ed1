"""Errors that point at the user's pattern file and line."""
from __future__ import annotations

import functools
import os
import sys

_PKG_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@functools.lru_cache(maxsize=4096)
def is_internal(filename: str) -> bool:
    """True for frames of attndsl itself, torch, hypothesis and the interpreter's own modules: a
    pattern's line is the innermost frame that is none of these."""
    f = os.path.abspath(filename)
    if f.startswith(_PKG_DIR + os.sep):
        return True
    parts = f.split(os.sep)
    return "torch" in parts or "<frozen" in filename or "hypothesis" in parts or filename.startswith("<frozen")




def user_site(frame=None, default: str = "<unknown>") -> str:
    """``file:line`` of the innermost frame (from ``frame``, default the caller's) that belongs to
    the user, not attndsl or torch; ``default`` when there is none."""
    frame = frame or sys._getframe(1)
    while frame is not None:
        if not is_internal(frame.f_code.co_filename):
            return f"{frame.f_code.co_filename}:{frame.f_lineno}"
        frame = frame.f_back
    return default


def traceback_site(tb) -> str | None:
    """``file:line`` of the innermost user frame of a traceback (where a pattern raised), or None."""
    site = None
    while tb is not None:
        code = tb.tb_frame.f_code
        if not is_internal(code.co_filename):
            site = f"{code.co_filename}:{tb.tb_lineno}"
        tb = tb.tb_next
    return site


def definition_site(fn) -> str:
    """``file:line`` where ``fn`` is defined (for errors with no better line), or its name."""
    code = getattr(fn, "__code__", None) or getattr(getattr(fn, "__call__", None), "__code__", None)
    if code is None:
        return getattr(fn, "__name__", repr(fn))
    return f"{code.co_filename}:{code.co_firstlineno}"


class PatternError(Exception):
    """A pattern uses a construct the DSL cannot compile (the message names file:line)."""

    def __init__(self, what: str, hint: str = "", site: str | None = None):
        self.what, self.hint, self.located = what, hint, site is not None
        self.site = site or user_site()
        msg = f"{self.site}: {what}"
        if hint:
            msg += f" ({hint})"
        super().__init__(msg)
