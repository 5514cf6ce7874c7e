"""Several processes, one job: ``jax.distributed`` for jdup (hosts of a TPU slice or GPU cluster, or local processes).

Joining: :func:`initialize` with no values keeps JAX's auto-detection (TPU slices, SLURM, Open MPI, Kubernetes:
``jax.distributed.initialize()``); with ``coordinator="HOST:PORT"``, ``num_processes`` and ``process_id`` (the CLI's
``--coordinator``/``--num-processes``/``--process-id``, or ``JDUP_COORDINATOR``/``JDUP_NUM_PROCESSES``/
``JDUP_PROCESS_ID``) it joins hosts that have no cluster manager. On CPU it selects gloo collectives. A missing or
inconsistent value raises :class:`jdup.errors.JdupError` (one line, exit 2 from the CLI) before anything starts; a
process that does not join within ``timeout_s`` raises one naming the coordinator and the process.

Coordination: every call below is made by every process in the same order (the CLI runs the same command on each).
:func:`broadcast`, :func:`barrier`, :func:`run_token` go through the key-value store of JAX's coordination service
(no device collective, nothing to compile), and every wait polls the job's *abort* keys: when one process fails or
is interrupted it calls :func:`abort`, and every process waiting anywhere raises :class:`PeerFailed` at once (with
the failed process's exit code: 2 for an error, 130 for Ctrl-C) instead of hanging. A process that is killed
outright is noticed by JAX's heartbeats (``heartbeat_timeout_s``).

Writing: only process 0 (:func:`is_writer`) writes output files; see :class:`jdup.atomic.StagedDir`.

Stopping: the CLI installs :func:`install_interrupt_handler`, which remembers every SIGINT before raising
``KeyboardInterrupt``; loops call :func:`stop_point` every step, so an interrupt whose exception some library
swallowed (a ``KeyboardInterrupt`` raised inside a finaliser or a callback is only printed by Python) still stops
the run at the next step, and so does the failure of another process. :func:`deferred_interrupt` holds Ctrl-C back
while a checkpoint is written.

On one process (no ``jax.distributed``) everything here is trivial: index 0 of 1, writer, barriers return at once,
:func:`broadcast` returns its argument. Importing this module imports no JAX.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import re
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from jdup.errors import JdupError

log = logging.getLogger("jdup")

ENV_COORDINATOR = "JDUP_COORDINATOR"
ENV_NUM_PROCESSES = "JDUP_NUM_PROCESSES"
ENV_PROCESS_ID = "JDUP_PROCESS_ID"
ENV_TIMEOUT = "JDUP_DISTRIBUTED_TIMEOUT"
#: seconds a process waits for the others to join (``$JDUP_DISTRIBUTED_TIMEOUT`` overrides)
DEFAULT_TIMEOUT_S = 300
#: seconds without heartbeats after which JAX declares a process dead
HEARTBEAT_TIMEOUT_S = 60
#: seconds a failed process waits for the others to stop too (they may be inside a collective that never ends)
FAILED_WAIT_S = 60
#: seconds a barrier or broadcast waits for the slowest process (a long compile, a large export by process 0)
WAIT_TIMEOUT_S = 24 * 3600

_PREFIX = "jdup/"
_POLL_S = (0.02, 0.5)  # first and longest pause between two polls of the key-value store
_STOP_POLL_S = 1.0  # :func:`stop_point` asks the coordination service at most this often
#: on several processes, every this many steps the loops' :func:`stop_point` is a barrier (stop together)
SYNC_EVERY_STEPS = 10


class PeerFailed(Exception):
    """Another process of the job failed or was interrupted; ``code`` is its exit code (2 or 130)."""

    def __init__(self, process: int, code: int, message: str):
        self.process, self.code, self.message = process, int(code), message
        what = "was interrupted" if self.code == 130 else f"failed (exit {self.code})"
        super().__init__(f"process {process} of the job {what}: {message}" if message else
                         f"process {process} of the job {what}")


class Spec(NamedTuple):
    """What :func:`initialize` joins: all None = JAX's auto-detection."""

    coordinator: str | None
    num_processes: int | None
    process_id: int | None


