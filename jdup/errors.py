"""One exception type for bad input (:class:`JdupError`), and the one-line wording of the failures the command line
reports itself (file-system errors, interrupts). The CLI prints each as one line: exit code 2, or 130 for Ctrl-C.
"""

from __future__ import annotations

import errno
import os


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
