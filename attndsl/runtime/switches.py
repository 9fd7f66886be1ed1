"""Process-wide on/off switches that an environment variable sets: the Hopper forward
(``ATTNDSL_HOPPER``), the Hopper backward (``ATTNDSL_HOPPER_BWD``) and the atomic dQ mode
(``ATTNDSL_ATOMIC_DQ``). The variable is read on first use and kept, so calls do not read the
environment; :meth:`Switch.set` forces the switch, or with None reads the variable again."""
from __future__ import annotations

import os


class Switch:
    """``get()``: what :meth:`set` forced, else the variable ``name`` ("1" True, anything else False,
    unset None) as first read."""

    def __init__(self, name: str):
        self.name = name
        self.forced: bool | None = None
        self._env: list = []  # the variable's verdict once read

    def get(self) -> bool | None:
        if self.forced is not None:
            return self.forced
        if not self._env:
            self._env.append(self._read())
        return self._env[0]

    def set(self, on: bool | None) -> None:
        """Force on (True) or off (False), or (None) follow the variable as the environment says now."""
        self.forced = None if on is None else bool(on)
        if on is None:
            self._env[:] = [self._read()]

    def forget(self) -> None:
        """Nothing forced and the variable read again on next use (tests)."""
        self.forced = None
        self._env.clear()

    def _read(self) -> bool | None:
        got = os.environ.get(self.name)
        return None if got is None else got == "1"