# ---------------------------------------------------------------------------------------------------------------
# values


def _int_value(name: str, value: Any, source: str) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise JdupError(f"must be an integer, got {value!r}", source)
    try:
        return int(str(value).strip())
    except ValueError:
        raise JdupError(f"must be an integer, got {value!r}", source) from None


#: variables of the cluster managers JAX detects; without any of them JAX (a slow import) is not asked
_CLUSTER_HINTS = ("SLURM_JOB_ID", "OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE", "PMIX_NAMESPACE",
                  "TPU_WORKER_HOSTNAMES", "CLOUD_TPU_TASK_ID", "KUBERNETES_SERVICE_HOST",
                  "MEGASCALE_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS")


def _cluster_detected() -> bool:
    """A cluster manager JAX auto-detects (SLURM, Open MPI, a TPU slice, Kubernetes, ...) is present."""
    if not any(os.environ.get(k) for k in _CLUSTER_HINTS):
        return False
    try:
        from jax._src.clusters import ClusterEnv
    except ImportError:  # pragma: no cover
        return False
    for env in ClusterEnv._cluster_types:
        try:
            if not getattr(env, "opt_in_only_method", False) and env.is_env_present():
                return True
        except Exception:  # noqa: BLE001 - a detector that cannot tell is not a cluster
            continue
    return False


def resolve(coordinator: str | None = None, num_processes: Any = None, process_id: Any = None,
            env: dict | None = None) -> Spec:
    """The values to join with: arguments, else ``JDUP_*`` variables; checked.

    Raises:
      JdupError: a malformed coordinator (``HOST:PORT``), a count below 1, an id outside ``[0, num_processes)``,
        or only some of the three given where no cluster manager fills in the rest.
    """
    env = os.environ if env is None else env
    src = {"coordinator": "--coordinator", "num": "--num-processes", "id": "--process-id"}
    if coordinator in (None, ""):
        coordinator = env.get(ENV_COORDINATOR) or None
        src["coordinator"] = ENV_COORDINATOR
    if num_processes in (None, ""):
        num_processes = env.get(ENV_NUM_PROCESSES) or None
        src["num"] = ENV_NUM_PROCESSES
    if process_id in (None, ""):
        process_id = env.get(ENV_PROCESS_ID) or None
        src["id"] = ENV_PROCESS_ID
    n = _int_value("num_processes", num_processes, src["num"])
    i = _int_value("process_id", process_id, src["id"])
    if coordinator is not None:
        coordinator = str(coordinator).strip()
        m = re.fullmatch(r"(\[[0-9a-fA-F:.]+\]|[^\s:/\[\]]+):(\d+)", coordinator)
        if not m or not 0 < int(m.group(2)) < 65536:
            raise JdupError(f"must be HOST:PORT (e.g. 10.0.0.1:7777 or localhost:7777), got {coordinator!r}",
                            src["coordinator"])
    if n is not None and n < 1:
        raise JdupError(f"must be >= 1, got {n}", src["num"])
    if i is not None and i < 0:
        raise JdupError(f"must be >= 0, got {i}", src["id"])
    if n is not None and i is not None and i >= n:
        raise JdupError(f"must lie in [0, {n - 1}] for {n} processes, got {i}", src["id"])
    given = [v is not None for v in (coordinator, n, i)]
    if any(given) and not all(given) and not _cluster_detected():
        missing = [name for name, g in zip(("--coordinator HOST:PORT", "--num-processes N", "--process-id I"),
                                           given, strict=True) if not g]
        raise JdupError(f"jax.distributed: missing {', '.join(missing)} (give all three, or none on a cluster "
                        "whose manager JAX detects: a TPU slice, SLURM, Open MPI, Kubernetes)")
    return Spec(coordinator, n, i)


