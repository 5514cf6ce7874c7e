"""Atomic outputs: every file and every stage folder jdup writes appears complete or not at all.

Files: :func:`write` (and :func:`write_text`, :func:`write_json`, :func:`write_bytes`, :func:`write_npy`,
:func:`write_npz`, :func:`save_figure`) writes ``<path>.tmp-<pid>`` next to the destination and renames it over
``path`` once complete, so readers never see half a file.

Folders: :class:`StagedDir` is a stage's output folder under construction. The stage writes into the sibling
``<out>.partial/`` (a deterministic name: a killed training or unlearning run keeps its checkpoint there and the
next run resumes from it); :meth:`StagedDir.commit` swaps it over ``<out>`` in one rename (``renameat2`` exchange
where the kernel has it, else two renames), so a failed or killed run leaves the previous complete output or none,
and no file of an earlier run survives inside a new output. :func:`replace_dir` does the swap for any folder
written under :func:`temp_dir`.

Leftovers of dead runs (``<out>.tmp-<pid>``, ``<out>.old-<pid>``, a ``.partial`` folder nobody owns, and
``*.tmp-<pid>`` files) are removed by :func:`clean_leftovers` / :func:`clean_temp_files` with one warning each.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import logging
import os
import re
import shutil
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from typing import IO, Any

from jdup.errors import JdupError

log = logging.getLogger("jdup")

PARTIAL = ".partial"
OWNER = ".jdup-owner"
_TMP = re.compile(r"\.(tmp|old)-(\d+)(\..*)?$")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()


def fix_mode(path: str | os.PathLike) -> None:
    """Gives a file written by a library that creates private files (mode 0600, e.g. safetensors) the usual
    mode of new files (0666 minus the umask, so 0644 by default)."""
    os.chmod(path, 0o666 & ~_UMASK)


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[None]:
    """Holds back Ctrl-C (SIGINT) until the block is done, then raises it: a checkpoint being saved is finished
    before the interrupt lands (no half-written step, no library thread dying at exit). Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    try:
        old = signal.signal(signal.SIGINT, lambda signum, frame: got.append(signum))
    except ValueError:  # not the main interpreter
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
        if got:
            if old is signal.default_int_handler:
                raise KeyboardInterrupt
            if callable(old):
                old(signal.SIGINT, None)


# ---------------------------------------------------------------------------------------------------------------
# files


def tmp_name(path: str | os.PathLike) -> str:
    """The temporary name of ``path`` while this process writes it: ``<path>.tmp-<pid>``."""
    return f"{os.fspath(path)}.tmp-{os.getpid()}"


def write(path: str | os.PathLike, writer: Callable[[IO[Any]], Any], *, binary: bool = False) -> None:
    """Calls ``writer(file)`` on ``<path>.tmp-<pid>`` and renames it to ``path`` once it has returned."""
    path = os.fspath(path)
    tmp = tmp_name(path)
    try:
        if binary:
            with open(tmp, "wb") as f:
                writer(f)
        else:
            with open(tmp, "w", encoding="utf-8") as f:
                writer(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    write(path, lambda f: f.write(text))


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    write(path, lambda f: f.write(data), binary=True)


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2, default: Callable | None = str) -> None:
    """``json.dump`` (one trailing newline) atomically."""
    write(path, lambda f: f.write(json.dumps(obj, indent=indent, default=default) + "\n"))


def write_npy(path: str | os.PathLike, array: Any) -> None:
    """``numpy.save`` atomically (no ``.npy`` appended to ``path``)."""
    import numpy as np

    write(path, lambda f: np.save(f, array), binary=True)


def write_npz(path: str | os.PathLike, **arrays: Any) -> None:
    """``numpy.savez`` atomically."""
    import numpy as np

    write(path, lambda f: np.savez(f, **arrays), binary=True)


def save_figure(fig: Any, path: str | os.PathLike, **savefig_kwargs: Any) -> None:
    """``fig.savefig`` atomically; the format comes from ``path``'s extension (default png)."""
    ext = os.path.splitext(os.fspath(path))[1].lstrip(".") or "png"
    savefig_kwargs.setdefault("format", ext)
    write(path, lambda f: fig.savefig(f, **savefig_kwargs), binary=True)


# ---------------------------------------------------------------------------------------------------------------
# folders


def temp_dir(dest: str | os.PathLike) -> str:
    """A fresh empty ``<dest>.tmp-<pid>`` folder next to ``dest`` (for :func:`replace_dir`)."""
    tmp = tmp_name(os.path.abspath(os.fspath(dest)))
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def _exchange(a: str, b: str) -> bool:
    """Atomically swaps two existing paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return False
    try:
        libc = ctypes.CDLL(libc_name, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: this file system / kernel cannot exchange
        return False
    raise OSError(err, os.strerror(err), a, None, b)


def replace_dir(src: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Moves the finished folder ``src`` to ``dest``, replacing a previous ``dest`` folder in one step."""
    src, dest = os.path.abspath(os.fspath(src)), os.path.abspath(os.fspath(dest))
    if os.path.lexists(dest) and not os.path.isdir(dest):
        raise JdupError("exists and is not a folder", dest)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    if not os.path.exists(dest):
        os.replace(src, dest)
        return
    if _exchange(src, dest):
        shutil.rmtree(src, ignore_errors=True)  # now holds the previous output
        return
    old = f"{dest}.old-{os.getpid()}"
    shutil.rmtree(old, ignore_errors=True)
    os.replace(dest, old)
    try:
        os.replace(src, dest)
    except BaseException:
        os.replace(old, dest)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def clean_leftovers(dest: str | os.PathLike) -> list[str]:
    """Removes ``<dest>.tmp-<pid>`` / ``<dest>.old-<pid>`` siblings left by dead processes (restoring an
    ``.old`` folder when ``dest`` itself is missing: a swap that was killed half-way). Returns what it did."""
    dest = os.path.abspath(os.fspath(dest))
    parent, name = os.path.split(dest)
    done = []
    try:
        entries = os.listdir(parent)
    except OSError:
        return done
    for entry in sorted(entries):
        if not entry.startswith(name + "."):
            continue
        m = _TMP.fullmatch(entry[len(name):])
        if not m or _alive(int(m.group(2))):
            continue
        path = os.path.join(parent, entry)
        if m.group(1) == "old" and not os.path.exists(dest):
            os.replace(path, dest)
            done.append(f"restored {dest} from {path} (a replacement was interrupted)")
        else:
            _remove(path)
            done.append(f"removed {path} (left by an interrupted run)")
    for line in done:
        log.warning("%s", line)
    return done


