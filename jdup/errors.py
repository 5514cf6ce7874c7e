"""One exception type for bad input (:class:`JdupError`), and the one-line wording of the failures the command line
reports itself (file-system errors, interrupts). The CLI prints each as one line: exit code 2, or 130 for Ctrl-C.
"""

from __future__ import annotations

import dataclasses
import errno
import os
from collections.abc import Iterable
from typing import Any


class JdupError(Exception):
    """Bad input or an unusable asset: a missing file, a malformed CSV, a corrupt checkpoint, ...

    Always name the file (``path``) and the problem, so the message alone tells the user what to fix.
    """

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        self.path = None if path is None else os.fspath(path)
        self.problem = message
        super().__init__(f"{self.path}: {message}" if self.path else message)


class Interrupted(Exception):
    """Ctrl-C (SIGINT) while a command ran, re-raised with what was interrupted and how to go on.

    Deliberately not a ``KeyboardInterrupt``: the command-line framework would turn that into a silent exit code.
    """

    def __init__(self, message: str):
        self.message = message
        super().__init__(message)


#: Hints for file-system errors, by errno: what to do about them.
_OS_HINTS = {
    errno.ENOSPC: "no space left on the device: free some space or choose another output folder",
    errno.EDQUOT: "disk quota exceeded: free some space or choose another output folder",
    errno.EROFS: "read-only file system: choose a writable output folder",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EEXIST: "already exists",
    errno.ENOTDIR: "a path component is a file, not a folder",
    errno.EISDIR: "is a folder, not a file",
    errno.ENOENT: "no such file or folder",
    errno.ENAMETOOLONG: "file name too long",
}


def os_error_message(e: OSError) -> str:
    """``<path>: <problem>`` for an ``OSError`` (the path it names, a plain-words problem)."""
    problem = _OS_HINTS.get(e.errno or -1) or (e.strerror or type(e).__name__).lower()
    paths = [p for p in (e.filename, e.filename2) if p is not None]
    where = " -> ".join(os.fsdecode(p) if isinstance(p, bytes) else str(p) for p in paths)
    return f"{where}: {problem}" if where else problem


# ---------------------------------------------------------------------------------------------------------------
# Value constraints of config classes: a ``validate(self)`` method made of ``check_*`` one-liners, e.g.
# ``check_range(self, "frr", 0, 1, lo_open=True, hi_open=True)``. ``jdup.config.build`` calls it and names the key
# and where its value came from: ``configs/x.yaml: detect.frr: must lie in (0, 1), got 2.0``.


class Invalid(ValueError):
    """Raised by a config class's ``validate()``: which field (``key``) is wrong and why (``problem``)."""

    def __init__(self, key: str, problem: str, value: Any = dataclasses.MISSING):
        self.key = key
        self.problem = problem
        self.value = value
        got = "" if value is dataclasses.MISSING else f", got {value!r}"
        super().__init__(f"{key}: {problem}{got}")


def check(cfg: Any, key: str, ok: bool, problem: str) -> None:
    """Raises :class:`Invalid` for ``key`` (with its current value) unless ``ok``."""
    if not ok:
        raise Invalid(key, problem, getattr(cfg, key, dataclasses.MISSING))


def check_range(
    cfg: Any,
    key: str,
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
    allow_none: bool = False,
) -> None:
    """``cfg.key`` must be a number in the interval (``lo``/``hi`` None = unbounded; NaN always fails)."""
    v = getattr(cfg, key)
    if v is None:
        check(cfg, key, allow_none, "must be set")
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        check(cfg, key, False, "must be a number")
    ok = v == v  # NaN
    if lo is not None:
        ok = ok and (v > lo if lo_open else v >= lo)
    if hi is not None:
        ok = ok and (v < hi if hi_open else v <= hi)
    if lo is not None and hi is not None:
        problem = f"must lie in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    elif lo is not None:
        problem = f"must be {'>' if lo_open else '>='} {lo}"
    else:
        problem = f"must be {'<' if hi_open else '<='} {hi}"
    check(cfg, key, ok, problem)


def check_one_of(cfg: Any, key: str, options: Iterable[Any]) -> None:
    """``cfg.key`` must be one of ``options``."""
    options = list(options)
    check(cfg, key, getattr(cfg, key) in options, f"must be one of {options}")


def check_set(cfg: Any, key: str, what: str = "") -> None:
    """``cfg.key`` must not be empty (``what`` says what to set, e.g. "the data folder")."""
    check(cfg, key, bool(getattr(cfg, key)), f"must be set{' to ' + what if what else ''}")