def requested(coordinator: str | None = None, num_processes: Any = None, process_id: Any = None,
              env: dict | None = None) -> bool:
    """Whether any joining value is given (arguments or ``JDUP_*`` variables): that implies ``--distributed``."""
    env = os.environ if env is None else env
    return any(v not in (None, "") for v in (coordinator, num_processes, process_id)) or any(
        env.get(k) for k in (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID))


# ---------------------------------------------------------------------------------------------------------------
# Ctrl-C: remembered, so that a swallowed KeyboardInterrupt still stops the run at the next stop_point()

_interrupted = threading.Event()
_sigints = 0


def _on_sigint(signum: int, frame: Any) -> None:
    global _sigints
    _interrupted.set()
    _sigints += 1
    if _sigints == 1 and process_count() > 1:
        log.warning("Ctrl-C: every process stops at the next step they all reach; Ctrl-C again stops this one "
                    "at once")
        return
    raise KeyboardInterrupt


def _quiet_unraisable(previous: Callable[[Any], None]) -> Callable[[Any], None]:
    """An ``sys.unraisablehook`` that drops the ``KeyboardInterrupt`` of a remembered Ctrl-C when Python could not
    raise it (the signal landed in a garbage-collection callback, e.g. JAX's ``_xla_gc_callback``, or a
    ``__del__``: Python would print "Exception ignored in ..." with a traceback and go on). The interrupt is not
    lost: the next :func:`interrupt_point` / :func:`stop_point` raises it. Anything else goes to ``previous``."""

    def hook(unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, KeyboardInterrupt) and _interrupted.is_set():
            return
        previous(unraisable)

    return hook


def install_interrupt_handler() -> Callable[[], None]:
    """Installs jdup's SIGINT handler; returns a function that puts the previous handler back. Main thread only
    (elsewhere a no-op). On one process the handler remembers the interrupt, then raises ``KeyboardInterrupt``.
    On several processes the first Ctrl-C is only remembered: the processes of the job stop together at the next
    :func:`barrier` or synchronised :func:`stop_point` (one process leaving on its own would leave the others
    waiting inside a collective); a second Ctrl-C raises at once."""
    global _sigints
    _interrupted.clear()
    _sigints = 0
    try:
        old = signal.signal(signal.SIGINT, _on_sigint)
    except ValueError:  # not the main thread / interpreter
        return lambda: None
    old_hook = sys.unraisablehook
    sys.unraisablehook = _quiet_unraisable(old_hook)

    def restore() -> None:
        global _sigints
        with contextlib.suppress(ValueError):
            signal.signal(signal.SIGINT, old)
        sys.unraisablehook = old_hook
        _interrupted.clear()  # a later library call in this process starts afresh
        _sigints = 0

    return restore


def interrupted() -> bool:
    """Whether a Ctrl-C arrived while jdup's handler (:func:`install_interrupt_handler`) was installed."""
    return _interrupted.is_set()