def clean_temp_files(folder: str | os.PathLike) -> list[str]:
    """Removes ``*.tmp-<pid>*`` entries of dead processes directly inside ``folder``; returns their paths."""
    folder = os.fspath(folder)
    removed = []
    try:
        entries = os.listdir(folder)
    except OSError:
        return removed
    for entry in entries:
        m = re.search(r"\.tmp-(\d+)(\.[^/]*)?$", entry)
        if m and not _alive(int(m.group(1))):
            path = os.path.join(folder, entry)
            _remove(path)
            removed.append(path)
            log.warning("removed %s (left by an interrupted run)", path)
    return removed


def partial_dir(dest: str | os.PathLike) -> str:
    """Where the output folder ``dest`` is built: ``<dest>.partial``."""
    return os.path.abspath(os.fspath(dest)) + PARTIAL


def _owner(path: str) -> tuple[str, int] | None:
    try:
        with open(os.path.join(path, OWNER), encoding="utf-8") as f:
            host, _, pid = f.read().strip().rpartition(" ")
        return host, int(pid)
    except (OSError, ValueError):
        return None


class StagedDir:
    """A stage's output folder ``dest`` under construction in ``<dest>.partial`` (see the module docstring).

    Args:
      dest: the final output folder.
      resume: keep what an earlier, dead run left in ``<dest>.partial`` (its checkpoint) instead of starting
        from an empty folder.
      keep: name(s) of the entries inside the staging folder that make it worth keeping after a failure or an
        interrupt (e.g. ``"ckpt"``: a resumable checkpoint); without them a failed run's staging folder is removed.

    Use as a context manager; call :meth:`commit` once every file is written (the stage's manifest last).
    Leaving the block without :meth:`commit` (an error, Ctrl-C, a run stopped at ``max_steps``) leaves ``dest``
    untouched and keeps the staging folder only when it holds ``keep``.
    """

    def __init__(self, dest: str | os.PathLike, *, resume: bool = False, keep: str | tuple[str, ...] | None = None):
        self.dest = os.path.abspath(os.fspath(dest))
        self.path = partial_dir(self.dest)
        self.resume = resume
        self.keep = (keep,) if isinstance(keep, str) else tuple(keep or ())
        self.committed = False
        self.resumed = False

    def _keepable(self) -> bool:
        return any(os.path.exists(os.path.join(self.path, k)) for k in self.keep)

    def open(self) -> StagedDir:
        clean_leftovers(self.dest)
        if os.path.lexists(self.path) and not os.path.isdir(self.path):
            _remove(self.path)
        if os.path.isdir(self.path):
            owner = _owner(self.path)
            here = socket.gethostname()
            if owner is not None and owner[0] == here and owner[1] != os.getpid() and _alive(owner[1]):
                raise JdupError(f"another jdup process (pid {owner[1]}) is writing this output right now; wait for "
                                "it to finish or stop it", self.dest)
            if self.resume and self._keepable():
                self.resumed = True
                log.info("resuming from the unfinished output of an earlier run: %s", self.path)
                clean_temp_files(self.path)
            else:
                shutil.rmtree(self.path)
                log.warning("removed %s (the unfinished output of an earlier run)", self.path)
        os.makedirs(self.path, exist_ok=True)
        with open(os.path.join(self.path, OWNER), "w", encoding="utf-8") as f:
            f.write(f"{socket.gethostname()} {os.getpid()}\n")
        return self

    def commit(self) -> None:
        """Swaps the finished staging folder over ``dest`` (the previous output, if any, is removed)."""
        _remove(os.path.join(self.path, OWNER))
        clean_temp_files(self.path)
        replace_dir(self.path, self.dest)
        self.committed = True

    def close(self) -> None:
        """Without :meth:`commit`: keep the staging folder only if it holds ``keep``, else remove it."""
        if self.committed or not os.path.isdir(self.path):
            return
        if self._keepable():
            _remove(os.path.join(self.path, OWNER))
            return
        shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> StagedDir:
        return self.open()

    def __exit__(self, *exc: Any) -> None:
        self.close()


def checkpoint_of(dest: str | os.PathLike, name: str = "ckpt") -> str | None:
    """The resumable checkpoint folder an interrupted run of the stage writing ``dest`` left, if any."""
    path = os.path.join(partial_dir(dest), name)
    return path if os.path.isdir(path) and os.listdir(path) else None
