"""Process-wide runtime settings: JAX's persistent compilation cache, on by default, one host BLAS thread
(:func:`limit_host_blas`), transparent huge pages for the C allocator's large buffers in CLI calls
(:func:`reexec_with_huge_pages`), and optionally a C allocator that keeps XLA's large buffers between executions
(:func:`tune_host_malloc`).

Repeated CLI calls (``jdup detect`` / ``unlearn`` / ``run`` over many victims) compile the same XLA programs
again in every fresh process. :func:`setup` (called once by the CLI before any JAX work) points JAX's persistent
compilation cache at a per-user folder so a second process loads the executables from disk instead:

* folder: ``$JDUP_COMPILATION_CACHE`` when it is a path, else ``$XDG_CACHE_HOME/jdup/xla``, else
  ``~/.cache/jdup/xla``;
* opt out: ``JDUP_COMPILATION_CACHE=0`` (also ``false``/``off``/``no``) or ``setup(enabled=False)``;
* only programs whose XLA compile took at least ``min_compile_time_s`` (default 0.25 s;
  ``$JDUP_COMPILATION_CACHE_MIN_SECS``) are written, so tiny eager/helper programs do not fill the folder;
* size bounded (default 4 GiB; ``$JDUP_COMPILATION_CACHE_MAX_BYTES``) with least-recently-used eviction.

Settings the user gave JAX directly win: with ``JAX_COMPILATION_CACHE_DIR`` (or ``jax_compilation_cache_dir``
already configured) jdup leaves the cache folder alone, and explicitly set ``JAX_PERSISTENT_CACHE_*`` /
``JAX_COMPILATION_CACHE_MAX_SIZE`` variables are kept. The opt-out only stops jdup from turning the cache on;
it does not switch off a cache the user configured for JAX.

Two processes sharing the folder (verified in the jax 0.10.2 source, ``jax/_src/lru_cache.py`` and
``jax/_src/compiler.py``): JAX does **not** write entries atomically (``LRUCache.put`` is a plain
``Path.write_bytes`` after an ``exists()`` check), and with JAX's default ``jax_compilation_cache_max_size=-1``
no lock is taken, so a reader could see a half-written entry. Setting a size limit (as :func:`setup` does)
switches on eviction, and with it a ``filelock.FileLock`` on ``<dir>/.lockfile`` around every ``get`` and
``put``: reads and writes of the folder are then serialised across processes. Independently of that, a read
that fails (truncated or corrupt entry: zlib/zstd decompression or deserialisation error, or a lock timeout)
is caught in ``compiler._cache_read`` and only warns; the program is then compiled as if the entry were absent.
Only process 0 of a multi-process JAX job writes entries.

This module imports nothing heavy at import time: when JAX has not been imported yet, :func:`setup` only sets
the ``JAX_*`` environment variables that JAX reads when it is imported, so ``jdup --help`` stays fast.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

#: ``0``/``false``/``off``/``no`` disables the cache, ``1``/``true``/``on``/``yes``/empty keeps the default folder,
#: anything else is taken as the cache folder.
ENV_CACHE = "JDUP_COMPILATION_CACHE"
ENV_MIN_SECS = "JDUP_COMPILATION_CACHE_MIN_SECS"
ENV_MAX_BYTES = "JDUP_COMPILATION_CACHE_MAX_BYTES"

DEFAULT_MIN_COMPILE_TIME_S = 0.25  # XLA compile seconds below which an executable is not written
DEFAULT_MAX_BYTES = 4 * 2**30  # LRU bound of the folder (also what turns on JAX's inter-process file lock)

_OFF = {"0", "false", "off", "no"}
_ON = {"", "1", "true", "on", "yes"}

# JAX config names and the environment variables JAX reads them from at import time
_JAX_DIR = "jax_compilation_cache_dir"
_JAX_MIN_SECS = "jax_persistent_cache_min_compile_time_secs"
_JAX_MAX_SIZE = "jax_compilation_cache_max_size"


@dataclasses.dataclass(frozen=True)
class CacheStatus:
    """What :func:`setup` did.

    Attributes:
      enabled: the persistent cache is on (by jdup or by the user's own JAX settings).
      dir: the cache folder, or None when off.
      source: ``"jdup"`` (jdup's default or ``$JDUP_COMPILATION_CACHE``), ``"jax"`` (the user's JAX settings),
        ``"off"`` (opted out).
      min_compile_time_s: write threshold in effect (None when off).
      max_bytes: size bound in effect (None when off; -1 = unbounded, JAX's default, no inter-process lock).
    """

    enabled: bool
    dir: str | None
    source: str
    min_compile_time_s: float | None = None
    max_bytes: int | None = None


_status: CacheStatus | None = None


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/jdup/xla`` (when set and absolute) else ``~/.cache/jdup/xla``."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "jdup" / "xla"


def _env_choice() -> tuple[bool, Path | None]:
    """(enabled, folder from the variable or None) from ``$JDUP_COMPILATION_CACHE``."""
    raw = os.environ.get(ENV_CACHE, "").strip()
    if raw.lower() in _OFF:
        return False, None
    if raw.lower() in _ON:
        return True, None
    return True, Path(raw).expanduser()


def _float_env(name: str, default: float) -> float:
    try:
        return float(os.environ[name])
    except (KeyError, ValueError):
        return default


def _int_env(name: str, default: int) -> int:
    try:
        return int(os.environ[name])
    except (KeyError, ValueError):
        return default


def _user_jax_dir() -> str | None:
    """A cache folder the user configured for JAX itself (not one jdup set), else None."""
    ours = os.environ.get(_OWN_MARK)
    env = os.environ.get(_JAX_DIR.upper())
    if env and env != ours:
        return env
    if "jax" in sys.modules:
        import jax

        cur = getattr(jax.config, _JAX_DIR)
        if cur and cur != ours:
            return cur
    return None


def setup(
    enabled: bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    *,
    min_compile_time_s: float | None = None,
    max_bytes: int | None = None,
) -> CacheStatus:
    """Turn on JAX's persistent compilation cache for this process (call once, before any JAX compilation).

    Args:
      enabled: False opts out (like ``JDUP_COMPILATION_CACHE=0``); None follows the environment (default on).
      cache_dir: the cache folder; None: ``$JDUP_COMPILATION_CACHE`` (if a path) or :func:`default_cache_dir`.
      min_compile_time_s: only executables that took at least this long to compile are written;
        None: ``$JDUP_COMPILATION_CACHE_MIN_SECS`` or 0.25 s.
      max_bytes: LRU size bound of the folder (> 0; it also enables JAX's inter-process file lock);
        None: ``$JDUP_COMPILATION_CACHE_MAX_BYTES`` or 4 GiB.

    Returns:
      A :class:`CacheStatus` (also kept for :func:`status`). JAX opens the folder at its first compilation
      with a cache folder set; changing the folder after that has no effect in this process.
    """
    global _status
    env_on, env_dir = _env_choice()
    on = env_on if enabled is None else bool(enabled)
    user_dir = _user_jax_dir()
    if user_dir:
        _status = CacheStatus(True, str(user_dir), "jax")
        return _status
    if not on:
        if os.environ.get(_OWN_MARK):
            _apply(None, None, None)  # undo an earlier setup() of this process
        _status = CacheStatus(False, None, "off")
        return _status
    folder = Path(cache_dir).expanduser() if cache_dir is not None else (env_dir or default_cache_dir())
    secs = (
        _float_env(ENV_MIN_SECS, DEFAULT_MIN_COMPILE_TIME_S)
        if min_compile_time_s is None
        else min_compile_time_s
    )
    size = _int_env(ENV_MAX_BYTES, DEFAULT_MAX_BYTES) if max_bytes is None else int(max_bytes)
    if size <= 0:
        raise ValueError(
            f"max_bytes must be > 0 (it bounds the folder and enables the file lock), got {size}"
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
        folder = folder.resolve()
    except OSError:  # read-only home or the like: run without the cache rather than fail
        _status = CacheStatus(False, None, "off")
        return _status
    _apply(str(folder), float(secs), size)
    _status = CacheStatus(True, str(folder), "jdup", float(secs), size)
    return _status


#: holds the folder while the JAX_* cache variables / jax.config values were set by jdup's setup()
_OWN_MARK = "JDUP_COMPILATION_CACHE_SET_BY_JDUP"
_JAX_DEFAULTS = {_JAX_DIR: None, _JAX_MIN_SECS: 1.0, _JAX_MAX_SIZE: -1}


def _apply(folder: str | None, secs: float | None, size: int | None) -> None:
    """Set (or, with ``folder=None``, reset) the three JAX settings: environment variables that JAX reads at
    import, and ``jax.config`` too when JAX is already imported. A ``JAX_*`` variable the user set is kept."""
    ours = os.environ.get(_OWN_MARK) is not None
    values = {_JAX_DIR: folder, _JAX_MIN_SECS: secs, _JAX_MAX_SIZE: size}
    for name, value in values.items():
        env = name.upper()
        if name != _JAX_DIR and env in os.environ and not ours:
            continue  # the user's explicit JAX setting wins
        if value is None:
            os.environ.pop(env, None)
        else:
            os.environ[env] = str(value)
        if "jax" in sys.modules:
            import jax

            jax.config.update(name, _JAX_DEFAULTS[name] if value is None else value)
    if folder is None:
        os.environ.pop(_OWN_MARK, None)
    else:
        os.environ[_OWN_MARK] = folder


def status() -> CacheStatus | None:
    """The result of the last :func:`setup` call in this process (None before the first)."""
    return _status


def describe() -> dict:
    """What ``jdup info`` prints: :func:`status` as a dict (``setup()`` is called first when it was not yet) plus
    the folder's current ``entries`` (compiled programs) and ``bytes``."""
    st = _status if _status is not None else setup()
    out = dataclasses.asdict(st)
    if st.dir and os.path.isdir(st.dir):
        files = [p for p in Path(st.dir).iterdir() if p.is_file() and not p.name.startswith(".")]
        out["entries"] = sum(1 for p in files if p.name.endswith("-cache"))
        out["bytes"] = sum(p.stat().st_size for p in files)
    return out


# ---------------------------------------------------------------------------------------------------------------
# where a call's time goes: process start-up and JAX compilation (what the stage records show per phase)

#: jax.monitoring duration events -> keys of :func:`compile_totals` (``compile_s`` is XLA compilation OR loading
#: the executable from the persistent cache; ``cache_load_s`` is the loading part alone)
_COMPILE_DURATIONS = {
    "/jax/core/compile/jaxpr_trace_duration": "trace_s",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
    "/jax/core/compile/backend_compile_duration": "compile_s",
    "/jax/compilation_cache/cache_retrieval_time_sec": "cache_load_s",
}
_COMPILE_COUNTS = {
    "/jax/core/compile/backend_compile_duration": "programs",
    "/jax/compilation_cache/cache_hits": "cache_hits",
    "/jax/compilation_cache/cache_misses": "cache_misses",
}
_compile_totals: dict[str, float] | None = None


def compile_totals() -> dict[str, float]:
    """Running totals of this process's JAX compilation work since the first call (which installs the
    ``jax.monitoring`` listeners; it imports JAX): ``trace_s``, ``lower_s``, ``compile_s`` (XLA compile or
    persistent-cache load), ``cache_load_s``, ``programs``, ``cache_hits``, ``cache_misses``. Subtract two
    snapshots (:func:`compile_since`) for the work of one phase."""
    global _compile_totals
    if _compile_totals is None:
        from jax import monitoring

        totals = dict.fromkeys([*_COMPILE_DURATIONS.values(), *_COMPILE_COUNTS.values()], 0.0)

        def on_duration(event: str, duration: float, **_: object) -> None:
            if event in _COMPILE_DURATIONS:
                totals[_COMPILE_DURATIONS[event]] += duration
            if event in _COMPILE_COUNTS:
                totals[_COMPILE_COUNTS[event]] += 1

        def on_event(event: str, **_: object) -> None:
            if event in _COMPILE_COUNTS:
                totals[_COMPILE_COUNTS[event]] += 1

        monitoring.register_event_duration_secs_listener(on_duration)
        monitoring.register_event_listener(on_event)
        _compile_totals = totals
    return dict(_compile_totals)


def compile_since(before: dict[str, float]) -> dict[str, float]:
    """:func:`compile_totals` now minus the snapshot ``before`` (counts as integers)."""
    now = compile_totals()
    return {k: (int(v - before.get(k, 0)) if k in _COMPILE_COUNTS.values() else v - before.get(k, 0.0))
            for k, v in now.items()}


def process_seconds() -> float | None:
    """Wall seconds since this process started (interpreter start-up and imports included), from
    ``/proc/self/stat``; None where that is not available."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime", encoding="ascii") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):
        return None


#: Variables read by the host BLAS libraries (OpenBLAS of NumPy and SciPy) when they load.
_HOST_BLAS_VARS = ("OPENBLAS_NUM_THREADS",)


def limit_host_blas(threads: int = 1) -> str:
    """One thread for the host BLAS (OpenBLAS of NumPy / SciPy) unless the user chose a number.

    Why: on CPU, JAX runs its LAPACK kernels (``cholesky``, ``solve_triangular``, ``eigh``) through SciPy's
    OpenBLAS, whose worker threads busy-wait after every call while XLA's own thread pool runs the model. The
    detection head solves one triangular system per batch; with OpenBLAS's default threads that alone made the
    scoring pass of ``jdup detect`` (2,733 SST-2 rows, MiniLM, 2 cores) 18.4 s instead of 13.4-14.7 s, the
    results bit for bit the same. The matrices are small (the model width), so one BLAS thread loses nothing.

    An ``OPENBLAS_NUM_THREADS`` the user set is kept. Before the libraries load (the CLI calls this first) the
    variable is set; when they are already loaded (a library caller) ``threadpoolctl``, if installed, limits them.

    Returns:
      ``"env"`` (variable set), ``"user"`` (the user's setting kept), ``"threadpoolctl"`` (loaded libraries
      limited) or ``"loaded"`` (already loaded, nothing changed).
    """
    if any(v in os.environ for v in _HOST_BLAS_VARS):
        return "user"
    for v in _HOST_BLAS_VARS:
        os.environ[v] = str(int(threads))
    if "numpy" not in sys.modules and "scipy" not in sys.modules:
        return "env"
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return "loaded"
    threadpool_limits(int(threads), user_api="blas")
    return "threadpoolctl"


def host_blas_info() -> dict:
    """The host BLAS thread setting (``OPENBLAS_NUM_THREADS``) and, with ``threadpoolctl`` installed, the threads
    of each BLAS library loaded in this process (``{file name: threads}``)."""
    info: dict = {v: os.environ.get(v) for v in _HOST_BLAS_VARS}
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return info
    info["loaded"] = {os.path.basename(i["filepath"]): i["num_threads"] for i in threadpool_info()
                      if i.get("user_api") == "blas"}
    return info


#: How a CLI call treats the C allocator: unset/``auto``/``hugetlb`` (default): huge pages where they help
#: (:func:`reexec_with_huge_pages`); ``1``/``true``/``on``/``yes``/``heap``: the heap settings of
#: :func:`tune_host_malloc` instead; ``0``/``false``/``off``/``no``: glibc's defaults (and :func:`tune_host_malloc`
#: does nothing even when called).
ENV_HOST_MALLOC = "JDUP_HOST_MALLOC"
_AUTO = {"", "auto", "hugetlb", "huge"}
_HEAP = {"1", "true", "on", "yes", "heap"}
#: The glibc tunable the CLI starts with by default: malloc asks the kernel for transparent huge pages
#: (``madvise(MADV_HUGEPAGE)``) for its heap and mmap-backed chunks. glibc >= 2.35 reads it at process start only.
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
_REEXEC_MARK = "JDUP_HOST_MALLOC_REEXEC"  # set by the CLI for the process it re-executes as
_THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")
# mallopt(3) parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
#: What :func:`tune_host_malloc` asks glibc for: one arena, no mmap-backed chunks, freed memory kept up to 2 GiB.
HOST_MALLOC = {"arena_max": 1, "mmap_max": 0, "trim_threshold": 2**31 - 1}
_malloc_state: str | None = None


def _user_malloc_settings(environ=None) -> bool:
    """The user tuned glibc's malloc through the environment (``GLIBC_TUNABLES`` or the ``MALLOC_*_`` variables)."""
    env = os.environ if environ is None else environ
    return "glibc.malloc." in env.get("GLIBC_TUNABLES", "") or any(
        k.startswith("MALLOC_") and k.endswith("_") for k in env
    )


def _glibc_version() -> tuple[int, int] | None:
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # "glibc 2.36"; absent on musl, macOS
        major, minor = version.split(".")[:2]
        return (int(major), int(minor)) if name == "glibc" else None
    except (AttributeError, ValueError, OSError):
        return None


def thp_mode() -> str | None:
    """The kernel's transparent-huge-page mode (``always``, ``madvise`` or ``never``), or None where unknown."""
    try:
        text = _THP_ENABLED.read_text()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else None


def huge_pages_env(environ: dict[str, str] | None = None) -> dict[str, str] | None:
    """The environment a CLI call re-executes itself with to get huge pages (:func:`reexec_with_huge_pages`), or
    None where that would not change anything: ``JDUP_HOST_MALLOC`` asks for something else, the user set glibc
    malloc options, the process already is the re-executed one, glibc is older than 2.35 (or not glibc), or the
    kernel's transparent huge pages are ``always`` (every large mapping gets them already) or ``never``.

    Args:
      environ: the environment to decide on and extend (default ``os.environ``).
    """
    env = dict(os.environ if environ is None else environ)
    if env.get(ENV_HOST_MALLOC, "").strip().lower() not in _AUTO or env.get(_REEXEC_MARK):
        return None
    if not sys.platform.startswith("linux") or _user_malloc_settings(env):
        return None
    version = _glibc_version()
    if version is None or version < (2, 35) or thp_mode() != "madvise":
        return None
    tunables = env.get("GLIBC_TUNABLES", "")
    env["GLIBC_TUNABLES"] = f"{tunables}:{HUGE_PAGES_TUNABLE}" if tunables else HUGE_PAGES_TUNABLE
    env[_REEXEC_MARK] = "1"
    return env


def cli_malloc_choice(environ: dict[str, str] | None = None) -> str:
    """What a ``jdup`` command started with ``environ`` (default ``os.environ``) asks of glibc's allocator:
    ``"hugetlb"`` (it re-executes itself with huge pages), ``"heap"`` (``JDUP_HOST_MALLOC=1``: the heap settings),
    ``"user"`` (the caller's ``glibc.malloc.*`` tunables or ``MALLOC_*_`` variables) or ``"default"``."""
    env = os.environ if environ is None else environ
    if huge_pages_env(env) is not None:
        return "hugetlb"
    if env.get(ENV_HOST_MALLOC, "").strip().lower() in _HEAP:
        return "heap"
    return "user" if _user_malloc_settings(env) else "default"


def reexec_with_huge_pages() -> None:
    """Re-executes this process (same interpreter, same command line) with glibc's malloc asking for transparent
    huge pages, where :func:`huge_pages_env` says it helps; otherwise returns. What the ``jdup`` command does first.

    XLA:CPU allocates the large intermediates of a program (hundreds of MB for a training step) with ``malloc``
    on every run; glibc maps them afresh and the kernel zero-fills them page by page, 4 KB at a time: about 8
    million page faults and 30 s of system time in one ``jdup unlearn`` call on SST-2. With
    ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` the same buffers come in 2 MB pages: 0.3 million faults, about half
    the system time, the same peak memory and the same numbers (docs/performance.md). glibc reads the tunable only
    when a process starts, hence the re-execution, before anything heavy is imported (0.04-0.08 s per call).
    ``JDUP_HOST_MALLOC=0`` (glibc's defaults) or ``=1`` (:func:`tune_host_malloc`'s heap settings) skip it; a
    ``GLIBC_TUNABLES`` with ``glibc.malloc.*`` or ``MALLOC_*_`` variables of the user are kept as they are.
    """
    env = huge_pages_env()
    argv = getattr(sys, "orig_argv", None)
    if env is None or not sys.executable or not argv:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *argv[1:]], env)
    except OSError:  # cannot re-execute (e.g. the interpreter was replaced): run with glibc's defaults
        return


def tune_host_malloc(only_if_asked: bool = False) -> str:
    """Keep XLA:CPU's large temporary buffers in the C heap between executions instead of mapping fresh pages.

    An XLA:CPU executable allocates its large intermediates (the buffers of its dot fusions, hundreds of MB for a
    training step) with ``malloc`` on every run, from its worker threads. glibc serves a request above its mmap
    threshold (at most 32 MB) with a fresh ``mmap`` and unmaps it on ``free``, and a worker thread's arena falls
    back to ``mmap`` for anything larger than its 64 MB heap whatever the threshold, so the kernel zero-fills
    those pages again on every step: one ``jdup unlearn`` call on SST-2 (65 steps, MiniLM) took 8.3 million page
    faults and about 30 s of system time. This asks glibc for one arena (``M_ARENA_MAX=1``: the worker threads
    allocate from the main heap), no mmap-backed chunks (``M_MMAP_MAX=0``) and a high trim threshold, so freed
    buffers are reused. Results are unchanged (only where the memory comes from differs), but it is **not on by
    default**: in whole CLI calls the heap kept buffers of every padded length at once (peak memory 1.9 -> 3.3 GB
    for that call) and the calls were not reliably faster (docs/performance.md).

    Call it before the first JAX computation: glibc fixes a thread's arena when the thread first allocates, and the
    arena limit when the first extra arena is made. It changes the allocator of the whole process.
    ``JDUP_HOST_MALLOC=1`` makes the CLI call it at start-up (instead of the default huge pages,
    :func:`reexec_with_huge_pages`); ``JDUP_HOST_MALLOC=0`` disables it; a ``GLIBC_TUNABLES`` with
    ``glibc.malloc.*`` entries or ``MALLOC_*_`` variables set by the user are kept.

    Args:
      only_if_asked: tune only when ``JDUP_HOST_MALLOC`` asks for it (what the CLI passes); otherwise (a library
        caller's explicit call) tune unless it says no.

    Returns:
      ``"set"`` (applied), ``"hugetlb"`` (this is a CLI process re-executed with huge pages; nothing else done),
      ``"off"`` (not asked for, or opted out), ``"user"`` (the user's settings kept), ``"unavailable"`` (not
      glibc, e.g. macOS or musl) or ``"failed"`` (glibc refused a setting). Repeated calls return the first answer.
    """
    global _malloc_state
    if _malloc_state is not None:
        return _malloc_state
    env = os.environ.get(ENV_HOST_MALLOC, "").strip().lower()
    if os.environ.get(_REEXEC_MARK) and HUGE_PAGES_TUNABLE in os.environ.get("GLIBC_TUNABLES", ""):
        _malloc_state = "hugetlb"
    elif env in _OFF or (only_if_asked and env not in _HEAP):
        _malloc_state = "off"
    elif _user_malloc_settings():
        _malloc_state = "user"
    else:
        _malloc_state = _mallopt_all()
    return _malloc_state


def _mallopt_all() -> str:
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - glibc only: musl's mallopt accepts and ignores everything
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "unavailable"
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    params = {"arena_max": _M_ARENA_MAX, "mmap_max": _M_MMAP_MAX, "trim_threshold": _M_TRIM_THRESHOLD}
    ok = [mallopt(params[name], value) == 1 for name, value in HOST_MALLOC.items()]
    return "set" if all(ok) else "failed"


def host_malloc_info() -> dict:
    """What this process asked of the C allocator: ``state`` as :func:`tune_host_malloc` returns it (``None``: not
    called), the heap ``settings`` it applied, the ``GLIBC_TUNABLES`` the process started with and the kernel's
    transparent-huge-page mode."""
    return {"state": _malloc_state, "settings": dict(HOST_MALLOC) if _malloc_state == "set" else None,
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES") or None, "thp": thp_mode()}
