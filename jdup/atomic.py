"""Atomic outputs: every file and every stage folder jdup writes appears complete or not at all.

Files: :func:`write` (and :func:`write_text`, :func:`write_json`, :func:`write_bytes`, :func:`write_npy`,
:func:`write_npz`, :func:`save_figure`) writes ``<path>.tmp-<pid>-<host>-<run>`` next to the destination and renames
it over ``path`` once complete, so readers never see half a file.

Folders: :class:`StagedDir` is a stage's output folder under construction. The stage writes into the sibling
``<out>.partial/`` (a deterministic name: a killed training or unlearning run keeps its checkpoint there and the
next run resumes from it); :meth:`StagedDir.commit` swaps it over ``<out>`` in one rename (``renameat2`` exchange
where the kernel has it, else two renames), so a failed or killed run leaves the previous complete output or none,
and no file of an earlier run survives inside a new output. :func:`replace_dir` does the swap for any folder
written under :func:`temp_dir`.

Several processes (``jax.distributed``, :mod:`jdup.distributed`): only process 0 (the *writer*) creates, locks,
writes or deletes anything under ``<out>``; the other processes get a private scratch folder as
:attr:`StagedDir.path` (removed when they finish), read the shared checkpoint folder
(:meth:`StagedDir.checkpoint_dir`) and wait at barriers: after the writer opened the staging folder, before it
commits (every process finished its work) and after the commit.

Who owns what, safely across hosts that share a disk:

* temporary names carry the pid, a tag of the host name and the run: ``<name>.tmp-<pid>-<host8>-<run8>`` (and
  ``<name>.old-...`` during a folder swap); ``<host8>`` is a hash of the host name, ``<run8>`` the start of the
  run token (:func:`jdup.distributed.run_token`: one id for all processes of a run, drawn by process 0);
* ``<out>.partial/.jdup-owner`` holds ``<host> <pid> <run token>`` of the run writing it; the writer touches it
  every :data:`OWNER_HEARTBEAT_S` seconds while it works;
* a leftover temporary file or folder is removed only when it is certainly dead: written on **this** host by a
  pid that is no longer alive, or written on **another** host and not modified for :data:`FOREIGN_STALE_S`
  (a day); an old-style name without host (``.tmp-<pid>``) counts as this host's;
* a ``.partial`` folder whose owner is a live process of this host, or whose owner file was touched by another host
  within :data:`OWNER_FRESH_S` (15 minutes), belongs to a live run: it is never resumed, taken over or deleted
  (the command fails with one line naming the owner); otherwise it is the unfinished output of a dead run, resumed
  (its checkpoint) or removed.

Ctrl-C (remembered, acted on at every step, held back while a checkpoint is written) is handled in
:mod:`jdup.distributed`.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from typing import IO, Any, NamedTuple

from jdup.errors import JdupError

log = logging.getLogger("jdup")

PARTIAL = ".partial"
OWNER = ".jdup-owner"
#: ``.tmp-<pid>`` (old style) or ``.tmp-<pid>-<host8>-<run8>``, then an optional extension
_TMP = re.compile(r"\.(tmp|old)-(\d+)(?:-([0-9a-f]{8})-([0-9a-z]{1,12}))?(\..*)?$")
#: a leftover of another host is removed only after this many seconds without modification
FOREIGN_STALE_S = 24 * 3600
#: a ``.partial`` owner file touched by another host within this many seconds belongs to a live run
OWNER_FRESH_S = 15 * 60
#: how often a writer touches its owner file
OWNER_HEARTBEAT_S = 60


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()


def fix_mode(path: str | os.PathLike) -> None:
    """Gives a file written by a library that creates private files (mode 0600, e.g. safetensors) the usual
    mode of new files (0666 minus the umask, so 0644 by default)."""
    os.chmod(path, 0o666 & ~_UMASK)


# ---------------------------------------------------------------------------------------------------------------
# names of temporary files and their owners


def _host() -> str:
    return socket.gethostname()


def host_tag(host: str | None = None) -> str:
    """8 hex digits naming a host in temporary file names."""
    return hashlib.sha1((host or _host()).encode()).hexdigest()[:8]


def _run_tag() -> str:
    from jdup import distributed

    return distributed.run_token()[:8]


def _suffix(kind: str) -> str:
    return f".{kind}-{os.getpid()}-{host_tag()}-{_run_tag()}"


def _stale(path: str, pid: int, host: str | None) -> bool:
    """Whether the leftover ``path`` written by ``pid`` on the host tagged ``host`` (None: this host, old-style
    name) is certainly dead (see the module docstring)."""
    if host is None or host == host_tag():
        return not _alive(pid)
    try:
        age = time.time() - os.lstat(path).st_mtime
    except OSError:
        return False
    return age > FOREIGN_STALE_S


# ---------------------------------------------------------------------------------------------------------------
# files


def tmp_name(path: str | os.PathLike) -> str:
    """The temporary name of ``path`` while this process writes it: ``<path>.tmp-<pid>-<host8>-<run8>``."""
    return f"{os.fspath(path)}{_suffix('tmp')}"


def write(path: str | os.PathLike, writer: Callable[[IO[Any]], Any], *, binary: bool = False) -> None:
    """Calls ``writer(file)`` on :func:`tmp_name` ``(path)`` and renames it to ``path`` once it has returned."""
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


def append_jsonl(path: str | os.PathLike, obj: Any, *, default: Callable | None = str) -> None:
    """Appends ``obj`` as one JSON line to a log file in a single write (after a kill a line is whole or a cut
    last line, which readers skip; a log that must be rewritten goes through :func:`write_text`)."""
    line = json.dumps(obj, default=default) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)


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
    """A fresh empty :func:`tmp_name` ``(dest)`` folder next to ``dest`` (for :func:`replace_dir`)."""
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
    old = f"{dest}{_suffix('old')}"
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
    """Removes ``<dest>.tmp-...`` / ``<dest>.old-...`` siblings left by dead runs (the rule of the module docstring;
    an ``.old`` folder is restored when ``dest`` itself is missing: a swap that was killed half-way). Returns what
    it did."""
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
        path = os.path.join(parent, entry)
        if not m or not _stale(path, int(m.group(2)), m.group(3)):
            continue
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
    """Removes ``*.tmp-...`` entries of dead runs directly inside ``folder`` (the rule of the module docstring);
    returns their paths."""
    folder = os.fspath(folder)
    removed = []
    try:
        entries = os.listdir(folder)
    except OSError:
        return removed
    for entry in entries:
        m = _TMP.search(entry)
        if not m or m.group(1) != "tmp":
            continue
        path = os.path.join(folder, entry)
        if _stale(path, int(m.group(2)), m.group(3)):
            _remove(path)
            removed.append(path)
            log.warning("removed %s (left by an interrupted run)", path)
    return removed


def partial_dir(dest: str | os.PathLike) -> str:
    """Where the output folder ``dest`` is built: ``<dest>.partial``."""
    return os.path.abspath(os.fspath(dest)) + PARTIAL


class Owner(NamedTuple):
    """Who writes a ``.partial`` folder: its ``.jdup-owner`` file (``host pid [run token]``) and its age."""

    host: str
    pid: int
    token: str | None
    age_s: float


def _owner(path: str) -> Owner | None:
    file = os.path.join(path, OWNER)
    try:
        with open(file, encoding="utf-8") as f:
            parts = f.read().split()
        age = time.time() - os.stat(file).st_mtime
    except OSError:
        return None
    try:
        if len(parts) >= 3 and parts[-2].isdigit():  # host pid token
            return Owner(" ".join(parts[:-2]), int(parts[-2]), parts[-1], age)
        return Owner(" ".join(parts[:-1]), int(parts[-1]), None, age)  # older style: host pid
    except (ValueError, IndexError):
        return None


def live_owner(path: str) -> str | None:
    """Why the ``.partial`` folder ``path`` belongs to another live run (one phrase), or None when it does not:
    a live process of this host, or an owner file another host touched within :data:`OWNER_FRESH_S`."""
    owner = _owner(path)
    if owner is None:
        return None
    from jdup import distributed

    if owner.host == _host():
        if owner.pid != os.getpid() and _alive(owner.pid):
            return f"another jdup process (pid {owner.pid}) is writing this output right now"
        return None
    if owner.token and owner.token == distributed.run_token():
        return None
    if owner.age_s < OWNER_FRESH_S:
        return (f"a jdup run on host {owner.host} (pid {owner.pid}) was writing this output {owner.age_s:.0f} s ago; "
                f"if it is gone, wait {OWNER_FRESH_S // 60} minutes or remove {path}")
    return None


class _Heartbeat:
    """Touches the owner file every :data:`OWNER_HEARTBEAT_S` seconds (a daemon thread) until stopped."""

    def __init__(self, file: str):
        self.file = file
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, name="jdup-owner-heartbeat", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop_event.wait(OWNER_HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(self.file)

    def stop(self) -> None:
        self.stop_event.set()


class StagedDir:
    """A stage's output folder ``dest`` under construction in ``<dest>.partial`` (see the module docstring).

    Args:
      dest: the final output folder.
      resume: keep what an earlier, dead run left in ``<dest>.partial`` (its checkpoint) instead of starting
        from an empty folder.
      keep: name(s) of the entries inside the staging folder that make it worth keeping after a failure or an
        interrupt (e.g. ``"ckpt"``: a resumable checkpoint); without them a failed run's staging folder is removed.
      writer: whether this process writes (default :func:`jdup.distributed.is_writer`: process 0). Another
        process touches nothing under ``dest``: :attr:`path` is a private scratch folder it may write into
        (removed on :meth:`close`), and it waits at the barriers of :meth:`open` and :meth:`commit`.

    Use as a context manager; call :meth:`commit` once every file is written (the stage's manifest last).
    Leaving the block without :meth:`commit` (an error, Ctrl-C, a run stopped at ``max_steps``) leaves ``dest``
    untouched and keeps the staging folder only when it holds ``keep``.
    """

    def __init__(self, dest: str | os.PathLike, *, resume: bool = False, keep: str | tuple[str, ...] | None = None,
                 writer: bool | None = None):
        from jdup import distributed

        self.dest = os.path.abspath(os.fspath(dest))
        self.partial = partial_dir(self.dest)
        self.writer = distributed.is_writer() if writer is None else bool(writer)
        self.path = self.partial
        self.resume = resume
        self.keep = (keep,) if isinstance(keep, str) else tuple(keep or ())
        self.committed = False
        self.resumed = False
        self._heartbeat: _Heartbeat | None = None
        self._scratch: str | None = None
        self._owned = False  # this process made (or took over) the staging folder: only then may close() touch it

    def checkpoint_dir(self, name: str = "ckpt") -> str:
        """``<dest>.partial/<name>``: the checkpoint folder, the same on every process (a shared disk)."""
        return os.path.join(self.partial, name)

    def _keepable(self) -> bool:
        return any(os.path.exists(os.path.join(self.partial, k)) for k in self.keep)

    def open(self) -> StagedDir:
        from jdup import distributed

        try:
            if self.writer:
                self._open_writer()
            else:
                self._scratch = self.path = tempfile.mkdtemp(prefix=f"jdup-p{distributed.process_index()}-")
                _SCRATCH[self._scratch] = self.partial
            distributed.barrier("staged-open")  # the others see the staging folder only once it is settled
            self.resumed = bool(distributed.broadcast(self.resumed))
        except BaseException:
            self.close()
            raise
        return self

    def _open_writer(self) -> None:
        from jdup import distributed

        clean_leftovers(self.dest)
        if os.path.lexists(self.path) and not os.path.isdir(self.path):
            _remove(self.path)
        if os.path.isdir(self.path):
            why = live_owner(self.path)
            if why is not None:
                raise JdupError(f"{why}; wait for it to finish or stop it", self.dest)
            if self.resume and self._keepable():
                self.resumed = True
                log.info("resuming from the unfinished output of an earlier run: %s", self.path)
                clean_temp_files(self.path)
            else:
                shutil.rmtree(self.path)
                log.warning("removed %s (the unfinished output of an earlier run)", self.path)
        os.makedirs(self.path, exist_ok=True)
        owner = os.path.join(self.path, OWNER)
        with open(owner, "w", encoding="utf-8") as f:
            f.write(f"{_host()} {os.getpid()} {distributed.run_token()}\n")
        self._owned = True
        self._heartbeat = _Heartbeat(owner)

    def _stop_heartbeat(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.stop()
            self._heartbeat = None

    def commit(self) -> None:
        """Swaps the finished staging folder over ``dest`` (the previous output, if any, is removed).

        On several processes: every process calls it; the writer commits once all of them got here, and all
        return once the commit is done (a failure of any process raises instead on the others)."""
        from jdup import distributed

        distributed.barrier("staged-ready")
        if self.writer:
            self._stop_heartbeat()
            _remove(os.path.join(self.path, OWNER))
            clean_temp_files(self.path)
            replace_dir(self.path, self.dest)
        self.committed = True
        distributed.barrier("staged-committed")

    def close(self) -> None:
        """Without :meth:`commit`: keep the staging folder only if it holds ``keep``, else remove it (the writer);
        remove the scratch folder (the others)."""
        self._stop_heartbeat()
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            _SCRATCH.pop(self._scratch, None)
            self._scratch = None
            return
        if not self._owned or self.committed or not os.path.isdir(self.path):
            return
        if self._keepable():
            _remove(os.path.join(self.path, OWNER))
            return
        shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> StagedDir:
        return self.open()

    def __exit__(self, *exc: Any) -> None:
        self.close()


#: scratch folder of a process other than the writer -> the staging folder it stands for
_SCRATCH: dict[str, str] = {}


def shared_path(path: str | os.PathLike) -> str:
    """``path`` itself, or, for a path inside the private scratch folder of a process other than the writer
    (:class:`StagedDir`), the same path inside the shared ``<out>.partial``: where a checkpoint that every
    process must see lives."""
    path = os.path.abspath(os.fspath(path))
    for scratch, partial in _SCRATCH.items():
        if path == scratch or path.startswith(scratch + os.sep):
            return partial + path[len(scratch):]
    return path


def checkpoint_of(dest: str | os.PathLike, name: str = "ckpt") -> str | None:
    """The resumable checkpoint folder an interrupted run of the stage writing ``dest`` left, if any."""
    path = os.path.join(partial_dir(dest), name)
    return path if os.path.isdir(path) and os.listdir(path) else None