def interrupt_point() -> None:
    """Raises ``KeyboardInterrupt`` when a Ctrl-C arrived earlier, even if its exception was swallowed (one
    process; several processes agree on where to stop: :func:`stop_point`)."""
    if _interrupted.is_set() and process_count() <= 1:
        raise KeyboardInterrupt


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[None]:
    """Holds back Ctrl-C (SIGINT) until the block is done, then raises it: a checkpoint being saved is finished
    before the interrupt lands (no half-written step, no library thread dying at exit). Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []

    def hold(signum: int, frame: Any) -> None:
        got.append(signum)  # handed to the previous handler at the end (jdup's remembers it)

    try:
        old = signal.signal(signal.SIGINT, hold)
    except ValueError:  # not the main interpreter
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
        if got and old is not signal.SIG_IGN:
            if callable(old):  # Python's default (raises), jdup's (remembers, raises), an outer deferral (holds)
                old(signal.SIGINT, None)
            else:  # SIG_DFL or a handler installed outside Python
                raise KeyboardInterrupt


# ---------------------------------------------------------------------------------------------------------------
# joining


def _state():
    """JAX's distributed state when ``jax.distributed`` was initialised (by jdup or by the caller), else None."""
    if "jax" not in sys.modules:
        return None
    from jax._src import distributed as jd

    st = jd.global_state
    return st if st.client is not None else None


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None, *,
               timeout_s: float | None = None, heartbeat_timeout_s: int = HEARTBEAT_TIMEOUT_S) -> Spec:
    """Join the job (see the module docstring); a no-op when ``jax.distributed`` is already initialised.

    Args:
      coordinator: ``HOST:PORT`` of process 0's coordination service (None: ``$JDUP_COORDINATOR`` or
        auto-detection).
      num_processes: processes in the job (None: ``$JDUP_NUM_PROCESSES`` or auto-detection).
      process_id: this process's index (None: ``$JDUP_PROCESS_ID`` or auto-detection).
      timeout_s: how long to wait for every process to join (default ``$JDUP_DISTRIBUTED_TIMEOUT`` or 300 s).
      heartbeat_timeout_s: after this long without heartbeats a process counts as dead.

    Returns:
      The values joined with (auto-detected ones stay None).

    Raises:
      JdupError: bad values, no cluster to detect, or a process that did not join in time (one line).
    """
    spec = resolve(coordinator, num_processes, process_id)
    if timeout_s is None:
        try:
            timeout_s = float(os.environ.get(ENV_TIMEOUT) or DEFAULT_TIMEOUT_S)
        except ValueError:
            raise JdupError(f"must be a number of seconds, got {os.environ.get(ENV_TIMEOUT)!r}", ENV_TIMEOUT) from None
    if timeout_s <= 0:
        raise JdupError(f"timeout: must be > 0 seconds, got {timeout_s}")
    import jax

    if _state() is not None:
        return spec
    if not os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # only the CPU backend reads it
    who = f"process {spec.process_id}" if spec.process_id is not None else "this process"
    where = f"the coordinator {spec.coordinator}" if spec.coordinator else "the auto-detected coordinator"
    try:
        with _connect_errors_raise():
            jax.distributed.initialize(
                spec.coordinator, spec.num_processes, spec.process_id,
                initialization_timeout=max(1, int(round(timeout_s))),
                heartbeat_timeout_seconds=int(heartbeat_timeout_s),
                shutdown_timeout_seconds=max(5, int(heartbeat_timeout_s)),
            )
    except (ValueError, TypeError) as e:  # auto-detection found no cluster, or it gave bad values
        if spec.coordinator is None and "coordinator_address" in str(e):
            raise JdupError("jax.distributed: no cluster manager detected (a TPU slice, SLURM, Open MPI, "
                            "Kubernetes); pass --coordinator HOST:PORT --num-processes N --process-id I") from None
        raise JdupError(f"jax.distributed: {e}") from None
    except Exception as e:  # noqa: BLE001 - the join failed or timed out
        _reset_state()
        detail = " ".join(str(e).split())[:200]
        detail = "" if detail in ("", "std::bad_cast") else f" ({detail})"
        n = spec.num_processes or "all"
        if spec.process_id == 0:
            what = (f"process 0 (the coordinator, {spec.coordinator}): not all {n} processes joined within "
                    f"{timeout_s:g} s")
        else:
            what = f"{who} could not join the {n}-process job at {where} within {timeout_s:g} s"
        raise JdupError(f"jax.distributed: {what}{detail}; start every process with the same --coordinator and "
                        "--num-processes, each with its own --process-id, and check that process 0 is "
                        "reachable") from None
    from jax._src import distributed as jd

    run_token()  # every process takes part: the token is drawn once, here
    log.info("jax.distributed: process %d of %d (coordinator %s)", jd.global_state.process_id,
             jd.global_state.num_processes, jd.global_state.coordinator_address)
    return spec


