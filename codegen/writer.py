"""A small code writer: lines, indented blocks and fresh names for generated Triton source.

Kernels are written top to bottom as structured code: ``block(head)`` opens an indented block
(``for ...:``, ``if ...:``) and closes it when the ``with`` ends, so where a loop is split in two or
a chunk is skipped is a decision made while writing, never an edit of text already written.
"""
from __future__ import annotations

import textwrap
from contextlib import contextmanager

INDENT = "    "


class Writer:
    """Accumulates source lines at the current indentation depth.

    ``line`` writes one statement; ``code`` writes a snippet given at its own relative
    indentation (dedented first); ``emitted`` takes text an :class:`ExprEmitter` produced for
    ``self.ind`` (already at this depth). ``fresh(prefix)`` returns a name not handed out before.
    """

    def __init__(self, depth: int = 0):
        self._lines: list[str] = []
        self.depth = depth
        self._counts: dict[str, int] = {}

    @property
    def ind(self) -> str:
        """The indentation of the current depth (for emitters that take an indent string)."""
        return INDENT * self.depth

    def line(self, text: str = "") -> None:
        self._lines.append(self.ind + text if text else "")

    def code(self, snippet: str) -> None:
        """A multi-line snippet, dedented, each line written at the current depth."""
        for ln in textwrap.dedent(snippet).strip("\n").split("\n"):
            self.line(ln.rstrip())

    def emitted(self, text: str) -> None:
        """Text already indented for ``self.ind`` (``ExprEmitter.take``), written as is."""
        if text:
            self._lines.extend(text.rstrip("\n").split("\n"))

    @contextmanager
    def block(self, head: str):
        """``head`` (ending in ``:``) and an indented body: the ``with`` statement's body."""
        self.line(head)
        self.depth += 1
        try:
            yield self
        finally:
            self.depth -= 1

    @contextmanager
    def indented(self, on: bool = True):
        """One level deeper while ``on`` (a body whose enclosing ``if`` the caller wrote)."""
        self.depth += int(on)
        try:
            yield self
        finally:
            self.depth -= int(on)

    def fresh(self, prefix: str) -> str:
        n = self._counts.get(prefix, 0)
        self._counts[prefix] = n + 1
        return f"{prefix}{n}"

    def text(self) -> str:
        return "\n".join(self._lines) + "\n"
