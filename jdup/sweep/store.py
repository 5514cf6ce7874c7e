"""The results store of a sweep: ``<sweep_dir>/results.jsonl``, one JSON object per finished cell.

A line is either complete or (after a crash mid-write) a truncated last line, which :func:`read_results` skips.
The latest line for a cell id wins; a restarted sweep skips the ids already ``ok`` there.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Mapping
from typing import Any

import numpy as np


class ResultsStore:
    """``<sweep_dir>/results.jsonl``: one JSON object per line, appended with one ``write`` + ``fsync``.

    Only one process should write (process 0 on multi-host runs); the others get ``writer=False``.
    """

    def __init__(self, sweep_dir: str | os.PathLike, writer: bool = True):
        self.dir = os.path.abspath(os.fspath(sweep_dir))
        self.path = os.path.join(self.dir, "results.jsonl")
        self.writer = writer
        if writer:
            os.makedirs(self.dir, exist_ok=True)

    def read(self) -> dict[str, dict]:
        """``{cell id: latest record}`` (complete lines only)."""
        return {r["id"]: r for r in read_results(self.path)}

    def append(self, record: Mapping) -> None:
        """Appends one record atomically (a single ``os.write`` of the whole line, then ``fsync``)."""
        if self.writer:
            append_jsonl(self.path, record)

    def log_invocation(self, record: Mapping) -> None:
        """Appends one line about a ``jdup sweep`` invocation (command, machine, wall time) to
        ``<sweep_dir>/invocations.jsonl`` (read by ``jdup report`` for the wall time and the machine)."""
        if self.writer:
            append_jsonl(os.path.join(self.dir, INVOCATIONS), record)


#: File of a sweep folder with one line per ``jdup sweep`` invocation (see :meth:`ResultsStore.log_invocation`).
INVOCATIONS = "invocations.jsonl"


def append_jsonl(path: str, record: Mapping) -> None:
    """Appends ``record`` as one JSON line with a single ``os.write``, then ``fsync``; a partial last line left by
    a crash is closed first so the new record starts on a fresh line."""
    line = (json.dumps(record, default=json_default, allow_nan=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if os.fstat(fd).st_size > 0:
            with open(path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    line = b"\n" + line
        view = memoryview(line)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)


def read_results(path: str | os.PathLike) -> list[dict]:
    """All complete records of a results file (or sweep folder), in file order; malformed or truncated lines are
    skipped."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "results.jsonl")
    if not os.path.isfile(path):
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and "id" in rec:
                out.append(rec)
    return out


def json_default(o: Any) -> Any:
    """JSON for NumPy scalars/arrays (anything else: its ``str``)."""
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def versions() -> dict:
    """Package versions, Python, platform and devices (written into every result line)."""
    import importlib.metadata as md

    out: dict[str, Any] = {}
    for pkg in ("jdup", "jax", "jaxlib", "flax", "optax"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    out["python"] = platform.python_version()
    try:
        import jax

        out["backend"] = jax.default_backend()
        out["devices"] = jax.device_count()
        out["processes"] = jax.process_count()
    except Exception:  # pragma: no cover
        pass
    return out


def _first_line_value(path: str, prefix: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(prefix):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def machine() -> dict:
    """The host a sweep runs on: name, CPU model, cores (all / usable by this process), memory, platform and the
    1-minute load average now (shared machines make timings depend on it)."""
    out: dict[str, Any] = {"host": platform.node(), "platform": platform.platform(), "cpu_count": os.cpu_count()}
    out["cpu"] = _first_line_value("/proc/cpuinfo", "model name") or platform.processor() or None
    try:
        out["cpus_usable"] = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        pass
    mem = _first_line_value("/proc/meminfo", "MemTotal")
    if mem and mem.split()[0].isdigit():
        out["memory_gb"] = round(int(mem.split()[0]) / 2**20, 1)
    try:
        out["load_1min"] = round(os.getloadavg()[0], 2)
    except OSError:  # pragma: no cover
        pass
    return out