def _lost_contact(*args: Any) -> None:  # pragma: no cover - called by the coordination client's threads
    log.error("jax.distributed: lost contact with the job")


@contextlib.contextmanager
def _connect_errors_raise():
    """While joining, a failed connection raises an exception instead of aborting the process: JAX's
    coordination client takes a callback for fatal errors (without one it ends the process with a C++ log)."""
    from jax._src import distributed as jd

    real = jd._jax.get_distributed_runtime_client

    def client(*args: Any, **kwargs: Any):
        kwargs.setdefault("missed_heartbeat_callback", _lost_contact)
        return real(*args, **kwargs)

    jd._jax.get_distributed_runtime_client = client
    try:
        yield
    finally:
        jd._jax.get_distributed_runtime_client = real


def _reset_state() -> None:
    """Forgets a half-made join (so the process can exit without waiting for a shutdown barrier)."""
    from jax._src import distributed as jd

    st = jd.global_state
    for name in ("preemption_sync_manager", "client", "service"):
        obj = getattr(st, name, None)
        if obj is not None and name == "service":
            try:
                obj.shutdown()
            except Exception:  # noqa: BLE001
                pass
        setattr(st, name, None)


def process_index() -> int:
    """This process's index (0 without ``jax.distributed``); imports nothing."""
    st = _state()
    return int(st.process_id) if st is not None else 0


def process_count() -> int:
    """Processes in the job (1 without ``jax.distributed``); imports nothing."""
    st = _state()
    return int(st.num_processes) if st is not None else 1


def is_writer() -> bool:
    """Process 0: the one process that writes output files."""
    return process_index() == 0


def shutdown() -> None:
    """Leaves the job (``jax.distributed.shutdown``); a no-op on one process."""
    if _state() is not None:
        import jax

        try:
            jax.distributed.shutdown()
        except Exception as e:  # noqa: BLE001 - a peer that is gone already; nothing left to do
            log.debug("jax.distributed.shutdown: %s", e)


# ---------------------------------------------------------------------------------------------------------------
# coordination through the key-value store

_counters: dict[str, int] = {}
_last_stop_poll = 0.0
_token: str | None = None


def _next(kind: str) -> int:
    _counters[kind] = _counters.get(kind, 0) + 1
    return _counters[kind]


def _aborted(client) -> PeerFailed | None:
    try:
        entries = client.key_value_dir_get(_PREFIX + "abort/")
    except Exception:  # noqa: BLE001 - no abort key yet
        return None
    for key, value in sorted(entries):
        try:
            rec = json.loads(value)
        except ValueError:
            rec = {"message": value}
        proc = rec.get("process", key.rsplit("/", 1)[-1])
        if int(proc) == process_index():
            continue
        return PeerFailed(int(proc), int(rec.get("code", 2)), str(rec.get("message", "")))
    return None


