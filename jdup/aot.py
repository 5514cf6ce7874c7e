"""Compiled programs kept across processes: a jitted function whose executables are written to and read from disk.

JAX's persistent compilation cache (:mod:`jdup.runtime`) saves the XLA compilation of a repeated call, but every
fresh process still traces the Python function and lowers it to StableHLO before it can look the executable up:
for an encoder forward that is most of a repeated ``jdup detect``'s fixed cost (one trace and lowering per padded
length). :func:`keep_compiled` wraps a ``jax.jit`` function so that, per argument signature, the compiled
executable itself is serialised (``jax.experimental.serialize_executable``) next to the compilation cache, and a
later process loads it without tracing or lowering. The executable is the same binary, so results are bit-identical.

The file name is a hash of everything the program depends on: the caller's key (e.g. the model's graph
definition and the pass's static options), the arguments' tree structure, shapes and dtypes, the source of every
``jdup`` module, the JAX / jaxlib versions, the device kind, ``XLA_FLAGS`` and the JAX settings that change a
trace. It is used only where that identifies the program: the compilation cache is on, one process, one device
(anything else calls the jitted function as it is); ``JDUP_KEEP_EXECUTABLES=0`` turns it off. A file that cannot be
read or loaded is removed. A program that is kept is compiled with the compilation cache bypassed (XLA:CPU cannot
serialise an executable loaded from there completely), so it is kept even when the cache already holds it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("jdup.aot")

#: ``0``/``false``/``off``/``no``: compile in every process as before (the compilation cache is still used)
ENV_OFF = "JDUP_KEEP_EXECUTABLES"

#: executables kept at most (least recently used removed first; a code change makes new files)
MAX_FILES = 256

_SOURCE_HASH: str | None = None


def _source_hash() -> str:
    """sha256 of every ``jdup`` source file (a code change gives new file names)."""
    global _SOURCE_HASH
    if _SOURCE_HASH is None:
        h = hashlib.sha256()
        root = Path(__file__).resolve().parent
        for p in sorted(root.rglob("*.py")):
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
        _SOURCE_HASH = h.hexdigest()
    return _SOURCE_HASH


def stable_repr(obj: Any) -> str:
    """``repr(obj)`` without memory addresses (``<function f at 0x…>``), the same in every process."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(obj))


def _environment() -> str:
    import jax
    import jaxlib

    dev = jax.devices()[0]
    flags = (jax.config.jax_default_matmul_precision, jax.config.jax_enable_x64,
             jax.config.jax_numpy_rank_promotion, jax.config.jax_default_prng_impl)
    return repr((jax.__version__, jaxlib.__version__, dev.platform, dev.device_kind, os.environ.get("XLA_FLAGS", ""),
                 flags, _source_hash()))


def _folder() -> Path | None:
    """Where executables go: ``<compilation cache>/aot``, or None (cache off, several processes or devices)."""
    from jdup import runtime

    if os.environ.get(ENV_OFF, "").strip().lower() in ("0", "false", "off", "no"):
        return None
    st = runtime.status()
    if st is None or not st.enabled or not st.dir:
        return None
    import jax

    if jax.process_count() != 1 or jax.device_count() != 1:
        return None
    return Path(st.dir) / "aot"


def keep_compiled(jitted: Callable, key: Callable[[], str], static_argnums: tuple[int, ...] = ()) -> Callable:
    """``jitted`` (a ``jax.jit`` function) whose compiled executables persist across processes (see the module
    docstring); ``key()`` (called once, when a file name is first needed) must name everything the function closes
    over that changes its program (its static options, the model's :func:`stable_repr` graph definition). Same
    calling convention and results; called inside another trace it is ``jitted`` itself. ``static_argnums``: those
    of ``jitted`` (their values must be part of ``key``)."""
    compiled: dict[Any, Callable] = {}
    name: list[str] = []

    def call(*args):
        import jax

        dynamic = tuple(a for i, a in enumerate(args) if i not in static_argnums)
        leaves, tree = jax.tree.flatten(dynamic)
        if any(isinstance(x, jax.core.Tracer) for x in leaves):
            return jitted(*args)
        sig = (tree, tuple((getattr(x, "shape", None), str(getattr(x, "dtype", type(x)))) for x in leaves))
        fn = compiled.get(sig)
        if fn is None:
            fn = compiled[sig] = _load_or_compile(jitted, key, name, sig, args)
        return jitted(*args) if fn is jitted else fn(*dynamic)  # a Compiled takes the dynamic arguments only

    call.jitted = jitted  # type: ignore[attr-defined]
    return call


def _load_or_compile(jitted: Callable, key: Callable[[], str], name: list[str], sig: Any, args: tuple) -> Callable:
    folder = _folder()
    if folder is None:
        return jitted
    from jax.experimental import serialize_executable as se

    if not name:
        name.append(key())
    digest = hashlib.sha256(repr((name[0], stable_repr(sig[0]), sig[1], _environment())).encode()).hexdigest()[:40]
    path = folder / f"{digest}.exe"
    if path.is_file():
        try:
            blob, in_tree, out_tree = pickle.loads(path.read_bytes())
            exe = se.deserialize_and_load(blob, in_tree, out_tree)
            os.utime(path)  # recently used: kept by the eviction below
            return exe
        except Exception as e:  # truncated, stale or foreign file: removed, compiled again (and kept if fresh)
            log.debug("aot: removing %s (%s)", path, e)
            path.unlink(missing_ok=True)
    # compiled here, not looked up in JAX's compilation cache: XLA:CPU does not serialise an executable loaded from
    # there completely (a later process fails with "Function ... not found" when it runs it), and the cache may
    # hold this program already (written by an older jdup, whose kept executables have other names); then no later
    # process would ever load it from here
    exe = _compile_bypassing_cache(jitted.lower(*args))
    try:
        from jdup import atomic

        folder.mkdir(parents=True, exist_ok=True)
        atomic.write_bytes(path, pickle.dumps(se.serialize(exe), protocol=pickle.HIGHEST_PROTOCOL))
        _evict(folder)
    except Exception as e:  # not serialisable or not writable: this process still runs the compiled program
        log.debug("aot: not kept %s (%s)", path, e)
    return exe


def _compile_bypassing_cache(lowered: Any) -> Any:
    """``lowered.compile()`` with JAX's persistent compilation cache off for this one compilation (the same XLA
    compiler and options, so the same binary)."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc

    was = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    cc.reset_cache()  # JAX decides once per process whether the cache is used; make it look again
    try:
        return lowered.compile(compiler_options={})  # not None: a new compilation, not the Lowered's memoised one
    finally:
        jax.config.update("jax_enable_compilation_cache", was)
        cc.reset_cache()


def _evict(folder: Path, keep: int = MAX_FILES) -> None:
    """Keep the ``keep`` most recently used executables (files of older code or models go first)."""
    files = sorted(folder.glob("*.exe"), key=lambda p: p.stat().st_mtime, reverse=True)
    for p in files[keep:]:
        p.unlink(missing_ok=True)