def _wait(what: str, ready, client, timeout_s: float):
    """Polls ``ready()`` (returns a value or None) until it has a value; raises :class:`PeerFailed` when another
    process aborted, :class:`JdupError` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    pause = _POLL_S[0]
    while True:
        got = ready()
        if got is not None:
            return got
        failed = _aborted(client)
        if failed is not None:
            raise failed
        if time.monotonic() > deadline:
            raise JdupError(f"jax.distributed: process {process_index()} waited {timeout_s:g} s at {what} for the "
                            "other processes; one of them is stuck or gone")
        time.sleep(pause)
        pause = min(pause * 1.5, _POLL_S[1])


def barrier(name: str, *, timeout_s: float = WAIT_TIMEOUT_S) -> None:
    """Every process reaches ``name`` before any goes on (a no-op on one process). It is also where the
    processes agree to stop: when any of them got a Ctrl-C, all of them stop here.

    Raises:
      KeyboardInterrupt: this process got a Ctrl-C (every process stops at this barrier).
      PeerFailed: another process failed, or got a Ctrl-C (code 130).
    """
    st = _state()
    if st is None or st.num_processes <= 1:
        return
    n = _next("barrier")
    folder = f"{_PREFIX}barrier/{n}/"
    st.client.key_value_set(f"{folder}{st.process_id}", f"{name}|{int(_interrupted.is_set())}")

    def ready():
        try:
            entries = st.client.key_value_dir_get(folder)
        except Exception:  # noqa: BLE001
            return None
        names = {v.rsplit("|", 1)[0] for _, v in entries}
        if len(names) > 1:
            raise JdupError(f"jax.distributed: the processes run different programs (barrier {n}: {sorted(names)}); "
                            "start every process with the same command")
        return entries if len(entries) >= st.num_processes else None

    entries = _wait(f"barrier {name!r}", ready, st.client, timeout_s)
    if st.process_id == 0 and n > 2:  # every process is past barrier n - 1, so nobody reads n - 2 any more
        with contextlib.suppress(Exception):
            st.client.key_value_delete(f"{_PREFIX}barrier/{n - 2}/")
    stopped = sorted(int(k.rsplit("/", 1)[-1]) for k, v in entries if v.endswith("|1"))
    if st.process_id in stopped:
        raise KeyboardInterrupt
    if stopped:
        raise PeerFailed(stopped[0], 130, "Ctrl-C")


def broadcast(obj: Any, *, timeout_s: float = WAIT_TIMEOUT_S) -> Any:
    """Process 0's ``obj`` (any picklable object) on every process; the argument of the others is ignored.

    Every process must call it at the same place of the same program: a call from another line of code than
    process 0's raises :class:`JdupError` instead of returning a value meant for another call."""
    st = _state()
    if st is None or st.num_processes <= 1:
        return obj
    caller = sys._getframe(1)
    site = f"{caller.f_code.co_filename.rsplit(os.sep, 1)[-1]}:{caller.f_lineno}"
    key = f"{_PREFIX}broadcast/{_next('broadcast')}"
    if st.process_id == 0:
        st.client.key_value_set_bytes(key, pickle.dumps((site, obj), protocol=pickle.HIGHEST_PROTOCOL))
        return obj

    def ready():
        try:
            data = st.client.key_value_try_get_bytes(key)
        except Exception:  # noqa: BLE001 - not there yet
            return None
        return (data,)

    (data,) = _wait(f"broadcast {key.rsplit('/', 1)[-1]} ({site})", ready, st.client, timeout_s)
    their_site, value = pickle.loads(data)
    if their_site != site:
        raise JdupError(f"jax.distributed: the processes run different programs (process 0 broadcast from "
                        f"{their_site}, process {st.process_id} expected it at {site}); start every process with "
                        "the same command and jdup version")
    return value


def run_token() -> str:
    """A per-run id (12 hex digits) drawn by process 0 and the same on every process; stable for the process.

    (Fetched by :func:`initialize` on every process; it has its own key, so a first call on one process only
    cannot shift the other collective calls.)"""
    global _token
    if _token is not None:
        return _token
    st = _state()
    if st is None or st.num_processes <= 1:
        _token = uuid.uuid4().hex[:12]
        return _token
    key = f"{_PREFIX}run_token"
    if st.process_id == 0:
        _token = uuid.uuid4().hex[:12]
        st.client.key_value_set(key, _token)
        return _token

    def ready():
        try:
            return st.client.key_value_try_get(key)
        except Exception:  # noqa: BLE001 - not there yet
            return None

    _token = str(_wait("the run token", ready, st.client, WAIT_TIMEOUT_S))
    return _token


def abort(code: int, message: str = "") -> None:
    """Tells the other processes that this one stops with exit ``code`` (2: error, 130: Ctrl-C); their waits
    raise :class:`PeerFailed`. A no-op on one process; never raises."""
    st = _state()
    if st is None or st.num_processes <= 1:
        return
    try:
        st.client.key_value_set(f"{_PREFIX}abort/{st.process_id}",
                                json.dumps({"process": st.process_id, "code": int(code), "message": message}))
    except Exception as e:  # noqa: BLE001 - the coordinator is gone: the others notice through the heartbeats
        log.debug("abort not published: %s", e)


def stop_point(step: int | None = None) -> None:
    """Where a loop may stop; loops call it every step with the step number.

    One process: raises ``KeyboardInterrupt`` when a Ctrl-C arrived (:func:`interrupt_point`). Several
    processes: every :data:`SYNC_EVERY_STEPS`-th ``step`` is a :func:`barrier` where the processes agree to stop
    together after a Ctrl-C on any of them; otherwise raises :class:`PeerFailed` when another process has already
    stopped (asked at most once a second)."""
    global _last_stop_poll
    interrupt_point()
    st = _state()
    if st is None or st.num_processes <= 1:
        return
    if step is not None and step % SYNC_EVERY_STEPS == 0:
        barrier("stop-point")
        return
    now = time.monotonic()
    if now - _last_stop_poll < _STOP_POLL_S:
        return
    _last_stop_poll = now
    failed = _aborted(st.client)
    if failed is not None:
        raise failed


def agree_exit(code: int, message: str = "", *, timeout_s: float = 3600) -> tuple[int, str]:
    """The exit code every process leaves with, and the message that goes with it.

    Publishes this process's ``code`` (and :func:`abort` when it failed), waits until every process has published
    its own, then takes this process's failure, else process 0's, else the first failure of another process, else
    0. On one process: ``(code, message)``. A process that is gone (killed) makes the others give up after
    ``timeout_s`` (or JAX's heartbeats end them first); a failed process waits at most :data:`FAILED_WAIT_S`.
    """
    global _reported_all
    st = _state()
    if st is None or st.num_processes <= 1:
        return code, message
    client = st.client
    if code:
        abort(code, message)
    try:
        client.key_value_set(f"{_PREFIX}exit/{st.process_id}", json.dumps({"code": int(code), "message": message}))
    except Exception as e:  # noqa: BLE001
        return code or 2, message or f"jax.distributed: the coordinator is gone ({' '.join(str(e).split())[:200]})"
    # a failed process waits a little for the others to read its abort (process 0 hosts the coordination service)
    deadline = time.monotonic() + (min(timeout_s, FAILED_WAIT_S) if code else timeout_s)
    codes: dict[int, dict] = {}
    pause = _POLL_S[0]
    while True:
        try:
            codes = {int(k.rsplit("/", 1)[-1]): json.loads(v) for k, v in client.key_value_dir_get(_PREFIX + "exit/")}
        except Exception:  # noqa: BLE001 - the coordinator is gone
            break
        if len(codes) >= st.num_processes or time.monotonic() > deadline:
            break
        time.sleep(pause)
        pause = min(pause * 1.5, _POLL_S[1])
    _reported_all = len(codes) >= st.num_processes
    if code:
        return code, message
    first = codes.get(0)
    if first and first.get("code"):
        return int(first["code"]), str(PeerFailed(0, first["code"], first.get("message", "")))
    for p, rec in sorted(codes.items()):
        if rec.get("code"):
            return int(rec["code"]), str(PeerFailed(p, rec["code"], rec.get("message", "")))
    if not _reported_all:
        missing = sorted(set(range(st.num_processes)) - set(codes))
        return 2, f"jax.distributed: process(es) {missing} did not finish (killed or stuck)"
    return 0, ""


_reported_all = False


def leave(code: int) -> None:
    """Ends this process with ``code`` after :func:`agree_exit`: leaves the job in order when every process
    reported (a shutdown barrier they all reach), at once otherwise; stdout/stderr are flushed first."""
    if _state() is not None and (_reported_all or process_count() <= 1):
        shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
